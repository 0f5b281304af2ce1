//! One service's map entries as the compiler keeps them between compilations: which keys it
//! holds. Values are kept only for frontends (a frontend several services claim takes its
//! owner's value, so the maps do not hold every claimant's); the others' are what the maps in
//! force hold, read from their mirror when the service is recompiled, not kept a second time
//! here (a table's value is 80 bytes).
//!
//! The keys are packed in one allocation of 32-bit words: five counts, then each map's keys in
//! key order. Five boxed slices cost an 88-byte B-tree slot and four allocations rounded up to
//! their size classes for the one frontend, table, slot and backend most services have (about
//! 192 bytes a service); packed they cost 24 bytes and one 96-byte
//! allocation.

use std::collections::BTreeMap;

use kmesh_common::*;

use super::MapState;

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
const ENDPOINTS: usize = 2;
const BACKENDS: usize = 3;
const PORTS: usize = 4;
const FRONTEND_WORDS: usize = FrontendKey::WORDS + FrontendValue::WORDS;
/// Words each part's entries take.
const STRIDE: [usize; 5] = [FRONTEND_WORDS, TableKey::WORDS, EndpointKey::WORDS, u32::WORDS, PortKey::WORDS];
const HEADER: usize = STRIDE.len();

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
            .field("endpoints", &self.keys::<EndpointKey>(ENDPOINTS).collect::<Vec<_>>())
            .field("backends", &self.keys::<u32>(BACKENDS).collect::<Vec<_>>())
            .field("ports", &self.keys::<PortKey>(PORTS).collect::<Vec<_>>())
            .finish()
    }
}

impl Fragment {
    /// The keys of `m` (a service's entries), with its frontends' values.
    pub(super) fn keys_of(m: &MapState) -> Self {
        debug_assert!(m.netns.is_empty(), "a service's entries hold no namespace");
        let counts = [m.frontends.len(), m.tables.len(), m.endpoints.len(), m.backends.len(), m.ports.len()];
        let words = HEADER + counts.iter().zip(STRIDE).map(|(n, s)| n * s).sum::<usize>();
        let mut w = Vec::with_capacity(words);
        w.extend(counts.map(|n| u32::try_from(n).expect("a service has fewer than 2^32 entries in a map")));
        for (k, v) in &m.frontends {
            k.put(&mut w);
            v.put(&mut w);
        }
        m.tables.keys().for_each(|k| k.put(&mut w));
        m.endpoints.keys().for_each(|k| k.put(&mut w));
        m.backends.keys().for_each(|k| k.put(&mut w));
        m.ports.keys().for_each(|k| k.put(&mut w));
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
            endpoints: values(self.keys(ENDPOINTS), &applied.endpoints),
            backends: values(self.keys(BACKENDS), &applied.backends),
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
            m.endpoints.insert(ek, EndpointValue { backend_id: 100 + index, cum_weight: 0, check: 1 });
            m.backends.insert(100 + index, BackendValue::default());
        }
        let pk = PortKey { service_id: 7, backend_id: 101, service_port: 443u16.to_be(), _pad: 0 };
        m.ports.insert(pk, PortValue { target_port: 8443, _pad: 0, check: 2 });
        m
    }

    #[test]
    fn packed_keys_read_back_as_they_went_in_with_the_values_the_maps_hold() {
        let m = state();
        let f = Fragment::keys_of(&m);
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
        let f = Fragment::keys_of(&one);
        assert_eq!(f.0.len() * 4, 92, "five counts and 18 words of keys");
        assert_eq!(std::mem::size_of::<Fragment>(), 16);
    }
}
