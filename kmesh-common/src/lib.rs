//! Map keys, values and the pure selection helpers shared by the eBPF programs and user space.
//!
//! Every type here is `#[repr(C)]` with explicit padding, so the kernel and the daemon agree on
//! one layout. Addresses are always 16 bytes in the layout of `bpf_sock_addr.user_ip6`
//! (four `u32` words, each in network byte order); an IPv4 address is stored v4-mapped
//! (`::ffff:a.b.c.d`), which is also what a dual-stack socket hands to connect6.
//! Ports are in network byte order, as `bpf_sock_addr.user_port` carries them.
//!
//! The kernel-side lookup chain for one connect() is:
//! `NETNS[cookie]` (enrolled?) -> `FRONTENDS[vip, port, proto]` -> `LB_TABLES[service, class,
//! family]` (generation + endpoint counts per locality level) -> `ENDPOINTS[..., gen, level,
//! index]` (backend id and address) and `PORTS[service, backend, port]` (target port override).
//! `BACKENDS[backend]` (address) is written only for services with a UDP port: a connected UDP
//! socket's sticky backend is checked against it (see `UdpRev`).
#![no_std]

/// Layout version of the maps below. Bumped whenever a key or value changes shape, or how the
/// maps are reached (9: each map the daemon writes sits in the one slot of an array of maps,
/// so that it can grow without loading the programs again; 10: a connection's telemetry state
/// is a hash entry by socket cookie, no longer socket storage; 11: that state is a slot of an
/// array found by a hash of the cookie; 12: a slot carries its backend's address, so connect()
/// reads no `BACKENDS` entry; 13: a cookie's `CONNS` and `ORIG_HANDOFF` slots are found from
/// its home, `cookie_home`; 14: short connections' counts are summed in `TALLIES`, with the
/// epoch and the switch in `TELEMETRY_CONF`); the daemon keeps its pins under a directory
/// named after it.
pub const MAP_LAYOUT_VERSION: u32 = 14;

/// Names of the load-balancing maps, in the order user space lists them everywhere (map
/// counts, capacities, pins).
pub const LB_MAP_NAMES: [&str; 6] = ["NETNS", "FRONTENDS", "LB_TABLES", "ENDPOINTS", "BACKENDS", "PORTS"];

/// Number of locality priority levels. Level 0 is the best match; a service with N routing
/// preference scopes uses levels 0..=N (N <= 6), a service without locality uses level 0 only.
pub const LEVELS: usize = 8;

/// Address families as used in keys.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// IP protocols as used in keys.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// The connect() errno when a service has no usable endpoint (like kube-proxy's REJECT).
pub const ERRNO_NO_ENDPOINT: i32 = 111; // ECONNREFUSED
/// The connect() errno when a STRICT locality service has no endpoint in the client's locality.
pub const ERRNO_STRICT_NO_MATCH: i32 = 113; // EHOSTUNREACH
/// The connect() errno when the destination names a waypoint (Istio's `Service.waypoint` or
/// `Workload.waypoint`) and no endpoint of that waypoint is usable (none is healthy, none
/// takes PROXY protocol, or the waypoint names nothing in the model): the connection fails
/// rather than bypass the waypoint, whose L7 policy would then be skipped.
pub const ERRNO_WAYPOINT_UNREACHABLE: i32 = 101; // ENETUNREACH
/// The connect() errno when the destination is a service frontend but the tables behind it
/// could not be read consistently (an update raced the lookup twice, or an entry was missing):
/// the connection is refused, never passed on unchanged to whatever route the VIP has, and a
/// retry gets the tables as they are now.
pub const ERRNO_INCONSISTENT: i32 = 11; // EAGAIN

/// A check of a map key: FNV-1a over its 32-bit words, never 0. Every load-balancing value
/// carries the check of the key it was written under. Hash maps without preallocation hand a
/// freed element to the next insert at once on this kernel (the BPF memory allocator does not
/// wait for an RCU grace period), so a program that found a key may read the bytes of another
/// entry; it copies the value and compares the check before using it.
#[inline(always)]
pub fn key_check<K>(key: &K) -> u32 {
    let n = core::mem::size_of::<K>() / 4;
    let p = (key as *const K).cast::<u32>();
    let mut h: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < n {
        // SAFETY: i < size_of::<K>() / 4 words of a live value; unaligned reads are allowed.
        h = (h ^ unsafe { core::ptr::read_unaligned(p.add(i)) }).wrapping_mul(0x0100_0193);
        i += 1;
    }
    h | 1
}

/// Values that carry the check of their key (see [`key_check`]).
macro_rules! checked {
    ($($value:ty => $key:ty),* $(,)?) => {$(
        impl $value {
            /// This value with the check of `key` set.
            #[inline(always)]
            pub fn sealed(mut self, key: &$key) -> Self {
                self.check = key_check(key);
                self
            }
            /// Whether this value was written under `key`.
            #[inline(always)]
            pub fn belongs_to(&self, key: &$key) -> bool {
                self.check == key_check(key)
            }
        }
    )*};
}

/// The three words that prefix a v4-mapped IPv6 address, in `user_ip6` layout.
pub const V4_MAPPED_PREFIX: [u32; 3] = [0, 0, u32::from_be(0x0000_ffff)];

/// Returns the v4-mapped 16-byte form of an IPv4 address given as `user_ip4` (network order).
#[inline(always)]
pub const fn v4_mapped(ip4_be: u32) -> [u32; 4] {
    [V4_MAPPED_PREFIX[0], V4_MAPPED_PREFIX[1], V4_MAPPED_PREFIX[2], ip4_be]
}

/// True when a 16-byte address in `user_ip6` layout is v4-mapped.
#[inline(always)]
pub const fn is_v4_mapped(a: &[u32; 4]) -> bool {
    a[0] == V4_MAPPED_PREFIX[0] && a[1] == V4_MAPPED_PREFIX[1] && a[2] == V4_MAPPED_PREFIX[2]
}

// ---------------------------------------------------------------------------------------------
// NETNS: which network namespaces are in the mesh.
// ---------------------------------------------------------------------------------------------

/// `NetnsValue.flags`: the pods of this namespace are a waypoint. Their own connections are
/// never sent to a waypoint (no loops).
pub const NS_F_WAYPOINT: u32 = 1;

/// Value of `NETNS`, keyed by the namespace cookie (`u64`, SO_NETNS_COOKIE).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NetnsValue {
    /// Locality class of the pods in this namespace (0: the node's own locality).
    pub class_id: u32,
    /// `NS_F_*`.
    pub flags: u32,
    /// [`key_check`] of the cookie.
    pub check: u32,
}

// ---------------------------------------------------------------------------------------------
// FRONTENDS: service address + port + protocol.
// ---------------------------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub addr: [u32; 4],
    /// Service port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// The frontend's tables depend on the client's locality class.
pub const FE_F_LOCALITY: u16 = 1;

/// A frontend key with this port stands for every port of its address (TCP only): the
/// addresses of workloads that name a waypoint, looked up when no exact frontend matches.
pub const PORT_ANY: u16 = 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendValue {
    /// The service's own tables (0: none: a workload's address, reached directly).
    pub service_id: u32,
    /// Target port used unless `PORTS` has a per-backend override, network byte order.
    pub target_port: u16,
    pub flags: u16,
    /// The tables of the waypoint connections to this frontend go through (0: none). Their
    /// slots are waypoint endpoints; `PORTS` gives each one's PROXY port, and a connection
    /// without one keeps the port it dialled. Clients that are waypoints use `service_id`.
    pub waypoint_id: u32,
    /// [`key_check`] of the frontend key.
    pub check: u32,
}

// ---------------------------------------------------------------------------------------------
// LB_TABLES: one per (service, client locality class, address family).
// ---------------------------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableKey {
    pub service_id: u32,
    pub class_id: u32,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// STRICT locality: only level 0 may be used; an empty level 0 fails the connect.
pub const TBL_F_STRICT: u32 = 1;
/// Endpoints carry cumulative weights; pick by weight instead of uniformly.
pub const TBL_F_WEIGHTED: u32 = 2;
/// The table's slots are waypoint endpoints: an empty table fails connect() with
/// `ERRNO_WAYPOINT_UNREACHABLE`.
pub const TBL_F_WAYPOINT: u32 = 4;
/// Pick slots in turn (a per-CPU counter in `RR_TURNS`, indexed by service id modulo
/// [`RR_SLOTS`]) instead of at random; by weight, in blocks, when the table is weighted.
pub const TBL_F_ROUND_ROBIN: u32 = 8;
/// Pick by a hash of the client (its network namespace: one pod, one address) instead of at
/// random: the same client always reaches the same endpoint while the table stands. Alone, the
/// table is a Maglev lookup table (slot = hash modulo the count); with [`TBL_F_RING`], a ring.
pub const TBL_F_HASH: u32 = 16;
/// The slots are a hash ring: sorted by point, each slot's `cum_weight` holds its point, and a
/// client takes the first point at or past its hash (wrapping to the first).
pub const TBL_F_RING: u32 = 32;

/// Count the table's active connections (per service and per backend, in `ACTIVE`): for
/// least-request picks and the connection limit.
pub const TBL_F_COUNT: u32 = 64;
/// Least request: of two slots picked at random (by weight), the one whose backend has fewer
/// active connections (Envoy's `LEAST_REQUEST`, power of two choices).
pub const TBL_F_LEAST: u32 = 128;
/// Some backend of the service has a target port of its own (`PORTS`): look it up. Without
/// the flag every backend takes the frontend's target port, and connect() saves the lookup.
pub const TBL_F_PORTS: u32 = 256;

/// `ACTIVE` keys: a service's connections, or one backend's.
pub const ACTIVE_SERVICE: u32 = 1;
pub const ACTIVE_BACKEND: u32 = 2;

/// Key of `ACTIVE`, the active connections the kernel counts (established or being set up),
/// incremented when a counted connection sends its SYN and decremented when it closes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ActiveKey {
    pub kind: u32,
    pub id: u32,
}

/// Socket storage `LB_CONN` of a counted connection: what to decrement when it closes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbConn {
    pub service_id: u32,
    pub backend_id: u32,
    /// 0 until its SYN left; then 4, plus 1 if the service's counter was added to and 2 if
    /// the backend's was; 0 again once its close took them back.
    pub counted: u32,
    pub _pad: u32,
}

/// connect() refused because the service is at its connection limit (Envoy's circuit
/// breaker `max_connections`): ENOBUFS.
pub const ERRNO_CIRCUIT_OPEN: i32 = 105;

/// The client hash of [`TBL_F_HASH`] tables, from the network namespace cookie (a 64-bit
/// finalizer: cookies are sequential, their hashes are not).
#[inline(always)]
pub fn client_hash(cookie: u64) -> u32 {
    let mut h = cookie ^ 0x9e37_79b9_7f4a_7c15;
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h as u32
}

/// Entries of `RR_TURNS` (a per-CPU array: 8 bytes per entry per CPU, preallocated, so kept
/// small): services whose ids are equal modulo this share one counter, and their turns
/// interleave.
pub const RR_SLOTS: u32 = 4096;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableValue {
    /// Generation of the endpoint entries this table points at. A changed table is written
    /// under a new generation and then switched to with one atomic update of this value.
    pub generation: u32,
    pub flags: u32,
    /// Endpoints at each locality level.
    pub counts: [u32; LEVELS],
    /// Sum of the weights at each level (only meaningful with `TBL_F_WEIGHTED`).
    pub weights: [u32; LEVELS],
    /// The most active connections the service may have (0: no limit; needs `TBL_F_COUNT`).
    pub limit: u32,
    /// [`key_check`] of the table key.
    pub check: u32,
}

// ---------------------------------------------------------------------------------------------
// ENDPOINTS: the slots of a table.
// ---------------------------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointKey {
    pub service_id: u32,
    pub class_id: u32,
    pub generation: u32,
    pub family: u8,
    pub level: u8,
    pub _pad: u16,
    pub index: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointValue {
    pub backend_id: u32,
    /// Sum of the weights of slots 0..=index at this level (weighted tables only).
    pub cum_weight: u32,
    /// The backend's address: a backend id names one address for as long as it lives (a
    /// workload's new address is a changed slot, written under a new generation), so
    /// connect() needs no second lookup by backend id.
    pub addr: [u32; 4],
    /// [`key_check`] of the endpoint key.
    pub check: u32,
}

// ---------------------------------------------------------------------------------------------
// BACKENDS and PORTS.
// ---------------------------------------------------------------------------------------------

/// Value of `BACKENDS`, keyed by backend id (`u32`): one address of one workload, for the
/// backends of services with a UDP port only (what a UDP socket's sticky backend is checked
/// against; connect() reads the address from the slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendValue {
    pub addr: [u32; 4],
    /// [`key_check`] of the backend id.
    pub check: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    pub service_id: u32,
    pub backend_id: u32,
    /// Service port, network byte order.
    pub service_port: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortValue {
    /// Target port on that backend, network byte order.
    pub target_port: u16,
    pub _pad: u16,
    /// [`key_check`] of the port key.
    pub check: u32,
}

// ---------------------------------------------------------------------------------------------
// STATS: per-CPU counters of what the connect programs did.
// ---------------------------------------------------------------------------------------------

/// Indexes into the per-CPU `STATS` array.
pub mod stat {
    /// connect() to a frontend rewritten to a backend.
    pub const REWRITTEN: u32 = 0;
    /// connect() refused: the service has no usable endpoint.
    pub const NO_ENDPOINT: u32 = 1;
    /// connect() refused: STRICT locality and no endpoint in the client's locality.
    pub const STRICT_NO_MATCH: u32 = 2;
    /// A slot vanished under an update and the lookup was retried.
    pub const RETRIED: u32 = 3;
    /// Enrolled socket whose destination is not a frontend: passed unchanged.
    pub const PASSED: u32 = 4;
    /// A frontend's tables were inconsistent even after retrying (or an entry was missing):
    /// connect() refused with `ERRNO_INCONSISTENT`.
    pub const INCONSISTENT: u32 = 5;
    /// Telemetry events lost because the `TELEMETRY` ring buffer was full.
    pub const TELEMETRY_LOST: u32 = 6;
    /// Authorization events (denials, dry-run matches) lost because `AUTHZ_EVENTS` was full.
    pub const AUTHZ_EVENTS_LOST: u32 = 7;
    /// A destination with policies had no verdict row for a connection (an inconsistency):
    /// the connection was dropped, not admitted.
    pub const AUTHZ_INCONSISTENT: u32 = 8;
    /// A connection the node itself opened (kubelet's probes) admitted into a pod with
    /// policies without consulting them (see `NodeConnKey`).
    pub const AUTHZ_NODE_EXEMPT: u32 = 9;
    /// A datagram of an unconnected UDP socket sent to the backend the socket already uses
    /// for that frontend (no new choice; see `UdpRev`).
    pub const UDP_STICKY: u32 = 10;
    /// A reply's source rewritten from a backend back to the frontend the socket sent to.
    pub const UDP_REPLY_REWRITTEN: u32 = 11;
    /// A DNS query (UDP or TCP to port 53) of a pod sent to the pod's DNS proxy instead.
    pub const DNS_REDIRECTED: u32 = 12;
    /// A DNS query of a pod with a proxy left on its way to the resolver: its socket could not
    /// be given a local port to be told apart by (see `DnsOrigKey`).
    pub const DNS_UNTRACKED: u32 = 13;
    /// connect() to a frontend sent to a waypoint instead of an endpoint.
    pub const WAYPOINT_REDIRECTED: u32 = 14;
    /// connect() refused: the destination's waypoint has no usable endpoint.
    pub const WAYPOINT_UNREACHABLE: u32 = 15;
    /// A PROXY protocol header put in front of a waypoint connection's first write.
    pub const PROXY_HEADER_SENT: u32 = 16;
    /// A waypoint connection that could not be given its header: not tracked at
    /// establishment (`WAYPOINT_SOCKS` full) or the header could not be inserted (the write
    /// fails with EACCES and the next one tries again).
    pub const PROXY_HEADER_FAILED: u32 = 17;
    /// connect() refused: the service is at its connection limit.
    pub const CIRCUIT_OPEN: u32 = 18;
    /// A connection of an enrolled pod left without telemetry: its `CONNS` slots were all taken.
    pub const TELEMETRY_UNTRACKED: u32 = 19;
    pub const COUNT: u32 = 20;
}

// ---------------------------------------------------------------------------------------------
// L4 authorization, decided by the sk_lookup program in the destination pod's namespace:
// AUTHZ_DEST[dst addr] -> dest id; IDENTITY[src addr] -> identity; AUTHZ_REGION (LPM)
// [dest id, src addr] -> CIDR region; AUTHZ_VERDICT[dest id, identity, region, port].
// ---------------------------------------------------------------------------------------------

/// A source address that belongs to no workload.
pub const IDENTITY_UNKNOWN: u32 = 0;
/// Any workload identity that no policy of the destination tells apart.
pub const IDENTITY_OTHER: u32 = 1;
/// Any destination port that no policy of the destination names.
pub const PORT_OTHER: u16 = 0;

pub const VERDICT_ALLOW: u8 = 1;
pub const VERDICT_DENY: u8 = 2;

/// Value of `AUTHZ_DEST`, keyed by a destination workload address (16-byte layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DestValue {
    /// Changes whenever the destination's compiled policy changes (switched atomically).
    pub dest_id: u32,
    /// [`key_check`] of the destination address.
    pub check: u32,
}

/// An `IDENTITY` value: the identity id of a source address, with the check of the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdentityValue {
    pub id: u32,
    /// [`key_check`] of the address.
    pub check: u32,
}

/// Key of the `AUTHZ_REGION` LPM trie: the dest id (big-endian) then the source address bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegionKey {
    pub dest_id_be: [u8; 4],
    pub addr: [u8; 16],
}

/// Frontends one unconnected UDP socket remembers (see `UdpRev`).
pub const UDP_REV_SLOTS: usize = 8;
/// A socket that sent nothing to a frontend for this long chooses its backend again (as
/// conntrack forgets an idle UDP flow after 30 s).
pub const UDP_IDLE_NS: u64 = 30_000_000_000;

/// One frontend an unconnected UDP socket sends to: the backend chosen for it, so that later
/// datagrams go to the same one (a flow, as conntrack would keep it) and replies from it are
/// shown as coming from the frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpRevEntry {
    pub vip: [u32; 4],
    pub backend: [u32; 4],
    /// Ports in network order, as `bpf_sock_addr.user_port` holds them.
    pub vip_port: u16,
    pub backend_port: u16,
    pub backend_id: u32,
    /// When the socket last sent to it (0: the slot is free).
    pub last_ns: u64,
}

/// `UDP_REV`: per-socket storage of an unconnected UDP socket of an enrolled namespace that
/// sent to a frontend; bounded (the least recently used slot is reused), freed with the socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UdpRev {
    pub entries: [UdpRevEntry; UDP_REV_SLOTS],
}

// ---------------------------------------------------------------------------------------------
// DNS proxy: a pod's queries to any resolver (port 53, UDP and TCP) go to the daemon's proxy
// listening on loopback inside the pod's namespace (`TCONF_DNS_PORT`). The proxy answers mesh
// names and forwards the rest to the resolver the pod asked, which it finds in `DNS_ORIG`.
// ---------------------------------------------------------------------------------------------

/// Port 53 as `bpf_sock_addr.user_port` holds it (network order).
pub const DNS_PORT_NET: u16 = 53u16.to_be();
/// `SO_MARK` of the proxy's own sockets to upstream resolvers: never sent to a proxy again
/// (they are balanced like any other socket of the pod when the resolver is a service).
pub const DNS_UPSTREAM_MARK: u32 = 0x4b6d_0035;

/// `DnsPodValue.flags`: the proxy listens on 127.0.0.1 (queries over IPv4 go to it).
pub const DNS_POD_V4: u32 = 1;
/// `DnsPodValue.flags`: the proxy listens on ::1 (queries over IPv6 go to it).
pub const DNS_POD_V6: u32 = 2;

/// Value of `DNS_PODS`, keyed by namespace cookie: the namespace has a DNS proxy listening.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsPodValue {
    /// `DNS_POD_*`: the families it listens on (a pod without IPv6 loopback has no `::1`).
    pub flags: u32,
    /// [`key_check`] of the cookie.
    pub check: u32,
}

/// `DNS_ORIG` key: a pod's socket whose query went to the proxy, as the proxy sees its peer
/// (the pod's namespace, the socket's local port in host order, `PROTO_*`, `FAMILY_*` of the
/// loopback it reached). UDP sockets without a port are given one at connect() (`bpf_bind`),
/// TCP ones are recorded by sock_ops when the SYN leaves.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DnsOrigKey {
    pub netns: u64,
    pub port: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: u32,
}

/// The resolver a pod's socket asked: `DNS_ORIG` values (read by the proxy) and `DNS_TCP`
/// socket storage (a TCP socket's until its SYN leaves). Address in the 16-byte layout, port
/// in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsOrig {
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: u16,
    pub _pad2: u32,
}

/// `NODE_CONNS` key: a TCP connection opened from the node's own network namespace (where
/// kubelet runs) to a destination with policies, as its client sees it. The sock_ops program
/// records it when the node's socket sends its SYN and forgets it when the socket closes;
/// `kmesh_authz` admits a connection found here without consulting policies, as Istio ambient
/// admits kubelet's probes (there: SNAT to 169.254.7.127 and a bypass rule in the pod).
/// Addresses in the 16-byte layout (IPv4 mapped), ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeConnKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VerdictKey {
    pub dest_id: u32,
    pub identity: u32,
    pub region: u32,
    /// Destination port, host order; `PORT_OTHER` for ports no policy names.
    pub port: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VerdictValue {
    /// `VERDICT_ALLOW` or `VERDICT_DENY`.
    pub action: u8,
    /// What dry-run policies would have decided, when it differs (else 0).
    pub dry_action: u8,
    pub _pad: u16,
    /// The policy that decided (0: the default: allow, or deny because no ALLOW policy matched).
    pub policy_id: u32,
    pub dry_policy_id: u32,
    /// [`key_check`] of the verdict key.
    pub check: u32,
}

/// Key of `AUTHZ_COUNTS`: decisions per policy and action.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CountKey {
    pub policy_id: u32,
    pub action: u32,
}

/// A denial (or a dry-run difference), sent to user space for the log.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuthzEvent {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub policy_id: u32,
    pub action: u8,
    pub dry_action: u8,
    pub proto: u8,
    pub _pad: u8,
    pub dry_policy_id: u32,
}

// ---------------------------------------------------------------------------------------------
// Connection telemetry: sockops reports each TCP connection of an enrolled pod while it is
// open and when it closes, through a ring buffer; its open when it is established (eager) or
// with its first record.
// ---------------------------------------------------------------------------------------------

pub const CONN_OPEN: u32 = 1;
pub const CONN_CLOSE: u32 = 2;
/// A periodic report of a connection still open (counters so far).
pub const CONN_REPORT: u32 = 3;
/// A client connection that never established (refused, reset or timed out in SYN_SENT).
pub const CONN_FAILED: u32 = 4;
/// Close from FIN_WAIT2 without the peer's FIN (an orphaned socket going to TIME_WAIT as
/// soon as its own FIN is acknowledged): `bytes_received` holds no FIN.
pub const EV_NO_PEER_FIN: u32 = 1;
/// The connection's first record, carrying its open: sent without `TFLAG_EAGER_OPEN`, where
/// a connection reports no `CONN_OPEN` of its own and its open rides on its first periodic
/// report or its close, whichever comes first (one ring record for a short connection, not
/// two).
pub const EV_OPENED: u32 = 2;

/// A short connection's peers, as its sum in `TALLIES` is keyed (`TFLAG_TALLY`): what the
/// daemon labels a connection's series by, from the socket's side (a client socket's local
/// address is the source, a server socket's the destination), under the epoch it closed in.
/// The daemon moves the epoch on at each drain and takes the sums of epochs two behind: no
/// program still adds to those, so taking an entry out loses nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TallyKey {
    pub epoch: u32,
    /// `DIR_OUTBOUND` or `DIR_INBOUND`.
    pub direction: u16,
    /// As `ConnMeta.has_orig`.
    pub has_orig: u16,
    pub local: [u32; 4],
    pub remote: [u32; 4],
    /// The service address the client dialled (zero when `has_orig` is 0).
    pub orig_dst: [u32; 4],
    /// The destination's port: the remote port of a client socket, the local one of a server
    /// socket (the other side's port is left out: it differs per connection).
    pub dst_port: u16,
    pub orig_port: u16,
}

/// The sums of one `TallyKey`, per CPU (added with atomic adds: a program in a softirq may
/// interrupt another on the same CPU). Bytes are data bytes, from the socket's side, as
/// [`data_bytes`] counts them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TallyCounts {
    pub opened: u64,
    pub closed: u64,
    pub failed: u64,
    pub sent: u64,
    pub received: u64,
    pub retrans: u64,
    pub lost: u64,
}

impl TallyCounts {
    /// Both sums added (user space adds the CPUs' copies of an entry).
    pub fn plus(&self, o: &TallyCounts) -> TallyCounts {
        TallyCounts {
            opened: self.opened + o.opened,
            closed: self.closed + o.closed,
            failed: self.failed + o.failed,
            sent: self.sent + o.sent,
            received: self.received + o.received,
            retrans: self.retrans + o.retrans,
            lost: self.lost + o.lost,
        }
    }
}

/// Room in `TALLIES`: distinct peers closing short connections within about three drains of
/// the daemon (entries are allocated on use; the kernel sizes the buckets for the capacity,
/// 16 bytes each, so 4,096 cost 64 KiB idle). A connection that finds no room sends its record.
pub const TALLY_ENTRIES: u32 = 4096;

/// TCP states (include/net/tcp_states.h) the telemetry reads.
pub mod tcp_state {
    pub const ESTABLISHED: u32 = 1;
    pub const SYN_SENT: u32 = 2;
    pub const FIN_WAIT2: u32 = 5;
    pub const TIME_WAIT: u32 = 6;
    pub const CLOSE: u32 = 7;
    pub const CLOSE_WAIT: u32 = 8;
    pub const LAST_ACK: u32 = 9;
    pub const CLOSING: u32 = 11;
}

/// Data bytes (sent, received) of a connection from the kernel's counters. `bytes_acked`
/// also counts the SYN (on the side that sent it: the client) and an acknowledged FIN, and
/// `bytes_received` counts a received FIN; which FINs were exchanged follows from the state
/// the socket closed from (`close`), or for a report, the state it is in. `no_peer_fin`:
/// `EV_NO_PEER_FIN`.
#[inline(always)]
pub fn data_bytes(
    outbound: bool,
    close: bool,
    state: u32,
    no_peer_fin: bool,
    sent: u64,
    received: u64,
) -> (u64, u64) {
    use tcp_state::*;
    let (fin_acked, fin_received) = if close {
        (
            matches!(state, FIN_WAIT2 | TIME_WAIT | LAST_ACK | CLOSING),
            matches!(state, FIN_WAIT2 | TIME_WAIT | CLOSE_WAIT | LAST_ACK | CLOSING) && !no_peer_fin,
        )
    } else {
        // Reports come only from ESTABLISHED (no FIN either way) and CLOSE_WAIT (the peer's
        // FIN received, ours not sent).
        (false, state == CLOSE_WAIT)
    };
    let acked = outbound as u64 + fin_acked as u64;
    (sent.saturating_sub(acked), received.saturating_sub(fin_received as u64))
}

// TELEMETRY_CONF: an array the daemon writes, read by the sock_ops program.
/// Index of the flags word.
pub const TCONF_FLAGS: u32 = 0;
/// Index of the report interval of open connections, in nanoseconds.
pub const TCONF_INTERVAL_NS: u32 = 1;
/// Index of the cookie of the node's own network namespace, whose connections into pods
/// skip authorization (0: none do).
pub const TCONF_NODE_NETNS: u32 = 2;
/// Index of the port (host order) of the pods' DNS proxies, on 127.0.0.1 and ::1 in each
/// pod's namespace (0: no proxy anywhere).
pub const TCONF_DNS_PORT: u32 = 3;
/// Index of the epoch short connections are summed under in `TALLIES` (see [`TallyKey`]).
pub const TCONF_TALLY_EPOCH: u32 = 4;
pub const TCONF_COUNT: u32 = 5;
/// Flag: connection telemetry on (off: the program returns at once).
pub const TFLAG_ON: u64 = 1;
/// Flag: a connection reports `CONN_OPEN` as soon as it is established (outlier detection
/// needs each success when it happens); without it the open comes with its first record
/// (`EV_OPENED`).
pub const TFLAG_EAGER_OPEN: u64 = 2;
/// Flag: a connection that closes (or fails) before it sent any record is not reported on
/// its own: the kernel adds it to its peers' sums in `TALLIES` (see [`TallyKey`]). Set while
/// nothing needs a record per connection (no access log, no per-connection series, no
/// outlier detection). A sum that finds no room is sent as the connection's record.
pub const TFLAG_TALLY: u64 = 4;
/// The socket is the client side (it called connect()).
pub const DIR_OUTBOUND: u32 = 1;
/// The socket is the server side (it was accepted).
pub const DIR_INBOUND: u32 = 2;

/// `ConnMeta.has_orig` of a connection connect() sent to a waypoint.
pub const ORIG_VIA_WAYPOINT: u16 = 2;
/// `ConnMeta.direction` bit of a connection counted in `ACTIVE` (its close uncounts it); the
/// others need not look for its socket storage.
pub const DIR_F_COUNTED: u8 = 0x80;
/// `ConnMeta.direction` bit of a connection whose open is not reported yet: its next record
/// carries it (`EV_OPENED`). A slot without it has reported its open (or was tracked before
/// opens could wait).
pub const DIR_F_OPEN_PENDING: u8 = 0x40;
/// `OrigHandoff.flags` bit of a connection to a counted table (connect() left it socket
/// storage saying what to count); sock_ops looks for the storage of these only.
pub const HANDOFF_F_COUNTED: u32 = 1;

/// Per-connection telemetry state: a slot of `CONNS`, claimed by sock_ops when it first sees
/// an enrolled pod's connection (connect or accept) and freed when the socket reaches CLOSE.
/// A slot of a plain array found from the socket cookie ([`conn_slot`]), not a hash
/// map entry or socket storage: both allocate when a connection starts and free through RCU
/// when it ends, and that was most of what telemetry cost a short connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnMeta {
    /// The socket cookie of the connection in this slot (0: free). Claimed with a
    /// compare-and-swap from 0, so two CPUs never take the same slot.
    pub cookie: u64,
    pub start_ns: u64,
    /// The service address the client dialled, when connect() rewrote it.
    pub orig_dst: [u32; 4],
    pub orig_port: u16,
    /// 0: not rewritten; 1: rewritten to a service endpoint; `ORIG_VIA_WAYPOINT`: sent to the
    /// service's (or workload's) waypoint.
    pub has_orig: u8,
    /// `DIR_OUTBOUND` or `DIR_INBOUND`, with `DIR_F_COUNTED` and `DIR_F_OPEN_PENDING`.
    pub direction: u8,
    /// While the connection is established (or half-closed by the peer): when its last
    /// report was sent, in units of 2^20 ns (~1 ms) since `start_ns`. Once it is in
    /// FIN_WAIT2 (no report is sent from then on): its `rcv_nxt` on entering that state,
    /// which tells at close whether the peer's FIN arrived after.
    pub mark: u32,
}

/// Slots of `CONNS` (40 bytes each: 1.25 MiB). A connection's slot is one of
/// [`CONN_PROBES`] slots ([`conn_slot`]); when all of them are taken the connection goes
/// untracked (counted in `stat::TELEMETRY_UNTRACKED`), never one already tracked.
pub const CONNS_SLOTS: u32 = 32768;
/// Slots looked at for one connection: its home, then 16 others spread over the array.
pub const CONN_PROBES: u32 = 17;

/// The `i`th `CONNS` slot a socket cookie may take (`i` < [`CONN_PROBES`]): its home
/// ([`cookie_home`]), then slots spread over the whole array from the one [`cookie_hash`]
/// picks (steps of 2^32 / phi). Homes are dense: a block filled by long-lived connections (a
/// pool opened at once) sends later cookies of the same block elsewhere, and a run of
/// neighbouring slots would mostly fall in full blocks too.
#[inline(always)]
pub const fn conn_slot(cookie: u64, i: u32) -> u32 {
    if i == 0 {
        cookie_home(cookie, CONNS_SLOTS)
    } else {
        cookie_hash(cookie).wrapping_add(i.wrapping_mul(0x9E37_79B1)) % CONNS_SLOTS
    }
}

/// Cookies per block of [`cookie_home`].
pub const COOKIE_BLOCK: u64 = 64;

/// A socket cookie's home among `slots` slots (a multiple of [`COOKIE_BLOCK`]). The kernel
/// hands cookies out to each CPU in consecutive runs; blocks of [`COOKIE_BLOCK`] consecutive
/// cookies are spread over the slots by a hash ([`cookie_hash`]), and within a block each
/// cookie takes the next slot. So a CPU's connections one after another touch the same page
/// and the next cache lines, not a random line of a random page each: on this project's test
/// machine that was 0.2 us of sock_ops time per connection (TLB and cache misses).
#[inline(always)]
pub const fn cookie_home(cookie: u64, slots: u32) -> u32 {
    let block = cookie_hash(cookie / COOKIE_BLOCK) as u64;
    ((block * COOKIE_BLOCK + cookie % COOKIE_BLOCK) % slots as u64) as u32
}

/// What connect() leaves for sock_ops about the connection it just rewrote: the service
/// address the client dialled (`ORIG_HANDOFF`, an array). Both hooks run in the same connect()
/// call, microseconds apart, whatever CPU each runs on; the slot is chosen by a hash of the
/// socket's cookie ([`handoff_slot`]) and holds the cookie, so a slot another socket took is
/// never mistaken for this one's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigHandoff {
    pub cookie: u64,
    pub orig_dst: [u32; 4],
    pub orig_port: u16,
    pub has_orig: u16,
    /// `HANDOFF_F_COUNTED`.
    pub flags: u32,
}

/// Slots of `ORIG_HANDOFF` (32 bytes each: 128 KiB). Two connect() calls in flight at once
/// share a slot with odds of one in this many, and then the second one's service is lost to
/// the first one's telemetry (its connection is still counted, by workload).
pub const HANDOFF_SLOTS: u32 = 4096;

/// A socket cookie hashed for a slot index (Fibonacci hashing: the high bits of the cookie
/// times 2^64 / phi), not used as it is: cookies need not be dense, and the kernel may hand
/// them out to CPUs in batches whose remainders line up.
#[inline(always)]
pub const fn cookie_hash(cookie: u64) -> u32 {
    (cookie.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32
}

/// The `ORIG_HANDOFF` slot of a socket cookie (its home: consecutive cookies take
/// consecutive slots, see [`cookie_home`]).
#[inline(always)]
pub const fn handoff_slot(cookie: u64) -> u32 {
    cookie_home(cookie, HANDOFF_SLOTS)
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEvent {
    pub kind: u32,
    pub direction: u32,
    pub local: [u32; 4],
    pub remote: [u32; 4],
    pub local_port: u16,
    pub remote_port: u16,
    pub orig_port: u16,
    pub has_orig: u16,
    pub orig_dst: [u32; 4],
    pub sent_bytes: u64,
    pub received_bytes: u64,
    pub duration_ns: u64,
    pub retrans: u32,
    pub lost: u32,
    pub srtt_us: u32,
    pub min_rtt_us: u32,
    pub state: u32,
    /// `EV_*` flags.
    pub flags: u32,
    /// Socket cookie: ties an open, its reports and its close together.
    pub cookie: u64,
}

// ---------------------------------------------------------------------------------------------
// Waypoints: a connection sent to a waypoint opens with a PROXY protocol v2 header carrying
// the client's address, the address and port it dialled, and two TLVs: `0xD0` the client's
// SPIFFE identity and `0xD1` the hostname of the service it dialled. connect() records the
// original destination in `WP_CONN`; sock_ops puts the established socket in
// `WAYPOINT_SOCKS`; the sk_msg program pushes the header in front of its first write.
// ---------------------------------------------------------------------------------------------

/// The 12-byte signature that opens a PROXY protocol v2 header.
pub const PP2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
pub const PP2_VERSION_PROXY: u8 = 0x21;
/// AF_INET / AF_INET6 over STREAM.
pub const PP2_TCP4: u8 = 0x11;
pub const PP2_TCP6: u8 = 0x21;
/// TLV types: padding, the client's SPIFFE identity, the dialled service's hostname (Istio's).
pub const PP2_TYPE_NOOP: u8 = 0x04;
pub const PP2_TYPE_PEER_IDENTITY: u8 = 0xD0;
pub const PP2_TYPE_SERVICE_HOSTNAME: u8 = 0xD1;
/// Bytes of one TLV slot. Each of the two TLVs fills exactly one slot, the rest of which is a
/// NOOP TLV, so the kernel copies constant sizes; a value may be up to `PP_SLOT - 6` bytes.
pub const PP_SLOT: usize = 256;
/// The longest TLV value a slot holds (253-byte hostnames and most identities fit).
pub const PP_SLOT_MAX_VALUE: usize = PP_SLOT - 6;
/// Header length: 16 fixed bytes, the address block, two slots.
pub const PP2_LEN_V4: usize = 16 + 12 + 2 * PP_SLOT;
pub const PP2_LEN_V6: usize = 16 + 36 + 2 * PP_SLOT;

/// One TLV slot as `PP_IDENT` and `PP_HOST` hold it (see [`pp_slot`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PpSlot {
    pub bytes: [u8; PP_SLOT],
}

impl Default for PpSlot {
    fn default() -> Self {
        pp_slot(PP2_TYPE_NOOP, &[]).expect("an empty slot fits")
    }
}

/// A slot holding TLV `kind` with `value`, padded with a NOOP TLV; an empty value gives a
/// slot that is all padding. `None` when the value is longer than [`PP_SLOT_MAX_VALUE`].
pub fn pp_slot(kind: u8, value: &[u8]) -> Option<PpSlot> {
    let mut bytes = [0u8; PP_SLOT];
    let mut at = 0;
    if !value.is_empty() {
        if value.len() > PP_SLOT_MAX_VALUE {
            return None;
        }
        bytes[0] = kind;
        bytes[1..3].copy_from_slice(&(value.len() as u16).to_be_bytes());
        bytes[3..3 + value.len()].copy_from_slice(value);
        at = 3 + value.len();
    }
    bytes[at] = PP2_TYPE_NOOP;
    bytes[at + 1..at + 3].copy_from_slice(&((PP_SLOT - at - 3) as u16).to_be_bytes());
    Some(PpSlot { bytes })
}

/// `WP_CONN`: per-socket storage of a connection connect() sent to a waypoint, until its
/// header is sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WaypointConn {
    /// The address and port (network order) the client dialled.
    pub orig_dst: [u32; 4],
    pub orig_port: u16,
    /// The port of the frontend key that matched (network order; `PORT_ANY` for a workload
    /// address): with `orig_dst`, the key of the hostname slot in `PP_HOST`.
    pub fe_port: u16,
    /// 1 until the header has been sent.
    pub pending: u32,
    /// The client's namespace: the key of its identity slot in `PP_IDENT`.
    pub netns: u64,
}

// ---------------------------------------------------------------------------------------------
// Selection helpers: pure, bounded, used by the kernel and unit-tested on the host.
// ---------------------------------------------------------------------------------------------

/// The best locality level that has endpoints: level 0 only for STRICT tables.
#[inline(always)]
pub fn pick_level(t: &TableValue) -> Option<usize> {
    if t.flags & TBL_F_STRICT != 0 {
        return if t.counts[0] > 0 { Some(0) } else { None };
    }
    let mut level = 0;
    while level < LEVELS {
        if t.counts[level] > 0 {
            return Some(level);
        }
        level += 1;
    }
    None
}

/// The point in a weighted round-robin table's weight space for turn `turn`: turns
/// `0..total` visit every point once (the multiplier is prime, so coprime with any `total`
/// below it), spread across the space, so each slot gets exactly its weight's share of every
/// `total` turns and no slot takes a long run of them.
#[inline(always)]
pub fn rr_point(turn: u32, total: u32) -> u32 {
    if total == 0 {
        return 0;
    }
    ((turn as u64 * 2_654_435_761u64) % total as u64) as u32
}

/// Picks a slot at `level` from a random number: uniformly, or by weight for weighted tables,
/// looking up cumulative weights through `cum_at` (binary search, at most 32 lookups).
/// Returns `None` when a lookup misses (the table changed under us).
#[inline(always)]
pub fn pick_slot<F: FnMut(u32) -> Option<u32>>(
    t: &TableValue,
    level: usize,
    rand: u32,
    mut cum_at: F,
) -> Option<u32> {
    let count = t.counts[level];
    if count == 0 {
        return None;
    }
    let ring = t.flags & TBL_F_RING != 0;
    if !ring && (t.flags & TBL_F_WEIGHTED == 0 || t.weights[level] == 0) {
        return Some(rand % count);
    }
    let r = if ring { rand } else { rand % t.weights[level] };
    // Smallest index whose cumulative weight exceeds r.
    let (mut lo, mut hi) = (0u32, count - 1);
    let mut i = 0;
    while i < 32 {
        if lo >= hi {
            break;
        }
        let mid = lo + (hi - lo) / 2;
        if cum_at(mid)? > r {
            hi = mid;
        } else {
            lo = mid + 1;
        }
        i += 1;
    }
    // Past the last point of a ring: the first.
    if ring && lo == count - 1 && cum_at(lo)? <= r {
        return Some(0);
    }
    Some(lo)
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for NetnsValue {}
    unsafe impl aya::Pod for FrontendKey {}
    unsafe impl aya::Pod for FrontendValue {}
    unsafe impl aya::Pod for TableKey {}
    unsafe impl aya::Pod for TableValue {}
    unsafe impl aya::Pod for ActiveKey {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for EndpointValue {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for PortValue {}
    unsafe impl aya::Pod for NodeConnKey {}
    unsafe impl aya::Pod for DestValue {}
    unsafe impl aya::Pod for RegionKey {}
    unsafe impl aya::Pod for VerdictKey {}
    unsafe impl aya::Pod for VerdictValue {}
    unsafe impl aya::Pod for IdentityValue {}
    unsafe impl aya::Pod for CountKey {}
    unsafe impl aya::Pod for AuthzEvent {}
    unsafe impl aya::Pod for ConnMeta {}
    unsafe impl aya::Pod for OrigHandoff {}
    unsafe impl aya::Pod for ConnEvent {}
    unsafe impl aya::Pod for TallyKey {}
    unsafe impl aya::Pod for TallyCounts {}
    unsafe impl aya::Pod for DnsPodValue {}
    unsafe impl aya::Pod for DnsOrigKey {}
    unsafe impl aya::Pod for DnsOrig {}
    unsafe impl aya::Pod for PpSlot {}
    unsafe impl aya::Pod for WaypointConn {}
}

checked! {
    NetnsValue => u64,
    FrontendValue => FrontendKey,
    TableValue => TableKey,
    EndpointValue => EndpointKey,
    BackendValue => u32,
    PortValue => PortKey,
    DestValue => [u32; 4],
    IdentityValue => [u32; 4],
    VerdictValue => VerdictKey,
    DnsPodValue => u64,
}

// Sizes are part of the pinned layout: a change here must bump MAP_LAYOUT_VERSION.
const _: () = {
    assert!(core::mem::size_of::<NetnsValue>() == 12);
    assert!(core::mem::size_of::<FrontendKey>() == 20);
    assert!(core::mem::size_of::<FrontendValue>() == 16);
    assert!(core::mem::size_of::<TableKey>() == 12);
    assert!(core::mem::size_of::<TableValue>() == 16 + 8 * LEVELS);
    assert!(core::mem::size_of::<EndpointKey>() == 20);
    assert!(core::mem::size_of::<EndpointValue>() == 28);
    assert!(core::mem::size_of::<BackendValue>() == 20);
    assert!(core::mem::size_of::<PortKey>() == 12);
    assert!(core::mem::size_of::<PortValue>() == 8);
    assert!(core::mem::size_of::<DestValue>() == 8);
    assert!(core::mem::size_of::<RegionKey>() == 20);
    assert!(core::mem::size_of::<VerdictKey>() == 16);
    assert!(core::mem::size_of::<NodeConnKey>() == 36);
    assert!(core::mem::size_of::<UdpRevEntry>() == 48);
    assert!(core::mem::size_of::<VerdictValue>() == 16);
    assert!(core::mem::size_of::<IdentityValue>() == 8);
    assert!(core::mem::size_of::<CountKey>() == 8);
    assert!(core::mem::size_of::<AuthzEvent>() == 48);
    assert!(core::mem::size_of::<ConnMeta>() == 40);
    assert!(core::mem::size_of::<OrigHandoff>() == 32);
    assert!(core::mem::size_of::<ConnEvent>() == 120);
    assert!(core::mem::size_of::<TallyKey>() == 60);
    assert!(core::mem::size_of::<TallyCounts>() == 56);
    assert!(core::mem::size_of::<DnsPodValue>() == 8);
    assert!(core::mem::size_of::<DnsOrigKey>() == 16);
    assert!(core::mem::size_of::<DnsOrig>() == 24);
    assert!(core::mem::size_of::<PpSlot>() == PP_SLOT);
    assert!(core::mem::size_of::<WaypointConn>() == 32);
};

#[cfg(test)]
mod tests {
    use super::*;
    use std::eprintln;

    /// Fills `CONNS` with these cookies, none closing, each taking the first free of its
    /// slots, until 90% of the slots are in use: (connections that found all their slots
    /// taken, connections made, slots in use when the first one did).
    fn fill_conns(cookie: impl Fn(u32) -> u64) -> (u32, u32, u32) {
        let mut taken = [false; CONNS_SLOTS as usize];
        let (mut used, mut missed, mut first) = (0u32, 0u32, 0u32);
        let mut n = 0;
        while used < CONNS_SLOTS * 9 / 10 && n < CONNS_SLOTS * 10 {
            let c = cookie(n);
            n += 1;
            match (0..CONN_PROBES).map(|i| conn_slot(c, i) as usize).find(|s| !taken[*s]) {
                Some(s) => {
                    taken[s] = true;
                    used += 1;
                }
                None if missed == 0 => {
                    missed = 1;
                    first = used;
                }
                None => missed += 1,
            }
        }
        (missed, n, first)
    }

    /// How full `CONNS` can get before connections go untracked. Cookies as the kernel hands
    /// them out (one CPU's consecutive run, or two CPUs' batches of 4,096 interleaved): until
    /// 90% of the slots are in use, fewer than 1 in 40 new connections finds all its slots
    /// taken (0.4% and 2.0%), none until 70%. Cookies with no order at all: fewer than 1 in
    /// 25 (3.2%; the plain hash of each cookie with a run of 8 next to it left 13.7%).
    #[test]
    fn conns_slots_fill_before_connections_go_untracked() {
        let one_cpu = fill_conns(|n| 1 + n as u64);
        let two_cpus = fill_conns(|n| 1 + (n / 2) as u64 + if n % 2 == 1 { 4096 * 9 } else { 0 });
        for (name, (missed, n, first)) in [("one CPU", one_cpu), ("two CPUs", two_cpus)] {
            eprintln!(
                "{name}: {missed} of {n} untracked, the first at {first} of {CONNS_SLOTS} slots in use"
            );
            assert!(missed * 40 < n, "{name}: {missed} of {n} connections untracked");
            assert!(first >= CONNS_SLOTS * 7 / 10, "{name}: the first untracked at {first} slots in use");
        }
        // A fixed pseudo-random sequence (xorshift).
        let (missed, n, first) = fill_conns(|n| {
            let mut x = 0x2545_F491_4F6C_DD1Du64 ^ (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        });
        eprintln!(
            "random cookies: {missed} of {n} untracked, the first at {first} of {CONNS_SLOTS} slots in use"
        );
        assert!(missed * 25 < n, "random cookies: {missed} of {n} connections untracked");
    }

    /// A CPU's consecutive cookies take consecutive slots, 64 at a time: connections one
    /// after another touch the same 2.5 KiB of `CONNS` (a page or two), not a random page each.
    #[test]
    fn consecutive_cookies_take_neighbouring_slots() {
        for base in [0u64, 4096, 123_456_768] {
            let homes: [u32; 64] = core::array::from_fn(|i| conn_slot(base + i as u64, 0));
            assert!(homes.windows(2).all(|w| w[1] == w[0] + 1), "base {base}: {homes:?}");
            let bytes = 64 * core::mem::size_of::<ConnMeta>() as u32;
            assert!(bytes <= 4096 && homes[0].is_multiple_of(64));
        }
    }

    /// Connects in flight at once rarely share a handoff slot, however their cookies line up:
    /// a run of consecutive cookies, and two runs whose remainders by 4,096 are the same (two
    /// CPUs' batches), spread over the slots without a shared one among 64 at once.
    #[test]
    fn handoff_slots_spread_runs_of_cookies() {
        for base in [1u64, 4096, 1 << 20, 123_456_789] {
            let mut slots: [u32; 64] = core::array::from_fn(|i| {
                let c = base + (i as u64 / 2) + if i % 2 == 1 { 4096 * 7 } else { 0 };
                handoff_slot(c)
            });
            assert!(slots.iter().all(|s| *s < HANDOFF_SLOTS));
            slots.sort_unstable();
            let shared = slots.windows(2).filter(|w| w[0] == w[1]).count();
            assert!(shared <= 1, "base {base}: {shared} shared slots among 64 cookies");
        }
    }

    /// A ring: the first point at or past the hash, wrapping past the last one.
    #[test]
    fn ring_lookup_takes_the_next_point_and_wraps() {
        let t = table(TBL_F_HASH | TBL_F_RING, &[3], &[0]);
        let points = [100u32, 200, 300];
        let at = |h| pick_slot(&t, 0, h, |i| Some(points[i as usize])).unwrap();
        assert_eq!(
            [at(0), at(99), at(100), at(150), at(250), at(300), at(301), at(u32::MAX)],
            [0, 0, 1, 1, 2, 0, 0, 0]
        );
        assert_ne!(client_hash(1), client_hash(2));
    }

    /// Weighted round robin: every `total` turns give each slot exactly its weight, and a
    /// heavy slot does not take its share in one run.
    #[test]
    fn weighted_turns_give_exact_shares_interleaved() {
        for total in [1u32, 4, 7, 60_000, 65_536] {
            let mut seen = [false; 65_536];
            for turn in 0..total {
                let p = rr_point(turn, total) as usize;
                assert!(!seen[p], "point {p} twice in one cycle of {total}");
                seen[p] = true;
            }
        }
        // Weights 1:3 (cumulative 15,000 / 60,000): in any 8 consecutive turns both appear.
        let slot = |t: u32| u32::from(rr_point(t, 60_000) >= 15_000);
        for start in 0..10_000 {
            let ones: u32 = (start..start + 8).map(slot).sum();
            assert!((1..8).contains(&ones), "a run at turn {start}");
        }
    }

    fn table(flags: u32, counts: &[u32], weights: &[u32]) -> TableValue {
        let mut t = TableValue { flags, ..Default::default() };
        t.counts[..counts.len()].copy_from_slice(counts);
        t.weights[..weights.len()].copy_from_slice(weights);
        t
    }

    #[test]
    fn a_value_read_under_another_key_is_told_apart() {
        let k1 = FrontendKey {
            addr: [0, 0, 0xffff_0000, 0x0a60_000a],
            port: 80u16.to_be(),
            proto: PROTO_TCP,
            _pad: 0,
        };
        let k2 = FrontendKey { port: 81u16.to_be(), ..k1 };
        let v = FrontendValue { service_id: 7, ..Default::default() }.sealed(&k1);
        assert!(v.belongs_to(&k1) && !v.belongs_to(&k2));
        assert!(!FrontendValue::default().belongs_to(&k1), "an unsealed value never passes");
        let b = BackendValue::default().sealed(&3);
        assert!(b.belongs_to(&3) && !b.belongs_to(&4));
        let n = NetnsValue::default().sealed(&0x1_0000_0001);
        assert!(!n.belongs_to(&0x2_0000_0001), "both words of a cookie count");
        let vk = VerdictKey { dest_id: 1, identity: 2, region: 0, port: 80, _pad: 0 };
        let v = VerdictValue { action: VERDICT_DENY, ..Default::default() }.sealed(&vk);
        assert!(v.belongs_to(&vk) && !v.belongs_to(&VerdictKey { identity: 3, ..vk }));
        let i = IdentityValue { id: 5, check: 0 }.sealed(&[0, 0, 0xffff_0000, 1]);
        assert!(!i.belongs_to(&[0, 0, 0xffff_0000, 2]));
    }

    #[test]
    fn level_is_first_non_empty() {
        assert_eq!(pick_level(&table(0, &[0, 0, 3], &[])), Some(2));
        assert_eq!(pick_level(&table(0, &[1, 5], &[])), Some(0));
        assert_eq!(pick_level(&table(0, &[], &[])), None);
    }

    #[test]
    fn strict_uses_only_level_zero() {
        assert_eq!(pick_level(&table(TBL_F_STRICT, &[0, 4], &[])), None);
        assert_eq!(pick_level(&table(TBL_F_STRICT, &[2, 4], &[])), Some(0));
    }

    #[test]
    fn uniform_slot_is_modulo() {
        let t = table(0, &[3], &[]);
        for r in 0..30 {
            assert_eq!(pick_slot(&t, 0, r, |_| unreachable!()), Some(r % 3));
        }
    }

    #[test]
    fn weighted_slot_follows_cumulative_weights() {
        // weights 1, 3, 6 -> cumulative 1, 4, 10
        let cum = [1u32, 4, 10];
        let t = table(TBL_F_WEIGHTED, &[3], &[10]);
        let mut hits = [0u32; 3];
        for r in 0..10 {
            let s = pick_slot(&t, 0, r, |i| Some(cum[i as usize])).unwrap();
            hits[s as usize] += 1;
        }
        assert_eq!(hits, [1, 3, 6]);
    }

    #[test]
    fn weighted_slot_reports_a_missing_entry() {
        let t = table(TBL_F_WEIGHTED, &[4], &[4]);
        assert_eq!(pick_slot(&t, 0, 1, |_| None), None);
    }

    #[test]
    fn weighted_search_is_exact_on_large_tables() {
        // 100k slots of weight 1..=3: every r maps to the slot whose range holds it.
        let n = 100_000u32;
        let w = |i: u32| i % 3 + 1;
        let mut cum = alloc_cum(n, w);
        let total = *cum.last().unwrap();
        let t = table(TBL_F_WEIGHTED, &[n], &[total]);
        for r in [0, 1, 2, total / 2, total - 2, total - 1] {
            let s = pick_slot(&t, 0, r, |i| Some(cum[i as usize])).unwrap() as usize;
            let lo = if s == 0 { 0 } else { cum[s - 1] };
            assert!(lo <= r && r < cum[s], "r={r} slot={s}");
        }
        cum.clear();
    }

    extern crate std;
    fn alloc_cum(n: u32, w: impl Fn(u32) -> u32) -> std::vec::Vec<u32> {
        let mut acc = 0;
        (0..n)
            .map(|i| {
                acc += w(i);
                acc
            })
            .collect()
    }

    #[test]
    fn v4_mapping_round_trips() {
        let ip = u32::from_ne_bytes([10, 96, 0, 1]);
        let a = v4_mapped(ip);
        assert!(is_v4_mapped(&a));
        assert_eq!(a[3], ip);
        let bytes: [u8; 4] = a[2].to_ne_bytes();
        assert_eq!(bytes, [0, 0, 0xff, 0xff]);
    }

    /// Walks the TLVs of a slot: (type, value) in order, or `None` if one overruns the slot.
    fn tlvs(slot: &PpSlot) -> Option<std::vec::Vec<(u8, std::vec::Vec<u8>)>> {
        let b = &slot.bytes;
        let mut out = std::vec::Vec::new();
        let mut at = 0;
        while at < PP_SLOT {
            let len = u16::from_be_bytes([*b.get(at + 1)?, *b.get(at + 2)?]) as usize;
            out.push((b[at], b.get(at + 3..at + 3 + len)?.to_vec()));
            at += 3 + len;
        }
        Some(out)
    }

    #[test]
    fn a_tlv_slot_is_exactly_filled_by_its_tlv_and_padding() {
        let id = b"spiffe://cluster.local/ns/default/sa/client";
        let s = pp_slot(PP2_TYPE_PEER_IDENTITY, id).unwrap();
        let t = tlvs(&s).expect("the TLVs end exactly at the slot's end");
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].0, t[0].1.as_slice()), (PP2_TYPE_PEER_IDENTITY, &id[..]));
        assert_eq!(t[1].0, PP2_TYPE_NOOP);
        // Empty: all padding. The longest value still leaves room for the NOOP's header.
        assert_eq!(tlvs(&PpSlot::default()).unwrap(), [(PP2_TYPE_NOOP, std::vec![0; PP_SLOT - 3])]);
        let long = [b'a'; PP_SLOT_MAX_VALUE];
        let t = tlvs(&pp_slot(PP2_TYPE_SERVICE_HOSTNAME, &long).unwrap()).unwrap();
        assert_eq!((t[0].1.len(), t[1].1.len()), (PP_SLOT_MAX_VALUE, 0));
        assert!(pp_slot(PP2_TYPE_SERVICE_HOSTNAME, &[b'a'; PP_SLOT_MAX_VALUE + 1]).is_none());
        assert_eq!(PP2_SIGNATURE, [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]);
    }
}
