//! The kernel-native mode's source: Envoy's own xDS (LDS, RDS, CDS, EDS) over ADS, delta or
//! state of the world, subscribed as an Envoy sidecar would be, translated into the same
//! model the workload API feeds (see [`translate`]) and compiled into the same maps.
//!
//! Per stream: CDS and LDS are wildcard; EDS and RDS are subscribed by the names the clusters
//! and listeners held need, and the subscriptions follow them. Each response is ACKed by its
//! nonce once applied; a response with malformed resources is NACKed naming each, and its
//! valid resources are applied. Between streams the kernel keeps the last good state, and the
//! next stream says what is held (delta: `initial_resource_versions`; state of the world: the
//! last version accepted of each type).

pub mod resources;
pub mod translate;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use kmesh_model::delta::ModelKeys;
use kmesh_model::model::{Model, NodeInfo};
use kmesh_proto::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use kmesh_proto::envoy::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};
use tokio::sync::mpsc;

use crate::admin::Shared;
use crate::ads::Inbound;
use crate::xds::{AdsFlavour, XdsError, XdsOptions};
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

/// What a response removes: the names it lists (delta), or every resource held of its type
/// that it does not carry (a state-of-the-world response of LDS or CDS is the whole set).
pub enum Removal<'a> {
    Named(&'a [String]),
    Absent,
}

/// One resource of a response, whichever flavour of ADS brought it.
pub struct Incoming<'a> {
    /// The name it was sent under (delta); `None` when only the resource names itself.
    pub name: Option<&'a str>,
    pub version: &'a str,
    pub resource: Option<&'a kmesh_proto::Any>,
}

impl EnvoyState {
    /// Takes one delta response in (see [`take`](Self::take)) and answers it by its nonce.
    pub fn handle(
        &mut self,
        node: &NodeInfo,
        resp: &DeltaDiscoveryResponse,
        apply: impl FnOnce(&Model, &ModelKeys) -> Result<(), String>,
    ) -> Handled {
        let items = resp.resources.iter().map(|r| Incoming {
            name: Some(&r.name),
            version: &r.version,
            resource: r.resource.as_ref(),
        });
        let rejected = self.take(node, &resp.type_url, items, Removal::Named(&resp.removed_resources), apply);
        let reply = DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail: nack_detail(&rejected),
            ..Default::default()
        };
        Handled { reply, rejected }
    }

    /// Takes one state-of-the-world response in: LDS and CDS responses are the whole set (what
    /// they leave out is removed), EDS and RDS ones carry the names subscribed (what they leave
    /// out stays until it is unsubscribed), as Envoy reads them. Returns what was refused.
    pub fn handle_sotw(
        &mut self,
        node: &NodeInfo,
        resp: &DiscoveryResponse,
        apply: impl FnOnce(&Model, &ModelKeys) -> Result<(), String>,
    ) -> Vec<String> {
        let items = resp.resources.iter().map(|a| Incoming {
            name: None,
            version: &resp.version_info,
            resource: Some(a),
        });
        let removal = match resp.type_url.as_str() {
            LISTENER_TYPE | CLUSTER_TYPE => Removal::Absent,
            _ => Removal::Named(&[]),
        };
        self.take(node, &resp.type_url, items, removal, apply)
    }

    /// Decodes each resource, keeps the valid ones, removes what the response removes,
    /// translates, and hands the model to `apply`. When `apply` fails nothing of the response
    /// stays. Returns what was refused (empty: ACK).
    pub fn take<'a>(
        &mut self,
        node: &NodeInfo,
        type_url: &str,
        items: impl Iterator<Item = Incoming<'a>>,
        removal: Removal<'_>,
        apply: impl FnOnce(&Model, &ModelKeys) -> Result<(), String>,
    ) -> Vec<String> {
        let Some(t) = type_of(type_url) else {
            return vec![format!("type {type_url} was not subscribed")];
        };
        let before = (self.held.clone(), self.versions.clone());
        let mut rejected = Vec::new();
        // Every name the response carries, and whether each resource could be named at all.
        let mut carried = BTreeSet::new();
        let mut unnamed = 0;
        for (i, r) in items.enumerate() {
            let Some(any) = r.resource else {
                rejected.push(format!("{}: no resource", r.name.unwrap_or("?")));
                continue;
            };
            let name = match r.name {
                Some(n) => n.to_string(),
                None => match resources::name_in(t, &any.value) {
                    Some(n) => n,
                    None => {
                        unnamed += 1;
                        format!("#{i}")
                    }
                },
            };
            carried.insert(name.clone());
            if any.type_url != t {
                rejected.push(format!("{name}: carries {}, not {t}", any.type_url));
                continue;
            }
            let ok = match t {
                LISTENER_TYPE => resources::listener(&any.value).and_then(|l| {
                    if l.name != name {
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
                    self.versions.entry(t).or_default().insert(name, r.version.to_string());
                }
                Err(e) => rejected.push(format!("{} {name}: {e}", short(t))),
            }
        }
        let removed: Vec<String> = match removal {
            Removal::Named(names) => names.to_vec(),
            // A resource that could not even be named might be one held: nothing is removed
            // on a guess.
            Removal::Absent if unnamed > 0 => {
                rejected.push(format!(
                    "{unnamed} {} without a readable name: nothing held was removed by this response",
                    short(t)
                ));
                Vec::new()
            }
            Removal::Absent => self
                .versions
                .get(t)
                .map(|v| v.keys().filter(|n| !carried.contains(*n)).cloned().collect())
                .unwrap_or_default(),
        };
        for n in &removed {
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
            return vec![format!("not applied: {e}")];
        }
        self.model = model;
        self.report = report;
        rejected
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

/// The `error_detail` of a NACK listing what was refused; `None` (an ACK) when nothing was.
fn nack_detail(rejected: &[String]) -> Option<kmesh_proto::rpc::Status> {
    (!rejected.is_empty()).then(|| kmesh_proto::rpc::Status {
        code: 3,
        message: rejected.join("; "),
        details: vec![],
    })
}

fn short(t: &str) -> &'static str {
    match t {
        LISTENER_TYPE => "listener",
        ROUTE_TYPE => "route configuration",
        CLUSTER_TYPE => "cluster",
        _ => "load assignment",
    }
}

/// The Node this source presents: an Envoy sidecar's.
fn node(o: &XdsOptions) -> kmesh_proto::core::Node {
    let mut n = o.identity.node();
    n.id = o.identity.node_id_as(PROXY_TYPE);
    n
}

/// The types a stream subscribes to first. EDS and RDS are subscribed only once a name is
/// needed: an empty first delta subscription would mean every resource of the type.
fn opening_types(st: &EnvoyState) -> impl Iterator<Item = &'static str> + '_ {
    TYPES.into_iter().filter(|t| matches!(*t, CLUSTER_TYPE | LISTENER_TYPE) || !st.wanted(t).is_empty())
}

/// The delta subscriptions that open a stream.
pub fn subscriptions(o: &XdsOptions, st: &EnvoyState) -> Vec<DeltaDiscoveryRequest> {
    opening_types(st)
        .enumerate()
        .map(|(i, t)| DeltaDiscoveryRequest {
            node: (i == 0).then(|| node(o)),
            type_url: t.to_string(),
            resource_names_subscribe: st.wanted(t).into_iter().collect(),
            initial_resource_versions: st.versions(t),
            ..Default::default()
        })
        .collect()
}

/// Applies one response to the kernel through the mesh.
fn apply(shared: &Shared, model: &Model, keys: &ModelKeys) -> Result<(), String> {
    let mut mesh = shared.mesh.lock().unwrap_or_else(|p| p.into_inner());
    mesh.apply_change(model, keys).map(|_| ()).map_err(|e| e.to_string())
}

/// What every response does to the daemon's surface, whichever flavour of ADS brought it:
/// counts and logs the ACK or NACK, and publishes the report.
fn responded(
    shared: &Shared,
    st: &EnvoyState,
    type_url: &str,
    resources: usize,
    removed: usize,
    rejected: &[String],
    started: std::time::Instant,
) {
    if !shared.xds.connected.swap(true, Ordering::Relaxed) {
        *shared.xds.last_error.lock().unwrap() = None;
    }
    let nack = !rejected.is_empty();
    if nack { &shared.xds.nacks } else { &shared.xds.acks }.fetch_add(1, Ordering::Relaxed);
    if nack {
        tracing::warn!(type_url, rejected = ?rejected, "NACK");
    }
    *shared.config_error.lock().unwrap() = nack.then(|| rejected.join("; "));
    tracing::info!(
        type_url,
        resources,
        removed,
        nack,
        elapsed_ms = started.elapsed().as_millis() as u64,
        compiled = st.report.count("compiled"),
        warming = st.report.count("warming"),
        not_compiled = st.report.count("not_compiled"),
        "Envoy xDS response applied"
    );
    *shared.envoy.lock().unwrap() = Some(serde_json::to_value(&st.report).unwrap_or_default());
    *shared.xds.envoy_chains.lock().unwrap() =
        ["compiled", "passthrough", "warming", "not_compiled"].map(|s| (s, st.report.count(s) as u64)).into();
}

/// Ready once every type subscribed has been answered (EDS and RDS count only when names are
/// subscribed).
fn synced_now(
    shared: &Shared,
    answered: &BTreeSet<&'static str>,
    subscribed: &BTreeMap<&'static str, BTreeSet<String>>,
    synced: &mut bool,
) {
    let done = TYPES.iter().all(|t| {
        answered.contains(t) || (matches!(*t, ENDPOINT_TYPE | ROUTE_TYPE) && subscribed[t].is_empty())
    });
    if done {
        *synced = true;
        shared.ready.store(true, Ordering::SeqCst);
    }
}

/// The next response of a stream; its end (by the server, or with an error) is an error for
/// the reconnect loop.
async fn next<T: prost::Message + Default>(o: &XdsOptions, stream: &mut Inbound<T>) -> Result<T, XdsError> {
    let status = match stream.message().await {
        Ok(Some(r)) => return Ok(r),
        Ok(None) => tonic::Status::ok("closed by the server"),
        Err(status) => status,
    };
    Err(XdsError::Stream { address: o.address.clone(), status })
}

/// Says that a stream is open, and which flavour of ADS it speaks.
fn opened(o: &XdsOptions, flavour: &str) {
    tracing::info!(address = %o.address, node_id = %o.identity.node_id_as(PROXY_TYPE), flavour,
        "Envoy xDS stream open (kernel-native mode)");
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
    let mut stream =
        client.delta(rx).await.map_err(|status| XdsError::Refused { address: o.address.clone(), status })?;
    opened(o, "delta");
    let mut answered: BTreeSet<&'static str> = BTreeSet::new();
    loop {
        let resp = next(o, &mut stream).await?;
        let started = std::time::Instant::now();
        let handled = st.handle(&o.node, &resp, |model, keys| apply(shared, model, keys));
        responded(
            shared,
            st,
            &resp.type_url,
            resp.resources.len(),
            resp.removed_resources.len(),
            &handled.rejected,
            started,
        );
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
        synced_now(shared, &answered, &subscribed, synced);
    }
}

/// The same source over state-of-the-world ADS: each response of LDS and CDS is the whole set,
/// each of EDS and RDS the names subscribed; an ACK repeats the response's version and nonce
/// with the names, a NACK the last version accepted with what was wrong. Versions accepted
/// are kept across streams and sent when resubscribing.
async fn run_stream_sotw(
    o: &XdsOptions,
    shared: &Arc<Shared>,
    st: &mut EnvoyState,
    accepted: &mut BTreeMap<&'static str, String>,
    synced: &mut bool,
) -> Result<(), XdsError> {
    let mut client = crate::xds::client(o).await?;
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(16);
    let mut subscribed: BTreeMap<&'static str, BTreeSet<String>> =
        TYPES.iter().map(|t| (*t, BTreeSet::new())).collect();
    // The latest nonce of each type on this stream (the versions accepted outlive it).
    let mut nonces: BTreeMap<&'static str, String> = BTreeMap::new();
    let opening: Vec<&'static str> = opening_types(st).collect();
    for (i, t) in opening.into_iter().enumerate() {
        let names = st.wanted(t);
        subscribed.insert(t, names.clone());
        let req = DiscoveryRequest {
            node: (i == 0).then(|| node(o)),
            type_url: t.to_string(),
            version_info: accepted.get(t).cloned().unwrap_or_default(),
            resource_names: names.into_iter().collect(),
            ..Default::default()
        };
        tx.send(req).await.expect("receiver alive");
    }
    let mut stream =
        client.sotw(rx).await.map_err(|status| XdsError::Refused { address: o.address.clone(), status })?;
    opened(o, "state of the world");
    let mut answered: BTreeSet<&'static str> = BTreeSet::new();
    loop {
        let resp = next(o, &mut stream).await?;
        let started = std::time::Instant::now();
        let rejected = st.handle_sotw(&o.node, &resp, |model, keys| apply(shared, model, keys));
        responded(shared, st, &resp.type_url, resp.resources.len(), 0, &rejected, started);
        let Some(t) = type_of(&resp.type_url) else {
            // Not a type this source asked for: say so, once, on the response's own terms.
            let req = DiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                error_detail: nack_detail(&rejected),
                ..Default::default()
            };
            if tx.send(req).await.is_err() {
                return Ok(());
            }
            continue;
        };
        nonces.insert(t, resp.nonce.clone());
        if rejected.is_empty() {
            accepted.insert(t, resp.version_info.clone());
        }
        let reply = DiscoveryRequest {
            type_url: resp.type_url.clone(),
            version_info: accepted.get(t).cloned().unwrap_or_default(),
            response_nonce: resp.nonce.clone(),
            resource_names: subscribed[t].iter().cloned().collect(),
            error_detail: nack_detail(&rejected),
            ..Default::default()
        };
        if tx.send(reply).await.is_err() {
            return Ok(());
        }
        answered.insert(t);
        // The named subscriptions follow what the clusters and listeners need: the whole list
        // is sent again, with the type's latest nonce.
        for t in [ENDPOINT_TYPE, ROUTE_TYPE] {
            let want = st.wanted(t);
            if subscribed[t] == want {
                continue;
            }
            let req = DiscoveryRequest {
                type_url: t.to_string(),
                version_info: accepted.get(t).cloned().unwrap_or_default(),
                response_nonce: nonces.get(t).cloned().unwrap_or_default(),
                resource_names: want.iter().cloned().collect(),
                ..Default::default()
            };
            subscribed.insert(t, want);
            st.drop_unwanted();
            if tx.send(req).await.is_err() {
                return Ok(());
            }
        }
        synced_now(shared, &answered, &subscribed, synced);
    }
}

/// Runs the source until `shutdown` flips to true; the kernel keeps the last good state while
/// the control plane is away.
pub async fn run(o: XdsOptions, shared: Arc<Shared>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let _ = shared.xds.node_id.set(o.identity.node_id_as(PROXY_TYPE));
    let mut st = EnvoyState::default();
    let mut accepted = BTreeMap::new();
    let mut backoff = o.backoff_initial;
    loop {
        let mut synced = false;
        let stream = async {
            match o.flavour {
                AdsFlavour::Delta => run_stream(&o, &shared, &mut st, &mut synced).await,
                AdsFlavour::StateOfTheWorld => {
                    run_stream_sotw(&o, &shared, &mut st, &mut accepted, &mut synced).await
                }
            }
        };
        let r = tokio::select! {
            r = stream => r,
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

#[cfg(test)]
mod tests {
    use super::*;
    use kmesh_proto::envoy::{cluster as pc, endpoint as pe};
    use kmesh_proto::prost::Message as _;

    fn any(t: &str, bytes: Vec<u8>) -> kmesh_proto::Any {
        kmesh_proto::Any { type_url: t.into(), value: bytes }
    }

    fn cds(version: &str, clusters: &[pc::Cluster]) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: version.into(),
            type_url: CLUSTER_TYPE.into(),
            resources: clusters.iter().map(|c| any(CLUSTER_TYPE, c.encode_to_vec())).collect(),
            nonce: "n".into(),
            ..Default::default()
        }
    }

    fn cluster(name: &str) -> pc::Cluster {
        pc::Cluster { name: name.into(), ..Default::default() }
    }

    fn names(st: &EnvoyState) -> Vec<&str> {
        st.held.clusters.keys().map(|s| s.as_str()).collect()
    }

    /// A state-of-the-world CDS response is the whole set: what it leaves out goes, a malformed
    /// resource keeps what was held under its name, and a resource with no readable name
    /// removes nothing. EDS responses only add.
    #[test]
    fn state_of_the_world_responses_remove_what_they_leave_out_and_nothing_on_a_guess() {
        let mut st = EnvoyState::default();
        let node = NodeInfo::default();
        let ok = |_: &Model, _: &ModelKeys| Ok(());
        assert!(st.handle_sotw(&node, &cds("1", &[cluster("a"), cluster("b"), cluster("c")]), ok).is_empty());
        assert_eq!(names(&st), ["a", "b", "c"]);
        // c left out: removed. b malformed (an unknown lb_policy): NACKed, kept.
        let bad_b = pc::Cluster { lb_policy: 99, ..cluster("b") };
        let rejected = st.handle_sotw(&node, &cds("2", &[cluster("a"), bad_b]), ok);
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert!(rejected[0].starts_with("cluster b:"), "{rejected:?}");
        assert_eq!(names(&st), ["a", "b"]);
        // A resource that does not decode: nothing is removed on a guess.
        let mut resp = cds("3", &[]);
        resp.resources.push(any(CLUSTER_TYPE, vec![0xff, 0xff]));
        let rejected = st.handle_sotw(&node, &resp, ok);
        assert!(rejected.iter().any(|r| r.contains("nothing held was removed")), "{rejected:?}");
        assert_eq!(names(&st), ["a", "b"]);
        // The whole set empty: everything goes.
        assert!(st.handle_sotw(&node, &cds("4", &[]), ok).is_empty());
        assert!(names(&st).is_empty());
        // EDS carries what is named; what it leaves out stays.
        let eds = |names: &[&str]| DiscoveryResponse {
            version_info: "5".into(),
            type_url: ENDPOINT_TYPE.into(),
            resources: names
                .iter()
                .map(|n| {
                    let a = pe::ClusterLoadAssignment { cluster_name: n.to_string(), ..Default::default() };
                    any(ENDPOINT_TYPE, a.encode_to_vec())
                })
                .collect(),
            nonce: "n".into(),
            ..Default::default()
        };
        assert!(st.handle_sotw(&node, &eds(&["x", "y"]), ok).is_empty());
        assert!(st.handle_sotw(&node, &eds(&["y"]), ok).is_empty());
        assert_eq!(st.held.assignments.keys().collect::<Vec<_>>(), ["x", "y"]);
        // A refused apply leaves nothing of the response.
        let rejected = st.handle_sotw(&node, &cds("6", &[cluster("z")]), |_, _| Err("full".into()));
        assert_eq!(rejected, ["not applied: full"]);
        assert!(names(&st).is_empty());
    }
}
