//! Names held in one pointer without an allocation of their own where another string already
//! holds them: a workload's name is the end of its uid (istiod's uids end with `/NAME`), a
//! service's hostname the end of its key (`namespace/hostname`, interned: the copy the model and
//! the workloads key the service by), and its name, most often, the hostname's first label.
//! Each type holds the longer string and reads as its part; a value that cannot be read out of
//! one is held on its own (escaped where a read would misread it).

use serde::Serialize;

use crate::istr::Istr;

/// A string stored with a trailing `\0` is held on its own and reads without it; any other
/// reads through `derive`.
fn escaped_or(s: &str, derive: impl FnOnce(&str) -> &str) -> &str {
    match s.strip_suffix('\0') {
        Some(own) => own,
        None => derive(s),
    }
}

/// A value held on its own: escaped (a `\0` after it) when it holds a `/` or ends in `\0`,
/// which a read would take for a key or an escape.
fn own(v: &str) -> Istr {
    if v.ends_with('\0') || v.contains('/') { Istr::unique(&format!("{v}\0")) } else { Istr::unique(v) }
}

/// A service's hostname, one pointer wide: normally the service's key (`namespace/hostname`,
/// interned: the copy the model and the workloads key the service by), read as its part after
/// the `/`, so the hostname has no allocation of its own. Reads (`Deref`, `Display`,
/// comparisons, serialization) see the hostname.
#[derive(Clone, Default)]
pub struct Hostname(Istr);

impl Hostname {
    /// `host` of a service in `namespace`, held as the service's key.
    pub fn new(namespace: &str, host: &str) -> Self {
        if namespace.is_empty() || namespace.contains('/') || host.contains('/') || host.ends_with('\0') {
            return Self::own(host);
        }
        Self(Istr::new(&format!("{namespace}/{host}")))
    }

    /// A hostname held on its own (not a key).
    pub fn own(host: &str) -> Self {
        Self(own(host))
    }

    pub fn as_str(&self) -> &str {
        escaped_or(self.0.as_str(), |s| s.split_once('/').map_or(s, |(_, h)| h))
    }

    /// The service's key when this hostname holds it.
    fn key(&self) -> Option<&Istr> {
        let s = self.0.as_str();
        (!s.ends_with('\0') && s.contains('/')).then_some(&self.0)
    }
}

/// A service's name, one pointer wide: when the hostname's first label is the name (as a
/// Kubernetes service's `NAME.NAMESPACE.svc.DOMAIN` is), it holds the service's key and reads
/// as that label; otherwise its own copy. Reads see the name.
#[derive(Clone, Default)]
pub struct ServiceName(Istr);

impl ServiceName {
    pub fn new(hostname: &Hostname, name: &str) -> Self {
        match hostname.key() {
            Some(key)
                if !name.is_empty()
                    && !name.contains(['/', '.'])
                    && hostname.as_str().split('.').next() == Some(name) =>
            {
                Self(key.clone())
            }
            _ => Self::own(name),
        }
    }

    pub fn own(name: &str) -> Self {
        Self(own(name))
    }

    pub fn as_str(&self) -> &str {
        escaped_or(self.0.as_str(), |s| match s.split_once('/') {
            Some((_, host)) => host.split('.').next().unwrap_or(host),
            None => s,
        })
    }
}

/// A workload's name, one pointer wide and, when the uid ends with `/NAME` (istiod's uids end
/// with the pod's name), without an allocation of its own: it then holds the uid and reads as
/// the uid's last segment. Reads (`Deref`, `Display`, comparisons, serialization) see the name.
///
/// What the pointer holds, and how it reads: the uid (ends in neither `\0` nor a name holding
/// `/`): the part after its last `/`; a name that holds a `/` or ends in `\0`: that name and
/// a `\0` after it, read without the `\0`; any other name: itself.
#[derive(Clone, Default)]
pub struct WorkloadName(Istr);

impl WorkloadName {
    /// `name` for the workload `uid`, sharing the uid's allocation when it ends with `/name`.
    pub fn new(uid: &Istr, name: &str) -> Self {
        let in_uid = !name.is_empty()
            && !name.contains('/')
            && !uid.ends_with('\0')
            && uid.strip_suffix(name).is_some_and(|rest| rest.ends_with('/'));
        if in_uid { Self(uid.clone()) } else { Self::own(name) }
    }

    /// A name held on its own (not derived from a uid).
    pub fn own(name: &str) -> Self {
        Self(own(name))
    }

    pub fn as_str(&self) -> &str {
        escaped_or(self.0.as_str(), |s| s.rsplit_once('/').map_or(s, |(_, tail)| tail))
    }
}

/// String-like reads for the one-pointer name types above.
macro_rules! reads_as_str {
    ($($t:ty),*) => {$(
        impl From<&str> for $t {
            fn from(s: &str) -> Self {
                Self::own(s)
            }
        }

        impl From<String> for $t {
            fn from(s: String) -> Self {
                Self::own(&s)
            }
        }

        impl std::ops::Deref for $t {
            type Target = str;
            fn deref(&self) -> &str {
                self.as_str()
            }
        }

        impl PartialEq for $t {
            fn eq(&self, o: &Self) -> bool {
                self.as_str() == o.as_str()
            }
        }

        impl Eq for $t {}

        impl PartialEq<str> for $t {
            fn eq(&self, o: &str) -> bool {
                self.as_str() == o
            }
        }

        impl PartialEq<&str> for $t {
            fn eq(&self, o: &&str) -> bool {
                self.as_str() == *o
            }
        }

        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::Debug::fmt(self.as_str(), f)
            }
        }

        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    )*};
}

reads_as_str!(WorkloadName, ServiceName, Hostname);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_name_reads_the_same_whether_or_not_the_uid_holds_it() {
        let uid = Istr::unique("Kubernetes//Pod/prod/web-1");
        let n = WorkloadName::new(&uid, "web-1");
        assert_eq!((&*n, std::ptr::eq(n.0.as_str(), uid.as_str())), ("web-1", true), "shared with the uid");
        for (uid, name) in [
            ("Kubernetes//Pod/prod/web-1", "web"),
            ("Kubernetes//Pod/prod/web-1", "eb-1"),
            ("Kubernetes//Pod/prod/web-1", ""),
            ("Kubernetes//Pod/prod/web-1", "prod/web-1"),
            ("a/b\0", "b\0"),
            ("x", "name\0"),
            ("x", "a/b"),
            ("web-1", "web-1"),
        ] {
            let n = WorkloadName::new(&Istr::unique(uid), name);
            assert_eq!(&*n, name, "uid {uid:?}");
            assert_eq!(n.to_string(), name);
            assert_eq!(serde_json::to_string(&n).unwrap(), serde_json::to_string(name).unwrap());
        }
        assert_eq!(WorkloadName::from("a/b"), WorkloadName::new(&Istr::unique("x/a/b"), "a/b"));
    }

    #[test]
    fn a_service_hostname_and_name_read_the_same_whether_or_not_the_key_holds_them() {
        let h = Hostname::new("prod", "web.prod.svc.cluster.local");
        let n = ServiceName::new(&h, "web");
        let key = Istr::new("prod/web.prod.svc.cluster.local");
        assert!(
            std::ptr::eq(h.0.as_str(), key.as_str()) && std::ptr::eq(n.0.as_str(), key.as_str()),
            "one copy"
        );
        assert_eq!((&*h, &*n), ("web.prod.svc.cluster.local", "web"));
        for (ns, host, name) in [
            ("prod", "web.prod.svc.cluster.local", "api"),
            ("prod", "web.prod.svc.cluster.local", "we"),
            ("prod", "web.prod.svc.cluster.local", "web.prod"),
            ("prod", "web", "web"),
            ("prod", "web", ""),
            ("prod", "a/b", "a/b"),
            ("", "web.example.com", "web"),
            ("prod", "x\0", "x\0"),
            ("prod", "db.example.com", "db/x\0"),
        ] {
            let h = Hostname::new(ns, host);
            let n = ServiceName::new(&h, name);
            assert_eq!((&*h, &*n), (host, name), "{ns:?} {host:?} {name:?}");
            assert_eq!(serde_json::to_string(&h).unwrap(), serde_json::to_string(host).unwrap());
        }
        assert_eq!(Hostname::from("a/b"), Hostname::new("ns", "a/b"));
        assert_eq!(ServiceName::from("a.b"), ServiceName::new(&Hostname::new("ns", "a.b"), "a.b"));
    }
}
