//! Values many workloads hold alike, interned: the list of services a workload backs (a
//! service's endpoints list the same one), who a workload is (the pods of one service account
//! share it: [`WorkloadProfile`]) and where it runs (a node's pods share it: [`Placement`]).
//! A holder keeps one pointer (8 bytes) to a single shared copy, instead of the value inline
//! (24 bytes for a list, several words for the others) plus, for a list, an allocation of its
//! own per workload.
//!
//! Interning works as for [`Istr`](crate::Istr): a table per type of the values handed out,
//! swept of values no holder uses whenever it has doubled since the last sweep.

use std::borrow::Borrow;
use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::thread::LocalKey;

use foldhash::fast::RandomState;
use serde::{Serialize, Serializer};
use triomphe::Arc;

use crate::model::{Istr, Placement, PortMapping, WorkloadProfile};

/// A type whose values are interned by [`Shared`]: each has a table of its own, and each
/// thread remembers the value it interned last (see [`Shared::new`]). Implemented by
/// `interned!`.
pub trait Intern: Hash + Eq + Default + Send + Sync + Sized + 'static {
    fn table() -> &'static Mutex<Option<Table<Self>>>;
    fn last() -> &'static LocalKey<RefCell<Option<Arc<Self>>>>;
}

/// The values of one type handed out (see [`Intern`]).
pub struct Table<T> {
    set: HashSet<Key<T>, RandomState>,
    sweep_at: usize,
}

/// A table entry: hashes and compares as the value it points to.
struct Key<T>(Arc<T>);

impl<T: PartialEq> PartialEq for Key<T> {
    fn eq(&self, o: &Self) -> bool {
        *self.0 == *o.0
    }
}

impl<T: Eq> Eq for Key<T> {}

impl<T: Hash> Hash for Key<T> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        (*self.0).hash(h)
    }
}

impl<T> Borrow<T> for Key<T> {
    fn borrow(&self) -> &T {
        &self.0
    }
}

/// One shared copy of a value of `T`, held by every holder of an equal value. Compares,
/// hashes and serializes as the value.
pub struct Shared<T: Intern>(Arc<T>);

impl<T: Intern> Shared<T> {
    /// The shared copy of `v`. A value equal to the one this thread interned last is taken
    /// from it without the table's lock or a hash: a push lists a deployment's replicas, a
    /// service's endpoints, one after the other, and the decode runs on two threads. (That
    /// last value stays held, one per thread and type, until the thread interns another.)
    pub fn new(v: T) -> Self {
        if let Some(a) = T::last().with(|l| l.borrow().as_ref().filter(|a| ***a == v).cloned()) {
            return Self(a);
        }
        let a = Self::from_table(v);
        T::last().with(|l| *l.borrow_mut() = Some(a.clone()));
        Self(a)
    }

    fn from_table(v: T) -> Arc<T> {
        let mut guard = T::table().lock().unwrap_or_else(|p| p.into_inner());
        let t = guard.get_or_insert_with(|| Table { set: HashSet::default(), sweep_at: 1024 });
        if let Some(k) = t.set.get(&v) {
            return k.0.clone();
        }
        if t.set.len() >= t.sweep_at {
            t.set.retain(|k| !k.0.is_unique());
            t.sweep_at = (t.set.len() * 2).max(1024);
        }
        let a = Arc::new(v);
        t.set.insert(Key(a.clone()));
        a
    }
}

impl<T: Intern> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T: Intern> Default for Shared<T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

impl<T: Intern> From<T> for Shared<T> {
    fn from(v: T) -> Self {
        Self::new(v)
    }
}

impl<T: Intern> std::ops::Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: Intern> PartialEq for Shared<T> {
    fn eq(&self, o: &Self) -> bool {
        Arc::ptr_eq(&self.0, &o.0) || *self.0 == *o.0
    }
}

impl<T: Intern> Eq for Shared<T> {}

impl<T: Intern + PartialOrd> PartialOrd for Shared<T> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        (*self.0).partial_cmp(&*o.0)
    }
}

impl<T: Intern + Ord> Ord for Shared<T> {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (*self.0).cmp(&*o.0)
    }
}

impl<T: Intern> Hash for Shared<T> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        (*self.0).hash(h)
    }
}

impl<T: Intern + fmt::Debug> fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (*self.0).fmt(f)
    }
}

impl<T: Intern + Serialize> Serialize for Shared<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (*self.0).serialize(s)
    }
}

/// The services a workload backs, keyed `namespace/hostname`, each with the workload's port
/// mappings for it, in key order: a boxed slice (exactly sized, and a workload's is shared
/// through [`Shared`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceList(Box<[(Istr, Box<[PortMapping]>)]>);

impl ServiceList {
    fn find(&self, k: &str) -> Option<usize> {
        self.0.binary_search_by(|(x, _)| x.as_str().cmp(k)).ok()
    }

    pub fn get(&self, k: &str) -> Option<&[PortMapping]> {
        self.find(k).map(|i| &*self.0[i].1)
    }

    pub fn contains_key(&self, k: &str) -> bool {
        self.find(k).is_some()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&Istr, &[PortMapping])> {
        self.0.iter().map(|(k, v)| (k, &**v))
    }

    pub fn keys(&self) -> impl ExactSizeIterator<Item = &Istr> {
        self.0.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl ExactSizeIterator<Item = &[PortMapping]> {
        self.0.iter().map(|(_, v)| &**v)
    }
}

/// Sorted by key; of entries with equal keys the last one stays (as a map's insert would).
impl<P: Into<Box<[PortMapping]>>> FromIterator<(Istr, P)> for ServiceList {
    fn from_iter<I: IntoIterator<Item = (Istr, P)>>(it: I) -> Self {
        let mut v: Vec<(Istr, Box<[PortMapping]>)> = it.into_iter().map(|(k, p)| (k, p.into())).collect();
        // Stable: equal keys keep their order, so the last one is the one kept.
        v.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(Istr, Box<[PortMapping]>)> = Vec::with_capacity(v.len());
        for e in v {
            match out.last_mut() {
                Some(last) if last.0 == e.0 => *last = e,
                _ => out.push(e),
            }
        }
        Self(out.into_boxed_slice())
    }
}

impl Serialize for ServiceList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<P: Into<Box<[PortMapping]>>> FromIterator<(Istr, P)> for Shared<ServiceList> {
    fn from_iter<I: IntoIterator<Item = (Istr, P)>>(it: I) -> Self {
        Shared::new(it.into_iter().collect())
    }
}

/// Gives `T` its table and its threads' last value.
macro_rules! interned {
    ($t:ty) => {
        impl Intern for $t {
            fn table() -> &'static Mutex<Option<Table<Self>>> {
                static T: Mutex<Option<Table<$t>>> = Mutex::new(None);
                &T
            }
            fn last() -> &'static LocalKey<RefCell<Option<Arc<Self>>>> {
                thread_local!(static L: RefCell<Option<Arc<$t>>> = const { RefCell::new(None) });
                &L
            }
        }
    };
}

interned!(ServiceList);
interned!(WorkloadProfile);
interned!(Placement);

#[cfg(test)]
mod tests {
    use super::*;

    fn pm(s: u16, t: u16) -> PortMapping {
        PortMapping { service_port: s, target_port: t }
    }

    #[test]
    fn equal_values_share_one_copy_and_lookups_see_the_sorted_list() {
        let a: Shared<ServiceList> =
            [(Istr::new("ns/b"), vec![pm(80, 8080)]), (Istr::new("ns/a"), vec![])].into_iter().collect();
        let b: Shared<ServiceList> =
            [(Istr::new("ns/a"), vec![]), (Istr::new("ns/b"), vec![pm(80, 8080)])].into_iter().collect();
        assert!(Arc::ptr_eq(&a.0, &b.0), "equal lists are one allocation");
        assert_eq!(a.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["ns/a", "ns/b"]);
        assert_eq!(a.get("ns/b"), Some(&[pm(80, 8080)][..]));
        assert!(a.contains_key("ns/a") && !a.contains_key("ns/c"));
        let c: Shared<ServiceList> = [(Istr::new("ns/a"), vec![pm(1, 2)])].into_iter().collect();
        assert_ne!(a, c);
        assert_eq!(
            serde_json::to_string(&*a).unwrap(),
            r#"{"ns/a":[],"ns/b":[{"service_port":80,"target_port":8080}]}"#
        );
    }

    /// Replicas share one profile whether it comes from the thread's last value or from the
    /// table, and a workload serializes as before the split (the profile's fields inline).
    #[test]
    fn replicas_share_one_profile_and_serialize_flat() {
        let p = |ns: &str| WorkloadProfile { namespace: Istr::new(ns), ..Default::default() };
        let (a, b) = (Shared::new(p("replicas/a")), Shared::new(p("replicas/a")));
        let other = Shared::new(p("replicas/b"));
        let again = Shared::new(p("replicas/a"));
        assert!(Arc::ptr_eq(&a.0, &b.0) && Arc::ptr_eq(&a.0, &again.0), "one copy");
        assert!(!Arc::ptr_eq(&a.0, &other.0));
        let from_other_thread = std::thread::spawn(move || Shared::new(p("replicas/a"))).join().unwrap();
        assert!(Arc::ptr_eq(&a.0, &from_other_thread.0), "one copy across threads");
        let w = crate::model::Workload {
            uid: Istr::unique("u"),
            profile: a,
            placement: Placement { node: Istr::new("n1"), ..Default::default() }.into(),
            ..Default::default()
        };
        let j = serde_json::to_value(&w).unwrap();
        assert_eq!((j["namespace"].as_str(), j["node"].as_str()), (Some("replicas/a"), Some("n1")));
        assert!(j.get("profile").is_none() && j.get("placement").is_none() && j.get("waypoint").is_none());
    }

    #[test]
    fn a_repeated_key_keeps_its_last_value() {
        let l: ServiceList =
            [(Istr::new("k"), vec![pm(1, 1)]), (Istr::new("k"), vec![pm(2, 2)])].into_iter().collect();
        assert_eq!(l.len(), 1);
        assert_eq!(l.get("k"), Some(&[pm(2, 2)][..]));
    }

    #[test]
    fn values_no_holder_uses_are_swept() {
        for i in 0..5000u16 {
            let _ = Shared::new(ServiceList::from_iter([(Istr::new("sweep/x"), vec![pm(i, i)])]));
        }
        let held = ServiceList::table().lock().unwrap().as_ref().unwrap().set.len();
        assert!(held < 2100, "the table keeps {held} values nobody holds");
    }
}
