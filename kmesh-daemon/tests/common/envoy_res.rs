//! Envoy resources as tests build them (the real protos of `envoy-types`), for the
//! kernel-native tests and the cross-check against Envoy.

use kmesh_proto::envoy::{
    HCM_TYPE, TCP_PROXY_TYPE, cluster as pc, endpoint as pe, hcm, listener as pl, route as pr, tcp_proxy,
};
use kmesh_proto::prost::Message;
use kmesh_proto::{Any, core};
use kmesh_testbed::Testbed;

use super::{Daemon, wait_for};

/// A daemon in the kernel-native mode on the control plane at `cp`, speaking `protocol`
/// (`delta` or `sotw`), ready, with the client pod enrolled.
pub fn kernel_native_daemon(
    bed: &Testbed,
    pins: &std::path::Path,
    cp: std::net::SocketAddr,
    protocol: &str,
) -> Daemon {
    let cp = cp.to_string();
    let d = Daemon::start_with(
        &[
            "--mode",
            "kernel-native",
            "--xds-protocol",
            protocol,
            "--xds-address",
            &cp,
            "--xds-plaintext",
            "--xds-backoff-max-ms",
            "500",
        ],
        bed,
        pins,
    );
    wait_for("readiness after the first sync", || d.get("/debug/ready").is_ok());
    d.enroll_pod(bed.pod("client"));
    d
}

pub fn address(ip: &str, port: u32) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: ip.into(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

pub fn any(type_url: &str, m: &impl Message) -> Any {
    Any { type_url: type_url.into(), value: m.encode_to_vec() }
}

pub fn tcp(cluster: &str) -> pl::Filter {
    let t = tcp_proxy::TcpProxy {
        stat_prefix: cluster.into(),
        cluster_specifier: Some(tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
        ..Default::default()
    };
    pl::Filter {
        name: "tcp".into(),
        config_type: Some(pl::filter::ConfigType::TypedConfig(any(TCP_PROXY_TYPE, &t))),
    }
}

pub fn tcp_weighted(clusters: &[(&str, u32)]) -> pl::Filter {
    use tcp_proxy::tcp_proxy::{ClusterSpecifier, WeightedCluster, weighted_cluster::ClusterWeight};
    let t = tcp_proxy::TcpProxy {
        stat_prefix: "w".into(),
        cluster_specifier: Some(ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: clusters
                .iter()
                .map(|(n, w)| ClusterWeight { name: n.to_string(), weight: *w, ..Default::default() })
                .collect(),
        })),
        ..Default::default()
    };
    pl::Filter {
        name: "tcp".into(),
        config_type: Some(pl::filter::ConfigType::TypedConfig(any(TCP_PROXY_TYPE, &t))),
    }
}

pub fn route(domains: &[&str], routes: Vec<pr::Route>) -> pr::VirtualHost {
    pr::VirtualHost {
        name: domains[0].into(),
        domains: domains.iter().map(|d| d.to_string()).collect(),
        routes,
        ..Default::default()
    }
}

pub fn to_cluster(prefix: &str, header: Option<&str>, cluster: &str) -> pr::Route {
    pr::Route {
        r#match: Some(pr::RouteMatch {
            path_specifier: Some(pr::route_match::PathSpecifier::Prefix(prefix.into())),
            headers: header
                .map(|h| pr::HeaderMatcher { name: h.into(), ..Default::default() })
                .into_iter()
                .collect(),
            ..Default::default()
        }),
        action: Some(pr::route::Action::Route(pr::RouteAction {
            cluster_specifier: Some(pr::route_action::ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        })),
        ..Default::default()
    }
}

pub fn http(vhosts: Vec<pr::VirtualHost>) -> pl::Filter {
    let h = hcm::HttpConnectionManager {
        stat_prefix: "http".into(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(
            pr::RouteConfiguration { name: "inline".into(), virtual_hosts: vhosts, ..Default::default() },
        )),
        ..Default::default()
    };
    pl::Filter {
        name: "http".into(),
        config_type: Some(pl::filter::ConfigType::TypedConfig(any(HCM_TYPE, &h))),
    }
}

pub fn chain(prefixes: &[&str], filter: pl::Filter) -> pl::FilterChain {
    pl::FilterChain {
        filter_chain_match: Some(pl::FilterChainMatch {
            prefix_ranges: prefixes
                .iter()
                .map(|p| core::CidrRange {
                    address_prefix: p.to_string(),
                    prefix_len: Some(kmesh_proto::envoy_struct::UInt32Value { value: 32 }),
                })
                .collect(),
            ..Default::default()
        }),
        filters: vec![filter],
        ..Default::default()
    }
}

pub fn listener(name: &str, ip: &str, port: u32, chains: Vec<pl::FilterChain>) -> (String, Vec<u8>) {
    let l = pl::Listener {
        name: name.into(),
        address: Some(address(ip, port)),
        filter_chains: chains,
        ..Default::default()
    };
    (name.into(), l.encode_to_vec())
}

pub fn endpoints(bed: &Testbed, pods: &[&str]) -> Vec<pe::LocalityLbEndpoints> {
    vec![pe::LocalityLbEndpoints {
        lb_endpoints: pods
            .iter()
            .map(|p| pe::LbEndpoint {
                host_identifier: Some(pe::lb_endpoint::HostIdentifier::Endpoint(pe::Endpoint {
                    address: Some(address(&bed.pod(p).ipv4.to_string(), 8080)),
                    ..Default::default()
                })),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }]
}

pub fn eds_cluster(name: &str, policy: pc::cluster::LbPolicy) -> (String, Vec<u8>) {
    let c = pc::Cluster {
        name: name.into(),
        cluster_discovery_type: Some(pc::cluster::ClusterDiscoveryType::Type(
            pc::cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(eds_over_ads()),
        lb_policy: policy as i32,
        ..Default::default()
    };
    (name.into(), c.encode_to_vec())
}

pub fn static_cluster(bed: &Testbed, name: &str, pods: &[&str]) -> (String, Vec<u8>) {
    let c = pc::Cluster {
        name: name.into(),
        cluster_discovery_type: Some(pc::cluster::ClusterDiscoveryType::Type(
            pc::cluster::DiscoveryType::Static as i32,
        )),
        load_assignment: Some(pe::ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: endpoints(bed, pods),
            ..Default::default()
        }),
        ..Default::default()
    };
    (name.into(), c.encode_to_vec())
}

pub fn assignment(bed: &Testbed, name: &str, pods: &[&str]) -> (String, Vec<u8>) {
    let a = pe::ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: endpoints(bed, pods),
        ..Default::default()
    };
    (name.into(), a.encode_to_vec())
}

/// EDS over the same ADS stream, as istiod configures Envoy (Envoy refuses an EDS cluster
/// without it).
pub fn eds_over_ads() -> pc::cluster::EdsClusterConfig {
    pc::cluster::EdsClusterConfig {
        eds_config: Some(core::ConfigSource {
            config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
                core::AggregatedConfigSource {},
            )),
            resource_api_version: core::ApiVersion::V3 as i32,
            ..Default::default()
        }),
        service_name: String::new(),
    }
}

/// `tcp_proxy` to `cluster`, hashing by the client's address for RING_HASH and MAGLEV (without
/// a hash policy Envoy picks at random).
pub fn tcp_hashed(cluster: &str) -> pl::Filter {
    let t = tcp_proxy::TcpProxy {
        stat_prefix: cluster.into(),
        cluster_specifier: Some(tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
        hash_policy: vec![kmesh_proto::envoy::types::HashPolicy {
            policy_specifier: Some(kmesh_proto::envoy::types::hash_policy::PolicySpecifier::SourceIp(
                kmesh_proto::envoy::types::hash_policy::SourceIp {},
            )),
        }],
        ..Default::default()
    };
    pl::Filter {
        name: "tcp".into(),
        config_type: Some(pl::filter::ConfigType::TypedConfig(any(TCP_PROXY_TYPE, &t))),
    }
}
