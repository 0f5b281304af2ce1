//! `sk_msg` (`kmesh_proxy_header`), attached to `WAYPOINT_SOCKS`: puts a PROXY protocol v2
//! header in front of the first write of a connection that connect() sent to a waypoint (see
//! `kmesh_common`'s waypoint section). The header is written by the kernel, in the client's
//! own send path: no proxy of ours sits between the client and the waypoint.

use aya_ebpf::{
    bindings::{sk_action::SK_DROP, sk_action::SK_PASS},
    helpers::{bpf_msg_pull_data, bpf_sk_storage_get},
    macros::sk_msg,
    programs::SkMsgContext,
};
use kmesh_common::*;

use crate::maps::{PP_HOST, PP_IDENT, WP_CONN};
use crate::shared::count;

/// Writes `n` bytes of `src` at `dst`, 8 at a time (the packet's bounds are checked by the
/// caller).
#[inline(always)]
unsafe fn put(dst: *mut u8, src: *const u8, n: usize) {
    let mut i = 0;
    while i + 8 <= n {
        unsafe {
            core::ptr::write_unaligned(
                dst.add(i).cast::<u64>(),
                core::ptr::read_unaligned(src.add(i).cast::<u64>()),
            )
        };
        i += 8;
    }
    while i < n {
        unsafe { *dst.add(i) = *src.add(i) };
        i += 1;
    }
}

/// Writes one TLV slot at `dst`: the map's, or one that is all padding.
#[inline(always)]
unsafe fn put_slot(dst: *mut u8, slot: Option<&PpSlot>) {
    match slot {
        Some(s) => unsafe { put(dst, s.bytes.as_ptr(), PP_SLOT) },
        None => {
            let mut i = 0;
            while i < PP_SLOT {
                unsafe { core::ptr::write_unaligned(dst.add(i).cast::<u64>(), 0u64) };
                i += 8;
            }
            let pad = ((PP_SLOT - 3) as u16).to_be_bytes();
            unsafe {
                *dst = PP2_TYPE_NOOP;
                *dst.add(1) = pad[0];
                *dst.add(2) = pad[1];
            }
        }
    }
}

#[sk_msg]
pub fn kmesh_proxy_header(ctx: SkMsgContext) -> u32 {
    let msg = ctx.msg;
    let sk = unsafe { (*msg).__bindgen_anon_3.sk };
    if sk.is_null() {
        return SK_PASS;
    }
    let map = core::ptr::from_ref(&WP_CONN).cast_mut().cast();
    let w = unsafe { bpf_sk_storage_get(map, sk.cast(), core::ptr::null_mut(), 0) }.cast::<WaypointConn>();
    if w.is_null() || unsafe { (*w).pending } == 0 {
        return SK_PASS;
    }
    let conn = unsafe { *w };
    use core::ptr::read_volatile as rv;
    let (family, l4, lport) = unsafe { (rv(&(*msg).family), rv(&(*msg).local_ip4), rv(&(*msg).local_port)) };
    let l6 = unsafe {
        [
            rv(&(*msg).local_ip6[0]),
            rv(&(*msg).local_ip6[1]),
            rv(&(*msg).local_ip6[2]),
            rv(&(*msg).local_ip6[3]),
        ]
    };
    let local = if family == 2 { v4_mapped(l4) } else { l6 };
    // An IPv4 destination (also dialled v4-mapped on a dual-stack socket) gets an IPv4 block.
    let v4 = is_v4_mapped(&conn.orig_dst) && is_v4_mapped(&local);
    let len = if v4 { PP2_LEN_V4 } else { PP2_LEN_V6 };
    if ctx.push_data(0, len as u32, 0).is_err() || unsafe { bpf_msg_pull_data(msg, 0, len as u32, 0) } != 0 {
        count(stat::PROXY_HEADER_FAILED);
        return SK_DROP;
    }
    let data = ctx.data() as *mut u8;
    let end = ctx.data_end() as *mut u8;
    if data.wrapping_add(len) > end {
        count(stat::PROXY_HEADER_FAILED);
        return SK_DROP;
    }
    let fe = FrontendKey { addr: conn.orig_dst, port: conn.fe_port, proto: PROTO_TCP, _pad: 0 };
    let ident = unsafe { PP_IDENT.get(conn.netns) };
    let host = unsafe { PP_HOST.get(fe) };
    unsafe {
        put(data, PP2_SIGNATURE.as_ptr(), 12);
        *data.add(12) = PP2_VERSION_PROXY;
        let body = ((len - 16) as u16).to_be_bytes();
        *data.add(14) = body[0];
        *data.add(15) = body[1];
        let src_port = (lport as u16).to_be_bytes();
        let dst_port = u16::from_be(conn.orig_port).to_be_bytes();
        let tlvs = if v4 {
            *data.add(13) = PP2_TCP4;
            put(data.add(16), local[3..].as_ptr().cast(), 4);
            put(data.add(20), conn.orig_dst[3..].as_ptr().cast(), 4);
            put(data.add(24), src_port.as_ptr(), 2);
            put(data.add(26), dst_port.as_ptr(), 2);
            data.add(28)
        } else {
            *data.add(13) = PP2_TCP6;
            put(data.add(16), local.as_ptr().cast(), 16);
            put(data.add(32), conn.orig_dst.as_ptr().cast(), 16);
            put(data.add(48), src_port.as_ptr(), 2);
            put(data.add(50), dst_port.as_ptr(), 2);
            data.add(52)
        };
        put_slot(tlvs, ident);
        put_slot(tlvs.add(PP_SLOT), host);
        (*w).pending = 0;
    }
    count(stat::PROXY_HEADER_SENT);
    SK_PASS
}
