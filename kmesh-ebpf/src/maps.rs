//! Every map the programs share. Key and value types are `kmesh_common`'s.
//!
//! The maps the daemon writes grow with the configuration, so a program does not name them
//! directly: each is the one slot of an array of maps ([`Slot`]), and a grow puts a bigger map
//! in that slot (user space makes it, fills it, and swaps it in with one update). The
//! programs are never loaded again for a grow. The inner capacities given here only shape the
//! template the outer map is created with (the kernel checks type, key, value and flags of
//! what goes in the slot, not its size); the daemon sizes the real ones.

use aya_ebpf::{
    btf_maps::{
        Array, ArrayOfMaps, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, SkStorage,
        SockHash, lpm_trie::Key,
    },
    macros::btf_map,
};
use core::borrow::Borrow;

use kmesh_common::*;

/// Hash maps allocate on demand: large capacities cost nothing until used, and an update that
/// replaces a value frees the old one only after an RCU grace period.
pub const NO_PREALLOC: usize = 1; // BPF_F_NO_PREALLOC

/// Capacity of the template of a growable map (see the module's documentation).
const TEMPLATE: usize = 1024;

/// A growable map: the one slot of an array of maps holding it.
pub type Slot<M> = ArrayOfMaps<M, 1>;

/// A growable hash map, by key and value.
pub type GrowHash<K, V> = Slot<HashMap<K, V, TEMPLATE, NO_PREALLOC>>;

/// Lookups through a growable map's slot. An empty slot (never the case once the daemon has
/// loaded the programs) reads as a missing entry.
pub trait Lookup<K, V> {
    /// The value at `key`.
    ///
    /// # Safety
    /// As `HashMap::get`: the value may be changed or freed by a concurrent update; copy it
    /// out at once.
    unsafe fn find(&self, key: impl Borrow<K>) -> Option<&V>;
}

impl<K, V> Lookup<K, V> for GrowHash<K, V> {
    #[inline(always)]
    unsafe fn find(&self, key: impl Borrow<K>) -> Option<&V> {
        unsafe { self.get(0)?.get(key) }
    }
}

impl<K, V> Lookup<Key<K>, V> for Slot<LpmTrie<K, V, TEMPLATE>> {
    #[inline(always)]
    unsafe fn find(&self, key: impl Borrow<Key<K>>) -> Option<&V> {
        self.get(0)?.get(key.borrow())
    }
}

#[btf_map]
pub static NETNS: GrowHash<u64, NetnsValue> = ArrayOfMaps::new();
#[btf_map]
pub static FRONTENDS: GrowHash<FrontendKey, FrontendValue> = ArrayOfMaps::new();
#[btf_map]
pub static LB_TABLES: GrowHash<TableKey, TableValue> = ArrayOfMaps::new();
#[btf_map]
pub static ENDPOINTS: GrowHash<EndpointKey, EndpointValue> = ArrayOfMaps::new();
#[btf_map]
pub static BACKENDS: GrowHash<u32, BackendValue> = ArrayOfMaps::new();
#[btf_map]
pub static PORTS: GrowHash<PortKey, PortValue> = ArrayOfMaps::new();
#[btf_map]
pub static STATS: PerCpuArray<u64, { stat::COUNT as usize }> = PerCpuArray::new();
/// Active connections of counted tables (least request, connection limits), by service and
/// by backend. Entries are made by the programs on first use and never removed (ids are
/// reused). The kernel sizes a hash map's buckets for its capacity (16 bytes an entry), so it
/// holds 16,384: past that, new backends go uncounted (never wrongly refused).
#[btf_map]
pub static ACTIVE: HashMap<ActiveKey, u64, 16384, NO_PREALLOC> = HashMap::new();
/// What a counted connection decrements when it closes.
#[btf_map]
pub static LB_CONN: SkStorage<LbConn> = SkStorage::new();
/// Round-robin turns, per CPU (Envoy's round robin is per worker thread): no atomics, no
/// cache line shared between CPUs. 4,096 x 8 bytes per CPU.
#[btf_map]
pub static RR_TURNS: PerCpuArray<u32, { RR_SLOTS as usize }> = PerCpuArray::new();

// L4 authorization (see kmesh_common): decided when a new connection looks up its socket in
// the destination pod's namespace. SK_DROP there makes the kernel answer a TCP SYN with a
// reset, so a denied client fails at once with ECONNREFUSED and the server never sees it.
#[btf_map]
pub static AUTHZ_DEST: GrowHash<[u32; 4], DestValue> = ArrayOfMaps::new();
#[btf_map]
pub static IDENTITY: GrowHash<[u32; 4], IdentityValue> = ArrayOfMaps::new();
#[btf_map]
pub static AUTHZ_REGION: Slot<LpmTrie<RegionKey, u32, TEMPLATE>> = ArrayOfMaps::new();
#[btf_map]
pub static AUTHZ_VERDICT: GrowHash<VerdictKey, VerdictValue> = ArrayOfMaps::new();
#[btf_map]
pub static AUTHZ_COUNTS: PerCpuHashMap<CountKey, u64, 65536, NO_PREALLOC> = PerCpuHashMap::new();
#[btf_map]
pub static AUTHZ_EVENTS: RingBuf<(), { 256 * 1024 }> = RingBuf::new();
/// Connections the node's own network namespace opened to destinations with policies
/// (kubelet's probes): admitted without policy (see `NodeConnKey`). LRU: a node that opens
/// more at once than this holds loses the oldest marks, never a connection of its own. A
/// mark is read once, when the SYN reaches the destination, so only connections being set up
/// at the same moment compete for room. An LRU map is preallocated: 4096 entries are ~0.5 MiB.
#[btf_map]
pub static NODE_CONNS: LruHashMap<NodeConnKey, u8, 4096> = LruHashMap::new();

// Telemetry: per-connection state and the events user space turns into metrics and access
// logs.
/// Each tracked connection's state, in a slot found from its socket cookie (see `ConnMeta`,
/// `conn_slot`).
#[btf_map]
pub static CONNS: Array<ConnMeta, { CONNS_SLOTS as usize }> = Array::new();
/// The service address a rewritten connection dialled, from connect() to sock_ops (see
/// `OrigHandoff`).
#[btf_map]
pub static ORIG_HANDOFF: Array<OrigHandoff, { HANDOFF_SLOTS as usize }> = Array::new();
#[btf_map]
pub static TELEMETRY: RingBuf<(), { 1024 * 1024 }> = RingBuf::new();
/// Short connections' counts summed by peers and epoch, per CPU, instead of a record each
/// (`TFLAG_TALLY`, see `TallyKey`). Entries are allocated on use; the daemon takes them out.
#[btf_map]
pub static TALLIES: PerCpuHashMap<TallyKey, TallyCounts, { TALLY_ENTRIES as usize }, NO_PREALLOC> =
    PerCpuHashMap::new();
/// Unconnected UDP sockets: the backend chosen per frontend, for later datagrams and for the
/// source of replies (see `UdpRev`).
#[btf_map]
pub static UDP_REV: SkStorage<UdpRev> = SkStorage::new();
/// Written by the daemon: telemetry on/off and report interval, the node's namespace, the
/// DNS proxies' port (`TCONF_*`).
#[btf_map]
pub static TELEMETRY_CONF: Array<u64, { TCONF_COUNT as usize }> = Array::new();

// DNS proxy (see `dns`).
/// Namespaces whose pods' DNS queries go to the daemon's proxy in the namespace (one per pod
/// on this node: far more room than a node has pods).
#[btf_map]
pub static DNS_PODS: HashMap<u64, DnsPodValue, 16384, NO_PREALLOC> = HashMap::new();
/// The resolver each redirected query was for, keyed by how the proxy sees the pod's socket.
/// LRU: a socket forgotten here gets SERVFAIL for a forwarded name, never another's answer.
/// An entry is needed only until the proxy reads the query (or accepts the TCP connection),
/// so the queries in flight on the node compete for room; preallocated, 8192 are ~0.9 MiB.
#[btf_map]
pub static DNS_ORIG: LruHashMap<DnsOrigKey, DnsOrig, 8192> = LruHashMap::new();
/// A TCP socket's resolver, until sock_ops knows the socket's local port.
#[btf_map]
pub static DNS_TCP: SkStorage<DnsOrig> = SkStorage::new();

// Waypoints (see `waypoint` and kmesh_common).
/// A connection connect() sent to a waypoint, until its PROXY header is sent.
#[btf_map]
pub static WP_CONN: SkStorage<WaypointConn> = SkStorage::new();
/// Established waypoint connections, by socket cookie: the sk_msg program that writes their
/// header is attached to this map. A socket leaves it when it closes.
#[btf_map]
pub static WAYPOINT_SOCKS: SockHash<u64, 65536> = SockHash::new();
/// The identity TLV slot of each enrolled namespace's pods (written by the daemon).
#[btf_map]
pub static PP_IDENT: HashMap<u64, PpSlot, 16384, NO_PREALLOC> = HashMap::new();
/// The hostname TLV slot of each frontend with a waypoint (written by the daemon).
#[btf_map]
pub static PP_HOST: HashMap<FrontendKey, PpSlot, 65536, NO_PREALLOC> = HashMap::new();
