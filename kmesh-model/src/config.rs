//! The local YAML configuration: the embedded default source of mesh configuration, standing in
//! for istiod. It only parses and validates; a config that fails validation is rejected whole,
//! with an error that names the offending field, and never reaches the model.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::*;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config is not valid YAML for this format: {0}")]
    Syntax(String),
    #[error("config field `{field}`: {problem}")]
    Invalid { field: String, problem: String },
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.into(), problem: problem.into() }
}

// ------------------------------------------------------------------------------------------
// The file format. Unknown fields are errors, so that a typo never silently means "default".
// ------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub node: NodeSpec,
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    #[serde(default)]
    pub policies: Vec<PolicySpec>,
}

/// An L4 authorization policy (Istio's `istio.security.Authorization`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(default)]
    pub clauses: Vec<ClauseSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClauseSpec {
    #[serde(default)]
    pub matches: Vec<MatchSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    #[serde(default)]
    pub namespaces: Vec<StringMatchSpec>,
    #[serde(default)]
    pub not_namespaces: Vec<StringMatchSpec>,
    #[serde(default)]
    pub principals: Vec<StringMatchSpec>,
    #[serde(default)]
    pub not_principals: Vec<StringMatchSpec>,
    #[serde(default)]
    pub source_ips: Vec<String>,
    #[serde(default)]
    pub not_source_ips: Vec<String>,
    #[serde(default)]
    pub destination_ips: Vec<String>,
    #[serde(default)]
    pub not_destination_ips: Vec<String>,
    #[serde(default)]
    pub destination_ports: Vec<u32>,
    #[serde(default)]
    pub not_destination_ports: Vec<u32>,
    #[serde(default)]
    pub service_accounts: Vec<ServiceAccountSpec>,
    #[serde(default)]
    pub not_service_accounts: Vec<ServiceAccountSpec>,
}

/// Exactly one of `exact`, `prefix`, `suffix`, `presence`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StringMatchSpec {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub suffix: Option<String>,
    pub presence: Option<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccountSpec {
    #[serde(default)]
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub locality: LocalitySpec,
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub cluster_id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalitySpec {
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub subzone: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub workload_name: String,
    #[serde(default)]
    pub canonical_name: String,
    #[serde(default)]
    pub canonical_revision: String,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub cluster_id: String,
    #[serde(default)]
    pub locality: LocalitySpec,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub service_account: String,
    #[serde(default)]
    pub trust_domain: String,
    #[serde(default)]
    pub capacity: Option<u32>,
    #[serde(default)]
    pub services: BTreeMap<String, Vec<PortSpec>>,
    /// Selector-based policies that apply to this workload, as `namespace/name`.
    #[serde(default)]
    pub authorization_policies: Vec<String>,
    /// `STANDARD` (default) or `HOST_NETWORK`.
    #[serde(default)]
    pub network_mode: Option<String>,
    #[serde(default)]
    pub waypoint: Option<GatewaySpec>,
    #[serde(default)]
    pub application_tunnel: Option<ApplicationTunnelSpec>,
}

/// Istio's `GatewayAddress`: exactly one of `hostname` and `address`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySpec {
    #[serde(default)]
    pub hostname: Option<NamespacedHostnameSpec>,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub hbone_mtls_port: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespacedHostnameSpec {
    pub namespace: String,
    pub hostname: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedWaypointSpec {
    pub destination: GatewaySpec,
    pub weight: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplicationTunnelSpec {
    /// `NONE` (default) or `PROXY`.
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub port: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    pub service_port: u32,
    #[serde(default)]
    pub target_port: u32,
    #[serde(default)]
    pub protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub load_balancing: Option<LoadBalancingSpec>,
    #[serde(default)]
    pub waypoint: Option<GatewaySpec>,
    #[serde(default)]
    pub weighted_waypoints: Vec<WeightedWaypointSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancingSpec {
    #[serde(default)]
    pub routing_preference: Vec<String>,
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub health_policy: Option<String>,
}

/// Largest accepted workload capacity (weights are summed in 32 bits in the kernel).
pub const MAX_CAPACITY: u32 = 65_535;

/// Reads and validates a config file.
pub fn load_file(path: &Path) -> Result<Model, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    parse(&text)
}

/// Parses and validates config text.
pub fn parse(text: &str) -> Result<Model, ConfigError> {
    let file: ConfigFile = if text.trim().is_empty() {
        ConfigFile::default()
    } else {
        serde_yaml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?
    };
    validate(file)
}

fn locality(l: LocalitySpec) -> Locality {
    Locality { region: l.region.into(), zone: l.zone.into(), subzone: l.subzone.into() }
}

fn required(field: &str, v: &str) -> Result<(), ConfigError> {
    if v.trim().is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    Ok(())
}

fn ip(field: &str, v: &str) -> Result<IpAddr, ConfigError> {
    v.trim().parse().map_err(|_| invalid(field, format!("{v:?} is not an IPv4 or IPv6 address")))
}

fn port(field: &str, v: u32, allow_zero: bool) -> Result<u16, ConfigError> {
    match u16::try_from(v) {
        Ok(0) if !allow_zero => Err(invalid(field, "must be between 1 and 65535")),
        Ok(p) => Ok(p),
        Err(_) => Err(invalid(field, format!("{v} is not a port (0-65535)"))),
    }
}

fn gateway(field: &str, g: GatewaySpec) -> Result<GatewayAddress, ConfigError> {
    let destination = match (g.hostname, g.address) {
        (Some(h), None) => {
            required(&format!("{field}.hostname.namespace"), &h.namespace)?;
            required(&format!("{field}.hostname.hostname"), &h.hostname)?;
            if !g.network.is_empty() {
                return Err(invalid(format!("{field}.network"), "goes with an address, not a hostname"));
            }
            GatewayDestination::Hostname { namespace: h.namespace, hostname: h.hostname }
        }
        (None, Some(a)) => GatewayDestination::Address {
            network: g.network,
            address: a
                .parse()
                .map_err(|_| invalid(format!("{field}.address"), format!("{a:?} is not an IP address")))?,
        },
        _ => return Err(invalid(field, "give exactly one of hostname and address")),
    };
    Ok(GatewayAddress {
        destination,
        hbone_mtls_port: port(&format!("{field}.hbone_mtls_port"), g.hbone_mtls_port, true)?,
    })
}

fn application_tunnel(field: &str, t: ApplicationTunnelSpec) -> Result<ApplicationTunnel, ConfigError> {
    let protocol = match t.protocol.as_deref().map(str::to_ascii_uppercase).as_deref() {
        None | Some("NONE") => TunnelProtocol::None,
        Some("PROXY") => TunnelProtocol::Proxy,
        Some(p) => {
            return Err(invalid(format!("{field}.protocol"), format!("{p:?} is not one of NONE, PROXY")));
        }
    };
    Ok(ApplicationTunnel { protocol, port: port(&format!("{field}.port"), t.port, true)? })
}

fn protocol(field: &str, v: Option<&str>) -> Result<Protocol, ConfigError> {
    match v.map(|s| s.to_ascii_uppercase()) {
        None => Ok(Protocol::Tcp),
        Some(s) if s == "TCP" => Ok(Protocol::Tcp),
        Some(s) if s == "UDP" => Ok(Protocol::Udp),
        Some(s) => Err(invalid(field, format!("{s:?} is not one of TCP, UDP"))),
    }
}

fn enum_value<T: Copy>(field: &str, v: &str, table: &[(&str, T)]) -> Result<T, ConfigError> {
    let up = v.to_ascii_uppercase();
    table.iter().find(|(n, _)| *n == up).map(|(_, t)| *t).ok_or_else(|| {
        let names: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
        invalid(field, format!("{v:?} is not one of {}", names.join(", ")))
    })
}

const NETWORK_MODES: &[(&str, NetworkMode)] =
    &[("STANDARD", NetworkMode::Standard), ("HOST_NETWORK", NetworkMode::HostNetwork)];
const SCOPES: &[(&str, Scope)] = &[
    ("REGION", Scope::Region),
    ("ZONE", Scope::Zone),
    ("SUBZONE", Scope::Subzone),
    ("NODE", Scope::Node),
    ("CLUSTER", Scope::Cluster),
    ("NETWORK", Scope::Network),
];
const MODES: &[(&str, Option<LbMode>)] = &[
    ("UNSPECIFIED_MODE", None),
    ("STRICT", Some(LbMode::Strict)),
    ("FAILOVER", Some(LbMode::Failover)),
    ("PASSTHROUGH", Some(LbMode::Passthrough)),
];
const HEALTH: &[(&str, HealthPolicy)] =
    &[("ONLY_HEALTHY", HealthPolicy::OnlyHealthy), ("ALLOW_ALL", HealthPolicy::AllowAll)];
const STATUS: &[(&str, HealthStatus)] =
    &[("HEALTHY", HealthStatus::Healthy), ("UNHEALTHY", HealthStatus::Unhealthy)];

fn load_balancing(field: &str, lb: Option<LoadBalancingSpec>) -> Result<LoadBalancing, ConfigError> {
    let Some(lb) = lb else { return Ok(LoadBalancing::default()) };
    let mut prefs = Vec::new();
    for (i, s) in lb.routing_preference.iter().enumerate() {
        let f = format!("{field}.routing_preference[{i}]");
        let scope = enum_value(&f, s, SCOPES)?;
        if prefs.contains(&scope) {
            return Err(invalid(f, format!("{s:?} is listed twice")));
        }
        prefs.push(scope);
    }
    let mode = match lb.mode.as_deref() {
        None => None,
        Some(m) => enum_value(&format!("{field}.mode"), m, MODES)?,
    };
    // As in Istio: an unspecified mode with routing preferences means FAILOVER.
    let mode = match mode {
        Some(m) => m,
        None if prefs.is_empty() => LbMode::Random,
        None => LbMode::Failover,
    };
    let health_policy = match lb.health_policy.as_deref() {
        None => HealthPolicy::OnlyHealthy,
        Some(h) => enum_value(&format!("{field}.health_policy"), h, HEALTH)?,
    };
    Ok(LoadBalancing { routing_preference: prefs, mode, health_policy, ..Default::default() })
}

/// Turns a parsed file into a model, or names the first field that is wrong.
pub fn validate(file: ConfigFile) -> Result<Model, ConfigError> {
    let node = NodeInfo {
        name: file.node.name,
        locality: locality(file.node.locality),
        network: file.node.network,
        cluster_id: file.node.cluster_id,
    };
    let mut model = Model { node, ..Default::default() };

    // Two services may claim one address and port, as two control-plane objects can: the
    // compiler gives it to the service whose key sorts first and reports the conflict (the same
    // rule for this file and for xDS).
    for (i, s) in file.services.into_iter().enumerate() {
        let f = format!("services[{i}]");
        required(&format!("{f}.name"), &s.name)?;
        required(&format!("{f}.namespace"), &s.namespace)?;
        required(&format!("{f}.hostname"), &s.hostname)?;
        let mut addresses = Vec::new();
        let mut address_ranges = Vec::new();
        for (j, a) in s.addresses.iter().enumerate() {
            let af = format!("{f}.addresses[{j}]");
            match a.split_once('/') {
                // A range; a full-length prefix is a single address.
                Some((net, len)) => {
                    let addr = ip(&af, net)?;
                    let max = if addr.is_ipv4() { 32 } else { 128 };
                    let len: u8 = match len.trim().parse() {
                        Ok(l) if l <= max => l,
                        _ => return Err(invalid(af, format!("{len:?} is not a prefix length (0-{max})"))),
                    };
                    let r = Cidr { addr, len };
                    if r.network() != r {
                        let n = r.network();
                        return Err(invalid(
                            af,
                            format!("{a} has bits set past the prefix (did you mean {n}?)"),
                        ));
                    }
                    if len == max && !addresses.contains(&addr) {
                        addresses.push(addr);
                    } else if len < max && !address_ranges.contains(&r) {
                        address_ranges.push(r);
                    } else {
                        return Err(invalid(af, format!("{a} is listed twice")));
                    }
                }
                None => {
                    let addr = ip(&af, a)?;
                    if addresses.contains(&addr) {
                        return Err(invalid(af, format!("{a} is listed twice")));
                    }
                    addresses.push(addr);
                }
            }
        }
        let mut ports = Vec::with_capacity(s.ports.len());
        let mut seen = BTreeSet::new();
        for (j, p) in s.ports.iter().enumerate() {
            let pf = format!("{f}.ports[{j}]");
            let sp = ServicePort {
                service_port: port(&format!("{pf}.service_port"), p.service_port, false)?,
                target_port: port(&format!("{pf}.target_port"), p.target_port, true)?,
                protocol: protocol(&format!("{pf}.protocol"), p.protocol.as_deref())?,
            };
            if !seen.insert((sp.service_port, sp.protocol)) {
                return Err(invalid(
                    format!("{pf}.service_port"),
                    format!("port {} ({:?}) is listed twice", sp.service_port, sp.protocol),
                ));
            }
            ports.push(sp);
        }
        let lb = load_balancing(&format!("{f}.load_balancing"), s.load_balancing)?;
        let waypoint = s.waypoint.map(|g| gateway(&format!("{f}.waypoint"), g)).transpose()?;
        let mut weighted_waypoints = Vec::new();
        for (j, w) in s.weighted_waypoints.into_iter().enumerate() {
            let wf = format!("{f}.weighted_waypoints[{j}]");
            weighted_waypoints.push(WeightedWaypoint {
                destination: gateway(&format!("{wf}.destination"), w.destination)?,
                weight: w.weight,
            });
        }
        let hostname = crate::model::Hostname::new(&s.namespace, &s.hostname);
        let svc = Service {
            name: crate::model::ServiceName::new(&hostname, &s.name),
            namespace: s.namespace.into(),
            hostname,
            addresses: addresses.into(),
            address_ranges: address_ranges.into(),
            ports: ports.into(),
            load_balancing: lb,
            waypoint: waypoint.map(Box::new),
            weighted_waypoints: weighted_waypoints.into(),
            outlier: None,
            max_connections: None,
            auto_allocated: false,
            unused: Default::default(),
        };
        let key = Istr::new(&svc.key());
        if model.services.contains_key(&key) {
            return Err(invalid(format!("{f}.hostname"), format!("service {key} is defined twice")));
        }
        model.services.insert(key, std::sync::Arc::new(svc));
    }

    let mut owners: BTreeMap<(String, IpAddr), String> = BTreeMap::new();
    for (i, w) in file.workloads.into_iter().enumerate() {
        let f = format!("workloads[{i}]");
        required(&format!("{f}.uid"), &w.uid)?;
        required(&format!("{f}.name"), &w.name)?;
        required(&format!("{f}.namespace"), &w.namespace)?;
        if model.workloads.contains_key(w.uid.as_str()) {
            return Err(invalid(format!("{f}.uid"), format!("uid {:?} is used twice", w.uid)));
        }
        let network_mode = match w.network_mode.as_deref() {
            None => NetworkMode::Standard,
            Some(m) => enum_value(&format!("{f}.network_mode"), m, NETWORK_MODES)?,
        };
        let mut addresses = Vec::new();
        for (j, a) in w.addresses.iter().enumerate() {
            let af = format!("{f}.addresses[{j}]");
            let addr = ip(&af, a)?;
            // Host-network pods share the node's address with each other.
            if network_mode == NetworkMode::Standard
                && let Some(other) = owners.insert((w.network.clone(), addr), w.uid.clone())
            {
                return Err(invalid(af, format!("{a} already belongs to workload {other:?}")));
            }
            addresses.push(addr);
        }
        let status = match w.status.as_deref() {
            None => HealthStatus::Healthy,
            Some(s) => enum_value(&format!("{f}.status"), s, STATUS)?,
        };
        if let Some(c) = w.capacity
            && (c == 0 || c > MAX_CAPACITY)
        {
            {
                return Err(invalid(
                    format!("{f}.capacity"),
                    format!("{c} is out of range 1-{MAX_CAPACITY}"),
                ));
            }
        }
        let waypoint = w.waypoint.map(|g| gateway(&format!("{f}.waypoint"), g)).transpose()?;
        let application_tunnel = w
            .application_tunnel
            .map(|t| application_tunnel(&format!("{f}.application_tunnel"), t))
            .transpose()?;
        let mut services = BTreeMap::new();
        for (key, ports) in w.services {
            let sf = format!("{f}.services[{key:?}]");
            match key.split_once('/') {
                Some((ns, host)) if !ns.is_empty() && !host.is_empty() && !host.contains('/') => {}
                _ => return Err(invalid(sf, "key must be \"namespace/hostname\"")),
            }
            let mut maps = Vec::new();
            for (j, p) in ports.iter().enumerate() {
                let pf = format!("{sf}[{j}]");
                if p.protocol.is_some() {
                    return Err(invalid(format!("{pf}.protocol"), "is only allowed on service ports"));
                }
                maps.push(PortMapping {
                    service_port: port(&format!("{pf}.service_port"), p.service_port, false)?,
                    target_port: port(&format!("{pf}.target_port"), p.target_port, true)?,
                });
            }
            services.insert(Istr::new(&key), maps);
        }
        let uid = Istr::unique(&w.uid);
        model.workloads.insert(
            uid.clone(),
            std::sync::Arc::new(Workload {
                name: crate::model::WorkloadName::new(&uid, &w.name),
                uid,
                addresses: addresses.into(),
                status,
                network_mode,
                priority: 0,
                services: services.into_iter().collect(),
                workload_name: w.workload_name.into(),
                canonical_name: w.canonical_name.into(),
                canonical_revision: w.canonical_revision.into(),
                profile: WorkloadProfile {
                    namespace: w.namespace.into(),
                    network: w.network.into(),
                    cluster_id: w.cluster_id.into(),
                    service_account: w.service_account.into(),
                    trust_domain: w.trust_domain.into(),
                    capacity: w.capacity,
                    authorization_policies: w.authorization_policies.iter().map(|p| Istr::new(p)).collect(),
                    waypoint,
                    application_tunnel,
                    unused: Default::default(),
                }
                .into(),
                placement: Placement { node: w.node.into(), locality: locality(w.locality) }.into(),
            }),
        );
    }
    for (i, p) in file.policies.into_iter().enumerate() {
        let policy = policy(&format!("policies[{i}]"), p)?;
        let key = policy.key();
        if model.policies.insert(key.clone(), std::sync::Arc::new(policy)).is_some() {
            return Err(invalid(format!("policies[{i}].name"), format!("policy {key} is defined twice")));
        }
    }
    crate::alloc::auto_allocate(&mut model);
    Ok(model)
}

fn cidr(field: &str, v: &str) -> Result<Cidr, ConfigError> {
    let (a, len) = match v.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (v, None),
    };
    let addr = ip(field, a)?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => match l.parse::<u8>() {
            Ok(n) if n <= max => n,
            _ => return Err(invalid(field, format!("{v:?}: prefix length must be 0-{max}"))),
        },
    };
    Ok(Cidr { addr, len })
}

fn string_match(field: &str, m: &StringMatchSpec) -> Result<StringMatch, ConfigError> {
    let n = [m.exact.is_some(), m.prefix.is_some(), m.suffix.is_some(), m.presence.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if n != 1 {
        return Err(invalid(field, "give exactly one of exact, prefix, suffix, presence"));
    }
    Ok(if let Some(s) = &m.exact {
        StringMatch::Exact(s.clone())
    } else if let Some(s) = &m.prefix {
        StringMatch::Prefix(s.clone())
    } else if let Some(s) = &m.suffix {
        StringMatch::Suffix(s.clone())
    } else {
        StringMatch::Presence
    })
}

const POLICY_SCOPES: &[(&str, PolicyScope)] = &[
    ("GLOBAL", PolicyScope::Global),
    ("NAMESPACE", PolicyScope::Namespace),
    ("WORKLOAD_SELECTOR", PolicyScope::WorkloadSelector),
];
const ACTIONS: &[(&str, PolicyAction)] = &[("ALLOW", PolicyAction::Allow), ("DENY", PolicyAction::Deny)];

fn policy(f: &str, p: PolicySpec) -> Result<Policy, ConfigError> {
    required(&format!("{f}.name"), &p.name)?;
    required(&format!("{f}.namespace"), &p.namespace)?;
    let scope = match &p.scope {
        None => PolicyScope::Global,
        Some(s) => enum_value(&format!("{f}.scope"), s, POLICY_SCOPES)?,
    };
    let action = match &p.action {
        None => PolicyAction::Allow,
        Some(a) => enum_value(&format!("{f}.action"), a, ACTIONS)?,
    };
    let mut rules = Vec::new();
    for (ri, r) in p.rules.iter().enumerate() {
        let mut clauses = Vec::new();
        for (ci, c) in r.clauses.iter().enumerate() {
            let mut matches = Vec::new();
            for (mi, m) in c.matches.iter().enumerate() {
                let mf = format!("{f}.rules[{ri}].clauses[{ci}].matches[{mi}]");
                let sm = |name: &str, v: &[StringMatchSpec]| -> Result<Vec<StringMatch>, ConfigError> {
                    v.iter().enumerate().map(|(i, m)| string_match(&format!("{mf}.{name}[{i}]"), m)).collect()
                };
                let cs = |name: &str, v: &[String]| -> Result<Vec<Cidr>, ConfigError> {
                    v.iter().enumerate().map(|(i, c)| cidr(&format!("{mf}.{name}[{i}]"), c)).collect()
                };
                let ps = |name: &str, v: &[u32]| -> Result<Vec<u16>, ConfigError> {
                    v.iter().enumerate().map(|(i, p)| port(&format!("{mf}.{name}[{i}]"), *p, false)).collect()
                };
                let sas = |v: &[ServiceAccountSpec]| -> Vec<(String, String)> {
                    v.iter().map(|s| (s.namespace.clone(), s.service_account.clone())).collect()
                };
                matches.push(PolicyMatch {
                    namespaces: sm("namespaces", &m.namespaces)?,
                    not_namespaces: sm("not_namespaces", &m.not_namespaces)?,
                    principals: sm("principals", &m.principals)?,
                    not_principals: sm("not_principals", &m.not_principals)?,
                    source_ips: cs("source_ips", &m.source_ips)?,
                    not_source_ips: cs("not_source_ips", &m.not_source_ips)?,
                    destination_ips: cs("destination_ips", &m.destination_ips)?,
                    not_destination_ips: cs("not_destination_ips", &m.not_destination_ips)?,
                    destination_ports: ps("destination_ports", &m.destination_ports)?,
                    not_destination_ports: ps("not_destination_ports", &m.not_destination_ports)?,
                    service_accounts: sas(&m.service_accounts),
                    not_service_accounts: sas(&m.not_service_accounts),
                });
            }
            clauses.push(Clause { matches });
        }
        rules.push(Rule { clauses });
    }
    Ok(Policy {
        name: p.name,
        namespace: p.namespace,
        scope,
        action,
        rules,
        dry_run: p.dry_run,
        unused: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node: {name: node-a, locality: {region: r1, zone: z1}}
services:
  - name: echo
    namespace: default
    hostname: echo.default.svc.cluster.local
    addresses: [10.96.0.10, "fd00:96::10"]
    ports:
      - {service_port: 80, target_port: 8080}
      - {service_port: 53, target_port: 5353, protocol: udp}
    load_balancing: {routing_preference: [ZONE, REGION], mode: FAILOVER}
workloads:
  - uid: Kubernetes//Pod/default/a
    name: a
    namespace: default
    addresses: [10.244.0.2]
    locality: {region: r1, zone: z1}
    status: UNHEALTHY
    capacity: 3
    services:
      default/echo.default.svc.cluster.local: [{service_port: 80, target_port: 9090}]
"#;

    #[test]
    fn parses_the_documented_format() {
        let m = parse(GOOD).unwrap();
        assert_eq!(m.node.locality.zone, "z1");
        let s = &m.services["default/echo.default.svc.cluster.local"];
        assert_eq!(s.addresses.len(), 2);
        assert_eq!(s.ports[1].protocol, Protocol::Udp);
        assert_eq!(s.load_balancing.mode, LbMode::Failover);
        assert_eq!(s.load_balancing.routing_preference, vec![Scope::Zone, Scope::Region]);
        let w = &m.workloads["Kubernetes//Pod/default/a"];
        assert_eq!(w.status, HealthStatus::Unhealthy);
        assert_eq!(w.capacity(), Some(3));
        assert_eq!(w.services.values().next().unwrap()[0].target_port, 9090);
    }

    #[test]
    fn unspecified_mode_with_preferences_is_failover() {
        let m = parse(
            "services: [{name: s, namespace: n, hostname: h, load_balancing: {routing_preference: [NODE]}}]",
        )
        .unwrap();
        assert_eq!(m.services["n/h"].load_balancing.mode, LbMode::Failover);
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                "workloads: [{uid: u, name: a, namespace: n, addresses: [10.0.0.x]}]",
                "workloads[0].addresses[0]",
            ),
            ("workloads: [{name: a, namespace: n}]", "workloads[0].uid"),
            ("workloads: [{uid: u, name: a, namespace: n, status: SICK}]", "workloads[0].status"),
            ("workloads: [{uid: u, name: a, namespace: n, capacity: 0}]", "workloads[0].capacity"),
            (
                "workloads: [{uid: u, name: a, namespace: n, services: {nohost: []}}]",
                "workloads[0].services[\"nohost\"]",
            ),
            (
                "services: [{name: s, namespace: n, hostname: h, ports: [{service_port: 70000}]}]",
                "services[0].ports[0].service_port",
            ),
            (
                "services: [{name: s, namespace: n, hostname: h, ports: [{service_port: 80, protocol: SCTP}]}]",
                "services[0].ports[0].protocol",
            ),
            (
                "services: [{name: s, namespace: n, hostname: h, load_balancing: {routing_preference: [PLANET]}}]",
                "services[0].load_balancing.routing_preference[0]",
            ),
            (
                "services: [{name: s, namespace: n, hostname: h, load_balancing: {mode: FAST}}]",
                "services[0].load_balancing.mode",
            ),
            (
                "services: [{name: s, namespace: n, hostname: h, load_balancing: {health_policy: ANY}}]",
                "services[0].load_balancing.health_policy",
            ),
            (
                "services: [{name: s, namespace: n, hostname: h, ports: [{service_port: 80}, {service_port: 80}]}]",
                "services[0].ports[1].service_port",
            ),
            ("services: [{name: s, namespace: n}]", "services[0].hostname"),
        ];
        for (text, field) in cases {
            let e = err(text);
            assert!(e.contains(&format!("`{field}`")), "{text}\n-> {e}");
        }
    }

    #[test]
    fn shared_vips_are_accepted_and_duplicate_workload_addresses_rejected() {
        // A shared VIP is resolved by the compiler (the first service key owns it), as over xDS.
        let m = parse(
            "services: [{name: a, namespace: n, hostname: a, addresses: [10.96.0.1], ports: [{service_port: 80}]},
                        {name: b, namespace: n, hostname: b, addresses: [10.96.0.1], ports: [{service_port: 80}]}]",
        )
        .unwrap();
        assert_eq!(m.services.len(), 2);
        let e = err("workloads: [{uid: a, name: a, namespace: n, addresses: [10.0.0.1]},
                         {uid: b, name: b, namespace: n, addresses: [10.0.0.1]}]");
        assert!(e.contains("workloads[1].addresses[0]"), "{e}");
    }

    #[test]
    fn unknown_fields_and_bad_yaml_are_errors() {
        assert!(err("workloads: [{uid: a, name: a, namespace: n, adresses: []}]").contains("adresses"));
        assert!(matches!(parse("services: [unclosed"), Err(ConfigError::Syntax(_))));
    }

    #[test]
    fn the_documented_example_is_valid() {
        let m = parse(include_str!("../../config/example.yaml")).unwrap();
        assert_eq!(m.workloads.len(), 2);
        assert_eq!(m.services["default/echo.default.svc.cluster.local"].ports.len(), 2);
    }

    #[test]
    fn waypoints_are_carried_in_the_model_and_checked() {
        let m = parse(
            "services:
  - name: a
    namespace: n
    hostname: a.n.svc.cluster.local
    addresses: [10.96.0.1]
    waypoint: {hostname: {namespace: n, hostname: wp.n.svc.cluster.local}, hbone_mtls_port: 15008}
    weighted_waypoints:
      - {destination: {address: 10.244.0.9}, weight: 3}
      - {destination: {address: \"fd00::9\", network: net-2}, weight: 1}
workloads:
  - uid: wp-1
    name: wp-1
    namespace: n
    addresses: [10.244.0.9]
    application_tunnel: {protocol: PROXY, port: 15088}
    waypoint: {address: 10.244.0.10}
",
        )
        .unwrap();
        let a = &m.services["n/a.n.svc.cluster.local"];
        assert_eq!(
            a.waypoint.as_deref().cloned(),
            Some(GatewayAddress {
                destination: GatewayDestination::Hostname {
                    namespace: "n".into(),
                    hostname: "wp.n.svc.cluster.local".into()
                },
                hbone_mtls_port: 15008
            })
        );
        assert_eq!(a.weighted_waypoints.len(), 2);
        assert_eq!(
            a.weighted_waypoints[1].destination.destination,
            GatewayDestination::Address { network: "net-2".into(), address: "fd00::9".parse().unwrap() }
        );
        let w = &m.workloads["wp-1"];
        assert_eq!(
            w.application_tunnel(),
            Some(ApplicationTunnel { protocol: TunnelProtocol::Proxy, port: 15088 })
        );
        assert!(w.waypoint().is_some());
        for (yaml, field) in [
            ("waypoint: {}", "services[0].waypoint"),
            ("waypoint: {address: 10.0.0.1, hostname: {namespace: n, hostname: h}}", "services[0].waypoint"),
            ("waypoint: {address: ten}", "services[0].waypoint.address"),
            ("waypoint: {address: 10.0.0.1, hbone_mtls_port: 70000}", "services[0].waypoint.hbone_mtls_port"),
            ("waypoint: {hostname: {namespace: n, hostname: h}, network: x}", "services[0].waypoint.network"),
            (
                "weighted_waypoints: [{destination: {address: x}, weight: 1}]",
                "services[0].weighted_waypoints[0].destination.address",
            ),
        ] {
            let text = format!("services: [{{name: a, namespace: n, hostname: h, {yaml}}}]");
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(field), "{yaml}: {e}");
        }
        let e = parse("workloads: [{uid: u, name: u, namespace: n, application_tunnel: {protocol: HBONE}}]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("workloads[0].application_tunnel.protocol"), "{e}");
    }

    #[test]
    fn empty_file_is_an_empty_mesh() {
        assert_eq!(parse("").unwrap(), Model::default());
    }

    #[test]
    fn host_network_workloads_and_service_ranges() {
        let m = parse(
            "services: [{name: a, namespace: n, hostname: a, addresses: [10.96.0.1, 240.1.0.0/16, 10.96.0.2/32], ports: [{service_port: 80}]}]
workloads:
  - {uid: h1, name: h1, namespace: n, addresses: [192.168.1.5], network_mode: HOST_NETWORK}
  - {uid: h2, name: h2, namespace: n, addresses: [192.168.1.5], network_mode: host_network}",
        )
        .unwrap();
        let s = &m.services["n/a"];
        assert_eq!(s.addresses.len(), 2);
        assert_eq!(*s.address_ranges, [Cidr { addr: "240.1.0.0".parse().unwrap(), len: 16 }]);
        assert!(m.workloads["h1"].is_host_network() && m.workloads["h2"].is_host_network());
        for (text, field, says) in [
            (
                "services: [{name: a, namespace: n, hostname: a, addresses: [240.1.0.1/16], ports: [{service_port: 80}]}]",
                "services[0].addresses[0]",
                "did you mean 240.1.0.0/16",
            ),
            (
                "services: [{name: a, namespace: n, hostname: a, addresses: [240.1.0.0/33], ports: [{service_port: 80}]}]",
                "services[0].addresses[0]",
                "not a prefix length",
            ),
            (
                "workloads: [{uid: u, name: a, namespace: n, network_mode: BRIDGE}]",
                "workloads[0].network_mode",
                "BRIDGE",
            ),
            (
                "workloads: [{uid: u, name: a, namespace: n, addresses: [10.0.0.1]}, {uid: v, name: b, namespace: n, addresses: [10.0.0.1]}]",
                "workloads[1].addresses[0]",
                "already belongs",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains(says), "{text}: {e}");
        }
    }
}
