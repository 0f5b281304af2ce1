//! Service load balancing: the lookup chain from a frontend to a backend (see `kmesh_common`)
//! and how a verdict is carried out on a socket address.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32},
    programs::SockAddrContext,
};
use kmesh_common::*;

use crate::maps::{ACTIVE, ENDPOINTS, FRONTENDS, LB_TABLES, Lookup, NETNS, PORTS, RR_TURNS};
use crate::shared::{count, refuse, set_ip6};

/// What to do with one connect().
pub enum Verdict {
    /// Leave the destination as it is.
    Pass,
    /// Rewrite to this address (16-byte layout) and port (network order) of this backend id;
    /// the last is the service whose active connections count it (0: not counted).
    Rewrite([u32; 4], u16, u32, u32),
    /// Rewrite to this waypoint endpoint's address and PROXY port; the frontend key that
    /// matched had this port (`PORT_ANY` for a workload's address).
    Waypoint([u32; 4], u16, u16),
    /// Fail connect() with this errno.
    Refuse(i32),
}

/// The whole decision, independent of the address family of the socket.
///
/// Every value is copied out of its map and checked against the key it was looked up under
/// (`belongs_to`): an element freed by a concurrent update can be handed to another key at
/// once, so the bytes behind a found key may belong to another entry. Once the destination is
/// known to be a frontend, nothing is passed unchanged: a table that cannot be read
/// consistently twice refuses the connection (`ERRNO_INCONSISTENT`) rather than letting the
/// VIP go to whatever route the node has for it.
#[inline(always)]
pub fn balance(ctx: &SockAddrContext, addr: [u32; 4], port: u16, proto: u8, family: u8) -> Verdict {
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(ns) = (unsafe { NETNS.find(cookie) }).copied() else {
        return Verdict::Pass;
    };
    if !ns.belongs_to(&cookie) {
        // The namespace's entry went away under us: it is being unenrolled.
        return Verdict::Pass;
    }
    let mut fe_key = FrontendKey { addr, port, proto, _pad: 0 };
    let fe = match unsafe { FRONTENDS.find(fe_key) }.copied() {
        Some(fe) => fe,
        None if proto == PROTO_TCP => {
            // A workload address whose connections go through a waypoint, on any port.
            fe_key.port = PORT_ANY;
            match unsafe { FRONTENDS.find(fe_key) }.copied() {
                Some(fe) => fe,
                None => {
                    count(stat::PASSED);
                    return Verdict::Pass;
                }
            }
        }
        None => {
            count(stat::PASSED);
            return Verdict::Pass;
        }
    };
    if !fe.belongs_to(&fe_key) {
        count(stat::INCONSISTENT);
        return Verdict::Refuse(ERRNO_INCONSISTENT);
    }
    // A waypoint's own connections go where they were sent (no loops); everyone else's go
    // through the destination's waypoint when it has one.
    let via_waypoint = fe.waypoint_id != 0 && ns.flags & NS_F_WAYPOINT == 0;
    let (service_id, default_port, class_id) = if via_waypoint {
        (fe.waypoint_id, 0, 0)
    } else if fe.flags & FE_F_LOCALITY != 0 {
        (fe.service_id, fe.target_port, ns.class_id)
    } else {
        (fe.service_id, fe.target_port, 0)
    };
    if service_id == 0 {
        // A workload address reached by its own waypoint: direct.
        count(stat::PASSED);
        return Verdict::Pass;
    }
    let tkey = TableKey { service_id, class_id, family, _pad: [0; 3] };

    // A slot can vanish between reading a table and reading its slot when the daemon switches
    // generations; the table read again then points at the new generation. Two tries suffice.
    let mut attempt = 0;
    while attempt < 2 {
        attempt += 1;
        let Some(table) = (unsafe { LB_TABLES.find(tkey) }).copied() else {
            count(stat::INCONSISTENT);
            return Verdict::Refuse(ERRNO_INCONSISTENT);
        };
        if !table.belongs_to(&tkey) {
            count(stat::RETRIED);
            continue;
        }
        if table.limit != 0 && active(ACTIVE_SERVICE, service_id) >= table.limit as u64 {
            count(stat::CIRCUIT_OPEN);
            return Verdict::Refuse(ERRNO_CIRCUIT_OPEN);
        }
        let Some(level) = pick_level(&table) else {
            if table.flags & TBL_F_WAYPOINT != 0 {
                count(stat::WAYPOINT_UNREACHABLE);
                return Verdict::Refuse(ERRNO_WAYPOINT_UNREACHABLE);
            }
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
        let rand = if table.flags & TBL_F_HASH != 0 {
            client_hash(cookie)
        } else if table.flags & TBL_F_ROUND_ROBIN == 0 {
            unsafe { bpf_get_prandom_u32() }
        } else if table.flags & TBL_F_WEIGHTED != 0 && level < LEVELS {
            rr_point(next_turn(service_id), table.weights[level])
        } else {
            next_turn(service_id)
        };
        let slot = pick_slot(&table, level, rand, |i| {
            ekey.index = i;
            unsafe { ENDPOINTS.find(ekey) }.copied().filter(|e| e.belongs_to(&ekey)).map(|e| e.cum_weight)
        });
        let Some(mut slot) = slot else {
            count(stat::RETRIED);
            continue;
        };
        if table.flags & TBL_F_LEAST != 0 {
            // The power of two choices: a second pick, uniform over the level's slots; the one
            // with fewer active connections. (A second weighted search would be exact for
            // unequal weights too, but the verifier then walks every exit of the first search
            // through the whole second one: each load-balancing program took ~300 ms to load,
            // and every map growth reloads them.)
            let count = table.counts[level];
            let other = if count > 0 { (unsafe { bpf_get_prandom_u32() }) % count } else { slot };
            if other != slot && load_at(ekey, other) < load_at(ekey, slot) {
                slot = other;
            }
        }
        ekey.index = slot;
        let Some(ep) = (unsafe { ENDPOINTS.find(ekey) }).copied().filter(|e| e.belongs_to(&ekey)) else {
            count(stat::RETRIED);
            continue;
        };
        let backend_id = ep.backend_id;
        let target = if table.flags & TBL_F_PORTS == 0 {
            default_port
        } else {
            let pkey = PortKey { service_id, backend_id, service_port: fe_key.port, _pad: 0 };
            match unsafe { PORTS.find(pkey) }.copied() {
                Some(p) if p.belongs_to(&pkey) => p.target_port,
                Some(_) => {
                    count(stat::RETRIED);
                    continue;
                }
                None => default_port,
            }
        };
        if via_waypoint {
            count(stat::WAYPOINT_REDIRECTED);
            // A waypoint endpoint without a PROXY port takes the connection on the port dialled.
            let target = if target == 0 { port } else { target };
            return Verdict::Waypoint(ep.addr, target, fe_key.port);
        }
        count(stat::REWRITTEN);
        let counted = if table.flags & TBL_F_COUNT != 0 { service_id } else { 0 };
        return Verdict::Rewrite(ep.addr, target, backend_id, counted);
    }
    count(stat::INCONSISTENT);
    Verdict::Refuse(ERRNO_INCONSISTENT)
}

/// The active connections the kernel counts under `kind` and `id` (0 when none yet).
#[inline(always)]
pub fn active(kind: u32, id: u32) -> u64 {
    let k = ActiveKey { kind, id };
    unsafe { ACTIVE.get(k) }.copied().unwrap_or(0)
}

/// The active connections of the backend in slot `index` of the table `ekey` names (u64::MAX
/// when the slot cannot be read, so that it is not preferred).
#[inline(always)]
fn load_at(mut ekey: EndpointKey, index: u32) -> u64 {
    ekey.index = index;
    match unsafe { ENDPOINTS.find(ekey) }.copied().filter(|e| e.belongs_to(&ekey)) {
        Some(e) => active(ACTIVE_BACKEND, e.backend_id),
        None => u64::MAX,
    }
}

/// This CPU's next turn for a round-robin service (random when the counter cannot be read).
#[inline(always)]
fn next_turn(service_id: u32) -> u32 {
    match RR_TURNS.get_ptr_mut(service_id % RR_SLOTS) {
        Some(p) => unsafe {
            let turn = *p;
            *p = turn.wrapping_add(1);
            turn
        },
        None => unsafe { bpf_get_prandom_u32() },
    }
}

/// Carries out a verdict on an IPv4 socket address: 1 lets the call go on (rewritten or not),
/// 0 fails it with the errno set.
#[inline(always)]
pub fn apply_v4(sa: *mut aya_ebpf::bindings::bpf_sock_addr, v: Verdict) -> i32 {
    match v {
        Verdict::Pass => 1,
        Verdict::Refuse(errno) => refuse(errno),
        Verdict::Rewrite(addr, target, _, _) | Verdict::Waypoint(addr, target, _) => {
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

/// [`apply_v4`] for an IPv6 (or v4-mapped) socket address.
#[inline(always)]
pub fn apply_v6(sa: *mut aya_ebpf::bindings::bpf_sock_addr, v: Verdict) -> i32 {
    match v {
        Verdict::Pass => 1,
        Verdict::Refuse(errno) => refuse(errno),
        Verdict::Rewrite(new, target, _, _) | Verdict::Waypoint(new, target, _) => {
            set_ip6(sa, &new, target);
            1
        }
    }
}
