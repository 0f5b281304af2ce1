//! A parsed resource in one word: the xDS state's index holds one per resource (110k at
//! 10k services x 10 endpoints), so an enum of three `Arc`s (a tag and a pointer, 16 bytes)
//! costs 0.9 MB more than a pointer carrying its kind in its low bits.

use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::Arc;

use kmesh_model::model::{Policy, Service, Workload};

const WORKLOAD: usize = 0;
const SERVICE: usize = 1;
const POLICY: usize = 2;
const TAG: usize = 0b11;

// The tag lives in the bits an `Arc`'s value pointer never sets: each value is at least
// 4-aligned.
const _: () =
    assert!(align_of::<Workload>() > TAG && align_of::<Service>() > TAG && align_of::<Policy>() > TAG);

/// A workload, service or policy, shared (see the module).
pub(super) struct Parsed {
    /// `Arc::into_raw` of the value, its kind (`WORKLOAD`, ...) in the low bits.
    tagged: NonNull<u8>,
}

// Safety: a `Parsed` owns one strong count of an `Arc` of a `Send + Sync` value, as the `Arc`
// itself would.
unsafe impl Send for Parsed {}
unsafe impl Sync for Parsed {}

/// A resource's value by kind, borrowed from a [`Parsed`].
pub(super) enum View<'a> {
    Workload(Borrowed<'a, Workload>),
    Service(Borrowed<'a, Service>),
    Policy(Borrowed<'a, Policy>),
}

/// An `Arc` a [`Parsed`] holds, lent for as long as the `Parsed` is: cloning it takes a count.
pub(super) struct Borrowed<'a, T> {
    arc: ManuallyDrop<Arc<T>>,
    _of: PhantomData<&'a Parsed>,
}

impl<T> Deref for Borrowed<'_, T> {
    type Target = Arc<T>;
    fn deref(&self) -> &Arc<T> {
        &self.arc
    }
}

impl Parsed {
    fn pack<T>(arc: Arc<T>, tag: usize) -> Self {
        let raw = Arc::into_raw(arc) as *mut u8;
        debug_assert_eq!(raw as usize & TAG, 0);
        let tagged = NonNull::new(raw.map_addr(|a| a | tag)).expect("an Arc's pointer is never null");
        Parsed { tagged }
    }

    pub(super) fn workload(w: Arc<Workload>) -> Self {
        Self::pack(w, WORKLOAD)
    }

    pub(super) fn service(s: Arc<Service>) -> Self {
        Self::pack(s, SERVICE)
    }

    pub(super) fn policy(p: Arc<Policy>) -> Self {
        Self::pack(p, POLICY)
    }

    fn tag(&self) -> usize {
        self.tagged.as_ptr() as usize & TAG
    }

    fn raw<T>(&self) -> *const T {
        self.tagged.as_ptr().map_addr(|a| a & !TAG) as *const T
    }

    /// The `Arc` behind the pointer, not counted: never dropped, only borrowed or forgotten.
    ///
    /// # Safety
    /// `T` must be the type this `Parsed` was made from (its tag's).
    unsafe fn lend<T>(&self) -> Borrowed<'_, T> {
        // Safety: the pointer came from `Arc::into_raw` of an `Arc<T>` (the caller's promise)
        // whose count this `Parsed` holds until it drops, which the borrow outlives not.
        Borrowed { arc: ManuallyDrop::new(unsafe { Arc::from_raw(self.raw::<T>()) }), _of: PhantomData }
    }

    pub(super) fn view(&self) -> View<'_> {
        // Safety: each tag is only ever given to its type (see the constructors).
        unsafe {
            match self.tag() {
                WORKLOAD => View::Workload(self.lend()),
                SERVICE => View::Service(self.lend()),
                _ => View::Policy(self.lend()),
            }
        }
    }

    /// The workload, if this is one.
    pub(super) fn as_workload(&self) -> Option<&Workload> {
        // Safety: the tag says the pointer is an `Arc<Workload>`'s value, alive while `self` is.
        (self.tag() == WORKLOAD).then(|| unsafe { &*self.raw::<Workload>() })
    }

    /// The service, if this is one.
    pub(super) fn as_service(&self) -> Option<&Service> {
        // Safety: as in `as_workload`.
        (self.tag() == SERVICE).then(|| unsafe { &*self.raw::<Service>() })
    }
}

impl Clone for Parsed {
    fn clone(&self) -> Self {
        match self.view() {
            View::Workload(w) => Parsed::workload(Arc::clone(&w)),
            View::Service(s) => Parsed::service(Arc::clone(&s)),
            View::Policy(p) => Parsed::policy(Arc::clone(&p)),
        }
    }
}

impl Drop for Parsed {
    fn drop(&mut self) {
        // Safety: as in `view`; the pointer is the `Arc<T>` of its tag's type, and this is the
        // count's one release.
        unsafe {
            match self.tag() {
                WORKLOAD => drop(Arc::<Workload>::from_raw(self.raw())),
                SERVICE => drop(Arc::<Service>::from_raw(self.raw())),
                _ => drop(Arc::<Policy>::from_raw(self.raw())),
            }
        }
    }
}

impl PartialEq for Parsed {
    fn eq(&self, o: &Self) -> bool {
        match (self.view(), o.view()) {
            (View::Workload(a), View::Workload(b)) => **a == **b,
            (View::Service(a), View::Service(b)) => **a == **b,
            (View::Policy(a), View::Policy(b)) => **a == **b,
            _ => false,
        }
    }
}

impl Eq for Parsed {}

impl std::fmt::Debug for Parsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.view() {
            View::Workload(w) => f.debug_tuple("Workload").field(&**w).finish(),
            View::Service(s) => f.debug_tuple("Service").field(&**s).finish(),
            View::Policy(p) => f.debug_tuple("Policy").field(&**p).finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_word_that_holds_one_count_and_gives_it_back() {
        assert_eq!(size_of::<Parsed>(), 8);
        assert_eq!(size_of::<Option<Parsed>>(), 8);
        let w = Arc::new(Workload { uid: "u1".into(), ..Default::default() });
        let s = Arc::new(Service { namespace: "ns".into(), ..Default::default() });
        let p = Arc::new(Policy { name: "deny".into(), ..Default::default() });
        let (pw, ps, pp) =
            (Parsed::workload(w.clone()), Parsed::service(s.clone()), Parsed::policy(p.clone()));
        assert_eq!((Arc::strong_count(&w), Arc::strong_count(&s), Arc::strong_count(&p)), (2, 2, 2));
        assert!(matches!(pw.view(), View::Workload(x) if Arc::ptr_eq(&x, &w)));
        assert!(matches!(ps.view(), View::Service(x) if Arc::ptr_eq(&x, &s)));
        assert!(matches!(pp.view(), View::Policy(x) if Arc::ptr_eq(&x, &p)));
        // Views lend; clones count.
        let copies = [pw.clone(), ps.clone(), pp.clone()];
        assert_eq!((Arc::strong_count(&w), Arc::strong_count(&s), Arc::strong_count(&p)), (3, 3, 3));
        assert_eq!(copies[0], pw);
        assert_ne!(copies[0], ps);
        drop(copies);
        assert_eq!((Arc::strong_count(&w), Arc::strong_count(&s), Arc::strong_count(&p)), (2, 2, 2));
        // Equal values compare equal, whichever copy holds them.
        let other = Parsed::workload(Arc::new(Workload { uid: "u1".into(), ..Default::default() }));
        assert_eq!(other, pw);
        assert!(format!("{pw:?}").starts_with("Workload(Workload { uid: \"u1\""));
        assert_eq!(pw.as_workload().map(|x| x.uid.as_str()), Some("u1"));
        assert!(pw.as_service().is_none() && pp.as_workload().is_none());
        assert_eq!(ps.as_service().map(|x| x.namespace.as_str()), Some("ns"));
        // Dropped, it gives its count back.
        drop(pw);
        assert_eq!(Arc::strong_count(&w), 1);
        drop((ps, pp));
        assert_eq!((Arc::strong_count(&s), Arc::strong_count(&p)), (1, 1));
    }
}
