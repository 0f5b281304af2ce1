//! The daemon's side of the CNI plugin: a root-only Unix socket where `kmesh-cni` hands over
//! each new pod's network namespace (one JSON line each way), and the upkeep of the plugin's
//! entry in the node's CNI configuration: chained after the primary plugin, chained again
//! whenever the primary plugin rewrites its file, removed when the daemon exits.
//!
//! The decision stays with the Kubernetes source: an ADD leaves the namespace as a hint for the
//! pod and waits for the next reconcile to enroll it (or to say why not).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kmesh_cni::{Request, Response, conflist};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::admin::Shared;

/// Where a pod stands, as the last reconcile left it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Enrolled(PathBuf),
    Skipped(String),
    /// In the mesh, namespace not found yet.
    Pending,
}

/// Between the CNI socket and the Kubernetes source, keyed by workload uid.
#[derive(Debug, Default)]
pub struct CniLink {
    pub hints: Mutex<BTreeMap<String, PathBuf>>,
    pub outcomes: Mutex<BTreeMap<String, Outcome>>,
    pub kick: tokio::sync::Notify,
}

#[derive(Clone, Debug)]
pub struct CniOptions {
    pub socket: PathBuf,
    /// The node's CNI configuration directory (`/etc/cni/net.d`); `None`: the plugin is not
    /// chained by the daemon.
    pub conf_dir: Option<PathBuf>,
    /// Where the plugin binary is installed (`/opt/cni/bin`), copied from `plugin`.
    pub bin_dir: Option<PathBuf>,
    pub plugin: PathBuf,
    /// Namespaces the plugin passes through without asking (the daemon's own, kube-system):
    /// they must start while the daemon is down.
    pub exclude_namespaces: Vec<String>,
}

impl CniOptions {
    /// The entry chained into the conflist.
    pub fn entry(&self) -> Value {
        serde_json::json!({
            "type": kmesh_cni::PLUGIN_TYPE,
            "socket": self.socket,
            "exclude_namespaces": self.exclude_namespaces,
        })
    }
}

/// How long an ADD waits for the Kubernetes source to see the pod and decide.
const ADD_WAIT: Duration = Duration::from_secs(10);

async fn handle(req: Request, cluster_id: &str, link: &CniLink, shared: &Shared) -> Response {
    let uid = kmesh_k8s::rules::workload_uid(cluster_id, &req.namespace, &req.name);
    let netns = PathBuf::from(&req.netns);
    let p = netns.clone();
    let cookie = tokio::task::spawn_blocking(move || crate::netns::cookie_of(&p)).await.expect("netns task");
    match req.command.as_str() {
        "ADD" => {
            if let Err(e) = cookie {
                return Response { error: Some(e.to_string()), ..Default::default() };
            }
            link.hints.lock().unwrap().insert(uid.clone(), netns.clone());
            link.kick.notify_one();
            let deadline = Instant::now() + ADD_WAIT;
            while Instant::now() < deadline {
                match link.outcomes.lock().unwrap().get(&uid) {
                    Some(Outcome::Enrolled(p)) if *p == netns => {
                        return Response { enrolled: true, ..Default::default() };
                    }
                    Some(Outcome::Skipped(r)) => {
                        link.hints.lock().unwrap().remove(&uid);
                        return Response { reason: Some(r.clone()), ..Default::default() };
                    }
                    _ => {}
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            link.hints.lock().unwrap().remove(&uid);
            Response {
                error: Some(format!("pod {uid} was not seen by this node's watch within {ADD_WAIT:?}")),
                ..Default::default()
            }
        }
        "DEL" => {
            link.hints.lock().unwrap().remove(&uid);
            if let Ok(c) = cookie {
                let s = shared.mesh.lock().unwrap_or_else(|p| p.into_inner()).enrolled().contains_key(&c);
                if s {
                    let r = {
                        let mut m = shared.mesh.lock().unwrap_or_else(|p| p.into_inner());
                        m.unenroll(c)
                    };
                    match r {
                        Ok(_) => tracing::info!(workload = %uid, netns = %req.netns, "CNI DEL: unenrolled"),
                        Err(e) => return Response { error: Some(e.to_string()), ..Default::default() },
                    }
                }
            }
            link.kick.notify_one();
            Response::default()
        }
        other => Response { error: Some(format!("unknown command {other:?}")), ..Default::default() },
    }
}

/// Serves the plugin on `socket` (mode 0600) until the task is aborted.
pub async fn serve(
    socket: PathBuf,
    cluster_id: String,
    link: Arc<CniLink>,
    shared: Arc<Shared>,
) -> anyhow::Result<()> {
    let listener = crate::admin::bind_socket(&socket)?;
    tracing::info!(socket = %socket.display(), "CNI plugin socket listening");
    loop {
        let (stream, _) = listener.accept().await?;
        let (link, shared, cluster_id) = (link.clone(), shared.clone(), cluster_id.clone());
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            // One bounded request line.
            let mut r = BufReader::new(r.take(64 * 1024));
            if r.read_line(&mut line).await.is_err() {
                return;
            }
            let resp = match serde_json::from_str::<Request>(&line) {
                Ok(req) => handle(req, &cluster_id, &link, &shared).await,
                Err(e) => Response { error: Some(format!("bad request: {e}")), ..Default::default() },
            };
            let mut out = serde_json::to_vec(&resp).unwrap_or_default();
            out.push(b'\n');
            let _ = w.write_all(&out).await;
        });
    }
}

use tokio::io::AsyncReadExt as _;

/// Copies the plugin binary into `bin_dir` when it differs (through a temporary file and a
/// rename, so a runtime never executes a half-written binary).
pub fn install_binary(plugin: &Path, bin_dir: &Path) -> std::io::Result<bool> {
    let dest = bin_dir.join(kmesh_cni::PLUGIN_TYPE);
    let new = std::fs::read(plugin)?;
    if std::fs::read(&dest).ok().as_deref() == Some(&new[..]) {
        return Ok(false);
    }
    std::fs::create_dir_all(bin_dir)?;
    let tmp = bin_dir.join(format!(".{}.tmp", kmesh_cni::PLUGIN_TYPE));
    std::fs::write(&tmp, &new)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, &dest)?;
    Ok(true)
}

fn write_json(path: &Path, v: &Value) -> std::io::Result<()> {
    let tmp =
        path.with_file_name(format!(".{}.kmesh-tmp", path.file_name().unwrap_or_default().to_string_lossy()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(v)?)?;
    std::fs::rename(&tmp, path)
}

/// Chains `entry` into the primary conflist of `dir` if it is not there as given. Returns the
/// file written, if one was. A `.conf` becomes a `.conflist` (the old file is removed).
pub fn ensure_chained(dir: &Path, entry: &Value) -> Result<Option<PathBuf>, String> {
    let Some(primary) = conflist::primary(dir) else {
        return Err(format!(
            "no CNI configuration in {} yet (the primary network plugin writes one)",
            dir.display()
        ));
    };
    let text =
        std::fs::read_to_string(&primary).map_err(|e| format!("cannot read {}: {e}", primary.display()))?;
    let conf: Value =
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", primary.display()))?;
    let Some(chained) = conflist::chain(&conf, entry).map_err(|e| format!("{}: {e}", primary.display()))?
    else {
        return Ok(None);
    };
    let target = if primary.extension().and_then(|e| e.to_str()) == Some("conflist") {
        primary.clone()
    } else {
        primary.with_extension("conflist")
    };
    write_json(&target, &chained).map_err(|e| format!("cannot write {}: {e}", target.display()))?;
    if target != primary {
        let _ = std::fs::remove_file(&primary);
    }
    Ok(Some(target))
}

/// Removes the plugin's entry from every conflist of `dir`; returns the files changed.
pub fn unchain_all(dir: &Path) -> Vec<PathBuf> {
    let mut changed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return changed };
    for e in entries.flatten() {
        let p = e.path();
        let Some(conf) =
            std::fs::read_to_string(&p).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok())
        else {
            continue;
        };
        if let Some(out) = conflist::unchain(&conf)
            && write_json(&p, &out).is_ok()
        {
            changed.push(p);
        }
    }
    changed
}

/// Keeps the plugin installed and chained: checks the configuration directory every second
/// and chains again when the primary plugin rewrote its file. Sets `chained` for readiness.
pub async fn keep_chained(opts: CniOptions, chained: Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::Ordering;
    let Some(dir) = opts.conf_dir.clone() else { return };
    if let Some(bin) = &opts.bin_dir {
        match install_binary(&opts.plugin, bin) {
            Ok(true) => tracing::info!(dir = %bin.display(), "CNI plugin binary installed"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(from = %opts.plugin.display(), to = %bin.display(), error = %e, "cannot install the CNI plugin binary")
            }
        }
    }
    let entry = opts.entry();
    let mut last_error: Option<String> = None;
    let mut writes = 0u64;
    loop {
        let d = dir.clone();
        let e = entry.clone();
        let r = tokio::task::spawn_blocking(move || ensure_chained(&d, &e)).await.expect("cni task");
        match r {
            Ok(written) => {
                if let Some(p) = written {
                    writes += 1;
                    if writes == 1 {
                        tracing::info!(file = %p.display(), "CNI plugin chained after the primary plugin");
                    } else {
                        tracing::warn!(file = %p.display(), "the CNI configuration was rewritten without the plugin: chained again");
                    }
                }
                chained.store(true, Ordering::SeqCst);
                last_error = None;
            }
            Err(e) => {
                chained.store(false, Ordering::SeqCst);
                if last_error.as_ref() != Some(&e) {
                    tracing::error!(error = %e, "cannot chain the CNI plugin");
                    last_error = Some(e);
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
