//! The DNS proxies of the node: one per enrolled pod whose namespace the daemon can enter,
//! kept in step with the enrollments and the model. A pod's queries are sent to its proxy by
//! the kernel only once the proxy listens (`DNS_PODS`), and go to their resolvers again before
//! it stops, so no query meets a closed port while the daemon runs. A daemon that stops leaves
//! every pod's queries going to their resolvers directly.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::json;

use super::message::Outcome;
use super::names::NameTable;
use super::server::{self, Pod};
use crate::kernel::{DnsMaps, KernelError};
use crate::model::Model;
use crate::netns::SocketFactory;

/// ztunnel's port for the same proxy (it also listens on loopback inside each pod).
pub const DEFAULT_PORT: u16 = 15053;

#[derive(Clone, Debug)]
pub struct DnsOptions {
    /// The port on 127.0.0.1 and ::1 in each pod's namespace.
    pub port: u16,
    /// The cluster's DNS domain (search domains `<ns>.svc.<domain>`, `svc.<domain>`, `<domain>`).
    pub cluster_domain: String,
    /// How long a forwarded query waits for the upstream resolver before SERVFAIL.
    pub upstream_timeout: Duration,
}

impl Default for DnsOptions {
    fn default() -> Self {
        Self {
            port: DEFAULT_PORT,
            cluster_domain: "cluster.local".into(),
            upstream_timeout: Duration::from_secs(2),
        }
    }
}

/// Queries by what the proxies did with them.
#[derive(Default)]
pub struct DnsStats {
    pub answered: AtomicU64,
    pub nodata: AtomicU64,
    pub forwarded: AtomicU64,
    pub servfail: AtomicU64,
    pub formerr: AtomicU64,
    pub dropped: AtomicU64,
}

impl DnsStats {
    pub fn count(&self, o: &Outcome) {
        let c = match o {
            Outcome::Answered => &self.answered,
            Outcome::NoData => &self.nodata,
            Outcome::FormErr => &self.formerr,
            Outcome::Dropped => &self.dropped,
            Outcome::Forward => return,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// (result label, count) for the metrics.
    pub fn by_result(&self) -> [(&'static str, u64); 6] {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("answered", l(&self.answered)),
            ("nodata", l(&self.nodata)),
            ("forwarded", l(&self.forwarded)),
            ("servfail", l(&self.servfail)),
            ("formerr", l(&self.formerr)),
            ("dropped", l(&self.dropped)),
        ]
    }
}

/// What every pod's servers share.
pub struct ProxyShared {
    pub opts: DnsOptions,
    pub maps: Mutex<DnsMaps>,
    pub factory: SocketFactory,
    pub stats: DnsStats,
    table: RwLock<Arc<NameTable>>,
}

impl ProxyShared {
    /// The names answered now.
    pub fn table(&self) -> Arc<NameTable> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

struct PodServer {
    pod: Arc<Pod>,
    path: PathBuf,
    listening: Vec<String>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What the proxies need from the mesh, taken under its lock.
pub struct MeshView {
    pub generation: u64,
    /// The model, when its generation differs from the one the table was built from.
    pub model: Option<Model>,
    /// Enrolled namespaces that can be entered: cookie, path, the pod's namespace if known
    /// (none before a configuration is applied: a proxy then knows no name).
    pub pods: Vec<(u64, PathBuf, Option<String>)>,
}

pub struct DnsProxy {
    pub shared: Arc<ProxyShared>,
    pods: Mutex<BTreeMap<u64, PodServer>>,
    /// Pods whose proxy could not start: when to try again, and why.
    failed: Mutex<BTreeMap<u64, (Instant, String)>>,
    table_generation: AtomicU64,
    /// How long the last name table took to build, in microseconds.
    last_build_us: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("cannot start the thread that opens sockets in pods' namespaces: {0}")]
    Factory(std::io::Error),
}

impl DnsProxy {
    /// Takes over the DNS maps: queries of pods an earlier daemon served go to their resolvers
    /// until this one listens in their namespace.
    pub fn start(opts: DnsOptions, mut maps: DnsMaps) -> Result<Arc<Self>, DnsError> {
        for c in maps.pods() {
            maps.set_pod(c, 0)?;
        }
        maps.set_port(Some(opts.port))?;
        let factory = SocketFactory::start().map_err(DnsError::Factory)?;
        Ok(Arc::new(Self {
            shared: Arc::new(ProxyShared {
                opts,
                maps: Mutex::new(maps),
                factory,
                stats: DnsStats::default(),
                table: RwLock::new(Arc::new(NameTable::default())),
            }),
            pods: Mutex::new(BTreeMap::new()),
            failed: Mutex::new(BTreeMap::new()),
            table_generation: AtomicU64::new(u64::MAX),
            last_build_us: AtomicU64::new(0),
        }))
    }

    /// `--dns-proxy off`: every pod's queries go to their resolvers, whatever an earlier
    /// daemon left in the maps.
    pub fn disable(mut maps: DnsMaps) -> Result<(), KernelError> {
        maps.set_port(None)?;
        for c in maps.pods() {
            maps.set_pod(c, 0)?;
        }
        Ok(())
    }

    /// How long the last name table took to build.
    pub fn last_build(&self) -> Duration {
        Duration::from_micros(self.last_build_us.load(Ordering::Relaxed))
    }

    /// The model generation the name table was built from.
    pub fn table_generation(&self) -> u64 {
        self.table_generation.load(Ordering::Relaxed)
    }

    /// Brings the proxies in line with the mesh: a new table when the model changed, servers
    /// started for new pods (and retried for failed ones), stopped for pods that left.
    pub async fn reconcile(&self, view: MeshView) {
        if let Some(model) = view.model {
            let domain = self.shared.opts.cluster_domain.clone();
            let started = Instant::now();
            if let Ok(t) = tokio::task::spawn_blocking(move || NameTable::build(&model, &domain)).await {
                *self.shared.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(t);
                self.table_generation.store(view.generation, Ordering::Relaxed);
                self.last_build_us.store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
        }
        let want: BTreeMap<u64, (PathBuf, Option<String>)> =
            view.pods.into_iter().map(|(c, p, ns)| (c, (p, ns))).collect();
        let gone: Vec<u64> = {
            let pods = self.pods.lock().unwrap();
            pods.iter()
                .filter(|(c, s)| want.get(c).is_none_or(|(p, _)| *p != s.path))
                .map(|(c, _)| *c)
                .collect()
        };
        for c in gone {
            self.stop_pod(c);
        }
        self.failed.lock().unwrap().retain(|c, _| want.contains_key(c));
        for (cookie, (path, ns)) in want {
            if let Some(s) = self.pods.lock().unwrap().get(&cookie) {
                let mut cur = s.pod.namespace.write().unwrap_or_else(|p| p.into_inner());
                if *cur != ns {
                    *cur = ns;
                }
                continue;
            }
            if self.failed.lock().unwrap().get(&cookie).is_some_and(|(at, _)| Instant::now() < *at) {
                continue;
            }
            match self.start_pod(cookie, path.clone(), ns).await {
                Ok(s) => {
                    tracing::info!(cookie, netns = %path.display(), listening = ?s.listening, "DNS proxy listening in the pod");
                    self.failed.lock().unwrap().remove(&cookie);
                    self.pods.lock().unwrap().insert(cookie, s);
                }
                Err(e) => {
                    tracing::warn!(cookie, netns = %path.display(), error = %e,
                        "cannot start the pod's DNS proxy; its queries go to its resolver directly (retrying in 5 s)");
                    self.failed.lock().unwrap().insert(cookie, (Instant::now() + Duration::from_secs(5), e));
                }
            }
        }
    }

    async fn start_pod(&self, cookie: u64, path: PathBuf, ns: Option<String>) -> Result<PodServer, String> {
        let netns = Arc::new(crate::netns::open_netns(&path).map_err(|e| e.to_string())?);
        let f = &self.shared.factory;
        let port = self.shared.opts.port;
        let mut listening = Vec::new();
        let mut flags = 0;
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        let loopbacks: [std::net::IpAddr; 2] =
            [std::net::Ipv4Addr::LOCALHOST.into(), std::net::Ipv6Addr::LOCALHOST.into()];
        for ip in loopbacks {
            let addr = std::net::SocketAddr::new(ip, port);
            let domain = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
            let u = f.socket(&netns, domain, libc::SOCK_DGRAM, None).await.map_err(|e| e.to_string())?;
            if domain == libc::AF_INET {
                // The path may lead to another namespace than the one enrolled by now.
                let c = crate::netns::socket_cookie(&u).map_err(|e| e.to_string())?;
                if c != cookie {
                    return Err(format!("{} is no longer the namespace enrolled", path.display()));
                }
            }
            let u = socket2::Socket::from(u);
            if let Err(e) = u.bind(&addr.into()) {
                if domain == libc::AF_INET6 {
                    // A pod without IPv6 (disabled, or no ::1): its proxy serves IPv4 only.
                    continue;
                }
                return Err(format!("binding {addr} in the pod: {e}"));
            }
            let t = f.socket(&netns, domain, libc::SOCK_STREAM, None).await.map_err(|e| e.to_string())?;
            let t = socket2::Socket::from(t);
            let _ = t.set_reuse_address(true);
            t.bind(&addr.into()).map_err(|e| format!("binding {addr}/tcp in the pod: {e}"))?;
            t.listen(1024).map_err(|e| format!("listening on {addr}/tcp in the pod: {e}"))?;
            let u = tokio::net::UdpSocket::from_std(u.into()).map_err(|e| e.to_string())?;
            let t = tokio::net::TcpListener::from_std(t.into()).map_err(|e| e.to_string())?;
            listening.push(addr.to_string());
            flags |=
                if domain == libc::AF_INET { kmesh_common::DNS_POD_V4 } else { kmesh_common::DNS_POD_V6 };
            udp.push(u);
            tcp.push(t);
        }
        let pod = Arc::new(Pod::new(cookie, netns, ns, self.shared.clone()));
        let mut tasks = Vec::new();
        for u in udp {
            tasks.push(tokio::spawn(server::serve_udp(pod.clone(), u)));
        }
        for t in tcp {
            tasks.push(tokio::spawn(server::serve_tcp(pod.clone(), t)));
        }
        // Listening: now the kernel may send the pod's queries here.
        if let Err(e) = self.shared.maps.lock().unwrap().set_pod(cookie, flags) {
            for t in &tasks {
                t.abort();
            }
            return Err(e.to_string());
        }
        Ok(PodServer { pod, path, listening, tasks })
    }

    fn stop_pod(&self, cookie: u64) {
        let Some(s) = self.pods.lock().unwrap().remove(&cookie) else { return };
        // First the kernel stops sending queries here, then the sockets close.
        if let Err(e) = self.shared.maps.lock().unwrap().set_pod(cookie, 0) {
            tracing::error!(cookie, error = %e, "cannot send a pod's DNS queries back to its resolver");
        }
        for t in s.tasks {
            t.abort();
        }
        tracing::info!(cookie, "DNS proxy of the pod stopped");
    }

    /// Stops every proxy; pods' queries go to their resolvers directly from now on.
    pub fn shutdown(&self) {
        let cookies: Vec<u64> = self.pods.lock().unwrap().keys().copied().collect();
        for c in cookies {
            self.stop_pod(c);
        }
        if let Err(e) = self.shared.maps.lock().unwrap().set_port(None) {
            tracing::error!(error = %e, "cannot switch the DNS redirection off");
        }
    }

    /// Pods with a proxy listening.
    pub fn pods_listening(&self) -> usize {
        self.pods.lock().unwrap().len()
    }

    /// For `/debug/dns`: the proxies, the pods that have none and why, and every name answered.
    pub fn status(&self) -> serde_json::Value {
        let pods: Vec<_> = self
            .pods
            .lock()
            .unwrap()
            .iter()
            .map(|(c, s)| {
                json!({
                    "netns_cookie": c,
                    "netns": s.path,
                    "namespace": *s.pod.namespace.read().unwrap_or_else(|p| p.into_inner()),
                    "listening": s.listening,
                })
            })
            .collect();
        let failed: Vec<_> = self
            .failed
            .lock()
            .unwrap()
            .iter()
            .map(|(c, (_, e))| json!({"netns_cookie": c, "error": e}))
            .collect();
        let table = self.shared.table();
        let names: Vec<_> = table
            .entries()
            .map(|(name, a)| {
                json!({
                    "name": name,
                    "ipv4": a.v4,
                    "ipv6": a.v6,
                    "ttl": a.ttl,
                    "headless": a.headless,
                })
            })
            .collect();
        let o = &self.shared.opts;
        json!({
            "enabled": true,
            "port": o.port,
            "cluster_domain": o.cluster_domain,
            "upstream_timeout_ms": o.upstream_timeout.as_millis() as u64,
            "model_generation": self.table_generation(),
            "queries": self.shared.stats.by_result().into_iter().collect::<BTreeMap<_, _>>(),
            "pods": pods,
            "pods_without_proxy": failed,
            "names": names,
        })
    }
}
