//! `cgroup/connect4` and `cgroup/connect6`: a connect() to a service frontend is rewritten to a
//! backend; a pod's DNS query goes to its proxy (see `dns`).

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use kmesh_common::*;

use crate::lb::{Verdict, apply_v4, apply_v6, balance};
use crate::maps::{LB_CONN, ORIG_HANDOFF, WP_CONN};
use crate::shared::{count, proto_of, refuse, set_ip6, telemetry_on};

/// Leaves the service address a TCP client dialled for sock_ops, which records it with the
/// connection's telemetry when the same connect() reaches it (connections are TCP's: a UDP
/// socket leaves nothing); `counted`: it has socket storage saying what to count.
#[inline(always)]
fn remember_orig(ctx: &SockAddrContext, v: &Verdict, addr: [u32; 4], port: u16, proto: u8, counted: bool) {
    if proto != PROTO_TCP || !telemetry_on() {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(slot) = ORIG_HANDOFF.get_ptr_mut(handoff_slot(cookie)) else { return };
    let has_orig = if matches!(v, Verdict::Waypoint(..)) { ORIG_VIA_WAYPOINT } else { 1 };
    let flags = if counted { HANDOFF_F_COUNTED } else { 0 };
    unsafe { *slot = OrigHandoff { cookie, orig_dst: addr, orig_port: u16::from_be(port), has_orig, flags } };
}

/// A connection of a counted table: what its SYN counts and its close uncounts (sock_ops).
/// True when the socket's storage says so.
#[inline(always)]
fn remember_counted(ctx: &SockAddrContext, v: &Verdict, proto: u8) -> bool {
    let Verdict::Rewrite(_, _, backend_id, service_id) = v else { return false };
    if *service_id == 0 || proto != PROTO_TCP {
        return false;
    }
    let c = unsafe { LB_CONN.get_or_insert_ptr_mut(ctx, None) };
    if c.is_null() {
        return false;
    }
    unsafe { *c = LbConn { service_id: *service_id, backend_id: *backend_id, counted: 0, _pad: 0 } };
    true
}

/// What a connection sent to a waypoint needs for its PROXY header (see `waypoint`): the
/// destination it dialled, the frontend that matched, the client's namespace. Without the
/// record no header could be sent, so a socket that cannot have one fails connect().
#[inline(always)]
fn remember_waypoint(ctx: &SockAddrContext, v: &Verdict, addr: [u32; 4], port: u16) -> bool {
    let Verdict::Waypoint(_, _, fe_port) = v else { return true };
    let w = unsafe { WP_CONN.get_or_insert_ptr_mut(ctx, None) };
    if w.is_null() {
        count(stat::PROXY_HEADER_FAILED);
        return false;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    unsafe { *w = WaypointConn { orig_dst: addr, orig_port: port, fe_port: *fe_port, pending: 1, netns } };
    true
}

#[cgroup_sock_addr(connect4)]
pub fn kmesh_connect4(ctx: SockAddrContext) -> i32 {
    let Some(proto) = proto_of(&ctx) else { return 1 };
    let sa = ctx.sock_addr;
    let ip4 = unsafe { (*sa).user_ip4 };
    let port = unsafe { (*sa).user_port } as u16;
    if let Some((lo, pport)) = crate::dns::at_connect(&ctx, v4_mapped(ip4), port, proto, false) {
        unsafe {
            (*sa).user_ip4 = lo[3];
            (*sa).user_port = pport as u32;
        }
        return 1;
    }
    let v = balance(&ctx, v4_mapped(ip4), port, proto, FAMILY_V4);
    if matches!(v, Verdict::Rewrite(..) | Verdict::Waypoint(..)) {
        if !remember_waypoint(&ctx, &v, v4_mapped(ip4), port) {
            return refuse(ERRNO_WAYPOINT_UNREACHABLE);
        }
        let counted = remember_counted(&ctx, &v, proto);
        remember_orig(&ctx, &v, v4_mapped(ip4), port, proto, counted);
    }
    apply_v4(sa, v)
}

#[cgroup_sock_addr(connect6)]
pub fn kmesh_connect6(ctx: SockAddrContext) -> i32 {
    let Some(proto) = proto_of(&ctx) else { return 1 };
    let sa = ctx.sock_addr;
    let addr = unsafe { [(*sa).user_ip6[0], (*sa).user_ip6[1], (*sa).user_ip6[2], (*sa).user_ip6[3]] };
    let port = unsafe { (*sa).user_port } as u16;
    if let Some((lo, pport)) = crate::dns::at_connect(&ctx, addr, port, proto, true) {
        set_ip6(sa, &lo, pport);
        return 1;
    }
    // A v4-mapped destination on a dual-stack socket is an IPv4 service: use IPv4 tables and
    // write the IPv4 backend back v4-mapped.
    let family = if is_v4_mapped(&addr) { FAMILY_V4 } else { FAMILY_V6 };
    let v = balance(&ctx, addr, port, proto, family);
    if matches!(v, Verdict::Rewrite(..) | Verdict::Waypoint(..)) {
        if !remember_waypoint(&ctx, &v, addr, port) {
            return refuse(ERRNO_WAYPOINT_UNREACHABLE);
        }
        let counted = remember_counted(&ctx, &v, proto);
        remember_orig(&ctx, &v, addr, port, proto, counted);
    }
    apply_v6(sa, v)
}
