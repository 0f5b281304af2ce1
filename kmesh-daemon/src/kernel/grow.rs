//! Maps sized from what the configuration needs. Each map the daemon writes sits in the one
//! slot of an array of maps, and the programs reach it through that slot (see the eBPF
//! crate's `maps::Slot`). A fresh map starts small ([`INITIAL_CAPACITY`]); an apply that would
//! not fit first grows the maps it needs to: a bigger map is made next to the old one, filled
//! with what the old one holds, and put in the slot with one map update, after which every
//! program run reads the new map. Nothing is loaded again (no verifier runs), nothing is
//! pinned but the outer maps, and until the update the programs read the old map, which
//! nothing has touched; a map made and never put in a slot is freed with its handle. The
//! capacity flags are ceilings, never sizes.

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::LazyLock;

use aya::Pod;
use aya::maps::{ArrayOfMaps, Map, MapData};

use super::*;

/// Capacity of a map created before any configuration asks for more (16 KiB of hash
/// buckets in the kernel).
pub const INITIAL_CAPACITY: u32 = 1024;

/// The capacity a map holding `needed` entries at its peak should have: `current` if they
/// fit; else room for half as many again, rounded up to a power of two (the kernel sizes its
/// bucket array so anyway), and at most `ceiling`. `None` when even the ceiling is too small.
pub fn capacity_for(current: u32, needed: usize, ceiling: u32) -> Option<u32> {
    if needed <= current as usize {
        return Some(current);
    }
    if needed > ceiling as usize {
        return None;
    }
    let want = (needed + needed / 2).next_power_of_two();
    Some(u32::try_from(want).unwrap_or(u32::MAX).min(ceiling))
}

/// An outer map: the array of maps whose one slot holds a growable map.
pub(super) struct Outer(Map);

impl Outer {
    pub(super) fn new(name: &'static str, m: Map) -> Result<Self, KernelError> {
        match m {
            Map::ArrayOfMaps(_) => Ok(Self(m)),
            _ => Err(KernelError::MapType { name, source: MapError::InvalidMapType { map_type: 0 } }),
        }
    }

    pub(super) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match &self.0 {
            Map::ArrayOfMaps(d) => d.fd().as_fd(),
            _ => unreachable!("checked by Outer::new"),
        }
    }

    fn slot(&mut self, name: &'static str) -> Result<ArrayOfMaps<&mut MapData, MapData>, KernelError> {
        (&mut self.0).try_into().map_err(|source| KernelError::MapType { name, source })
    }
}

/// The definitions of what goes in each outer map's slot, from the eBPF object itself: the
/// kernel takes in a slot only a map of the template's type, key size, value size and flags
/// (any capacity). Kept without their BTF type ids: maps made here carry no BTF.
static TEMPLATES: LazyLock<Result<Vec<(String, aya_obj::Map)>, String>> = LazyLock::new(|| {
    let obj = aya_obj::Object::parse(EBPF_OBJ).map_err(|e| e.to_string())?;
    let plain = |m: aya_obj::Map| {
        aya_obj::Map::new_from_params(
            m.map_type(),
            m.key_size(),
            m.value_size(),
            m.max_entries(),
            m.map_flags(),
        )
    };
    Ok(obj.maps.iter().filter_map(|(n, m)| Some((n.clone(), plain(m.inner()?)))).collect())
});

/// A new, empty map for the slot of `name`, with room for `capacity` entries.
pub(super) fn new_inner(name: &'static str, capacity: u32) -> Result<MapData, KernelError> {
    let err = |source| KernelError::MapType { name, source };
    let templates = TEMPLATES.as_ref().map_err(|e| {
        err(MapError::InvalidName { name: format!("{name} (the eBPF object cannot be read: {e})") })
    })?;
    let mut def = templates
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, m)| m.clone())
        .ok_or(KernelError::MissingMap(name))?;
    def.set_max_entries(capacity);
    MapData::create(def, name, None).map_err(err)
}

/// The map in the slot of outer map `name`; made with room for `capacity` entries and put
/// there when the slot is empty (an outer map this run created).
pub(super) fn slot_map(outer: &mut Outer, name: &'static str, capacity: u32) -> Result<MapData, KernelError> {
    let mut outer = outer.slot(name)?;
    match outer.get(&0, 0) {
        Ok(inner) => Ok(inner),
        Err(e) if is_not_found(&e) => {
            let inner = new_inner(name, capacity)?;
            outer.set(0, &inner, 0).map_err(|source| KernelError::Write { map: name, source })?;
            Ok(inner)
        }
        Err(source) => Err(KernelError::Read { map: name, source }),
    }
}

/// The map named `name` of the layout directory `dir` (see [`layout_dir`]), opened from its
/// pin: for a map that grows, the one in its outer map's slot (for tools and tests that read
/// or edit the maps of a running daemon).
pub fn open_pinned(dir: &Path, name: &'static str) -> Result<MapData, KernelError> {
    let data = MapData::from_pin(dir.join("maps").join(name))
        .map_err(|source| KernelError::MapType { name, source })?;
    let m = Map::from_map_data(data).map_err(|source| KernelError::MapType { name, source })?;
    match m {
        Map::ArrayOfMaps(_) => {
            let mut outer = Outer::new(name, m)?;
            let slot = outer.slot(name)?;
            slot.get(&0, 0).map_err(|source| KernelError::Read { map: name, source })
        }
        Map::HashMap(d) | Map::LpmTrie(d) | Map::Array(d) | Map::PerCpuArray(d) | Map::PerCpuHashMap(d) => {
            Ok(d)
        }
        _ => Err(KernelError::MapType { name, source: MapError::InvalidMapType { map_type: 0 } }),
    }
}

/// Writes `from` into the new map `m` (in batches: one system call per [`WRITE_BATCH`]).
fn fill<'a, K: Pod + 'a, V: Pod + 'a>(
    m: &MapData,
    name: &'static str,
    from: impl IntoIterator<Item = (&'a K, V)>,
) -> Result<(), KernelError> {
    let mut keys = Vec::new();
    let mut values = Vec::new();
    let mut from = from.into_iter().peekable();
    while from.peek().is_some() {
        keys.clear();
        values.clear();
        for (k, v) in from.by_ref().take(WRITE_BATCH) {
            keys.push(*k);
            values.push(v);
        }
        if let (_, Some(io_error)) = sys::update_batch(m.fd().as_fd(), &keys, &values) {
            return Err(batch_write_error(name, io_error));
        }
    }
    Ok(())
}

/// Grown maps, filled, not yet in their slots (see [`Dataplane::grow_in_background`]).
/// Dropped unswitched, they are freed.
pub struct Grown {
    /// The capacities the maps had when these were made, and the ones they have.
    from: Capacities,
    want: Capacities,
    grown: Vec<(&'static str, MapData)>,
    started: std::time::Instant,
    /// For maps made on another thread: what the maps held when they were copied.
    snapshot: Option<Box<(MapState, AuthzState)>>,
}

impl Dataplane {
    /// Grows the maps that the peaks of the next apply (`lb`: load balancing,
    /// `authz`: [`AUTHZ_MAP_NAMES`]) do not fit, or refuses it, naming the first map whose
    /// ceiling is too small, before anything is written.
    pub(super) fn fit(&mut self, lb: &MapCounts, authz: [usize; 4]) -> Result<(), KernelError> {
        let want = self.wanted(lb, authz)?;
        if want != self.capacities { self.grow(want) } else { Ok(()) }
    }

    /// The capacities the peaks `lb` and `authz` need (see [`fit`](Self::fit)).
    fn wanted(&self, lb: &MapCounts, authz: [usize; 4]) -> Result<Capacities, KernelError> {
        wanted(&self.capacities, &self.ceilings, lb, authz)
    }

    /// Replaces the maps whose capacity `want` raises by bigger ones holding the same
    /// entries, make-before-break (see the module's documentation).
    pub fn grow(&mut self, want: Capacities) -> Result<(), KernelError> {
        match prepare(self.capacities, want, &self.applied, &self.authz_applied)? {
            Some(g) => self.switch_grown(g),
            None => Ok(()),
        }
    }

    /// Makes and fills, on a thread of its own, the grown maps that load-balancing peaks of at
    /// least `lb` will need, without putting them in force, from a copy of what the maps hold:
    /// for a large batch of resources the daemon has only decoded, so that the maps are made
    /// and filled while the batch is merged and compiled. `None` when nothing needs to grow
    /// (or the peaks are over a ceiling: the apply refuses that when it knows the real
    /// peaks). [`finish_grow`](Self::finish_grow) puts them in force, only if the maps they
    /// replace still hold what was copied.
    pub fn grow_in_background(&self, lb: &MapCounts) -> Option<PendingGrow> {
        let want = self.wanted(lb, [0; 4]).ok().filter(|w| *w != self.capacities)?;
        let from = self.capacities;
        let snapshot = Box::new((self.applied.clone(), self.authz_applied.clone()));
        let spawned = std::thread::Builder::new().name("kmesh-grow".into()).spawn(move || {
            let g = prepare(from, want, &snapshot.0, &snapshot.1)?;
            Ok(g.map(|mut g| {
                g.snapshot = Some(snapshot);
                g
            }))
        });
        match spawned {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a thread to grow the maps ahead");
                None
            }
        }
    }

    /// Waits for maps grown on another thread and puts them in force (see
    /// [`switch_grown`](Self::switch_grown)); on failure the next apply grows what it needs, or
    /// says why it cannot.
    pub fn finish_grow(&mut self, h: PendingGrow) {
        let slots = Slots { m: &mut self.m, capacities: &mut self.capacities, grows: &mut self.grows };
        finish(slots, (&self.applied, &self.authz_applied), h);
    }

    /// Puts grown maps in their slots. Maps prepared
    /// before another grow, or (made on another thread) from entries the maps no longer hold,
    /// are dropped: the next apply grows what it needs. Each map is switched on its own; the
    /// old and the new one hold the same entries, so a program that reads some maps before
    /// and some after a switch reads a consistent state. A failed switch leaves the maps
    /// switched before it in force, with their capacities.
    pub fn switch_grown(&mut self, g: Grown) -> Result<(), KernelError> {
        let slots = Slots { m: &mut self.m, capacities: &mut self.capacities, grows: &mut self.grows };
        switch(slots, (&self.applied, &self.authz_applied), g)
    }
}

/// Maps being grown on another thread (see [`Dataplane::grow_in_background`]).
pub type PendingGrow = std::thread::JoinHandle<Result<Option<Grown>, KernelError>>;

/// [`Dataplane::finish_grow`], given what the maps hold (`held`).
pub(super) fn finish(slots: Slots<'_>, held: (&MapState, &AuthzState), h: PendingGrow) {
    match h.join() {
        Ok(grown) => put_in_force(slots, held, grown),
        Err(_) => tracing::error!("the thread growing the maps panicked"),
    }
}

/// Switches to the maps `grown` made, if any (see [`switch`]); says so when that failed.
pub(super) fn put_in_force(
    slots: Slots<'_>,
    held: (&MapState, &AuthzState),
    grown: Result<Option<Grown>, KernelError>,
) {
    if let Err(e) = grown.and_then(|g| g.map_or(Ok(()), |g| switch(slots, held, g))) {
        tracing::warn!(error = %e, "cannot grow the maps ahead of the writes");
    }
}

/// What putting grown maps in force changes in a [`Dataplane`], borrowed apart from what the
/// maps hold (so that a compilation can read that meanwhile).
pub(super) struct Slots<'a> {
    pub(super) m: &'a mut Maps,
    pub(super) capacities: &'a mut Capacities,
    pub(super) grows: &'a mut u64,
}

/// [`Dataplane::switch_grown`], given what the maps hold (`held`: load balancing,
/// authorization).
fn switch(slots: Slots<'_>, held: (&MapState, &AuthzState), g: Grown) -> Result<(), KernelError> {
    let Slots { m, capacities, grows } = slots;
    if g.from != *capacities {
        return Ok(());
    }
    if let Some(snap) = &g.snapshot
        && g.grown.iter().any(|(n, _)| !same_entries(n, (&snap.0, &snap.1), held))
    {
        tracing::debug!("maps grown ahead are dropped: the maps they replace changed meanwhile");
        return Ok(());
    }
    // A slot's update returns once no program still runs on the map it replaced (an RCU
    // grace period, milliseconds): the slots are updated side by side, one wait for all.
    let Grown { want, grown, started, .. } = g;
    let done: Vec<Result<(), KernelError>> = std::thread::scope(|s| {
        let mut outers: Vec<&mut (&'static str, Outer)> = m.outers.iter_mut().collect();
        let handles: Vec<_> = grown
            .iter()
            .map(|(map, inner)| {
                let at = outers.iter().position(|(n, _)| n == map);
                let outer = at.map(|i| outers.swap_remove(i));
                s.spawn(move || {
                    let (_, outer) = outer.ok_or(KernelError::MissingMap(map))?;
                    outer.slot(map)?.set(0, inner, 0).map_err(|source| KernelError::Write { map, source })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    });
    let mut first_error = None;
    for ((map, inner), r) in grown.into_iter().zip(done) {
        if let Err(e) = r {
            first_error.get_or_insert(e);
            continue;
        }
        let from = capacities.get(map);
        m.take_handle(map, inner)?;
        capacities.set(map, want.get(map));
        tracing::info!(
            map,
            from,
            to = want.get(map),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "map grown"
        );
    }
    *grows += 1;
    first_error.map_or(Ok(()), Err)
}

impl Maps {
    /// Makes `inner`, just put in the slot of outer map `name`, the handle the daemon writes
    /// through.
    fn take_handle(&mut self, name: &'static str, inner: MapData) -> Result<(), KernelError> {
        let ty = |source| KernelError::MapType { name, source };
        let m = Map::from_map_data(inner).map_err(ty)?;
        match name {
            "NETNS" => self.netns = m.try_into().map_err(ty)?,
            "FRONTENDS" => self.frontends = m.try_into().map_err(ty)?,
            "LB_TABLES" => self.tables = m.try_into().map_err(ty)?,
            "ENDPOINTS" => self.endpoints = m.try_into().map_err(ty)?,
            "BACKENDS" => self.backends = m.try_into().map_err(ty)?,
            "PORTS" => self.ports = m.try_into().map_err(ty)?,
            "AUTHZ_DEST" => self.authz_dest = m.try_into().map_err(ty)?,
            "IDENTITY" => self.identity = m.try_into().map_err(ty)?,
            "AUTHZ_REGION" => self.authz_region = m.try_into().map_err(ty)?,
            "AUTHZ_VERDICT" => self.authz_verdict = m.try_into().map_err(ty)?,
            _ => return Err(KernelError::MissingMap(name)),
        }
        Ok(())
    }
}

/// The capacities the peaks `lb` and `authz` need, from `capacities` within `ceilings`.
pub(super) fn wanted(
    capacities: &Capacities,
    ceilings: &Capacities,
    lb: &MapCounts,
    authz: [usize; 4],
) -> Result<Capacities, KernelError> {
    let needed = lb.as_array().into_iter().chain(AUTHZ_MAP_NAMES.into_iter().zip(authz));
    let mut want = *capacities;
    for (map, needed) in needed {
        let ceiling = ceilings.get(map);
        match capacity_for(capacities.get(map), needed, ceiling) {
            Some(c) => want.set(map, c),
            None => {
                return Err(KernelError::MapFull {
                    map,
                    flag: capacity_flag(map),
                    needed,
                    capacity: ceiling,
                });
            }
        }
    }
    Ok(want)
}

/// Makes the maps `want` grows (from capacities `from`), filled with `a` and `z` (what the
/// maps hold). `None` when nothing grows.
pub(super) fn prepare(
    from: Capacities,
    want: Capacities,
    a: &MapState,
    z: &AuthzState,
) -> Result<Option<Grown>, KernelError> {
    let names: Vec<&'static str> =
        want.all().into_iter().filter(|(n, c)| *c > from.get(n)).map(|(n, _)| n).collect();
    if names.is_empty() {
        return Ok(None);
    }
    let started = std::time::Instant::now();
    let mut grown = Vec::with_capacity(names.len());
    for n in names {
        let m = new_inner(n, want.get(n))?;
        match n {
            "NETNS" => fill(&m, n, a.netns.iter().map(|(k, v)| (k, *v)))?,
            "FRONTENDS" => fill(&m, n, a.frontends.iter().map(|(k, v)| (k, *v)))?,
            "LB_TABLES" => fill(&m, n, a.tables.iter().map(|(k, v)| (k, *v)))?,
            "ENDPOINTS" => fill(&m, n, a.endpoints.iter().map(|(k, v)| (k, *v)))?,
            "BACKENDS" => fill(&m, n, a.backends.iter().map(|(k, v)| (k, *v)))?,
            "PORTS" => fill(&m, n, a.ports.iter().map(|(k, v)| (k, *v)))?,
            "AUTHZ_DEST" => fill(&m, n, z.dest.iter().map(|(k, v)| (k, *v)))?,
            "IDENTITY" => fill(
                &m,
                n,
                z.identity.iter().map(|(k, id)| (k, IdentityValue { id: *id, check: 0 }.sealed(k))),
            )?,
            "AUTHZ_VERDICT" => fill(&m, n, z.verdict.iter().map(|(k, v)| (k, *v)))?,
            "AUTHZ_REGION" => {
                // An LPM trie takes no batches.
                let mut m =
                    Map::from_map_data(m).map_err(|source| KernelError::MapType { name: n, source })?;
                {
                    let mut trie: LpmTrie<&mut MapData, RegionKey, u32> =
                        (&mut m).try_into().map_err(|source| KernelError::MapType { name: n, source })?;
                    for ((k, len), v) in &z.region {
                        trie.insert(&LpmKey::new(*len, *k), v, 0)
                            .map_err(|source| KernelError::Write { map: n, source })?;
                    }
                }
                let Map::LpmTrie(m) = m else { return Err(KernelError::MissingMap(n)) };
                grown.push((n, m));
                continue;
            }
            _ => {}
        }
        grown.push((n, m));
    }
    Ok(Some(Grown { from, want, grown, started, snapshot: None }))
}

/// Whether map `name` holds the same entries in `a` and `b` (the load-balancing and the
/// authorization mirrors).
fn same_entries(name: &str, a: (&MapState, &AuthzState), b: (&MapState, &AuthzState)) -> bool {
    match name {
        "NETNS" => a.0.netns == b.0.netns,
        "FRONTENDS" => a.0.frontends == b.0.frontends,
        "LB_TABLES" => a.0.tables == b.0.tables,
        "ENDPOINTS" => a.0.endpoints == b.0.endpoints,
        "BACKENDS" => a.0.backends == b.0.backends,
        "PORTS" => a.0.ports == b.0.ports,
        "AUTHZ_DEST" => a.1.dest == b.1.dest,
        "IDENTITY" => a.1.identity == b.1.identity,
        "AUTHZ_REGION" => a.1.region == b.1.region,
        "AUTHZ_VERDICT" => a.1.verdict == b.1.verdict,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_grows_to_half_again_its_need_in_powers_of_two_up_to_its_ceiling() {
        assert_eq!(capacity_for(1024, 1024, 1 << 20), Some(1024), "a full map that fits stays");
        assert_eq!(capacity_for(1024, 1025, 1 << 20), Some(2048));
        assert_eq!(capacity_for(1024, 1500, 1 << 20), Some(4096), "1500 + 750 = 2250 -> 4096");
        assert_eq!(capacity_for(1024, 110_000, 1 << 20), Some(262_144));
        assert_eq!(capacity_for(1024, 110_000, 200_000), Some(200_000), "capped at the ceiling");
        assert_eq!(capacity_for(1024, 200_000, 200_000), Some(200_000), "exactly the ceiling fits");
        assert_eq!(capacity_for(1024, 200_001, 200_000), None);
        assert_eq!(capacity_for(4, 5, 4), None);
        assert_eq!(capacity_for(u32::MAX, usize::MAX, u32::MAX), None);
    }
}
