//! The compiler: a pure function from the model (plus enrolled clients) to the exact contents of
//! every BPF map, and a diff between two such contents ordered make-before-break.
//!
//! Decisions that can be made ahead of time live here, not in the kernel: which workloads are
//! healthy enough to receive traffic, which locality level each endpoint has for each client
//! locality class, the weights, and the per-workload target ports.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use kmesh_common::*;
use serde::Serialize;

use crate::model::*;
use kmesh_model::delta::ModelChange;
use kmesh_model::repack;
use std::sync::Arc;

/// The full contents of the maps that the daemon owns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub netns: BTreeMap<u64, NetnsValue>,
    pub frontends: BTreeMap<FrontendKey, FrontendValue>,
    pub tables: BTreeMap<TableKey, TableValue>,
    pub endpoints: BTreeMap<EndpointKey, EndpointValue>,
    pub backends: BTreeMap<u32, BackendValue>,
    pub ports: BTreeMap<PortKey, PortValue>,
}

/// Entry counts of each map, in the order the maps are listed in [`MapState`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MapCounts {
    pub netns: usize,
    pub frontends: usize,
    pub tables: usize,
    pub endpoints: usize,
    pub backends: usize,
    pub ports: usize,
}

impl MapCounts {
    /// Each map's count, the larger of the two.
    pub fn max(&self, o: &MapCounts) -> MapCounts {
        MapCounts {
            netns: self.netns.max(o.netns),
            frontends: self.frontends.max(o.frontends),
            tables: self.tables.max(o.tables),
            endpoints: self.endpoints.max(o.endpoints),
            backends: self.backends.max(o.backends),
            ports: self.ports.max(o.ports),
        }
    }

    pub fn as_array(&self) -> [(&'static str, usize); 6] {
        let n = [self.netns, self.frontends, self.tables, self.endpoints, self.backends, self.ports];
        std::array::from_fn(|i| (LB_MAP_NAMES[i], n[i]))
    }
}

/// How many keys two states hold together (the peak of a make-before-break transition).
pub fn union_len<K: Ord, V>(a: &BTreeMap<K, V>, b: &BTreeMap<K, V>) -> usize {
    a.len() + b.keys().filter(|k| !a.contains_key(k)).count()
}

/// The entries of `next` that `old` lacks or holds with another value.
pub fn changed_entries<K: Ord + Copy, V: PartialEq + Copy>(
    old: &BTreeMap<K, V>,
    next: &BTreeMap<K, V>,
) -> BTreeMap<K, V> {
    next.iter().filter(|(k, v)| old.get(*k) != Some(*v)).map(|(k, v)| (*k, *v)).collect()
}

/// The key of slot `index` at `level` of a table's `generation`.
pub fn slot_key(t: &TableKey, generation: u32, level: u8, index: u32) -> EndpointKey {
    EndpointKey {
        service_id: t.service_id,
        class_id: t.class_id,
        generation,
        family: t.family,
        level,
        _pad: 0,
        index,
    }
}

impl MapState {
    /// Where a table's slots lead, level by level: the backend address of each slot, `None`
    /// for a slot or backend that is missing (what a connect() following the table can reach).
    pub fn table_levels(&self, tk: &TableKey, t: &TableValue) -> Vec<Vec<Option<[u32; 4]>>> {
        (0..LEVELS)
            .map(|level| {
                (0..t.counts[level])
                    .map(|index| {
                        self.endpoints.get(&slot_key(tk, t.generation, level as u8, index)).map(|e| e.addr)
                    })
                    .collect()
            })
            .collect()
    }

    /// Takes `d` in: what a map holds after `d` was written to it.
    pub fn apply(&mut self, d: Diff) {
        fn take<K: Ord, V>(m: &mut BTreeMap<K, V>, set: BTreeMap<K, V>) {
            if m.is_empty() {
                // A first push: the written entries are the map.
                *m = set;
                return;
            }
            let n = set.len();
            m.extend(set);
            // A full push's entries arrive in key order (see `kmesh_model::repack`).
            if repack::worth_it(n, m.len()) {
                repack::map(m);
            }
        }
        take(&mut self.netns, d.set.netns);
        take(&mut self.frontends, d.set.frontends);
        take(&mut self.tables, d.set.tables);
        take(&mut self.endpoints, d.set.endpoints);
        take(&mut self.backends, d.set.backends);
        take(&mut self.ports, d.set.ports);
        for k in &d.del_netns {
            self.netns.remove(k);
        }
        for k in &d.del_frontends {
            self.frontends.remove(k);
        }
        for k in &d.del_tables {
            self.tables.remove(k);
        }
        for k in &d.del_endpoints {
            self.endpoints.remove(k);
        }
        for k in &d.del_backends {
            self.backends.remove(k);
        }
        for k in &d.del_ports {
            self.ports.remove(k);
        }
    }

    pub fn counts(&self) -> MapCounts {
        MapCounts {
            netns: self.netns.len(),
            frontends: self.frontends.len(),
            tables: self.tables.len(),
            endpoints: self.endpoints.len(),
            backends: self.backends.len(),
            ports: self.ports.len(),
        }
    }

    /// Entries each map holds at the peak of a make-before-break transition from `self` to
    /// `next`: everything old is still there when everything new has been written.
    pub fn peak_counts(&self, next: &MapState) -> MapCounts {
        MapCounts {
            netns: union_len(&self.netns, &next.netns),
            frontends: union_len(&self.frontends, &next.frontends),
            tables: union_len(&self.tables, &next.tables),
            endpoints: union_len(&self.endpoints, &next.endpoints),
            backends: union_len(&self.backends, &next.backends),
            ports: union_len(&self.ports, &next.ports),
        }
    }
}

/// A quick estimate of the load-balancing peaks a full compilation of `model` over `prev`
/// reaches, from the model's sizes alone (a frontend per service address and port, a table
/// per service, an endpoint and a backend per membership of a workload with an address): what
/// maps to grow before the compilation has said exactly (see `kernel::Ahead::Guess`).
/// Hash rings and locality classes make more entries, so it is a guess, never a limit.
pub fn expected_peaks(model: &Model, prev: &MapState) -> MapCounts {
    let new = expected_counts(
        model.workloads.values().map(|w| w.as_ref()),
        model.services.values().map(|s| s.as_ref()),
    );
    new.max(&prev.counts())
}

/// What these workloads and services alone fill the maps with, by the guess of
/// [`expected_peaks`].
pub fn expected_counts<'a>(
    workloads: impl Iterator<Item = &'a Workload>,
    services: impl Iterator<Item = &'a Service>,
) -> MapCounts {
    let mut n = MapCounts::default();
    // Services with a UDP port: only their backends have `BACKENDS` entries.
    let mut udp = std::collections::HashSet::new();
    for svc in services {
        if svc.load_balancing.mode != LbMode::Passthrough {
            n.frontends += svc.addresses.len() * svc.ports.len();
            n.tables += usize::from(!svc.addresses.is_empty() && !svc.ports.is_empty());
            if svc.ports.iter().any(|p| p.protocol == Protocol::Udp) {
                udp.insert(svc.key());
            }
        }
    }
    for w in workloads.filter(|w| !w.addresses.is_empty()) {
        n.endpoints += w.services.len();
        if !udp.is_empty() {
            n.backends += w.services.keys().filter(|k| udp.contains(k.as_str())).count();
        }
    }
    n
}

/// Stable ids for names, so that unchanged entries keep their keys across compilations.
/// Ids only grow (wrapping at u32::MAX, skipping ids in use): an id freed by one compilation
/// is never handed out while entries of the previous state may still use it.
#[derive(Clone, Debug)]
pub struct IdPool<K: Ord> {
    ids: BTreeMap<K, u32>,
    in_use: BTreeSet<u32>,
    /// Ids found in maps adopted from an earlier run, whose names are unknown: never handed
    /// out until the entries using them are gone.
    reserved: BTreeSet<u32>,
    next: u32,
}

impl<K: Ord> Default for IdPool<K> {
    fn default() -> Self {
        Self { ids: BTreeMap::new(), in_use: BTreeSet::new(), reserved: BTreeSet::new(), next: 1 }
    }
}

impl<K: Ord + Clone> IdPool<K> {
    pub fn get<Q: Ord + ?Sized>(&self, k: &Q) -> Option<u32>
    where
        K: std::borrow::Borrow<Q>,
    {
        self.ids.get(k).copied()
    }

    pub fn get_or_alloc(&mut self, k: &K) -> u32 {
        // One search: the entry is made where the lookup ended.
        let slot = match self.ids.entry(k.clone()) {
            std::collections::btree_map::Entry::Occupied(e) => return *e.get(),
            std::collections::btree_map::Entry::Vacant(v) => v,
        };
        while self.next == 0 || self.in_use.contains(&self.next) || self.reserved.contains(&self.next) {
            self.next = self.next.wrapping_add(1);
        }
        let id = self.next;
        self.next = self.next.wrapping_add(1);
        slot.insert(id);
        self.in_use.insert(id);
        id
    }

    /// Gives `k` the id `id` if nothing holds it (an id adopted from an earlier run whose owner
    /// is now known). Returns false, changing nothing, when `k` has an id or `id` is taken.
    pub fn claim(&mut self, k: &K, id: u32) -> bool {
        if id == 0 || self.ids.contains_key(k) || self.in_use.contains(&id) {
            return false;
        }
        self.ids.insert(k.clone(), id);
        self.in_use.insert(id);
        true
    }

    /// Gives `k` the id `id` found in maps adopted from an earlier run (a reserved id), now
    /// that content shows `k` owned it: its entries keep their keys and need no rewrite.
    /// Returns false, changing nothing, when `id` is not reserved, is taken, or `k` has an id.
    pub fn adopt(&mut self, k: &K, id: u32) -> bool {
        if !self.reserved.contains(&id) || !self.claim(k, id) {
            return false;
        }
        self.reserved.remove(&id);
        true
    }

    /// Whether ids adopted from an earlier run are still waiting for their owners.
    pub fn adopting(&self) -> bool {
        !self.reserved.is_empty()
    }

    /// Like [`get_or_alloc`](Self::get_or_alloc), but a new name takes `preferred` (or the
    /// first id after it) when free, so that its id is a function of the name alone and a
    /// restarted daemon finds the same one; an id adopted from an earlier run on that path is
    /// taken as this name's own.
    pub fn get_or_alloc_preferring(&mut self, k: &K, preferred: u32) -> u32 {
        if let Some(id) = self.ids.get(k) {
            return *id;
        }
        let mut id = preferred;
        while id == 0 || self.in_use.contains(&id) {
            id = id.wrapping_add(1);
        }
        self.reserved.remove(&id);
        self.ids.insert(k.clone(), id);
        self.in_use.insert(id);
        id
    }

    /// Forgets every name not in `keep`.
    pub fn retain(&mut self, keep: &BTreeSet<K>) {
        let in_use = &mut self.in_use;
        self.ids.retain(|k, id| {
            let keep = keep.contains(k);
            if !keep {
                in_use.remove(id);
            }
            keep
        });
    }

    /// Forgets every name whose id is not in `keep` (sorted).
    pub fn retain_ids(&mut self, keep: &[u32]) {
        let in_use = &mut self.in_use;
        self.ids.retain(|_, id| {
            let keep = keep.binary_search(id).is_ok();
            if !keep {
                in_use.remove(id);
            }
            keep
        });
    }

    /// Rebuilds the indexes with full nodes when they are large (after a full compilation,
    /// which fills them in key order).
    pub fn repack(&mut self) {
        if repack::worth_it(self.ids.len(), self.ids.len()) {
            repack::map(&mut self.ids);
            repack::set(&mut self.in_use);
        }
    }

    /// Forgets one name.
    pub fn release<Q: Ord + ?Sized>(&mut self, k: &Q)
    where
        K: std::borrow::Borrow<Q>,
    {
        if let Some(id) = self.ids.remove(k) {
            self.in_use.remove(&id);
        }
    }

    /// Keeps ids of unknown owners out of circulation (see `reserved`).
    pub fn reserve(&mut self, ids: impl IntoIterator<Item = u32>) {
        self.reserved.extend(ids);
    }

    /// Returns the reserved ids to circulation once no entry uses them any more.
    pub fn release_reserved(&mut self) {
        self.reserved.clear();
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &u32)> {
        self.ids.iter()
    }
}

/// The ids the compiler hands out: services, backends (one per workload address) and client
/// locality classes (class 0 is always the node's own locality).
#[derive(Clone, Debug, Default)]
pub struct Ids {
    /// By service key (the model's shared copy) or route key.
    pub services: IdPool<Istr>,
    pub backends: IdPool<BackendKey>,
    pub classes: IdPool<ClientLocality>,
}

impl Ids {
    /// Ids pool for a daemon that adopted `state` from an earlier run: every id in it is
    /// reserved, so that no new name is given an id that old entries still use.
    pub fn adopting(state: &MapState) -> Self {
        let mut ids = Ids::default();
        let svc = state
            .frontends
            .values()
            .map(|v| v.service_id)
            .chain(state.tables.keys().map(|k| k.service_id))
            .chain(state.endpoints.keys().map(|k| k.service_id))
            .chain(state.ports.keys().map(|k| k.service_id));
        ids.services.reserve(svc);
        let be = state
            .backends
            .keys()
            .copied()
            .chain(state.endpoints.values().map(|v| v.backend_id))
            .chain(state.ports.keys().map(|k| k.backend_id));
        ids.backends.reserve(be);
        let cl = state.netns.values().map(|v| v.class_id).chain(state.tables.keys().map(|k| k.class_id));
        ids.classes.reserve(cl);
        ids
    }

    pub fn release_reserved(&mut self) {
        self.services.release_reserved();
        self.backends.release_reserved();
        self.classes.release_reserved();
    }
}

/// A network namespace in the mesh, and the workload whose pod it is, when known.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Enrollment {
    pub workload: Option<String>,
}

/// Encodes an address in the 16-byte `user_ip6` layout used by every key and value.
pub fn addr_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

/// Decodes [`addr_words`]; v4-mapped addresses come back as IPv4.
pub fn words_addr(a: [u32; 4]) -> IpAddr {
    if is_v4_mapped(&a) {
        return IpAddr::V4(std::net::Ipv4Addr::from(a[3].to_ne_bytes()));
    }
    let mut o = [0u8; 16];
    for (i, w) in a.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    IpAddr::V6(std::net::Ipv6Addr::from(o))
}

pub(crate) fn family_of(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 }
}

fn proto_of(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
    }
}

/// Does this service's load balancing depend on where the client is?
pub fn is_locality_aware(lb: &LoadBalancing) -> bool {
    matches!(lb.mode, LbMode::Strict | LbMode::Failover) && !lb.routing_preference.is_empty()
}

/// The locality level of endpoint `w` for a client, or `None` when STRICT excludes it.
/// Level 0 matches every preferred scope; each level down drops the least preferred one.
pub fn endpoint_level(lb: &LoadBalancing, client: &ClientLocality, w: &Workload) -> Option<u8> {
    if !is_locality_aware(lb) {
        // Envoy's priorities (0 from the workload API): the lowest that has endpoints is used.
        return Some(w.priority.min(LEVELS as u8 - 1));
    }
    let n = lb.routing_preference.len();
    let matched = lb.routing_preference.iter().take_while(|s| client.matches(w, **s)).count();
    match lb.mode {
        LbMode::Strict if matched < n => None,
        _ => Some((n - matched) as u8),
    }
}

/// Scales weights so that every level's sum fits in 32 bits with room to spare.
fn weight_of(w: &Workload) -> u32 {
    w.capacity().unwrap_or(1).clamp(1, crate::config::MAX_CAPACITY)
}

struct Member<'a> {
    workload: &'a Workload,
    backend_id: u32,
}

/// The endpoints of one level as the hash tables name them (by workload uid).
fn hash_members<'a>(members: &'a [Member<'_>], level: &[(u32, u32)]) -> Vec<hash::Member<'a>> {
    let names: BTreeMap<u32, &str> =
        members.iter().map(|m| (m.backend_id, m.workload.uid.as_str())).collect();
    level
        .iter()
        .filter_map(|(id, w)| Some(hash::Member { backend_id: *id, weight: *w, name: names.get(id)? }))
        .collect()
}

/// Backends are per service (`(service id, workload uid, address family)`), so that every map
/// entry belongs to exactly one service and a service can be recompiled alone. A workload is
/// one backend of a service per family (its first address of that family); the address is the
/// backend's value, not part of its name (16 bytes a key, not 32: there is one per endpoint).
pub type BackendKey = (u32, Istr, u8);

/// The compiler's memory between compilations: the entries of each service and the index of
/// which workloads back it, so that a change to a few workloads or services recompiles only the
/// services they touch.
#[derive(Clone, Debug, Default)]
pub struct Compiler {
    pub ids: Ids,
    /// Service key -> uids of the workloads that list it.
    members: BTreeMap<Istr, Uids>,
    /// Client locality classes (0: the node).
    classes: BTreeMap<u32, ClientLocality>,
    /// Workloads whose locality defines a class (enrolled clients).
    class_workloads: BTreeSet<String>,
    /// Service key -> the entries compiled for it.
    /// Keyed by the model's copy of the service key (workload fragments and routes by their
    /// own), not a `String` per service.
    fragments: BTreeMap<Istr, Fragment>,
    netns: BTreeMap<u64, NetnsValue>,
    /// Frontend -> the services whose fragments claim it. Two services may claim one address
    /// and port (two control-plane objects naming the same VIP): the one whose key
    /// (`namespace/hostname`) sorts first owns it, in a full compilation and an incremental one
    /// alike, and the others are reported as conflicts.
    claims: BTreeMap<FrontendKey, Owners>,
    /// The frontends more than one service claims (kept in step with `claims`, so that
    /// reporting conflicts does not walk every frontend on every change).
    contested: BTreeSet<FrontendKey>,
    /// During the first compilation after a restart: the backend ids the adopted maps hold, by
    /// (service id, address), for their owners to take back.
    adoptable_backends: BTreeMap<(u32, [u32; 4]), Vec<u32>>,
    /// Waypoint routes (see [`route_key`]): what each one resolved through and to.
    routes: BTreeMap<String, RouteInfo>,
    /// What a waypoint route resolves through -> the routes that did (recompiled when it
    /// changes).
    route_deps: BTreeMap<WaypointDep, BTreeSet<String>>,
    /// Workloads that are endpoints of some waypoint route, with how many routes use them:
    /// their namespaces' own connections are never sent to a waypoint.
    waypoint_uids: BTreeMap<Istr, u32>,
    /// The workload of each enrolled namespace that has one (for the `NS_F_WAYPOINT` flag).
    enrolled_uids: BTreeMap<u64, String>,
    /// Endpoint addresses ejected by outlier detection: left out of the tables of services
    /// with outlier detection (every service when `eject_everywhere`, the node's default).
    pub ejected: BTreeSet<IpAddr>,
    pub eject_everywhere: bool,
    /// A full compilation filled the indexes in key order since the last [`tidy`](Self::tidy).
    untidy: bool,
}

/// Each service key the workloads of `model` list, in key order, with those workloads in uid
/// order: what a full compilation walks alongside the services, so that it looks up no
/// workload by uid (a search by string in a map of every workload).
fn members_by_service(model: &Model) -> Vec<(&Istr, Vec<&Workload>)> {
    // (service, workload) pairs come out in uid order; a stable sort by service keeps it.
    let mut pairs: Vec<(&Istr, &Workload)> =
        model.workloads.values().flat_map(|w| w.services.keys().map(move |k| (k, w.as_ref()))).collect();
    pairs.sort_by(|a, b| a.0.cmp(b.0));
    pairs.chunk_by(|a, b| a.0 == b.0).map(|g| (g[0].0, g.iter().map(|(_, w)| *w).collect())).collect()
}

/// The uids of the workloads listing one service, sorted: a vector (8 bytes a member), not a
/// `BTreeSet` (a node of about 100 bytes for the one member most services have).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Uids(Vec<Istr>);

impl Uids {
    /// Every service's members in `model` (see [`members_by_service`]), each vector exactly
    /// sized.
    fn index(groups: &[(&Istr, Vec<&Workload>)]) -> BTreeMap<Istr, Uids> {
        // Sorted and distinct: built at once.
        groups
            .iter()
            .map(|(k, ws)| ((*k).clone(), Uids(ws.iter().map(|w| w.uid.clone()).collect())))
            .collect()
    }

    fn insert(&mut self, uid: &Istr) {
        if let Err(i) = self.0.binary_search(uid) {
            self.0.insert(i, uid.clone());
        }
    }

    fn remove(&mut self, uid: &str) {
        if let Ok(i) = self.0.binary_search_by(|u| u.as_str().cmp(uid)) {
            self.0.remove(i);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a Uids {
    type Item = &'a Istr;
    type IntoIter = std::slice::Iter<'a, Istr>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// The services claiming one frontend, in key order (the first owns it): nearly always one, so
/// a sorted vector, not a `BTreeSet` node per frontend.
type Owners = kmesh_model::vecmap::VecMap<Istr, ()>;

/// The values of a full compilation's fragments, gathered as they are compiled, to build the
/// full map state at once (the fragments keep only keys). Each fragment is shown to `sink`
/// first.
struct Gathered<'s> {
    tables: Vec<(TableKey, TableValue)>,
    endpoints: Vec<(EndpointKey, EndpointValue)>,
    backends: Vec<(u32, BackendValue)>,
    ports: Vec<(PortKey, PortValue)>,
    sink: &'s mut dyn FnMut(&Piece),
}

impl<'s> Gathered<'s> {
    /// Room for `expected` entries (see [`expected_counts`]), so that 100k slots are not
    /// moved by each doubling of their vector.
    fn new(sink: &'s mut dyn FnMut(&Piece), expected: MapCounts) -> Self {
        Gathered {
            tables: Vec::with_capacity(expected.tables),
            endpoints: Vec::with_capacity(expected.endpoints),
            backends: Vec::with_capacity(expected.backends),
            ports: Vec::new(),
            sink,
        }
    }

    /// Takes `p`'s values (leaving it empty, its vectors kept for the next service) and
    /// returns its fragment.
    fn keep(&mut self, p: &mut Piece) -> Fragment {
        (self.sink)(p);
        let f = Fragment::keys_of(p);
        self.tables.append(&mut p.tables);
        self.endpoints.append(&mut p.endpoints);
        self.backends.append(&mut p.backends);
        self.ports.append(&mut p.ports);
        p.clear();
        f
    }
}

/// The backend ids of `prev` by the service whose slots use them and their address.
fn adoptable_backends(prev: &MapState) -> BTreeMap<(u32, [u32; 4]), Vec<u32>> {
    let mut out: BTreeMap<(u32, [u32; 4]), Vec<u32>> = BTreeMap::new();
    for (k, e) in &prev.endpoints {
        let ids = out.entry((k.service_id, e.addr)).or_default();
        if !ids.contains(&e.backend_id) {
            ids.push(e.backend_id);
        }
    }
    out
}

/// A frontend two or more services claim, and which of them owns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FrontendConflict {
    pub frontend: String,
    pub owner: String,
    pub ignored: Vec<String>,
}

impl Compiler {
    pub fn with_ids(ids: Ids) -> Self {
        Self { ids, ..Default::default() }
    }

    /// Rebuilds the indexes a full compilation filled in key order, whose B-tree nodes that
    /// order left half empty (see `kmesh_model::repack`). Memory, not correctness: the mesh
    /// does it once the push is acknowledged.
    pub fn tidy(&mut self) {
        if !std::mem::take(&mut self.untidy) {
            return;
        }
        self.ids.services.repack();
        self.ids.backends.repack();
        if repack::worth_it(self.fragments.len(), self.fragments.len()) {
            repack::map(&mut self.members);
            repack::map(&mut self.fragments);
            repack::map(&mut self.claims);
        }
    }

    /// Compiles everything. `prev` is what the maps hold now: a table whose slots did not change
    /// keeps its generation, a changed one gets the next generation so that it can be switched
    /// to atomically.
    pub fn full(&mut self, model: &Model, enrolled: &BTreeMap<u64, Enrollment>, prev: &MapState) -> MapState {
        self.full_with(model, enrolled, prev, &mut |_| {})
    }

    /// [`full`](Self::full), showing `sink` each service's (and route's) entries as soon as
    /// they are compiled: what the full state will hold, in pieces (see
    /// `Dataplane::compile_prewriting`).
    pub fn full_with(
        &mut self,
        model: &Model,
        enrolled: &BTreeMap<u64, Enrollment>,
        prev: &MapState,
        sink: &mut dyn FnMut(&Piece),
    ) -> MapState {
        // Client locality classes: class 0 is the node; every other distinct client locality of
        // an enrolled workload gets its own class.
        let node_loc = ClientLocality::of_node(&model.node);
        self.classes = BTreeMap::from([(0, node_loc.clone())]);
        self.class_workloads.clear();
        self.netns.clear();
        let mut used_classes = BTreeSet::new();
        for (cookie, e) in enrolled {
            if let Some(uid) = &e.workload {
                self.class_workloads.insert(uid.clone());
            }
            let loc = e
                .workload
                .as_ref()
                .and_then(|uid| model.workloads.get(uid.as_str()))
                .map(|w| ClientLocality::of_workload(w));
            let class_id = match loc {
                Some(l) if l != node_loc => {
                    // After a restart: the class this namespace had, if nothing took it yet.
                    if let Some(v) = prev.netns.get(cookie) {
                        self.ids.classes.adopt(&l, v.class_id);
                    }
                    let id = self.ids.classes.get_or_alloc(&l);
                    used_classes.insert(l.clone());
                    self.classes.insert(id, l);
                    id
                }
                _ => 0,
            };
            self.netns.insert(*cookie, NetnsValue { class_id, flags: 0, check: 0 }.sealed(cookie));
        }
        self.ids.classes.retain(&used_classes);
        self.enrolled_uids = enrolled.iter().filter_map(|(c, e)| Some((*c, e.workload.clone()?))).collect();

        let groups = members_by_service(model);
        self.members = Uids::index(&groups);
        let mut groups = groups.iter().peekable();

        self.fragments.clear();
        self.adoptable_backends =
            if self.ids.backends.adopting() { adoptable_backends(prev) } else { Default::default() };
        let mut used_services = BTreeSet::new();
        // The backend ids this compilation hands out, to forget every other one at the end:
        // ids (sorted once), not their keys (a B-tree of 100k keys compared by uid).
        let mut used_backends: Vec<u32> = Vec::new();
        let mut route_owners = Vec::new();
        let expected = expected_counts(
            model.workloads.values().map(|w| w.as_ref()),
            model.services.values().map(|s| s.as_ref()),
        );
        let mut gathered = Gathered::new(sink, expected);
        let mut piece = Piece::default();
        for (key, svc) in &model.services {
            let members = kmesh_model::sorted::seek(&mut groups, key, |(k, _)| *k).map(|(_, ws)| &ws[..]);
            let mut used = |_: &BackendKey, id| used_backends.push(id);
            if self.compile_service(key, svc, prev, members.unwrap_or_default(), &mut used, &mut piece) {
                used_services.insert(key.clone());
                if piece.frontends.iter().any(|(_, v)| v.waypoint_id != 0) {
                    route_owners.push(key.clone());
                }
                self.fragments.insert(key.clone(), gathered.keep(&mut piece));
            }
        }
        for w in model.workloads.values().filter(|w| w.waypoint().is_some()) {
            let key = Istr::unique(&format!("{WORKLOAD_FRAGMENT}{}", w.uid));
            if let Some(mut frag) = self.compile_workload_frontends(w, prev) {
                route_owners.push(key.clone());
                self.fragments.insert(key, gathered.keep(&mut frag));
            }
        }
        self.claims.clear();
        for (key, f) in &self.fragments {
            for fk in f.frontend_keys() {
                self.claims.entry(fk).or_default().insert(key.clone(), ());
            }
        }
        self.contested = self.claims.iter().filter(|(_, o)| o.len() > 1).map(|(k, _)| *k).collect();
        // Waypoint routes, once every frontend is claimed (a waypoint given by address is
        // found by its VIP).
        self.routes.clear();
        self.route_deps.clear();
        self.waypoint_uids.clear();
        for owner in route_owners {
            let rk = route_key(&owner);
            if let Some((mut frag, info)) = self.compile_route(model, &owner, prev) {
                let rk_key = Istr::from(rk.as_str());
                used_services.insert(rk_key.clone());
                used_backends.extend(info.backends.iter().filter_map(|k| self.ids.backends.get(k)));
                self.index_route(&rk, &info, true);
                self.routes.insert(rk, info);
                self.fragments.insert(rk_key, gathered.keep(&mut frag));
            }
        }
        for (cookie, uid) in &self.enrolled_uids {
            if let Some(v) = self.netns.get_mut(cookie) {
                v.flags = if self.waypoint_uids.contains_key(uid.as_str()) { NS_F_WAYPOINT } else { 0 };
                *v = v.sealed(cookie);
            }
        }
        self.adoptable_backends.clear();
        self.ids.services.retain(&used_services);
        used_backends.sort_unstable();
        self.ids.backends.retain_ids(&used_backends);
        // Everything above was filled in key order: see `tidy`.
        self.untidy = true;
        self.state_of(gathered)
    }

    /// After a restart, gives `name` the id that `pick` reads from the adopted frontends of
    /// `svc`'s addresses and ports (the first one still reserved), so its entries need no
    /// rewrite.
    fn adopt_service_id(
        &mut self,
        name: &Istr,
        svc: &Service,
        prev: &MapState,
        pick: impl Fn(&FrontendValue) -> Option<u32>,
    ) {
        if self.ids.services.get(name).is_some() || !self.ids.services.adopting() {
            return;
        }
        for a in &svc.addresses {
            for p in &svc.ports {
                let fk = FrontendKey {
                    addr: addr_words(*a),
                    port: p.service_port.to_be(),
                    proto: proto_of(p.protocol),
                    _pad: 0,
                };
                if let Some(id) = prev.frontends.get(&fk).and_then(&pick)
                    && self.ids.services.adopt(name, id)
                {
                    return;
                }
            }
        }
    }

    /// The backend id of `bkey` (at `addr`), taking back the one adopted maps hold for it after
    /// a restart.
    fn backend_id(&mut self, bkey: &BackendKey, addr: IpAddr) -> u32 {
        if let Some(ids) = self.adoptable_backends.get(&(bkey.0, addr_words(addr)))
            && self.ids.backends.get(bkey).is_none()
        {
            for id in ids {
                if self.ids.backends.adopt(bkey, *id) {
                    break;
                }
            }
        }
        self.ids.backends.get_or_alloc(bkey)
    }

    /// The value of frontend `k`: its owner's.
    fn resolve(&self, k: &FrontendKey) -> Option<FrontendValue> {
        let owner = self.claims.get(k)?.keys().next()?;
        self.fragments.get(owner)?.frontend(k)
    }

    /// The key of the service (or workload fragment) that owns frontend `k`.
    pub fn frontend_owner(&self, k: &FrontendKey) -> Option<&Istr> {
        self.claims.get(k)?.keys().next()
    }

    /// Frontends claimed by more than one service.
    pub fn conflicts(&self) -> Vec<FrontendConflict> {
        self.contested
            .iter()
            .filter_map(|k| Some((k, self.claims.get(k)?)))
            .map(|(k, owners)| {
                let proto = if k.proto == PROTO_UDP { "UDP" } else { "TCP" };
                let mut it = owners.keys().map(|k| k.to_string());
                FrontendConflict {
                    frontend: format!(
                        "{}/{proto}",
                        std::net::SocketAddr::new(words_addr(k.addr), u16::from_be(k.port))
                    ),
                    owner: it.next().unwrap_or_default(),
                    ignored: it.collect(),
                }
            })
            .collect()
    }

    /// The full map contents: the union of every service's entries (their values `gathered`)
    /// and the enrolled namespaces.
    fn state_of(&self, gathered: Gathered<'_>) -> MapState {
        let Gathered { tables, endpoints, backends, ports, .. } = gathered;
        // Each map built at once (sorted, full nodes), not inserted into; the slots, as many
        // as the rest together, on a second thread when there are many.
        let slots = |e: Vec<(EndpointKey, EndpointValue)>| e.into_iter().collect::<BTreeMap<_, _>>();
        let rest = || {
            let frontends = self.claims.keys().filter_map(|k| Some((*k, self.resolve(k)?))).collect();
            (
                frontends,
                tables.into_iter().collect(),
                backends.into_iter().collect(),
                ports.into_iter().collect(),
            )
        };
        let (endpoints, (frontends, tables, backends, ports)) = if endpoints.len() >= 16_384 {
            std::thread::scope(|s| {
                let e = s.spawn(|| slots(endpoints));
                let r = rest();
                (e.join().unwrap_or_else(|p| std::panic::resume_unwind(p)), r)
            })
        } else {
            (slots(endpoints), rest())
        };
        MapState { netns: self.netns.clone(), frontends, tables, endpoints, backends, ports }
    }

    /// What the compiler says the maps hold, with the values `applied` holds: equal to
    /// `applied` unless the compiler's bookkeeping of which entries are whose drifted.
    #[cfg(test)]
    fn state_with(&self, applied: &MapState) -> MapState {
        let mut none = |_: &Piece| {};
        let mut g = Gathered::new(&mut none, MapCounts::default());
        for f in self.fragments.values() {
            g.keep(&mut Piece::of_state(&f.expand(applied)));
        }
        self.state_of(g)
    }

    /// Recompiles only the services `change` touched in `new`, or whose workloads it touched
    /// (before or after), and returns what to write and delete. Returns `None` when a full
    /// compilation is needed: the node changed, or a workload that gives an enrolled client its
    /// locality changed. Costs what the change touches, not what the model holds.
    pub fn incremental(&mut self, new: &Model, change: &ModelChange, applied: &MapState) -> Option<Diff> {
        if change.node.is_some() {
            return None;
        }
        let changed_w = &change.workloads;
        if changed_w.keys().any(|uid| self.class_workloads.contains(uid.as_str())) {
            return None;
        }
        let mut affected: BTreeSet<Istr> = change.services.keys().cloned().collect();
        // What waypoint routes may have resolved through (recompiled below).
        let mut deps: BTreeSet<WaypointDep> = BTreeSet::new();
        for (k, old) in &change.services {
            deps.insert(WaypointDep::Service(k.to_string()));
            for svc in [old.as_ref(), new.services.get(k)].into_iter().flatten() {
                deps.extend(svc.addresses.iter().map(|a| WaypointDep::Addr(*a)));
            }
        }
        for (uid, old) in changed_w {
            for w in [old.as_ref(), new.workloads.get(uid)].into_iter().flatten() {
                affected.extend(w.services.keys().cloned());
                deps.extend(w.services.keys().map(|k| WaypointDep::Service(k.to_string())));
                deps.extend(w.addresses.iter().map(|a| WaypointDep::Addr(*a)));
                if w.waypoint().is_some() {
                    affected.insert(Istr::unique(&format!("{WORKLOAD_FRAGMENT}{uid}")));
                }
            }
        }
        // Backend keys each affected service may hold now, before the index changes.
        let old_backends: BTreeMap<Istr, BTreeSet<BackendKey>> = affected
            .iter()
            .map(|k| (k.clone(), self.backend_keys(|uid| change.old_workload(new, uid), k)))
            .collect();
        for (uid, old) in changed_w {
            if let Some(w) = old {
                for key in w.services.keys() {
                    if let Some(set) = self.members.get_mut(key.as_str()) {
                        set.remove(uid);
                    }
                }
            }
            if let Some(w) = new.workloads.get(uid) {
                for key in w.services.keys() {
                    self.members.entry(key.clone()).or_default().insert(uid);
                }
            }
        }
        let mut d = Diff::default();
        // Frontends are resolved across services (see `claims`): what the affected services
        // claimed before and claim after is compared owner by owner, not service by service.
        let mut touched: BTreeSet<FrontendKey> = BTreeSet::new();
        for key in &affected {
            if let Some(f) = self.fragments.get(key) {
                touched.extend(f.frontend_keys());
            }
        }
        let before: BTreeMap<FrontendKey, FrontendValue> =
            touched.iter().filter_map(|k| Some((*k, self.resolve(k)?))).collect();
        let affected_owners = affected.clone();
        for key in affected {
            let prev = self.fragments.remove(&key).map(|f| f.expand(applied)).unwrap_or_default();
            for fk in prev.frontends.keys() {
                if let Some(c) = self.claims.get_mut(fk) {
                    c.remove(key.as_str());
                    if c.is_empty() {
                        self.claims.remove(fk);
                    }
                }
            }
            let mut used_backends = BTreeSet::new();
            let next = match key.strip_prefix(WORKLOAD_FRAGMENT) {
                Some(uid) => new.workloads.get(uid).and_then(|w| self.compile_workload_frontends(w, &prev)),
                None => match new.services.get(key.as_str()) {
                    Some(svc) => {
                        let members = self.member_workloads(new, &key);
                        let mut piece = Piece::default();
                        let mut used = |k: &BackendKey, _| {
                            used_backends.insert(k.clone());
                        };
                        self.compile_service(&key, svc, &prev, &members, &mut used, &mut piece)
                            .then_some(piece)
                    }
                    None => None,
                },
            };
            for k in old_backends[&key].difference(&used_backends) {
                self.ids.backends.release(k);
            }
            if next.is_none() {
                self.ids.services.release(&key);
            }
            let next = next.unwrap_or_default();
            for (fk, _) in &next.frontends {
                touched.insert(*fk);
                self.claims.entry(*fk).or_default().insert(key.clone(), ());
            }
            d.merge(diff(&prev, &next.to_state()));
            if !next.is_empty() {
                self.fragments.insert(key.clone(), Fragment::keys_of(&next));
            }
            if self.members.get(key.as_str()).is_some_and(|m| m.is_empty()) {
                self.members.remove(key.as_str());
            }
        }
        // Waypoint routes: of the owners recompiled, and of every waypoint that resolved
        // through something the change touched.
        let mut routes: BTreeSet<String> = affected_owners
            .iter()
            .map(|k| route_key(k))
            .filter(|rk| self.routes.contains_key(rk) || self.ids.services.get(rk.as_str()).is_some())
            .collect();
        for dep in &deps {
            routes.extend(self.route_deps.get(dep).into_iter().flatten().cloned());
        }
        for rk in routes {
            let prev = self.fragments.remove(rk.as_str()).map(|f| f.expand(applied)).unwrap_or_default();
            let old = self.routes.remove(&rk).unwrap_or_default();
            self.index_route(&rk, &old, false);
            let owner = rk.strip_suffix("#waypoint").unwrap_or(&rk).to_string();
            let owns_route = self
                .fragments
                .get(owner.as_str())
                .is_some_and(|f| f.frontends().any(|(_, v)| v.waypoint_id != 0));
            let next = if owns_route { self.compile_route(new, &owner, &prev) } else { None };
            let (next, info) = match next {
                Some((p, info)) => (p, info),
                None => {
                    self.ids.services.release(rk.as_str());
                    (Piece::default(), RouteInfo::default())
                }
            };
            for k in old.backends.difference(&info.backends) {
                self.ids.backends.release(k);
            }
            d.merge(diff(&prev, &next.to_state()));
            if !next.is_empty() {
                self.index_route(&rk, &info, true);
                self.fragments.insert(Istr::from(rk.as_str()), Fragment::keys_of(&next));
                self.routes.insert(rk, info);
            }
        }
        // A namespace whose workload became (or stopped being) a waypoint endpoint.
        for (cookie, uid) in &self.enrolled_uids {
            let flags = if self.waypoint_uids.contains_key(uid.as_str()) { NS_F_WAYPOINT } else { 0 };
            if let Some(v) = self.netns.get_mut(cookie)
                && v.flags != flags
            {
                v.flags = flags;
                *v = v.sealed(cookie);
                d.set.netns.insert(*cookie, *v);
            }
        }
        d.set.frontends.clear();
        d.del_frontends.clear();
        for k in &touched {
            if self.claims.get(k).is_some_and(|o| o.len() > 1) {
                self.contested.insert(*k);
            } else {
                self.contested.remove(k);
            }
        }
        for k in touched {
            match (before.get(&k), self.resolve(&k)) {
                (Some(a), Some(b)) if *a == b => {}
                (_, Some(b)) => {
                    d.set.frontends.insert(k, b);
                }
                (Some(_), None) => d.del_frontends.push(k),
                (None, None) => {}
            }
        }
        Some(d)
    }

    /// What an enrollment change alone needs: only NETNS entries, when every namespace that
    /// comes or changes falls into a locality class that already has its tables, and every
    /// class a leaving namespace used stays in use. Returns `None` when a full compilation is
    /// needed (a new class needs its tables; a class left unused loses them).
    pub fn enrollment(
        &mut self,
        model: &Model,
        old: &BTreeMap<u64, Enrollment>,
        new: &BTreeMap<u64, Enrollment>,
    ) -> Option<Diff> {
        let node_loc = ClientLocality::of_node(&model.node);
        let class_of = |e: &Enrollment| -> Option<u32> {
            let loc = e
                .workload
                .as_ref()
                .and_then(|uid| model.workloads.get(uid.as_str()))
                .map(|w| ClientLocality::of_workload(w));
            match loc {
                None => Some(0),
                Some(l) if l == node_loc => Some(0),
                Some(l) => self.classes.iter().find(|(_, c)| **c == l).map(|(id, _)| *id),
            }
        };
        let mut d = Diff::default();
        let mut netns = self.netns.clone();
        for (cookie, e) in new {
            if old.get(cookie) == Some(e) {
                continue;
            }
            let class_id = class_of(e)?;
            let waypoint =
                e.workload.as_ref().is_some_and(|uid| self.waypoint_uids.contains_key(uid.as_str()));
            let flags = if waypoint { NS_F_WAYPOINT } else { 0 };
            let v = NetnsValue { class_id, flags, check: 0 }.sealed(cookie);
            netns.insert(*cookie, v);
            d.set.netns.insert(*cookie, v);
        }
        for cookie in old.keys().filter(|c| !new.contains_key(*c)) {
            netns.remove(cookie);
            d.del_netns.push(*cookie);
        }
        // Every class with tables must still be used by someone (class 0 always is).
        let used: BTreeSet<u32> = netns.values().map(|v| v.class_id).collect();
        if self.classes.keys().any(|id| *id != 0 && !used.contains(id)) {
            return None;
        }
        self.netns = netns;
        self.class_workloads = new.values().filter_map(|e| e.workload.clone()).collect();
        self.enrolled_uids = new.iter().filter_map(|(c, e)| Some((*c, e.workload.clone()?))).collect();
        Some(d)
    }

    /// The backend id keys a service may hold: its current members' addresses in `model`.
    fn backend_keys<'a>(
        &self,
        workload: impl Fn(&str) -> Option<&'a Arc<Workload>>,
        key: &str,
    ) -> BTreeSet<BackendKey> {
        let Some(sid) = self.ids.services.get(key) else { return BTreeSet::new() };
        self.members
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|uid| workload(uid))
            .flat_map(|w| w.addresses.iter().map(move |a| (sid, w.uid.clone(), family_of(a))))
            .collect()
    }

    /// The workloads listing service `key`, through the member index (a full compilation has
    /// them at hand: see [`members_by_service`]).
    fn member_workloads<'m>(&self, model: &'m Model, key: &str) -> Vec<&'m Workload> {
        let uids = self.members.get(key).into_iter().flatten();
        uids.filter_map(|uid| model.workloads.get(uid).map(|w| w.as_ref())).collect()
    }

    /// Compiles one service into `out` (emptied first); false, with `out` empty, when it has no
    /// frontends (passthrough, no address or port). `used_backend` hears of every backend it
    /// gives an id to (some may end up in no slot). `members` are the workloads listing the
    /// service (see [`member_workloads`]).
    ///
    /// [`member_workloads`]: Self::member_workloads
    fn compile_service(
        &mut self,
        key: &Istr,
        svc: &Service,
        prev: &MapState,
        members: &[&Workload],
        used_backend: &mut impl FnMut(&BackendKey, u32),
        out: &mut Piece,
    ) -> bool {
        out.clear();
        if svc.load_balancing.mode == LbMode::Passthrough || svc.addresses.is_empty() || svc.ports.is_empty()
        {
            return false;
        }
        // After a restart: the id the adopted frontends of this service's addresses carry.
        self.adopt_service_id(key, svc, prev, |v| Some(v.service_id));
        let service_id = self.ids.services.get_or_alloc(key);
        let lb = &svc.load_balancing;
        let locality = is_locality_aware(lb);
        // Connections to a service with a waypoint go through it (TCP: waypoints take TCP).
        let waypoint_id = if service_waypoints(svc).is_empty() {
            0
        } else {
            let rk = Istr::from(route_key(key).as_str());
            self.adopt_service_id(&rk, svc, prev, |v| Some(v.waypoint_id).filter(|id| *id != 0));
            self.ids.services.get_or_alloc(&rk)
        };

        for addr in &svc.addresses {
            for p in &svc.ports {
                let target = if p.target_port != 0 { p.target_port } else { p.service_port };
                let fk = FrontendKey {
                    addr: addr_words(*addr),
                    port: p.service_port.to_be(),
                    proto: proto_of(p.protocol),
                    _pad: 0,
                };
                let fv = FrontendValue {
                    service_id,
                    target_port: target.to_be(),
                    flags: if locality { FE_F_LOCALITY } else { 0 },
                    waypoint_id: if p.protocol == Protocol::Tcp { waypoint_id } else { 0 },
                    check: 0,
                };
                out.frontends.push((fk, fv.sealed(&fk)));
            }
        }

        let usable = |w: &&&Workload| {
            (w.status == HealthStatus::Healthy || lb.health_policy == HealthPolicy::AllowAll)
                && (self.ejected.is_empty()
                    || !(self.eject_everywhere || svc.outlier.is_some())
                    || !w.addresses.iter().any(|a| self.ejected.contains(a)))
        };
        let candidates: Vec<&Workload> = members.iter().filter(usable).copied().collect();

        // The families of the service's addresses, in order.
        const _: () = assert!(FAMILY_V4 < FAMILY_V6);
        let families = [FAMILY_V4, FAMILY_V6];
        let mut chosen: Vec<Member> = Vec::with_capacity(candidates.len());
        // Backend addresses by id, for the slots (sorted by id before the tables are made).
        let mut addrs: Vec<(u32, [u32; 4])> = Vec::with_capacity(candidates.len());
        // Only a UDP socket's sticky backend is checked against `BACKENDS` (see `UdpRev`).
        let udp = svc.ports.iter().any(|p| p.protocol == Protocol::Udp);
        let mut made = 0;
        for family in families.into_iter().filter(|f| svc.addresses.iter().any(|a| family_of(a) == *f)) {
            // One backend per workload: its first address of this family.
            chosen.clear();
            addrs.clear();
            for w in &candidates {
                let Some(addr) = w.addresses.iter().find(|a| family_of(a) == family) else { continue };
                let bkey = (service_id, w.uid.clone(), family);
                let backend_id = self.backend_id(&bkey, *addr);
                used_backend(&bkey, backend_id);
                if udp {
                    out.backends.push((
                        backend_id,
                        BackendValue { addr: addr_words(*addr), check: 0 }.sealed(&backend_id),
                    ));
                }
                addrs.push((backend_id, addr_words(*addr)));
                made += 1;
                chosen.push(Member { workload: w, backend_id });
                // Per-workload target ports that differ from the frontend's default.
                for p in &svc.ports {
                    let default = if p.target_port != 0 { p.target_port } else { p.service_port };
                    let mapped = w
                        .services
                        .get(key)
                        .and_then(|maps| maps.iter().find(|m| m.service_port == p.service_port))
                        .map(|m| m.target_port)
                        .filter(|t| *t != 0);
                    if let Some(t) = mapped.filter(|t| *t != default) {
                        let pk =
                            PortKey { service_id, backend_id, service_port: p.service_port.to_be(), _pad: 0 };
                        out.ports
                            .push((pk, PortValue { target_port: t.to_be(), _pad: 0, check: 0 }.sealed(&pk)));
                    }
                }
            }
            addrs.sort_unstable_by_key(|(id, _)| *id);
            let weighted = {
                let mut ws = chosen.iter().map(|m| weight_of(m.workload));
                let first = ws.next();
                ws.any(|w| Some(w) != first)
            };
            for (class_id, client) in self.classes.iter().filter(|(id, _)| locality || **id == 0) {
                let mut levels: [Vec<(u32, u32)>; LEVELS] = Default::default();
                for m in &chosen {
                    if let Some(level) = endpoint_level(lb, client, m.workload) {
                        levels[level as usize].push((m.backend_id, weight_of(m.workload)));
                    }
                }
                let tkey = TableKey { service_id, class_id: *class_id, family, _pad: [0; 3] };
                let strict = if lb.mode == LbMode::Strict && locality { TBL_F_STRICT } else { 0 };
                let (policy_flags, levels) = match lb.policy {
                    LbPolicy::Random => (0, levels),
                    LbPolicy::RoundRobin => (TBL_F_ROUND_ROBIN, levels),
                    LbPolicy::LeastRequest => (TBL_F_LEAST | TBL_F_COUNT, levels),
                    LbPolicy::RingHash(size) => (
                        TBL_F_HASH | TBL_F_RING,
                        levels.map(|l| hash::ring(&hash_members(&chosen, &l), size)),
                    ),
                    LbPolicy::Maglev(size) => (
                        TBL_F_HASH,
                        levels.map(|l| {
                            hash::maglev(&hash_members(&chosen, &l), size)
                                .into_iter()
                                .map(|b| (b, 1))
                                .collect()
                        }),
                    ),
                };
                let weighted = weighted && policy_flags & TBL_F_HASH == 0;
                let limit = svc.max_connections.unwrap_or(0);
                let count = if limit != 0 { TBL_F_COUNT } else { 0 };
                let flags = strict | policy_flags | count | if weighted { TBL_F_WEIGHTED } else { 0 };
                emit_table(out, prev, tkey, flags, &levels, &addrs, limit);
            }
        }
        out.settle();
        // Backends (and their port overrides) that no slot references, e.g. excluded by STRICT,
        // are not written.
        let mut referenced: Vec<u32> = out.endpoints.iter().map(|(_, e)| e.backend_id).collect();
        referenced.sort_unstable();
        referenced.dedup();
        // Every slot names a backend made above: as many ids as backends means all are used.
        if referenced.len() != made {
            out.backends.retain(|(id, _)| referenced.binary_search(id).is_ok());
            out.ports.retain(|(k, _)| referenced.binary_search(&k.backend_id).is_ok());
        }
        true
    }
}

/// Keys whose entries differ between two maps of shared entries (pointer-equal entries are
/// unchanged without comparing them).
/// Compiles the model and the enrolled namespaces into map contents from scratch (see
/// [`Compiler::full`]).
pub fn compile(
    model: &Model,
    enrolled: &BTreeMap<u64, Enrollment>,
    ids: &mut Ids,
    prev: &MapState,
) -> MapState {
    let mut c = Compiler::with_ids(std::mem::take(ids));
    let out = c.full(model, enrolled, prev);
    *ids = c.ids;
    out
}

/// Writes one table (`flags`, `TBL_F_WEIGHTED` among them for weighted slots) and its slots
/// into `out`, reusing the previous generation if nothing about the table changed. `addrs`
/// are the addresses of the backends the levels name, sorted by id.
fn emit_table(
    out: &mut Piece,
    prev: &MapState,
    tkey: TableKey,
    flags: u32,
    levels: &[Vec<(u32, u32)>; LEVELS],
    addrs: &[(u32, [u32; 4])],
    limit: u32,
) {
    // A ring's slots carry their points where others carry cumulative weights.
    let ring = flags & TBL_F_RING != 0;
    let weighted = flags & TBL_F_WEIGHTED != 0;
    // The service's port overrides are made before its tables (a backend's of another family
    // count too: the flag only allows the lookup).
    let ports = if out.ports.is_empty() { 0 } else { TBL_F_PORTS };
    let flags = flags | ports;
    let mut t = TableValue { flags, limit, ..Default::default() };
    // The slots go straight into `out`, keyed under generation 0 until the table's is known.
    let first = out.endpoints.len();
    for (level, eps) in levels.iter().enumerate() {
        t.counts[level] = eps.len() as u32;
        let mut cum = 0u32;
        for (index, (backend_id, w)) in eps.iter().enumerate() {
            cum = if ring { *w } else { cum.saturating_add(if weighted { *w } else { 0 }) };
            // Every level is made of the backends the caller made, with their addresses.
            let i = addrs.binary_search_by_key(backend_id, |(id, _)| *id).expect("a slot's backend is known");
            let addr = addrs[i].1;
            out.endpoints.push((
                slot_key(&tkey, 0, level as u8, index as u32),
                EndpointValue { backend_id: *backend_id, cum_weight: cum, addr, check: 0 },
            ));
        }
        t.weights[level] = cum;
    }
    let slots = &mut out.endpoints[first..];
    let at = |generation: u32, k: &EndpointKey| EndpointKey { generation, ..*k };
    t.generation = match prev.tables.get(&tkey) {
        Some(p) => {
            // Whether connect() looks up port overrides changes no slot.
            let same = (p.flags | TBL_F_PORTS) == (t.flags | TBL_F_PORTS)
                && p.limit == t.limit
                && p.counts == t.counts
                && p.weights == t.weights
                && slots.iter().all(|(k, v)| {
                    let k = at(p.generation, k);
                    prev.endpoints.get(&k) == Some(&v.sealed(&k))
                });
            if same { p.generation } else { p.generation.wrapping_add(1) }
        }
        None => 1,
    };
    for (k, v) in slots {
        *k = at(t.generation, k);
        *v = v.sealed(k);
    }
    out.tables.push((tkey, t.sealed(&tkey)));
}

/// Changes to go from one map state to another. Applied in this order: all `set` maps from
/// the leaves up (backends, ports, endpoints, tables, frontends, netns), then all `del` maps from
/// the roots down (netns, frontends, tables, endpoints, ports, backends). Every entry a
/// reader can reach from a root therefore exists at every moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub set: MapState,
    pub del_netns: Vec<u64>,
    pub del_frontends: Vec<FrontendKey>,
    pub del_tables: Vec<TableKey>,
    pub del_endpoints: Vec<EndpointKey>,
    pub del_backends: Vec<u32>,
    pub del_ports: Vec<PortKey>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.set == MapState::default()
            && self.del_netns.is_empty()
            && self.del_frontends.is_empty()
            && self.del_tables.is_empty()
            && self.del_endpoints.is_empty()
            && self.del_backends.is_empty()
            && self.del_ports.is_empty()
    }

    /// Adds another diff over disjoint keys.
    pub fn merge(&mut self, o: Diff) {
        self.set.netns.extend(o.set.netns);
        self.set.frontends.extend(o.set.frontends);
        self.set.tables.extend(o.set.tables);
        self.set.endpoints.extend(o.set.endpoints);
        self.set.backends.extend(o.set.backends);
        self.set.ports.extend(o.set.ports);
        self.del_netns.extend(o.del_netns);
        self.del_frontends.extend(o.del_frontends);
        self.del_tables.extend(o.del_tables);
        self.del_endpoints.extend(o.del_endpoints);
        self.del_backends.extend(o.del_backends);
        self.del_ports.extend(o.del_ports);
    }

    pub fn writes(&self) -> usize {
        let c = self.set.counts();
        c.netns + c.frontends + c.tables + c.endpoints + c.backends + c.ports
    }

    pub fn deletes(&self) -> usize {
        self.del_netns.len()
            + self.del_frontends.len()
            + self.del_tables.len()
            + self.del_endpoints.len()
            + self.del_backends.len()
            + self.del_ports.len()
    }
}

/// What takes `prev` to `next`: the entries to write and the keys to delete.
pub fn changed<K: Ord + Clone, V: PartialEq + Clone>(
    prev: &BTreeMap<K, V>,
    next: &BTreeMap<K, V>,
) -> (BTreeMap<K, V>, Vec<K>) {
    let set =
        next.iter().filter(|(k, v)| prev.get(*k) != Some(*v)).map(|(k, v)| (k.clone(), v.clone())).collect();
    let del = prev.keys().filter(|k| !next.contains_key(*k)).cloned().collect();
    (set, del)
}

/// [`changed`], taking `next`: nothing is copied when `prev` is empty (a first push).
fn changed_owned<K: Ord + Clone, V: PartialEq>(
    prev: &BTreeMap<K, V>,
    next: BTreeMap<K, V>,
) -> (BTreeMap<K, V>, Vec<K>) {
    if prev.is_empty() {
        return (next, Vec::new());
    }
    let del = prev.keys().filter(|k| !next.contains_key(*k)).cloned().collect();
    (next.into_iter().filter(|(k, v)| prev.get(k) != Some(v)).collect(), del)
}

/// [`diff`], taking `next` (a full compilation's state).
pub fn diff_owned(prev: &MapState, next: MapState) -> Diff {
    let MapState { netns, frontends, tables, endpoints, backends, ports } = next;
    let (netns, del_netns) = changed_owned(&prev.netns, netns);
    let (frontends, del_frontends) = changed_owned(&prev.frontends, frontends);
    let (tables, del_tables) = changed_owned(&prev.tables, tables);
    let (endpoints, del_endpoints) = changed_owned(&prev.endpoints, endpoints);
    let (backends, del_backends) = changed_owned(&prev.backends, backends);
    let (ports, del_ports) = changed_owned(&prev.ports, ports);
    Diff {
        set: MapState { netns, frontends, tables, endpoints, backends, ports },
        del_netns,
        del_frontends,
        del_tables,
        del_endpoints,
        del_backends,
        del_ports,
    }
}

/// What must be written and deleted to turn `prev` into `next`.
pub fn diff(prev: &MapState, next: &MapState) -> Diff {
    diff_owned(prev, next.clone())
}

mod fragment;
pub mod hash;
mod piece;
mod waypoint;
use fragment::Fragment;
pub use piece::Piece;
use waypoint::{RouteInfo, WORKLOAD_FRAGMENT, WaypointDep};
pub use waypoint::{route_key, service_waypoints, waypoint_port};

#[cfg(test)]
mod tests;
