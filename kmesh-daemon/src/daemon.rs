//! The daemon's wiring: load the data plane, apply the config file and follow its changes,
//! serve the admin API, and on shutdown leave the programs attached (or uninstall on request).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;

use crate::admin::{self, Shared};
use crate::config;
use crate::kernel::{self, Dataplane, LoadOptions};
use crate::mesh::Mesh;
use crate::xds::{self, XdsOptions};

/// Where the mesh configuration comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A local YAML file, re-read when it changes.
    File(PathBuf),
    /// A control plane speaking delta ADS (istiod).
    Xds(Box<XdsOptions>),
    /// The kernel-native mode: Envoy's xDS (listeners, routes, clusters, endpoints) over delta
    /// ADS, taken as an Envoy sidecar takes it (see [`crate::envoy`]).
    EnvoyXds(Box<XdsOptions>),
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub source: Source,
    pub load: LoadOptions,
    /// Loopback address of the read-only admin API.
    pub admin_addr: SocketAddr,
    /// The root-only Unix socket serving the whole admin API (enrollment included).
    pub admin_socket: PathBuf,
    /// Where Prometheus scrapes `/status/metric` (`None`: only the admin API's `/metrics`).
    pub metrics_addr: Option<SocketAddr>,
    pub poll: Duration,
    pub uninstall_on_exit: bool,
    /// Where enrollments are saved across restarts and upgrades.
    pub state_file: Option<PathBuf>,
    /// Access logs and metric families at start (switchable at runtime).
    pub monitoring: crate::telemetry::Monitoring,
    /// How often open connections report their counters.
    pub report_interval: Duration,
    /// Enroll this node's pods from the Kubernetes API server.
    pub k8s: Option<crate::k8s::K8sOptions>,
    /// The CNI plugin's socket and chaining (with the Kubernetes source only).
    pub cni: Option<crate::cni::CniOptions>,
    /// The node's own network namespace (where kubelet runs): its connections into pods skip
    /// authorization, so health probes pass ALLOW policies. `None`: they are policed too.
    pub node_netns: Option<PathBuf>,
    /// The pods' DNS proxies (`None`: off; pods' queries go to their resolvers untouched).
    pub dns: Option<crate::dns::DnsOptions>,
    /// Passive outlier detection for every service (`None`: only where a service asks for
    /// it, as Envoy clusters do in the kernel-native mode).
    pub outlier: Option<kmesh_model::model::OutlierDetection>,
}

impl RunOptions {
    pub fn new(source: Source, cgroup: PathBuf, pin_dir: PathBuf) -> Self {
        Self {
            source,
            load: LoadOptions::new(cgroup, pin_dir),
            admin_addr: "127.0.0.1:15200".parse().unwrap(),
            admin_socket: PathBuf::from(admin::DEFAULT_SOCKET),
            metrics_addr: None,
            poll: Duration::from_millis(500),
            uninstall_on_exit: false,
            state_file: None,
            monitoring: Default::default(),
            report_interval: kernel::DEFAULT_REPORT_INTERVAL,
            k8s: None,
            cni: None,
            node_netns: Some(PathBuf::from("/proc/self/ns/net")),
            dns: Some(Default::default()),
            outlier: None,
        }
    }
}

/// Reads the config file and applies it if it changed since `last`. A file that fails
/// validation or does not fit leaves the previous configuration in force.
fn reload(shared: &Shared, last: &mut Option<Vec<u8>>) {
    let bytes = match std::fs::read(&shared.config_path) {
        Ok(b) => b,
        Err(e) => {
            if last.is_some() {
                tracing::error!(path = %shared.config_path.display(), error = %e, "config file unreadable; keeping the previous configuration");
            }
            let mut err = shared.config_error.lock().unwrap();
            if err.is_none() {
                let mut m = shared.mesh.lock().unwrap();
                m.counters.config_errors += 1;
                m.publish();
            }
            *err = Some(format!("cannot read {}: {e}", shared.config_path.display()));
            return;
        }
    };
    if last.as_deref() == Some(&bytes[..]) {
        return;
    }
    *last = Some(bytes.clone());
    let text = String::from_utf8_lossy(&bytes);
    let model = match config::parse(&text) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(path = %shared.config_path.display(), error = %e, "config refused; the previous configuration stays in force");
            // The error first: whoever sees the count go up finds this error in the dump.
            *shared.config_error.lock().unwrap() = Some(e.to_string());
            let mut m = shared.mesh.lock().unwrap();
            m.counters.config_errors += 1;
            m.publish();
            return;
        }
    };
    let (w, s) = (model.workloads.len(), model.services.len());
    let started = std::time::Instant::now();
    let r = shared.mesh.lock().unwrap().set_model(model);
    match r {
        Ok(rep) => {
            tracing::info!(
                workloads = w,
                services = s,
                writes = rep.writes,
                deletes = rep.deletes,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "configuration applied"
            );
            *shared.config_error.lock().unwrap() = None;
            shared.ready.store(true, Ordering::SeqCst);
        }
        Err(e) => {
            tracing::error!(error = %e, "configuration refused by the kernel side; the previous configuration stays in force");
            *shared.config_error.lock().unwrap() = Some(e.to_string());
        }
    }
}

/// Raises the soft limit on open descriptors to the hard one (the DNS proxies hold a few
/// sockets per pod; the usual soft limit of 1,024 would cap a node at a few hundred pods).
fn raise_nofile_limit() {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            let want = libc::rlimit { rlim_cur: r.rlim_max, rlim_max: r.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
                tracing::warn!(soft = r.rlim_cur, hard = r.rlim_max, "cannot raise the limit on open files");
            }
        }
    }
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    raise_nofile_limit();
    let mut dp = Dataplane::load(&opts.load).context("loading the data plane")?;
    tracing::info!(cgroup = %opts.load.cgroup.display(), pins = %kernel::layout_dir(&opts.load.pin_dir).display(),
        adopted = dp.adopted(), "programs attached");
    let node_cookie = match &opts.node_netns {
        Some(p) => Some(crate::netns::cookie_of(p).with_context(|| {
            format!("finding the node's network namespace {} (its probes skip authorization)", p.display())
        })?),
        None => None,
    };
    dp.set_node_netns(node_cookie).context("exempting the node's connections from authorization")?;
    match (&opts.node_netns, node_cookie) {
        (Some(p), Some(c)) => {
            tracing::info!(netns = %p.display(), cookie = c, "connections from the node (kubelet's probes) skip authorization")
        }
        _ => tracing::info!("connections from the node are subject to authorization like any other"),
    }
    let mut mesh = Mesh::new(dp);
    let dns_maps = mesh.dataplane().open_dns_maps().context("opening the DNS proxy's maps")?;
    let dns = match &opts.dns {
        Some(o) => {
            let d = crate::dns::DnsProxy::start(o.clone(), dns_maps).context("starting the DNS proxy")?;
            tracing::info!(port = o.port, domain = %o.cluster_domain, "pods' DNS queries go to a proxy in their namespace");
            Some(d)
        }
        None => {
            crate::dns::DnsProxy::disable(dns_maps).context("switching the DNS proxy off")?;
            tracing::info!("DNS proxy off: pods' queries go to their resolvers untouched");
            None
        }
    };
    let observer = mesh.observer_handle();
    // Outlier detection reads connection outcomes from the telemetry events.
    mesh.outlier = crate::outlier::Detector::new(opts.outlier);
    let outlier_on = opts.outlier.is_some() || matches!(opts.source, Source::EnvoyXds(_));
    observer.lock().unwrap().collect_outcomes = outlier_on;
    observer
        .lock()
        .unwrap()
        .set_monitoring(opts.monitoring.clone(), Some(opts.report_interval))
        .context("switching telemetry")?;
    if let Some(sf) = &opts.state_file {
        match std::fs::read(sf) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(saved) => mesh.restore(saved),
                Err(e) => {
                    tracing::error!(path = %sf.display(), error = %e, "state file unreadable; enrollments not restored")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::error!(path = %sf.display(), error = %e, "cannot read the state file"),
        }
        mesh.set_state_file(sf.clone());
    }
    let shared = Arc::new(Shared {
        mesh: Mutex::new(mesh),
        observer,
        ready: Default::default(),
        config_error: Mutex::new(None),
        config_path: match &opts.source {
            Source::File(p) => p.clone(),
            Source::Xds(x) => PathBuf::from(format!("xds://{}", x.address)),
            Source::EnvoyXds(x) => PathBuf::from(format!("envoy-xds://{}", x.address)),
        },
        xds: Default::default(),
        k8s: Mutex::new(None),
        envoy: Mutex::new(None),
        conditions: Mutex::new(Vec::new()),
        dns: dns.clone(),
    });
    shared.xds.enabled.store(matches!(opts.source, Source::Xds(_) | Source::EnvoyXds(_)), Ordering::Relaxed);

    // The root-only socket first: once the loopback API answers, the socket is there too.
    let socket = admin::bind_socket(&opts.admin_socket)
        .with_context(|| format!("binding the admin socket {}", opts.admin_socket.display()))?;
    let listener = tokio::net::TcpListener::bind(opts.admin_addr)
        .await
        .with_context(|| format!("binding the admin API to {}", opts.admin_addr))?;
    tracing::info!(addr = %opts.admin_addr, "admin API listening (read-only)");
    let app = admin::read_only_router(shared.clone(), &opts.admin_socket);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    tracing::info!(socket = %opts.admin_socket.display(), "admin API listening (full, root only)");
    let app = admin::router(shared.clone());
    let socket_server = tokio::spawn(async move { axum::serve(socket, app).await });
    let metrics_server = match opts.metrics_addr {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics endpoint to {addr}"))?;
            tracing::info!(addr = %l.local_addr()?, "metrics at /status/metric");
            let app = admin::metrics_router(shared.clone());
            Some(tokio::spawn(async move { axum::serve(l, app).await }))
        }
        None => None,
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_rx2 = stop_rx.clone();
    let source_task = match &opts.source {
        Source::File(_) => {
            let shared = shared.clone();
            let poll = opts.poll;
            tokio::task::spawn_blocking(move || {
                let mut last = None;
                while !*stop_rx.borrow() {
                    reload(&shared, &mut last);
                    std::thread::sleep(poll);
                }
            })
        }
        Source::Xds(x) => {
            tracing::info!(address = %x.address, tls = x.ca_file.is_some(), node_id = %x.identity.node_id(), "taking configuration from xDS");
            tokio::spawn(xds::run((**x).clone(), shared.clone(), stop_rx))
        }
        Source::EnvoyXds(x) => {
            tracing::info!(address = %x.address, tls = x.ca_file.is_some(),
                node_id = %x.identity.node_id_as(crate::envoy::PROXY_TYPE),
                "kernel-native mode: taking Envoy's xDS (LDS, RDS, CDS, EDS)");
            tokio::spawn(crate::envoy::run((**x).clone(), shared.clone(), stop_rx))
        }
    };

    let mut cni_tasks = Vec::new();
    let k8s_task = match &opts.k8s {
        Some(k) => {
            let client =
                kmesh_k8s::watch::client(k.kubeconfig.as_deref()).await.context("Kubernetes source")?;
            anyhow::ensure!(
                !k.node_name.is_empty(),
                "the Kubernetes source needs this node's name (--node-name or NODE_NAME)"
            );
            tracing::info!(node = %k.node_name, cluster = %k.cluster_id, "enrolling this node's pods from the Kubernetes API server");
            let watch = kmesh_k8s::ClusterWatch::start(client, &k.node_name);
            // Synced once, and not refused since: a watch the API server denies (a missing
            // permission) never heals by retrying, unlike an outage, which keeps the daemon
            // ready on the state it has.
            let health = watch.health.clone();
            shared.conditions.lock().unwrap().push((
                "kubernetes watches not synced or refused (see config_dump kubernetes.last_error)",
                Box::new(move || {
                    health.synced.load(Ordering::SeqCst) && !health.denied.load(Ordering::SeqCst)
                }),
            ));
            let link = Arc::new(crate::cni::CniLink::default());
            if let Some(c) = &opts.cni {
                let socket =
                    crate::cni::serve(c.socket.clone(), k.cluster_id.clone(), link.clone(), shared.clone());
                cni_tasks.push(tokio::spawn(async move {
                    if let Err(e) = socket.await {
                        tracing::error!(error = %e, "the CNI plugin socket failed");
                    }
                }));
                if c.conf_dir.is_some() {
                    let chained = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let c2 = chained.clone();
                    shared
                        .conditions
                        .lock()
                        .unwrap()
                        .push(("CNI plugin not chained", Box::new(move || c2.load(Ordering::SeqCst))));
                    cni_tasks.push(tokio::spawn(crate::cni::keep_chained(c.clone(), chained)));
                }
            }
            Some(tokio::spawn(crate::k8s::run(k.clone(), watch, shared.clone(), link, stop_rx2)))
        }
        None => None,
    };

    // The DNS proxies follow enrollments and the model.
    let dns_task = dns.clone().map(|d| {
        let shared = shared.clone();
        tokio::spawn(async move {
            let changed = shared.mesh.lock().unwrap_or_else(|p| p.into_inner()).changes();
            loop {
                let view = {
                    let m = shared.mesh.lock().unwrap_or_else(|p| p.into_inner());
                    let generation = m.model_generation();
                    // Until a configuration is applied the proxies would know no name (and
                    // their forwarded NXDOMAINs be cached): pods ask their resolvers directly.
                    let pods = if m.has_model() { m.enrolled_pods() } else { Vec::new() };
                    // The name table is built only while some pod has a proxy to ask it.
                    let stale = generation != d.table_generation() && !pods.is_empty();
                    crate::dns::MeshView { generation, model: stale.then(|| m.model().clone()), pods }
                };
                d.reconcile(view).await;
                // Under churn the name table (a pass over the model) is rebuilt at most ten
                // times a second, and never more than a tenth of the time: answers lag by at
                // most this much, well inside their TTL, and a large mesh does not pay a
                // rebuild per change.
                tokio::time::sleep(Duration::from_millis(100).max(d.last_build() * 9)).await;
                tokio::select! {
                    _ = changed.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        })
    });

    // Pins removed by hand are detected, reported and (for maps) restored.
    let pins_check = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
            loop {
                tick.tick().await;
                let s = shared.clone();
                let (missing, restored) = tokio::task::spawn_blocking(move || {
                    // Namespaces are entered (a thread and a setns each) without the mesh's
                    // lock; only the unenrollment of those gone takes it.
                    let paths = s.mesh.lock().unwrap_or_else(|p| p.into_inner()).enrolled_paths();
                    let gone = Mesh::gone(&paths);
                    let mut m = s.mesh.lock().unwrap_or_else(|p| p.into_inner());
                    for c in m.unenroll_gone(&gone) {
                        tracing::info!(cookie = c, "a pod's network namespace is gone: unenrolled");
                    }
                    let missing = m.dataplane().missing_pins();
                    let restored = if missing.is_empty() { Vec::new() } else { m.dataplane().repin_maps() };
                    m.counters.pins_missing = missing.len() as u64 - restored.len() as u64;
                    m.counters.pins_restored += restored.len() as u64;
                    m.publish();
                    (missing, restored)
                })
                .await
                .unwrap_or_default();
                if !missing.is_empty() {
                    tracing::error!(
                        ?missing,
                        ?restored,
                        "bpffs pins were removed by hand; maps are pinned again, programs stay attached while the daemon runs (restart it to pin links again)"
                    );
                }
            }
        })
    };
    // Outlier detection: outcomes drained with the telemetry events, applied under the mesh's
    // lock in a task of their own (an apply in progress delays ejections, not access logs).
    let (outcomes_tx, mut outcomes_rx) =
        tokio::sync::mpsc::unbounded_channel::<Vec<(std::net::IpAddr, bool)>>();
    let outlier_task = outlier_on.then(|| {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut busy = false;
            loop {
                let batch =
                    tokio::time::timeout(std::time::Duration::from_millis(200), outcomes_rx.recv()).await;
                let batch = match batch {
                    Ok(Some(b)) => b,
                    Ok(None) => return,
                    Err(_) => Vec::new(),
                };
                if !busy && !batch.iter().any(|(_, ok)| !ok) {
                    continue;
                }
                let s = shared.clone();
                busy = tokio::task::spawn_blocking(move || {
                    let mut m = s.mesh.lock().unwrap_or_else(|p| p.into_inner());
                    m.outlier_step(&batch, std::time::Instant::now());
                    m.outlier.busy()
                })
                .await
                .unwrap_or(true);
            }
        })
    });
    // Each denial is logged with source, destination and the deciding policy.
    let denials = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
            loop {
                tick.tick().await;
                let s = shared.clone();
                let (denials, access, outcomes) = tokio::task::spawn_blocking(move || {
                    // The observer's lock only: a drain never waits for an apply.
                    let mut o = s.observer.lock().unwrap_or_else(|p| p.into_inner());
                    (o.drain_denials(), o.drain_telemetry(), o.take_outcomes())
                })
                .await
                .unwrap_or_default();
                if !outcomes.is_empty() {
                    let _ = outcomes_tx.send(outcomes);
                }
                for l in denials {
                    tracing::warn!(target: "kmesh::authz", "{l}");
                }
                for l in access {
                    tracing::info!(target: "kmesh::accesslog", "{l}");
                }
            }
        })
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
        r = server => { r??; }
        r = socket_server => { r??; }
    }
    let _ = std::fs::remove_file(&opts.admin_socket);
    denials.abort();
    if let Some(t) = outlier_task {
        t.abort();
    }
    if let Some(m) = metrics_server {
        m.abort();
    }
    pins_check.abort();
    if let (Some(t), Some(d)) = (dns_task, &dns) {
        t.abort();
        d.shutdown();
    }
    let _ = stop_tx.send(true);
    let _ = source_task.await;
    if let Some(t) = k8s_task {
        let _ = t.await;
    }
    for t in cni_tasks {
        t.abort();
    }
    if let Some(c) = &opts.cni {
        // A chained plugin with no daemon behind it would fail every new pod of the node:
        // the entry goes with the daemon (pods started meanwhile are found from their
        // processes when it is back).
        if let Some(dir) = &c.conf_dir {
            for f in crate::cni::unchain_all(dir) {
                tracing::info!(file = %f.display(), "CNI plugin unchained");
            }
        }
        let _ = std::fs::remove_file(&c.socket);
    }
    drop(shared);
    if opts.uninstall_on_exit {
        if let Some(sf) = &opts.state_file {
            let _ = std::fs::remove_file(sf);
        }
        let removed = kernel::uninstall(&opts.load.pin_dir)?;
        tracing::info!(pins = removed.len(), "uninstalled: programs detached, maps removed");
    } else {
        tracing::info!("exiting; programs stay attached and maps pinned, traffic keeps flowing");
    }
    Ok(())
}
