//! The daemon's one truth in memory: workloads and services as Istio's workload API defines
//! them, already validated. Sources (the local YAML file, later xDS) produce a `Model`; the
//! compiler turns it into map entries. Nothing here does I/O.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

pub use crate::istr::Istr;
pub use crate::names::{Hostname, ServiceName, WorkloadName};
pub use crate::shared::{ServiceList, Shared};

/// Where a node, a workload or a client sits, as Istio's `Locality`.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Locality {
    pub region: Istr,
    pub zone: Istr,
    pub subzone: Istr,
}

/// The node this daemon runs on. Clients enrolled without a workload take its locality.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodeInfo {
    pub name: String,
    pub locality: Locality,
    pub network: String,
    pub cluster_id: String,
}

/// Istio `WorkloadStatus`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum HealthStatus {
    #[default]
    Healthy,
    Unhealthy,
}

/// One service port mapped to a target port on a workload (Istio `Port` in a `PortList`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortMapping {
    pub service_port: u16,
    pub target_port: u16,
}

/// Istio `NetworkMode`: how a workload's pod is networked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum NetworkMode {
    #[default]
    Standard,
    /// The pod runs in the node's network namespace: its address is the node's, shared with
    /// every other host-network pod and the node itself. Such a workload can back a service,
    /// but it is never enrolled, and its address says nothing about who is connecting
    /// (authorization gives the node's address no identity from it and polices nothing there).
    HostNetwork,
}

/// Istio `GatewayAddress`: where a waypoint is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    /// Istio's `hbone_mtls_port` (0: not given).
    pub hbone_mtls_port: u16,
}

/// The `destination` of a [`GatewayAddress`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GatewayDestination {
    /// A service of the model, by namespace and hostname (resolved through the model).
    Hostname { namespace: String, hostname: String },
    /// An address, on a network (empty: the local one).
    Address { network: String, address: IpAddr },
}

/// Istio `WeightedWaypoint`: one of a service's waypoints, chosen per connection by weight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WeightedWaypoint {
    pub destination: GatewayAddress,
    pub weight: u32,
}

/// Istio `ApplicationTunnel.Protocol`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub enum TunnelProtocol {
    /// Plain connections.
    #[default]
    None,
    /// Connections open with a PROXY protocol v2 header (original destination, identity).
    Proxy,
}

/// Istio `ApplicationTunnel`: a tunnel the workload itself terminates (a waypoint that takes
/// PROXY protocol).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct ApplicationTunnel {
    pub protocol: TunnelProtocol,
    /// The port that takes the tunnel (0: the connection's own port).
    pub port: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// Shared, not interned ([`Istr::unique`]): the model's maps and the compiler's indexes
    /// key on this one copy.
    pub uid: Istr,
    /// The pod's name: read from the uid when the uid ends with it, as istiod's do (see
    /// [`WorkloadName`]).
    pub name: WorkloadName,
    /// The owning workload (deployment) name; telemetry's `*_workload` label (falls back to
    /// the pod's name).
    pub workload_name: Istr,
    /// `service.istio.io/canonical-name` / `-revision` (telemetry's app and version labels).
    pub canonical_name: Istr,
    pub canonical_revision: Istr,
    pub addresses: Addrs,
    pub status: HealthStatus,
    pub network_mode: NetworkMode,
    /// Failover priority (Envoy's `LocalityLbEndpoints.priority`; 0 from the workload API): a
    /// service without locality preferences uses the lowest priority that has endpoints.
    #[serde(skip_serializing_if = "is_zero")]
    pub priority: u8,
    /// Services this workload backs, keyed `namespace/hostname`, with per-workload port maps;
    /// interned whole (a service's endpoints usually share one list).
    pub services: Shared<ServiceList>,
    /// Who the workload is (namespace, identity, network, policies, waypoint): interned, so
    /// the pods of one service account hold one copy. Read through the accessors below.
    #[serde(flatten)]
    pub profile: Shared<WorkloadProfile>,
    /// Where it runs (node and locality): interned, one copy per node.
    #[serde(flatten)]
    pub placement: Shared<Placement>,
}

/// The fields of a [`Workload`] that the pods of one service account (in one namespace, on one
/// network) have alike, whatever deployment they belong to. Held once per distinct value
/// ([`Shared`]): with these and its [`Placement`] inline a workload took 176 bytes, 192 with its
/// `Arc`'s counts; with a pointer to each it takes 96, 112 with the counts (at 100k workloads,
/// 8 MB). The deployment's names stay in the workload: with them, 100k deployments of one pod
/// each would hold 100k profiles, each costing more than it saves.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct WorkloadProfile {
    pub namespace: Istr,
    pub network: Istr,
    pub cluster_id: Istr,
    pub service_account: Istr,
    pub trust_domain: Istr,
    /// Relative weight for load balancing (`None`: every endpoint weighs the same).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u32>,
    /// Selector-based policies that apply to this workload, as `namespace/name`.
    pub authorization_policies: Box<[Istr]>,
    /// The waypoint that connections addressed to this workload go through (Istio's
    /// `Workload.waypoint`): every TCP port of its addresses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<GatewayAddress>,
    /// Set on waypoints that take PROXY protocol (Istio's `Workload.application_tunnel`): only
    /// such a waypoint endpoint receives redirected connections (it is told where they were
    /// going); one reachable only by HBONE is not used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub application_tunnel: Option<ApplicationTunnel>,
    /// Fields of the workload API this data plane received but does not act on yet (tunnel
    /// protocol, extensions, ...), by field name, rendered for the config dump.
    #[serde(skip_serializing_if = "Unused::is_empty")]
    pub unused: Unused,
}

/// Where a [`Workload`] runs; the workloads of a node share one copy ([`Shared`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Placement {
    pub node: Istr,
    pub locality: Locality,
}

/// A workload's addresses: nearly always one, held inline (a list would be a pointer here and
/// an allocation of its own per workload); more in a boxed slice. Reads as `[IpAddr]`.
#[derive(Clone)]
pub enum Addrs {
    One(IpAddr),
    Many(Box<[IpAddr]>),
}

impl Default for Addrs {
    fn default() -> Self {
        Addrs::Many(Box::default())
    }
}

impl std::ops::Deref for Addrs {
    type Target = [IpAddr];
    fn deref(&self) -> &[IpAddr] {
        match self {
            Addrs::One(a) => std::slice::from_ref(a),
            Addrs::Many(v) => v,
        }
    }
}

impl From<Vec<IpAddr>> for Addrs {
    fn from(v: Vec<IpAddr>) -> Self {
        match *v {
            [a] => Addrs::One(a),
            _ => Addrs::Many(v.into_boxed_slice()),
        }
    }
}

impl FromIterator<IpAddr> for Addrs {
    fn from_iter<I: IntoIterator<Item = IpAddr>>(it: I) -> Self {
        it.into_iter().collect::<Vec<_>>().into()
    }
}

impl<'a> IntoIterator for &'a Addrs {
    type Item = &'a IpAddr;
    type IntoIter = std::slice::Iter<'a, IpAddr>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl PartialEq for Addrs {
    fn eq(&self, o: &Self) -> bool {
        **self == **o
    }
}

impl Eq for Addrs {}

impl PartialEq<Vec<IpAddr>> for Addrs {
    fn eq(&self, o: &Vec<IpAddr>) -> bool {
        **self == **o
    }
}

impl std::fmt::Debug for Addrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

impl Serialize for Addrs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(s)
    }
}

/// Fields of a resource received but not acted on, by field name: nearly always none, so a
/// pointer (8 bytes in every workload and service), not an inline map (24).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
#[allow(clippy::box_collection)] // the box is the point: one word when empty
pub struct Unused(Option<Box<BTreeMap<String, String>>>);

static NO_FIELDS: BTreeMap<String, String> = BTreeMap::new();

impl Unused {
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

impl From<BTreeMap<String, String>> for Unused {
    fn from(m: BTreeMap<String, String>) -> Self {
        Unused((!m.is_empty()).then(|| Box::new(m)))
    }
}

impl std::ops::Deref for Unused {
    type Target = BTreeMap<String, String>;

    fn deref(&self) -> &Self::Target {
        self.0.as_deref().unwrap_or(&NO_FIELDS)
    }
}

impl Serialize for Unused {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(s)
    }
}

fn is_zero(v: &u8) -> bool {
    *v == 0
}

impl Workload {
    pub fn is_host_network(&self) -> bool {
        self.network_mode == NetworkMode::HostNetwork
    }
    // The profile's and the placement's fields, read as if they were the workload's own.
    pub fn namespace(&self) -> &Istr {
        &self.profile.namespace
    }
    pub fn unused(&self) -> &Unused {
        &self.profile.unused
    }
    pub fn network(&self) -> &Istr {
        &self.profile.network
    }
    pub fn cluster_id(&self) -> &Istr {
        &self.profile.cluster_id
    }
    pub fn service_account(&self) -> &Istr {
        &self.profile.service_account
    }
    pub fn trust_domain(&self) -> &Istr {
        &self.profile.trust_domain
    }
    pub fn capacity(&self) -> Option<u32> {
        self.profile.capacity
    }
    pub fn authorization_policies(&self) -> &[Istr] {
        &self.profile.authorization_policies
    }
    pub fn waypoint(&self) -> Option<&GatewayAddress> {
        self.profile.waypoint.as_ref()
    }
    pub fn application_tunnel(&self) -> Option<ApplicationTunnel> {
        self.profile.application_tunnel
    }
    pub fn node(&self) -> &Istr {
        &self.placement.node
    }
    pub fn locality(&self) -> &Locality {
        &self.placement.locality
    }
}

/// L4 protocol of a service port. Istio's API has none (its ports are TCP); the local config
/// may say UDP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub service_port: u16,
    /// 0: the service port itself unless the workload maps it.
    pub target_port: u16,
    pub protocol: Protocol,
}

/// Istio `LoadBalancing.Scope`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Scope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

/// Istio `LoadBalancing.Mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum LbMode {
    /// Random over all endpoints (Istio's UNSPECIFIED_MODE without routing preferences).
    #[default]
    Random,
    Strict,
    Failover,
    /// Connections go to the address the client dialled; nothing is rewritten.
    Passthrough,
}

/// Istio `LoadBalancing.HealthPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum HealthPolicy {
    #[default]
    OnlyHealthy,
    AllowAll,
}

/// How one endpoint is chosen among those of the best level. Istio's workload API has no such
/// field (ztunnel picks at random); Envoy's `Cluster.lb_policy` sets it in kernel-native mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum LbPolicy {
    /// Uniformly at random (by weight when endpoints weigh differently).
    #[default]
    Random,
    /// In turn, per CPU (Envoy's round robin is per worker thread), by weight when endpoints
    /// weigh differently.
    RoundRobin,
    /// A hash ring of this many points (Envoy's `RING_HASH`, `minimum_ring_size`), hashed by
    /// client: the same client reaches the same endpoint, and removing one endpoint moves only
    /// the clients it had.
    RingHash(u32),
    /// Of two endpoints picked at random, the one with fewer active connections (Envoy's
    /// `LEAST_REQUEST`; the kernel counts connections).
    LeastRequest,
    /// A Maglev lookup table of this many entries (a prime; Envoy's `MAGLEV`, `table_size`).
    Maglev(u32),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LoadBalancing {
    pub routing_preference: Vec<Scope>,
    pub mode: LbMode,
    pub health_policy: HealthPolicy,
    #[serde(skip_serializing_if = "is_random")]
    pub policy: LbPolicy,
}

fn is_random(p: &LbPolicy) -> bool {
    *p == LbPolicy::Random
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Service {
    /// One pointer each: the namespace interned; the hostname and the name read from the
    /// service's interned key (`namespace/hostname`, the copy the model and the workloads key
    /// the service by), with no allocation of their own when they can be (see [`Hostname`]).
    pub name: ServiceName,
    pub namespace: Istr,
    pub hostname: Hostname,
    /// Virtual addresses (exact).
    pub addresses: Addrs,
    /// Virtual address ranges (Istio `NetworkAddress` with a prefix `length` shorter than the
    /// address): a connection to any address inside one is balanced like one to a VIP. An
    /// exact VIP of any service wins over a range; among ranges, the longest prefix wins.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub address_ranges: Box<[Cidr]>,
    pub ports: Box<[ServicePort]>,
    pub load_balancing: LoadBalancing,
    /// The waypoint connections to this service's TCP ports go through (Istio's
    /// `Service.waypoint`), and `weighted_waypoints` to choose among by weight per connection
    /// (when given, `waypoint` is not used). Boxed, as the outlier settings: few services have
    /// them, and inline they would be a quarter of every service's size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<Box<GatewayAddress>>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub weighted_waypoints: Box<[WeightedWaypoint]>,
    /// The most connections open to this service at once (Envoy's circuit breaker
    /// `max_connections`): connect() beyond it fails with ENOBUFS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Passive outlier detection for this service's endpoints (Envoy's
    /// `Cluster.outlier_detection`; `None`: the node's default, if any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier: Option<Box<OutlierDetection>>,
    /// `addresses` were allocated by this data plane (see [`crate::alloc`]), not given.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub auto_allocated: bool,
    /// Fields received but not acted on yet, as in [`Workload::unused`].
    #[serde(skip_serializing_if = "Unused::is_empty")]
    pub unused: Unused,
}

impl Service {
    /// The key workloads use in their `services` map.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// Passive outlier detection: an endpoint whose connections fail (refused, reset or timed out
/// before they are established) `consecutive_failures` times in a row is ejected: new
/// connections skip it for `base_ejection_ms` times the number of times it was ejected,
/// checked every `interval_ms`, with at most `max_ejection_percent` of a service's endpoints
/// out at once (one may always go).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct OutlierDetection {
    pub consecutive_failures: u32,
    pub base_ejection_ms: u64,
    /// The longest ejection (Envoy's `max_ejection_time`, 300 s by default).
    pub max_ejection_ms: u64,
    pub max_ejection_percent: u32,
    pub interval_ms: u64,
}

impl Default for OutlierDetection {
    /// Envoy's defaults.
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_ms: 30_000,
            max_ejection_ms: 300_000,
            max_ejection_percent: 10,
            interval_ms: 10_000,
        }
    }
}

/// Everything the daemon knows about the mesh.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Model {
    pub node: NodeInfo,
    /// By uid. Entries are shared (`Arc`), so copies of a model made per update are cheap.
    pub workloads: BTreeMap<Istr, Arc<Workload>>,
    /// By `namespace/hostname` (interned: the key workloads list their services by, one copy
    /// shared by every index).
    pub services: BTreeMap<Istr, Arc<Service>>,
    /// Authorization policies by `namespace/name`.
    pub policies: BTreeMap<String, Arc<Policy>>,
}

impl Model {
    /// The workload with this address. A host-network workload's address is the node's.
    pub fn workload_by_address(&self, ip: IpAddr) -> Option<&Workload> {
        self.workloads.values().map(|w| w.as_ref()).find(|w| w.addresses.contains(&ip))
    }
}

/// What locality-aware load balancing compares: the client's side of each scope.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ClientLocality {
    pub locality: Locality,
    pub node: Istr,
    pub cluster_id: Istr,
    pub network: Istr,
}

impl ClientLocality {
    pub fn of_node(n: &NodeInfo) -> Self {
        Self {
            locality: n.locality.clone(),
            node: Istr::new(&n.name),
            cluster_id: Istr::new(&n.cluster_id),
            network: Istr::new(&n.network),
        }
    }

    pub fn of_workload(w: &Workload) -> Self {
        Self {
            locality: w.locality().clone(),
            node: w.node().clone(),
            cluster_id: w.cluster_id().clone(),
            network: w.network().clone(),
        }
    }

    /// Does `w` match this client in `scope`? (Each scope compares one field, as in Istio.)
    pub fn matches(&self, w: &Workload, scope: Scope) -> bool {
        match scope {
            Scope::Region => self.locality.region == w.locality().region,
            Scope::Zone => self.locality.zone == w.locality().zone,
            Scope::Subzone => self.locality.subzone == w.locality().subzone,
            Scope::Node => self.node == *w.node(),
            Scope::Cluster => self.cluster_id == *w.cluster_id(),
            Scope::Network => self.network == *w.network(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// L4 authorization policies (Istio's `istio.security.Authorization`), held in the model so that
// every source delivers them the same way. Enforcement is a separate concern.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum PolicyScope {
    #[default]
    Global,
    Namespace,
    WorkloadSelector,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum PolicyAction {
    #[default]
    Allow,
    Deny,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

/// An address range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    /// The same range with the bits past the prefix cleared.
    pub fn network(self) -> Cidr {
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len.min(32))).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.len.min(128))).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Cidr { addr, len: self.len }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && Cidr { addr: ip, len: self.len }.network() == self.network()
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PolicyMatch {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<Cidr>,
    pub not_source_ips: Vec<Cidr>,
    pub destination_ips: Vec<Cidr>,
    pub not_destination_ips: Vec<Cidr>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
    /// (namespace, service account)
    pub service_accounts: Vec<(String, String)>,
    pub not_service_accounts: Vec<(String, String)>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Clause {
    pub matches: Vec<PolicyMatch>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub clauses: Vec<Clause>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: PolicyScope,
    pub action: PolicyAction,
    pub rules: Vec<Rule>,
    pub dry_run: bool,
    /// Fields received but not acted on yet (extensions), as in [`Workload::unused`].
    #[serde(skip_serializing_if = "Unused::is_empty")]
    pub unused: Unused,
}

impl Policy {
    /// The key workloads use in `authorization_policies` and the model keys policies by.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every workload and service the daemon holds is one of these: at 100k of each, 8 bytes
    /// is 0.8 MB. A field that grows them should be a deliberate choice.
    #[test]
    fn workloads_and_services_stay_small() {
        let (w, s) = (std::mem::size_of::<Workload>(), std::mem::size_of::<Service>());
        eprintln!("Workload {w} bytes, Service {s} bytes");
        // 96 bytes and an Arc's two counts: 112, a jemalloc size class; one byte more costs 16.
        assert!(w <= 96, "Workload is {w} bytes");
        assert!(s <= 176, "Service is {s} bytes");
        let u = Unused::from(BTreeMap::from([("a".to_string(), "b".to_string())]));
        assert_eq!((u["a"].as_str(), Unused::default().get("a")), ("b", None));
        assert!(Unused::from(BTreeMap::new()).is_empty());
    }
}
