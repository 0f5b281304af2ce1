//! Small helpers every program uses: counters, configuration, socket-address writes.

use aya_ebpf::{helpers::bpf_set_retval, programs::SockAddrContext};
use kmesh_common::*;

use crate::maps::{STATS, TELEMETRY_CONF};

pub const BPF_SK_STORAGE_GET_F_CREATE: u64 = 1;
/// Ring buffer records are committed without waking a reader: the daemon polls the rings on
/// a timer and never waits on them, so the kernel need not queue a wakeup (an IRQ work item).
pub const BPF_RB_NO_WAKEUP: u64 = 1;

#[inline(always)]
pub fn telemetry_on() -> bool {
    telemetry_flags() & TFLAG_ON != 0
}

/// The `TFLAG_*` bits the daemon set (0: none).
#[inline(always)]
pub fn telemetry_flags() -> u64 {
    TELEMETRY_CONF.get(TCONF_FLAGS).copied().unwrap_or(0)
}

#[inline(always)]
pub fn count(idx: u32) {
    if let Some(p) = STATS.get_ptr_mut(idx) {
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn proto_of(ctx: &SockAddrContext) -> Option<u8> {
    let p = unsafe { (*ctx.sock_addr).protocol };
    match p as u8 {
        PROTO_TCP => Some(PROTO_TCP),
        PROTO_UDP => Some(PROTO_UDP),
        _ => None,
    }
}

#[inline(always)]
pub fn refuse(errno: i32) -> i32 {
    unsafe { bpf_set_retval(-errno) };
    0
}

/// Writes an address (16-byte layout) and port (network order) into an IPv6 socket address.
#[inline(always)]
pub fn set_ip6(sa: *mut aya_ebpf::bindings::bpf_sock_addr, a: &[u32; 4], port: u16) {
    unsafe {
        (*sa).user_ip6[0] = a[0];
        (*sa).user_ip6[1] = a[1];
        (*sa).user_ip6[2] = a[2];
        (*sa).user_ip6[3] = a[3];
        (*sa).user_port = port as u32;
    }
}

#[inline(always)]
pub fn eq4(a: &[u32; 4], b: &[u32; 4]) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}
