//! The delta ADS client: takes workloads, services and authorization policies from istiod (or
//! any control plane speaking Istio's workload API) and feeds the same model the local config
//! feeds.
//!
//! Per stream: subscribe both types (wildcard) with the versions already held, ACK each response
//! by its nonce, NACK a response that had bad resources (naming each) while still applying the
//! valid ones, honour `removed_resources`. Between streams: keep the last good state in the
//! kernel (nothing is flushed) and reconnect with capped exponential backoff and jitter.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kmesh_model::model::{Model, NodeInfo, Policy, Service, Workload};
use kmesh_model::xds::{AddressResource, decode_address, decode_authorization};
use kmesh_proto::core::Node;
use kmesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use kmesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use kmesh_proto::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::admin::Shared;

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
    pub node_id: String,
    /// This node, for locality; its locality is filled from the xDS workloads on it when empty.
    pub node: NodeInfo,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl XdsOptions {
    pub fn new(address: &str, node: NodeInfo) -> Self {
        Self {
            address: address.to_string(),
            ca_file: None,
            tls_server_name: None,
            token_file: None,
            node_id: default_node_id(),
            node,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(15),
        }
    }
}

/// `<role>~<pod ip>~<pod>.<ns>~<ns>.svc.cluster.local` from the pod's downward-API variables.
pub fn default_node_id() -> String {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    let (ip, pod, ns) =
        (env("POD_IP", "127.0.0.1"), env("POD_NAME", "kmesh-daemon"), env("POD_NAMESPACE", "kmesh-system"));
    format!("kmesh~{ip}~{pod}.{ns}~{ns}.svc.cluster.local")
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
}

/// A parsed resource.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Parsed {
    Workload(Arc<Workload>),
    Service(Arc<Service>),
    Policy(Arc<Policy>),
}

/// Everything received, by type and resource name, with versions.
#[derive(Clone, Debug, Default)]
pub struct XdsState {
    by_type: BTreeMap<String, BTreeMap<String, (String, Parsed)>>,
}

impl XdsState {
    pub fn versions(&self, type_url: &str) -> HashMap<String, String> {
        self.by_type
            .get(type_url)
            .map(|m| m.iter().map(|(n, (v, _))| (n.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.by_type.values().map(|m| m.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The model these resources describe, for a daemon on `node`.
    pub fn model(&self, node: &NodeInfo) -> Model {
        let mut m = Model { node: node.clone(), ..Default::default() };
        for items in self.by_type.values() {
            for (_, p) in items.values() {
                match p {
                    Parsed::Workload(w) => {
                        m.workloads.insert(w.uid.clone(), w.clone());
                    }
                    Parsed::Service(s) => {
                        m.services.insert(s.key(), s.clone());
                    }
                    Parsed::Policy(p) => {
                        m.policies.insert(p.key(), p.clone());
                    }
                }
            }
        }
        // A node's locality is that of the workloads running on it, unless configured.
        if m.node.locality == Default::default()
            && let Some(w) = m.workloads.values().find(|w| !m.node.name.is_empty() && w.node == m.node.name)
        {
            m.node.locality = w.locality.clone();
            if m.node.network.is_empty() {
                m.node.network = w.network.clone();
            }
            if m.node.cluster_id.is_empty() {
                m.node.cluster_id = w.cluster_id.clone();
            }
        }
        m
    }
}

/// The outcome of one response: the state to keep and the ACK or NACK to send.
pub struct Handled {
    pub state: XdsState,
    pub reply: DeltaDiscoveryRequest,
    /// Resources rejected, as `name: error`.
    pub rejected: Vec<String>,
}

/// Applies one response to `state`: valid resources and removals are taken; bad resources are
/// named in a NACK. `apply` is called with the resulting model; if it fails, the response is
/// NACKed whole and the previous state is kept. Pure apart from `apply`.
pub fn handle_response(
    state: XdsState,
    node: &NodeInfo,
    resp: &DeltaDiscoveryResponse,
    apply: impl FnOnce(Model) -> Result<(), String>,
) -> Handled {
    let mut next = state;
    // Previous entries of what this response changes, to put back if the apply fails.
    let mut undo: Vec<(String, Option<(String, Parsed)>)> = Vec::new();
    let mut rejected = Vec::new();
    let type_url = resp.type_url.as_str();
    let known = type_url == ADDRESS_TYPE || type_url == AUTHORIZATION_TYPE;
    if !known {
        rejected.push(format!("type {type_url:?} was not subscribed"));
    } else {
        let items = next.by_type.entry(type_url.to_string()).or_default();
        for r in &resp.resources {
            let Some(any) = &r.resource else {
                rejected.push(format!("{}: resource body missing", r.name));
                continue;
            };
            if any.type_url != type_url {
                rejected.push(format!("{}: body is {:?}, expected {type_url}", r.name, any.type_url));
                continue;
            }
            let parsed = if type_url == ADDRESS_TYPE {
                decode_address(&any.value).map(|a| match a {
                    AddressResource::Workload(w) => Parsed::Workload(Arc::new(w)),
                    AddressResource::Service(s) => Parsed::Service(Arc::new(s)),
                })
            } else {
                decode_authorization(&any.value).map(|p| Parsed::Policy(Arc::new(p)))
            };
            match parsed {
                Ok(p) => {
                    let old = items.insert(r.name.clone(), (r.version.clone(), p));
                    undo.push((r.name.clone(), old));
                }
                Err(e) => rejected.push(format!("{}: {e}", r.name)),
            }
        }
        for name in &resp.removed_resources {
            if let Some(old) = items.remove(name) {
                undo.push((name.clone(), Some(old)));
            }
        }
    }
    let applied = if known { apply(next.model(node)) } else { Ok(()) };
    let (state, error) = match applied {
        Ok(()) if rejected.is_empty() => (next, None),
        Ok(()) => {
            let msg = format!("{} resource(s) rejected: {}", rejected.len(), rejected.join("; "));
            (next, Some(msg))
        }
        Err(e) => {
            rejected.push(format!("the data plane refused the update: {e}"));
            let items = next.by_type.entry(type_url.to_string()).or_default();
            for (name, old) in undo.into_iter().rev() {
                match old {
                    Some(v) => items.insert(name, v),
                    None => items.remove(&name),
                };
            }
            (next, Some(rejected.join("; ")))
        }
    };
    let reply = DeltaDiscoveryRequest {
        type_url: resp.type_url.clone(),
        response_nonce: resp.nonce.clone(),
        error_detail: error.map(|message| kmesh_proto::rpc::Status {
            code: tonic::Code::InvalidArgument as i32,
            message,
            details: vec![],
        }),
        ..Default::default()
    };
    Handled { state, reply, rejected }
}

fn subscribe(type_url: &str, state: &XdsState, node: Option<Node>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node,
        type_url: type_url.to_string(),
        initial_resource_versions: state.versions(type_url),
        ..Default::default()
    }
}

fn node_message(o: &XdsOptions) -> Node {
    use kmesh_proto::envoy_struct::{Struct, Value, value::Kind};
    let s = |v: &str| Value { kind: Some(Kind::StringValue(v.to_string())) };
    let mut fields = std::collections::BTreeMap::new();
    fields.insert("NODE_NAME".to_string(), s(&o.node.name));
    fields.insert("CLUSTER_ID".to_string(), s(&o.node.cluster_id));
    fields.insert(
        "NAMESPACE".to_string(),
        s(&std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "kmesh-system".into())),
    );
    fields.insert("ISTIO_META_DATAPLANE".to_string(), s("kmesh-rs"));
    Node {
        id: o.node_id.clone(),
        cluster: o.node.cluster_id.clone(),
        metadata: Some(Struct { fields: fields.into_iter().collect() }),
        ..Default::default()
    }
}

async fn channel(o: &XdsOptions) -> Result<Channel, XdsError> {
    let bad = |reason: String| XdsError::Address { address: o.address.clone(), reason };
    let scheme = if o.ca_file.is_some() { "https" } else { "http" };
    let mut ep =
        Endpoint::from_shared(format!("{scheme}://{}", o.address)).map_err(|e| bad(e.to_string()))?;
    ep = ep.connect_timeout(Duration::from_secs(5)).http2_keep_alive_interval(Duration::from_secs(30));
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

/// Opens a stream with both subscriptions; returns the request sender and the response stream.
async fn open(
    o: &XdsOptions,
    state: &XdsState,
) -> Result<(mpsc::Sender<DeltaDiscoveryRequest>, tonic::Streaming<DeltaDiscoveryResponse>), XdsError> {
    let token = match &o.token_file {
        Some(p) => {
            let t =
                std::fs::read_to_string(p).map_err(|source| XdsError::Token { path: p.clone(), source })?;
            Some(format!("Bearer {}", t.trim()))
        }
        None => None,
    };
    let ch = channel(o).await?;
    let token_value = match token {
        Some(t) => Some(t.parse::<tonic::metadata::MetadataValue<_>>().map_err(|_| XdsError::Token {
            path: o.token_file.clone().unwrap_or_default(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "token is not a valid header value"),
        })?),
        None => None,
    };
    let mut client =
        AggregatedDiscoveryServiceClient::with_interceptor(ch, move |mut req: tonic::Request<()>| {
            if let Some(t) = &token_value {
                req.metadata_mut().insert("authorization", t.clone());
            }
            Ok(req)
        })
        .max_decoding_message_size(usize::MAX);

    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
    tx.send(subscribe(ADDRESS_TYPE, state, Some(node_message(o)))).await.expect("receiver alive");
    tx.send(subscribe(AUTHORIZATION_TYPE, state, None)).await.expect("receiver alive");
    let stream = client
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|status| XdsError::Refused { address: o.address.clone(), status })?
        .into_inner();
    tracing::info!(address = %o.address, node_id = %o.node_id, "xDS stream open");
    Ok((tx, stream))
}

/// Connects, subscribes and waits for the first response: a check of address, TLS and token.
pub async fn probe(o: &XdsOptions) -> Result<DeltaDiscoveryResponse, XdsError> {
    let (_tx, mut stream) = open(o, &XdsState::default()).await?;
    match stream.message().await {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(XdsError::Stream {
            address: o.address.clone(),
            status: tonic::Status::ok("closed by the server"),
        }),
        Err(status) => Err(XdsError::Stream { address: o.address.clone(), status }),
    }
}

/// One stream: connect, subscribe, handle responses until the stream ends.
async fn run_stream(o: &XdsOptions, shared: &Arc<Shared>, state: &mut XdsState) -> Result<(), XdsError> {
    let (tx, mut stream) = open(o, state).await?;
    shared.xds.connected.store(true, Ordering::Relaxed);
    let mut synced = std::collections::BTreeSet::new();
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => {
                return Err(XdsError::Stream {
                    address: o.address.clone(),
                    status: tonic::Status::ok("closed by the server"),
                });
            }
            Err(status) => return Err(XdsError::Stream { address: o.address.clone(), status }),
        };
        let node = o.node.clone();
        let shared2 = shared.clone();
        let st = std::mem::take(state);
        let started = std::time::Instant::now();
        let (n_res, n_rm) = (resp.resources.len(), resp.removed_resources.len());
        let handled = tokio::task::spawn_blocking(move || {
            handle_response(st, &node, &resp, |model| {
                let mut mesh = shared2.mesh.lock().unwrap_or_else(|p| p.into_inner());
                mesh.set_model(model).map(|_| ()).map_err(|e| e.to_string())
            })
        })
        .await
        .expect("apply task panicked");
        *state = handled.state;
        let nack = handled.reply.error_detail.is_some();
        if nack { &shared.xds.nacks } else { &shared.xds.acks }.fetch_add(1, Ordering::Relaxed);
        if nack {
            tracing::warn!(type_url = %handled.reply.type_url, rejected = ?handled.rejected, "NACK");
            *shared.config_error.lock().unwrap() = Some(handled.rejected.join("; "));
        } else {
            *shared.config_error.lock().unwrap() = None;
        }
        tracing::info!(type_url = %handled.reply.type_url, resources = n_res, removed = n_rm, nack,
            elapsed_ms = started.elapsed().as_millis() as u64, held = state.len(), "xDS response applied");
        synced.insert(handled.reply.type_url.clone());
        if synced.contains(ADDRESS_TYPE) && synced.contains(AUTHORIZATION_TYPE) {
            shared.ready.store(true, Ordering::SeqCst);
        }
        if tx.send(handled.reply).await.is_err() {
            return Ok(());
        }
    }
}

/// Runs the client until `shutdown` flips to true. The kernel keeps the last good state while
/// the control plane is away.
pub async fn run(o: XdsOptions, shared: Arc<Shared>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut state = XdsState::default();
    let mut backoff = o.backoff_initial;
    loop {
        let r = tokio::select! {
            r = run_stream(&o, &shared, &mut state) => r,
            _ = shutdown.changed() => return,
        };
        shared.xds.connected.store(false, Ordering::Relaxed);
        shared.xds.disconnects.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(_) => {}
            Err(e) => {
                if matches!(e, XdsError::Stream { .. }) {
                    backoff = o.backoff_initial;
                }
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, held = state.len(),
                    "xDS disconnected; the data plane keeps the last good state");
            }
        }
        // Full jitter in [backoff/2, backoff].
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let jitter = backoff / 2 + backoff.mul_f64((nanos % 1000) as f64 / 2000.0);
        tokio::select! {
            _ = tokio::time::sleep(jitter) => {},
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(o.backoff_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmesh_model::xds::encode_address;
    use kmesh_proto::discovery::Resource;

    fn res(name: &str, type_url: &str, value: Vec<u8>) -> Resource {
        Resource {
            name: name.into(),
            version: "v1".into(),
            resource: Some(kmesh_proto::Any { type_url: type_url.into(), value }),
            ..Default::default()
        }
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
        assert_eq!(h.state.model(&node).node.locality.zone, "z");
    }
}
