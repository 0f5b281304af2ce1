//! The delta ADS client: takes workloads, services and authorization policies from istiod (or
//! any control plane speaking Istio's workload API) and feeds the same model the local config
//! feeds.
//!
//! Per stream: subscribe both types (wildcard) with the versions already held, ACK each response
//! by its nonce, NACK a response that had bad resources (naming each) while still applying the
//! valid ones, honour `removed_resources`. Between streams: keep the last good state in the
//! kernel (nothing is flushed) and reconnect with capped exponential backoff and jitter.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kmesh_model::delta::{ModelKeys, ModelSource};
use kmesh_model::model::{Istr, Model, NodeInfo};
use kmesh_model::xds::{AddressResource, decode_address, decode_authorization};
use kmesh_proto::core::Node;
use kmesh_proto::discovery::DeltaDiscoveryRequest;
use kmesh_proto::lean::{DeltaDiscoveryResponse, Resource};
use kmesh_proto::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

mod parsed;

use parsed::{Parsed, View};

use crate::admin::Shared;
use crate::ads::{Ads, Inbound};

/// How to reach the control plane.
#[derive(Clone, Debug)]
pub struct XdsOptions {
    /// `host:port`, as Kmesh's `XDS_ADDRESS`.
    pub address: String,
    /// `None`: plaintext (local use only). `Some(path)`: TLS verified against this root CA.
    pub ca_file: Option<PathBuf>,
    /// Server name to verify (default: the host part of `address`).
    pub tls_server_name: Option<String>,
    /// A bearer token file (re-read on every connection), e.g. a projected service account token.
    pub token_file: Option<PathBuf>,
    /// The Node id and metadata sent.
    pub identity: ProxyIdentity,
    /// This node, for locality; its locality is filled from the xDS workloads on it when empty.
    pub node: NodeInfo,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// The largest response accepted; a bigger one ends the stream with an error naming the
    /// limit (the state held stays in force).
    pub max_message_bytes: usize,
    /// The largest subscription sent. A resubscription lists every resource held with its
    /// version (`initial_resource_versions`); when that does not fit, it is sent without them
    /// and the first response is taken as the whole type (see [`subscription`]).
    pub max_request_bytes: usize,
    /// Which ADS the stream speaks. The workload API is delta only (as istiod serves it); the
    /// kernel-native mode's Envoy xDS takes either.
    pub flavour: AdsFlavour,
}

/// The two flavours of ADS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AdsFlavour {
    /// `DeltaAggregatedResources`: responses carry what changed.
    #[default]
    Delta,
    /// `StreamAggregatedResources`: each response carries the whole set of its type.
    StateOfTheWorld,
}

/// The default for [`XdsOptions::max_message_bytes`]: room for a cluster of 100k services in
/// one push (about 60 MiB), with a bound on what a broken control plane can make us hold.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 << 20;

/// The default for [`XdsOptions::max_request_bytes`]: under gRPC's 4 MiB receive limit, which
/// istiod keeps, with room to spare. About 100k resources' names and versions fit in 4 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = (4 << 20) - (64 << 10);

impl XdsOptions {
    /// Options for `address`, with the given identity (usually [`ProxyIdentity::from_env`]).
    pub fn new(address: &str, node: NodeInfo, identity: ProxyIdentity) -> Self {
        Self {
            address: address.to_string(),
            ca_file: None,
            tls_server_name: None,
            token_file: None,
            identity,
            node,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(15),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            flavour: AdsFlavour::Delta,
        }
    }
}

/// Who this daemon says it is to the control plane: the Node id and metadata istiod reads.
///
/// The id is `ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`. istiod accepts
/// only the proxy types `sidecar`, `router`, `waypoint` and `ztunnel`; this daemon is a
/// node-level data plane for the workload API, which is what `ztunnel` means to istiod (Kmesh
/// sends the same in its workload mode, and ztunnel itself does): istiod serves it the
/// `Address` and `Authorization` types and treats it as per-node, not as a pod's sidecar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyIdentity {
    /// `INSTANCE_IP` (the pod's, which is the node's for a host-network DaemonSet); a
    /// comma-separated list is accepted. `INSTANCE_IPS` in the metadata.
    pub instance_ips: Vec<std::net::IpAddr>,
    /// `POD_NAME`.
    pub pod_name: String,
    /// `POD_NAMESPACE`.
    pub pod_namespace: String,
    /// `NODE_NAME`.
    pub node_name: String,
    /// `CLUSTER_ID` (istiod's default cluster name, `Kubernetes`, when unset).
    pub cluster_id: String,
    /// `SERVICE_ACCOUNT`, when set.
    pub service_account: String,
}

/// The proxy type istiod knows this kind of data plane by.
pub const PROXY_TYPE: &str = "ztunnel";

#[derive(Debug, thiserror::Error)]
#[error("{var}={value:?} is not an IP address (set it from the pod's status.podIP)")]
pub struct IdentityError {
    pub var: &'static str,
    pub value: String,
}

impl ProxyIdentity {
    /// From the variables the DaemonSet sets through the downward API. `POD_IP` is read when
    /// `INSTANCE_IP` is unset (older deployments of this project set it); with neither,
    /// 127.0.0.1 (local use).
    pub fn from_env() -> Result<Self, IdentityError> {
        Self::from_vars(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
    }

    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, IdentityError> {
        let (name, raw) = match (var("INSTANCE_IP"), var("POD_IP")) {
            (Some(v), _) => ("INSTANCE_IP", v),
            (None, Some(v)) => ("POD_IP", v),
            (None, None) => ("INSTANCE_IP", "127.0.0.1".to_string()),
        };
        let mut instance_ips = Vec::new();
        for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let ip = part.parse().map_err(|_| IdentityError { var: name, value: raw.clone() })?;
            instance_ips.push(ip);
        }
        if instance_ips.is_empty() {
            return Err(IdentityError { var: name, value: raw });
        }
        Ok(Self {
            instance_ips,
            pod_name: var("POD_NAME").unwrap_or_else(|| "kmesh-daemon".into()),
            pod_namespace: var("POD_NAMESPACE").unwrap_or_else(|| "kmesh-system".into()),
            node_name: var("NODE_NAME").unwrap_or_default(),
            cluster_id: var("CLUSTER_ID").unwrap_or_else(|| "Kubernetes".into()),
            service_account: var("SERVICE_ACCOUNT").unwrap_or_default(),
        })
    }

    pub fn node_id(&self) -> String {
        self.node_id_as(PROXY_TYPE)
    }

    /// The id under another proxy type (`sidecar` in the kernel-native mode, which takes what
    /// istiod serves an Envoy).
    pub fn node_id_as(&self, proxy_type: &str) -> String {
        let (ip, pod, ns) = (self.instance_ips[0], &self.pod_name, &self.pod_namespace);
        format!("{proxy_type}~{ip}~{pod}.{ns}~{ns}.svc.cluster.local")
    }

    /// The `Node` of the first request: id, metadata as istiod's `NodeMetadata` reads it
    /// (strings; `INSTANCE_IPS` comma-separated), and the user agent.
    pub fn node(&self) -> Node {
        use kmesh_proto::envoy_struct::{Struct, Value, value::Kind};
        let s = |v: &str| Value { kind: Some(Kind::StringValue(v.to_string())) };
        let ips: Vec<String> = self.instance_ips.iter().map(|i| i.to_string()).collect();
        let mut fields = std::collections::BTreeMap::new();
        fields.insert("NAME".to_string(), s(&self.pod_name));
        fields.insert("NAMESPACE".to_string(), s(&self.pod_namespace));
        fields.insert("INSTANCE_IPS".to_string(), s(&ips.join(",")));
        fields.insert("NODE_NAME".to_string(), s(&self.node_name));
        fields.insert("CLUSTER_ID".to_string(), s(&self.cluster_id));
        if !self.service_account.is_empty() {
            fields.insert("SERVICE_ACCOUNT".to_string(), s(&self.service_account));
        }
        // Informational: istiod keeps keys it does not know in the proxy's raw metadata.
        fields.insert("DATAPLANE_MODE".to_string(), s("kmesh"));
        Node {
            id: self.node_id(),
            cluster: self.cluster_id.clone(),
            metadata: Some(Struct { fields: fields.into_iter().collect() }),
            user_agent_name: "kmesh-rs".into(),
            user_agent_version_type: Some(kmesh_proto::core::node::UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").into(),
            )),
            ..Default::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("invalid XDS_ADDRESS {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("cannot read the xDS root CA file {path}: {source}")]
    Ca {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the xDS token file {path}: {source}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to the control plane at {address}: {detail}")]
    Connect { address: String, detail: String },
    #[error("control plane at {address} refused the stream: {status}")]
    Refused { address: String, status: tonic::Status },
    #[error("stream to {address} ended: {status}")]
    Stream { address: String, status: tonic::Status },
    #[error("applying an xDS update failed unexpectedly: {detail}")]
    Apply { detail: String },
}

/// Which map of the model a resource lands in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Workload,
    Service,
    Policy,
}

impl Kind {
    /// The subscribed type whose resources fill this kind's slots.
    fn type_url(self) -> &'static str {
        match self {
            Kind::Workload | Kind::Service => ADDRESS_TYPE,
            Kind::Policy => AUTHORIZATION_TYPE,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Workload => "workload",
            Kind::Service => "service",
            Kind::Policy => "policy",
        }
    }
}

impl Parsed {
    /// The model map and key this resource is held under (a workload's: its uid's one copy).
    fn slot(&self) -> (Kind, Istr) {
        match self.view() {
            View::Workload(w) => (Kind::Workload, w.uid.clone()),
            // Interned: the key workloads list the service by, so the two share one copy.
            View::Service(s) => (Kind::Service, Istr::new(&s.key())),
            View::Policy(p) => (Kind::Policy, Istr::unique(&p.key())),
        }
    }

    /// Whether this resource's slot is `(kind, key)` ([`slot`](Self::slot) without making the
    /// key).
    fn holds(&self, kind: Kind, key: &str) -> bool {
        let parts =
            |ns: &str, rest: &str| key.strip_prefix(ns).and_then(|k| k.strip_prefix('/')) == Some(rest);
        match (kind, self.view()) {
            (Kind::Workload, View::Workload(w)) => *w.uid == *key,
            (Kind::Service, View::Service(s)) => parts(&s.namespace, s.hostname.as_str()),
            (Kind::Policy, View::Policy(p)) => parts(&p.namespace, &p.name),
            _ => false,
        }
    }
}

/// One step of a merge, as what to put back to undo it.
enum Undo {
    /// A resource's previous (version, body), by type (one of [`SUBSCRIBED`]) and name.
    Resource(&'static str, Istr, Option<(Istr, Parsed)>),
    /// Whether a workload was one of the node's before.
    Local(Istr, bool),
    /// The previous name of the resource holding a slot whose key is not its name.
    Alias(Kind, String, Option<String>),
}

/// Everything received, by type and resource name, with versions: the model these resources
/// describe, held once (the mesh takes the entries a batch touched from it through
/// [`ModelSource`]). A response changes the entries it names and nothing else, so its cost
/// follows its size, not the number of resources held.
#[derive(Clone, Debug, Default)]
pub struct XdsState {
    /// Resources by type and name, with their versions. A resource named by its key (as istiod
    /// names them) shares the key's copy with the model; consecutive resources of a response
    /// with the same version share one copy of it. A model slot is held by at most one
    /// resource: the one named by its key, or the one `aliases` names.
    by_type: BTreeMap<String, BTreeMap<Istr, (Istr, Parsed)>>,
    /// The model's node: the configured one, with the locality of the node's workloads when
    /// none is configured (see `derive_node`).
    node: NodeInfo,
    /// Slots held by a resource of another name (Istio names a resource by its key, so this
    /// is empty in practice), to tell a rename from a second resource claiming a key.
    aliases: BTreeMap<(Kind, String), String>,
    /// The node as configured, and the uids of the workloads that run on it (the first gives
    /// the node its locality when none is configured).
    configured: NodeInfo,
    local: BTreeSet<Istr>,
}

impl XdsState {
    pub fn versions(&self, type_url: &str) -> HashMap<String, String> {
        self.by_type
            .get(type_url)
            .map(|m| m.iter().map(|(n, (v, _))| (n.to_string(), v.to_string())).collect())
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.by_type.values().map(|m| m.len()).sum()
    }

    /// How many resources of one type are held.
    pub fn count(&self, type_url: &str) -> usize {
        self.by_type.get(type_url).map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The model these resources describe, made whole (for tests and diagnostics: the mesh
    /// takes only what a batch touched, see [`ModelSource`]).
    pub fn model(&self) -> Model {
        let mut m = Model { node: self.node.clone(), ..Default::default() };
        for (_, p) in self.by_type.values().flat_map(|items| items.values()) {
            match p.view() {
                View::Workload(w) => {
                    m.workloads.insert(w.uid.clone(), Arc::clone(&w));
                }
                View::Service(s) => {
                    m.services.insert(Istr::new(&s.key()), Arc::clone(&s));
                }
                View::Policy(p) => {
                    m.policies.insert(p.key(), Arc::clone(&p));
                }
            }
        }
        m
    }

    /// The resource holding the model slot `(kind, key)`.
    fn entry(&self, kind: Kind, key: &str) -> Option<&Parsed> {
        let items = self.by_type.get(kind.type_url())?;
        // (Empty in practice: checked first, so that the lookup's key is not built for nothing.)
        if !self.aliases.is_empty()
            && let Some(n) = self.aliases.get(&(kind, key.to_string()))
        {
            return items.get(n.as_str()).map(|(_, p)| p);
        }
        items.get(key).map(|(_, p)| p).filter(|p| p.holds(kind, key))
    }

    /// Rebuilds the indexes a batch of `changed` entries filled in bulk (a full push), whose
    /// B-tree nodes key order left half empty (see `kmesh_model::repack`). Memory, not
    /// correctness: done after the batch's replies are sent.
    pub fn tidy(&mut self, changed: usize) {
        use kmesh_model::repack::{map, set, worth_it};
        if !worth_it(changed, self.len()) {
            return;
        }
        let started = std::time::Instant::now();
        self.by_type.values_mut().for_each(map);
        set(&mut self.local);
        tracing::debug!(elapsed_us = started.elapsed().as_micros() as u64, "xDS state's indexes repacked");
    }

    /// The resource name holding a model slot, if any.
    fn holder(&self, kind: Kind, key: &str) -> Option<String> {
        if !self.aliases.is_empty()
            && let Some(n) = self.aliases.get(&(kind, key.to_string()))
        {
            return Some(n.clone());
        }
        self.entry(kind, key).map(|_| key.to_string())
    }

    /// Keeps what depends on a model slot in step with its new value (the node's workloads);
    /// records how to undo it.
    fn set_entry(&mut self, kind: Kind, key: &Istr, value: Option<&Parsed>, undo: Option<&mut Vec<Undo>>) {
        if kind != Kind::Workload {
            return;
        }
        let on_node = value
            .and_then(Parsed::as_workload)
            .is_some_and(|w| !self.configured.name.is_empty() && *w.node() == self.configured.name);
        let was = if on_node { !self.local.insert(key.clone()) } else { self.local.remove(key.as_str()) };
        if was != on_node
            && let Some(u) = undo
        {
            u.push(Undo::Local(key.clone(), was));
        }
    }

    fn set_alias(&mut self, kind: Kind, key: &str, name: Option<String>, undo: Option<&mut Vec<Undo>>) {
        let k = (kind, key.to_string());
        let prev = match name {
            Some(n) => self.aliases.insert(k, n),
            None => self.aliases.remove(&k),
        };
        if let Some(u) = undo {
            u.push(Undo::Alias(kind, key.to_string(), prev));
        }
    }

    /// Withdraws what resource `name` put in the model.
    fn vacate(&mut self, name: &str, old: &Parsed, keys: &mut ModelKeys, undo: &mut Vec<Undo>) {
        let (kind, key) = old.slot();
        if *key != *name {
            self.set_alias(kind, &key, None, Some(&mut *undo));
        }
        self.set_entry(kind, &key, None, Some(undo));
        touched(keys, kind, key);
    }

    /// Puts what `undo` records back, newest first.
    fn undo(&mut self, undo: Vec<Undo>) {
        for u in undo.into_iter().rev() {
            match u {
                Undo::Resource(type_url, name, old) => {
                    let items = self.by_type.entry(type_url.to_string()).or_default();
                    match old {
                        Some(v) => items.insert(name, v),
                        None => items.remove(&name),
                    };
                }
                Undo::Local(uid, true) => {
                    self.local.insert(uid);
                }
                Undo::Local(uid, false) => {
                    self.local.remove(&uid);
                }
                Undo::Alias(kind, key, old) => self.set_alias(kind, &key, old, None),
            }
        }
    }

    /// Sets the configured node; the model's node is derived from it: a node's locality is
    /// that of the workloads running on it, unless configured. Returns whether the model's node
    /// changed.
    fn derive_node(&mut self, node: &NodeInfo) -> bool {
        if node.name != self.configured.name {
            self.local = self
                .by_type
                .get(ADDRESS_TYPE)
                .into_iter()
                .flat_map(|items| items.values())
                .filter_map(|(_, p)| p.as_workload())
                .filter(|w| !node.name.is_empty() && *w.node() == node.name)
                .map(|w| w.uid.clone())
                .collect();
        }
        self.configured = node.clone();
        let mut n = node.clone();
        if n.locality == Default::default()
            && let Some(w) = self
                .local
                .first()
                .and_then(|uid| self.entry(Kind::Workload, uid))
                .and_then(Parsed::as_workload)
        {
            n.locality = w.locality().clone();
            if n.network.is_empty() {
                n.network = w.network().to_string();
            }
            if n.cluster_id.is_empty() {
                n.cluster_id = w.cluster_id().to_string();
            }
        }
        let changed = n != self.node;
        self.node = n;
        changed
    }
}

impl ModelSource for XdsState {
    fn workload(&self, uid: &str) -> Option<Arc<kmesh_model::model::Workload>> {
        match self.entry(Kind::Workload, uid)?.view() {
            View::Workload(w) => Some(Arc::clone(&w)),
            _ => None,
        }
    }

    fn service(&self, key: &str) -> Option<(Istr, Arc<kmesh_model::model::Service>)> {
        match self.entry(Kind::Service, key)?.view() {
            // Interned: the copy the workloads list the service by.
            View::Service(s) => Some((Istr::new(key), Arc::clone(&s))),
            _ => None,
        }
    }

    fn policy(&self, key: &str) -> Option<Arc<kmesh_model::model::Policy>> {
        match self.entry(Kind::Policy, key)?.view() {
            View::Policy(p) => Some(Arc::clone(&p)),
            _ => None,
        }
    }

    fn node(&self) -> &NodeInfo {
        &self.node
    }

    fn workloads_in(&self, uids: &BTreeSet<Istr>) -> Vec<Arc<kmesh_model::model::Workload>> {
        let Some(entries) = self.address_entries(uids) else {
            return uids.iter().filter_map(|k| self.workload(k)).collect();
        };
        entries
            .filter(|(k, p)| p.holds(Kind::Workload, k))
            .filter_map(|(_, p)| match p.view() {
                View::Workload(w) => Some(Arc::clone(&w)),
                _ => None,
            })
            .collect()
    }

    fn services_in(&self, keys: &BTreeSet<Istr>) -> Vec<(Istr, Arc<kmesh_model::model::Service>)> {
        let Some(entries) = self.address_entries(keys) else {
            return keys.iter().filter_map(|k| self.service(k)).collect();
        };
        entries
            .filter(|(k, p)| p.holds(Kind::Service, k))
            .filter_map(|(k, p)| match p.view() {
                View::Service(s) => Some((k.clone(), Arc::clone(&s))),
                _ => None,
            })
            .collect()
    }
}

impl XdsState {
    /// The address resources named by `keys`, in key order, by one walk alongside the index:
    /// when every resource is named by its slot's key (as istiod names them) and the keys are a
    /// good part of the index (a full push); `None` otherwise.
    fn address_entries<'a>(
        &'a self,
        keys: &'a BTreeSet<Istr>,
    ) -> Option<impl Iterator<Item = (&'a Istr, &'a Parsed)> + 'a> {
        if !self.aliases.is_empty() {
            return None;
        }
        let entries = kmesh_model::sorted::walk(self.by_type.get(ADDRESS_TYPE)?, keys)?;
        Some(entries.map(|(k, (_, p))| (k, p)))
    }
}

/// Records that the model slot `(kind, key)` changed.
fn touched(keys: &mut ModelKeys, kind: Kind, key: Istr) {
    match kind {
        Kind::Workload => keys.workloads.insert(key),
        Kind::Service => keys.services.insert(key),
        Kind::Policy => keys.policies.insert(key.to_string()),
    };
}

/// The types the client subscribes to (both wildcard), in the order it subscribes.
pub const SUBSCRIBED: [&str; 2] = [ADDRESS_TYPE, AUTHORIZATION_TYPE];

/// The outcome of several responses applied as one: the state to keep and, per response in
/// order, the ACK or NACK to send and what it rejected.
pub struct HandledBatch {
    pub state: XdsState,
    pub replies: Vec<(DeltaDiscoveryRequest, Vec<String>)>,
    /// How many model entries the batch changed: a bulk change leaves the state's indexes to
    /// repack ([`XdsState::tidy`]), once the replies are sent.
    pub changed: usize,
}

/// Decodes one resource's body.
fn decode_one(type_url: &str, r: &Resource) -> Result<Parsed, String> {
    if let Some(problem) = r.problem() {
        return Err(format!("the resource does not decode: {problem}"));
    }
    let Some((body_type, body)) = r.body() else {
        return Err("resource body missing".into());
    };
    if body_type != type_url {
        return Err(format!("body is {body_type:?}, expected {type_url}"));
    }
    let parsed = if type_url == ADDRESS_TYPE {
        decode_address(body).map(|a| match a {
            AddressResource::Workload(w) => Parsed::workload(Arc::new(w)),
            AddressResource::Service(s) => Parsed::service(Arc::new(s)),
        })
    } else {
        decode_authorization(body).map(|p| Parsed::policy(Arc::new(p)))
    };
    parsed.map_err(|e| e.to_string())
}

/// How a NACK names resource `i` of a response: by its name, or where it has none (one that
/// does not decode), by its place.
fn label(r: &Resource, i: usize) -> String {
    if r.name().is_empty() { format!("resource #{i}") } else { r.name().to_string() }
}

/// A response's resources, decoded in order.
type Decoded = Vec<Result<Parsed, String>>;

/// The resources of a subscribed type's response decoded (`None` for another type).
fn decode_response(resp: &DeltaDiscoveryResponse) -> Option<Decoded> {
    let type_url = SUBSCRIBED.into_iter().find(|t| *t == resp.type_url)?;
    let started = std::time::Instant::now();
    let parsed = decode_all(type_url, &resp.resources);
    if resp.resources.len() >= 1024 {
        tracing::debug!(
            resources = resp.resources.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "resources decoded"
        );
    }
    Some(parsed)
}

/// What the load-balancing maps will hold at least once `decoded` is applied, from the
/// resources alone (see [`crate::compile::expected_counts`]).
fn expected_counts(decoded: &[Option<Decoded>]) -> crate::compile::MapCounts {
    let ok = || decoded.iter().flatten().flatten().filter_map(|p| p.as_ref().ok());
    crate::compile::expected_counts(ok().filter_map(Parsed::as_workload), ok().filter_map(Parsed::as_service))
}

/// A response's resources decoded, in order; a large response on every CPU at once (each
/// resource decodes on its own; a full push of 110k takes 0.08-0.14 s this way on two CPUs).
fn decode_all(type_url: &str, resources: &[Resource]) -> Decoded {
    const PER_THREAD: usize = 4096;
    let threads = crate::cpus().min(resources.len() / PER_THREAD);
    if threads <= 1 {
        return resources.iter().map(|r| decode_one(type_url, r)).collect();
    }
    let chunk = resources.len().div_ceil(threads);
    std::thread::scope(|s| {
        let parts: Vec<_> = resources
            .chunks(chunk)
            .map(|part| s.spawn(move || part.iter().map(|r| decode_one(type_url, r)).collect::<Vec<_>>()))
            .collect();
        parts.into_iter().flat_map(|h| h.join().expect("decoding does not panic")).collect()
    })
}

/// Takes one response's valid resources and removals into `state` (recording in `keys` the
/// model entries it touched and in `undo` how to put them back); returns what it rejected.
fn merge(
    state: &mut XdsState,
    resp: &DeltaDiscoveryResponse,
    parsed: Option<Decoded>,
    keys: &mut ModelKeys,
    undo: &mut Vec<Undo>,
) -> Vec<String> {
    let mut rejected = Vec::new();
    let (Some(type_url), Some(parsed)) = (SUBSCRIBED.into_iter().find(|t| *t == resp.type_url), parsed)
    else {
        rejected.push(format!("type {:?} was not subscribed", resp.type_url));
        return rejected;
    };
    // Resources of one push often share a version (one copy for them all); a control plane
    // that versions each resource apart pays one copy each and no table.
    let mut version = Istr::default();
    // Room for every undo record a full push makes (a resource each, and the node's
    // workloads), so that the log of a 100k-resource push is not grown by doubling.
    undo.reserve(resp.resources.len() + resp.removed_resources.len());
    if !state.by_type.contains_key(type_url) {
        state.by_type.insert(type_url.to_string(), BTreeMap::new());
    }
    let parsed = match merge_into_empty(state, type_url, resp, parsed, keys, undo, &mut rejected) {
        Ok(()) => Vec::new(),
        Err(parsed) => parsed,
    };
    for (i, (r, parsed)) in resp.resources.iter().zip(parsed).enumerate() {
        let p = match parsed {
            Ok(p) => p,
            Err(e) => {
                rejected.push(format!("{}: {e}", label(r, i)));
                continue;
            }
        };
        let (kind, key) = p.slot();
        if let Some(other) = state.holder(kind, &key).filter(|h| *h != r.name()) {
            rejected.push(format!(
                "{}: {} {key:?} is already described by resource {other:?}",
                r.name(),
                kind.name()
            ));
            continue;
        }
        state.set_entry(kind, &key, Some(&p), Some(&mut *undo));
        let items = state.by_type.get_mut(type_url).expect("the type's map was made above");
        // Named by its key (as istiod names resources): one copy of the name for both maps.
        let name = if *key == *r.name() { key.clone() } else { Istr::unique(r.name()) };
        // Removed first so that the key held is the new one (an insert keeps the old key).
        let old = items.remove(r.name());
        if *version != *r.version() {
            version = Istr::unique(r.version());
        }
        items.insert(name.clone(), (version.clone(), p));
        if let Some((_, prev)) = &old
            && prev.slot() != (kind, key.clone())
        {
            state.vacate(r.name(), prev, keys, undo);
        }
        undo.push(Undo::Resource(type_url, name, old));
        if *key != *r.name() {
            state.set_alias(kind, &key, Some(r.name().to_string()), Some(&mut *undo));
        }
        touched(keys, kind, key);
    }
    for name in &resp.removed_resources {
        let Some((name, old)) =
            state.by_type.get_mut(type_url).and_then(|items| items.remove_entry(name.as_str()))
        else {
            continue;
        };
        state.vacate(&name, &old.1, keys, undo);
        undo.push(Undo::Resource(type_url, name, Some(old)));
    }
    rejected
}

/// [`merge`]'s resources into a type that holds none yet (a first push, a resubscription
/// after a restart), when each is named by its key (as istiod names them) and no name comes
/// twice: every resource is new, so the type's resources and the touched keys are each built
/// in one pass from a sorted list, not inserted one search at a time.
/// The result and the undo records are those of the general merge. Hands the decoded
/// resources back when the response is not of that shape.
fn merge_into_empty(
    state: &mut XdsState,
    type_url: &'static str,
    resp: &DeltaDiscoveryResponse,
    parsed: Decoded,
    keys: &mut ModelKeys,
    undo: &mut Vec<Undo>,
    rejected: &mut Vec<String>,
) -> Result<(), Decoded> {
    const MIN: usize = 1024;
    // (A type's resources fill only its own kinds' slots, so the other type's need not be
    // empty.)
    let empty = resp.resources.len() >= MIN
        && state.by_type.get(type_url).is_none_or(|t| t.is_empty())
        && state.aliases.is_empty();
    if !empty {
        return Err(parsed);
    }
    // (key, version, resource) in the response's order, versions shared as `merge` shares them;
    // each resource's key made once (a service's is formatted and interned).
    let mut items: Vec<(Istr, Istr, Parsed)> = Vec::with_capacity(parsed.len());
    let mut errors = Vec::new();
    let mut version = Istr::default();
    for (i, (r, p)) in resp.resources.iter().zip(&parsed).enumerate() {
        match p {
            Ok(p) => {
                let key = p.slot().1;
                if *key != *r.name() {
                    return Err(parsed);
                }
                if *version != *r.version() {
                    version = Istr::unique(r.version());
                }
                items.push((key, version.clone(), p.clone()));
            }
            Err(e) => errors.push(format!("{}: {e}", label(r, i))),
        }
    }
    // Stable and adaptive: a response already in key order is checked, not sorted.
    items.sort_by(|a, b| a.0.cmp(&b.0));
    if items.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err(parsed);
    }
    drop(parsed);
    rejected.extend(errors);
    let mut touched = ModelKeys::default();
    let (mut tw, mut ts) = (Vec::new(), Vec::new());
    for (key, _, p) in &items {
        match p.view() {
            View::Workload(w) => {
                if !state.configured.name.is_empty()
                    && *w.node() == state.configured.name
                    && state.local.insert(key.clone())
                {
                    undo.push(Undo::Local(key.clone(), false));
                }
                tw.push(key.clone());
            }
            View::Service(_) => ts.push(key.clone()),
            View::Policy(_) => {
                touched.policies.insert(key.to_string());
            }
        }
        undo.push(Undo::Resource(type_url, key.clone(), None));
    }
    touched.workloads = tw.into_iter().collect();
    touched.services = ts.into_iter().collect();
    fn add<K: Ord>(to: &mut BTreeSet<K>, from: BTreeSet<K>) {
        if to.is_empty() { *to = from } else { to.extend(from) }
    }
    add(&mut keys.workloads, touched.workloads);
    add(&mut keys.services, touched.services);
    add(&mut keys.policies, touched.policies);
    state.by_type.insert(type_url.to_string(), items.into_iter().map(|(k, v, p)| (k, (v, p))).collect());
    Ok(())
}

fn reply_to(resp: &DeltaDiscoveryResponse, error: Option<String>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: resp.type_url.clone(),
        response_nonce: resp.nonce.clone(),
        error_detail: error.map(|message| kmesh_proto::rpc::Status {
            code: tonic::Code::InvalidArgument as i32,
            message,
            details: vec![],
        }),
        ..Default::default()
    }
}

/// Applies several responses to `state` as one change: valid resources and removals of each
/// are taken, bad resources are named in that response's NACK, and `apply` is called once with
/// the resulting state (the model's source, see [`ModelSource`]) and the keys the batch
/// touched. If it fails, every response is NACKed
/// and the previous state is kept. Pure apart from `apply`.
pub fn handle_batch(
    state: XdsState,
    node: &NodeInfo,
    resps: Vec<DeltaDiscoveryResponse>,
    apply: impl FnOnce(&XdsState, &ModelKeys) -> Result<(), String>,
) -> HandledBatch {
    handle_batch_with(state, node, resps, |_| {}, apply)
}

/// Resources in a batch from which [`handle_batch_with`] says ahead what the maps will need.
const AHEAD_OF: usize = 4096;

/// [`handle_batch`], telling `ahead` what the load-balancing maps will hold at least (a lower
/// bound from the resources alone) as soon as a large batch is decoded, before it is merged:
/// the data plane can start making room while the state is merged and compiled.
pub fn handle_batch_with(
    state: XdsState,
    node: &NodeInfo,
    resps: Vec<DeltaDiscoveryResponse>,
    ahead: impl FnOnce(&crate::compile::MapCounts),
    apply: impl FnOnce(&XdsState, &ModelKeys) -> Result<(), String>,
) -> HandledBatch {
    let mut resps = resps;
    let mut next = state;
    let mut undo = Vec::new();
    let mut keys = ModelKeys::default();
    let started = std::time::Instant::now();
    let decoded: Vec<Option<Decoded>> = resps.iter().map(decode_response).collect();
    if resps.iter().map(|r| r.resources.len()).sum::<usize>() >= AHEAD_OF {
        ahead(&expected_counts(&decoded));
    }
    let rejected: Vec<Vec<String>> = resps
        .iter()
        .zip(decoded)
        .map(|(r, parsed)| merge(&mut next, r, parsed, &mut keys, &mut undo))
        .collect();
    // The resources are slices of the received buffers: merged, they give them back before
    // the apply (the replies need only each response's type and nonce).
    for r in &mut resps {
        r.resources = Vec::new();
    }
    tracing::debug!(
        responses = resps.len(),
        elapsed_us = started.elapsed().as_micros() as u64,
        "responses decoded and merged into the xDS state"
    );
    let previous_node = next.configured.clone();
    keys.node = next.derive_node(node);
    let any_known = resps.iter().any(|r| SUBSCRIBED.contains(&r.type_url.as_str()));
    let applied = if any_known { apply(&next, &keys) } else { Ok(()) };
    if let Err(e) = &applied {
        next.undo(undo);
        next.derive_node(&previous_node);
        let replies = resps
            .iter()
            .zip(rejected)
            .map(|(resp, mut rejected)| {
                rejected.push(format!("the data plane refused the update: {e}"));
                (reply_to(resp, Some(rejected.join("; "))), rejected)
            })
            .collect();
        return HandledBatch { state: next, replies, changed: 0 };
    }
    let replies = resps
        .iter()
        .zip(rejected)
        .map(|(resp, rejected)| {
            let error = (!rejected.is_empty())
                .then(|| format!("{} resource(s) rejected: {}", rejected.len(), rejected.join("; ")));
            (reply_to(resp, error), rejected)
        })
        .collect();
    HandledBatch { state: next, replies, changed: keys.len() }
}

/// Which responses of a stream are applied when: nothing is applied until every subscribed
/// type has answered once on this stream, so that a model missing a whole type (no policies
/// yet, or no services yet) never withdraws what the kernel enforces. Until then responses
/// are held, unanswered; the first apply takes them all at once.
#[derive(Debug, Default)]
pub struct InitialSync {
    seen: std::collections::BTreeSet<String>,
    held: Vec<DeltaDiscoveryResponse>,
    done: bool,
}

impl InitialSync {
    /// Takes a response; returns the responses to apply now (none while the sync is partial).
    pub fn take(&mut self, resp: DeltaDiscoveryResponse) -> Vec<DeltaDiscoveryResponse> {
        if self.done {
            return vec![resp];
        }
        if SUBSCRIBED.contains(&resp.type_url.as_str()) {
            self.seen.insert(resp.type_url.clone());
        }
        self.held.push(resp);
        if SUBSCRIBED.iter().all(|t| self.seen.contains(*t)) {
            self.done = true;
            return std::mem::take(&mut self.held);
        }
        Vec::new()
    }

    /// The subscribed types that have not answered yet.
    pub fn waiting_for(&self) -> Vec<&'static str> {
        if self.done {
            return Vec::new();
        }
        SUBSCRIBED.iter().copied().filter(|t| !self.seen.contains(*t)).collect()
    }

    pub fn is_done(&self) -> bool {
        self.done
    }
}

/// The (wildcard) subscription to `type_url` that opens a stream: it lists what is held
/// (`initial_resource_versions`), so the control plane sends only what changed and names what
/// was removed meanwhile. When that list would make the request larger than `limit` bytes (the
/// server would refuse it, and refuse it again on every reconnection), the request goes
/// without it and `true` is returned: the control plane then holds the client as having
/// nothing and must send every resource of the type, and [`complete_resync`] turns that
/// first response into the whole truth by removing what it does not name.
pub fn subscription(
    type_url: &str,
    state: &XdsState,
    node: Option<Node>,
    limit: usize,
) -> (DeltaDiscoveryRequest, bool) {
    use kmesh_proto::prost::Message as _;
    let mut req = DeltaDiscoveryRequest {
        node,
        type_url: type_url.to_string(),
        initial_resource_versions: state.versions(type_url),
        ..Default::default()
    };
    if req.encoded_len() <= limit || req.initial_resource_versions.is_empty() {
        return (req, false);
    }
    req.initial_resource_versions.clear();
    (req, true)
}

/// For the first response of a type subscribed without versions (see [`subscription`]): every
/// resource held of that type that the response neither sends nor removes is added to its
/// `removed_resources`, so it is withdrawn by the same path as any removal, atomically with
/// the rest of the response. Returns how many were added.
pub fn complete_resync(state: &XdsState, resp: &mut DeltaDiscoveryResponse) -> usize {
    let Some(held) = state.by_type.get(&resp.type_url) else { return 0 };
    let named: std::collections::HashSet<&str> = resp
        .resources
        .iter()
        .map(|r| r.name())
        .chain(resp.removed_resources.iter().map(String::as_str))
        .collect();
    let gone: Vec<String> =
        held.keys().filter(|n| !named.contains(n.as_str())).map(|n| n.to_string()).collect();
    let n = gone.len();
    resp.removed_resources.extend(gone);
    n
}

async fn channel(o: &XdsOptions) -> Result<Channel, XdsError> {
    let bad = |reason: String| XdsError::Address { address: o.address.clone(), reason };
    let scheme = if o.ca_file.is_some() { "https" } else { "http" };
    let mut ep =
        Endpoint::from_shared(format!("{scheme}://{}", o.address)).map_err(|e| bad(e.to_string()))?;
    ep = ep.connect_timeout(Duration::from_secs(5)).http2_keep_alive_interval(Duration::from_secs(30));
    // HTTP/2 flow-control windows sized for full pushes (tens of MB), not hyper's 64 KiB
    // defaults, under which a large response waits on window updates.
    ep = ep.initial_stream_window_size(Some(4 << 20)).initial_connection_window_size(Some(8 << 20));
    // Frames of up to 1 MiB, not HTTP/2's 16 KiB default: a 27 MB push arrives in ~30 frames
    // instead of ~1,700 (10k x 10: receiving it went from 57 to 27-32 ms).
    ep = ep.max_frame_size(1u32 << 20);
    if let Some(ca) = &o.ca_file {
        let pem = std::fs::read(ca).map_err(|source| XdsError::Ca { path: ca.clone(), source })?;
        let host = o
            .tls_server_name
            .clone()
            .unwrap_or_else(|| o.address.rsplit_once(':').map(|(h, _)| h).unwrap_or(&o.address).to_string());
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)).domain_name(host);
        ep = ep.tls_config(tls).map_err(|e| bad(format!("TLS: {e}")))?;
    }
    ep.connect().await.map_err(|e| {
        let mut detail = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            detail = format!("{detail}: {s}");
            src = s.source();
        }
        XdsError::Connect { address: o.address.clone(), detail }
    })
}

/// An open stream: the request sender, the response stream, and the types subscribed without
/// versions (their first response is the whole type).
type Opened = (mpsc::Sender<DeltaDiscoveryRequest>, Inbound<DeltaDiscoveryResponse>, Vec<String>);

/// Opens a stream with both subscriptions.
async fn open(o: &XdsOptions, state: &XdsState) -> Result<Opened, XdsError> {
    let mut client = client(o).await?;
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
    let mut resync = Vec::new();
    for (type_url, node) in [(ADDRESS_TYPE, Some(o.identity.node())), (AUTHORIZATION_TYPE, None)] {
        let (req, without_versions) = subscription(type_url, state, node, o.max_request_bytes);
        if without_versions {
            tracing::warn!(%type_url, held = state.count(type_url), limit = o.max_request_bytes,
                "the resources held do not fit in one subscription under the request limit: \
                 subscribing without their versions; the control plane sends the whole type again \
                 and what it no longer has is removed when it arrives");
            resync.push(type_url.to_string());
        }
        tx.send(req).await.expect("receiver alive");
    }
    let stream =
        client.delta(rx).await.map_err(|status| XdsError::Refused { address: o.address.clone(), status })?;
    tracing::info!(address = %o.address, node_id = %o.identity.node_id(), "xDS stream open");
    Ok((tx, stream, resync))
}

/// An ADS client on a new channel, sending the bearer token (re-read now) with every stream.
pub(crate) async fn client(o: &XdsOptions) -> Result<Ads, XdsError> {
    let token = match &o.token_file {
        Some(p) => {
            let t =
                std::fs::read_to_string(p).map_err(|source| XdsError::Token { path: p.clone(), source })?;
            Some(format!("Bearer {}", t.trim()).parse::<http::HeaderValue>().map_err(|_| {
                XdsError::Token {
                    path: p.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "token is not a valid header value",
                    ),
                }
            })?)
        }
        None => None,
    };
    Ok(Ads::new(channel(o).await?, token, o.max_message_bytes))
}

/// Connects, subscribes and waits for the first response: a check of address, TLS and token.
pub async fn probe(o: &XdsOptions) -> Result<DeltaDiscoveryResponse, XdsError> {
    let (_tx, mut stream, _) = open(o, &XdsState::default()).await?;
    match stream.message().await {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(XdsError::Stream {
            address: o.address.clone(),
            status: tonic::Status::ok("closed by the server"),
        }),
        Err(status) => Err(XdsError::Stream { address: o.address.clone(), status }),
    }
}

/// The most responses applied together (see the coalescing in [`run_stream`]).
const MAX_COALESCED: usize = 1024;

/// One stream: connect, subscribe, handle responses until the stream ends. `synced` is set
/// once the stream's initial sync has been applied (the stream was healthy).
async fn run_stream(
    o: &XdsOptions,
    shared: &Arc<Shared>,
    state: &mut XdsState,
    synced: &mut bool,
) -> Result<(), XdsError> {
    let (tx, mut stream, mut resync) = open(o, state).await?;
    shared.xds.resyncs_without_versions.fetch_add(resync.len() as u64, Ordering::Relaxed);
    let mut initial = InitialSync::default();
    let closed =
        || XdsError::Stream { address: o.address.clone(), status: tonic::Status::ok("closed by the server") };
    // The first response of a type subscribed without versions is the whole type.
    let whole_type = |resync: &mut Vec<String>, state: &XdsState, resp: &mut DeltaDiscoveryResponse| {
        if let Some(i) = resync.iter().position(|t| *t == resp.type_url) {
            resync.swap_remove(i);
            let gone = complete_resync(state, resp);
            tracing::info!(type_url = %resp.type_url, resources = resp.resources.len(), removed = gone,
                "full resend after a subscription without versions: what it lacks is removed");
        }
    };
    // How the stream ended while responses were being coalesced (reported once they are applied).
    let mut ended: Option<XdsError> = None;
    loop {
        if let Some(e) = ended.take() {
            return Err(e);
        }
        let mut resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(closed()),
            Err(status) => return Err(XdsError::Stream { address: o.address.clone(), status }),
        };
        // Connected means the control plane answers, not merely that the stream opened: istiod
        // refuses a node it does not accept with an error in place of the first response.
        if !shared.xds.connected.swap(true, Ordering::Relaxed) {
            *shared.xds.last_error.lock().unwrap() = None;
        }
        let type_url = resp.type_url.clone();
        whole_type(&mut resync, state, &mut resp);
        let mut batch = initial.take(resp);
        // Coalesce: responses the control plane has already sent are applied with this one
        // (one model, one compilation, one transaction), each still ACKed by its own nonce.
        // Under churn the daemon then keeps up with any rate instead of queueing one apply per
        // response. (`message()` keeps its state in the stream: polling it once is safe.)
        while !batch.is_empty() && batch.len() < MAX_COALESCED {
            match tokio::time::timeout(Duration::ZERO, stream.message()).await {
                Err(_) => break,
                Ok(Ok(Some(mut r))) => {
                    whole_type(&mut resync, state, &mut r);
                    batch.extend(initial.take(r));
                }
                Ok(Ok(None)) => {
                    ended = Some(closed());
                    break;
                }
                Ok(Err(status)) => {
                    ended = Some(XdsError::Stream { address: o.address.clone(), status });
                    break;
                }
            }
        }
        *shared.xds.waiting_for.lock().unwrap() =
            initial.waiting_for().into_iter().map(String::from).collect();
        if batch.is_empty() {
            tracing::info!(%type_url, waiting_for = ?initial.waiting_for(),
                "xDS response held: nothing is applied until every subscribed type has answered");
            continue;
        }
        let node = o.node.clone();
        let shared2 = shared.clone();
        let st = std::mem::take(state);
        let started = std::time::Instant::now();
        let n_res: usize = batch.iter().map(|r| r.resources.len()).sum();
        let n_rm: usize = batch.iter().map(|r| r.removed_resources.len()).sum();
        let handled = tokio::task::spawn_blocking(move || {
            let mesh = &shared2.mesh;
            let lock = || mesh.lock().unwrap_or_else(|p| p.into_inner());
            handle_batch_with(
                st,
                &node,
                batch,
                |lb| lock().grow_ahead(lb),
                |src, keys| {
                    lock().apply_change_leaving_tidy(src, keys).map(|_| ()).map_err(|e| e.to_string())
                },
            )
        })
        .await;
        let handled = match handled {
            Ok(h) => h,
            Err(e) => {
                // A bug, not bad input: the state is lost with the task, so the next stream
                // subscribes from scratch and the control plane sends everything again.
                tracing::error!(error = %e, "the xDS apply task failed; reconnecting for a full resync");
                return Err(XdsError::Apply { detail: e.to_string() });
            }
        };
        *state = handled.state;
        let changed = handled.changed;
        let mut errors = Vec::new();
        let mut stream_gone = false;
        for (reply, rejected) in handled.replies {
            let nack = reply.error_detail.is_some();
            if nack { &shared.xds.nacks } else { &shared.xds.acks }.fetch_add(1, Ordering::Relaxed);
            if nack {
                tracing::warn!(type_url = %reply.type_url, ?rejected, "NACK");
                errors.extend(rejected);
            }
            if tx.send(reply).await.is_err() {
                stream_gone = true;
                break;
            }
        }
        // The replies are sent: telemetry takes the change in, and what only saves memory is
        // done now, off the push's path (also when the stream went: the change is applied).
        let (mut st, shared2) = (std::mem::take(state), shared.clone());
        let tidied = tokio::task::spawn_blocking(move || {
            st.tidy(changed);
            shared2.mesh.lock().unwrap_or_else(|p| p.into_inner()).tidy();
            st
        })
        .await;
        match tidied {
            Ok(st) => *state = st,
            Err(e) => {
                tracing::error!(error = %e, "tidying the xDS state failed; reconnecting for a full resync");
                return Err(XdsError::Apply { detail: e.to_string() });
            }
        }
        if stream_gone {
            return Ok(());
        }
        *shared.config_error.lock().unwrap() = (!errors.is_empty()).then(|| errors.join("; "));
        tracing::info!(%type_url, resources = n_res, removed = n_rm, nack = !errors.is_empty(),
            elapsed_ms = started.elapsed().as_millis() as u64, held = state.len(), "xDS response applied");
        if initial.is_done() {
            *synced = true;
            shared.ready.store(true, Ordering::SeqCst);
        }
    }
}

/// Runs the client until `shutdown` flips to true. The kernel keeps the last good state while
/// the control plane is away.
pub async fn run(o: XdsOptions, shared: Arc<Shared>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let _ = shared.xds.node_id.set(o.identity.node_id());
    let mut state = XdsState::default();
    let mut backoff = o.backoff_initial;
    loop {
        let mut synced = false;
        let r = tokio::select! {
            r = run_stream(&o, &shared, &mut state, &mut synced) => r,
            _ = shutdown.changed() => return,
        };
        let wait = stream_ended(&o, &shared, r, synced, &mut backoff, state.len());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {},
            _ = shutdown.changed() => return,
        }
    }
}

/// After a stream of either source ended: the health counters, the log line, and how long to
/// wait before the next (full jitter in [backoff/2, backoff]); the backoff doubles up to its
/// cap. Only a stream that got as far as its initial sync counts as healthy: a control plane
/// that accepts streams and then fails them keeps the backoff growing.
pub(crate) fn stream_ended(
    o: &XdsOptions,
    shared: &Shared,
    r: Result<(), XdsError>,
    synced: bool,
    backoff: &mut Duration,
    held: usize,
) -> Duration {
    shared.xds.connected.store(false, Ordering::Relaxed);
    shared.xds.disconnects.fetch_add(1, Ordering::Relaxed);
    if synced {
        *backoff = o.backoff_initial;
    }
    if let Err(e) = r {
        *shared.xds.last_error.lock().unwrap() = Some(e.to_string());
        tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, held,
            "xDS disconnected; the data plane keeps the last good state");
    }
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    let wait = *backoff / 2 + backoff.mul_f64((nanos % 1000) as f64 / 2000.0);
    *backoff = (*backoff * 2).min(o.backoff_max);
    wait
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The outcome of one response handled alone.
    struct Handled {
        state: XdsState,
        reply: DeltaDiscoveryRequest,
    }

    fn handle_response(
        state: XdsState,
        node: &NodeInfo,
        resp: &DeltaDiscoveryResponse,
        apply: impl FnOnce(Model) -> Result<(), String>,
    ) -> Handled {
        let mut b = handle_batch(state, node, vec![resp.clone()], |m, _| apply(m.model()));
        let (reply, _) = b.replies.pop().expect("one reply per response");
        Handled { state: b.state, reply }
    }
    use kmesh_model::xds::encode_address;
    use kmesh_proto::lean::Resource;

    fn res(name: &str, type_url: &str, value: Vec<u8>) -> Resource {
        Resource::new(name, "v1", Some((type_url, &value)))
    }

    fn workload(uid: &str) -> Vec<u8> {
        let w = kmesh_model::config::parse(&format!(
            "workloads: [{{uid: {uid}, name: {uid}, namespace: default, addresses: [10.244.0.9]}}]"
        ))
        .unwrap()
        .workloads
        .remove(uid)
        .unwrap();
        encode_address(&AddressResource::Workload((*w).clone()))
    }

    #[test]
    fn good_resources_are_applied_and_acked() {
        let resp = DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            nonce: "n1".into(),
            resources: vec![res("a", ADDRESS_TYPE, workload("a"))],
            ..Default::default()
        };
        let mut seen = None;
        let h = handle_response(XdsState::default(), &NodeInfo::default(), &resp, |m| {
            seen = Some(m);
            Ok(())
        });
        assert_eq!(h.reply.response_nonce, "n1");
        assert!(h.reply.error_detail.is_none());
        assert!(seen.unwrap().workloads.contains_key("a"));
        assert_eq!(h.state.versions(ADDRESS_TYPE).get("a").map(String::as_str), Some("v1"));
    }

    #[test]
    fn bad_resources_are_nacked_by_name_and_the_rest_applied() {
        let resp = DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            nonce: "n2".into(),
            resources: vec![
                res("good", ADDRESS_TYPE, workload("good")),
                res("bad", ADDRESS_TYPE, vec![0xff, 0x01]),
            ],
            ..Default::default()
        };
        let h = handle_response(XdsState::default(), &NodeInfo::default(), &resp, |m| {
            assert!(m.workloads.contains_key("good"));
            Ok(())
        });
        let msg = h.reply.error_detail.unwrap().message;
        assert!(msg.starts_with("1 resource(s) rejected: bad: "), "{msg}");
        assert!(h.state.versions(ADDRESS_TYPE).contains_key("good"));
    }

    #[test]
    fn a_resource_that_does_not_decode_is_nacked_by_its_place_and_the_rest_applied() {
        use kmesh_proto::prost::Message as _;
        // As received: the second resource's name is not UTF-8 (prost would refuse the whole
        // response for it).
        let mut wire = kmesh_proto::discovery::DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            nonce: "n3".into(),
            resources: vec![kmesh_proto::discovery::Resource {
                name: "good".into(),
                version: "v1".into(),
                resource: Some(kmesh_proto::Any { type_url: ADDRESS_TYPE.into(), value: workload("good") }),
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec();
        prost::encoding::bytes::encode(2, &vec![0x1a, 2, b'a', 0xff], &mut wire);
        let resp = DeltaDiscoveryResponse::decode(bytes::Bytes::from(wire)).unwrap();
        let h = handle_response(XdsState::default(), &NodeInfo::default(), &resp, |m| {
            assert!(m.workloads.contains_key("good"));
            Ok(())
        });
        let msg = h.reply.error_detail.unwrap().message;
        assert_eq!(
            msg,
            "1 resource(s) rejected: resource #1: the resource does not decode: a string is not valid UTF-8"
        );
        assert!(h.state.versions(ADDRESS_TYPE).contains_key("good"));
    }

    #[test]
    fn removals_are_honoured_and_a_refused_apply_keeps_the_old_state() {
        let add = DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            nonce: "n1".into(),
            resources: vec![res("a", ADDRESS_TYPE, workload("a")), res("b", ADDRESS_TYPE, workload("b"))],
            ..Default::default()
        };
        let s1 = handle_response(XdsState::default(), &NodeInfo::default(), &add, |_| Ok(())).state;
        let rm = DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            nonce: "n2".into(),
            removed_resources: vec!["a".into()],
            ..Default::default()
        };
        let refused = handle_response(s1.clone(), &NodeInfo::default(), &rm, |_| Err("map full".into()));
        assert!(refused.reply.error_detail.unwrap().message.contains("map full"));
        assert_eq!(refused.state.len(), 2, "old state kept");
        let ok = handle_response(s1, &NodeInfo::default(), &rm, |m| {
            assert!(!m.workloads.contains_key("a"));
            Ok(())
        });
        assert_eq!(ok.state.len(), 1);
    }

    #[test]
    fn the_model_is_kept_in_step_and_each_batch_names_what_it_touched() {
        let resp = |nonce: &str, resources: Vec<Resource>, removed: &[&str]| DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            nonce: nonce.into(),
            resources,
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let node = NodeInfo::default();
        let mut seen = ModelKeys::default();
        let add = resp(
            "n1",
            vec![res("a", ADDRESS_TYPE, workload("a")), res("b", ADDRESS_TYPE, workload("b"))],
            &[],
        );
        let s1 = handle_batch(XdsState::default(), &node, vec![add], |_, k| {
            seen = k.clone();
            Ok(())
        })
        .state;
        assert_eq!(seen.workloads, BTreeSet::<Istr>::from(["a".into(), "b".into()]));
        assert!(!seen.node, "the default node derives nothing");

        // One removal touches one key; a refused one leaves the model as it was.
        let before = s1.model().clone();
        let rm = resp("n2", vec![], &["a"]);
        let refused = handle_batch(s1.clone(), &node, vec![rm.clone()], |m, k| {
            assert_eq!(k.workloads, BTreeSet::<Istr>::from(["a".into()]));
            assert!(!m.model().workloads.contains_key("a"));
            Err("map full".into())
        });
        assert_eq!(refused.state.model(), before);

        // A resource describing a workload another resource already describes is rejected by
        // name; one whose uid changes moves its entry.
        let dup = resp("n3", vec![res("other", ADDRESS_TYPE, workload("a"))], &[]);
        let h = handle_batch(s1, &node, vec![dup], |_, _| Ok(()));
        let msg = h.replies[0].0.error_detail.as_ref().unwrap().message.clone();
        assert!(msg.contains("other: workload \"a\" is already described by resource \"a\""), "{msg}");
        let moved = resp("n4", vec![res("b", ADDRESS_TYPE, workload("c"))], &[]);
        let h = handle_batch(h.state, &node, vec![moved], |m, k| {
            assert_eq!(k.workloads, BTreeSet::<Istr>::from(["b".into(), "c".into()]));
            let m = m.model();
            assert!(m.workloads.contains_key("c") && !m.workloads.contains_key("b"));
            Ok(())
        });
        // ...and removing it by its resource name withdraws the entry under its key.
        let h = handle_batch(h.state, &node, vec![resp("n5", vec![], &["b"])], |_, _| Ok(()));
        assert_eq!(h.state.model().workloads.keys().collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn a_first_push_built_in_one_pass_equals_the_same_resources_merged_one_by_one() {
        let node = NodeInfo::default();
        let body = workload("w");
        let one = |i: usize| {
            let uid = format!("w{i:04}");
            // The same body under each uid: only the uid differs, as the decoder reads it.
            let w = kmesh_model::xds::decode_address(&body).unwrap();
            let AddressResource::Workload(mut w) = w else { unreachable!() };
            w.uid = uid.as_str().into();
            res(&uid, ADDRESS_TYPE, encode_address(&AddressResource::Workload(w)))
        };
        // Out of key order, with a resource that does not decode.
        let mut all: Vec<Resource> = (0..1500).rev().map(one).collect();
        all.insert(700, res("broken", ADDRESS_TYPE, vec![0xff, 0x01]));
        let resp = |nonce: &str, resources: Vec<Resource>| DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            nonce: nonce.into(),
            resources,
            ..Default::default()
        };
        let mut keys_bulk = ModelKeys::default();
        let bulk = handle_batch(XdsState::default(), &node, vec![resp("n1", all.clone())], |_, k| {
            keys_bulk = k.clone();
            Ok(())
        });
        let msg = bulk.replies[0].0.error_detail.as_ref().unwrap().message.clone();
        assert!(msg.starts_with("1 resource(s) rejected: broken: "), "{msg}");

        // The same through the general merge: one resource first, then the rest into a type
        // that is no longer empty.
        let first = all.iter().position(|r| r.name() == "w0000").unwrap();
        let mut rest = all.clone();
        let head = rest.remove(first);
        let mut keys_one = ModelKeys::default();
        let s = handle_batch(XdsState::default(), &node, vec![resp("n1", vec![head])], |_, _| Ok(())).state;
        let general = handle_batch(s, &node, vec![resp("n2", rest)], |_, k| {
            keys_one = k.clone();
            Ok(())
        });
        assert_eq!(bulk.state.model(), general.state.model());
        assert_eq!(bulk.state.versions(ADDRESS_TYPE), general.state.versions(ADDRESS_TYPE));
        assert_eq!(bulk.state.model().workloads.len(), 1500);
        assert_eq!(keys_bulk.workloads.len(), 1500);
        assert_eq!(keys_one.workloads.len(), 1499);
        // A model takes a batch's entries from the state: all of them by one walk alongside its
        // index, a few by a search each.
        let mut taken = Model::default();
        taken.take_from(&bulk.state, &keys_bulk);
        let whole = bulk.state.model();
        assert_eq!((&taken.workloads, &taken.services), (&whole.workloads, &whole.services));
        let few: BTreeSet<Istr> = keys_bulk.workloads.iter().step_by(500).cloned().collect();
        let mut some = Model::default();
        some.take_from(&bulk.state, &ModelKeys { workloads: few.clone(), ..Default::default() });
        assert_eq!(some.workloads.keys().cloned().collect::<BTreeSet<_>>(), few);

        // Refused, it leaves nothing behind.
        let refused = handle_batch(XdsState::default(), &node, vec![resp("n1", all.clone())], |_, _| {
            Err("map full".into())
        });
        assert_eq!(refused.state.len(), 0);
        assert!(refused.state.model().workloads.is_empty());

        // A name that is not its resource's key, or a name that comes twice, goes the general
        // way: the second claimant of a key is rejected, a repeated name is taken once.
        let mut odd = all.clone();
        odd.push(res("alias", ADDRESS_TYPE, workload("w0003")));
        odd.push(one(42));
        let h = handle_batch(XdsState::default(), &node, vec![resp("n1", odd)], |_, _| Ok(()));
        let msg = h.replies[0].0.error_detail.as_ref().unwrap().message.clone();
        assert!(
            msg.contains("alias: workload \"w0003\" is already described by resource \"w0003\""),
            "{msg}"
        );
        assert_eq!(h.state.model(), bulk.state.model());
    }

    #[test]
    fn a_subscription_over_the_limit_goes_without_versions_and_the_resend_removes_the_rest() {
        let names: Vec<String> = (0..50).map(|i| format!("w{i}")).collect();
        let add = DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            nonce: "n1".into(),
            resources: names.iter().map(|n| res(n, ADDRESS_TYPE, workload(n))).collect(),
            ..Default::default()
        };
        let held = handle_response(XdsState::default(), &NodeInfo::default(), &add, |_| Ok(())).state;
        let (req, without) = subscription(ADDRESS_TYPE, &held, None, 1 << 20);
        assert!(!without);
        assert_eq!(req.initial_resource_versions.len(), 50);
        use kmesh_proto::prost::Message as _;
        let full_len = req.encoded_len();
        let (req, without) = subscription(ADDRESS_TYPE, &held, None, full_len);
        assert!(!without && req.initial_resource_versions.len() == 50, "exactly at the limit still fits");
        let (req, without) = subscription(ADDRESS_TYPE, &held, None, full_len - 1);
        assert!(without && req.initial_resource_versions.is_empty() && req.type_url == ADDRESS_TYPE);
        // Nothing held: nothing to leave out, even under a tiny limit.
        assert!(!subscription(ADDRESS_TYPE, &XdsState::default(), None, 1).1);

        // The whole type again, minus w0..w9 (gone upstream meanwhile) and w10 refused by name.
        let mut resend = DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            nonce: "n9".into(),
            resources: names[11..]
                .iter()
                .map(|n| res(n, ADDRESS_TYPE, workload(n)))
                .chain([
                    res("w10", ADDRESS_TYPE, vec![0xff, 0x01]),
                    res("new", ADDRESS_TYPE, workload("new")),
                ])
                .collect(),
            ..Default::default()
        };
        assert_eq!(complete_resync(&held, &mut resend), 10);
        let h = handle_response(held, &NodeInfo::default(), &resend, |m| {
            assert!(!m.workloads.contains_key("w0") && !m.workloads.contains_key("w9"));
            assert!(
                m.workloads.contains_key("w10"),
                "a resource the resend names but cannot be decoded is kept"
            );
            assert!(m.workloads.contains_key("new") && m.workloads.contains_key("w49"));
            Ok(())
        });
        assert_eq!(h.state.count(ADDRESS_TYPE), 41);
        assert!(h.reply.error_detail.unwrap().message.contains("w10"));
        // Another type's holdings are not touched.
        let mut other = DeltaDiscoveryResponse { type_url: AUTHORIZATION_TYPE.into(), ..Default::default() };
        assert_eq!(complete_resync(&h.state, &mut other), 0);
    }

    #[test]
    fn nothing_is_applied_until_every_type_has_answered_then_all_at_once() {
        let r = |t: &str, n: &str| DeltaDiscoveryResponse {
            type_url: t.into(),
            nonce: n.into(),
            ..Default::default()
        };
        let mut sync = InitialSync::default();
        assert!(sync.take(r(ADDRESS_TYPE, "a1")).is_empty());
        assert!(sync.take(r(ADDRESS_TYPE, "a2")).is_empty(), "a second Address response is held too");
        assert_eq!(sync.waiting_for(), [AUTHORIZATION_TYPE]);
        let batch = sync.take(r(AUTHORIZATION_TYPE, "z1"));
        let nonces: Vec<_> = batch.iter().map(|r| r.nonce.as_str()).collect();
        assert_eq!(nonces, ["a1", "a2", "z1"]);
        assert!(sync.is_done() && sync.waiting_for().is_empty());
        assert_eq!(sync.take(r(ADDRESS_TYPE, "a3")).len(), 1, "after the sync each response goes alone");

        // A batch the data plane refuses: each response NACKed, nothing of any kept.
        let add = DeltaDiscoveryResponse {
            resources: vec![res("a", ADDRESS_TYPE, workload("a"))],
            ..r(ADDRESS_TYPE, "n1")
        };
        let pol = DeltaDiscoveryResponse { ..r(AUTHORIZATION_TYPE, "n2") };
        let mut calls = 0;
        let b = handle_batch(XdsState::default(), &NodeInfo::default(), vec![add, pol], |m, _| {
            calls += 1;
            assert!(m.model().workloads.contains_key("a"));
            Err("map full".into())
        });
        assert_eq!(calls, 1, "one apply for the batch");
        assert!(b.state.is_empty());
        assert_eq!(b.replies.len(), 2);
        assert!(b.replies.iter().all(|(r, _)| r.error_detail.as_ref().unwrap().message.contains("map full")));
        assert_eq!(b.replies[1].0.response_nonce, "n2");
    }

    #[test]
    fn a_node_takes_the_locality_of_its_workloads() {
        let text =
            "workloads: [{uid: w, name: w, namespace: n, node: node-7, locality: {region: r, zone: z}}]";
        let w = kmesh_model::config::parse(text).unwrap().workloads.remove("w").unwrap();
        let resp = DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            nonce: "n".into(),
            resources: vec![res("w", ADDRESS_TYPE, encode_address(&AddressResource::Workload((*w).clone())))],
            ..Default::default()
        };
        let node = NodeInfo { name: "node-7".into(), ..Default::default() };
        let h = handle_response(XdsState::default(), &node, &resp, |_| Ok(()));
        assert_eq!(h.state.model().node.locality.zone, "z");
    }

    #[test]
    fn the_node_is_what_istiod_accepts_with_the_metadata_it_reads() {
        let vars = [
            ("INSTANCE_IP", "10.1.2.3"),
            ("POD_IP", "10.9.9.9"),
            ("POD_NAME", "kmesh-abcde"),
            ("POD_NAMESPACE", "kmesh-system"),
            ("NODE_NAME", "node-7"),
            ("CLUSTER_ID", "east"),
            ("SERVICE_ACCOUNT", "kmesh"),
        ];
        let get = |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        let id = ProxyIdentity::from_vars(get).unwrap();
        let node = id.node();
        assert_eq!(node.id, "ztunnel~10.1.2.3~kmesh-abcde.kmesh-system~kmesh-system.svc.cluster.local");
        let (kind, ips) = kmesh_xds_server::parse_node(&node).unwrap();
        assert_eq!((kind.as_str(), ips), ("ztunnel", vec!["10.1.2.3".parse().unwrap()]));
        let meta = node.metadata.unwrap().fields;
        let field = |k: &str| match &meta[k].kind {
            Some(kmesh_proto::envoy_struct::value::Kind::StringValue(s)) => s.clone(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(field("INSTANCE_IPS"), "10.1.2.3");
        assert_eq!(field("NAME"), "kmesh-abcde");
        assert_eq!(field("NAMESPACE"), "kmesh-system");
        assert_eq!(field("NODE_NAME"), "node-7");
        assert_eq!(field("CLUSTER_ID"), "east");
        assert_eq!(field("SERVICE_ACCOUNT"), "kmesh");

        // POD_IP is the fallback; a list is accepted; garbage is an error naming the variable.
        let only_pod_ip = |k: &str| (k == "POD_IP").then(|| "10.9.9.9,fd00::9".to_string());
        let id = ProxyIdentity::from_vars(only_pod_ip).unwrap();
        assert_eq!(id.instance_ips.len(), 2);
        assert_eq!(id.cluster_id, "Kubernetes");
        let bad = |k: &str| (k == "INSTANCE_IP").then(|| "10.1.2".to_string());
        let e = ProxyIdentity::from_vars(bad).unwrap_err().to_string();
        assert!(e.starts_with("INSTANCE_IP=\"10.1.2\" is not an IP address"), "{e}");
    }
}
