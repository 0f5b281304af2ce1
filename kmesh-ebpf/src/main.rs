//! Kernel side of the mesh: socket-level service load balancing at connect().
//!
//! For a socket of an enrolled network namespace whose destination is a service frontend,
//! `cgroup/connect4` and `cgroup/connect6` choose a backend and rewrite the destination in the
//! socket; no packet is ever NATed. Everything else passes unchanged. All decisions that can be
//! made ahead of time (health, locality levels, weights, port mappings) are compiled into the
//! maps by the daemon; this file only follows the lookup chain described in `kmesh_common`.
//!
//! `sk_lookup` (`kmesh_authz`) enforces L4 authorization in the destination pod's namespace.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

use aya_ebpf::{
    EbpfContext as _,
    btf_maps::{
        Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, SkStorage, lpm_trie::Key,
    },
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval,
        bpf_sk_storage_get,
    },
    macros::{btf_map, cgroup_sock_addr, sk_lookup, sock_ops},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
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

// L4 authorization (see kmesh_common): decided when a new connection looks up its socket in
// the destination pod's namespace. SK_DROP there makes the kernel answer a TCP SYN with a
// reset, so a denied client fails at once with ECONNREFUSED and the server never sees it.
#[btf_map]
static AUTHZ_DEST: HashMap<[u32; 4], DestValue, 262144, NO_PREALLOC> = HashMap::new();
#[btf_map]
static IDENTITY: HashMap<[u32; 4], IdentityValue, 524288, NO_PREALLOC> = HashMap::new();
#[btf_map]
static AUTHZ_REGION: LpmTrie<RegionKey, u32, 262144> = LpmTrie::new();
#[btf_map]
static AUTHZ_VERDICT: HashMap<VerdictKey, VerdictValue, 1048576, NO_PREALLOC> = HashMap::new();
#[btf_map]
static AUTHZ_COUNTS: PerCpuHashMap<CountKey, u64, 65536, NO_PREALLOC> = PerCpuHashMap::new();
#[btf_map]
static AUTHZ_EVENTS: RingBuf<(), { 256 * 1024 }> = RingBuf::new();
/// Connections the node's own network namespace opened to destinations with policies
/// (kubelet's probes): admitted without policy (see `NodeConnKey`). LRU: a node that opens
/// more at once than this holds loses the oldest marks, never a connection of its own.
#[btf_map]
static NODE_CONNS: LruHashMap<NodeConnKey, u8, 16384> = LruHashMap::new();

// Telemetry: per-socket state (socket-local storage: no key lookup, no capacity, freed with
// the socket) and the events user space turns into metrics and access logs.
#[btf_map]
static CONN_META: SkStorage<ConnMeta> = SkStorage::new();
#[btf_map]
static TELEMETRY: RingBuf<(), { 1024 * 1024 }> = RingBuf::new();
/// Unconnected UDP sockets: the backend chosen per frontend, for later datagrams and for the
/// source of replies (see `UdpRev`).
#[btf_map]
static UDP_REV: SkStorage<UdpRev> = SkStorage::new();
/// Written by the daemon: on/off and the report interval of open connections.
#[btf_map]
static TELEMETRY_CONF: Array<u64, { TCONF_COUNT as usize }> = Array::new();

#[inline(always)]
fn telemetry_on() -> bool {
    TELEMETRY_CONF.get(TCONF_FLAGS).is_some_and(|f| *f & TFLAG_ON != 0)
}

/// Remembers the service address a client dialled, for the telemetry of its connection.
#[inline(always)]
fn remember_orig(ctx: &SockAddrContext, addr: [u32; 4], port: u16) {
    if !telemetry_on() {
        return;
    }
    let m = unsafe { CONN_META.get_or_insert_ptr_mut(ctx, None) };
    if !m.is_null() {
        unsafe {
            (*m).orig_dst = addr;
            (*m).orig_port = u16::from_be(port);
            (*m).has_orig = 1;
        }
    }
}

/// The telemetry state of a sock_ops program's socket (created empty when `create`).
#[inline(always)]
fn sock_meta(ctx: &SockOpsContext, create: bool) -> Option<*mut ConnMeta> {
    let sk = unsafe { core::ptr::read_volatile(&(*ctx.ops).__bindgen_anon_2.sk) };
    if sk.is_null() {
        return None;
    }
    let map = core::ptr::from_ref(&CONN_META).cast_mut().cast();
    let flags = if create { BPF_SK_STORAGE_GET_F_CREATE } else { 0 };
    let m = unsafe { bpf_sk_storage_get(map, sk.cast(), core::ptr::null_mut(), flags) }.cast::<ConnMeta>();
    if m.is_null() { None } else { Some(m) }
}

const BPF_SK_STORAGE_GET_F_CREATE: u64 = 1;

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
    /// Rewrite to this address (16-byte layout) and port (network order) of this backend id.
    Rewrite([u32; 4], u16, u32),
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
fn balance(ctx: &SockAddrContext, addr: [u32; 4], port: u16, proto: u8, family: u8) -> Verdict {
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(ns) = (unsafe { NETNS.get(cookie) }).copied() else {
        return Verdict::Pass;
    };
    if !ns.belongs_to(&cookie) {
        // The namespace's entry went away under us: it is being unenrolled.
        return Verdict::Pass;
    }
    let client_class = ns.class_id;
    let fe_key = FrontendKey { addr, port, proto, _pad: 0 };
    let Some(fe) = (unsafe { FRONTENDS.get(fe_key) }).copied() else {
        count(stat::PASSED);
        return Verdict::Pass;
    };
    if !fe.belongs_to(&fe_key) {
        count(stat::INCONSISTENT);
        return Verdict::Refuse(ERRNO_INCONSISTENT);
    }
    let service_id = fe.service_id;
    let default_port = fe.target_port;
    let class_id = if fe.flags & FE_F_LOCALITY != 0 { client_class } else { 0 };
    let tkey = TableKey { service_id, class_id, family, _pad: [0; 3] };

    // A slot can vanish between reading a table and reading its slot when the daemon switches
    // generations; the table read again then points at the new generation. Two tries suffice.
    let mut attempt = 0;
    while attempt < 2 {
        attempt += 1;
        let Some(table) = (unsafe { LB_TABLES.get(tkey) }).copied() else {
            count(stat::INCONSISTENT);
            return Verdict::Refuse(ERRNO_INCONSISTENT);
        };
        if !table.belongs_to(&tkey) {
            count(stat::RETRIED);
            continue;
        }
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
            unsafe { ENDPOINTS.get(ekey) }.copied().filter(|e| e.belongs_to(&ekey)).map(|e| e.cum_weight)
        });
        let Some(slot) = slot else {
            count(stat::RETRIED);
            continue;
        };
        ekey.index = slot;
        let Some(ep) = (unsafe { ENDPOINTS.get(ekey) }).copied().filter(|e| e.belongs_to(&ekey)) else {
            count(stat::RETRIED);
            continue;
        };
        let backend_id = ep.backend_id;
        let Some(be) = (unsafe { BACKENDS.get(backend_id) }).copied().filter(|b| b.belongs_to(&backend_id))
        else {
            count(stat::RETRIED);
            continue;
        };
        let pkey = PortKey { service_id, backend_id, service_port: port, _pad: 0 };
        let target = match unsafe { PORTS.get(pkey) }.copied() {
            Some(p) if p.belongs_to(&pkey) => p.target_port,
            Some(_) => {
                count(stat::RETRIED);
                continue;
            }
            None => default_port,
        };
        count(stat::REWRITTEN);
        return Verdict::Rewrite(be.addr, target, backend_id);
    }
    count(stat::INCONSISTENT);
    Verdict::Refuse(ERRNO_INCONSISTENT)
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

/// Carries out a verdict on an IPv4 socket address: 1 lets the call go on (rewritten or not),
/// 0 fails it with the errno set.
#[inline(always)]
fn apply_v4(sa: *mut aya_ebpf::bindings::bpf_sock_addr, v: Verdict) -> i32 {
    match v {
        Verdict::Pass => 1,
        Verdict::Refuse(errno) => refuse(errno),
        Verdict::Rewrite(addr, target, _) => {
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
fn apply_v6(sa: *mut aya_ebpf::bindings::bpf_sock_addr, v: Verdict) -> i32 {
    match v {
        Verdict::Pass => 1,
        Verdict::Refuse(errno) => refuse(errno),
        Verdict::Rewrite(new, target, _) => {
            set_ip6(sa, &new, target);
            1
        }
    }
}

/// Writes an address (16-byte layout) and port (network order) into an IPv6 socket address.
#[inline(always)]
fn set_ip6(sa: *mut aya_ebpf::bindings::bpf_sock_addr, a: &[u32; 4], port: u16) {
    unsafe {
        (*sa).user_ip6[0] = a[0];
        (*sa).user_ip6[1] = a[1];
        (*sa).user_ip6[2] = a[2];
        (*sa).user_ip6[3] = a[3];
        (*sa).user_port = port as u32;
    }
}

#[inline(always)]
fn eq4(a: &[u32; 4], b: &[u32; 4]) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

/// A datagram of an unconnected UDP socket to `addr:port`: the backend this socket already
/// sends that frontend to while it is in force and not idle, else a new choice by the
/// service's policy (`balance`), remembered in the socket's `UDP_REV` slots.
#[inline(always)]
fn udp_send(ctx: &SockAddrContext, addr: [u32; 4], port: u16, family: u8) -> Verdict {
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if unsafe { NETNS.get(cookie) }.is_none() {
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
                let alive = unsafe { BACKENDS.get(bid) }
                    .copied()
                    .is_some_and(|b| b.belongs_to(&bid) && eq4(&b.addr, &backend));
                if alive {
                    e.last_ns = now;
                    count(stat::UDP_STICKY);
                    return Verdict::Rewrite(backend, e.backend_port, bid);
                }
            }
            i += 1;
        }
    }
    let v = balance(ctx, addr, port, PROTO_UDP, family);
    if let Verdict::Rewrite(backend, backend_port, backend_id) = v {
        let st = unsafe { UDP_REV.get_or_insert_ptr_mut(ctx, None) };
        if !st.is_null() {
            // This frontend's slot, else the least recently used one.
            let mut pick = 0;
            let mut oldest = u64::MAX;
            let mut i = 0;
            while i < UDP_REV_SLOTS {
                let e = unsafe { &(*st).entries[i] };
                if e.last_ns != 0 && e.vip_port == port && eq4(&e.vip, &addr) {
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
                    (*st).entries[pick] = UdpRevEntry {
                        vip: addr,
                        backend,
                        vip_port: port,
                        backend_port,
                        backend_id,
                        last_ns: now,
                    };
                }
            }
        }
    }
    v
}

/// The frontend a reply from `src:sport` answers, for an unconnected UDP socket that sent
/// to it (its `UDP_REV` slots).
#[inline(always)]
fn udp_reply_source(ctx: &SockAddrContext, src: [u32; 4], sport: u16) -> Option<([u32; 4], u16)> {
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
    apply_v4(sa, udp_send(&ctx, v4_mapped(ip4), port, FAMILY_V4))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn kmesh_sendmsg6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let addr = unsafe { [(*sa).user_ip6[0], (*sa).user_ip6[1], (*sa).user_ip6[2], (*sa).user_ip6[3]] };
    let port = unsafe { (*sa).user_port } as u16;
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

#[cgroup_sock_addr(connect4)]
pub fn kmesh_connect4(ctx: SockAddrContext) -> i32 {
    let Some(proto) = proto_of(&ctx) else { return 1 };
    let sa = ctx.sock_addr;
    let ip4 = unsafe { (*sa).user_ip4 };
    let port = unsafe { (*sa).user_port } as u16;
    let v = balance(&ctx, v4_mapped(ip4), port, proto, FAMILY_V4);
    if matches!(v, Verdict::Rewrite(..)) {
        remember_orig(&ctx, v4_mapped(ip4), port);
    }
    apply_v4(sa, v)
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
    let v = balance(&ctx, addr, port, proto, family);
    if matches!(v, Verdict::Rewrite(..)) {
        remember_orig(&ctx, addr, port);
    }
    apply_v6(sa, v)
}

/// A verdict row: `Ok(None)` when absent, `Err(())` when the bytes found belong to another row
/// (a freed element handed to another key under us).
#[inline(always)]
fn verdict(dest_id: u32, identity: u32, region: u32, port: u16) -> Result<Option<VerdictValue>, ()> {
    let key = VerdictKey { dest_id, identity, region, port, _pad: 0 };
    match unsafe { AUTHZ_VERDICT.get(key) }.copied() {
        None => Ok(None),
        Some(v) if v.belongs_to(&key) => Ok(Some(v)),
        Some(_) => Err(()),
    }
}

/// The row that decides: this identity on this port, on any port, then the fallback identity
/// the same way. A destination with policies always has fallback rows, so none found is an
/// inconsistency, as is a torn read: both are `Err`.
#[inline(always)]
fn first_verdict(
    dest_id: u32,
    region: u32,
    identity: u32,
    other: u32,
    port: u16,
) -> Result<VerdictValue, ()> {
    if let Some(v) = verdict(dest_id, identity, region, port)? {
        return Ok(v);
    }
    if let Some(v) = verdict(dest_id, identity, region, PORT_OTHER)? {
        return Ok(v);
    }
    if let Some(v) = verdict(dest_id, other, region, port)? {
        return Ok(v);
    }
    if let Some(v) = verdict(dest_id, other, region, PORT_OTHER)? {
        return Ok(v);
    }
    Err(())
}

/// The identity of a source address (`IDENTITY_UNKNOWN` when it has none); `None` when the
/// value read twice belonged to another address.
#[inline(always)]
fn identity_of(src: &[u32; 4]) -> Option<u32> {
    let mut attempt = 0;
    while attempt < 2 {
        attempt += 1;
        match unsafe { IDENTITY.get(*src) }.copied() {
            None => return Some(IDENTITY_UNKNOWN),
            Some(x) if x.belongs_to(src) => return Some(x.id),
            Some(_) => {}
        }
    }
    None
}

#[inline(always)]
fn count_decision(policy_id: u32, action: u8) {
    let key = CountKey { policy_id, action: action as u32 };
    if let Some(p) = AUTHZ_COUNTS.get_ptr_mut(key) {
        // SAFETY: this CPU's slot of a per-CPU value.
        unsafe { *p += 1 };
    }
}

const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;

#[sk_lookup]
pub fn kmesh_authz(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // Every context field is read once, at a constant offset (volatile keeps the compiler from
    // merging the IPv4 and IPv6 reads into a computed offset, which the verifier rejects).
    use core::ptr::read_volatile as rv;
    let (family, proto) = unsafe { (rv(&(*l).family), rv(&(*l).protocol)) };
    let (r4, l4) = unsafe { (rv(&(*l).remote_ip4), rv(&(*l).local_ip4)) };
    let r6 = unsafe {
        [rv(&(*l).remote_ip6[0]), rv(&(*l).remote_ip6[1]), rv(&(*l).remote_ip6[2]), rv(&(*l).remote_ip6[3])]
    };
    let l6 = unsafe {
        [rv(&(*l).local_ip6[0]), rv(&(*l).local_ip6[1]), rv(&(*l).local_ip6[2]), rv(&(*l).local_ip6[3])]
    };
    let (src, dst) = if family == 2 {
        (v4_mapped(r4), v4_mapped(l4))
    } else if family == 10 {
        (r6, l6)
    } else {
        return SK_PASS;
    };
    // Values are copied and checked against their key (see `key_check`); a destination whose
    // entry reads as another's twice, or a source whose identity does, is dropped.
    let mut dest = None;
    let mut attempt = 0;
    while attempt < 2 {
        attempt += 1;
        match unsafe { AUTHZ_DEST.get(dst) }.copied() {
            None => return SK_PASS,
            Some(d) if d.belongs_to(&dst) => {
                dest = Some(d);
                break;
            }
            Some(_) => {}
        }
    }
    let Some(d) = dest else {
        count(stat::AUTHZ_INCONSISTENT);
        return SK_DROP;
    };
    let dest_id = d.dest_id;
    let port = unsafe { (*l).local_port } as u16;
    let node = NodeConnKey { src, dst, src_port: u16::from_be(unsafe { (*l).remote_port }), dst_port: port };
    if unsafe { NODE_CONNS.get(node) }.is_some() {
        count(stat::AUTHZ_NODE_EXEMPT);
        return SK_PASS;
    }
    let Some(identity) = identity_of(&src) else {
        count(stat::AUTHZ_INCONSISTENT);
        return SK_DROP;
    };
    let mut rkey = RegionKey { dest_id_be: dest_id.to_be_bytes(), addr: [0; 16] };
    let mut i = 0;
    while i < 4 {
        let b = src[i].to_ne_bytes();
        rkey.addr[i * 4] = b[0];
        rkey.addr[i * 4 + 1] = b[1];
        rkey.addr[i * 4 + 2] = b[2];
        rkey.addr[i * 4 + 3] = b[3];
        i += 1;
    }
    let region = AUTHZ_REGION.get(&Key { prefix_len: 160, data: rkey }).copied().unwrap_or(0);
    let other = if identity == IDENTITY_UNKNOWN { IDENTITY_UNKNOWN } else { IDENTITY_OTHER };
    let Ok(v) = first_verdict(dest_id, region, identity, other, port) else {
        // No row, or a torn one: the maps are inconsistent. Fail closed.
        count(stat::AUTHZ_INCONSISTENT);
        return SK_DROP;
    };
    count_decision(v.policy_id, v.action);
    if v.action == VERDICT_DENY || v.dry_action != 0 {
        let ev = AuthzEvent {
            src,
            dst,
            src_port: u16::from_be(unsafe { (*l).remote_port }),
            dst_port: port,
            policy_id: v.policy_id,
            action: v.action,
            dry_action: v.dry_action,
            proto: proto as u8,
            _pad: 0,
            dry_policy_id: v.dry_policy_id,
        };
        if AUTHZ_EVENTS.output_untyped::<AuthzEvent>(&ev, 0).is_err() {
            count(stat::AUTHZ_EVENTS_LOST);
        }
    }
    if v.action == VERDICT_DENY { SK_DROP } else { SK_PASS }
}

const SOCK_OPS_TCP_CONNECT: u32 = 3;
const SOCK_OPS_ACTIVE_ESTABLISHED: u32 = 4;
const SOCK_OPS_PASSIVE_ESTABLISHED: u32 = 5;
const SOCK_OPS_STATE: u32 = 10;
const SOCK_OPS_RTT: u32 = 12;
const SOCK_OPS_STATE_CB_FLAG: u32 = 4;
const SOCK_OPS_RTT_CB_FLAG: u32 = 8;
const TCP_ESTABLISHED: u32 = 1;
const TCP_SYN_SENT: u32 = 2;
const TCP_CLOSE_WAIT: u32 = 8;
const TCP_FIN_WAIT2: u32 = 5;
const TCP_CLOSE: u32 = 7;

/// The local and remote addresses of a sock_ops program's socket (16-byte layout).
#[inline(always)]
fn sock_addrs(ctx: &SockOpsContext) -> ([u32; 4], [u32; 4]) {
    use core::ptr::read_volatile as rv;
    let o = ctx.ops;
    // Every field is read unconditionally at a constant offset (see kmesh_authz).
    let (family, l4, r4) = unsafe { (rv(&(*o).family), rv(&(*o).local_ip4), rv(&(*o).remote_ip4)) };
    let l6 = unsafe {
        [rv(&(*o).local_ip6[0]), rv(&(*o).local_ip6[1]), rv(&(*o).local_ip6[2]), rv(&(*o).local_ip6[3])]
    };
    let r6 = unsafe {
        [rv(&(*o).remote_ip6[0]), rv(&(*o).remote_ip6[1]), rv(&(*o).remote_ip6[2]), rv(&(*o).remote_ip6[3])]
    };
    if family == 2 { (v4_mapped(l4), v4_mapped(r4)) } else { (l6, r6) }
}

#[inline(always)]
fn conn_event(ctx: &SockOpsContext, kind: u32, meta: &ConnMeta, cookie: u64, now: u64) -> ConnEvent {
    use core::ptr::read_volatile as rv;
    let o = ctx.ops;
    let (local, remote) = sock_addrs(ctx);
    unsafe {
        ConnEvent {
            kind,
            direction: meta.direction,
            local,
            remote,
            local_port: rv(&(*o).local_port) as u16,
            remote_port: u32::from_be(rv(&(*o).remote_port)) as u16,
            orig_port: meta.orig_port,
            has_orig: meta.has_orig,
            orig_dst: meta.orig_dst,
            sent_bytes: rv(&(*o).bytes_acked),
            received_bytes: rv(&(*o).bytes_received),
            duration_ns: now.saturating_sub(meta.start_ns),
            retrans: rv(&(*o).total_retrans),
            lost: rv(&(*o).lost_out),
            srtt_us: rv(&(*o).srtt_us) >> 3,
            min_rtt_us: rv(&(*o).rtt_min),
            state: rv(&(*o).state),
            flags: 0,
            cookie,
        }
    }
}

#[inline(always)]
fn emit(ev: &ConnEvent) {
    if TELEMETRY.output_untyped::<ConnEvent>(ev, 0).is_err() {
        count(stat::TELEMETRY_LOST);
    }
}

/// The 4-tuple of a sock_ops program's socket, as its client sees it.
#[inline(always)]
fn node_conn_key(ctx: &SockOpsContext) -> NodeConnKey {
    use core::ptr::read_volatile as rv;
    let o = ctx.ops;
    let (src, dst) = sock_addrs(ctx);
    NodeConnKey {
        src,
        dst,
        src_port: unsafe { rv(&(*o).local_port) } as u16,
        dst_port: u32::from_be(unsafe { rv(&(*o).remote_port) }) as u16,
    }
}

/// Marks (at connect) and forgets (at close) a connection the node's own network namespace
/// opens to a destination with policies. True when the socket is the node's: nothing else
/// of this program concerns it.
#[inline(always)]
fn node_conn(ctx: &SockOpsContext, op: u32) -> bool {
    let node = TELEMETRY_CONF.get(TCONF_NODE_NETNS).copied().unwrap_or(0);
    if node == 0 || unsafe { bpf_get_netns_cookie(ctx.ops.cast()) } != node {
        return false;
    }
    let key = node_conn_key(ctx);
    if op == SOCK_OPS_TCP_CONNECT {
        if unsafe { AUTHZ_DEST.get(key.dst) }.is_some() {
            let _ = NODE_CONNS.insert(key, 1, 0);
            // Be told when it closes, to forget it.
            let _ = ctx.set_cb_flags((ctx.cb_flags() | SOCK_OPS_STATE_CB_FLAG) as i32);
        }
    } else {
        let _ = NODE_CONNS.remove(key);
    }
    true
}

/// Connection telemetry of enrolled pods: a client socket is tracked from connect(), a server
/// socket from the accept; each reports when established, every `TCONF_INTERVAL_NS` while
/// acknowledgements flow, and when it closes (or fails to establish).
#[sock_ops]
pub fn kmesh_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if (op == SOCK_OPS_TCP_CONNECT || (op == SOCK_OPS_STATE && ctx.arg(1) == TCP_CLOSE))
        && node_conn(&ctx, op)
    {
        return 0;
    }
    if !telemetry_on() {
        return 0;
    }
    if op == SOCK_OPS_TCP_CONNECT || op == SOCK_OPS_PASSIVE_ESTABLISHED {
        let ns = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
        if unsafe { NETNS.get(ns) }.is_none() {
            return 0;
        }
        let Some(m) = sock_meta(&ctx, true) else { return 0 };
        let now = unsafe { bpf_ktime_get_ns() };
        // connect() may already have stored the service address the client dialled.
        let mut meta = unsafe { *m };
        meta.start_ns = now;
        meta.last_report_ns = now;
        meta.direction = if op == SOCK_OPS_TCP_CONNECT { DIR_OUTBOUND } else { DIR_INBOUND };
        unsafe { *m = meta };
        let _ = ctx.set_cb_flags((ctx.cb_flags() | SOCK_OPS_STATE_CB_FLAG | SOCK_OPS_RTT_CB_FLAG) as i32);
        if op == SOCK_OPS_PASSIVE_ESTABLISHED {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
            emit(&conn_event(&ctx, CONN_OPEN, &meta, cookie, now));
        }
    } else if op == SOCK_OPS_ACTIVE_ESTABLISHED {
        let Some(m) = sock_meta(&ctx, false) else { return 0 };
        let now = unsafe { bpf_ktime_get_ns() };
        unsafe { (*m).last_report_ns = now };
        let meta = unsafe { *m };
        if meta.direction == DIR_OUTBOUND {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
            emit(&conn_event(&ctx, CONN_OPEN, &meta, cookie, now));
        }
    } else if op == SOCK_OPS_RTT {
        let Some(m) = sock_meta(&ctx, false) else { return 0 };
        let now = unsafe { bpf_ktime_get_ns() };
        let interval = TELEMETRY_CONF.get(TCONF_INTERVAL_NS).copied().unwrap_or(5_000_000_000);
        let meta = unsafe { *m };
        if meta.direction == 0 || now.saturating_sub(meta.last_report_ns) < interval {
            return 0;
        }
        // Only while no FIN of ours can be in flight: in the closing states the kernel may
        // have counted its acknowledgement before the state changes, and user space could
        // not tell data bytes from it. The close event follows soon and is exact.
        let state = unsafe { core::ptr::read_volatile(&(*ctx.ops).state) };
        if state != TCP_ESTABLISHED && state != TCP_CLOSE_WAIT {
            return 0;
        }
        unsafe { (*m).last_report_ns = now };
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
        emit(&conn_event(&ctx, CONN_REPORT, &meta, cookie, now));
    } else if op == SOCK_OPS_STATE && ctx.arg(1) == TCP_FIN_WAIT2 {
        if let Some(m) = sock_meta(&ctx, false) {
            unsafe { (*m).rcv_nxt_fin_wait2 = core::ptr::read_volatile(&(*ctx.ops).rcv_nxt) };
        }
    } else if op == SOCK_OPS_STATE && ctx.arg(1) == TCP_CLOSE {
        let Some(m) = sock_meta(&ctx, false) else { return 0 };
        let meta = unsafe { *m };
        if meta.direction == 0 {
            return 0;
        }
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
        let from = ctx.arg(0);
        let rcv_nxt = unsafe { core::ptr::read_volatile(&(*ctx.ops).rcv_nxt) };
        let now = unsafe { bpf_ktime_get_ns() };
        let kind = if from == TCP_SYN_SENT { CONN_FAILED } else { CONN_CLOSE };
        let mut ev = conn_event(&ctx, kind, &meta, cookie, now);
        // The state the socket left: user space needs it to tell data bytes from SYN/FIN.
        ev.state = from;
        if from == TCP_FIN_WAIT2 && rcv_nxt == meta.rcv_nxt_fin_wait2 {
            ev.flags |= EV_NO_PEER_FIN;
        }
        emit(&ev);
        // Reported once; the storage goes with the socket.
        unsafe { (*m).direction = 0 };
    }
    0
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
