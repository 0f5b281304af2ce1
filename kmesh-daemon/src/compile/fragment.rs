//! One service's map entries as the compiler keeps them between compilations: which keys it
//! holds. Values are kept only for frontends (a frontend several services claim takes its
//! owner's value, so the maps do not hold every claimant's); the others' are what the maps in
//! force hold, read from their mirror when the service is recompiled, not kept a second time
//! here (a table's value is 80 bytes).
//!
//! The keys are packed in one allocation of 32-bit words: six counts, then each part's entries
//! in key order. Five boxed slices cost an 88-byte B-tree slot and four allocations rounded up
//! to their size classes for the one frontend, table, slot and backend most services have
//! (about 192 bytes a service); packed they cost 24 bytes and one 96-byte allocation.
//!
//! A table's slots are numbered 0, 1, 2, ... at each level, and a full compilation hands a
//! service's backends consecutive ids, so both are kept as runs: a run of slots is its first
//! key with the run's length in the key's padding bits, a run of backend ids its first id and
//! length; a backend id no neighbour follows is kept alone. A service of ten endpoints takes
//! 25 words (a 112-byte allocation), not 77 (320 bytes).

use std::collections::BTreeMap;

use kmesh_common::*;

use super::{MapState, Piece};

/// A map key or value written field by field into 32-bit words (no byte of padding is read:
/// the shared types name their padding).
trait Words: Copy + 'static {
    const WORDS: usize;
    fn put(&self, out: &mut Vec<u32>);
    fn get(w: &[u32]) -> Self;
}

impl Words for u32 {
    const WORDS: usize = 1;
    fn put(&self, out: &mut Vec<u32>) {
        out.push(*self);
    }
    fn get(w: &[u32]) -> Self {
        w[0]
    }
}

impl Words for FrontendKey {
    const WORDS: usize = 5;
    fn put(&self, out: &mut Vec<u32>) {
        out.extend(self.addr);
        out.push(u32::from(self.port) | u32::from(self.proto) << 16 | u32::from(self._pad) << 24);
    }
    fn get(w: &[u32]) -> Self {
        FrontendKey {
            addr: [w[0], w[1], w[2], w[3]],
            port: w[4] as u16,
            proto: (w[4] >> 16) as u8,
            _pad: (w[4] >> 24) as u8,
        }
    }
}

impl Words for FrontendValue {
    const WORDS: usize = 4;
    fn put(&self, out: &mut Vec<u32>) {
        out.extend([
            self.service_id,
            u32::from(self.target_port) | u32::from(self.flags) << 16,
            self.waypoint_id,
            self.check,
        ]);
    }
    fn get(w: &[u32]) -> Self {
        FrontendValue {
            service_id: w[0],
            target_port: w[1] as u16,
            flags: (w[1] >> 16) as u16,
            waypoint_id: w[2],
            check: w[3],
        }
    }
}

impl Words for TableKey {
    const WORDS: usize = 3;
    fn put(&self, out: &mut Vec<u32>) {
        let [a, b, c] = self._pad;
        out.extend([self.service_id, self.class_id, u32::from_le_bytes([self.family, a, b, c])]);
    }
    fn get(w: &[u32]) -> Self {
        let [family, a, b, c] = w[2].to_le_bytes();
        TableKey { service_id: w[0], class_id: w[1], family, _pad: [a, b, c] }
    }
}

impl Words for EndpointKey {
    const WORDS: usize = 5;
    fn put(&self, out: &mut Vec<u32>) {
        out.extend([
            self.service_id,
            self.class_id,
            self.generation,
            u32::from(self.family) | u32::from(self.level) << 8 | u32::from(self._pad) << 16,
            self.index,
        ]);
    }
    fn get(w: &[u32]) -> Self {
        EndpointKey {
            service_id: w[0],
            class_id: w[1],
            generation: w[2],
            family: w[3] as u8,
            level: (w[3] >> 8) as u8,
            _pad: (w[3] >> 16) as u16,
            index: w[4],
        }
    }
}

impl Words for PortKey {
    const WORDS: usize = 3;
    fn put(&self, out: &mut Vec<u32>) {
        out.extend([
            self.service_id,
            self.backend_id,
            u32::from(self.service_port) | u32::from(self._pad) << 16,
        ]);
    }
    fn get(w: &[u32]) -> Self {
        PortKey { service_id: w[0], backend_id: w[1], service_port: w[2] as u16, _pad: (w[2] >> 16) as u16 }
    }
}

/// The parts of a fragment, in the order they are packed.
const FRONTENDS: usize = 0;
const TABLES: usize = 1;
/// Runs of slots (see [`SlotRun`]).
const SLOT_RUNS: usize = 2;
/// Backend ids kept alone.
const BACKENDS: usize = 3;
/// Runs of consecutive backend ids: the first and the length.
const BACKEND_RUNS: usize = 4;
const PORTS: usize = 5;
const FRONTEND_WORDS: usize = FrontendKey::WORDS + FrontendValue::WORDS;
/// Words each part's entries take.
const STRIDE: [usize; 6] =
    [FRONTEND_WORDS, TableKey::WORDS, EndpointKey::WORDS, u32::WORDS, 2, PortKey::WORDS];
const HEADER: usize = STRIDE.len();

/// Slots in one run at most: the length less one is kept in the key's 16 padding bits.
const RUN_MAX: u32 = 1 << 16;

/// A run of slots of one table level with consecutive indexes, packed as its first key with
/// the length less one in the `_pad` bits (the compiler's keys have none set).
struct SlotRun;

impl SlotRun {
    /// The runs of `keys` (in key order), each as its first key and length.
    fn of<'a>(keys: impl Iterator<Item = &'a EndpointKey>) -> Vec<(EndpointKey, u32)> {
        let mut runs: Vec<(EndpointKey, u32)> = Vec::new();
        for k in keys {
            debug_assert_eq!(k._pad, 0, "a compiled slot key has no padding bits set");
            match runs.last_mut() {
                Some((first, len))
                    if *len < RUN_MAX
                        && first.index.checked_add(*len) == Some(k.index)
                        && EndpointKey { index: k.index, ..*first } == *k =>
                {
                    *len += 1
                }
                _ => runs.push((*k, 1)),
            }
        }
        runs
    }

    fn put(first: &EndpointKey, len: u32, out: &mut Vec<u32>) {
        EndpointKey { _pad: (len - 1) as u16, ..*first }.put(out);
    }

    /// The keys of the run packed in `w`.
    fn keys(w: &[u32]) -> impl Iterator<Item = EndpointKey> {
        let packed = EndpointKey::get(w);
        let first = EndpointKey { _pad: 0, ..packed };
        (0..=u32::from(packed._pad)).map(move |i| EndpointKey { index: first.index + i, ..first })
    }
}

/// Runs of consecutive ids in `ids` (sorted), each as its first id and length.
fn id_runs(ids: impl Iterator<Item = u32>) -> Vec<(u32, u32)> {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for id in ids {
        match runs.last_mut() {
            Some((first, len)) if first.checked_add(*len) == Some(id) => *len += 1,
            _ => runs.push((id, 1)),
        }
    }
    runs
}

/// One service's keys (and frontend values), packed (see the module).
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Fragment(Box<[u32]>);

impl Default for Fragment {
    fn default() -> Self {
        Fragment(Box::new([0; HEADER]))
    }
}

impl std::fmt::Debug for Fragment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fragment")
            .field("frontends", &self.frontends().collect::<Vec<_>>())
            .field("tables", &self.keys::<TableKey>(TABLES).collect::<Vec<_>>())
            .field("endpoints", &self.endpoint_keys().collect::<Vec<_>>())
            .field("backends", &self.backend_ids().collect::<Vec<_>>())
            .field("ports", &self.keys::<PortKey>(PORTS).collect::<Vec<_>>())
            .finish()
    }
}

impl Fragment {
    /// The keys of `m` (a service's entries), with its frontends' values.
    pub(super) fn keys_of(m: &Piece) -> Self {
        let slot_runs = SlotRun::of(m.endpoints.iter().map(|(k, _)| k));
        let (alone, id_runs): (Vec<_>, Vec<_>) =
            id_runs(m.backends.iter().map(|(k, _)| *k)).into_iter().partition(|(_, len)| *len == 1);
        let counts =
            [m.frontends.len(), m.tables.len(), slot_runs.len(), alone.len(), id_runs.len(), m.ports.len()];
        let words = HEADER + counts.iter().zip(STRIDE).map(|(n, s)| n * s).sum::<usize>();
        let mut w = Vec::with_capacity(words);
        w.extend(counts.map(|n| u32::try_from(n).expect("a service has fewer than 2^32 entries in a map")));
        for (k, v) in &m.frontends {
            k.put(&mut w);
            v.put(&mut w);
        }
        m.tables.iter().for_each(|(k, _)| k.put(&mut w));
        slot_runs.iter().for_each(|(k, len)| SlotRun::put(k, *len, &mut w));
        w.extend(alone.iter().map(|(id, _)| *id));
        id_runs.iter().for_each(|(id, len)| w.extend([*id, *len]));
        m.ports.iter().for_each(|(k, _)| k.put(&mut w));
        debug_assert_eq!(w.len(), words);
        Fragment(w.into_boxed_slice())
    }

    /// The words of part `i`, whole entries of `STRIDE[i]` words each.
    fn part(&self, i: usize) -> &[u32] {
        let w = &self.0;
        let start = HEADER + (0..i).map(|j| w[j] as usize * STRIDE[j]).sum::<usize>();
        &w[start..start + w[i] as usize * STRIDE[i]]
    }

    fn keys<K: Words>(&self, i: usize) -> impl Iterator<Item = K> + '_ {
        self.part(i).chunks_exact(STRIDE[i]).map(K::get)
    }

    /// The frontends' entries, whole (key words, then value words).
    fn frontend_entries(&self) -> &[[u32; FRONTEND_WORDS]] {
        self.part(FRONTENDS).as_chunks().0
    }

    /// The frontends with their values, in key order.
    pub(super) fn frontends(&self) -> impl Iterator<Item = (FrontendKey, FrontendValue)> + '_ {
        self.frontend_entries()
            .iter()
            .map(|e| (FrontendKey::get(e), FrontendValue::get(&e[FrontendKey::WORDS..])))
    }

    pub(super) fn frontend_keys(&self) -> impl Iterator<Item = FrontendKey> + '_ {
        self.keys(FRONTENDS)
    }

    /// The slots' keys, in key order.
    fn endpoint_keys(&self) -> impl Iterator<Item = EndpointKey> + '_ {
        self.part(SLOT_RUNS).chunks_exact(STRIDE[SLOT_RUNS]).flat_map(SlotRun::keys)
    }

    /// The backend ids: those kept alone, then the runs'.
    fn backend_ids(&self) -> impl Iterator<Item = u32> + '_ {
        let runs = self.part(BACKEND_RUNS).chunks_exact(2).flat_map(|r| (0..r[1]).map(move |i| r[0] + i));
        self.keys(BACKENDS).chain(runs)
    }

    /// The value of frontend `k`, if this fragment has it.
    pub(super) fn frontend(&self, k: &FrontendKey) -> Option<FrontendValue> {
        let entries = self.frontend_entries();
        let i = entries.binary_search_by(|e| FrontendKey::get(e).cmp(k)).ok()?;
        Some(FrontendValue::get(&entries[i][FrontendKey::WORDS..]))
    }

    /// The entries, with the values `applied` (the maps in force) holds for them: what the
    /// service's recompilation is diffed against.
    pub(super) fn expand(&self, applied: &MapState) -> MapState {
        fn values<K: Words + Ord, V: Copy>(
            keys: impl Iterator<Item = K>,
            from: &BTreeMap<K, V>,
        ) -> BTreeMap<K, V> {
            keys.filter_map(|k| Some((k, *from.get(&k)?))).collect()
        }
        MapState {
            netns: BTreeMap::new(),
            frontends: self.frontends().collect(),
            tables: values(self.keys(TABLES), &applied.tables),
            endpoints: values(self.endpoint_keys(), &applied.endpoints),
            backends: values(self.backend_ids(), &applied.backends),
            ports: values(self.keys(PORTS), &applied.ports),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> MapState {
        let mut m = MapState::default();
        for i in 0..3u32 {
            let fk =
                FrontendKey { addr: [0, 0, 0xffff, 0x0a00_0000 + i], port: 80u16.to_be(), proto: 6, _pad: 0 };
            let fv = FrontendValue {
                service_id: 7,
                target_port: 8080,
                flags: 1,
                waypoint_id: i,
                check: 0xdead_beef,
            };
            m.frontends.insert(fk, fv);
        }
        let tk = TableKey { service_id: 7, class_id: 3, family: 10, _pad: [0; 3] };
        m.tables.insert(tk, TableValue::default());
        for index in 0..4 {
            let ek = EndpointKey {
                service_id: 7,
                class_id: 3,
                generation: 9,
                family: 10,
                level: 2,
                _pad: 0,
                index,
            };
            m.endpoints
                .insert(ek, EndpointValue { backend_id: 100 + index, cum_weight: 0, addr: [0; 4], check: 1 });
            m.backends.insert(100 + index, BackendValue::default());
        }
        let pk = PortKey { service_id: 7, backend_id: 101, service_port: 443u16.to_be(), _pad: 0 };
        m.ports.insert(pk, PortValue { target_port: 8443, _pad: 0, check: 2 });
        m
    }

    #[test]
    fn packed_keys_read_back_as_they_went_in_with_the_values_the_maps_hold() {
        let m = state();
        let f = Fragment::keys_of(&Piece::of_state(&m));
        assert_eq!(f.expand(&m), m, "every key, and the frontends' own values");
        assert_eq!(f.frontend_keys().collect::<Vec<_>>(), m.frontends.keys().copied().collect::<Vec<_>>());
        for (k, v) in &m.frontends {
            assert_eq!(f.frontend(k), Some(*v));
        }
        let absent =
            FrontendKey { addr: [0, 0, 0xffff, 0x0a00_0009], port: 80u16.to_be(), proto: 6, _pad: 0 };
        assert_eq!(f.frontend(&absent), None);
        // Keys the maps no longer hold are left out of the expansion.
        let mut gone = m.clone();
        gone.backends.remove(&101);
        assert_eq!(f.expand(&gone).backends.len(), 3);
    }

    #[test]
    fn an_empty_fragment_has_no_entries_and_one_service_costs_one_small_allocation() {
        let f = Fragment::default();
        assert_eq!(f.expand(&state()), MapState::default());
        assert_eq!(f.frontend_keys().count(), 0);
        let mut one = MapState::default();
        let (fk, fv) = state().frontends.pop_first().unwrap();
        one.frontends.insert(fk, fv);
        let (tk, tv) = state().tables.pop_first().unwrap();
        one.tables.insert(tk, tv);
        let (ek, ev) = state().endpoints.pop_first().unwrap();
        one.endpoints.insert(ek, ev);
        one.backends.insert(ev.backend_id, BackendValue::default());
        let f = Fragment::keys_of(&Piece::of_state(&one));
        assert_eq!(f.0.len() * 4, 96, "six counts and 18 words of keys");
        assert_eq!(std::mem::size_of::<Fragment>(), 16);
    }

    #[test]
    fn slots_and_backend_ids_are_kept_as_runs_and_read_back_whole() {
        let mut m = MapState::default();
        let tk = TableKey { service_id: 7, class_id: 0, family: 10, _pad: [0; 3] };
        m.tables.insert(tk, TableValue::default());
        let slot = |level: u8, index: u32| EndpointKey {
            service_id: 7,
            class_id: 0,
            generation: 3,
            family: 10,
            level,
            _pad: 0,
            index,
        };
        for index in 0..10 {
            m.endpoints.insert(
                slot(0, index),
                EndpointValue { backend_id: 40 + index, cum_weight: 0, addr: [0; 4], check: 5 },
            );
            m.backends.insert(40 + index, BackendValue::default());
        }
        let f = Fragment::keys_of(&Piece::of_state(&m));
        assert_eq!(f.0.len(), 6 + 3 + 5 + 2, "one run of slots, one of ids");
        assert_eq!(f.expand(&m), m);

        // Gaps, a second level, a run longer than the padding bits count, ids apart.
        for index in 12..14 {
            m.endpoints.insert(slot(0, index), EndpointValue::default());
        }
        for index in 0..(RUN_MAX + 3) {
            m.endpoints.insert(slot(1, index), EndpointValue::default());
        }
        m.endpoints.insert(slot(2, u32::MAX), EndpointValue::default());
        for id in [1, 3, 60, 61, u32::MAX - 1, u32::MAX] {
            m.backends.insert(id, BackendValue::default());
        }
        let f = Fragment::keys_of(&Piece::of_state(&m));
        assert_eq!(f.expand(&m), m, "every key comes back");
        assert_eq!(f.endpoint_keys().collect::<Vec<_>>(), m.endpoints.keys().copied().collect::<Vec<_>>());
        let runs = f.part(SLOT_RUNS).len() / STRIDE[SLOT_RUNS];
        assert_eq!(runs, 5, "0..10, 12..14, level 1 in two runs, the last slot");
        let mut ids: Vec<u32> = f.backend_ids().collect();
        ids.sort_unstable();
        assert_eq!(ids, m.backends.keys().copied().collect::<Vec<_>>());
        assert_eq!(f.part(BACKENDS), &[1, 3], "ids no neighbour follows are kept alone");
    }
}
