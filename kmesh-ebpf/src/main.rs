//! Kernel side of the mesh: socket-level service load balancing at connect().
//!
//! For a socket of an enrolled network namespace whose destination is a service frontend,
//! `cgroup/connect4` and `cgroup/connect6` choose a backend and rewrite the destination in the
//! socket; no packet is ever NATed. Everything else passes unchanged. All decisions that can be
//! made ahead of time (health, locality levels, weights, port mappings) are compiled into the
//! maps by the daemon; this file only follows the lookup chain described in `kmesh_common`.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

use aya_ebpf::{
    EbpfContext as _,
    btf_maps::{HashMap, PerCpuArray},
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_set_retval},
    macros::{btf_map, cgroup_sock_addr},
    programs::SockAddrContext,
};
use kmesh_common::*;

/// Hash maps allocate on demand: large capacities cost nothing until used, and an update that
/// replaces a value frees the old one only after an RCU grace period.
const NO_PREALLOC: usize = 1; // BPF_F_NO_PREALLOC

// Capacities here are defaults; the daemon sets the real ones at load time.
#[btf_map]
static NETNS: HashMap<u64, NetnsValue, 65536, NO_PREALLOC> = HashMap::new();
#[btf_map]
static FRONTENDS: HashMap<FrontendKey, FrontendValue, 131072, NO_PREALLOC> = HashMap::new();
#[btf_map]
static LB_TABLES: HashMap<TableKey, TableValue, 131072, NO_PREALLOC> = HashMap::new();
#[btf_map]
static ENDPOINTS: HashMap<EndpointKey, EndpointValue, 524288, NO_PREALLOC> = HashMap::new();
#[btf_map]
static BACKENDS: HashMap<u32, BackendValue, 262144, NO_PREALLOC> = HashMap::new();
#[btf_map]
static PORTS: HashMap<PortKey, PortValue, 262144, NO_PREALLOC> = HashMap::new();
#[btf_map]
static STATS: PerCpuArray<u64, { stat::COUNT as usize }> = PerCpuArray::new();

#[inline(always)]
fn count(idx: u32) {
    if let Some(p) = STATS.get_ptr_mut(idx) {
        unsafe { *p += 1 };
    }
}

/// What to do with one connect().
enum Verdict {
    /// Leave the destination as it is.
    Pass,
    /// Rewrite to this address (16-byte layout) and port (network order).
    Rewrite([u32; 4], u16),
    /// Fail connect() with this errno.
    Refuse(i32),
}

/// The whole decision, independent of the address family of the socket.
#[inline(always)]
fn balance(ctx: &SockAddrContext, addr: [u32; 4], port: u16, proto: u8, family: u8) -> Verdict {
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(ns) = (unsafe { NETNS.get(cookie) }) else {
        return Verdict::Pass;
    };
    let client_class = ns.class_id;
    let fe_key = FrontendKey { addr, port, proto, _pad: 0 };
    let Some(fe) = (unsafe { FRONTENDS.get(fe_key) }) else {
        count(stat::PASSED);
        return Verdict::Pass;
    };
    let service_id = fe.service_id;
    let default_port = fe.target_port;
    let class_id = if fe.flags & FE_F_LOCALITY != 0 { client_class } else { 0 };
    let tkey = TableKey { service_id, class_id, family, _pad: [0; 3] };

    // A slot can vanish between reading a table and reading its slot when the daemon switches
    // generations; the table read again then points at the new generation. Two tries suffice.
    let mut attempt = 0;
    while attempt < 2 {
        attempt += 1;
        let Some(t) = (unsafe { LB_TABLES.get(tkey) }) else {
            count(stat::INCONSISTENT);
            return Verdict::Pass;
        };
        let table = *t;
        let Some(level) = pick_level(&table) else {
            if table.flags & TBL_F_STRICT != 0 {
                count(stat::STRICT_NO_MATCH);
                return Verdict::Refuse(ERRNO_STRICT_NO_MATCH);
            }
            count(stat::NO_ENDPOINT);
            return Verdict::Refuse(ERRNO_NO_ENDPOINT);
        };
        let mut ekey = EndpointKey {
            service_id,
            class_id,
            generation: table.generation,
            family,
            level: level as u8,
            _pad: 0,
            index: 0,
        };
        let rand = unsafe { bpf_get_prandom_u32() };
        let slot = pick_slot(&table, level, rand, |i| {
            ekey.index = i;
            unsafe { ENDPOINTS.get(ekey) }.map(|e| e.cum_weight)
        });
        let Some(slot) = slot else {
            count(stat::RETRIED);
            continue;
        };
        ekey.index = slot;
        let Some(ep) = (unsafe { ENDPOINTS.get(ekey) }) else {
            count(stat::RETRIED);
            continue;
        };
        let backend_id = ep.backend_id;
        let Some(be) = (unsafe { BACKENDS.get(backend_id) }) else {
            count(stat::RETRIED);
            continue;
        };
        let pkey = PortKey { service_id, backend_id, service_port: port, _pad: 0 };
        let target = match unsafe { PORTS.get(pkey) } {
            Some(p) => p.target_port,
            None => default_port,
        };
        count(stat::REWRITTEN);
        return Verdict::Rewrite(be.addr, target);
    }
    count(stat::INCONSISTENT);
    Verdict::Pass
}

#[inline(always)]
fn proto_of(ctx: &SockAddrContext) -> Option<u8> {
    let p = unsafe { (*ctx.sock_addr).protocol };
    match p as u8 {
        PROTO_TCP => Some(PROTO_TCP),
        PROTO_UDP => Some(PROTO_UDP),
        _ => None,
    }
}

#[inline(always)]
fn refuse(errno: i32) -> i32 {
    unsafe { bpf_set_retval(-errno) };
    0
}

#[cgroup_sock_addr(connect4)]
pub fn kmesh_connect4(ctx: SockAddrContext) -> i32 {
    let Some(proto) = proto_of(&ctx) else { return 1 };
    let sa = ctx.sock_addr;
    let ip4 = unsafe { (*sa).user_ip4 };
    let port = unsafe { (*sa).user_port } as u16;
    match balance(&ctx, v4_mapped(ip4), port, proto, FAMILY_V4) {
        Verdict::Pass => 1,
        Verdict::Refuse(errno) => refuse(errno),
        Verdict::Rewrite(addr, target) => {
            if !is_v4_mapped(&addr) {
                // An IPv6 backend in an IPv4 table is a compiler bug; never misroute.
                count(stat::INCONSISTENT);
                return refuse(ERRNO_NO_ENDPOINT);
            }
            unsafe {
                (*sa).user_ip4 = addr[3];
                (*sa).user_port = target as u32;
            }
            1
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn kmesh_connect6(ctx: SockAddrContext) -> i32 {
    let Some(proto) = proto_of(&ctx) else { return 1 };
    let sa = ctx.sock_addr;
    let addr = unsafe { [(*sa).user_ip6[0], (*sa).user_ip6[1], (*sa).user_ip6[2], (*sa).user_ip6[3]] };
    let port = unsafe { (*sa).user_port } as u16;
    // A v4-mapped destination on a dual-stack socket is an IPv4 service: use IPv4 tables and
    // write the IPv4 backend back v4-mapped.
    let family = if is_v4_mapped(&addr) { FAMILY_V4 } else { FAMILY_V6 };
    match balance(&ctx, addr, port, proto, family) {
        Verdict::Pass => 1,
        Verdict::Refuse(errno) => refuse(errno),
        Verdict::Rewrite(new, target) => {
            unsafe {
                (*sa).user_ip6[0] = new[0];
                (*sa).user_ip6[1] = new[1];
                (*sa).user_ip6[2] = new[2];
                (*sa).user_ip6[3] = new[3];
                (*sa).user_port = target as u32;
            }
            1
        }
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    panic!("kmesh-ebpf is a BPF object: kmesh-daemon/build.rs builds it for bpfel-unknown-none");
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
