//! Envoy's resources as the kernel-native mode reads them: decoded, validated, and reduced to
//! what a connect() can act on. A resource that is malformed (would be rejected by Envoy, or
//! cannot be read) is an error naming what was wrong, and is NACKed; a resource that is valid
//! but asks for something the kernel cannot decide at connect() is accepted, and what is not
//! honoured is recorded with it (see [`Unhonoured`]) for the metrics, the admin API and the log.

use std::net::IpAddr;

use kmesh_model::model::{Cidr, LbPolicy, OutlierDetection};
use kmesh_proto::envoy::{
    HCM_TYPE, TCP_PROXY_TYPE, cluster as pc, endpoint as pe, hcm, listener as pl, route as pr, tcp_proxy,
};
use kmesh_proto::prost::Message as _;

/// A cluster a connection can be sent to, with its share (Envoy's `weighted_clusters`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightedTarget {
    pub cluster: String,
    pub weight: u32,
}

/// Where the connections a filter chain takes go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `tcp_proxy`: one cluster, or several by weight.
    Clusters(Vec<WeightedTarget>),
    /// `http_connection_manager` with routes by RDS name.
    Rds(String),
    /// `http_connection_manager` with routes inline.
    Routes(RouteTable),
    /// Nothing the kernel can act on (the reason says what).
    Unsupported(String),
}

/// One filter chain, reduced to its destination match and its target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    /// The chain's name, or `#<index>` when it has none.
    pub name: String,
    /// `filter_chain_match.prefix_ranges` (empty: any destination address).
    pub prefix_ranges: Vec<Cidr>,
    /// `filter_chain_match.destination_port` (None: the listener's port).
    pub destination_port: Option<u16>,
    pub target: Target,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub name: String,
    /// The address bound to (`0.0.0.0` or `::` for a listener of every address).
    pub address: IpAddr,
    pub port: u16,
    /// Filter chains, then the default filter chain (with no prefix ranges) if any.
    pub chains: Vec<Chain>,
}

/// What a virtual host's routes send a request to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VhostTarget {
    /// Every route leads to the same cluster(s): decided at connect().
    Decided(Vec<WeightedTarget>),
    /// Routes pick among targets by what a request says (header, path, method): the kernel
    /// sees only the connection. The reason names the first deciding match.
    Undecidable(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<String>,
    pub target: VhostTarget,
}

/// A `RouteConfiguration`, by virtual host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteTable {
    pub virtual_hosts: Vec<VirtualHost>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    pub name: String,
    pub kind: ClusterKind,
    pub policy: LbPolicy,
    pub outlier: Option<OutlierDetection>,
    /// The circuit breaker's `max_connections` (DEFAULT priority).
    pub max_connections: Option<u32>,
    /// Settings accepted but not enforced, by field (reported).
    pub unhonoured: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterKind {
    /// Endpoints by EDS under this name.
    Eds(String),
    /// Endpoints given inline (`STATIC`).
    Static(Assignment),
    /// `ORIGINAL_DST`: the connection goes where it was dialled (istiod's PassthroughCluster).
    OriginalDst,
    /// A type the kernel cannot serve (DNS-resolved clusters): its routes are not compiled.
    Unsupported(String),
}

/// One endpoint of a `ClusterLoadAssignment`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub address: IpAddr,
    pub port: u16,
    /// The endpoint's `load_balancing_weight` (1 when unset).
    pub weight: u32,
    pub priority: u8,
    pub healthy: bool,
    pub locality: kmesh_model::model::Locality,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assignment {
    pub endpoints: Vec<Endpoint>,
}

/// Why a resource was refused (the NACK's detail names the resource and this).
pub type ParseError = String;

fn socket_address(a: Option<&kmesh_proto::core::Address>, what: &str) -> Result<(IpAddr, u16), ParseError> {
    use kmesh_proto::core::{address, socket_address::PortSpecifier};
    let Some(address::Address::SocketAddress(sa)) = a.and_then(|a| a.address.as_ref()) else {
        return Err(format!("{what} is not a socket address"));
    };
    let ip: IpAddr =
        sa.address.parse().map_err(|_| format!("{what} {:?} is not an IP address", sa.address))?;
    let port = match sa.port_specifier {
        Some(PortSpecifier::PortValue(p)) if (1..=65535).contains(&p) => p as u16,
        Some(PortSpecifier::PortValue(p)) => return Err(format!("{what} port {p} is out of range 1-65535")),
        Some(PortSpecifier::NamedPort(ref n)) => {
            return Err(format!("{what} names port {n:?}; only numbers"));
        }
        None => return Err(format!("{what} has no port")),
    };
    Ok((ip, port))
}

fn cidr(c: &kmesh_proto::core::CidrRange) -> Result<Cidr, ParseError> {
    let addr: IpAddr = c
        .address_prefix
        .parse()
        .map_err(|_| format!("prefix range {:?} is not an IP address", c.address_prefix))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = c.prefix_len.map(|v| v.value).unwrap_or(max);
    if len > max {
        return Err(format!("prefix range {}/{len} is longer than the address", c.address_prefix));
    }
    Ok(Cidr { addr, len: len as u8 }.network())
}

fn weighted(
    clusters: impl Iterator<Item = (String, u32)>,
    what: &str,
) -> Result<Vec<WeightedTarget>, ParseError> {
    let v: Vec<WeightedTarget> = clusters
        .filter(|(_, w)| *w > 0)
        .map(|(cluster, weight)| WeightedTarget { cluster, weight })
        .collect();
    if v.is_empty() {
        return Err(format!("{what}: weighted clusters with no cluster of weight > 0"));
    }
    if v.iter().any(|t| t.cluster.is_empty()) {
        return Err(format!("{what}: a weighted cluster without a name"));
    }
    Ok(v)
}

fn chain(c: &pl::FilterChain, index: usize) -> Result<Chain, ParseError> {
    let name = if c.name.is_empty() { format!("#{index}") } else { c.name.clone() };
    let what = format!("filter chain {name}");
    let m = c.filter_chain_match.clone().unwrap_or_default();
    let prefix_ranges = m.prefix_ranges.iter().map(cidr).collect::<Result<Vec<_>, _>>()?;
    let destination_port = match m.destination_port.map(|p| p.value) {
        None => None,
        Some(p) if (1..=65535).contains(&p) => Some(p as u16),
        Some(p) => return Err(format!("{what}: destination_port {p} is out of range 1-65535")),
    };
    // What a connect() cannot see: the client's own address and port, TLS SNI, ALPN.
    let mut undecidable = Vec::new();
    if !m.source_prefix_ranges.is_empty() || !m.direct_source_prefix_ranges.is_empty() {
        undecidable.push("source_prefix_ranges");
    }
    if !m.source_ports.is_empty() {
        undecidable.push("source_ports");
    }
    if m.source_type != 0 {
        undecidable.push("source_type");
    }
    if !m.server_names.is_empty() {
        undecidable.push("server_names");
    }
    if !m.transport_protocol.is_empty() && m.transport_protocol != "raw_buffer" {
        undecidable.push("transport_protocol");
    }
    if !m.application_protocols.is_empty() {
        undecidable.push("application_protocols");
    }
    let target = if !undecidable.is_empty() {
        Target::Unsupported(format!("matches on {} (not known at connect())", undecidable.join(", ")))
    } else {
        filters(&c.filters, &what)?
    };
    Ok(Chain { name, prefix_ranges, destination_port, target })
}

/// The terminal network filter of a chain.
fn filters(fs: &[pl::Filter], what: &str) -> Result<Target, ParseError> {
    let Some(last) = fs.last() else {
        return Err(format!("{what} has no filters"));
    };
    let Some(pl::filter::ConfigType::TypedConfig(any)) = &last.config_type else {
        return Err(format!("{what}: filter {:?} has no typed_config", last.name));
    };
    match any.type_url.as_str() {
        TCP_PROXY_TYPE => {
            let t = tcp_proxy::TcpProxy::decode(any.value.as_slice())
                .map_err(|e| format!("{what}: tcp_proxy does not decode: {e}"))?;
            use tcp_proxy::tcp_proxy::ClusterSpecifier;
            match t.cluster_specifier {
                Some(ClusterSpecifier::Cluster(c)) if !c.is_empty() => {
                    Ok(Target::Clusters(vec![WeightedTarget { cluster: c, weight: 1 }]))
                }
                Some(ClusterSpecifier::WeightedClusters(w)) => Ok(Target::Clusters(weighted(
                    w.clusters.into_iter().map(|c| (c.name, c.weight)),
                    &format!("{what}: tcp_proxy"),
                )?)),
                _ => Err(format!("{what}: tcp_proxy names no cluster")),
            }
        }
        HCM_TYPE => {
            let h = hcm::HttpConnectionManager::decode(any.value.as_slice())
                .map_err(|e| format!("{what}: http_connection_manager does not decode: {e}"))?;
            use hcm::http_connection_manager::RouteSpecifier;
            match h.route_specifier {
                Some(RouteSpecifier::Rds(r)) if !r.route_config_name.is_empty() => {
                    Ok(Target::Rds(r.route_config_name))
                }
                Some(RouteSpecifier::RouteConfig(rc)) => Ok(Target::Routes(route_table(&rc)?)),
                Some(RouteSpecifier::Rds(_)) => Err(format!("{what}: rds names no route configuration")),
                _ => Ok(Target::Unsupported("http_connection_manager without rds or route_config".into())),
            }
        }
        other => Ok(Target::Unsupported(format!("terminal filter {other}"))),
    }
}

pub fn listener(bytes: &[u8]) -> Result<Listener, ParseError> {
    let l = pl::Listener::decode(bytes).map_err(|e| format!("does not decode: {e}"))?;
    if l.name.is_empty() {
        return Err("a listener needs a name".into());
    }
    let (address, port) = socket_address(l.address.as_ref(), "address")?;
    let mut chains =
        l.filter_chains.iter().enumerate().map(|(i, c)| chain(c, i)).collect::<Result<Vec<_>, _>>()?;
    // Envoy refuses a listener whose chains match the same destinations.
    for (i, a) in chains.iter().enumerate() {
        if let Some(b) = chains[..i]
            .iter()
            .find(|b| b.prefix_ranges == a.prefix_ranges && b.destination_port == a.destination_port)
            && !matches!(a.target, Target::Unsupported(_))
            && !matches!(b.target, Target::Unsupported(_))
        {
            return Err(format!(
                "filter chains {} and {} have the same match (Envoy refuses this too)",
                b.name, a.name
            ));
        }
    }
    if let Some(d) = &l.default_filter_chain {
        let mut c = chain(d, chains.len())?;
        c.name = if d.name.is_empty() { "default".into() } else { d.name.clone() };
        c.prefix_ranges.clear();
        c.destination_port = None;
        chains.push(c);
    }
    Ok(Listener { name: l.name, address, port, chains })
}

/// A route's match, if it does more than take every request (path prefix `/`, no header or
/// query match): the kernel cannot tell requests apart.
fn deciding_match(m: &pr::RouteMatch) -> Option<String> {
    use pr::route_match::PathSpecifier;
    if !m.headers.is_empty() {
        return Some(format!("header {:?}", m.headers[0].name));
    }
    if !m.query_parameters.is_empty() {
        return Some(format!("query parameter {:?}", m.query_parameters[0].name));
    }
    if m.grpc.is_some() || m.tls_context.is_some() || !m.dynamic_metadata.is_empty() {
        return Some("grpc, tls_context or dynamic metadata".into());
    }
    match &m.path_specifier {
        Some(PathSpecifier::Prefix(p)) if p.is_empty() || p == "/" => None,
        Some(PathSpecifier::Prefix(p)) => Some(format!("path prefix {p:?}")),
        Some(PathSpecifier::Path(p)) => Some(format!("path {p:?}")),
        Some(_) => Some("a path pattern".into()),
        None => None,
    }
}

fn route_table(rc: &pr::RouteConfiguration) -> Result<RouteTable, ParseError> {
    let mut out = RouteTable::default();
    for vh in &rc.virtual_hosts {
        let what = format!("virtual host {:?}", vh.name);
        if vh.domains.is_empty() {
            return Err(format!("{what} has no domains"));
        }
        // The kernel sees the connection, not the request: a virtual host is decided when every
        // route that forwards goes to the same cluster(s). Routes answered by Envoy itself
        // (redirects, direct responses) cannot be made at L4; such requests reach that cluster.
        let mut targets: Vec<Vec<WeightedTarget>> = Vec::new();
        let mut by: Option<String> = None;
        let mut per_request = false;
        for r in &vh.routes {
            use pr::route::Action;
            use pr::route_action::ClusterSpecifier;
            let t = match &r.action {
                Some(Action::Route(ra)) => match &ra.cluster_specifier {
                    Some(ClusterSpecifier::Cluster(c)) if !c.is_empty() => {
                        vec![WeightedTarget { cluster: c.clone(), weight: 1 }]
                    }
                    Some(ClusterSpecifier::WeightedClusters(w)) => weighted(
                        w.clusters.iter().map(|c| (c.name.clone(), c.weight.map(|v| v.value).unwrap_or(0))),
                        &what,
                    )?,
                    Some(ClusterSpecifier::Cluster(_)) | None => {
                        return Err(format!("{what}: a route action names no cluster"));
                    }
                    Some(_) => {
                        per_request = true;
                        continue;
                    }
                },
                Some(_) => continue,
                None => return Err(format!("{what}: a route without an action")),
            };
            if by.is_none() {
                by = r.r#match.as_ref().and_then(deciding_match);
            }
            if !targets.contains(&t) {
                targets.push(t);
            }
        }
        let target = match targets.as_slice() {
            _ if per_request => {
                VhostTarget::Undecidable("a cluster chosen per request (cluster_header)".into())
            }
            [one] => VhostTarget::Decided(one.clone()),
            [] => VhostTarget::Undecidable("no route forwards".into()),
            _ => VhostTarget::Undecidable(format!(
                "routes to different clusters by {}",
                by.unwrap_or_else(|| "request".into())
            )),
        };
        out.virtual_hosts.push(VirtualHost { name: vh.name.clone(), domains: vh.domains.clone(), target });
    }
    Ok(out)
}

pub fn route_configuration(bytes: &[u8]) -> Result<(String, RouteTable), ParseError> {
    let rc = pr::RouteConfiguration::decode(bytes).map_err(|e| format!("does not decode: {e}"))?;
    if rc.name.is_empty() {
        return Err("a route configuration needs a name".into());
    }
    Ok((rc.name.clone(), route_table(&rc)?))
}

pub fn cluster(bytes: &[u8]) -> Result<Cluster, ParseError> {
    let c = pc::Cluster::decode(bytes).map_err(|e| format!("does not decode: {e}"))?;
    if c.name.is_empty() {
        return Err("a cluster needs a name".into());
    }
    use pc::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy as P};
    let mut unhonoured = Vec::new();
    let policy = match P::try_from(c.lb_policy) {
        Ok(P::RoundRobin) => LbPolicy::RoundRobin,
        Ok(P::Random) => LbPolicy::Random,
        Ok(P::RingHash) => {
            let size = match &c.lb_config {
                Some(pc::cluster::LbConfig::RingHashLbConfig(r)) => r.minimum_ring_size.map(|v| v.value),
                _ => None,
            }
            .unwrap_or(1024);
            if size > u64::from(crate::compile::hash::MAX_ENTRIES) {
                unhonoured.push(format!("minimum_ring_size {size} (rings here hold at most 65537 points)"));
            }
            LbPolicy::RingHash(size.min(u64::from(crate::compile::hash::MAX_ENTRIES)) as u32)
        }
        Ok(P::Maglev) => {
            let size = match &c.lb_config {
                Some(pc::cluster::LbConfig::MaglevLbConfig(m)) => m.table_size.map(|v| v.value),
                _ => None,
            };
            // Envoy's default is 65,537 entries; each is a map slot here, so a smaller prime is
            // the default (disruption on a change stays near the ideal 1/N).
            let size = size.unwrap_or(DEFAULT_MAGLEV_SIZE);
            if size > u64::from(crate::compile::hash::MAX_ENTRIES) {
                return Err(format!(
                    "maglev table_size {size} is over the 65537 entries this data plane builds"
                ));
            }
            if !is_prime(size) {
                return Err(format!("maglev table_size {size} is not a prime (Envoy refuses it too)"));
            }
            LbPolicy::Maglev(size as u32)
        }
        Ok(P::LeastRequest) => {
            if let Some(pc::cluster::LbConfig::LeastRequestLbConfig(l)) = &c.lb_config
                && l.choice_count.is_some_and(|n| n.value != 2)
            {
                unhonoured.push("least_request choice_count (two choices here)".into());
            }
            LbPolicy::LeastRequest
        }
        Ok(P::ClusterProvided) | Ok(P::LoadBalancingPolicyConfig) => {
            unhonoured.push("lb_policy from an extension (balanced at random)".into());
            LbPolicy::Random
        }
        Err(_) => return Err(format!("lb_policy {} is not a known value", c.lb_policy)),
    };
    if c.load_balancing_policy.is_some() {
        unhonoured.push("load_balancing_policy (balanced by lb_policy)".into());
    }
    // Circuit breakers: the DEFAULT priority's max_connections is enforced at connect();
    // the others count requests, which the kernel does not see.
    let mut max_connections = None;
    if let Some(cb) = &c.circuit_breakers {
        for t in &cb.thresholds {
            if t.priority != 0 {
                unhonoured.push("circuit_breakers of the HIGH priority (no route priorities here)".into());
                continue;
            }
            max_connections = t.max_connections.map(|v| v.value);
            if t.max_pending_requests.is_some() || t.max_requests.is_some() || t.max_retries.is_some() {
                unhonoured.push(
                    "circuit_breakers max_pending_requests, max_requests, max_retries (request-level)".into(),
                );
            }
        }
    }
    let outlier = c.outlier_detection.as_ref().map(|o| outlier_of(o, &mut unhonoured));
    let kind = match &c.cluster_discovery_type {
        None | Some(ClusterDiscoveryType::Type(_)) => {
            let t = match &c.cluster_discovery_type {
                Some(ClusterDiscoveryType::Type(t)) => *t,
                _ => 0,
            };
            match DiscoveryType::try_from(t) {
                Ok(DiscoveryType::Eds) => ClusterKind::Eds(
                    c.eds_cluster_config
                        .as_ref()
                        .map(|e| e.service_name.clone())
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| c.name.clone()),
                ),
                Ok(DiscoveryType::Static) => ClusterKind::Static(match &c.load_assignment {
                    Some(a) => assignment_of(a)?,
                    None => Assignment::default(),
                }),
                Ok(DiscoveryType::OriginalDst) => ClusterKind::OriginalDst,
                Ok(t) => ClusterKind::Unsupported(format!("type {} (resolved by DNS)", t.as_str_name())),
                Err(_) => return Err(format!("type {t} is not a known value")),
            }
        }
        Some(ClusterDiscoveryType::ClusterType(t)) => {
            ClusterKind::Unsupported(format!("cluster_type {:?}", t.name))
        }
    };
    Ok(Cluster { name: c.name, kind, policy, outlier, max_connections, unhonoured })
}

/// The Maglev table size when a cluster gives none (a prime).
pub const DEFAULT_MAGLEV_SIZE: u64 = 4099;

fn is_prime(n: u64) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}

fn millis(d: Option<&kmesh_proto::envoy_struct::Duration>, default: u64) -> u64 {
    d.map(|d| (d.seconds.max(0) as u64).saturating_mul(1000) + (d.nanos.max(0) as u64) / 1_000_000)
        .unwrap_or(default)
}

/// Envoy's `OutlierDetection` as the kernel sees failures: a connection that is refused,
/// reset or times out before it is established is a local-origin failure. Unless
/// `split_external_local_origin_errors`, Envoy counts those as 5xx (`consecutive_5xx`,
/// enforced by default) and as gateway failures (`consecutive_gateway_failure`, enforced only
/// when asked); split, they count as `consecutive_local_origin_failure`. The lowest enforced
/// threshold ejects.
fn outlier_of(o: &pc::OutlierDetection, unhonoured: &mut Vec<String>) -> OutlierDetection {
    let v = |x: Option<u32>, d: u32| x.unwrap_or(d);
    let get = |x: &Option<kmesh_proto::envoy_struct::UInt32Value>| x.as_ref().map(|w| w.value);
    let mut thresholds = Vec::new();
    if o.split_external_local_origin_errors {
        if v(get(&o.enforcing_consecutive_local_origin_failure), 100) > 0 {
            thresholds.push(v(get(&o.consecutive_local_origin_failure), 5));
        }
    } else {
        if v(get(&o.enforcing_consecutive_5xx), 100) > 0 {
            thresholds.push(v(get(&o.consecutive_5xx), 5));
        }
        if v(get(&o.enforcing_consecutive_gateway_failure), 0) > 0 {
            thresholds.push(v(get(&o.consecutive_gateway_failure), 5));
        }
    }
    if get(&o.enforcing_success_rate).unwrap_or(100) > 0 && o.success_rate_stdev_factor.is_some() {
        unhonoured.push("outlier_detection success rate (needs request outcomes)".into());
    }
    if o.failure_percentage_threshold.is_some() {
        unhonoured.push("outlier_detection failure_percentage".into());
    }
    OutlierDetection {
        // No enforced threshold: never ejects.
        consecutive_failures: thresholds.into_iter().filter(|t| *t > 0).min().unwrap_or(u32::MAX),
        base_ejection_ms: millis(o.base_ejection_time.as_ref(), 30_000),
        max_ejection_ms: millis(o.max_ejection_time.as_ref(), 300_000),
        max_ejection_percent: v(get(&o.max_ejection_percent), 10).min(100),
        interval_ms: millis(o.interval.as_ref(), 10_000),
    }
}

fn assignment_of(a: &pe::ClusterLoadAssignment) -> Result<Assignment, ParseError> {
    use kmesh_proto::core::HealthStatus;
    let mut out = Assignment::default();
    for le in &a.endpoints {
        if le.priority as usize >= kmesh_common::LEVELS {
            return Err(format!(
                "priority {} is over the {} priorities this data plane keeps",
                le.priority,
                kmesh_common::LEVELS
            ));
        }
        let locality = le
            .locality
            .as_ref()
            .map(|l| kmesh_model::model::Locality {
                region: kmesh_model::model::Istr::new(&l.region),
                zone: kmesh_model::model::Istr::new(&l.zone),
                subzone: kmesh_model::model::Istr::new(&l.sub_zone),
            })
            .unwrap_or_default();
        for e in &le.lb_endpoints {
            use pe::lb_endpoint::HostIdentifier;
            let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                return Err("an endpoint by name is not supported; give its address".into());
            };
            let (address, port) = socket_address(ep.address.as_ref(), "endpoint address")?;
            let weight = e.load_balancing_weight.map(|w| w.value).unwrap_or(1);
            if weight == 0 {
                return Err(format!(
                    "endpoint {address}:{port} has load_balancing_weight 0 (Envoy needs >= 1)"
                ));
            }
            let healthy = matches!(
                HealthStatus::try_from(e.health_status),
                Ok(HealthStatus::Unknown | HealthStatus::Healthy | HealthStatus::Degraded)
            );
            out.endpoints.push(Endpoint {
                address,
                port,
                weight,
                priority: le.priority as u8,
                healthy,
                locality: locality.clone(),
            });
        }
    }
    Ok(out)
}

pub fn load_assignment(bytes: &[u8]) -> Result<(String, Assignment), ParseError> {
    let a = pe::ClusterLoadAssignment::decode(bytes).map_err(|e| format!("does not decode: {e}"))?;
    if a.cluster_name.is_empty() {
        return Err("a load assignment needs a cluster_name".into());
    }
    Ok((a.cluster_name.clone(), assignment_of(&a)?))
}

/// The name a resource carries inside it (a state-of-the-world response names its resources
/// only there), when it decodes and has one; `None` otherwise.
pub fn name_in(type_url: &str, bytes: &[u8]) -> Option<String> {
    use kmesh_proto::envoy::{CLUSTER_TYPE, LISTENER_TYPE, ROUTE_TYPE};
    let name = match type_url {
        LISTENER_TYPE => pl::Listener::decode(bytes).ok()?.name,
        ROUTE_TYPE => pr::RouteConfiguration::decode(bytes).ok()?.name,
        CLUSTER_TYPE => pc::Cluster::decode(bytes).ok()?.name,
        _ => pe::ClusterLoadAssignment::decode(bytes).ok()?.cluster_name,
    };
    (!name.is_empty()).then_some(name)
}
