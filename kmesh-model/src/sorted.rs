//! Walking one sorted sequence alongside another: for a change that touches a good part of an
//! index, one pass over both in key order costs less than a search of the index per key.

use std::collections::{BTreeMap, BTreeSet};
use std::iter::Peekable;

/// Advances `it`, whose items come in ascending key order, past every item with a key below
/// `key`, and takes the next item if its key is `key`. Called with ascending keys, it visits
/// each item of `it` once in all.
pub fn seek<I: Iterator, K: Ord + ?Sized>(
    it: &mut Peekable<I>,
    key: &K,
    key_of: impl Fn(&I::Item) -> &K,
) -> Option<I::Item> {
    while it.next_if(|x| key_of(x) < key).is_some() {}
    it.next_if(|x| key_of(x) == key)
}

/// The entries of `map` whose keys `keys` holds, in key order, by one walk over both: when the
/// keys are a good part of the map (a quarter or more); `None` when a search per key costs
/// less.
pub fn walk<'a, K: Ord, V>(
    map: &'a BTreeMap<K, V>,
    keys: &'a BTreeSet<K>,
) -> Option<impl Iterator<Item = (&'a K, &'a V)> + 'a> {
    if keys.len() * 4 < map.len() {
        return None;
    }
    let mut want = keys.iter().peekable();
    Some(map.iter().filter(move |(k, _)| seek(&mut want, *k, |w| *w).is_some()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascending_keys_find_what_the_sequence_holds_and_skip_what_it_lacks() {
        let held = [1, 3, 4, 8, 9];
        let mut it = held.iter().peekable();
        let found: Vec<Option<i32>> =
            [0, 3, 5, 8, 9, 10].iter().map(|k| seek(&mut it, k, |x| *x).copied()).collect();
        assert_eq!(found, [None, Some(3), None, Some(8), Some(9), None]);
        assert!(it.next().is_none(), "everything was walked past");
    }
}
