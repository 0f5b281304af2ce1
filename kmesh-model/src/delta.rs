//! Changes of a [`Model`] as what they touch: the keys a source changed ([`ModelKeys`]) and,
//! once taken into a model, what those keys held before ([`ModelChange`]). A consumer that
//! keeps its own copy updates it in place and recompiles what the keys name, so the cost of a
//! change follows the change, not the number of resources held.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::istr::Istr;
use crate::model::{Model, NodeInfo, Policy, Service, Workload};

/// The entries of a model a change touches (added, changed or removed), by kind and key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelKeys {
    pub node: bool,
    pub workloads: BTreeSet<Istr>,
    pub services: BTreeSet<Istr>,
    pub policies: BTreeSet<String>,
}

impl ModelKeys {
    /// Every key whose entry differs between `old` and `new` (a walk over both: for sources
    /// that produce whole models, such as the local file).
    pub fn between(old: &Model, new: &Model) -> Self {
        Self {
            node: old.node != new.node,
            workloads: changed_keys(&old.workloads, &new.workloads),
            services: changed_keys(&old.services, &new.services),
            policies: changed_keys(&old.policies, &new.policies),
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.node && self.workloads.is_empty() && self.services.is_empty() && self.policies.is_empty()
    }

    pub fn len(&self) -> usize {
        usize::from(self.node) + self.workloads.len() + self.services.len() + self.policies.len()
    }

    pub fn extend(&mut self, other: &ModelKeys) {
        self.node |= other.node;
        self.workloads.extend(other.workloads.iter().cloned());
        self.services.extend(other.services.iter().cloned());
        self.policies.extend(other.policies.iter().cloned());
    }
}

/// What the keys of a change held before it: `None` for an entry the change added. Keys whose
/// entry came out equal are left out.
#[derive(Clone, Debug, Default)]
pub struct ModelChange {
    /// The node before, when it changed.
    pub node: Option<NodeInfo>,
    pub workloads: BTreeMap<Istr, Option<Arc<Workload>>>,
    pub services: BTreeMap<Istr, Option<Arc<Service>>>,
    pub policies: BTreeMap<String, Option<Arc<Policy>>>,
}

impl ModelChange {
    pub fn is_empty(&self) -> bool {
        self.node.is_none()
            && self.workloads.is_empty()
            && self.services.is_empty()
            && self.policies.is_empty()
    }

    /// The workload `uid` as it was before the change, given the model after it.
    pub fn old_workload<'a>(&'a self, now: &'a Model, uid: &str) -> Option<&'a Arc<Workload>> {
        match self.workloads.get(uid) {
            Some(old) => old.as_ref(),
            None => now.workloads.get(uid),
        }
    }

    /// The service `key` as it was before the change, given the model after it.
    pub fn old_service<'a>(&'a self, now: &'a Model, key: &str) -> Option<&'a Arc<Service>> {
        match self.services.get(key) {
            Some(old) => old.as_ref(),
            None => now.services.get(key),
        }
    }
}

fn same<T: PartialEq>(a: Option<&Arc<T>>, b: Option<&Arc<T>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
        (None, None) => true,
        _ => false,
    }
}

fn changed_keys<K: Ord + Clone, T: PartialEq>(
    a: &BTreeMap<K, Arc<T>>,
    b: &BTreeMap<K, Arc<T>>,
) -> BTreeSet<K> {
    let mut out: BTreeSet<K> =
        a.iter().filter(|(k, v)| !same(Some(v), b.get(*k))).map(|(k, _)| k.clone()).collect();
    out.extend(b.keys().filter(|k| !a.contains_key(*k)).cloned());
    out
}

/// Where [`Model::take_from`] takes entries from: a whole model, or a source that holds the
/// same entries in another shape (the xDS state holds them once, by resource name). Each
/// lookup answers with the key to hold the entry under (the copy the source holds: a
/// workload's uid, an interned service key) and the entry.
pub trait ModelSource {
    fn workload(&self, uid: &str) -> Option<Arc<Workload>>;
    fn service(&self, key: &str) -> Option<(Istr, Arc<Service>)>;
    fn policy(&self, key: &str) -> Option<Arc<Policy>>;
    fn node(&self) -> &NodeInfo;

    /// The workloads of `uids` the source holds, in uid order: what an empty model takes at
    /// once (a full push). A source may walk its entries alongside the uids instead of
    /// searching for each.
    fn workloads_in(&self, uids: &BTreeSet<Istr>) -> Vec<Arc<Workload>> {
        uids.iter().filter_map(|k| self.workload(k)).collect()
    }

    /// The services of `keys` the source holds, in key order (see
    /// [`workloads_in`](Self::workloads_in)).
    fn services_in(&self, keys: &BTreeSet<Istr>) -> Vec<(Istr, Arc<Service>)> {
        keys.iter().filter_map(|k| self.service(k)).collect()
    }
}

/// The entries of `keys` in `src`, in key order: one walk over both when the keys are a good
/// part of the map, else a search each.
fn entries_in<T>(src: &BTreeMap<Istr, Arc<T>>, keys: &BTreeSet<Istr>) -> Vec<(Istr, Arc<T>)> {
    let clone = |(k, v): (&Istr, &Arc<T>)| (k.clone(), v.clone());
    match crate::sorted::walk(src, keys) {
        Some(entries) => entries.map(clone).collect(),
        None => keys.iter().filter_map(|k| src.get_key_value(k)).map(clone).collect(),
    }
}

impl ModelSource for Model {
    fn workload(&self, uid: &str) -> Option<Arc<Workload>> {
        self.workloads.get(uid).cloned()
    }

    fn service(&self, key: &str) -> Option<(Istr, Arc<Service>)> {
        self.services.get_key_value(key).map(|(k, s)| (k.clone(), s.clone()))
    }

    fn policy(&self, key: &str) -> Option<Arc<Policy>> {
        self.policies.get(key).cloned()
    }

    fn node(&self) -> &NodeInfo {
        &self.node
    }

    fn workloads_in(&self, uids: &BTreeSet<Istr>) -> Vec<Arc<Workload>> {
        entries_in(&self.workloads, uids).into_iter().map(|(_, w)| w).collect()
    }

    fn services_in(&self, keys: &BTreeSet<Istr>) -> Vec<(Istr, Arc<Service>)> {
        entries_in(&self.services, keys)
    }
}

/// Takes `keys` of a source (`get`: the key to hold an entry under and the entry; `all`: those
/// of every key, in key order) into `dst`; returns what they held in `dst` (equal entries left
/// out).
fn take<K: Ord + Clone + std::borrow::Borrow<str>, T: PartialEq>(
    dst: &mut BTreeMap<K, Arc<T>>,
    get: impl Fn(&K) -> Option<(K, Arc<T>)>,
    all: impl FnOnce() -> Vec<(K, Arc<T>)>,
    keys: &BTreeSet<K>,
) -> BTreeMap<K, Option<Arc<T>>> {
    if dst.is_empty() {
        // Every entry is new: built at once, in key order.
        let taken = all();
        let old = taken.iter().map(|(k, _)| (k.clone(), None)).collect();
        *dst = taken.into_iter().collect();
        return old;
    }
    let mut old = BTreeMap::new();
    for k in keys {
        let next = get(k);
        if same(dst.get(k.borrow()), next.as_ref().map(|(_, v)| v)) {
            continue;
        }
        // The source's key is kept (for workloads, the uid's one shared copy).
        let prev = match next {
            Some((sk, v)) => {
                let prev = dst.remove(k.borrow());
                dst.insert(sk, v);
                prev
            }
            None => dst.remove(k.borrow()),
        };
        old.insert(k.clone(), prev);
    }
    old
}

fn put_back<K: Ord, T>(dst: &mut BTreeMap<K, Arc<T>>, old: BTreeMap<K, Option<Arc<T>>>) {
    for (k, v) in old {
        match v {
            Some(v) => dst.insert(k, v),
            None => dst.remove(&k),
        };
    }
}

impl Model {
    /// Makes the entries `keys` names equal to `src`'s (and the node, if `keys.node`); returns
    /// what they were, for [`revert`](Self::revert) and for consumers that need the old values.
    pub fn take_from(&mut self, src: &(impl ModelSource + ?Sized), keys: &ModelKeys) -> ModelChange {
        let node = (keys.node && self.node != *src.node())
            .then(|| std::mem::replace(&mut self.node, src.node().clone()));
        ModelChange {
            node,
            // Held under the uid copy the workload holds.
            workloads: take(
                &mut self.workloads,
                |k| src.workload(k).map(|w| (w.uid.clone(), w)),
                || src.workloads_in(&keys.workloads).into_iter().map(|w| (w.uid.clone(), w)).collect(),
                &keys.workloads,
            ),
            services: take(
                &mut self.services,
                |k| src.service(k),
                || src.services_in(&keys.services),
                &keys.services,
            ),
            policies: take(
                &mut self.policies,
                |k| Some((k.clone(), src.policy(k)?)),
                || keys.policies.iter().filter_map(|k| Some((k.clone(), src.policy(k)?))).collect(),
                &keys.policies,
            ),
        }
    }

    /// Undoes [`take_from`](Self::take_from).
    pub fn revert(&mut self, change: ModelChange) {
        if let Some(n) = change.node {
            self.node = n;
        }
        put_back(&mut self.workloads, change.workloads);
        put_back(&mut self.services, change.services);
        put_back(&mut self.policies, change.policies);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(uid: &str, name: &str) -> Arc<Workload> {
        Arc::new(Workload { uid: uid.into(), name: name.into(), ..Default::default() })
    }

    #[test]
    fn taking_a_change_in_and_reverting_it_round_trip() {
        let mut a = Model::default();
        a.workloads.insert("w1".into(), workload("w1", "one"));
        a.workloads.insert("w2".into(), workload("w2", "two"));
        let mut b = a.clone();
        b.workloads.remove("w1");
        b.workloads.insert("w2".into(), workload("w2", "two-changed"));
        b.workloads.insert("w3".into(), workload("w3", "three"));
        b.node.name = "n".into();
        let keys = ModelKeys::between(&a, &b);
        assert_eq!(keys.workloads, BTreeSet::from(["w1".into(), "w2".into(), "w3".into()]));
        assert!(keys.node);

        let mut m = a.clone();
        let change = m.take_from(&b, &keys);
        assert_eq!(m, b);
        assert_eq!(change.old_workload(&m, "w1").map(|w| w.name.as_str()), Some("one"));
        assert_eq!(change.old_workload(&m, "w2").map(|w| w.name.as_str()), Some("two"));
        assert!(change.old_workload(&m, "w3").is_none());
        m.revert(change);
        assert_eq!(m, a);
    }

    #[test]
    fn taking_into_an_empty_model_takes_only_the_named_entries_and_reverts_to_empty() {
        let mut src = Model::default();
        for i in 0..100 {
            let uid = format!("w{i:03}");
            src.workloads.insert(uid.as_str().into(), workload(&uid, "x"));
        }
        // Most of the source (one walk over both), then a few keys (a search each); some named
        // keys are not in the source.
        for named in
            [(0..90).map(|i| format!("w{i:03}")).collect::<Vec<_>>(), vec!["w005".into(), "w077".into()]]
        {
            let mut keys = ModelKeys {
                workloads: named.iter().map(|k| k.as_str().into()).collect(),
                ..Default::default()
            };
            keys.workloads.insert("gone".into());
            keys.workloads.insert("w999".into());
            let mut m = Model::default();
            let change = m.take_from(&src, &keys);
            let got: Vec<&str> = m.workloads.keys().map(|k| k.as_str()).collect();
            assert_eq!(got, named.iter().map(|k| k.as_str()).collect::<Vec<_>>());
            assert_eq!(change.workloads.len(), named.len(), "only what was added is recorded");
            assert!(change.workloads.values().all(|v| v.is_none()));
            m.revert(change);
            assert!(m.workloads.is_empty());
        }
    }

    #[test]
    fn equal_entries_are_not_reported_as_changed() {
        let mut a = Model::default();
        a.workloads.insert("w1".into(), workload("w1", "one"));
        let mut b = Model::default();
        b.workloads.insert("w1".into(), workload("w1", "one"));
        assert!(ModelKeys::between(&a, &b).is_empty());
        let keys = ModelKeys { workloads: BTreeSet::from(["w1".into()]), ..Default::default() };
        assert!(a.take_from(&b, &keys).is_empty());
    }
}
