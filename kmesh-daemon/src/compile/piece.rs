//! One service's (or waypoint route's) entries as the compiler makes them: a vector per map,
//! not a map per map. A full compilation of 10k services made five B-trees per service (a
//! node allocated for each of its frontend, table, slots and backends), read them once into
//! the gathered vectors and freed them; a piece is cleared and refilled, so its vectors are
//! allocated once per compilation.

use std::collections::BTreeMap;

use kmesh_common::*;

use super::MapState;

/// Each part sorted by key, keys distinct (see [`settle`](Piece::settle)).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Piece {
    pub frontends: Vec<(FrontendKey, FrontendValue)>,
    pub tables: Vec<(TableKey, TableValue)>,
    pub endpoints: Vec<(EndpointKey, EndpointValue)>,
    pub backends: Vec<(u32, BackendValue)>,
    pub ports: Vec<(PortKey, PortValue)>,
}

/// Sorts `v` by key; of the entries made under one key, the last made stands (as it would
/// in a map it was inserted into).
fn settle_part<K: Ord + Copy, V>(v: &mut Vec<(K, V)>) {
    if v.is_sorted_by(|a, b| a.0 < b.0) {
        return;
    }
    // Stable: entries under one key stay in the order they were made.
    v.sort_by_key(|e| e.0);
    v.dedup_by(|later, earlier| {
        if later.0 != earlier.0 {
            return false;
        }
        std::mem::swap(later, earlier);
        true
    });
}

impl Piece {
    pub fn clear(&mut self) {
        self.frontends.clear();
        self.tables.clear();
        self.endpoints.clear();
        self.backends.clear();
        self.ports.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty()
            && self.tables.is_empty()
            && self.endpoints.is_empty()
            && self.backends.is_empty()
            && self.ports.is_empty()
    }

    /// Puts each part in key order with one entry per key, the last made under it.
    pub fn settle(&mut self) {
        settle_part(&mut self.frontends);
        settle_part(&mut self.tables);
        settle_part(&mut self.endpoints);
        settle_part(&mut self.backends);
        settle_part(&mut self.ports);
    }

    /// The same entries as map contents (what a recompiled service is diffed as).
    pub fn to_state(&self) -> MapState {
        fn map<K: Ord + Copy, V: Copy>(v: &[(K, V)]) -> BTreeMap<K, V> {
            v.iter().copied().collect()
        }
        MapState {
            netns: BTreeMap::new(),
            frontends: map(&self.frontends),
            tables: map(&self.tables),
            endpoints: map(&self.endpoints),
            backends: map(&self.backends),
            ports: map(&self.ports),
        }
    }

    /// The load-balancing entries of `m` (its namespaces are not a service's).
    pub fn of_state(m: &MapState) -> Piece {
        fn vec<K: Copy, V: Copy>(m: &BTreeMap<K, V>) -> Vec<(K, V)> {
            m.iter().map(|(k, v)| (*k, *v)).collect()
        }
        Piece {
            frontends: vec(&m.frontends),
            tables: vec(&m.tables),
            endpoints: vec(&m.endpoints),
            backends: vec(&m.backends),
            ports: vec(&m.ports),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(n: u32) -> BackendValue {
        BackendValue { addr: [n, 0, 0, 0], check: 0 }
    }

    /// Entries made out of order and twice under a key settle as a map would hold them.
    #[test]
    fn a_settled_piece_is_in_key_order_with_the_last_entry_made_under_each_key() {
        let mut p = Piece {
            backends: vec![(3, backend(1)), (1, backend(2)), (3, backend(3)), (2, backend(4))],
            ..Default::default()
        };
        p.settle();
        assert_eq!(p.backends, vec![(1, backend(2)), (2, backend(4)), (3, backend(3))]);
        let mut m = BTreeMap::new();
        for (k, v) in [(3, backend(1)), (1, backend(2)), (3, backend(3)), (2, backend(4))] {
            m.insert(k, v);
        }
        assert_eq!(p.to_state().backends, m);
        assert_eq!(Piece::of_state(&p.to_state()), p);
    }
}
