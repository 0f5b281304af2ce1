//! B-tree maps filled in key order are half empty: each node split leaves both halves half
//! full and the left one is never touched again. A full push inserts its 100k resources in key
//! order into every index it feeds, so those indexes are rebuilt once the push is in, in one
//! pass from their sorted contents, which packs every node full (`FromIterator` bulk-builds).

use std::collections::{BTreeMap, BTreeSet};

/// Whether an index of `len` entries that took `inserted` new ones in one go is worth
/// rebuilding: large, and a good part of it new. Changes of a few entries never are.
pub fn worth_it(inserted: usize, len: usize) -> bool {
    len >= 4096 && inserted.saturating_mul(4) >= len
}

/// Rebuilds `m` with full nodes (same contents).
pub fn map<K: Ord, V>(m: &mut BTreeMap<K, V>) {
    *m = std::mem::take(m).into_iter().collect();
}

/// Rebuilds `s` with full nodes (same contents).
pub fn set<K: Ord>(s: &mut BTreeSet<K>) {
    *s = std::mem::take(s).into_iter().collect();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_are_unchanged_and_only_bulk_changes_qualify() {
        let mut m: BTreeMap<u32, String> = (0..10_000).map(|i| (i, i.to_string())).collect();
        let before = m.clone();
        map(&mut m);
        assert_eq!(m, before);
        let mut s: BTreeSet<u32> = (0..100).collect();
        set(&mut s);
        assert_eq!(s, (0..100).collect());
        assert!(worth_it(100_000, 110_000));
        assert!(!worth_it(10, 110_000));
        assert!(!worth_it(100, 100), "a small map is left alone");
    }
}
