//! `cgroup/sendmsg4/6` and `cgroup/recvmsg4/6`: datagrams of unconnected UDP sockets to a
//! service frontend go to a backend chosen once per flow, and replies are shown as coming
//! from the frontend.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_ktime_get_ns},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use kmesh_common::*;

use crate::lb::{Verdict, apply_v4, apply_v6, balance};
use crate::maps::{BACKENDS, Lookup, NETNS, UDP_REV};
use crate::shared::{count, eq4, set_ip6};

/// A datagram of an unconnected UDP socket to `addr:port`: the backend this socket already
/// sends that frontend to while it is in force and not idle, else a new choice by the
/// service's policy (`balance`), remembered in the socket's `UDP_REV` slots.
#[inline(always)]
pub fn udp_send(ctx: &SockAddrContext, addr: [u32; 4], port: u16, family: u8) -> Verdict {
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if unsafe { NETNS.find(cookie) }.is_none() {
        return Verdict::Pass;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let st = unsafe { UDP_REV.get_ptr_mut(ctx) };
    if !st.is_null() {
        let mut i = 0;
        while i < UDP_REV_SLOTS {
            let e = unsafe { &mut (*st).entries[i] };
            if e.last_ns != 0
                && e.vip_port == port
                && eq4(&e.vip, &addr)
                && now.saturating_sub(e.last_ns) < UDP_IDLE_NS
            {
                // Still in force: the backend id holds the same address (an endpoint that left
                // the service has no BACKENDS entry any more).
                let bid = e.backend_id;
                let backend = e.backend;
                let alive = unsafe { BACKENDS.find(bid) }
                    .copied()
                    .is_some_and(|b| b.belongs_to(&bid) && eq4(&b.addr, &backend));
                if alive {
                    e.last_ns = now;
                    count(stat::UDP_STICKY);
                    return Verdict::Rewrite(backend, e.backend_port, bid, 0);
                }
            }
            i += 1;
        }
    }
    let v = balance(ctx, addr, port, PROTO_UDP, family);
    if let Verdict::Rewrite(backend, backend_port, backend_id, _) = v {
        remember(ctx, addr, port, backend, backend_port, backend_id, now);
    }
    v
}

/// Records in the socket's `UDP_REV` slots that datagrams to `vip:vip_port` go to
/// `backend:backend_port`: the slot of this frontend (or, for the DNS proxy, whose
/// `backend_id` is 0, of this backend: the latest resolver asked is the one replies show),
/// else the least recently used one.
#[inline(always)]
pub fn remember(
    ctx: &SockAddrContext,
    vip: [u32; 4],
    vip_port: u16,
    backend: [u32; 4],
    backend_port: u16,
    backend_id: u32,
    now: u64,
) {
    let st = unsafe { UDP_REV.get_or_insert_ptr_mut(ctx, None) };
    if st.is_null() {
        return;
    }
    let mut pick = 0;
    let mut oldest = u64::MAX;
    let mut i = 0;
    while i < UDP_REV_SLOTS {
        let e = unsafe { &(*st).entries[i] };
        let same = if backend_id == 0 {
            e.backend_id == 0 && e.backend_port == backend_port && eq4(&e.backend, &backend)
        } else {
            e.vip_port == vip_port && eq4(&e.vip, &vip)
        };
        if e.last_ns != 0 && same {
            pick = i;
            break;
        }
        if e.last_ns < oldest {
            oldest = e.last_ns;
            pick = i;
        }
        i += 1;
    }
    if pick < UDP_REV_SLOTS {
        unsafe {
            (*st).entries[pick] =
                UdpRevEntry { vip, backend, vip_port, backend_port, backend_id, last_ns: now };
        }
    }
}

/// The frontend a reply from `src:sport` answers, for an unconnected UDP socket that sent
/// to it (its `UDP_REV` slots).
#[inline(always)]
pub fn udp_reply_source(ctx: &SockAddrContext, src: [u32; 4], sport: u16) -> Option<([u32; 4], u16)> {
    let st = unsafe { UDP_REV.get_ptr_mut(ctx) };
    if st.is_null() {
        return None;
    }
    let mut i = 0;
    while i < UDP_REV_SLOTS {
        let e = unsafe { &(*st).entries[i] };
        if e.last_ns != 0 && e.backend_port == sport && eq4(&e.backend, &src) {
            count(stat::UDP_REPLY_REWRITTEN);
            return Some((e.vip, e.vip_port));
        }
        i += 1;
    }
    None
}

#[cgroup_sock_addr(sendmsg4)]
pub fn kmesh_sendmsg4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let ip4 = unsafe { (*sa).user_ip4 };
    let port = unsafe { (*sa).user_port } as u16;
    if let Some((lo, pport)) = crate::dns::at_sendmsg(&ctx, v4_mapped(ip4), port, false) {
        unsafe {
            (*sa).user_ip4 = lo[3];
            (*sa).user_port = pport as u32;
        }
        return 1;
    }
    apply_v4(sa, udp_send(&ctx, v4_mapped(ip4), port, FAMILY_V4))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn kmesh_sendmsg6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let addr = unsafe { [(*sa).user_ip6[0], (*sa).user_ip6[1], (*sa).user_ip6[2], (*sa).user_ip6[3]] };
    let port = unsafe { (*sa).user_port } as u16;
    if let Some((lo, pport)) = crate::dns::at_sendmsg(&ctx, addr, port, true) {
        set_ip6(sa, &lo, pport);
        return 1;
    }
    let family = if is_v4_mapped(&addr) { FAMILY_V4 } else { FAMILY_V6 };
    apply_v6(sa, udp_send(&ctx, addr, port, family))
}

#[cgroup_sock_addr(recvmsg4)]
pub fn kmesh_recvmsg4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let ip4 = unsafe { (*sa).user_ip4 };
    let port = unsafe { (*sa).user_port } as u16;
    if let Some((vip, vport)) = udp_reply_source(&ctx, v4_mapped(ip4), port) {
        unsafe {
            (*sa).user_ip4 = vip[3];
            (*sa).user_port = vport as u32;
        }
    }
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn kmesh_recvmsg6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let addr = unsafe { [(*sa).user_ip6[0], (*sa).user_ip6[1], (*sa).user_ip6[2], (*sa).user_ip6[3]] };
    let port = unsafe { (*sa).user_port } as u16;
    if let Some((vip, vport)) = udp_reply_source(&ctx, addr, port) {
        set_ip6(sa, &vip, vport);
    }
    1
}
