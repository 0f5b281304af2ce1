//! The Kubernetes source's wiring: turns what the watches of this node see (`kmesh-k8s`) into
//! enrollments, the pods' `kmesh.net/redirection` annotations and this node's locality.
//!
//! Enrollments are keyed by Istio's workload uid of the pod (`<cluster>//Pod/<ns>/<name>`), the
//! same key the enrollment carries into the state file, so a restarted daemon recognises the
//! enrollments it made. Only enrollments with such a uid are this source's: namespaces
//! enrolled by hand with another uid are left alone.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kmesh_k8s::procfs;
use kmesh_k8s::rules::{self, Decision};
use kmesh_k8s::watch::{ClusterWatch, NodeLocality, NodeView};

use crate::admin::Shared;
use crate::cni::{CniLink, Outcome};
use crate::mesh::Mesh;
use crate::model::Locality;

#[derive(Clone, Debug)]
pub struct K8sOptions {
    /// `None`: in-cluster configuration (the pod's service account).
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    /// The cluster's id in workload uids (`CLUSTER_ID`, `Kubernetes` by default).
    pub cluster_id: String,
    /// The host's `/proc` (the daemon needs the host's pid namespace).
    pub proc_root: PathBuf,
    /// Where runtimes bind-mount pod network namespaces.
    pub netns_dirs: Vec<PathBuf>,
}

impl K8sOptions {
    pub fn new(kubeconfig: Option<PathBuf>, node_name: &str, cluster_id: &str) -> Self {
        Self {
            kubeconfig,
            node_name: node_name.to_string(),
            cluster_id: cluster_id.to_string(),
            proc_root: PathBuf::from("/proc"),
            netns_dirs: procfs::NETNS_DIRS.iter().map(PathBuf::from).collect(),
        }
    }
}

/// One pod this source enrolled.
#[derive(Clone, Debug)]
struct Managed {
    /// `metadata.uid` of the pod enrolled (`None`: adopted from an earlier run, not yet
    /// matched); a pod recreated under the same name is another pod.
    pod_uid: Option<String>,
    cookie: u64,
    netns: PathBuf,
}

/// What the source knows and did, for `/debug/config_dump`.
fn dump(
    opts: &K8sOptions,
    watch: &ClusterWatch,
    view: &NodeView,
    managed: &BTreeMap<String, Managed>,
    annotation_errors: &BTreeMap<String, String>,
) -> serde_json::Value {
    use std::sync::atomic::Ordering;
    serde_json::json!({
        "node": opts.node_name,
        "cluster_id": opts.cluster_id,
        "synced": watch.synced(),
        "connected": watch.health.connected.load(Ordering::SeqCst),
        "last_error": watch.health.last_error.lock().unwrap().clone(),
        "node_locality": view.locality.as_ref().map(|l| serde_json::json!({"region": l.region, "zone": l.zone, "subzone": l.subzone})),
        "pods": view.pods.iter().map(|p| {
            let uid = rules::workload_uid(&opts.cluster_id, &p.namespace, &p.name);
            let m = managed.get(&uid);
            serde_json::json!({
                "namespace": p.namespace,
                "name": p.name,
                "workload": uid,
                "in_mesh": p.decision == Decision::Enroll,
                "reason": match p.decision { Decision::Enroll => None, Decision::Skip(r) => Some(r.to_string()) },
                "enrolled": m.is_some(),
                "netns": m.map(|m| m.netns.clone()),
                "annotated": p.annotated,
                // Why the annotation could not be written (e.g. no `patch` on pods/status).
                "annotation_error": annotation_errors.get(&format!("{}/{}", p.namespace, p.name)),
            })
        }).collect::<Vec<_>>(),
    })
}

/// Brings the mesh in line with `view`: unenrolls what left, enrolls what joined (finding the
/// namespace from the pod's processes), and sets this node's locality. Returns the pods whose
/// annotation must change: (namespace, name, enabled).
fn reconcile(
    opts: &K8sOptions,
    mesh: &mut Mesh,
    view: &NodeView,
    managed: &mut BTreeMap<String, Managed>,
    link: &CniLink,
) -> Vec<(String, String, bool)> {
    let locality = view.locality.as_ref().map(|l: &NodeLocality| Locality {
        region: l.region.as_str().into(),
        zone: l.zone.as_str().into(),
        subzone: l.subzone.as_str().into(),
    });
    if let Err(e) = mesh.set_node_locality(locality.clone()) {
        tracing::error!(error = %e, ?locality, "cannot apply this node's locality; the previous one stays");
    }
    // Enrollments that are gone from the mesh (the namespace disappeared and the liveness
    // check took it out) are forgotten, so a pod still running is found again.
    managed.retain(|_, m| mesh.enrolled().contains_key(&m.cookie));

    let desired: BTreeMap<String, &kmesh_k8s::PodView> = view
        .pods
        .iter()
        .filter(|p| p.decision == Decision::Enroll)
        .map(|p| (rules::workload_uid(&opts.cluster_id, &p.namespace, &p.name), p))
        .collect();
    let hints = link.hints.lock().unwrap().clone();
    // Leave: not wanted any more, another pod under the same name, or a new sandbox of the
    // same pod (the CNI plugin handed over another namespace).
    let leaving: Vec<String> = managed
        .iter()
        .filter(|(uid, m)| match desired.get(*uid) {
            None => true,
            Some(p) => {
                m.pod_uid.as_ref().is_some_and(|u| *u != p.uid)
                    || hints.get(*uid).is_some_and(|h| *h != m.netns)
            }
        })
        .map(|(uid, _)| uid.clone())
        .collect();
    for uid in leaving {
        let m = managed.remove(&uid).expect("listed above");
        match mesh.unenroll(m.cookie) {
            Ok(_) => {
                tracing::info!(workload = %uid, netns = %m.netns.display(), "pod left the mesh: unenrolled")
            }
            Err(e) => {
                tracing::error!(workload = %uid, error = %e, "cannot unenroll a pod that left the mesh; retrying");
                managed.insert(uid, m);
            }
        }
    }
    // Adopted enrollments take the uid of the pod now under their name.
    for (uid, m) in managed.iter_mut() {
        if m.pod_uid.is_none() {
            m.pod_uid = desired.get(uid).map(|p| p.uid.clone());
        }
    }
    // Join: find each new pod's namespace from its processes.
    let joining: Vec<(&String, &&kmesh_k8s::PodView)> =
        desired.iter().filter(|(uid, _)| !managed.contains_key(*uid)).collect();
    if !joining.is_empty() {
        // The CNI plugin's namespace first; else the pod's processes.
        let wanted: BTreeSet<String> =
            joining.iter().filter(|(uid, _)| !hints.contains_key(*uid)).map(|(_, p)| p.uid.clone()).collect();
        let procs = procfs::pod_processes(&opts.proc_root, &wanted);
        let own = crate::netns::current_cookie().ok();
        let me = crate::netns::path_of_pid(std::process::id());
        for (uid, p) in joining {
            let path = match hints.get(uid) {
                Some(h) => h.clone(),
                None => {
                    let Some(pids) = procs.get(&p.uid) else {
                        tracing::debug!(workload = %uid, "pod in the mesh has no process yet; waiting");
                        continue;
                    };
                    let Some(path) = procfs::netns_of(&opts.proc_root, pids, &opts.netns_dirs, &me) else {
                        continue;
                    };
                    path
                }
            };
            let cookie = match crate::netns::cookie_of(&path) {
                Ok(c) if Some(c) != own => c,
                Ok(_) => continue,
                Err(e) => {
                    // The pod is being torn down (its processes exited after the scan, or the
                    // namespace the CNI plugin gave is gone).
                    link.hints.lock().unwrap().remove(uid);
                    tracing::debug!(workload = %uid, error = %e, "pod namespace went away before enrollment");
                    continue;
                }
            };
            match mesh.enroll(cookie, Some(&path), Some(uid.clone())) {
                Ok(_) => {
                    tracing::info!(workload = %uid, netns = %path.display(), cookie, "pod joined the mesh: enrolled");
                    managed
                        .insert(uid.clone(), Managed { pod_uid: Some(p.uid.clone()), cookie, netns: path });
                }
                Err(e) => tracing::error!(workload = %uid, error = %e, "cannot enroll a pod; retrying"),
            }
        }
    }
    // What the CNI plugin waits for.
    {
        let mut outcomes = link.outcomes.lock().unwrap();
        outcomes.clear();
        for p in &view.pods {
            let uid = rules::workload_uid(&opts.cluster_id, &p.namespace, &p.name);
            let o = match (p.decision, managed.get(&uid)) {
                (Decision::Skip(r), _) => Outcome::Skipped(r.to_string()),
                (Decision::Enroll, Some(m)) => Outcome::Enrolled(m.netns.clone()),
                (Decision::Enroll, None) => Outcome::Pending,
            };
            outcomes.insert(uid, o);
        }
    }
    // Annotations follow what is enrolled.
    view.pods
        .iter()
        .filter_map(|p| {
            let uid = rules::workload_uid(&opts.cluster_id, &p.namespace, &p.name);
            let enrolled = managed.get(&uid).is_some_and(|m| m.pod_uid.as_deref() == Some(p.uid.as_str()));
            // A pod on its way out keeps its annotation: it is about to be gone anyway.
            let leaving = p.decision == Decision::Skip(kmesh_k8s::Reason::Terminating);
            (enrolled != p.annotated && !leaving).then(|| (p.namespace.clone(), p.name.clone(), enrolled))
        })
        .collect()
}

/// Enrollments of an earlier run that this source made (their workload uid names a pod of
/// this cluster).
fn adopt(opts: &K8sOptions, mesh: &Mesh) -> BTreeMap<String, Managed> {
    let paths: BTreeMap<u64, PathBuf> = mesh.enrolled_paths().into_iter().collect();
    mesh.enrolled()
        .iter()
        .filter_map(|(cookie, e)| {
            let uid = e.workload.as_ref()?;
            rules::pod_of_workload_uid(&opts.cluster_id, uid)?;
            Some((uid.clone(), Managed { pod_uid: None, cookie: *cookie, netns: paths.get(cookie)?.clone() }))
        })
        .collect()
}

/// Runs the source until `stop`: follows the watches and keeps the mesh in line. Namespaces of
/// pods in the mesh that have no process yet are looked for again every second.
pub async fn run(
    opts: K8sOptions,
    watch: ClusterWatch,
    shared: Arc<Shared>,
    link: Arc<CniLink>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut managed = {
        let m = shared.mesh.lock().unwrap_or_else(|p| p.into_inner());
        adopt(&opts, &m)
    };
    let mut annotation_errors: BTreeMap<String, String> = BTreeMap::new();
    if !managed.is_empty() {
        tracing::info!(pods = managed.len(), "enrollments of pods restored from the state file");
    }
    loop {
        tokio::select! {
            _ = watch.changed(Duration::from_secs(1)) => {}
            _ = link.kick.notified() => {}
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
        if !watch.synced() {
            // Not synced yet (or refused: the dump says why, e.g. a missing permission).
            let nothing = NodeView::default();
            *shared.k8s.lock().unwrap() = Some(dump(&opts, &watch, &nothing, &managed, &annotation_errors));
            continue;
        }
        let view = watch.view();
        let (s, o, v, l) = (shared.clone(), opts.clone(), view.clone(), link.clone());
        let mut m2 = std::mem::take(&mut managed);
        let (annotations, m2) = tokio::task::spawn_blocking(move || {
            let mut mesh = s.mesh.lock().unwrap_or_else(|p| p.into_inner());
            let a = reconcile(&o, &mut mesh, &v, &mut m2, &l);
            (a, m2)
        })
        .await
        .expect("kubernetes reconcile panicked");
        managed = m2;
        for (ns, name, enabled) in annotations {
            let key = format!("{ns}/{name}");
            match watch.set_redirection(&ns, &name, enabled).await {
                Ok(()) => {
                    annotation_errors.remove(&key);
                }
                // Said once per pod until it succeeds (an API server outage would repeat it
                // every second).
                Err(e) => {
                    let e = e.to_string();
                    if annotation_errors.insert(key.clone(), e.clone()).as_ref() != Some(&e) {
                        tracing::warn!(pod = %key, error = %e, "cannot update the pod's kmesh.net/redirection annotation; retrying");
                    }
                }
            }
        }
        annotation_errors
            .retain(|k, _| view.pods.iter().any(|p| *k == format!("{}/{}", p.namespace, p.name)));
        *shared.k8s.lock().unwrap() = Some(dump(&opts, &watch, &view, &managed, &annotation_errors));
    }
}
