//! A pod's DNS queries go to the daemon's proxy, which listens on loopback inside the pod's own
//! namespace (`TCONF_DNS_PORT`, on 127.0.0.1 and ::1): connect() and sendmsg() of UDP and TCP
//! sockets to port 53 of any address are rewritten to it, and the resolver the pod asked is
//! recorded in `DNS_ORIG` under the socket's local port, where the proxy finds it to forward
//! what it does not answer. Replies are shown as coming from that resolver (`UDP_REV`). The
//! proxy's own sockets (`DNS_UPSTREAM_MARK`) pass.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_bind, bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::SockAddrContext,
};
use kmesh_common::*;

use crate::maps::{DNS_ORIG, DNS_PODS, DNS_TCP, TELEMETRY_CONF};
use crate::shared::count;

/// 127.0.0.1 and ::1 in the 16-byte layout.
const LO4: [u32; 4] = v4_mapped(u32::from_ne_bytes([127, 0, 0, 1]));
const LO6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// The namespace cookie and the proxy's port (network order) when a socket's destination
/// `dst:port` (network order) makes this a query the pod's proxy must see: port 53, a pod
/// with a proxy listening on the loopback of the query's family, not the proxy's own socket.
#[inline(always)]
fn proxy_for(ctx: &SockAddrContext, dst: &[u32; 4], port: u16, sock_v6: bool) -> Option<(u64, u16)> {
    if port != DNS_PORT_NET {
        return None;
    }
    let pport = TELEMETRY_CONF.get(TCONF_DNS_PORT).copied().unwrap_or(0) as u16;
    if pport == 0 {
        return None;
    }
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() || unsafe { (*sk).mark } == DNS_UPSTREAM_MARK {
        return None;
    }
    let ns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let v = unsafe { DNS_PODS.get(ns) }.copied()?;
    if !v.belongs_to(&ns) {
        return None;
    }
    let wire_v4 = !sock_v6 || is_v4_mapped(dst);
    if v.flags & (if wire_v4 { DNS_POD_V4 } else { DNS_POD_V6 }) == 0 {
        return None;
    }
    Some((ns, pport.to_be()))
}

#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: u32,
    zero: [u8; 8],
}

#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port: u16,
    flowinfo: u32,
    addr: [u32; 4],
    scope_id: u32,
}

/// Gives a socket without a local port one (a random ephemeral port, a few tries): a
/// connected UDP socket is only given its port after connect(), too late to record it.
/// Returns the port (host order), 0 when none could be taken.
#[inline(always)]
fn bind_random(ctx: &SockAddrContext, sock_v6: bool) -> u16 {
    let mut i = 0;
    while i < 4 {
        i += 1;
        let port = 32768 + (unsafe { bpf_get_prandom_u32() } % 28232) as u16;
        let rc = if sock_v6 {
            let mut sa =
                SockaddrIn6 { family: 10, port: port.to_be(), flowinfo: 0, addr: [0; 4], scope_id: 0 };
            unsafe {
                bpf_bind(
                    ctx.sock_addr,
                    (&mut sa as *mut SockaddrIn6).cast(),
                    core::mem::size_of::<SockaddrIn6>() as i32,
                )
            }
        } else {
            let mut sa = SockaddrIn { family: 2, port: port.to_be(), addr: 0, zero: [0; 8] };
            unsafe {
                bpf_bind(
                    ctx.sock_addr,
                    (&mut sa as *mut SockaddrIn).cast(),
                    core::mem::size_of::<SockaddrIn>() as i32,
                )
            }
        };
        if rc == 0 {
            return port;
        }
    }
    0
}

/// connect() of a pod's socket to `dst:dport`: the loopback address and port (network order)
/// to write instead when the query goes to the pod's proxy.
#[inline(always)]
pub fn at_connect(
    ctx: &SockAddrContext,
    dst: [u32; 4],
    dport: u16,
    proto: u8,
    sock_v6: bool,
) -> Option<([u32; 4], u16)> {
    let (ns, pport) = proxy_for(ctx, &dst, dport, sock_v6)?;
    let lport = connect_port(ctx, proto, sock_v6);
    let lo = redirect(ctx, ns, pport, dst, dport, proto, sock_v6, lport)?;
    Some((lo, pport))
}

/// A datagram of an unconnected UDP socket: as [`at_connect`].
#[inline(always)]
pub fn at_sendmsg(
    ctx: &SockAddrContext,
    dst: [u32; 4],
    dport: u16,
    sock_v6: bool,
) -> Option<([u32; 4], u16)> {
    let (ns, pport) = proxy_for(ctx, &dst, dport, sock_v6)?;
    let lo = redirect(ctx, ns, pport, dst, dport, PROTO_UDP, sock_v6, bound_port(ctx))?;
    Some((lo, pport))
}

/// The socket's local port (host order; 0 when it has none yet).
#[inline(always)]
fn bound_port(ctx: &SockAddrContext) -> u16 {
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() { 0 } else { unsafe { (*sk).src_port as u16 } }
}

/// At connect(): the local port of a UDP socket, given one now if it has none (only the
/// connect hooks may bind). TCP sockets get theirs later (see `redirect`): 0.
#[inline(always)]
fn connect_port(ctx: &SockAddrContext, proto: u8, sock_v6: bool) -> u16 {
    if proto != PROTO_UDP {
        return 0;
    }
    let p = bound_port(ctx);
    if p != 0 { p } else { bind_random(ctx, sock_v6) }
}

/// Sends a query for `dst:dport` (16-byte layout, network-order port) from a socket with
/// local port `lport` (UDP; see `connect_port`) to the proxy: records the resolver, and
/// returns the loopback address to write (the proxy's port is the caller's). `None` leaves
/// the query on its way to the resolver (counted as untracked).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn redirect(
    ctx: &SockAddrContext,
    ns: u64,
    pport: u16,
    dst: [u32; 4],
    dport: u16,
    proto: u8,
    sock_v6: bool,
    lport: u16,
) -> Option<[u32; 4]> {
    let wire_v4 = !sock_v6 || is_v4_mapped(&dst);
    let lo = if wire_v4 { LO4 } else { LO6 };
    let orig = DnsOrig { addr: dst, port: dport, _pad: 0, _pad2: 0 };
    if proto == PROTO_TCP {
        // Its local port is chosen after connect(): sock_ops records it with the SYN.
        let p = unsafe { DNS_TCP.get_or_insert_ptr_mut(ctx, None) };
        if p.is_null() {
            count(stat::DNS_UNTRACKED);
            return None;
        }
        unsafe { *p = orig };
    } else {
        if lport == 0 {
            count(stat::DNS_UNTRACKED);
            return None;
        }
        let family = if wire_v4 { FAMILY_V4 } else { FAMILY_V6 };
        let key = DnsOrigKey { netns: ns, port: lport, proto: PROTO_UDP, family, _pad: 0 };
        if DNS_ORIG.insert(key, orig, 0).is_err() {
            count(stat::DNS_UNTRACKED);
            return None;
        }
        // Replies from the proxy are shown as coming from the resolver.
        let now = unsafe { bpf_ktime_get_ns() };
        crate::udp::remember(ctx, dst, dport, lo, pport, 0, now);
    }
    count(stat::DNS_REDIRECTED);
    Some(lo)
}
