//! From Envoy's resources to the model the compiler reads: each destination (address and
//! port) a listener's filter chain takes becomes a frontend of a service whose endpoints are
//! those of the chain's cluster(s). Pure: the same resources always give the same model.
//!
//! - A listener bound to an address takes that address and port; a listener of every address
//!   (`0.0.0.0`, `::`) takes the addresses of its chains' `prefix_ranges` (ranges of up to 256
//!   addresses are listed one by one), or, for an HTTP chain without ranges, the addresses its
//!   virtual hosts name as domains (istiod's outbound HTTP shape).
//! - Where several chains take one destination, Envoy's precedence holds: a listener bound to
//!   the address, then the longest prefix.
//! - A chain is compiled once every cluster it names is known with its endpoints (Envoy warms
//!   clusters before listeners the same way); until then its destinations pass unchanged.
//! - `ORIGINAL_DST` clusters (passthrough) pass unchanged: that is what they mean.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use kmesh_model::model::*;
use serde::Serialize;

use super::resources::*;

/// The namespace of every service and workload this source makes.
pub const NAMESPACE: &str = "envoy";

/// The largest prefix range listed address by address (a /24 in IPv4).
pub const MAX_RANGE_ADDRESSES: u32 = 256;

/// The share scale of endpoints of weighted clusters (capacities stay under 65,536).
const SHARE_SCALE: f64 = 60_000.0;

/// Every resource held, by name (load assignments by `cluster_name`).
#[derive(Clone, Debug, Default)]
pub struct Held {
    pub listeners: BTreeMap<String, Listener>,
    pub routes: BTreeMap<String, RouteTable>,
    pub clusters: BTreeMap<String, Cluster>,
    pub assignments: BTreeMap<String, Assignment>,
}

impl Held {
    /// The EDS names the clusters held need.
    pub fn eds_names(&self) -> std::collections::BTreeSet<String> {
        self.clusters
            .values()
            .filter_map(|c| match &c.kind {
                ClusterKind::Eds(n) => Some(n.clone()),
                _ => None,
            })
            .collect()
    }

    /// The RDS names the listeners held need.
    pub fn rds_names(&self) -> std::collections::BTreeSet<String> {
        self.listeners
            .values()
            .flat_map(|l| &l.chains)
            .filter_map(|c| match &c.target {
                Target::Rds(n) => Some(n.clone()),
                _ => None,
            })
            .collect()
    }
}

/// What became of one filter chain (the admin API's `/debug/envoy` and the metrics).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    pub listener: String,
    pub chain: String,
    /// `compiled`, `passthrough`, `warming` (a cluster, its endpoints or its routes are not
    /// there yet) or `not_compiled` (the kernel cannot act on it; `reason` says why).
    pub state: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The destinations compiled, as `address:port`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<String>,
    /// Destinations of the chain that are not compiled, as `address:port: reason` (an HTTP
    /// virtual host that routes by what a request says).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_compiled: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub chains: Vec<ChainReport>,
    /// Cluster settings accepted but not enforced, by cluster.
    pub unhonoured: BTreeMap<String, Vec<String>>,
}

impl Report {
    pub fn count(&self, state: &str) -> usize {
        self.chains.iter().filter(|c| c.state == state).count()
    }
}

/// One destination a chain claims, with its precedence.
struct Claim {
    rank: (u8, u8),
    service: String,
}

fn addresses_of(c: &Cidr) -> Option<Vec<IpAddr>> {
    let host_bits = if c.addr.is_ipv4() { 32 } else { 128 } - u32::from(c.len);
    if host_bits > 8 || (1u32 << host_bits) > MAX_RANGE_ADDRESSES {
        return None;
    }
    let n = 1u128 << host_bits;
    Some(
        (0..n)
            .map(|i| match c.addr {
                IpAddr::V4(a) => IpAddr::V4((u32::from(a) + i as u32).into()),
                IpAddr::V6(a) => IpAddr::V6((u128::from(a) + i).into()),
            })
            .collect(),
    )
}

fn domain_address(d: &str, port: u16) -> Option<IpAddr> {
    if let Ok(ip) = d.parse::<IpAddr>() {
        return Some(ip);
    }
    let (host, p) = d.rsplit_once(':')?;
    if p.parse::<u16>().ok()? != port {
        return None;
    }
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// Where a chain's destinations go, per destination, or why it is not compiled.
enum Resolved {
    /// The destinations resolved, and those that were not (address, reason).
    To(Vec<(IpAddr, u8, Vec<WeightedTarget>, String)>, Vec<(IpAddr, String)>),
    Skip(&'static str, String),
}

fn resolve(h: &Held, l: &Listener, c: &Chain, port: u16) -> Resolved {
    let bound = !l.address.is_unspecified();
    let table = match &c.target {
        Target::Unsupported(r) => return Resolved::Skip("not_compiled", r.clone()),
        Target::Clusters(_) => None,
        Target::Rds(n) => match h.routes.get(n) {
            Some(t) => Some(t),
            None => return Resolved::Skip("warming", format!("route configuration {n:?} not received")),
        },
        Target::Routes(t) => Some(t),
    };
    // The addresses, each with its prefix length (its precedence among chains).
    let mut addrs: Vec<(IpAddr, u8)> = Vec::new();
    if bound {
        if c.prefix_ranges.is_empty() || c.prefix_ranges.iter().any(|r| r.contains(l.address)) {
            addrs.push((l.address, 128));
        }
    } else if !c.prefix_ranges.is_empty() {
        for r in &c.prefix_ranges {
            match addresses_of(r) {
                Some(v) => addrs.extend(v.into_iter().map(|a| (a, r.len))),
                None => {
                    return Resolved::Skip(
                        "not_compiled",
                        format!("prefix range {r} holds more than {MAX_RANGE_ADDRESSES} addresses"),
                    );
                }
            }
        }
    } else if let Some(t) = table {
        for vh in &t.virtual_hosts {
            for d in &vh.domains {
                if let Some(a) = domain_address(d, port)
                    && (a.is_ipv4() == l.address.is_ipv4() || l.address.is_ipv6())
                {
                    addrs.push((a, 0));
                }
            }
        }
        if addrs.is_empty() {
            return Resolved::Skip("not_compiled", "no virtual host names an address as a domain".into());
        }
    } else {
        return Resolved::Skip(
            "not_compiled",
            "matches every destination address; only listed destinations are balanced".into(),
        );
    }
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for (a, len) in addrs {
        let (targets, via) = match (&c.target, table) {
            (Target::Clusters(ts), _) => (ts.clone(), String::new()),
            (_, Some(t)) => {
                let pick = t
                    .virtual_hosts
                    .iter()
                    .find(|vh| vh.domains.iter().any(|d| domain_address(d, port) == Some(a)))
                    .or_else(|| t.virtual_hosts.iter().find(|vh| vh.domains.iter().any(|d| d == "*")));
                match pick.map(|vh| (&vh.target, &vh.name)) {
                    Some((VhostTarget::Decided(ts), name)) => (ts.clone(), name.clone()),
                    Some((VhostTarget::Undecidable(r), name)) => {
                        skipped.push((a, format!("virtual host {name:?}: {r}")));
                        continue;
                    }
                    None => continue,
                }
            }
            _ => unreachable!("a chain without a table targets clusters"),
        };
        out.push((a, len, targets, via));
    }
    Resolved::To(out, skipped)
}

/// The endpoints of a cluster, if it can be served now.
fn endpoints_of<'a>(h: &'a Held, name: &str) -> Result<Option<&'a Assignment>, (&'static str, String)> {
    let Some(c) = h.clusters.get(name) else {
        return Err(("warming", format!("cluster {name:?} not received")));
    };
    match &c.kind {
        ClusterKind::Eds(n) => match h.assignments.get(n) {
            Some(a) => Ok(Some(a)),
            None => Err(("warming", format!("endpoints of cluster {name:?} not received"))),
        },
        ClusterKind::Static(a) => Ok(Some(a)),
        ClusterKind::OriginalDst => Ok(None),
        ClusterKind::Unsupported(r) => Err(("not_compiled", format!("cluster {name:?}: {r}"))),
    }
}

/// Translates everything held into a model for `node`.
pub fn translate(h: &Held, node: &NodeInfo) -> (Model, Report) {
    let mut report = Report::default();
    for c in h.clusters.values() {
        if !c.unhonoured.is_empty() {
            report.unhonoured.insert(c.name.clone(), c.unhonoured.clone());
        }
    }
    // (address, port) -> the chain that takes it.
    let mut claims: BTreeMap<(IpAddr, u16), Claim> = BTreeMap::new();
    // service key -> (hostname, port, targets)
    let mut services: BTreeMap<String, (String, u16, Vec<WeightedTarget>)> = BTreeMap::new();
    for l in h.listeners.values() {
        let bound = !l.address.is_unspecified();
        for c in &l.chains {
            let port = c.destination_port.unwrap_or(l.port);
            let mut rep = ChainReport {
                listener: l.name.clone(),
                chain: c.name.clone(),
                state: "compiled",
                reason: String::new(),
                destinations: Vec::new(),
                not_compiled: Vec::new(),
            };
            let dests = match resolve(h, l, c, port) {
                Resolved::To(d, skipped) => {
                    rep.not_compiled = skipped
                        .into_iter()
                        .map(|(a, r)| format!("{}: {r}", std::net::SocketAddr::new(a, port)))
                        .collect();
                    d
                }
                Resolved::Skip(state, reason) => {
                    rep.state = state;
                    rep.reason = reason;
                    report.chains.push(rep);
                    continue;
                }
            };
            let mut passthrough = false;
            for (addr, len, targets, via) in dests {
                let mut ok = true;
                for t in &targets {
                    match endpoints_of(h, &t.cluster) {
                        Ok(Some(_)) => {}
                        Ok(None) => {
                            passthrough = true;
                            ok = false;
                        }
                        Err((state, reason)) => {
                            rep.state = state;
                            rep.reason = reason;
                            ok = false;
                        }
                    }
                }
                if !ok {
                    continue;
                }
                let hostname = if via.is_empty() {
                    format!("{}:{}", l.name, c.name)
                } else {
                    format!("{}:{}:{via}", l.name, c.name)
                };
                let key = format!("{NAMESPACE}/{hostname}");
                services.entry(key.clone()).or_insert_with(|| (hostname, port, targets));
                let rank = (u8::from(bound), len);
                let claim = claims.entry((addr, port)).or_insert(Claim { rank, service: key.clone() });
                if rank > claim.rank {
                    *claim = Claim { rank, service: key };
                }
                rep.destinations.push(std::net::SocketAddr::new(addr, port).to_string());
            }
            if rep.state == "compiled" && rep.destinations.is_empty() {
                if passthrough {
                    rep.state = "passthrough";
                } else {
                    rep.state = "not_compiled";
                    rep.reason = if rep.not_compiled.is_empty() {
                        "no destination".into()
                    } else {
                        "no destination can be decided at connect()".into()
                    };
                }
            }
            report.chains.push(rep);
        }
    }
    let mut model = Model { node: node.clone(), ..Default::default() };
    let mut addrs: BTreeMap<&String, Vec<IpAddr>> = BTreeMap::new();
    for ((addr, _), claim) in &claims {
        addrs.entry(&claim.service).or_default().push(*addr);
    }
    for (key, (hostname, port, targets)) in &services {
        let Some(addresses) = addrs.get(key) else { continue };
        let mut addresses = addresses.clone();
        addresses.dedup();
        let first = h.clusters.get(&targets[0].cluster);
        let policy = first.map(|c| c.policy).unwrap_or_default();
        let outlier = first.and_then(|c| c.outlier);
        let max_connections = first.and_then(|c| c.max_connections);
        let name = targets.iter().map(|t| t.cluster.as_str()).collect::<Vec<_>>().join("+");
        model.services.insert(
            Istr::new(key),
            Arc::new(Service {
                name: name.as_str().into(),
                namespace: NAMESPACE.into(),
                hostname: hostname.as_str().into(),
                addresses: addresses.into(),
                ports: vec![ServicePort { service_port: *port, target_port: 0, protocol: Protocol::Tcp }]
                    .into(),
                load_balancing: LoadBalancing { policy, ..Default::default() },
                outlier: outlier.map(Box::new),
                max_connections,
                ..Default::default()
            }),
        );
        let total: u64 = targets.iter().map(|t| u64::from(t.weight)).sum();
        for t in targets {
            let Ok(Some(a)) = endpoints_of(h, &t.cluster) else { continue };
            let plain = targets.len() == 1 && a.endpoints.iter().all(|e| e.weight == 1);
            for e in &a.endpoints {
                let capacity = if plain {
                    None
                } else if targets.len() == 1 {
                    Some(e.weight.min(kmesh_model::config::MAX_CAPACITY))
                } else {
                    // The endpoint's share of all connections: its cluster's share times its
                    // share of its cluster's healthy endpoints of the same priority.
                    let peers: u64 = a
                        .endpoints
                        .iter()
                        .filter(|p| p.healthy && p.priority == e.priority)
                        .map(|p| u64::from(p.weight))
                        .sum::<u64>()
                        .max(1);
                    let share = t.weight as f64 / total as f64 * f64::from(e.weight) / peers as f64;
                    Some(((share * SHARE_SCALE).round() as u32).clamp(1, kmesh_model::config::MAX_CAPACITY))
                };
                let sa = std::net::SocketAddr::new(e.address, e.port);
                let uid = Istr::unique(&format!("{key}|{}|{sa}", t.cluster));
                let services =
                    [(Istr::new(key), vec![PortMapping { service_port: *port, target_port: e.port }])]
                        .into_iter()
                        .collect();
                model.workloads.insert(
                    uid.clone(),
                    Arc::new(Workload {
                        uid,
                        name: kmesh_model::model::WorkloadName::own(&sa.to_string()),
                        workload_name: Istr::new(&t.cluster),
                        canonical_name: Istr::new(&t.cluster),
                        profile: WorkloadProfile {
                            namespace: Istr::new(NAMESPACE),
                            capacity,
                            ..Default::default()
                        }
                        .into(),
                        placement: Placement { locality: e.locality.clone(), ..Default::default() }.into(),
                        addresses: Addrs::One(e.address),
                        status: if e.healthy { HealthStatus::Healthy } else { HealthStatus::Unhealthy },
                        priority: e.priority,
                        services,
                        ..Default::default()
                    }),
                );
            }
        }
    }
    (model, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(ip: &str, weight: u32, priority: u8) -> Endpoint {
        Endpoint {
            address: ip.parse().unwrap(),
            port: 8080,
            weight,
            priority,
            healthy: true,
            locality: Default::default(),
        }
    }

    fn cluster(name: &str, eps: Vec<Endpoint>) -> (String, Cluster) {
        (
            name.into(),
            Cluster {
                name: name.into(),
                kind: ClusterKind::Static(Assignment { endpoints: eps }),
                policy: LbPolicy::Random,
                outlier: None,
                max_connections: None,
                unhonoured: vec![],
            },
        )
    }

    fn tcp_chain(prefixes: &[&str], targets: &[(&str, u32)]) -> Chain {
        Chain {
            name: "c".into(),
            prefix_ranges: prefixes.iter().map(|p| Cidr { addr: p.parse().unwrap(), len: 32 }).collect(),
            destination_port: None,
            target: Target::Clusters(
                targets.iter().map(|(c, w)| WeightedTarget { cluster: c.to_string(), weight: *w }).collect(),
            ),
        }
    }

    fn held(chains: Vec<Chain>) -> Held {
        Held {
            listeners: [(
                "l".to_string(),
                Listener { name: "l".into(), address: "0.0.0.0".parse().unwrap(), port: 9000, chains },
            )]
            .into(),
            clusters: [
                cluster("a", vec![ep("10.0.0.1", 1, 0)]),
                cluster("b", vec![ep("10.0.0.2", 1, 0), ep("10.0.0.3", 3, 0)]),
            ]
            .into(),
            ..Default::default()
        }
    }

    #[test]
    fn weighted_clusters_give_each_endpoint_its_share_of_all_connections() {
        let (m, r) =
            translate(&held(vec![tcp_chain(&["10.96.0.11"], &[("a", 1), ("b", 3)])]), &NodeInfo::default());
        assert_eq!(r.count("compiled"), 1, "{r:?}");
        let svc = &m.services["envoy/l:c"];
        assert_eq!(*svc.addresses, ["10.96.0.11".parse::<IpAddr>().unwrap()]);
        let caps: BTreeMap<String, Option<u32>> =
            m.workloads.values().map(|w| (w.name.to_string(), w.capacity())).collect();
        // a: 1/4; b: 3/4 split 1:3.
        assert_eq!(
            caps,
            [
                ("10.0.0.1:8080".to_string(), Some(15_000)),
                ("10.0.0.2:8080".to_string(), Some(11_250)),
                ("10.0.0.3:8080".to_string(), Some(33_750)),
            ]
            .into()
        );
    }

    #[test]
    fn the_longest_prefix_takes_a_destination_and_wide_ranges_are_reported() {
        let mut wide = tcp_chain(&[], &[("b", 1)]);
        wide.name = "wide".into();
        wide.prefix_ranges = vec![Cidr { addr: "10.96.0.0".parse().unwrap(), len: 30 }];
        let mut huge = tcp_chain(&[], &[("b", 1)]);
        huge.name = "huge".into();
        huge.prefix_ranges = vec![Cidr { addr: "10.0.0.0".parse().unwrap(), len: 16 }];
        let (m, r) =
            translate(&held(vec![tcp_chain(&["10.96.0.1"], &[("a", 1)]), wide, huge]), &NodeInfo::default());
        assert_eq!(*m.services["envoy/l:c"].addresses, ["10.96.0.1".parse::<IpAddr>().unwrap()]);
        let wide: Vec<String> = m.services["envoy/l:wide"].addresses.iter().map(|a| a.to_string()).collect();
        assert_eq!(wide, ["10.96.0.0", "10.96.0.2", "10.96.0.3"]);
        let huge = r.chains.iter().find(|c| c.chain == "huge").unwrap();
        assert_eq!(
            (huge.state, huge.reason.as_str()),
            ("not_compiled", "prefix range 10.0.0.0/16 holds more than 256 addresses")
        );
    }

    #[test]
    fn a_chain_waits_for_its_clusters_and_their_endpoints() {
        let mut h = held(vec![tcp_chain(&["10.96.0.1"], &[("c", 1)])]);
        let (m, r) = translate(&h, &NodeInfo::default());
        assert!(m.services.is_empty());
        assert_eq!(
            (r.chains[0].state, r.chains[0].reason.as_str()),
            ("warming", "cluster \"c\" not received")
        );
        h.clusters.insert(
            "c".into(),
            Cluster {
                name: "c".into(),
                kind: ClusterKind::Eds("c".into()),
                policy: LbPolicy::RoundRobin,
                outlier: None,
                max_connections: None,
                unhonoured: vec![],
            },
        );
        let (_, r) = translate(&h, &NodeInfo::default());
        assert_eq!(r.chains[0].reason, "endpoints of cluster \"c\" not received");
        h.assignments.insert("c".into(), Assignment { endpoints: vec![ep("10.0.0.9", 1, 1)] });
        let (m, r) = translate(&h, &NodeInfo::default());
        assert_eq!(r.chains[0].state, "compiled");
        assert_eq!(m.services["envoy/l:c"].load_balancing.policy, LbPolicy::RoundRobin);
        let w = m.workloads.values().next().unwrap();
        assert_eq!((w.priority, w.capacity()), (1, None));
    }
}
