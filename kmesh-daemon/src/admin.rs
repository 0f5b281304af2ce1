//! The admin API, on two listeners. A Unix socket only root can open (`/run/kmesh/admin.sock`)
//! serves everything, including what changes the data plane: enrollment, log levels,
//! monitoring switches. The loopback TCP address serves only what reads state (readiness,
//! config dump, metrics, maps, authorization status), so that a local process or a
//! host-network pod that can reach 127.0.0.1 cannot take a pod out of the mesh or silence
//! its logs. Also a small blocking client for the CLI.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::mesh::Mesh;
use crate::metrics::XdsHealth;
use crate::netns;
use crate::telemetry::LogFormat;

/// A readiness condition: asked at each `/debug/ready`.
pub type Condition = Box<dyn Fn() -> bool + Send + Sync>;

/// What the handlers share with the daemon loop.
pub struct Shared {
    pub mesh: Mutex<Mesh>,
    /// The observer's lock is not the mesh's: scrapes and drains take only this one.
    pub observer: Arc<Mutex<crate::observe::Observer>>,
    /// Programs attached and the first configuration applied.
    pub ready: AtomicBool,
    /// The last configuration error, if the file currently on disk was refused.
    pub config_error: Mutex<Option<String>>,
    pub config_path: PathBuf,
    pub xds: XdsHealth,
    /// The Kubernetes source's view (pods of this node, decisions, enrollments), when it runs.
    pub k8s: Mutex<Option<serde_json::Value>>,
    /// The kernel-native source's report (what each filter chain became), when it runs.
    pub envoy: Mutex<Option<serde_json::Value>>,
    /// More conditions of readiness, by name (the Kubernetes watches synced, the CNI plugin
    /// chained): `/debug/ready` answers 200 only when all hold.
    pub conditions: Mutex<Vec<(&'static str, Condition)>>,
    /// The pods' DNS proxies (`None`: `--dns-proxy off`).
    pub dns: Option<Arc<crate::dns::DnsProxy>>,
}

pub type AppState = Arc<Shared>;

/// The Prometheus scrape endpoint, as Kmesh serves it (`:15020/status/metric`, and `/metrics`).
pub fn metrics_router(state: AppState) -> Router {
    Router::new().route("/status/metric", get(metrics)).route("/metrics", get(metrics)).with_state(state)
}

/// Everything, for the root-only Unix socket.
pub fn router(state: AppState) -> Router {
    routes(state, None)
}

/// What reads state, for the loopback address; the mutating endpoints answer 403 there,
/// naming the socket that serves them.
pub fn read_only_router(state: AppState, socket: &Path) -> Router {
    let msg = format!(
        "this endpoint changes the data plane and is served only on the admin socket {} (root only); use `kmeshctl --admin-socket` or `kmesh-daemon enroll --admin-socket`",
        socket.display()
    );
    routes(state, Some(msg))
}

/// The one route table; with `refuse_writes`, every mutating endpoint answers 403 with it.
fn routes(state: AppState, refuse_writes: Option<String>) -> Router {
    let write = |m: MethodRouter<AppState>| match refuse_writes.clone() {
        None => m,
        Some(msg) => post(move || async move { error(StatusCode::FORBIDDEN, msg) }),
    };
    Router::new()
        .route("/version", get(version))
        .route("/debug/ready", get(ready))
        .route("/debug/config_dump", get(config_dump))
        .route("/metrics", get(metrics))
        .route("/debug/bpf_maps", get(bpf_maps))
        .route("/debug/loggers", get(get_loggers).merge(write(post(set_loggers))))
        .route("/debug/monitoring", get(get_monitoring).merge(write(post(set_monitoring))))
        .route("/debug/authz", get(authz_status))
        .route("/debug/dns", get(dns_status))
        .route("/v1/enroll", write(post(enroll)))
        .route("/v1/unenroll", write(post(unenroll)))
        .with_state(state)
}

/// Binds the admin socket at `path`: its directory is created root-only (0700) if missing, a
/// stale socket left by an earlier run is replaced, and the socket itself is 0600.
pub fn bind_socket(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket; not replacing it", path.display()),
            ));
        }
        Err(_) => {}
    }
    let l = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

async fn version() -> impl IntoResponse {
    Json(serde_json::json!({
        "name": "kmesh-daemon",
        "version": env!("CARGO_PKG_VERSION"),
        "map_layout": kmesh_common::MAP_LAYOUT_VERSION,
    }))
}

async fn ready(State(s): State<AppState>) -> Response {
    let failing: Vec<&str> =
        s.conditions.lock().unwrap().iter().filter(|(_, holds)| !holds()).map(|(n, _)| *n).collect();
    if s.ready.load(Ordering::SeqCst) && !failing.is_empty() {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", failing.join(", "))).into_response()
    } else if s.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: configuration not applied yet\n").into_response()
    }
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

/// Runs `f` on the observer off the async threads (never behind an apply).
async fn with_observer<T: Send + 'static>(
    s: &AppState,
    f: impl FnOnce(&mut crate::observe::Observer) -> T + Send + 'static,
) -> T {
    let s = s.clone();
    tokio::task::spawn_blocking(move || f(&mut s.observer.lock().unwrap_or_else(|p| p.into_inner())))
        .await
        .expect("admin task panicked")
}

/// Runs `f` on the mesh off the async threads (a large apply can take a while).
async fn with_mesh<T: Send + 'static>(s: &AppState, f: impl FnOnce(&mut Mesh) -> T + Send + 'static) -> T {
    let s = s.clone();
    tokio::task::spawn_blocking(move || f(&mut s.mesh.lock().unwrap_or_else(|p| p.into_inner())))
        .await
        .expect("admin task panicked")
}

async fn config_dump(State(s): State<AppState>) -> Response {
    let err = s.config_error.lock().unwrap().clone();
    let path = s.config_path.clone();
    let xds = s.xds.enabled.load(Ordering::Relaxed).then(|| {
        serde_json::json!({
            "node_id": s.xds.node_id.get(),
            "connected": s.xds.connected.load(Ordering::Relaxed),
            "last_error": s.xds.last_error.lock().unwrap().clone(),
            "waiting_for": s.xds.waiting_for.lock().unwrap().clone(),
            "resyncs_without_versions": s.xds.resyncs_without_versions.load(Ordering::Relaxed),
        })
    });
    let k8s = s.k8s.lock().unwrap().clone();
    let envoy = s.envoy.lock().unwrap().clone();
    let dump = with_mesh(&s, move |m| {
        serde_json::json!({
            "config_path": path,
            "config_error": err,
            "xds": xds,
            "kubernetes": k8s,
            "envoy": envoy,
            "model": m.model(),
            "frontend_conflicts": m.frontend_conflicts(),
            "outlier": {
                "ejected": m.outlier.status(std::time::Instant::now()),
                "ejections_total": m.outlier.ejections_total,
            },
            "enrolled": m.enrolled().iter().map(|(c, e)| serde_json::json!({"netns_cookie": c, "workload": e.workload})).collect::<Vec<_>>(),
            "maps": {
                "entries": m.dataplane().applied().counts(),
                "capacities": m.dataplane().capacities(),
                "ceilings": m.dataplane().ceilings(),
                "memory_bytes": crate::kernel::map_memory(m.dataplane().layout_dir()).into_iter().collect::<std::collections::BTreeMap<_, _>>(),
                "pin_dir": m.dataplane().pin_dir(),
            },
            "counters": m.counters,
        })
    })
    .await;
    Json(dump).into_response()
}

async fn bpf_maps(State(s): State<AppState>) -> Response {
    match with_mesh(&s, |m| m.dump_maps()).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn get_loggers() -> Response {
    Json(serde_json::json!({ "filter": crate::logging::current() })).into_response()
}

#[derive(Debug, Deserialize)]
struct LoggersRequest {
    filter: String,
}

async fn set_loggers(Json(req): Json<LoggersRequest>) -> Response {
    match crate::logging::set(&req.filter) {
        Ok(()) => Json(serde_json::json!({ "filter": crate::logging::current() })).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

/// Prometheus (OpenMetrics text format).
async fn metrics(State(s): State<AppState>) -> Response {
    let ready = s.ready.load(Ordering::SeqCst);
    let s2 = s.clone();
    let text = with_observer(&s, move |o| crate::metrics::render(o, ready, &s2.xds, s2.dns.as_deref())).await;
    ([("content-type", crate::metrics::CONTENT_TYPE)], text).into_response()
}

async fn get_monitoring(State(s): State<AppState>) -> Response {
    Json(with_observer(&s, |o| o.monitoring()).await).into_response()
}

/// Body of POST /debug/monitoring: the switches to change (others keep their value).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitoringRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log_format: Option<LogFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_metrics: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_metrics: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_metrics: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_interval_ms: Option<u64>,
}

async fn set_monitoring(State(s): State<AppState>, body: axum::body::Bytes) -> Response {
    let req: MonitoringRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad monitoring request: {e}")),
    };
    if req.report_interval_ms.is_some_and(|ms| ms < 100) {
        return error(StatusCode::BAD_REQUEST, "report_interval_ms must be at least 100");
    }
    let r = with_observer(&s, move |m| {
        let mut next = m.telemetry.settings.clone();
        let set = |v: Option<bool>, f: &mut bool| {
            if let Some(v) = v {
                *f = v;
            }
        };
        set(req.access_log, &mut next.access_log);
        set(req.service_metrics, &mut next.service_metrics);
        set(req.workload_metrics, &mut next.workload_metrics);
        set(req.connection_metrics, &mut next.connection_metrics);
        if let Some(f) = req.access_log_format {
            next.access_log_format = f;
        }
        let interval = req.report_interval_ms.map(Duration::from_millis);
        m.set_monitoring(next, interval).map(|_| m.monitoring())
    })
    .await;
    match r {
        Ok(v) => {
            tracing::info!(settings = %v["settings"], "monitoring switched");
            Json(v).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn dns_status(State(s): State<AppState>) -> Response {
    match &s.dns {
        Some(d) => Json(d.status()).into_response(),
        None => Json(serde_json::json!({"enabled": false})).into_response(),
    }
}

async fn authz_status(State(s): State<AppState>) -> Response {
    Json(with_mesh(&s, |m| m.authz_status()).await).into_response()
}

/// Body of /v1/enroll and /v1/unenroll: the namespace by path or by a pid inside it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct EnrollRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Uid of the workload running in the namespace (gives clients their locality).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
}

impl EnrollRequest {
    /// The namespace's path and cookie, or what is wrong with the request. The path is opened
    /// on a blocking thread (never on an async worker), without blocking, and must be a
    /// network namespace.
    async fn namespace(&self) -> Result<(PathBuf, u64), String> {
        let path = match (&self.netns, self.pid) {
            (Some(p), None) => p.clone(),
            (None, Some(pid)) => netns::path_of_pid(pid),
            _ => return Err("give exactly one of `netns` (a path) and `pid`".into()),
        };
        let p = path.clone();
        let cookie = tokio::task::spawn_blocking(move || netns::cookie_of(&p))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        Ok((path, cookie))
    }
}

async fn enroll(State(s): State<AppState>, Json(req): Json<EnrollRequest>) -> Response {
    let (path, cookie) = match req.namespace().await {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    // The node's own namespace is where host-network pods (and the node's processes) live:
    // putting it in the mesh would redirect the node's own connections.
    if netns::current_cookie().is_ok_and(|own| own == cookie) {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "{} is the node's own network namespace (a host-network pod's): it is never enrolled",
                path.display()
            ),
        );
    }
    let workload = req.workload.clone();
    let path2 = path.clone();
    let r = with_mesh(&s, move |m| {
        if let Some(w) = &workload {
            match m.model().workloads.get(w.as_str()) {
                Some(known) if known.is_host_network() => {
                    return Err(format!(
                        "workload {w:?} is a host-network pod: it runs in the node's namespace and is never enrolled"
                    ));
                }
                Some(_) => {}
                None => {
                    tracing::warn!(workload = %w, "enrolled with a workload the config does not know (yet); node locality applies until it appears");
                }
            }
        }
        Ok(m.enroll(cookie, Some(&path2), workload))
    })
    .await;
    let r = match r {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match r {
        Ok(_) => {
            tracing::info!(netns = %path.display(), cookie, "enrolled");
            Json(serde_json::json!({ "netns_cookie": cookie })).into_response()
        }
        Err(e) => error(StatusCode::INSUFFICIENT_STORAGE, e.to_string()),
    }
}

async fn unenroll(State(s): State<AppState>, Json(req): Json<EnrollRequest>) -> Response {
    let (path, cookie) = match req.namespace().await {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match with_mesh(&s, move |m| m.unenroll(cookie)).await {
        Ok(removed) => {
            tracing::info!(netns = %path.display(), cookie, removed, "unenrolled");
            Json(serde_json::json!({ "netns_cookie": cookie, "removed": removed })).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Where the client sends a request: the loopback address (reads) or the admin socket.
#[derive(Clone, Debug)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "{a}"),
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(a: SocketAddr) -> Self {
        Endpoint::Tcp(a)
    }
}

impl From<&Path> for Endpoint {
    fn from(p: &Path) -> Self {
        Endpoint::Unix(p.to_owned())
    }
}

impl From<&PathBuf> for Endpoint {
    fn from(p: &PathBuf) -> Self {
        Endpoint::Unix(p.clone())
    }
}

/// The admin socket's default path.
pub const DEFAULT_SOCKET: &str = "/run/kmesh/admin.sock";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the daemon's admin API at {addr}: {source} (is kmesh-daemon running? the admin socket needs root)"
    )]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("admin API at {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("admin API answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("admin API sent a malformed response")]
    Malformed,
}

trait Conn: Read + Write {}
impl<T: Read + Write> Conn for T {}

/// A minimal HTTP/1.1 request to the admin API; returns the body of a 2xx answer.
pub fn request(
    to: impl Into<Endpoint>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<String, ClientError> {
    let to = to.into();
    let addr = to.to_string();
    let timeout = Some(Duration::from_secs(60));
    let mut s: Box<dyn Conn> = match &to {
        Endpoint::Tcp(a) => {
            let s = TcpStream::connect_timeout(a, Duration::from_secs(3))
                .map_err(|source| ClientError::Connect { addr: addr.clone(), source })?;
            s.set_read_timeout(timeout).map_err(|source| ClientError::Io { addr: addr.clone(), source })?;
            Box::new(s)
        }
        Endpoint::Unix(p) => {
            let s = std::os::unix::net::UnixStream::connect(p)
                .map_err(|source| ClientError::Connect { addr: addr.clone(), source })?;
            s.set_read_timeout(timeout).map_err(|source| ClientError::Io { addr: addr.clone(), source })?;
            Box::new(s)
        }
    };
    let io = |source| ClientError::Io { addr: addr.clone(), source };
    let body = body.unwrap_or("");
    let host = if matches!(to, Endpoint::Tcp(_)) { addr.as_str() } else { "localhost" };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(io)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(io)?;
    let text = String::from_utf8_lossy(&resp);
    let (head, rest) = text.split_once("\r\n\r\n").ok_or(ClientError::Malformed)?;
    let status: u16 =
        head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or(ClientError::Malformed)?;
    // Bodies here are small and sent with Content-Length or chunked by axum; handle both.
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    if !(200..300).contains(&status) {
        return Err(ClientError::Status { status, body });
    }
    Ok(body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(len.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}
