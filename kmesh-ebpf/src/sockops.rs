//! `sock_ops` (`kmesh_sockops`): connection telemetry of enrolled pods, the marks of the
//! node's own connections (kubelet's probes), and the local port of a pod's DNS query over TCP.

use aya_ebpf::{
    btf_maps::SkStorage,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_sk_storage_get},
    macros::sock_ops,
    programs::SockOpsContext,
};
use kmesh_common::*;

use crate::maps::{
    ACTIVE, AUTHZ_DEST, CONNS, DNS_ORIG, DNS_TCP, LB_CONN, Lookup, NETNS, NODE_CONNS, ORIG_HANDOFF, TALLIES,
    TELEMETRY, TELEMETRY_CONF, WAYPOINT_SOCKS, WP_CONN,
};
use crate::shared::{BPF_RB_NO_WAKEUP, BPF_SK_STORAGE_GET_F_CREATE, count, telemetry_flags, telemetry_on};

/// A sock_ops program's socket's value in the socket storage `map` (created empty when
/// `create`).
#[inline(always)]
fn sk_storage<T>(ctx: &SockOpsContext, map: &SkStorage<T>, create: bool) -> Option<*mut T> {
    let sk = unsafe { core::ptr::read_volatile(&(*ctx.ops).__bindgen_anon_2.sk) };
    if sk.is_null() {
        return None;
    }
    let map = core::ptr::from_ref(map).cast_mut().cast();
    let flags = if create { BPF_SK_STORAGE_GET_F_CREATE } else { 0 };
    let m = unsafe { bpf_sk_storage_get(map, sk.cast(), core::ptr::null_mut(), flags) }.cast::<T>();
    if m.is_null() { None } else { Some(m) }
}

/// The `CONNS` slot at `i` places after the first of a cookie.
#[inline(always)]
fn conn_probe(cookie: u64, i: u32) -> Option<*mut ConnMeta> {
    CONNS.get_ptr_mut(conn_slot(cookie, i))
}

/// The telemetry state of the connection with this socket cookie, when it is tracked.
#[inline(always)]
fn tracked(cookie: u64) -> Option<*mut ConnMeta> {
    for i in 0..CONN_PROBES {
        let p = conn_probe(cookie, i)?;
        if unsafe { core::ptr::read_volatile(&(*p).cookie) } == cookie {
            return Some(p);
        }
    }
    None
}

/// Claims a free `CONNS` slot for the connection with this cookie (compare-and-swap from 0:
/// two CPUs never take the same slot) and fills it with `meta`.
#[inline(always)]
fn track(cookie: u64, meta: &ConnMeta) -> bool {
    for i in 0..CONN_PROBES {
        let Some(p) = conn_probe(cookie, i) else { return false };
        if unsafe { core::ptr::read_volatile(&(*p).cookie) } != 0 {
            continue;
        }
        // SAFETY: a map value, 8-aligned; every CPU claims it the same way. The BPF target
        // has no AtomicU64 in core; the intrinsic is BPF's compare-and-swap.
        let (_, won) = unsafe {
            core::intrinsics::atomic_cxchg::<
                u64,
                { core::intrinsics::AtomicOrdering::SeqCst },
                { core::intrinsics::AtomicOrdering::SeqCst },
            >(&raw mut (*p).cookie, 0, cookie)
        };
        if won {
            unsafe { *p = ConnMeta { cookie, ..*meta } };
            return true;
        }
    }
    false
}

/// Gives a connection's `CONNS` slot back.
#[inline(always)]
fn untrack(m: *mut ConnMeta) {
    unsafe { core::ptr::write_volatile(&raw mut (*m).cookie, 0) };
}

/// Takes what connect() left in `ORIG_HANDOFF` for the socket with this cookie.
#[inline(always)]
fn take_orig(cookie: u64) -> Option<OrigHandoff> {
    let p = ORIG_HANDOFF.get_ptr_mut(handoff_slot(cookie))?;
    if unsafe { (*p).cookie } != cookie {
        return None;
    }
    unsafe { (*p).cookie = 0 };
    Some(unsafe { *p })
}

/// `DIR_OUTBOUND` or `DIR_INBOUND`, without the slot's flag bits.
#[inline(always)]
fn direction_of(meta: &ConnMeta) -> u32 {
    (meta.direction & !(DIR_F_COUNTED | DIR_F_OPEN_PENDING)) as u32
}

/// Atomically adds `n` to a counter in a map value (8-aligned).
#[inline(always)]
fn add(p: *mut u64, n: u64) {
    // SAFETY: the BPF target has no AtomicU64 in core; the intrinsic is BPF's atomic add (its
    // result unused).
    unsafe { core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(p, n) };
}

/// A connection closing (or failing) before it sent any record, with `TFLAG_TALLY`: adds it
/// to its peers' sums in `TALLIES` instead of reporting it. False when there is no room (it
/// is reported then).
#[inline(always)]
fn tally(ctx: &SockOpsContext, meta: &ConnMeta, failed: bool, from: u32, no_peer_fin: bool) -> bool {
    use core::ptr::read_volatile as rv;
    let o = ctx.ops;
    let direction = direction_of(meta) as u16;
    let outbound = direction as u32 == DIR_OUTBOUND;
    let (local, remote) = sock_addrs(ctx);
    let dst_port = if outbound {
        u32::from_be(unsafe { rv(&(*o).remote_port) }) as u16
    } else {
        (unsafe { rv(&(*o).local_port) }) as u16
    };
    let key = TallyKey {
        epoch: TELEMETRY_CONF.get(TCONF_TALLY_EPOCH).copied().unwrap_or(0) as u32,
        direction,
        has_orig: meta.has_orig as u16,
        local,
        remote,
        orig_dst: meta.orig_dst,
        dst_port,
        orig_port: meta.orig_port,
    };
    let mut p = TALLIES.get_ptr_mut(&key);
    if p.is_none() {
        let _ = TALLIES.insert(&key, &TallyCounts::default(), BPF_NOEXIST);
        p = TALLIES.get_ptr_mut(&key);
    }
    let Some(p) = p else { return false };
    if failed {
        add(unsafe { &raw mut (*p).failed }, 1);
        return true;
    }
    let (sent, received) = unsafe { (rv(&(*o).bytes_acked), rv(&(*o).bytes_received)) };
    let (sent, received) = data_bytes(outbound, true, from, no_peer_fin, sent, received);
    let (retrans, lost) = unsafe { (rv(&(*o).total_retrans), rv(&(*o).lost_out)) };
    unsafe {
        add(&raw mut (*p).opened, 1);
        add(&raw mut (*p).closed, 1);
        add(&raw mut (*p).sent, sent);
        add(&raw mut (*p).received, received);
        // Mostly nothing: an atomic add of 0 is not free.
        if retrans != 0 {
            add(&raw mut (*p).retrans, retrans as u64);
        }
        if lost != 0 {
            add(&raw mut (*p).lost, lost as u64);
        }
    }
    true
}

const SOCK_OPS_TCP_CONNECT: u32 = 3;
const SOCK_OPS_ACTIVE_ESTABLISHED: u32 = 4;
const SOCK_OPS_PASSIVE_ESTABLISHED: u32 = 5;
const SOCK_OPS_STATE: u32 = 10;
const SOCK_OPS_RTT: u32 = 12;
const SOCK_OPS_STATE_CB_FLAG: u32 = 4;
const SOCK_OPS_RTT_CB_FLAG: u32 = 8;

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
            direction: direction_of(meta),
            local,
            remote,
            local_port: rv(&(*o).local_port) as u16,
            remote_port: u32::from_be(rv(&(*o).remote_port)) as u16,
            orig_port: meta.orig_port,
            has_orig: meta.has_orig as u16,
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
    if TELEMETRY.output_untyped::<ConnEvent>(ev, BPF_RB_NO_WAKEUP).is_err() {
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

/// A pod's DNS query over TCP, sent to its proxy at connect(): now that the socket has its
/// local port, records the resolver it asked under it (see `DnsOrigKey`).
#[inline(always)]
fn dns_tcp(ctx: &SockOpsContext) {
    let pport = TELEMETRY_CONF.get(TCONF_DNS_PORT).copied().unwrap_or(0);
    if pport == 0 {
        return;
    }
    // Every TCP connect comes here: the port first, the addresses only for the proxy's.
    let remote_port = u32::from_be(unsafe { core::ptr::read_volatile(&(*ctx.ops).remote_port) }) as u16;
    if remote_port as u64 != pport {
        return;
    }
    let Some(o) = sk_storage(ctx, &DNS_TCP, false) else { return };
    let key = node_conn_key(ctx);
    let orig = unsafe { *o };
    let family = if is_v4_mapped(&key.dst) { FAMILY_V4 } else { FAMILY_V6 };
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    let k = DnsOrigKey { netns, port: key.src_port, proto: PROTO_TCP, family, _pad: 0 };
    if DNS_ORIG.insert(k, orig, 0).is_err() {
        count(stat::DNS_UNTRACKED);
    }
}

/// The node's network namespace, when the daemon set it (0: none).
#[inline(always)]
fn node_netns() -> u64 {
    TELEMETRY_CONF.get(TCONF_NODE_NETNS).copied().unwrap_or(0)
}

/// Marks (at connect) and forgets (at close) a connection of the node's own network
/// namespace (the caller checked) to a destination with policies.
#[inline(always)]
fn node_conn(ctx: &SockOpsContext, op: u32) {
    let key = node_conn_key(ctx);
    if op == SOCK_OPS_TCP_CONNECT {
        if unsafe { AUTHZ_DEST.find(key.dst) }.is_some() {
            let _ = NODE_CONNS.insert(key, 1, 0);
            // Be told when it closes, to forget it.
            let _ = ctx.set_cb_flags((ctx.cb_flags() | SOCK_OPS_STATE_CB_FLAG) as i32);
        }
    } else {
        let _ = NODE_CONNS.remove(key);
    }
}

/// A connection connect() sent to a waypoint is established: it joins `WAYPOINT_SOCKS`, so
/// that the sk_msg program puts the PROXY header in front of its first write.
#[inline(always)]
fn waypoint_established(ctx: &SockOpsContext) {
    let Some(w) = sk_storage(ctx, &WP_CONN, false) else { return };
    if unsafe { (*w).pending } == 0 {
        return;
    }
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: the context of a sock_ops program is its bpf_sock_ops.
    let ops = unsafe { &mut *ctx.ops };
    if WAYPOINT_SOCKS.update(&mut cookie, ops, 0).is_err() {
        count(stat::PROXY_HEADER_FAILED);
    }
}

const BPF_NOEXIST: u64 = 1;

/// Adds `delta` (1, or u64::MAX for -1) to an `ACTIVE` counter, making it on first use
/// when `create`. False when there is no counter (the map is full).
#[inline(always)]
fn add_active(kind: u32, id: u32, delta: u64, create: bool) -> bool {
    let k = ActiveKey { kind, id };
    let mut p = ACTIVE.get_ptr_mut(k);
    if p.is_none() && create {
        let _ = ACTIVE.insert(k, 0, BPF_NOEXIST);
        p = ACTIVE.get_ptr_mut(k);
    }
    let Some(p) = p else { return false };
    // A map value; other CPUs update it the same way.
    add(p, delta);
    true
}

/// Active-connection counting of counted tables: a connection counts from its SYN to its
/// close (whatever state it closes from), once. Each counter is taken back only if it was
/// added to (bits 0 and 1 of `counted`): a full map leaves a connection uncounted, never a
/// count that cannot come down. At connect: counts the socket if connect() left it storage
/// saying what to count; returns whether it is counted (its close must look).
#[inline(always)]
fn count_connect(ctx: &SockOpsContext) -> bool {
    let Some(c) = sk_storage(ctx, &LB_CONN, false) else { return false };
    let conn = unsafe { *c };
    if conn.counted == 0 {
        let s = add_active(ACTIVE_SERVICE, conn.service_id, 1, true) as u32;
        let b = add_active(ACTIVE_BACKEND, conn.backend_id, 1, true) as u32;
        unsafe { (*c).counted = s | (b << 1) | 4 };
        let _ = ctx.set_cb_flags((ctx.cb_flags() | SOCK_OPS_STATE_CB_FLAG) as i32);
    }
    true
}

/// At close: takes back what [`count_connect`] counted.
#[inline(always)]
fn count_close(ctx: &SockOpsContext) {
    let Some(c) = sk_storage(ctx, &LB_CONN, false) else { return };
    let conn = unsafe { *c };
    if conn.counted & 4 != 0 {
        if conn.counted & 1 != 0 {
            add_active(ACTIVE_SERVICE, conn.service_id, u64::MAX, false);
        }
        if conn.counted & 2 != 0 {
            add_active(ACTIVE_BACKEND, conn.backend_id, u64::MAX, false);
        }
        unsafe { (*c).counted = 0 };
    }
}

/// A client socket is established (every one in the cgroup comes here): a tracked one reports
/// its open (unless it waits for its first record, `DIR_F_OPEN_PENDING`) and asks for
/// acknowledgement callbacks; one connect() sent to a waypoint joins `WAYPOINT_SOCKS`. A
/// tracked socket's slot says whether it went to a waypoint, so only the others look for its
/// socket storage.
#[inline(always)]
fn active_established(ctx: &SockOpsContext) -> u32 {
    // A tracked socket asked for state changes.
    let slot = if ctx.cb_flags() & SOCK_OPS_STATE_CB_FLAG != 0 && telemetry_on() {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
        tracked(cookie).map(|m| (cookie, m))
    } else {
        None
    };
    let Some((cookie, m)) = slot else {
        waypoint_established(ctx);
        return 0;
    };
    let meta = unsafe { *m };
    if meta.has_orig as u16 == ORIG_VIA_WAYPOINT {
        waypoint_established(ctx);
    }
    let _ = ctx.set_cb_flags((ctx.cb_flags() | SOCK_OPS_RTT_CB_FLAG) as i32);
    if meta.direction & DIR_F_OPEN_PENDING == 0 {
        // Reports are timed from connect(); the open itself carries no duration (no clock read).
        emit(&conn_event(ctx, CONN_OPEN, &meta, cookie, meta.start_ns));
    }
    0
}

/// An acknowledgement of a tracked connection's data: reports it when `TCONF_INTERVAL_NS`
/// has passed since its last report (or its start).
#[inline(always)]
fn acknowledged(ctx: &SockOpsContext) -> u32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let Some(m) = tracked(cookie) else { return 0 };
    let now = unsafe { bpf_ktime_get_ns() };
    let interval = TELEMETRY_CONF.get(TCONF_INTERVAL_NS).copied().unwrap_or(5_000_000_000);
    let meta = unsafe { *m };
    // In units of 2^20 ns since the start (see `ConnMeta::mark`).
    let since_start = (now.saturating_sub(meta.start_ns) >> 20) as u32;
    if since_start.wrapping_sub(meta.mark) < (interval >> 20) as u32 {
        return 0;
    }
    // Only while no FIN of ours can be in flight: in the closing states the kernel may
    // have counted its acknowledgement before the state changes, and user space could
    // not tell data bytes from it. The close event follows soon and is exact.
    let state = unsafe { core::ptr::read_volatile(&(*ctx.ops).state) };
    if state != tcp_state::ESTABLISHED && state != tcp_state::CLOSE_WAIT {
        return 0;
    }
    unsafe { (*m).mark = since_start };
    let mut ev = conn_event(ctx, CONN_REPORT, &meta, cookie, now);
    if meta.direction & DIR_F_OPEN_PENDING != 0 {
        ev.flags |= EV_OPENED;
        unsafe { (*m).direction = meta.direction & !DIR_F_OPEN_PENDING };
    }
    emit(&ev);
    0
}

/// Connection telemetry of enrolled pods: a client socket is tracked from connect(), a server
/// socket from the accept; each reports every `TCONF_INTERVAL_NS` while acknowledgements flow
/// and when it closes (or fails to establish). Its open is reported when it is established with
/// `TFLAG_EAGER_OPEN` (outlier detection), else with its first report or its close
/// (`EV_OPENED`): a short connection makes one ring record, not two.
#[sock_ops]
pub fn kmesh_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == SOCK_OPS_ACTIVE_ESTABLISHED {
        return active_established(&ctx);
    }
    // Only tracked connections ask for these (switching telemetry off stops their reports).
    if op == SOCK_OPS_RTT {
        return if telemetry_on() { acknowledged(&ctx) } else { 0 };
    }
    let closing = op == SOCK_OPS_STATE && ctx.arg(1) == tcp_state::CLOSE;
    if op == SOCK_OPS_TCP_CONNECT {
        dns_tcp(&ctx);
    }
    // The socket's cookie (0: not read yet); at connect, what connect() left for it (it
    // rewrites only enrolled pods' connections); at close, its telemetry slot. A socket that
    // has either is an enrolled pod's, not the node's, and needs no namespace lookup.
    let mut cookie = 0;
    let mut handoff = None;
    let mut slot = None;
    if op == SOCK_OPS_TCP_CONNECT && telemetry_on() {
        cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
        handoff = take_orig(cookie);
    } else if closing {
        cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
        slot = tracked(cookie);
    }
    // The socket's network namespace, read once (0: not read).
    let mut ns = 0;
    if (op == SOCK_OPS_TCP_CONNECT && handoff.is_none()) || (closing && slot.is_none()) {
        let node = node_netns();
        if node != 0 {
            ns = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
            if ns == node {
                // The node's own connection: nothing else of this program concerns it.
                node_conn(&ctx, op);
                return 0;
            }
        }
    }
    // Whether the connection is counted in `ACTIVE`: connect() says so in its handoff, a
    // tracked socket in its slot; without either, its socket storage is looked for.
    let mut counted = false;
    if op == SOCK_OPS_TCP_CONNECT {
        if handoff.is_none_or(|h| h.flags & HANDOFF_F_COUNTED != 0) {
            counted = count_connect(&ctx);
        }
    } else if closing && slot.is_none_or(|m| unsafe { (*m).direction } & DIR_F_COUNTED != 0) {
        count_close(&ctx);
    }
    // A connection tracked before telemetry was switched off still gives its slot back.
    if !closing && !telemetry_on() {
        return 0;
    }
    if op == SOCK_OPS_TCP_CONNECT || op == SOCK_OPS_PASSIVE_ESTABLISHED {
        if handoff.is_none() {
            if ns == 0 {
                ns = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
            }
            if unsafe { NETNS.find(ns) }.is_none() {
                return 0;
            }
        }
        let now = unsafe { bpf_ktime_get_ns() };
        if cookie == 0 {
            cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
        }
        let outbound = op == SOCK_OPS_TCP_CONNECT;
        let dir = if outbound { DIR_OUTBOUND } else { DIR_INBOUND } as u8;
        // Without eager opens, the open rides on the connection's first record.
        let eager = telemetry_flags() & TFLAG_EAGER_OPEN != 0;
        let mut meta = ConnMeta {
            start_ns: now,
            direction: dir
                | if counted { DIR_F_COUNTED } else { 0 }
                | if eager { 0 } else { DIR_F_OPEN_PENDING },
            ..ConnMeta::default()
        };
        // The service address the client dialled, when connect() rewrote it.
        if let Some(h) = handoff {
            meta.orig_dst = h.orig_dst;
            meta.orig_port = h.orig_port;
            meta.has_orig = h.has_orig as u8;
        }
        if !track(cookie, &meta) {
            count(stat::TELEMETRY_UNTRACKED);
            return 0;
        }
        // A client socket is told of acknowledgements (for periodic reports) only once it is
        // established: the SYN-ACK's would come before the open is reported, one run for
        // nothing per connection. State changes from now on (a SYN that fails is reported, and
        // the entry goes at CLOSE).
        let flags =
            if outbound { SOCK_OPS_STATE_CB_FLAG } else { SOCK_OPS_STATE_CB_FLAG | SOCK_OPS_RTT_CB_FLAG };
        let _ = ctx.set_cb_flags((ctx.cb_flags() | flags) as i32);
        if !outbound && eager {
            emit(&conn_event(&ctx, CONN_OPEN, &meta, cookie, now));
        }
    } else if op == SOCK_OPS_STATE && ctx.arg(1) == tcp_state::FIN_WAIT2 {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
        if let Some(m) = tracked(cookie) {
            // No report is sent from FIN_WAIT2 on: the mark is free for this.
            unsafe { (*m).mark = core::ptr::read_volatile(&(*ctx.ops).rcv_nxt) };
        }
    } else if closing {
        let Some(m) = slot else { return 0 };
        let flags = telemetry_flags();
        if flags & TFLAG_ON == 0 {
            untrack(m);
            return 0;
        }
        let meta = unsafe { *m };
        let from = ctx.arg(0);
        let rcv_nxt = unsafe { core::ptr::read_volatile(&(*ctx.ops).rcv_nxt) };
        let kind = if from == tcp_state::SYN_SENT { CONN_FAILED } else { CONN_CLOSE };
        let no_peer_fin = from == tcp_state::FIN_WAIT2 && rcv_nxt == meta.mark;
        // A connection that never reported is summed with its peers' when nothing needs a
        // record of it.
        if flags & TFLAG_TALLY != 0
            && meta.direction & DIR_F_OPEN_PENDING != 0
            && tally(&ctx, &meta, kind == CONN_FAILED, from, no_peer_fin)
        {
            untrack(m);
            return 0;
        }
        let now = unsafe { bpf_ktime_get_ns() };
        let mut ev = conn_event(&ctx, kind, &meta, cookie, now);
        // The state the socket left: user space needs it to tell data bytes from SYN/FIN.
        ev.state = from;
        if no_peer_fin {
            ev.flags |= EV_NO_PEER_FIN;
        }
        if kind == CONN_CLOSE && meta.direction & DIR_F_OPEN_PENDING != 0 {
            ev.flags |= EV_OPENED;
        }
        emit(&ev);
        // Reported once; the slot is free again.
        untrack(m);
    }
    0
}
