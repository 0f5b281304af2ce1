//! Interned strings for the labels a mesh repeats on every workload (namespace, node, cluster,
//! network, locality, service account, trust domain, app and version): one shared copy per
//! distinct value instead of one heap string per workload and field.
//!
//! An `Istr` is one pointer wide (8 bytes, not the 16 of an `Arc<str>`): the length lives in the
//! shared allocation, next to the bytes. A workload holds eleven of them (its name and a
//! service's name and hostname are one too, see [`names`](crate::names)), and the model's
//! indexes key on them, so this halves what each holder pays.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use foldhash::fast::RandomState;

use serde::{Serialize, Serializer};
use triomphe::ThinArc;

/// One shared, immutable, non-empty string: a thin pointer to a count, a length and the bytes.
#[derive(Clone)]
struct Thin(ThinArc<(), u8>);

impl Thin {
    fn new(s: &str) -> Self {
        Self(ThinArc::from_header_and_slice((), s.as_bytes()))
    }

    /// Whether both are the same allocation (never empty: distinct allocations have distinct
    /// byte addresses).
    fn same(&self, o: &Self) -> bool {
        std::ptr::eq(self.0.slice.as_ptr(), o.0.slice.as_ptr())
    }

    fn as_str(&self) -> &str {
        // Safety: made only from a `&str` (see `new`), never changed.
        unsafe { std::str::from_utf8_unchecked(&self.0.slice) }
    }
}

impl PartialEq for Thin {
    fn eq(&self, o: &Self) -> bool {
        // One interned copy per value: equal pointers, equal strings (the common case).
        self.same(o) || self.as_str() == o.as_str()
    }
}

impl Eq for Thin {}

impl Hash for Thin {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.as_str().hash(h)
    }
}

impl Borrow<str> for Thin {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

/// An immutable string shared by every holder of the same value (see [`Istr::new`]). Compares,
/// orders and hashes as the `str` it holds. The empty string holds no allocation.
#[derive(Clone, Default)]
pub struct Istr(Option<Thin>);

/// Values handed out, so that equal values share one allocation. Entries no holder uses any
/// more are dropped whenever the table has doubled since the last sweep, so a cluster whose
/// namespaces come and go does not grow it forever.
struct Table {
    set: HashSet<Thin, RandomState>,
    sweep_at: usize,
}

static TABLE: Mutex<Option<Table>> = Mutex::new(None);

/// The most values a thread keeps at hand (see `RECENT`).
const RECENT_MAX: usize = 256;

thread_local! {
    /// Values this thread looked up lately: a push repeats a few labels on every workload, so
    /// threads decoding one in parallel find nearly all of them here, without the table's lock.
    /// Bounded (emptied when full): what it keeps alive is a few hundred strings at most.
    static RECENT: std::cell::RefCell<HashSet<Thin, RandomState>> = std::cell::RefCell::new(HashSet::default());
}

impl Istr {
    /// The shared copy of `s`.
    pub fn new(s: &str) -> Self {
        if s.is_empty() {
            return Self::default();
        }
        if let Some(a) = RECENT.with(|r| r.borrow().get(s).cloned()) {
            return Self(Some(a));
        }
        let a = Self::from_table(s);
        RECENT.with(|r| {
            let mut r = r.borrow_mut();
            if r.len() >= RECENT_MAX {
                r.clear();
            }
            r.insert(a.clone());
        });
        Self(Some(a))
    }

    fn from_table(s: &str) -> Thin {
        let mut guard = TABLE.lock().unwrap_or_else(|p| p.into_inner());
        let t = guard.get_or_insert_with(|| Table { set: HashSet::default(), sweep_at: 1024 });
        if let Some(a) = t.set.get(s) {
            return a.clone();
        }
        if t.set.len() >= t.sweep_at {
            t.set.retain(|a| ThinArc::strong_count(&a.0) > 1);
            t.sweep_at = (t.set.len() * 2).max(1024);
        }
        let a = Thin::new(s);
        t.set.insert(a.clone());
        a
    }

    /// A string shared by its holders but not interned: for values that are unique anyway
    /// (a workload's uid), held by several maps at once as one copy without a table entry.
    pub fn unique(s: &str) -> Self {
        if s.is_empty() {
            return Self::default();
        }
        Self(Some(Thin::new(s)))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_ref().map_or("", Thin::as_str)
    }
}

impl PartialEq for Istr {
    fn eq(&self, o: &Self) -> bool {
        self.0 == o.0
    }
}

impl Eq for Istr {}

impl PartialOrd for Istr {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for Istr {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        match (&self.0, &o.0) {
            (Some(a), Some(b)) if a.same(b) => std::cmp::Ordering::Equal,
            _ => self.as_str().cmp(o.as_str()),
        }
    }
}

impl Hash for Istr {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.as_str().hash(h)
    }
}

impl std::ops::Deref for Istr {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Istr {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for Istr {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for Istr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Istr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for Istr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl From<&str> for Istr {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<String> for Istr {
    fn from(s: String) -> Self {
        Self::new(&s)
    }
}

impl From<&String> for Istr {
    fn from(s: &String) -> Self {
        Self::new(s)
    }
}

impl From<Istr> for String {
    fn from(s: Istr) -> Self {
        s.as_str().to_string()
    }
}

impl PartialEq<str> for Istr {
    fn eq(&self, o: &str) -> bool {
        self.as_str() == o
    }
}

impl PartialEq<&str> for Istr {
    fn eq(&self, o: &&str) -> bool {
        self.as_str() == *o
    }
}

impl PartialEq<String> for Istr {
    fn eq(&self, o: &String) -> bool {
        self.as_str() == o.as_str()
    }
}

impl PartialEq<Istr> for String {
    fn eq(&self, o: &Istr) -> bool {
        self.as_str() == o.as_str()
    }
}

impl PartialEq<Istr> for str {
    fn eq(&self, o: &Istr) -> bool {
        self == o.as_str()
    }
}

impl PartialEq<Istr> for &str {
    fn eq(&self, o: &Istr) -> bool {
        *self == o.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_share_one_copy_and_unused_ones_are_swept() {
        let a = Istr::new("prod-namespace-for-istr-test");
        let b = Istr::from(String::from("prod-namespace-for-istr-test"));
        assert_eq!(a.0.as_ref().unwrap().0.ptr(), b.0.as_ref().unwrap().0.ptr());
        assert_eq!(std::mem::size_of::<Istr>(), 8, "one pointer");
        let u = Istr::unique("prod-namespace-for-istr-test");
        assert_ne!(u.0.as_ref().unwrap().0.ptr(), a.0.as_ref().unwrap().0.ptr(), "not interned");
        assert_eq!(u, a);
        assert_eq!(a, "prod-namespace-for-istr-test");
        assert_eq!(a.to_string(), "prod-namespace-for-istr-test");
        assert!(Istr::new("").is_empty());
        // Thousands of values that nobody keeps do not stay in the table. (Tests running at
        // the same time intern values of their own: the table is swept when it has doubled
        // since the last sweep, so what stays depends on what they hold; far fewer than all.)
        for i in 0..20_000 {
            let _ = Istr::new(&format!("gone-{i}"));
        }
        let t = TABLE.lock().unwrap();
        let gone = t.as_ref().unwrap().set.iter().filter(|a| a.as_str().starts_with("gone-")).count();
        assert!(gone < 15_000, "{gone} of 20000 unused values stay");
    }
}
