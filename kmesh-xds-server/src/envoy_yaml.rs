//! A compact YAML form of Envoy resources (listeners, routes, clusters with their endpoints),
//! for serving the kernel-native mode from a file. Strict: an unknown field, a missing name or
//! a bad address is an error naming where it is. What it produces are Envoy's own protos
//! (`envoy-types`), the same bytes istiod would send.
//!
//! ```yaml
//! clusters:
//!   - name: echo
//!     lb_policy: ROUND_ROBIN        # RANDOM, LEAST_REQUEST, RING_HASH, MAGLEV
//!     type: EDS                     # EDS (endpoints served as a ClusterLoadAssignment) or STATIC
//!     max_connections: 100          # circuit breaker (DEFAULT priority)
//!     outlier_detection: {consecutive_5xx: 3, interval_ms: 1000, base_ejection_time_ms: 5000, max_ejection_percent: 50}
//!     endpoints:
//!       - {address: 10.244.0.3, port: 8080, weight: 1, priority: 0, health: HEALTHY}
//! listeners:
//!   - {name: echo_80, address: 10.96.0.10, port: 80, cluster: echo}
//!   - name: 0.0.0.0_9000
//!     address: 0.0.0.0
//!     port: 9000
//!     filter_chains:
//!       - {prefix_ranges: [10.96.0.11/32], weighted_clusters: [{name: a, weight: 1}, {name: b, weight: 3}]}
//!       - {prefix_ranges: [10.96.0.12/32], rds: http_80}
//! routes:
//!   - name: http_80
//!     virtual_hosts:
//!       - {name: echo, domains: ["*"], routes: [{prefix: /, cluster: echo}]}
//! ```

use std::collections::BTreeMap;

use kmesh_proto::core;
use kmesh_proto::envoy::{
    CLUSTER_TYPE, ENDPOINT_TYPE, HCM_TYPE, LISTENER_TYPE, ROUTE_TYPE, TCP_PROXY_TYPE, cluster as pc,
    endpoint as pe, hcm, listener as pl, route as pr, tcp_proxy,
};
use kmesh_proto::envoy_struct::{Duration, UInt32Value, UInt64Value};
use kmesh_proto::prost::Message;
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    clusters: Vec<Cluster>,
    #[serde(default)]
    listeners: Vec<Listener>,
    #[serde(default)]
    routes: Vec<Routes>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Cluster {
    name: String,
    #[serde(default = "round_robin")]
    lb_policy: String,
    #[serde(default = "eds", rename = "type")]
    kind: String,
    max_connections: Option<u32>,
    ring_size: Option<u64>,
    maglev_table_size: Option<u64>,
    outlier_detection: Option<Outlier>,
    #[serde(default)]
    endpoints: Vec<Endpoint>,
}

fn round_robin() -> String {
    "ROUND_ROBIN".into()
}

fn eds() -> String {
    "EDS".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Outlier {
    consecutive_5xx: Option<u32>,
    interval_ms: Option<u64>,
    base_ejection_time_ms: Option<u64>,
    max_ejection_percent: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Endpoint {
    address: String,
    port: u32,
    weight: Option<u32>,
    #[serde(default)]
    priority: u32,
    health: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Listener {
    name: String,
    address: String,
    port: u32,
    /// Shorthand for one chain that takes everything, to one cluster.
    cluster: Option<String>,
    #[serde(default)]
    filter_chains: Vec<Chain>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Chain {
    #[serde(default)]
    prefix_ranges: Vec<String>,
    destination_port: Option<u32>,
    cluster: Option<String>,
    #[serde(default)]
    weighted_clusters: Vec<Weighted>,
    rds: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Weighted {
    name: String,
    weight: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Routes {
    name: String,
    virtual_hosts: Vec<VirtualHost>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VirtualHost {
    name: String,
    domains: Vec<String>,
    routes: Vec<Route>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Route {
    #[serde(default = "slash")]
    prefix: String,
    /// Match only requests that carry this header.
    header: Option<String>,
    cluster: String,
}

fn slash() -> String {
    "/".into()
}

/// Encoded resources by type URL, then by name.
pub type Resources = BTreeMap<&'static str, BTreeMap<String, Vec<u8>>>;

fn u32v(v: u32) -> Option<UInt32Value> {
    Some(UInt32Value { value: v })
}

fn ms(v: u64) -> Option<Duration> {
    Some(Duration { seconds: (v / 1000) as i64, nanos: ((v % 1000) * 1_000_000) as i32 })
}

fn socket(address: &str, port: u32, what: &str) -> Result<core::Address, String> {
    address
        .parse::<std::net::IpAddr>()
        .map_err(|_| format!("{what}: address {address:?} is not an IP address"))?;
    if !(1..=65535).contains(&port) {
        return Err(format!("{what}: port {port} is out of range 1-65535"));
    }
    Ok(core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: address.into(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    })
}

fn assignment(name: &str, eps: &[Endpoint], what: &str) -> Result<pe::ClusterLoadAssignment, String> {
    let mut by_priority: BTreeMap<u32, Vec<pe::LbEndpoint>> = BTreeMap::new();
    for (i, e) in eps.iter().enumerate() {
        let w = format!("{what}.endpoints[{i}]");
        let h = e.health.as_deref().unwrap_or("UNKNOWN");
        let health = core::HealthStatus::from_str_name(h)
            .ok_or_else(|| format!("{w}: health {h:?} is not an Envoy health status"))?;
        by_priority.entry(e.priority).or_default().push(pe::LbEndpoint {
            host_identifier: Some(pe::lb_endpoint::HostIdentifier::Endpoint(pe::Endpoint {
                address: Some(socket(&e.address, e.port, &w)?),
                ..Default::default()
            })),
            health_status: health as i32,
            load_balancing_weight: e.weight.map(|w| UInt32Value { value: w }),
            ..Default::default()
        });
    }
    Ok(pe::ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: by_priority
            .into_iter()
            .map(|(priority, lb_endpoints)| pe::LocalityLbEndpoints {
                priority,
                lb_endpoints,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
}

fn typed(name: &str, type_url: &str, value: Vec<u8>) -> pl::Filter {
    pl::Filter {
        name: name.into(),
        config_type: Some(pl::filter::ConfigType::TypedConfig(kmesh_proto::Any {
            type_url: type_url.into(),
            value,
        })),
    }
}

fn chain(c: &Chain, what: &str) -> Result<pl::FilterChain, String> {
    use tcp_proxy::tcp_proxy::{ClusterSpecifier, WeightedCluster, weighted_cluster::ClusterWeight};
    let filter = match (&c.cluster, c.weighted_clusters.is_empty(), &c.rds) {
        (Some(cl), true, None) => typed(
            "tcp_proxy",
            TCP_PROXY_TYPE,
            tcp_proxy::TcpProxy {
                stat_prefix: cl.clone(),
                cluster_specifier: Some(ClusterSpecifier::Cluster(cl.clone())),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (None, false, None) => typed(
            "tcp_proxy",
            TCP_PROXY_TYPE,
            tcp_proxy::TcpProxy {
                stat_prefix: "weighted".into(),
                cluster_specifier: Some(ClusterSpecifier::WeightedClusters(WeightedCluster {
                    clusters: c
                        .weighted_clusters
                        .iter()
                        .map(|w| ClusterWeight {
                            name: w.name.clone(),
                            weight: w.weight,
                            ..Default::default()
                        })
                        .collect(),
                })),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (None, true, Some(r)) => typed(
            "http_connection_manager",
            HCM_TYPE,
            hcm::HttpConnectionManager {
                stat_prefix: r.clone(),
                route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(hcm::Rds {
                    route_config_name: r.clone(),
                    ..Default::default()
                })),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        _ => return Err(format!("{what}: give exactly one of cluster, weighted_clusters and rds")),
    };
    let prefix_ranges = c
        .prefix_ranges
        .iter()
        .map(|p| {
            let (a, len) = p.split_once('/').unwrap_or((p, ""));
            a.parse::<std::net::IpAddr>()
                .map_err(|_| format!("{what}: prefix range {p:?} is not an address"))?;
            let len = if len.is_empty() {
                None
            } else {
                Some(len.parse::<u32>().map_err(|_| format!("{what}: prefix range {p:?}"))?)
            };
            Ok(core::CidrRange {
                address_prefix: a.into(),
                prefix_len: len.map(|v| UInt32Value { value: v }),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(pl::FilterChain {
        filter_chain_match: Some(pl::FilterChainMatch {
            prefix_ranges,
            destination_port: c.destination_port.map(|v| UInt32Value { value: v }),
            ..Default::default()
        }),
        filters: vec![filter],
        ..Default::default()
    })
}

/// Parses the file into Envoy's resources, by type URL and name.
pub fn parse(text: &str) -> Result<Resources, String> {
    let f: File = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let mut out: Resources = BTreeMap::new();
    for t in [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE] {
        out.insert(t, BTreeMap::new());
    }
    for (i, c) in f.clusters.iter().enumerate() {
        let what = format!("clusters[{i}] ({})", c.name);
        use pc::cluster::{ClusterDiscoveryType, DiscoveryType, LbConfig, LbPolicy};
        let policy = LbPolicy::from_str_name(&c.lb_policy)
            .ok_or_else(|| format!("{what}: lb_policy {:?} is not an Envoy lb_policy", c.lb_policy))?;
        let mut cl = pc::Cluster { name: c.name.clone(), lb_policy: policy as i32, ..Default::default() };
        match c.kind.as_str() {
            "EDS" => {
                cl.cluster_discovery_type = Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32));
                cl.eds_cluster_config = Some(pc::cluster::EdsClusterConfig::default());
                let a = assignment(&c.name, &c.endpoints, &what)?;
                out.get_mut(ENDPOINT_TYPE).unwrap().insert(c.name.clone(), a.encode_to_vec());
            }
            "STATIC" => {
                cl.cluster_discovery_type = Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32));
                cl.load_assignment = Some(assignment(&c.name, &c.endpoints, &what)?);
            }
            k => return Err(format!("{what}: type {k:?} (EDS or STATIC)")),
        }
        if let Some(n) = c.ring_size {
            cl.lb_config = Some(LbConfig::RingHashLbConfig(pc::cluster::RingHashLbConfig {
                minimum_ring_size: Some(UInt64Value { value: n }),
                ..Default::default()
            }));
        }
        if let Some(n) = c.maglev_table_size {
            cl.lb_config = Some(LbConfig::MaglevLbConfig(pc::cluster::MaglevLbConfig {
                table_size: Some(UInt64Value { value: n }),
            }));
        }
        if let Some(m) = c.max_connections {
            cl.circuit_breakers = Some(pc::CircuitBreakers {
                thresholds: vec![pc::circuit_breakers::Thresholds {
                    max_connections: u32v(m),
                    ..Default::default()
                }],
                ..Default::default()
            });
        }
        if let Some(o) = &c.outlier_detection {
            cl.outlier_detection = Some(pc::OutlierDetection {
                consecutive_5xx: o.consecutive_5xx.and_then(u32v),
                interval: o.interval_ms.and_then(ms),
                base_ejection_time: o.base_ejection_time_ms.and_then(ms),
                max_ejection_percent: o.max_ejection_percent.and_then(u32v),
                ..Default::default()
            });
        }
        if out[CLUSTER_TYPE].contains_key(&c.name) {
            return Err(format!("{what}: cluster {:?} is defined twice", c.name));
        }
        out.get_mut(CLUSTER_TYPE).unwrap().insert(c.name.clone(), cl.encode_to_vec());
    }
    for (i, l) in f.listeners.iter().enumerate() {
        let what = format!("listeners[{i}] ({})", l.name);
        let mut chains = Vec::new();
        if let Some(c) = &l.cluster {
            let one = Chain {
                prefix_ranges: vec![],
                destination_port: None,
                cluster: Some(c.clone()),
                weighted_clusters: vec![],
                rds: None,
            };
            chains.push(chain(&one, &what)?);
        }
        for (j, c) in l.filter_chains.iter().enumerate() {
            chains.push(chain(c, &format!("{what}.filter_chains[{j}]"))?);
        }
        if chains.is_empty() {
            return Err(format!("{what}: give cluster or filter_chains"));
        }
        let lis = pl::Listener {
            name: l.name.clone(),
            address: Some(socket(&l.address, l.port, &what)?),
            filter_chains: chains,
            ..Default::default()
        };
        out.get_mut(LISTENER_TYPE).unwrap().insert(l.name.clone(), lis.encode_to_vec());
    }
    for r in &f.routes {
        let rc = pr::RouteConfiguration {
            name: r.name.clone(),
            virtual_hosts: r
                .virtual_hosts
                .iter()
                .map(|vh| pr::VirtualHost {
                    name: vh.name.clone(),
                    domains: vh.domains.clone(),
                    routes: vh
                        .routes
                        .iter()
                        .map(|rt| pr::Route {
                            r#match: Some(pr::RouteMatch {
                                path_specifier: Some(pr::route_match::PathSpecifier::Prefix(
                                    rt.prefix.clone(),
                                )),
                                headers: rt
                                    .header
                                    .iter()
                                    .map(|h| pr::HeaderMatcher { name: h.clone(), ..Default::default() })
                                    .collect(),
                                ..Default::default()
                            }),
                            action: Some(pr::route::Action::Route(pr::RouteAction {
                                cluster_specifier: Some(pr::route_action::ClusterSpecifier::Cluster(
                                    rt.cluster.clone(),
                                )),
                                ..Default::default()
                            })),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        out.get_mut(ROUTE_TYPE).unwrap().insert(r.name.clone(), rc.encode_to_vec());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_resource_comes_out_and_mistakes_are_named() {
        let r = parse(
            "clusters:\n  - {name: echo, lb_policy: MAGLEV, max_connections: 5, endpoints: [{address: 10.0.0.1, port: 8080}]}\n\
             listeners:\n  - {name: l, address: 10.96.0.10, port: 80, cluster: echo}\n\
             routes:\n  - {name: r, virtual_hosts: [{name: v, domains: ['*'], routes: [{cluster: echo}]}]}\n",
        )
        .unwrap();
        assert_eq!(r.values().map(|v| v.len()).collect::<Vec<_>>(), [1, 1, 1, 1]);
        let c = pc::Cluster::decode(r[CLUSTER_TYPE]["echo"].as_slice()).unwrap();
        assert_eq!(c.lb_policy, pc::cluster::LbPolicy::Maglev as i32);
        let e = parse("clusters:\n  - {name: x, lb_policy: FASTEST}\n").unwrap_err();
        assert_eq!(e, "clusters[0] (x): lb_policy \"FASTEST\" is not an Envoy lb_policy");
        let e = parse("listeners:\n  - {name: l, address: nope, port: 80, cluster: x}\n").unwrap_err();
        assert!(e.contains("listeners[0] (l): address \"nope\""), "{e}");
        assert!(
            parse("clusters:\n  - {name: x, colour: red}\n").unwrap_err().contains("unknown field `colour`")
        );
    }
}
