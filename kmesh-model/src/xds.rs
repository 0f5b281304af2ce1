//! xDS resources <-> model. Each resource converts on its own: a malformed one is rejected with
//! an error naming the field, and never affects the others.

use std::collections::BTreeMap;
use std::net::IpAddr;

use kmesh_proto::istio::security as ps;
use kmesh_proto::istio::workload as pw;
use prost::Message;

use crate::config::MAX_CAPACITY;
use crate::model::*;

mod wire;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {problem}")]
pub struct ResourceError {
    pub field: String,
    pub problem: String,
}

fn err(field: impl Into<String>, problem: impl Into<String>) -> ResourceError {
    ResourceError { field: field.into(), problem: problem.into() }
}

/// One `istio.workload.Address` resource.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // one per resource while decoding; boxing buys nothing
pub enum AddressResource {
    Workload(Workload),
    Service(Service),
}

pub fn decode_address(bytes: &[u8]) -> Result<AddressResource, ResourceError> {
    // A workload as istiod sends a pod's is read in place (no string of it copied); anything
    // else, and anything the fast reader does not take, by the full decoder.
    if let Some(w) = wire::workload(bytes) {
        return build_workload(w, |_| Ok((None, None))).map(AddressResource::Workload);
    }
    decode_address_full(bytes)
}

/// [`decode_address`] by prost's decoder alone.
fn decode_address_full(bytes: &[u8]) -> Result<AddressResource, ResourceError> {
    let a = pw::Address::decode(bytes).map_err(|e| err("Address", format!("not a valid message: {e}")))?;
    match a.r#type {
        Some(pw::address::Type::Workload(w)) => workload_from_proto(w).map(AddressResource::Workload),
        Some(pw::address::Type::Service(s)) => service_from_proto(s).map(AddressResource::Service),
        None => Err(err("Address.type", "neither a workload nor a service")),
    }
}

pub fn decode_authorization(bytes: &[u8]) -> Result<Policy, ResourceError> {
    let a = ps::Authorization::decode(bytes)
        .map_err(|e| err("Authorization", format!("not a valid message: {e}")))?;
    policy_from_proto(a)
}

fn ip(field: &str, b: &[u8]) -> Result<IpAddr, ResourceError> {
    match b.len() {
        4 => Ok(IpAddr::from(<[u8; 4]>::try_from(b).unwrap())),
        16 => Ok(IpAddr::from(<[u8; 16]>::try_from(b).unwrap())),
        n => Err(err(field, format!("an address must be 4 or 16 bytes, got {n}"))),
    }
}

fn ip_bytes(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

fn port(field: &str, p: u32, allow_zero: bool) -> Result<u16, ResourceError> {
    match u16::try_from(p) {
        Ok(0) if !allow_zero => Err(err(field, "must be between 1 and 65535")),
        Ok(v) => Ok(v),
        Err(_) => Err(err(field, format!("{p} is not a port"))),
    }
}

fn required(field: &str, v: &str) -> Result<(), ResourceError> {
    if v.is_empty() { Err(err(field, "must not be empty")) } else { Ok(()) }
}

pub fn workload_from_proto(w: pw::Workload) -> Result<Workload, ResourceError> {
    let fields = WorkloadFields {
        uid: &w.uid,
        name: &w.name,
        namespace: &w.namespace,
        network: &w.network,
        trust_domain: &w.trust_domain,
        service_account: &w.service_account,
        node: &w.node,
        canonical_name: &w.canonical_name,
        canonical_revision: &w.canonical_revision,
        workload_name: &w.workload_name,
        cluster_id: &w.cluster_id,
        addresses: w.addresses.iter().map(|a| a.as_slice()).collect(),
        status: w.status,
        network_mode: w.network_mode,
        capacity: w.capacity,
        locality: w.locality.as_ref().map(|l| [l.region.as_str(), l.zone.as_str(), l.subzone.as_str()]),
        services: w
            .services
            .iter()
            .map(|(k, l)| (k.as_str(), l.ports.iter().map(|p| (p.service_port, p.target_port)).collect()))
            .collect(),
        authorization_policies: w.authorization_policies.iter().map(|p| p.as_str()).collect(),
    };
    // What only the full decoder sees: the fields the fast path leaves to it (see `wire`).
    build_workload(fields, |unused| {
        let waypoint = w.waypoint.as_ref().map(|g| gateway_from_proto("Workload.waypoint", g)).transpose()?;
        let application_tunnel = match &w.application_tunnel {
            None => None,
            Some(t) => Some(ApplicationTunnel {
                protocol: match pw::application_tunnel::Protocol::try_from(t.protocol) {
                    Ok(pw::application_tunnel::Protocol::None) => TunnelProtocol::None,
                    Ok(pw::application_tunnel::Protocol::Proxy) => TunnelProtocol::Proxy,
                    Err(_) => {
                        return Err(err(
                            "Workload.application_tunnel.protocol",
                            format!("unknown value {}", t.protocol),
                        ));
                    }
                },
                port: port("Workload.application_tunnel.port", t.port, true)?,
            }),
        };
        let mut keep = |field: &str, value: String| {
            unused.insert(field.to_string(), value);
        };
        if !w.hostname.is_empty() {
            keep("hostname", w.hostname.clone());
        }
        if w.tunnel_protocol != 0 {
            keep(
                "tunnel_protocol",
                enum_name(pw::TunnelProtocol::try_from(w.tunnel_protocol), w.tunnel_protocol),
            );
        }
        if let Some(g) = &w.network_gateway {
            keep("network_gateway", gateway(g));
        }
        if w.workload_type != 0 {
            keep("workload_type", enum_name(pw::WorkloadType::try_from(w.workload_type), w.workload_type));
        }
        if w.native_tunnel {
            keep("native_tunnel", "true".into());
        }
        if !w.extensions.is_empty() {
            keep("extensions", extension_names(&w.extensions));
        }
        Ok((waypoint, application_tunnel))
    })
}

/// The fields of an `istio.workload.Workload` that a common workload sets (what istiod sends
/// for a pod), borrowed: from a decoded message, or straight from the wire (see [`wire`]).
struct WorkloadFields<'a> {
    uid: &'a str,
    name: &'a str,
    namespace: &'a str,
    network: &'a str,
    trust_domain: &'a str,
    service_account: &'a str,
    node: &'a str,
    canonical_name: &'a str,
    canonical_revision: &'a str,
    workload_name: &'a str,
    cluster_id: &'a str,
    addresses: Vec<&'a [u8]>,
    status: i32,
    network_mode: i32,
    capacity: Option<u32>,
    /// Region, zone and subzone, when the message has a locality.
    locality: Option<[&'a str; 3]>,
    /// Service key -> the workload's (service port, target port) pairs for it, in the order
    /// the message lists them.
    services: Vec<(&'a str, Vec<(u32, u32)>)>,
    authorization_policies: Vec<&'a str>,
}

/// The waypoint and application tunnel of a workload (the fields only the full decoder reads;
/// it also records in `unused` the fields the model does not use).
type Extras = (Option<GatewayAddress>, Option<ApplicationTunnel>);

/// Validates `w` and builds the model's workload; `extras` is called once the common fields
/// are checked (so that errors come in the order of the fields' checks).
fn build_workload(
    w: WorkloadFields<'_>,
    extras: impl FnOnce(&mut BTreeMap<String, String>) -> Result<Extras, ResourceError>,
) -> Result<Workload, ResourceError> {
    required("Workload.uid", w.uid)?;
    // Exactly as long as the list (a workload holds it for its life); the field is named
    // only for an error.
    let mut addresses = Vec::with_capacity(w.addresses.len());
    for (i, a) in w.addresses.iter().enumerate() {
        addresses.push(ip("", a).map_err(|e| err(format!("Workload.addresses[{i}]"), e.problem))?);
    }
    let status = match pw::WorkloadStatus::try_from(w.status) {
        Ok(pw::WorkloadStatus::Healthy) => HealthStatus::Healthy,
        Ok(pw::WorkloadStatus::Unhealthy) => HealthStatus::Unhealthy,
        Err(_) => return Err(err("Workload.status", format!("unknown value {}", w.status))),
    };
    let capacity = match w.capacity {
        None => None,
        Some(c) if c == 0 || c > MAX_CAPACITY => {
            return Err(err("Workload.capacity", format!("{c} is out of range 1-{MAX_CAPACITY}")));
        }
        Some(c) => Some(c),
    };
    let mut services = Vec::with_capacity(w.services.len());
    for (key, list) in &w.services {
        // Field names are formatted only for an error: this runs for every workload of a push.
        let f = |rest: &str| format!("Workload.services[{key:?}]{rest}");
        match key.split_once('/') {
            Some((ns, h)) if !ns.is_empty() && !h.is_empty() => {}
            _ => return Err(err(f(""), "key must be \"namespace/hostname\"")),
        }
        let mut maps = Vec::with_capacity(list.len());
        for (j, &(service_port, target_port)) in list.iter().enumerate() {
            let service_port = port("", service_port, false)
                .map_err(|e| err(f(&format!(".ports[{j}].service_port")), e.problem))?;
            let target_port = port("", target_port, true)
                .map_err(|e| err(f(&format!(".ports[{j}].target_port")), e.problem))?;
            maps.push(PortMapping { service_port, target_port });
        }
        services.push((Istr::new(key), maps));
    }
    let locality = w.locality.map(|[region, zone, subzone]| Locality {
        region: region.into(),
        zone: zone.into(),
        subzone: subzone.into(),
    });
    let mut unused = BTreeMap::new();
    let network_mode = match pw::NetworkMode::try_from(w.network_mode) {
        Ok(pw::NetworkMode::Standard) => NetworkMode::Standard,
        Ok(pw::NetworkMode::HostNetwork) => NetworkMode::HostNetwork,
        Err(_) => {
            // A mode newer than this data plane: treated as a standard pod, and shown.
            unused.insert("network_mode".into(), format!("unknown value {}", w.network_mode));
            NetworkMode::Standard
        }
    };
    let (waypoint, application_tunnel) = extras(&mut unused)?;
    let uid = Istr::unique(w.uid);
    Ok(Workload {
        name: crate::model::WorkloadName::new(&uid, w.name),
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
            capacity,
            authorization_policies: w.authorization_policies.iter().map(|p| Istr::new(p)).collect(),
            waypoint,
            application_tunnel,
            unused: unused.into(),
        }
        .into(),
        placement: Placement { node: w.node.into(), locality: locality.unwrap_or_default() }.into(),
    })
}

/// An enum value by its proto name, or its number when this data plane does not know it.
fn enum_name<E: std::fmt::Debug>(v: Result<E, prost::UnknownEnumValue>, raw: i32) -> String {
    match v {
        Ok(e) => format!("{e:?}"),
        Err(_) => format!("unknown value {raw}"),
    }
}

fn network_address(a: &pw::NetworkAddress) -> String {
    let addr = ip("", &a.address).map(|i| i.to_string()).unwrap_or_else(|e| e.problem);
    let len = a.length.map(|l| format!("/{l}")).unwrap_or_default();
    if a.network.is_empty() { format!("{addr}{len}") } else { format!("{}/{addr}{len}", a.network) }
}

fn gateway(g: &pw::GatewayAddress) -> String {
    use pw::gateway_address::Destination as D;
    let dest = match &g.destination {
        Some(D::Hostname(h)) => format!("{}/{}", h.namespace, h.hostname),
        Some(D::Address(a)) => network_address(a),
        None => "-".into(),
    };
    if g.hbone_mtls_port != 0 { format!("{dest} (HBONE port {})", g.hbone_mtls_port) } else { dest }
}

fn gateway_from_proto(field: &str, g: &pw::GatewayAddress) -> Result<GatewayAddress, ResourceError> {
    use pw::gateway_address::Destination as D;
    let destination = match &g.destination {
        Some(D::Hostname(h)) => {
            required(&format!("{field}.hostname.hostname"), &h.hostname)?;
            GatewayDestination::Hostname { namespace: h.namespace.clone(), hostname: h.hostname.clone() }
        }
        Some(D::Address(a)) => GatewayDestination::Address {
            network: a.network.clone(),
            address: ip(&format!("{field}.address.address"), &a.address)?,
        },
        None => return Err(err(format!("{field}.destination"), "is required (a hostname or an address)")),
    };
    Ok(GatewayAddress {
        destination,
        hbone_mtls_port: port(&format!("{field}.hbone_mtls_port"), g.hbone_mtls_port, true)?,
    })
}

fn gateway_to_proto(g: &GatewayAddress) -> pw::GatewayAddress {
    use pw::gateway_address::Destination as D;
    pw::GatewayAddress {
        destination: Some(match &g.destination {
            GatewayDestination::Hostname { namespace, hostname } => D::Hostname(pw::NamespacedHostname {
                namespace: namespace.clone(),
                hostname: hostname.clone(),
            }),
            GatewayDestination::Address { network, address } => D::Address(pw::NetworkAddress {
                network: network.clone(),
                address: ip_bytes(address),
                length: None,
            }),
        }),
        hbone_mtls_port: g.hbone_mtls_port.into(),
    }
}

fn extension_names(e: &[pw::Extension]) -> String {
    e.iter().map(|x| x.name.as_str()).collect::<Vec<_>>().join(",")
}

pub fn service_from_proto(s: pw::Service) -> Result<Service, ResourceError> {
    required("Service.name", &s.name)?;
    required("Service.namespace", &s.namespace)?;
    required("Service.hostname", &s.hostname)?;
    let mut addresses = Vec::new();
    let mut address_ranges = Vec::new();
    for (i, a) in s.addresses.iter().enumerate() {
        let addr = ip(&format!("Service.addresses[{i}].address"), &a.address)?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        match a.length {
            Some(l) if l > max => {
                return Err(err(
                    format!("Service.addresses[{i}].length"),
                    format!("{l} is longer than {max}"),
                ));
            }
            Some(l) if l < max => {
                // A range: the bits past the prefix do not matter.
                let r = Cidr { addr, len: l as u8 }.network();
                if !address_ranges.contains(&r) {
                    address_ranges.push(r);
                }
            }
            _ => {
                if !addresses.contains(&addr) {
                    addresses.push(addr);
                }
            }
        }
    }
    let mut ports = Vec::with_capacity(s.ports.len());
    for (i, p) in s.ports.iter().enumerate() {
        ports.push(ServicePort {
            service_port: port(&format!("Service.ports[{i}].service_port"), p.service_port, false)?,
            target_port: port(&format!("Service.ports[{i}].target_port"), p.target_port, true)?,
            protocol: Protocol::Tcp,
        });
    }
    let load_balancing = match s.load_balancing {
        None => LoadBalancing::default(),
        Some(lb) => {
            use pw::load_balancing::{HealthPolicy as H, Mode as M, Scope as S};
            let mut prefs = Vec::new();
            for (i, v) in lb.routing_preference.iter().enumerate() {
                let f = format!("Service.load_balancing.routing_preference[{i}]");
                let scope = match S::try_from(*v) {
                    Ok(S::Region) => Scope::Region,
                    Ok(S::Zone) => Scope::Zone,
                    Ok(S::Subzone) => Scope::Subzone,
                    Ok(S::Node) => Scope::Node,
                    Ok(S::Cluster) => Scope::Cluster,
                    Ok(S::Network) => Scope::Network,
                    Ok(S::UnspecifiedScope) | Err(_) => return Err(err(f, format!("invalid scope {v}"))),
                };
                if prefs.contains(&scope) {
                    return Err(err(f, format!("{scope:?} is listed twice")));
                }
                prefs.push(scope);
            }
            let mode = match M::try_from(lb.mode) {
                Ok(M::Strict) => LbMode::Strict,
                Ok(M::Failover) => LbMode::Failover,
                Ok(M::Passthrough) => LbMode::Passthrough,
                Ok(M::UnspecifiedMode) if prefs.is_empty() => LbMode::Random,
                Ok(M::UnspecifiedMode) => LbMode::Failover,
                Err(_) => {
                    return Err(err("Service.load_balancing.mode", format!("unknown value {}", lb.mode)));
                }
            };
            let health_policy = match H::try_from(lb.health_policy) {
                Ok(H::OnlyHealthy) => HealthPolicy::OnlyHealthy,
                Ok(H::AllowAll) => HealthPolicy::AllowAll,
                Err(_) => {
                    return Err(err(
                        "Service.load_balancing.health_policy",
                        format!("unknown value {}", lb.health_policy),
                    ));
                }
            };
            LoadBalancing { routing_preference: prefs, mode, health_policy, ..Default::default() }
        }
    };
    let waypoint = s.waypoint.as_ref().map(|g| gateway_from_proto("Service.waypoint", g)).transpose()?;
    let mut weighted_waypoints = Vec::new();
    for (i, w) in s.weighted_waypoints.iter().enumerate() {
        let f = format!("Service.weighted_waypoints[{i}]");
        let Some(g) = &w.destination else {
            return Err(err(format!("{f}.destination"), "is required"));
        };
        weighted_waypoints.push(WeightedWaypoint {
            destination: gateway_from_proto(&format!("{f}.destination"), g)?,
            weight: w.weight,
        });
    }
    let mut unused = BTreeMap::new();
    let mut keep = |field: &str, value: String| {
        unused.insert(field.to_string(), value);
    };
    if !s.subject_alt_names.is_empty() {
        keep("subject_alt_names", s.subject_alt_names.join(","));
    }
    if s.ip_families != 0 {
        keep("ip_families", enum_name(pw::IpFamilies::try_from(s.ip_families), s.ip_families));
    }
    if !s.extensions.is_empty() {
        keep("extensions", extension_names(&s.extensions));
    }
    if s.canonical {
        keep("canonical", "true".into());
    }
    if s.ingress_use_waypoint {
        keep("ingress_use_waypoint", "true".into());
    }
    if s.visibility != 0 {
        keep("visibility", enum_name(pw::service::Visibility::try_from(s.visibility), s.visibility));
    }
    let protocols: Vec<String> = s
        .ports
        .iter()
        .filter(|p| p.app_protocol != 0)
        .map(|p| {
            format!(
                "{}={}",
                p.service_port,
                enum_name(pw::AppProtocol::try_from(p.app_protocol), p.app_protocol)
            )
        })
        .collect();
    if !protocols.is_empty() {
        keep("app_protocol", protocols.join(","));
    }
    let hostname = crate::model::Hostname::new(&s.namespace, &s.hostname);
    Ok(Service {
        name: crate::model::ServiceName::new(&hostname, &s.name),
        namespace: Istr::new(&s.namespace),
        hostname,
        addresses: addresses.into(),
        address_ranges: address_ranges.into(),
        ports: ports.into(),
        load_balancing,
        waypoint: waypoint.map(Box::new),
        weighted_waypoints: weighted_waypoints.into(),
        outlier: None,
        max_connections: None,
        // istiod allocates addresses for ServiceEntries itself and sends them as VIPs.
        auto_allocated: false,
        unused: unused.into(),
    })
}

fn string_match(field: &str, m: &ps::StringMatch) -> Result<StringMatch, ResourceError> {
    use ps::string_match::MatchType as T;
    match &m.match_type {
        Some(T::Exact(s)) => Ok(StringMatch::Exact(s.clone())),
        Some(T::Prefix(s)) => Ok(StringMatch::Prefix(s.clone())),
        Some(T::Suffix(s)) => Ok(StringMatch::Suffix(s.clone())),
        Some(T::Presence(_)) => Ok(StringMatch::Presence),
        None => Err(err(field, "a string match must be exact, prefix, suffix or presence")),
    }
}

fn cidr(field: &str, a: &ps::Address) -> Result<Cidr, ResourceError> {
    let addr = ip(&format!("{field}.address"), &a.address)?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if a.length > max {
        return Err(err(format!("{field}.length"), format!("{} is longer than {max}", a.length)));
    }
    Ok(Cidr { addr, len: a.length as u8 })
}

pub fn policy_from_proto(p: ps::Authorization) -> Result<Policy, ResourceError> {
    required("Authorization.name", &p.name)?;
    let scope = match ps::Scope::try_from(p.scope) {
        Ok(ps::Scope::Global) => PolicyScope::Global,
        Ok(ps::Scope::Namespace) => PolicyScope::Namespace,
        Ok(ps::Scope::WorkloadSelector) => PolicyScope::WorkloadSelector,
        Err(_) => return Err(err("Authorization.scope", format!("unknown value {}", p.scope))),
    };
    let action = match ps::Action::try_from(p.action) {
        Ok(ps::Action::Allow) => PolicyAction::Allow,
        Ok(ps::Action::Deny) => PolicyAction::Deny,
        Err(_) => return Err(err("Authorization.action", format!("unknown value {}", p.action))),
    };
    let mut rules = Vec::new();
    let mut unused = BTreeMap::new();
    if !p.extensions.is_empty() {
        unused.insert("extensions".to_string(), extension_names(&p.extensions));
    }
    for (ri, r) in p.rules.iter().enumerate() {
        let mut clauses = Vec::new();
        for (ci, c) in r.clauses.iter().enumerate() {
            let mut matches = Vec::new();
            for (mi, m) in c.matches.iter().enumerate() {
                let f = format!("Authorization.rules[{ri}].clauses[{ci}].matches[{mi}]");
                if !m.extensions.is_empty() {
                    unused.insert(
                        format!("rules[{ri}].clauses[{ci}].matches[{mi}].extensions"),
                        extension_names(&m.extensions),
                    );
                }
                let sm = |name: &str, v: &[ps::StringMatch]| -> Result<Vec<StringMatch>, ResourceError> {
                    v.iter().enumerate().map(|(i, m)| string_match(&format!("{f}.{name}[{i}]"), m)).collect()
                };
                let cs = |name: &str, v: &[ps::Address]| -> Result<Vec<Cidr>, ResourceError> {
                    v.iter().enumerate().map(|(i, a)| cidr(&format!("{f}.{name}[{i}]"), a)).collect()
                };
                let ports = |name: &str, v: &[u32]| -> Result<Vec<u16>, ResourceError> {
                    v.iter().enumerate().map(|(i, p)| port(&format!("{f}.{name}[{i}]"), *p, false)).collect()
                };
                let sas = |v: &[ps::ServiceAccountMatch]| -> Vec<(String, String)> {
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
                    destination_ports: ports("destination_ports", &m.destination_ports)?,
                    not_destination_ports: ports("not_destination_ports", &m.not_destination_ports)?,
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
        unused: unused.into(),
    })
}

// ---------------------------------------------------------------------------------------------
// model -> proto, for the in-repo control plane that serves a YAML file.
// ---------------------------------------------------------------------------------------------

pub fn workload_to_proto(w: &Workload) -> pw::Workload {
    pw::Workload {
        uid: w.uid.to_string(),
        name: w.name.to_string(),
        namespace: w.namespace().to_string(),
        workload_name: w.workload_name.to_string(),
        canonical_name: w.canonical_name.to_string(),
        canonical_revision: w.canonical_revision.to_string(),
        addresses: w.addresses.iter().map(ip_bytes).collect(),
        node: w.node().to_string(),
        network: w.network().to_string(),
        cluster_id: w.cluster_id().to_string(),
        locality: Some(pw::Locality {
            region: w.locality().region.to_string(),
            zone: w.locality().zone.to_string(),
            subzone: w.locality().subzone.to_string(),
        }),
        status: match w.status {
            HealthStatus::Healthy => pw::WorkloadStatus::Healthy as i32,
            HealthStatus::Unhealthy => pw::WorkloadStatus::Unhealthy as i32,
        },
        service_account: w.service_account().to_string(),
        trust_domain: w.trust_domain().to_string(),
        capacity: w.capacity(),
        network_mode: match w.network_mode {
            NetworkMode::Standard => pw::NetworkMode::Standard as i32,
            NetworkMode::HostNetwork => pw::NetworkMode::HostNetwork as i32,
        },
        authorization_policies: w.authorization_policies().iter().map(|p| p.to_string()).collect(),
        waypoint: w.waypoint().map(gateway_to_proto),
        application_tunnel: w.application_tunnel().map(|t| pw::ApplicationTunnel {
            protocol: match t.protocol {
                TunnelProtocol::None => pw::application_tunnel::Protocol::None as i32,
                TunnelProtocol::Proxy => pw::application_tunnel::Protocol::Proxy as i32,
            },
            port: t.port.into(),
        }),
        services: w
            .services
            .iter()
            .map(|(k, v)| {
                let ports = v
                    .iter()
                    .map(|m| pw::Port {
                        service_port: m.service_port.into(),
                        target_port: m.target_port.into(),
                        app_protocol: 0,
                    })
                    .collect();
                (k.to_string(), pw::PortList { ports })
            })
            .collect(),
        ..Default::default()
    }
}

pub fn service_to_proto(s: &Service) -> pw::Service {
    use pw::load_balancing::{HealthPolicy as H, Mode as M, Scope as S};
    let lb = &s.load_balancing;
    pw::Service {
        name: s.name.to_string(),
        namespace: s.namespace.to_string(),
        hostname: s.hostname.to_string(),
        addresses: s
            .addresses
            .iter()
            .map(|a| pw::NetworkAddress { network: String::new(), address: ip_bytes(a), length: None })
            .chain(s.address_ranges.iter().map(|r| pw::NetworkAddress {
                network: String::new(),
                address: ip_bytes(&r.addr),
                length: Some(r.len.into()),
            }))
            .collect(),
        ports: s
            .ports
            .iter()
            .map(|p| pw::Port {
                service_port: p.service_port.into(),
                target_port: p.target_port.into(),
                app_protocol: 0,
            })
            .collect(),
        load_balancing: Some(pw::LoadBalancing {
            routing_preference: lb
                .routing_preference
                .iter()
                .map(|s| {
                    (match s {
                        Scope::Region => S::Region,
                        Scope::Zone => S::Zone,
                        Scope::Subzone => S::Subzone,
                        Scope::Node => S::Node,
                        Scope::Cluster => S::Cluster,
                        Scope::Network => S::Network,
                    }) as i32
                })
                .collect(),
            mode: (match lb.mode {
                LbMode::Random => M::UnspecifiedMode,
                LbMode::Strict => M::Strict,
                LbMode::Failover => M::Failover,
                LbMode::Passthrough => M::Passthrough,
            }) as i32,
            health_policy: (match lb.health_policy {
                HealthPolicy::OnlyHealthy => H::OnlyHealthy,
                HealthPolicy::AllowAll => H::AllowAll,
            }) as i32,
        }),
        waypoint: s.waypoint.as_deref().map(gateway_to_proto),
        weighted_waypoints: s
            .weighted_waypoints
            .iter()
            .map(|w| pw::WeightedWaypoint {
                destination: Some(gateway_to_proto(&w.destination)),
                weight: w.weight,
            })
            .collect(),
        ..Default::default()
    }
}

pub fn policy_to_proto(p: &Policy) -> ps::Authorization {
    use ps::string_match::MatchType as T;
    let sm = |v: &[StringMatch]| -> Vec<ps::StringMatch> {
        v.iter()
            .map(|m| ps::StringMatch {
                match_type: Some(match m {
                    StringMatch::Exact(s) => T::Exact(s.clone()),
                    StringMatch::Prefix(s) => T::Prefix(s.clone()),
                    StringMatch::Suffix(s) => T::Suffix(s.clone()),
                    StringMatch::Presence => T::Presence(()),
                }),
            })
            .collect()
    };
    let cs = |v: &[Cidr]| -> Vec<ps::Address> {
        v.iter().map(|c| ps::Address { address: ip_bytes(&c.addr), length: c.len.into() }).collect()
    };
    let ports = |v: &[u16]| -> Vec<u32> { v.iter().map(|p| u32::from(*p)).collect() };
    let sas = |v: &[(String, String)]| -> Vec<ps::ServiceAccountMatch> {
        v.iter()
            .map(|(n, s)| ps::ServiceAccountMatch { namespace: n.clone(), service_account: s.clone() })
            .collect()
    };
    let rules = p
        .rules
        .iter()
        .map(|r| ps::Rule {
            clauses: r
                .clauses
                .iter()
                .map(|c| ps::Clause {
                    matches: c
                        .matches
                        .iter()
                        .map(|m| ps::Match {
                            namespaces: sm(&m.namespaces),
                            not_namespaces: sm(&m.not_namespaces),
                            principals: sm(&m.principals),
                            not_principals: sm(&m.not_principals),
                            source_ips: cs(&m.source_ips),
                            not_source_ips: cs(&m.not_source_ips),
                            destination_ips: cs(&m.destination_ips),
                            not_destination_ips: cs(&m.not_destination_ips),
                            destination_ports: ports(&m.destination_ports),
                            not_destination_ports: ports(&m.not_destination_ports),
                            service_accounts: sas(&m.service_accounts),
                            not_service_accounts: sas(&m.not_service_accounts),
                            extensions: vec![],
                        })
                        .collect(),
                })
                .collect(),
        })
        .collect();
    ps::Authorization {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope: (match p.scope {
            PolicyScope::Global => ps::Scope::Global,
            PolicyScope::Namespace => ps::Scope::Namespace,
            PolicyScope::WorkloadSelector => ps::Scope::WorkloadSelector,
        }) as i32,
        action: (match p.action {
            PolicyAction::Allow => ps::Action::Allow,
            PolicyAction::Deny => ps::Action::Deny,
        }) as i32,
        rules,
        dry_run: p.dry_run,
        extensions: vec![],
    }
}

/// Encodes a workload or service as the bytes of an `istio.workload.Address`.
pub fn encode_address(r: &AddressResource) -> Vec<u8> {
    let t = match r {
        AddressResource::Workload(w) => pw::address::Type::Workload(workload_to_proto(w)),
        AddressResource::Service(s) => pw::address::Type::Service(service_to_proto(s)),
    };
    pw::Address { r#type: Some(t) }.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    #[test]
    fn the_example_config_round_trips_through_protos() {
        let m = config::parse(include_str!("../../config/example.yaml")).unwrap();
        for w in m.workloads.values() {
            let bytes = encode_address(&AddressResource::Workload((**w).clone()));
            assert_eq!(decode_address(&bytes).unwrap(), AddressResource::Workload((**w).clone()));
        }
        for s in m.services.values() {
            let mut expect = (**s).clone();
            // Istio's Service ports carry no L4 protocol: everything from xDS is TCP.
            for p in &mut expect.ports {
                p.protocol = Protocol::Tcp;
            }
            // Allocated addresses travel as plain VIPs, as istiod's do.
            expect.auto_allocated = false;
            let bytes = encode_address(&AddressResource::Service((**s).clone()));
            assert_eq!(decode_address(&bytes).unwrap(), AddressResource::Service(expect));
        }
    }

    #[test]
    fn malformed_resources_name_the_field() {
        let w = pw::Workload { uid: "u".into(), addresses: vec![vec![1, 2, 3]], ..Default::default() };
        let e = workload_from_proto(w).unwrap_err();
        assert_eq!(e.field, "Workload.addresses[0]");
        let w = pw::Workload { uid: "u".into(), status: 7, ..Default::default() };
        assert_eq!(workload_from_proto(w).unwrap_err().field, "Workload.status");
        let w = pw::Workload { addresses: vec![], ..Default::default() };
        assert_eq!(workload_from_proto(w).unwrap_err().field, "Workload.uid");
        let s = pw::Service {
            name: "s".into(),
            namespace: "n".into(),
            hostname: "h".into(),
            ports: vec![pw::Port { service_port: 70000, target_port: 1, app_protocol: 0 }],
            ..Default::default()
        };
        assert_eq!(service_from_proto(s).unwrap_err().field, "Service.ports[0].service_port");
        assert!(decode_address(&[0xff, 0xff, 0xff]).is_err());
        assert_eq!(decode_address(&[]).unwrap_err().field, "Address.type");
    }

    #[test]
    fn authorization_policies_convert_with_every_match_field() {
        let sm =
            |s: &str| ps::StringMatch { match_type: Some(ps::string_match::MatchType::Prefix(s.into())) };
        let p = ps::Authorization {
            extensions: vec![],
            name: "deny-x".into(),
            namespace: "default".into(),
            scope: ps::Scope::Namespace as i32,
            action: ps::Action::Deny as i32,
            dry_run: true,
            rules: vec![ps::Rule {
                clauses: vec![ps::Clause {
                    matches: vec![ps::Match {
                        namespaces: vec![sm("prod")],
                        source_ips: vec![ps::Address { address: vec![10, 0, 0, 0], length: 8 }],
                        destination_ports: vec![80],
                        service_accounts: vec![ps::ServiceAccountMatch {
                            namespace: "a".into(),
                            service_account: "b".into(),
                        }],
                        ..Default::default()
                    }],
                }],
            }],
        };
        let m = policy_from_proto(p.clone()).unwrap();
        assert_eq!(m.key(), "default/deny-x");
        assert_eq!(m.action, PolicyAction::Deny);
        assert!(m.dry_run);
        let pm = &m.rules[0].clauses[0].matches[0];
        assert_eq!(pm.namespaces, vec![StringMatch::Prefix("prod".into())]);
        assert_eq!(pm.source_ips[0].len, 8);
        assert_eq!(pm.service_accounts, vec![("a".into(), "b".into())]);

        let mut bad = p;
        bad.rules[0].clauses[0].matches[0].source_ips[0].length = 33;
        let e = policy_from_proto(bad).unwrap_err();
        assert_eq!(e.field, "Authorization.rules[0].clauses[0].matches[0].source_ips[0].length");
    }

    /// Bytes as upstream's protos put them on the wire, built by hand (not by this crate's
    /// generated code): `Address{workload: Workload{uid: "u", network_mode: HOST_NETWORK,
    /// capacity: {value: 5}}}`.
    fn upstream_host_network_workload() -> Vec<u8> {
        let mut w = vec![0xa2, 0x01, 1, b'u']; // uid = 20, LEN
        w.extend([0xc8, 0x01, 1]); // network_mode = 25, VARINT, HOST_NETWORK
        w.extend([0xda, 0x01, 2, 0x08, 5]); // capacity = 27, LEN, UInt32Value{value = 1: 5}
        let mut a = vec![0x0a, w.len() as u8]; // Address.workload = 1, LEN
        a.extend(w);
        a
    }

    #[test]
    fn capacity_is_field_27_and_network_mode_field_25_as_upstream() {
        let AddressResource::Workload(w) = decode_address(&upstream_host_network_workload()).unwrap() else {
            panic!("not a workload")
        };
        assert_eq!(w.capacity(), Some(5));
        assert_eq!(w.network_mode, NetworkMode::HostNetwork);
        assert!(w.is_host_network());
        // And back: our encoding is upstream's.
        let back = encode_address(&AddressResource::Workload(w));
        assert_eq!(
            decode_address(&back).unwrap(),
            decode_address(&upstream_host_network_workload()).unwrap()
        );
    }

    #[test]
    fn a_service_address_with_a_prefix_length_is_a_range() {
        let na = |a: Vec<u8>, length: Option<u32>| pw::NetworkAddress {
            network: String::new(),
            address: a,
            length,
        };
        let s = pw::Service {
            name: "s".into(),
            namespace: "n".into(),
            hostname: "h".into(),
            addresses: vec![
                na(vec![10, 96, 0, 1], None),
                na(vec![10, 96, 0, 2], Some(32)),
                na(vec![240, 1, 2, 99], Some(24)),
            ],
            ..Default::default()
        };
        let m = service_from_proto(s.clone()).unwrap();
        assert_eq!(*m.addresses, ["10.96.0.1".parse::<IpAddr>().unwrap(), "10.96.0.2".parse().unwrap()]);
        assert_eq!(*m.address_ranges, [Cidr { addr: "240.1.2.0".parse().unwrap(), len: 24 }]);
        let again = service_from_proto(service_to_proto(&m)).unwrap();
        assert_eq!(again, m);
        let mut bad = s;
        bad.addresses[2].length = Some(33);
        assert_eq!(service_from_proto(bad).unwrap_err().field, "Service.addresses[2].length");
    }

    #[test]
    fn fields_not_acted_on_are_kept_not_rejected() {
        let gw = pw::GatewayAddress {
            destination: Some(pw::gateway_address::Destination::Hostname(pw::NamespacedHostname {
                namespace: "istio-system".into(),
                hostname: "waypoint.istio-system.svc.cluster.local".into(),
            })),
            hbone_mtls_port: 15008,
        };
        let w = pw::Workload {
            uid: "u".into(),
            tunnel_protocol: pw::TunnelProtocol::LegacyIstioMtls as i32,
            waypoint: Some(gw.clone()),
            native_tunnel: true,
            application_tunnel: Some(pw::ApplicationTunnel { protocol: 1, port: 15088 }),
            extensions: vec![pw::Extension { name: "x.example".into(), config: None }],
            network_mode: 7,
            ..Default::default()
        };
        let m = workload_from_proto(w.clone()).unwrap();
        assert_eq!(m.unused()["tunnel_protocol"], "LegacyIstioMtls");
        let waypoint = GatewayAddress {
            destination: GatewayDestination::Hostname {
                namespace: "istio-system".into(),
                hostname: "waypoint.istio-system.svc.cluster.local".into(),
            },
            hbone_mtls_port: 15008,
        };
        assert_eq!(m.waypoint(), Some(&waypoint));
        assert_eq!(
            m.application_tunnel(),
            Some(ApplicationTunnel { protocol: TunnelProtocol::Proxy, port: 15088 })
        );
        assert!(!m.unused().contains_key("waypoint") && !m.unused().contains_key("application_tunnel"));
        // Typed, the waypoint fields survive the trip back to protobuf.
        assert_eq!(workload_from_proto(workload_to_proto(&m)).unwrap().waypoint(), m.waypoint());
        assert_eq!(
            workload_from_proto(workload_to_proto(&m)).unwrap().application_tunnel(),
            m.application_tunnel()
        );
        // A waypoint without a destination, or with a malformed address, is refused by name.
        let mut bad = w.clone();
        bad.waypoint = Some(pw::GatewayAddress { destination: None, hbone_mtls_port: 15008 });
        assert!(workload_from_proto(bad).unwrap_err().to_string().contains("Workload.waypoint.destination"));
        let mut bad = w.clone();
        bad.waypoint = Some(pw::GatewayAddress {
            destination: Some(pw::gateway_address::Destination::Address(pw::NetworkAddress {
                network: String::new(),
                address: vec![10, 0, 0],
                length: None,
            })),
            hbone_mtls_port: 15008,
        });
        assert!(
            workload_from_proto(bad).unwrap_err().to_string().contains("Workload.waypoint.address.address")
        );
        let mut bad = w;
        bad.application_tunnel = Some(pw::ApplicationTunnel { protocol: 9, port: 15088 });
        assert!(
            workload_from_proto(bad)
                .unwrap_err()
                .to_string()
                .contains("Workload.application_tunnel.protocol")
        );
        assert_eq!(m.unused()["extensions"], "x.example");
        assert_eq!(m.unused()["network_mode"], "unknown value 7");
        assert_eq!(m.network_mode, NetworkMode::Standard);
        let s = pw::Service {
            name: "s".into(),
            namespace: "n".into(),
            hostname: "h".into(),
            canonical: true,
            visibility: pw::service::Visibility::Namespace as i32,
            weighted_waypoints: vec![pw::WeightedWaypoint { destination: Some(gw), weight: 3 }],
            ports: vec![pw::Port {
                service_port: 443,
                target_port: 8443,
                app_protocol: pw::AppProtocol::Tls as i32,
            }],
            ..Default::default()
        };
        let m = service_from_proto(s).unwrap();
        assert_eq!(m.unused["visibility"], "Namespace");
        assert_eq!(m.unused["app_protocol"], "443=Tls");
        assert_eq!(m.unused["canonical"], "true");
        assert_eq!(*m.weighted_waypoints, [WeightedWaypoint { destination: waypoint, weight: 3 }]);
        assert_eq!(
            service_from_proto(service_to_proto(&m)).unwrap().weighted_waypoints,
            m.weighted_waypoints
        );
        let p = ps::Authorization {
            name: "p".into(),
            extensions: vec![pw::Extension { name: "e".into(), config: None }],
            ..Default::default()
        };
        assert_eq!(policy_from_proto(p).unwrap().unused["extensions"], "e");
    }

    #[test]
    fn policies_round_trip_through_protos() {
        let m = config::parse(
            "policies:
  - name: p
    namespace: prod
    scope: WORKLOAD_SELECTOR
    action: DENY
    dry_run: true
    rules:
      - clauses:
          - matches:
              - namespaces: [{prefix: dev}]
                not_principals: [{exact: spiffe://cluster.local/ns/a/sa/b}, {presence: {}}]
                source_ips: [10.0.0.0/8]
                not_destination_ips: [\"fd00::/64\"]
                destination_ports: [80, 443]
                service_accounts: [{namespace: a, service_account: b}]",
        )
        .unwrap();
        let p = &m.policies["prod/p"];
        let bytes = policy_to_proto(p).encode_to_vec();
        assert_eq!(decode_authorization(&bytes).unwrap(), **p);
    }
}
