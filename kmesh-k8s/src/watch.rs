//! Watches (not polls) of this node, every namespace and the pods scheduled on this node,
//! each kept in a reflector store. A watch that breaks (the API server restarted, a network
//! blip) is resumed with backoff while the stores keep the last state, so nothing is
//! unenrolled because the API server went away; the next full list replaces the stores, so
//! changes made meanwhile are seen.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Config};

use crate::rules::{self, Decision};

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("cannot read the kubeconfig {path}: {reason}")]
    Kubeconfig { path: String, reason: String },
    #[error("no Kubernetes configuration: {0} (give --kubeconfig, or run in a pod with a service account)")]
    Infer(String),
    #[error("cannot build a Kubernetes client: {0}")]
    Client(String),
    #[error("{verb} {what}: {source}")]
    Api {
        verb: &'static str,
        what: String,
        #[source]
        source: kube::Error,
    },
}

/// A client from `kubeconfig`, or else as kube infers it (in-cluster service account, then
/// `$KUBECONFIG`, then `~/.kube/config`).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, K8sError> {
    let config = match kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .map_err(|e| K8sError::Kubeconfig { path: p.display().to_string(), reason: e.to_string() })?;
            Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| K8sError::Kubeconfig { path: p.display().to_string(), reason: e.to_string() })?
        }
        None => Config::infer().await.map_err(|e| K8sError::Infer(e.to_string()))?,
    };
    Client::try_from(config).map_err(|e| K8sError::Client(e.to_string()))
}

/// One pod of this node, as the daemon needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    /// `metadata.uid` (names its cgroups and comes with CNI calls).
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub decision: Decision,
    /// Carries `kmesh.net/redirection: enabled`.
    pub annotated: bool,
    /// The pod has an IP (its sandbox and network are up).
    pub has_ip: bool,
}

/// This node's locality, from its `topology.kubernetes.io/{region,zone}` and
/// `topology.istio.io/subzone` labels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeLocality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

pub const REGION: &str = "topology.kubernetes.io/region";
pub const ZONE: &str = "topology.kubernetes.io/zone";
pub const SUBZONE: &str = "topology.istio.io/subzone";

/// What the watches see now.
#[derive(Clone, Debug, Default)]
pub struct NodeView {
    /// `None` while the Node object is not known (or carries none of the labels).
    pub locality: Option<NodeLocality>,
    pub pods: Vec<PodView>,
}

/// Health of the watches, for readiness and the config dump.
#[derive(Debug, Default)]
pub struct WatchHealth {
    /// Every watch has listed once (the stores are complete).
    pub synced: AtomicBool,
    /// Every watch is streaming (false from a watch error until it resumes).
    pub connected: AtomicBool,
    /// The API server refused a watch (401/403: a missing permission or a bad token), which
    /// retrying will not mend; cleared when every watch streams again.
    pub denied: AtomicBool,
    pub last_error: Mutex<Option<String>>,
}

/// A refusal (401/403) rather than an outage.
fn is_denied(e: &watcher::Error) -> bool {
    let code = match e {
        watcher::Error::InitialListFailed(k)
        | watcher::Error::WatchStartFailed(k)
        | watcher::Error::WatchFailed(k) => match k {
            kube::Error::Api(s) => s.code,
            _ => 0,
        },
        watcher::Error::WatchError(s) => s.code,
        watcher::Error::NoResourceVersion => 0,
    };
    code == 401 || code == 403
}

pub struct ClusterWatch {
    pub client: Client,
    pub node_name: String,
    nodes: Store<Node>,
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    changed: Arc<tokio::sync::Notify>,
    pub health: Arc<WatchHealth>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for ClusterWatch {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Retry pacing of a broken watch: 500 ms doubling to 8 s, each delay with up to a quarter
/// of jitter so the nodes of a cluster do not come back in step. kube's default climbs to
/// 30 s, which after an API server outage of half a minute leaves a node blind to changes for
/// up to another half minute.
#[derive(Clone, Debug)]
pub struct WatchBackoff {
    next: std::time::Duration,
}

impl WatchBackoff {
    pub const MIN: std::time::Duration = std::time::Duration::from_millis(500);
    pub const MAX: std::time::Duration = std::time::Duration::from_secs(8);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: Self::MIN }
    }
}

impl Iterator for WatchBackoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<Self::Item> {
        use std::hash::{BuildHasher, RandomState};
        let d = self.next;
        self.next = (d * 2).min(Self::MAX);
        let jitter = RandomState::new().hash_one(std::time::Instant::now()) % (d.as_millis() as u64 / 4 + 1);
        Some(d + std::time::Duration::from_millis(jitter))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::MIN;
    }
}

/// Drives one reflector: every event wakes the daemon; errors are recorded and retried
/// with backoff (the store keeps what it had).
fn drive<K>(
    kind: &'static str,
    api: Api<K>,
    config: watcher::Config,
    changed: Arc<tokio::sync::Notify>,
    health: Arc<WatchHealth>,
    ok: Arc<AtomicBool>,
) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config)).backoff(WatchBackoff::default());
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(_) => {
                    if !ok.swap(true, Ordering::SeqCst) {
                        tracing::info!(kind, "watch streaming");
                    }
                }
                Err(e) => {
                    if ok.swap(false, Ordering::SeqCst) {
                        tracing::warn!(kind, error = %e, "watch broke; resuming with backoff (the last state stays in force)");
                    }
                    if is_denied(&e) {
                        health.denied.store(true, Ordering::SeqCst);
                    }
                    *health.last_error.lock().unwrap() = Some(format!("{kind}: {e}"));
                }
            }
            changed.notify_one();
        }
    });
    (reader, task)
}

impl ClusterWatch {
    /// Starts the watches of `node_name`, every namespace and the pods on `node_name`.
    pub fn start(client: Client, node_name: &str) -> Self {
        let changed = Arc::new(tokio::sync::Notify::new());
        let health = Arc::new(WatchHealth::default());
        let oks: Vec<Arc<AtomicBool>> = (0..3).map(|_| Arc::new(AtomicBool::new(false))).collect();
        let (nodes, t1) = drive(
            "Node",
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            changed.clone(),
            health.clone(),
            oks[0].clone(),
        );
        let (namespaces, t2) = drive(
            "Namespace",
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
            changed.clone(),
            health.clone(),
            oks[1].clone(),
        );
        let (pods, t3) = drive(
            "Pod",
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={node_name}")),
            changed.clone(),
            health.clone(),
            oks[2].clone(),
        );
        // Health: synced once every store is ready; connected while every watch streams.
        let t4 = {
            let (h, n, ns, p, changed) =
                (health.clone(), nodes.clone(), namespaces.clone(), pods.clone(), changed.clone());
            tokio::spawn(async move {
                let _ = n.wait_until_ready().await;
                let _ = ns.wait_until_ready().await;
                let _ = p.wait_until_ready().await;
                h.synced.store(true, Ordering::SeqCst);
                changed.notify_one();
                loop {
                    let all = oks.iter().all(|o| o.load(Ordering::SeqCst));
                    if h.connected.swap(all, Ordering::SeqCst) != all && all {
                        *h.last_error.lock().unwrap() = None;
                        h.denied.store(false, Ordering::SeqCst);
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            })
        };
        Self {
            client,
            node_name: node_name.to_string(),
            nodes,
            namespaces,
            pods,
            changed,
            health,
            tasks: vec![t1, t2, t3, t4],
        }
    }

    /// Waits until a watch saw a change (or `timeout` passed).
    pub async fn changed(&self, timeout: std::time::Duration) {
        let _ = tokio::time::timeout(timeout, self.changed.notified()).await;
    }

    pub fn synced(&self) -> bool {
        self.health.synced.load(Ordering::SeqCst)
    }

    /// This node's locality and pods, with the decision for each pod.
    pub fn view(&self) -> NodeView {
        let locality = self
            .nodes
            .state()
            .into_iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.node_name.as_str()))
            .and_then(|n| {
                let l = n.metadata.labels.as_ref()?;
                let get = |k: &str| l.get(k).cloned().unwrap_or_default();
                let loc = NodeLocality { region: get(REGION), zone: get(ZONE), subzone: get(SUBZONE) };
                (loc != NodeLocality::default()).then_some(loc)
            });
        let ns_labels: BTreeMap<String, Option<BTreeMap<String, String>>> = self
            .namespaces
            .state()
            .into_iter()
            .filter_map(|n| Some((n.metadata.name.clone()?, n.metadata.labels.clone())))
            .collect();
        let empty = BTreeMap::new();
        let mut pods: Vec<PodView> = self
            .pods
            .state()
            .into_iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(self.node_name.as_str()))
            .filter_map(|p| {
                let namespace = p.metadata.namespace.clone()?;
                let labels = ns_labels.get(&namespace).map(|l| l.as_ref().unwrap_or(&empty));
                Some(PodView {
                    uid: p.metadata.uid.clone()?,
                    name: p.metadata.name.clone()?,
                    decision: rules::decide(&p, labels),
                    annotated: p
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(rules::REDIRECTION))
                        .is_some_and(|v| v == rules::REDIRECTION_ENABLED),
                    has_ip: p
                        .status
                        .as_ref()
                        .and_then(|s| s.pod_ip.as_deref())
                        .is_some_and(|ip| !ip.is_empty()),
                    namespace,
                })
            })
            .collect();
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        NodeView { locality, pods }
    }

    /// Sets (`true`) or removes the `kmesh.net/redirection` annotation of a pod, through the
    /// `pods/status` subresource (which needs less privilege than patching pods).
    pub async fn set_redirection(&self, namespace: &str, name: &str, enabled: bool) -> Result<(), K8sError> {
        let api = Api::<Pod>::namespaced(self.client.clone(), namespace);
        let value =
            if enabled { serde_json::json!(rules::REDIRECTION_ENABLED) } else { serde_json::Value::Null };
        let patch = serde_json::json!({ "metadata": { "annotations": { rules::REDIRECTION: value } } });
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ()).map_err(
            |source| K8sError::Api {
                verb: "patch status of pod",
                what: format!("{namespace}/{name}"),
                source,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::utils::Backoff;

    #[test]
    fn a_broken_watch_is_retried_within_eight_seconds_and_resets() {
        let mut b = WatchBackoff::default();
        let delays: Vec<_> = (&mut b).take(8).collect();
        assert!(delays[0] >= WatchBackoff::MIN && delays[0] <= WatchBackoff::MIN * 5 / 4, "{delays:?}");
        assert!(delays.windows(2).take(4).all(|w| w[1] > w[0]), "grows: {delays:?}");
        assert!(delays.iter().all(|d| *d <= WatchBackoff::MAX * 5 / 4), "bounded: {delays:?}");
        b.reset();
        assert!(b.next().unwrap() <= WatchBackoff::MIN * 5 / 4);
    }
}
