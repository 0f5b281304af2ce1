//! The kernel-native mode's source: Envoy's own xDS (LDS, RDS, CDS, EDS) over delta ADS,
//! subscribed as an Envoy sidecar would be, translated into the same model the workload API
//! feeds (see [`translate`]) and compiled into the same maps.
//!
//! Per stream: CDS and LDS are wildcard; EDS and RDS are subscribed by the names the clusters
//! and listeners held need, and the subscriptions follow them. Each response is ACKed by its
//! nonce once applied; a response with malformed resources is NACKed naming each, and its
//! valid resources are applied. Between streams the kernel keeps the last good state, and the
//! next stream lists what is held (`initial_resource_versions`).

pub mod resources;
pub mod translate;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use kmesh_model::delta::ModelKeys;
use kmesh_model::model::{Model, NodeInfo};
use kmesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use kmesh_proto::envoy::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};
use tokio::sync::mpsc;

use crate::admin::Shared;
use crate::xds::{XdsError, XdsOptions};
use translate::{Held, Report};

/// The proxy type this mode presents to the control plane: it takes what an Envoy sidecar
/// takes.
pub const PROXY_TYPE: &str = "sidecar";

/// Every type subscribed, in Envoy's order (clusters before their endpoints, listeners before
/// their routes).
pub const TYPES: [&str; 4] = [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE];

/// The source's state between responses and across streams.
#[derive(Default)]
pub struct EnvoyState {
    pub held: Held,
    /// type -> name -> version, as the control plane sent them.
    versions: BTreeMap<&'static str, BTreeMap<String, String>>,
    /// The model the resources held translate to.
    pub model: Model,
    pub report: Report,
}

fn type_of(t: &str) -> Option<&'static str> {
    TYPES.into_iter().find(|x| *x == t)
}

/// The outcome of one response: the reply (ACK or NACK) and what was refused.
pub struct Handled {
    pub reply: DeltaDiscoveryRequest,
    pub rejected: Vec<String>,
}

impl EnvoyState {
    /// Takes one response in: decodes each resource, keeps the valid ones, removes what it
    /// removes, translates, and hands the model to `apply`. When `apply` fails nothing of the
    /// response stays and it is NACKed whole.
    pub fn handle(
        &mut self,
        node: &NodeInfo,
        resp: &DeltaDiscoveryResponse,
        apply: impl FnOnce(&Model, &ModelKeys) -> Result<(), String>,
    ) -> Handled {
        let reply = |error: Option<String>| DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail: error.map(|message| kmesh_proto::rpc::Status { code: 3, message, details: vec![] }),
            ..Default::default()
        };
        let Some(t) = type_of(&resp.type_url) else {
            let e = format!("type {} was not subscribed", resp.type_url);
            return Handled { reply: reply(Some(e.clone())), rejected: vec![e] };
        };
        let before = (self.held.clone(), self.versions.clone());
        let mut rejected = Vec::new();
        for r in &resp.resources {
            let Some(any) = &r.resource else {
                rejected.push(format!("{}: no resource", r.name));
                continue;
            };
            if any.type_url != t {
                rejected.push(format!("{}: carries {}, not {t}", r.name, any.type_url));
                continue;
            }
            let ok = match t {
                LISTENER_TYPE => resources::listener(&any.value).and_then(|l| {
                    if l.name != r.name {
                        return Err(format!("named {:?} inside", l.name));
                    }
                    self.held.listeners.insert(l.name.clone(), l);
                    Ok(())
                }),
                ROUTE_TYPE => resources::route_configuration(&any.value).map(|(n, rt)| {
                    self.held.routes.insert(n, rt);
                }),
                CLUSTER_TYPE => resources::cluster(&any.value).map(|c| {
                    self.held.clusters.insert(c.name.clone(), c);
                }),
                _ => resources::load_assignment(&any.value).map(|(n, a)| {
                    self.held.assignments.insert(n, a);
                }),
            };
            match ok {
                Ok(()) => {
                    self.versions.entry(t).or_default().insert(r.name.clone(), r.version.clone());
                }
                Err(e) => rejected.push(format!("{} {}: {e}", short(t), r.name)),
            }
        }
        for n in &resp.removed_resources {
            match t {
                LISTENER_TYPE => self.held.listeners.remove(n).is_some(),
                ROUTE_TYPE => self.held.routes.remove(n).is_some(),
                CLUSTER_TYPE => self.held.clusters.remove(n).is_some(),
                _ => self.held.assignments.remove(n).is_some(),
            };
            self.versions.entry(t).or_default().remove(n);
        }
        let (model, report) = translate::translate(&self.held, node);
        let keys = ModelKeys::between(&self.model, &model);
        if let Err(e) = apply(&model, &keys) {
            (self.held, self.versions) = before;
            let e = format!("not applied: {e}");
            return Handled { reply: reply(Some(e.clone())), rejected: vec![e] };
        }
        self.model = model;
        self.report = report;
        let error = (!rejected.is_empty()).then(|| rejected.join("; "));
        Handled { reply: reply(error), rejected }
    }

    /// The names the next EDS or RDS subscription must hold.
    pub fn wanted(&self, type_url: &str) -> BTreeSet<String> {
        match type_url {
            ENDPOINT_TYPE => self.held.eds_names(),
            ROUTE_TYPE => self.held.rds_names(),
            _ => BTreeSet::new(),
        }
    }

    /// Forgets EDS and RDS resources no longer wanted (unsubscribed).
    fn drop_unwanted(&mut self) {
        let (eds, rds) = (self.held.eds_names(), self.held.rds_names());
        self.held.assignments.retain(|n, _| eds.contains(n));
        self.held.routes.retain(|n, _| rds.contains(n));
        for (t, keep) in [(ENDPOINT_TYPE, &eds), (ROUTE_TYPE, &rds)] {
            if let Some(v) = self.versions.get_mut(t) {
                v.retain(|n, _| keep.contains(n));
            }
        }
    }

    fn versions(&self, t: &str) -> std::collections::HashMap<String, String> {
        self.versions.get(t).map(|v| v.clone().into_iter().collect()).unwrap_or_default()
    }
}

fn short(t: &str) -> &'static str {
    match t {
        LISTENER_TYPE => "listener",
        ROUTE_TYPE => "route configuration",
        CLUSTER_TYPE => "cluster",
        _ => "load assignment",
    }
}

/// The subscriptions that open a stream. EDS and RDS are subscribed only once a name is
/// needed: an empty first subscription would mean every resource of the type (wildcard).
pub fn subscriptions(o: &XdsOptions, st: &EnvoyState) -> Vec<DeltaDiscoveryRequest> {
    TYPES
        .iter()
        .filter(|t| matches!(**t, CLUSTER_TYPE | LISTENER_TYPE) || !st.wanted(t).is_empty())
        .enumerate()
        .map(|(i, t)| DeltaDiscoveryRequest {
            node: (i == 0).then(|| {
                let mut n = o.identity.node();
                n.id = o.identity.node_id_as(PROXY_TYPE);
                n
            }),
            type_url: t.to_string(),
            resource_names_subscribe: st.wanted(t).into_iter().collect(),
            initial_resource_versions: st.versions(t),
            ..Default::default()
        })
        .collect()
}

async fn run_stream(
    o: &XdsOptions,
    shared: &Arc<Shared>,
    st: &mut EnvoyState,
    synced: &mut bool,
) -> Result<(), XdsError> {
    let mut client = crate::xds::client(o).await?;
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
    let mut subscribed: BTreeMap<&'static str, BTreeSet<String>> =
        TYPES.iter().map(|t| (*t, BTreeSet::new())).collect();
    for req in subscriptions(o, st) {
        if let Some(t) = type_of(&req.type_url) {
            subscribed.insert(t, req.resource_names_subscribe.iter().cloned().collect());
        }
        tx.send(req).await.expect("receiver alive");
    }
    let mut stream = client
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|status| XdsError::Refused { address: o.address.clone(), status })?
        .into_inner();
    tracing::info!(address = %o.address, node_id = %o.identity.node_id_as(PROXY_TYPE),
        "Envoy xDS stream open (kernel-native mode)");
    let mut answered: BTreeSet<&'static str> = BTreeSet::new();
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
        if !shared.xds.connected.swap(true, Ordering::Relaxed) {
            *shared.xds.last_error.lock().unwrap() = None;
        }
        let started = std::time::Instant::now();
        let handled = {
            let node = o.node.clone();
            st.handle(&node, &resp, |model, keys| {
                let mut mesh = shared.mesh.lock().unwrap_or_else(|p| p.into_inner());
                mesh.apply_change(model, keys).map(|_| ()).map_err(|e| e.to_string())
            })
        };
        let nack = handled.reply.error_detail.is_some();
        if nack { &shared.xds.nacks } else { &shared.xds.acks }.fetch_add(1, Ordering::Relaxed);
        if nack {
            tracing::warn!(type_url = %resp.type_url, rejected = ?handled.rejected, "NACK");
        }
        *shared.config_error.lock().unwrap() = nack.then(|| handled.rejected.join("; "));
        tracing::info!(type_url = %resp.type_url, resources = resp.resources.len(),
            removed = resp.removed_resources.len(), nack,
            elapsed_ms = started.elapsed().as_millis() as u64,
            compiled = st.report.count("compiled"), warming = st.report.count("warming"),
            not_compiled = st.report.count("not_compiled"), "Envoy xDS response applied");
        if tx.send(handled.reply).await.is_err() {
            return Ok(());
        }
        if let Some(t) = type_of(&resp.type_url) {
            answered.insert(t);
        }
        // The named subscriptions follow what the clusters and listeners need.
        for t in [ENDPOINT_TYPE, ROUTE_TYPE] {
            let want = st.wanted(t);
            let have = subscribed.entry(t).or_default();
            if *have == want {
                continue;
            }
            let req = DeltaDiscoveryRequest {
                type_url: t.to_string(),
                resource_names_subscribe: want.difference(have).cloned().collect(),
                resource_names_unsubscribe: have.difference(&want).cloned().collect(),
                ..Default::default()
            };
            *have = want;
            st.drop_unwanted();
            if tx.send(req).await.is_err() {
                return Ok(());
            }
        }
        *shared.envoy.lock().unwrap() = Some(serde_json::to_value(&st.report).unwrap_or_default());
        *shared.xds.envoy_chains.lock().unwrap() = ["compiled", "passthrough", "warming", "not_compiled"]
            .map(|s| (s, st.report.count(s) as u64))
            .into();
        let done = TYPES.iter().all(|t| {
            answered.contains(t) || (matches!(*t, ENDPOINT_TYPE | ROUTE_TYPE) && subscribed[t].is_empty())
        });
        if done {
            *synced = true;
            shared.ready.store(true, Ordering::SeqCst);
        }
    }
}

/// Runs the source until `shutdown` flips to true; the kernel keeps the last good state while
/// the control plane is away.
pub async fn run(o: XdsOptions, shared: Arc<Shared>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let _ = shared.xds.node_id.set(o.identity.node_id_as(PROXY_TYPE));
    let mut st = EnvoyState::default();
    let mut backoff = o.backoff_initial;
    loop {
        let mut synced = false;
        let r = tokio::select! {
            r = run_stream(&o, &shared, &mut st, &mut synced) => r,
            _ = shutdown.changed() => return,
        };
        let held = st.held.listeners.len()
            + st.held.clusters.len()
            + st.held.routes.len()
            + st.held.assignments.len();
        let wait = crate::xds::stream_ended(&o, &shared, r, synced, &mut backoff, held);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {},
            _ = shutdown.changed() => return,
        }
    }
}
