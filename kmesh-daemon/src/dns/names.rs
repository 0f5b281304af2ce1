//! The names the DNS proxy answers itself: every service hostname of the model, with the
//! service's VIPs, or, for a headless service, the addresses of the healthy workloads behind
//! it. Built once per model change and shared read-only by every query; nothing here does I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::model::{HealthStatus, Model, Service};

/// TTL (seconds) of answers that carry a service's VIPs.
pub const VIP_TTL: u32 = 30;
/// TTL (seconds) of answers that carry workload addresses (headless services): they churn.
pub const HEADLESS_TTL: u32 = 5;

/// What a name resolves to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Addrs {
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
    pub ttl: u32,
    /// The addresses are workloads' (the service has no VIP).
    pub headless: bool,
}

/// The answer of [`NameTable::lookup`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found<'a> {
    /// The hostname answered: the CNAME target when `cname`, else the query name itself
    /// (lowercase, without the trailing dot).
    pub name: String,
    /// The query name is an alias (a search-list expansion) of `name`.
    pub cname: bool,
    pub addrs: &'a Addrs,
    /// `name` is the cluster domain or below it: the upstream (the cluster's DNS) knows it too.
    pub in_cluster_domain: bool,
}

/// One hostname, with what it answers per namespace: the same hostname may be declared in
/// several namespaces (service entries); the client's namespace wins, else the first.
#[derive(Debug)]
struct Entry {
    host: String,
    /// By namespace, in the model's order; never empty.
    variants: Vec<(String, Addrs)>,
}

impl Entry {
    fn addrs(&self, client_ns: Option<&str>) -> &Addrs {
        let pick = client_ns.and_then(|ns| self.variants.iter().find(|(n, _)| n == ns));
        &pick.unwrap_or(&self.variants[0]).1
    }
}

/// Every name the proxy answers, built from a [`Model`].
#[derive(Debug, Default)]
pub struct NameTable {
    /// Lowercase, without a trailing dot; empty: no cluster domain.
    domain: String,
    /// `svc.<domain>`.
    svc_domain: String,
    /// Sorted by hostname.
    entries: Vec<Entry>,
    /// Exact hostnames → index in `entries`.
    exact: HashMap<String, usize>,
    /// Wildcards by the suffix below the `*` (`example.com` for `*.example.com`) → index.
    wild: HashMap<String, usize>,
}

impl NameTable {
    /// The table for `model`; `cluster_domain` is the Kubernetes cluster domain
    /// (`cluster.local`), with or without the trailing dot.
    pub fn build(model: &Model, cluster_domain: &str) -> NameTable {
        let domain = normalize(cluster_domain).unwrap_or_default();
        let svc_domain = if domain.is_empty() { String::new() } else { format!("svc.{domain}") };

        // Healthy workload addresses of every headless service, by service key.
        let mut backends: HashMap<String, (BTreeSet<Ipv4Addr>, BTreeSet<Ipv6Addr>)> = model
            .services
            .values()
            .filter(|s| s.addresses.is_empty())
            .map(|s| (s.key(), Default::default()))
            .collect();
        if !backends.is_empty() {
            for w in model.workloads.values().filter(|w| w.status == HealthStatus::Healthy) {
                for key in w.services.keys() {
                    if let Some((v4, v6)) = backends.get_mut(key.as_str()) {
                        for ip in &w.addresses {
                            match split(*ip) {
                                IpAddr::V4(a) => v4.insert(a),
                                IpAddr::V6(a) => v6.insert(a),
                            };
                        }
                    }
                }
            }
        }

        let mut by_host: BTreeMap<String, Vec<(String, Addrs)>> = BTreeMap::new();
        for svc in model.services.values() {
            let Some(host) = valid_hostname(&svc.hostname) else { continue };
            let addrs = if svc.addresses.is_empty() {
                let (v4, v6) = backends.remove(&svc.key()).unwrap_or_default();
                Addrs {
                    v4: v4.into_iter().collect(),
                    v6: v6.into_iter().collect(),
                    ttl: HEADLESS_TTL,
                    headless: true,
                }
            } else {
                vips(svc)
            };
            let variants = by_host.entry(host).or_default();
            if !variants.iter().any(|(ns, _)| *ns == svc.namespace) {
                variants.push((svc.namespace.to_string(), addrs));
            }
        }

        let mut t = NameTable { domain, svc_domain, ..Default::default() };
        for (i, (host, variants)) in by_host.into_iter().enumerate() {
            match host.strip_prefix("*.") {
                Some(suffix) => t.wild.insert(suffix.to_string(), i),
                None => t.exact.insert(host.clone(), i),
            };
            t.entries.push(Entry { host, variants });
        }
        t
    }

    /// The answer for `qname` (any case, with or without the trailing dot) asked by a pod in
    /// `client_ns` (if known), trying the Kubernetes search list; `None`: not a mesh name,
    /// the query goes upstream.
    pub fn lookup(&self, qname: &str, client_ns: Option<&str>) -> Option<Found<'_>> {
        let q = normalize(qname)?;
        if q.split('.').any(str::is_empty) {
            return None;
        }
        let client_ns = client_ns.filter(|n| !n.is_empty());
        if let Some(e) = self.find(&q) {
            return Some(self.found(q, false, e, client_ns));
        }
        if self.domain.is_empty() {
            return None;
        }
        let ns_suffix = client_ns.map(|n| format!("{n}.{}", self.svc_domain));
        let suffixes = [ns_suffix.as_deref(), Some(self.svc_domain.as_str()), Some(self.domain.as_str())];
        for s in suffixes.into_iter().flatten() {
            let Some(b) = q.strip_suffix(s).and_then(|b| b.strip_suffix('.')).filter(|b| !b.is_empty())
            else {
                continue;
            };
            if let Some(e) = self.find(b) {
                return Some(self.found(b.to_string(), true, e, client_ns));
            }
            let labels: Vec<&str> = b.split('.').collect();
            let target = match labels[..] {
                [name] => client_ns.map(|n| format!("{name}.{n}.{}", self.svc_domain)),
                [_, _] => Some(format!("{b}.{}", self.svc_domain)),
                [_, _, "svc"] => Some(format!("{b}.{}", self.domain)),
                _ => None,
            };
            if let Some(t) = target
                && let Some(e) = self.find(&t)
            {
                return Some(self.found(t, true, e, client_ns));
            }
        }
        None
    }

    /// The number of hostnames answered (wildcards count once).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// For a debug endpoint: every hostname answered (wildcards as `*.suffix`), sorted, with
    /// its addresses (for a hostname declared in several namespaces, those of the first
    /// namespace: what a client in none of them gets).
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Addrs)> {
        self.entries.iter().map(|e| (e.host.as_str(), &e.variants[0].1))
    }

    /// `name` (normalized) exactly, else the wildcard with the longest suffix matching it.
    fn find(&self, name: &str) -> Option<&Entry> {
        if let Some(&i) = self.exact.get(name) {
            return Some(&self.entries[i]);
        }
        if self.wild.is_empty() {
            return None;
        }
        // Suffixes below at least one label, longest first.
        name.match_indices('.').find_map(|(i, _)| self.wild.get(&name[i + 1..])).map(|&i| &self.entries[i])
    }

    fn found<'a>(&'a self, name: String, cname: bool, e: &'a Entry, client_ns: Option<&str>) -> Found<'a> {
        let in_cluster_domain = !self.domain.is_empty()
            && (name == self.domain
                || name.strip_suffix(self.domain.as_str()).is_some_and(|p| p.ends_with('.')));
        Found { name, cname, addrs: e.addrs(client_ns), in_cluster_domain }
    }
}

/// Lowercase, one trailing dot removed; `None` when empty.
fn normalize(name: &str) -> Option<String> {
    let n = name.strip_suffix('.').unwrap_or(name);
    (!n.is_empty()).then(|| n.to_ascii_lowercase())
}

/// A service hostname as a table key, if it is a DNS name the proxy can answer: labels of
/// letters, digits, `-` and `_` (1 to 63 bytes), at most 253 bytes in all, and `*` allowed as
/// the whole first label of a name with at least one more label.
fn valid_hostname(hostname: &str) -> Option<String> {
    let h = normalize(hostname)?;
    if h.len() > 253 || h == "*" {
        return None;
    }
    let ok = h.split('.').enumerate().all(|(i, label)| {
        (i == 0 && label == "*")
            || (!label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    });
    // The answers are built with this name: it must also be one for the wire library.
    (ok && hickory_proto::rr::Name::from_ascii(&h).is_ok()).then_some(h)
}

/// An IPv4-mapped IPv6 address as IPv4.
fn split(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// A service's VIPs, by family, in the model's order, without duplicates.
fn vips(svc: &Service) -> Addrs {
    let mut a = Addrs { ttl: VIP_TTL, ..Default::default() };
    for ip in &svc.addresses {
        match split(*ip) {
            IpAddr::V4(v) if !a.v4.contains(&v) => a.v4.push(v),
            IpAddr::V6(v) if !a.v6.contains(&v) => a.v6.push(v),
            _ => {}
        }
    }
    a
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::Workload;

    pub(crate) fn svc(ns: &str, host: &str, addrs: &[&str]) -> Service {
        Service {
            name: host.split('.').next().unwrap_or_default().into(),
            namespace: ns.into(),
            hostname: host.into(),
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            ..Default::default()
        }
    }

    pub(crate) fn workload(uid: &str, ip: &str, healthy: bool, backs: &Service) -> Workload {
        Workload {
            uid: uid.into(),
            name: uid.into(),
            profile: kmesh_model::model::WorkloadProfile {
                namespace: backs.namespace.as_str().into(),
                ..Default::default()
            }
            .into(),
            addresses: kmesh_model::model::Addrs::One(ip.parse().unwrap()),
            status: if healthy { HealthStatus::Healthy } else { HealthStatus::Unhealthy },
            services: [(backs.key().into(), vec![])].into_iter().collect(),
            ..Default::default()
        }
    }

    pub(crate) fn model(services: Vec<Service>, workloads: Vec<Workload>) -> Model {
        Model {
            services: services.into_iter().map(|s| (s.key().into(), Arc::new(s))).collect(),
            workloads: workloads.into_iter().map(|w| (w.uid.clone(), Arc::new(w))).collect(),
            ..Default::default()
        }
    }

    /// The table most tests use.
    pub(crate) fn table() -> NameTable {
        let db = svc("default", "db.default.svc.cluster.local", &[]);
        let workloads = vec![
            workload("db-1", "10.0.0.12", true, &db),
            workload("db-0", "10.0.0.11", true, &db),
            workload("db-2", "10.0.0.13", false, &db),
            workload("db-3", "fd00::13", true, &db),
            workload("db-4", "10.0.0.11", true, &db),
        ];
        let services = vec![
            svc("default", "echo.default.svc.cluster.local", &["10.96.0.10", "fd00::10"]),
            svc("prod", "echo.prod.svc.cluster.local", &["10.96.1.10"]),
            svc("default", "v6.default.svc.cluster.local", &["fd00::6"]),
            svc("default", "api.example.com", &["240.0.0.1"]),
            svc("default", "*.example.com", &["240.0.0.2"]),
            svc("default", "*.eu.example.com", &["240.0.0.3"]),
            svc("default", "Mapped.Example.ORG.", &["::ffff:10.1.2.3"]),
            svc("default", "bad name.example.com", &["240.0.0.9"]),
            svc("default", "", &["240.0.0.9"]),
            svc("default", "a..b", &["240.0.0.9"]),
            svc("default", "*", &["240.0.0.9"]),
            svc("default", "x.*.com", &["240.0.0.9"]),
            svc("default", "ünï.example.net", &["240.0.0.9"]),
            db,
        ];
        NameTable::build(&model(services, workloads), "cluster.local.")
    }

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn dns_names_exact_vips() {
        let t = table();
        let f = t.lookup("echo.default.svc.cluster.local", None).unwrap();
        assert_eq!(f.name, "echo.default.svc.cluster.local");
        assert!(!f.cname && f.in_cluster_domain && !f.addrs.headless);
        assert_eq!(f.addrs.v4, vec![v4("10.96.0.10")]);
        assert_eq!(f.addrs.v6, vec!["fd00::10".parse::<Ipv6Addr>().unwrap()]);
        assert_eq!(f.addrs.ttl, VIP_TTL);
        let f = t.lookup("v6.default.svc.cluster.local", None).unwrap();
        assert!(f.addrs.v4.is_empty() && f.addrs.v6.len() == 1);
    }

    #[test]
    fn dns_names_case_and_trailing_dot() {
        let t = table();
        let f = t.lookup("ECHO.Default.SVC.cluster.local.", None).unwrap();
        assert_eq!(f.name, "echo.default.svc.cluster.local");
        // The hostname was normalized too; an IPv4-mapped VIP counts as IPv4.
        let f = t.lookup("mapped.example.org", None).unwrap();
        assert_eq!(f.addrs.v4, vec![v4("10.1.2.3")]);
        assert!(f.addrs.v6.is_empty() && !f.in_cluster_domain);
    }

    #[test]
    fn dns_names_invalid_hostnames_skipped() {
        let t = table();
        let hosts: Vec<&str> = t.entries().map(|(h, _)| h).collect();
        assert_eq!(
            hosts,
            [
                "*.eu.example.com",
                "*.example.com",
                "api.example.com",
                "db.default.svc.cluster.local",
                "echo.default.svc.cluster.local",
                "echo.prod.svc.cluster.local",
                "mapped.example.org",
                "v6.default.svc.cluster.local",
            ]
        );
        assert_eq!(t.len(), 8);
        assert!(!t.is_empty());
        for q in ["", ".", "..", "a..example.com", ".example.com", "x.*.com"] {
            assert!(t.lookup(q, Some("default")).is_none(), "{q}");
        }
        assert!(NameTable::build(&Model::default(), "").is_empty());
    }

    #[test]
    fn dns_names_headless() {
        let t = table();
        let f = t.lookup("db.default.svc.cluster.local", None).unwrap();
        assert!(f.addrs.headless);
        assert_eq!(f.addrs.ttl, HEADLESS_TTL);
        // Healthy only, deduplicated, sorted.
        assert_eq!(f.addrs.v4, vec![v4("10.0.0.11"), v4("10.0.0.12")]);
        assert_eq!(f.addrs.v6, vec!["fd00::13".parse::<Ipv6Addr>().unwrap()]);
    }

    #[test]
    fn dns_names_wildcards() {
        let t = table();
        // Exact beats wildcard.
        let f = t.lookup("api.example.com", None).unwrap();
        assert_eq!(f.addrs.v4, vec![v4("240.0.0.1")]);
        // Wildcard: the name is the query itself.
        let f = t.lookup("Web.Example.com", None).unwrap();
        assert_eq!((f.name.as_str(), f.cname), ("web.example.com", false));
        assert_eq!(f.addrs.v4, vec![v4("240.0.0.2")]);
        assert_eq!(t.lookup("a.b.example.com", None).unwrap().addrs.v4, vec![v4("240.0.0.2")]);
        // The longest wildcard wins.
        assert_eq!(t.lookup("x.eu.example.com", None).unwrap().addrs.v4, vec![v4("240.0.0.3")]);
        assert_eq!(t.lookup("y.x.eu.example.com", None).unwrap().addrs.v4, vec![v4("240.0.0.3")]);
        assert_eq!(t.lookup("eu.example.com", None).unwrap().addrs.v4, vec![v4("240.0.0.2")]);
        // Not the suffix itself.
        assert!(t.lookup("example.com", None).is_none());
    }

    #[test]
    fn dns_names_search_suffixes() {
        let t = table();
        // A mesh-only host expanded with the client's search list.
        for q in [
            "api.example.com.default.svc.cluster.local",
            "api.example.com.svc.cluster.local",
            "api.example.com.cluster.local",
        ] {
            let f = t.lookup(q, Some("default")).unwrap();
            assert_eq!((f.name.as_str(), f.cname, f.in_cluster_domain), ("api.example.com", true, false));
        }
        // A wildcard host the same way.
        let f = t.lookup("foo.example.com.default.svc.cluster.local", Some("default")).unwrap();
        assert_eq!((f.name.as_str(), f.cname), ("foo.example.com", true));
        // Kubernetes short forms.
        let cases = [
            ("echo.default.default.svc.cluster.local", Some("default"), "echo.default.svc.cluster.local"),
            ("echo.prod.default.svc.cluster.local", Some("default"), "echo.prod.svc.cluster.local"),
            ("echo.prod.svc.default.svc.cluster.local", Some("default"), "echo.prod.svc.cluster.local"),
            ("echo.prod.svc.svc.cluster.local", None, "echo.prod.svc.cluster.local"),
            ("echo.prod.svc.cluster.local.cluster.local", None, "echo.prod.svc.cluster.local"),
            ("echo.cluster.local", Some("prod"), "echo.prod.svc.cluster.local"),
            ("echo.svc.cluster.local", Some("default"), "echo.default.svc.cluster.local"),
        ];
        for (q, ns, target) in cases {
            let f = t.lookup(q, ns).unwrap_or_else(|| panic!("{q}"));
            assert_eq!((f.name.as_str(), f.cname, f.in_cluster_domain), (target, true, true), "{q}");
        }
        // One label needs the client's namespace.
        assert!(t.lookup("echo.svc.cluster.local", None).is_none());
        assert!(t.lookup("nope.default.svc.cluster.local", Some("default")).is_none());
        assert!(t.lookup("default.svc.cluster.local", Some("default")).is_none());
        assert!(t.lookup("cluster.local", Some("default")).is_none());
        assert!(t.lookup("google.com", Some("default")).is_none());
    }

    #[test]
    fn dns_names_same_host_in_two_namespaces() {
        let m = model(
            vec![svc("a", "ext.example.com", &["240.0.0.1"]), svc("b", "ext.example.com", &["240.0.0.2"])],
            vec![],
        );
        let t = NameTable::build(&m, "cluster.local");
        assert_eq!(t.len(), 1);
        assert_eq!(t.lookup("ext.example.com", Some("b")).unwrap().addrs.v4, vec![v4("240.0.0.2")]);
        assert_eq!(t.lookup("ext.example.com", Some("c")).unwrap().addrs.v4, vec![v4("240.0.0.1")]);
        assert_eq!(t.lookup("ext.example.com", None).unwrap().addrs.v4, vec![v4("240.0.0.1")]);
    }

    #[test]
    fn dns_names_table_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<NameTable>();
    }
}
