//! Interned strings for the labels a mesh repeats on every workload (namespace, node, cluster,
//! network, locality, service account, trust domain, app and version): one shared copy per
//! distinct value instead of one heap string per workload and field.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex};

use serde::{Serialize, Serializer};

/// An immutable string shared by every holder of the same value (see [`Istr::new`]). Compares,
/// orders and hashes as the `str` it holds.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Istr(Arc<str>);

/// Values handed out, so that equal values share one allocation. Entries no holder uses any
/// more are dropped whenever the table has doubled since the last sweep, so a cluster whose
/// namespaces come and go does not grow it forever.
struct Table {
    set: HashSet<Arc<str>>,
    sweep_at: usize,
}

static TABLE: Mutex<Option<Table>> = Mutex::new(None);

impl Istr {
    /// The shared copy of `s`.
    pub fn new(s: &str) -> Self {
        if s.is_empty() {
            return Self::default();
        }
        let mut guard = TABLE.lock().unwrap_or_else(|p| p.into_inner());
        let t = guard.get_or_insert_with(|| Table { set: HashSet::new(), sweep_at: 1024 });
        if let Some(a) = t.set.get(s) {
            return Self(a.clone());
        }
        if t.set.len() >= t.sweep_at {
            t.set.retain(|a| Arc::strong_count(a) > 1);
            t.sweep_at = (t.set.len() * 2).max(1024);
        }
        let a: Arc<str> = Arc::from(s);
        t.set.insert(a.clone());
        Self(a)
    }

    /// A string shared by its holders but not interned: for values that are unique anyway
    /// (a workload's uid), held by several maps at once as one copy without a table entry.
    pub fn unique(s: &str) -> Self {
        if s.is_empty() {
            return Self::default();
        }
        Self(Arc::from(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Istr {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Istr {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Istr {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Istr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Istr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for Istr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
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
        s.0.to_string()
    }
}

impl PartialEq<str> for Istr {
    fn eq(&self, o: &str) -> bool {
        &*self.0 == o
    }
}

impl PartialEq<&str> for Istr {
    fn eq(&self, o: &&str) -> bool {
        &*self.0 == *o
    }
}

impl PartialEq<String> for Istr {
    fn eq(&self, o: &String) -> bool {
        *self.0 == **o
    }
}

impl PartialEq<Istr> for String {
    fn eq(&self, o: &Istr) -> bool {
        **self == *o.0
    }
}

impl PartialEq<Istr> for str {
    fn eq(&self, o: &Istr) -> bool {
        *self == *o.0
    }
}

impl PartialEq<Istr> for &str {
    fn eq(&self, o: &Istr) -> bool {
        **self == *o.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_share_one_copy_and_unused_ones_are_swept() {
        let a = Istr::new("prod-namespace-for-istr-test");
        let b = Istr::from(String::from("prod-namespace-for-istr-test"));
        assert!(Arc::ptr_eq(&a.0, &b.0));
        assert_eq!(a, "prod-namespace-for-istr-test");
        assert_eq!(a.to_string(), "prod-namespace-for-istr-test");
        assert!(Istr::new("").is_empty());
        // Thousands of values that nobody keeps do not stay in the table.
        for i in 0..5000 {
            let _ = Istr::new(&format!("gone-{i}"));
        }
        let t = TABLE.lock().unwrap();
        assert!(t.as_ref().unwrap().set.len() < 4096, "{}", t.as_ref().unwrap().set.len());
    }
}
