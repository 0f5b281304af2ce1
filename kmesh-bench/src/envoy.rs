//! Envoy bootstrap configs for the sidecar paths: an HTTP listener (http_connection_manager
//! with the router filter, as Istio's sidecar uses for HTTP ports) and a TCP listener
//! (tcp_proxy, as for opaque TCP ports) for the bulk transfer.

use std::net::SocketAddr;

/// One Envoy: where it listens and where each listener forwards.
pub struct EnvoySpec {
    pub admin: SocketAddr,
    pub http_listen: SocketAddr,
    pub http_upstream: SocketAddr,
    pub tcp_listen: SocketAddr,
    pub tcp_upstream: SocketAddr,
}

fn addr(a: SocketAddr) -> String {
    format!("{{socket_address: {{address: \"{}\", port_value: {}}}}}", a.ip(), a.port())
}

fn cluster(name: &str, to: SocketAddr) -> String {
    format!(
        "  - name: {name}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {name}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {a}}}}}]}}]
",
        a = addr(to)
    )
}

/// The HTTP filter of a chain: `http_connection_manager` routing everything to the
/// `http_upstream` cluster with the router filter (as Istio does for HTTP ports).
const HCM: &str = "      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: http
          codec_type: AUTO
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: [\"*\"]
              routes:
              - match: {prefix: \"/\"}
                route: {cluster: http_upstream}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
";

/// The TCP filter of a chain: `tcp_proxy` to the `tcp_upstream` cluster (opaque TCP).
const TCP_PROXY: &str = "      - name: envoy.filters.network.tcp_proxy
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: tcp_upstream
";

/// The bootstrap YAML.
pub fn bootstrap(s: &EnvoySpec) -> String {
    format!(
        "admin:
  address: {admin}
static_resources:
  listeners:
  - name: http
    address: {http}
    filter_chains:
    - filters:
{hcm}  - name: tcp
    address: {tcp}
    filter_chains:
    - filters:
{tcp_proxy}  clusters:
{c1}{c2}",
        admin = addr(s.admin),
        http = addr(s.http_listen),
        tcp = addr(s.tcp_listen),
        c1 = cluster("http_upstream", s.http_upstream),
        c2 = cluster("tcp_upstream", s.tcp_upstream),
        hcm = HCM,
        tcp_proxy = TCP_PROXY,
    )
}

/// Envoy as a waypoint: one listener taking PROXY protocol v2 (the header kmesh-rs writes in
/// the kernel), filter chains matched on the restored destination: HTTP to `vip:http_port`
/// through `http_connection_manager` (L7, one hop), TCP to `vip:bulk_port` through `tcp_proxy`.
pub struct WaypointSpec {
    pub admin: SocketAddr,
    pub listen: SocketAddr,
    pub vip: std::net::Ipv4Addr,
    pub http_port: u16,
    pub http_upstream: SocketAddr,
    pub bulk_port: u16,
    pub bulk_upstream: SocketAddr,
}

/// The waypoint's bootstrap YAML.
pub fn waypoint_bootstrap(w: &WaypointSpec) -> String {
    format!(
        "admin:
  address: {admin}
static_resources:
  listeners:
  - name: waypoint
    address: {listen}
    listener_filters:
    - name: envoy.filters.listener.proxy_protocol
      typed_config:
        \"@type\": type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol
        rules:
        - {{tlv_type: 208, on_tlv_present: {{metadata_namespace: istio, key: peer_principal}}}}
    filter_chains:
    - filter_chain_match: {{destination_port: {http_port}, prefix_ranges: [{{address_prefix: \"{vip}\", prefix_len: 32}}]}}
      filters:
{hcm}    - filter_chain_match: {{destination_port: {bulk_port}, prefix_ranges: [{{address_prefix: \"{vip}\", prefix_len: 32}}]}}
      filters:
{tcp_proxy}  clusters:
{c1}{c2}",
        admin = addr(w.admin),
        listen = addr(w.listen),
        vip = w.vip,
        http_port = w.http_port,
        bulk_port = w.bulk_port,
        c1 = cluster("http_upstream", w.http_upstream),
        c2 = cluster("tcp_upstream", w.bulk_upstream),
        hcm = HCM,
        tcp_proxy = TCP_PROXY,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_names_both_listeners_and_clusters() {
        let y = bootstrap(&EnvoySpec {
            admin: "127.0.0.1:15000".parse().unwrap(),
            http_listen: "127.0.0.1:15001".parse().unwrap(),
            http_upstream: "10.244.0.2:8080".parse().unwrap(),
            tcp_listen: "127.0.0.1:15002".parse().unwrap(),
            tcp_upstream: "10.244.0.2:5201".parse().unwrap(),
        });
        assert!(y.contains("port_value: 15001"));
        assert!(y.contains("address: \"10.244.0.2\", port_value: 8080"));
        assert!(y.contains("cluster: tcp_upstream"));
        assert_eq!(y.matches("- name: ").count(), 8); // 2 listeners, 2 filters, 1 host, 1 http filter, 2 clusters
    }

    #[test]
    fn the_waypoint_matches_both_ports_of_its_vip_after_the_proxy_header() {
        let y = waypoint_bootstrap(&WaypointSpec {
            admin: "127.0.0.1:15000".parse().unwrap(),
            listen: "0.0.0.0:15088".parse().unwrap(),
            vip: "10.97.0.1".parse().unwrap(),
            http_port: 80,
            http_upstream: "10.244.0.2:8080".parse().unwrap(),
            bulk_port: 5201,
            bulk_upstream: "10.244.0.2:5201".parse().unwrap(),
        });
        assert!(y.contains("envoy.filters.listener.proxy_protocol"));
        assert!(y.contains("destination_port: 80, prefix_ranges: [{address_prefix: \"10.97.0.1\""));
        assert!(y.contains("destination_port: 5201,"));
        assert!(y.contains("address: \"10.244.0.2\", port_value: 5201"));
    }
}
