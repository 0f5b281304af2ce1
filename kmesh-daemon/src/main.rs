//! `kmesh-daemon`: the node agent. `run` is the daemon; the other commands talk to a running
//! daemon's admin API or clean up after it.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use kmesh_daemon::admin::{self, EnrollRequest};
use kmesh_daemon::config;
use kmesh_daemon::daemon::{self, RunOptions, Source};
use kmesh_daemon::kernel::{self, Capacities};
use kmesh_daemon::model::{Locality, NodeInfo};
use kmesh_daemon::telemetry::{LogFormat, Monitoring};
use kmesh_daemon::xds::{ProxyIdentity, XdsOptions};

#[derive(Parser)]
#[command(
    name = "kmesh-daemon",
    version,
    about = "Sidecarless service mesh data plane: socket-level load balancing in the kernel"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Ceilings of the BPF maps: each map starts at 1024 entries and grows (make-before-break) as
/// the configuration needs, up to its ceiling; a configuration that needs more is refused.
#[derive(Args)]
struct CapacityArgs {
    /// Most enrolled network namespaces.
    #[arg(long, default_value_t = Capacities::default().netns)]
    netns_capacity: u32,
    /// Most (VIP, port) frontends.
    #[arg(long, default_value_t = Capacities::default().frontends)]
    frontends_capacity: u32,
    /// Most load-balancing tables (per service and locality class).
    #[arg(long, default_value_t = Capacities::default().tables)]
    lb_tables_capacity: u32,
    /// Most endpoint slots across all tables.
    #[arg(long, default_value_t = Capacities::default().endpoints)]
    endpoints_capacity: u32,
    /// Most backends (workload addresses).
    #[arg(long, default_value_t = Capacities::default().backends)]
    backends_capacity: u32,
    /// Most (service, port) target ports.
    #[arg(long, default_value_t = Capacities::default().ports)]
    ports_capacity: u32,
    /// Authorization: destinations (workload addresses) with a policy.
    #[arg(long, default_value_t = Capacities::default().authz_dest)]
    authz_dest_capacity: u32,
    /// Authorization: addresses with a known identity.
    #[arg(long, default_value_t = Capacities::default().identity)]
    identity_capacity: u32,
    /// Authorization: source ranges policies name, per destination.
    #[arg(long, default_value_t = Capacities::default().authz_region)]
    authz_region_capacity: u32,
    /// Authorization: compiled verdict rows.
    #[arg(long, default_value_t = Capacities::default().authz_verdict)]
    authz_verdict_capacity: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Protocol {
    Delta,
    Sotw,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Workload,
    KernelNative,
}

/// Passive outlier detection for every service (off unless a failure count is given).
#[derive(Args)]
struct OutlierArgs {
    /// Eject an endpoint after this many connections to it in a row failed before they were
    /// established (refused, reset, timed out); 0: off. Envoy clusters in the kernel-native
    /// mode carry their own settings.
    #[arg(long, default_value_t = 0)]
    outlier_consecutive_failures: u32,
    /// An ejection lasts this long times the number of times the endpoint was ejected.
    #[arg(long, default_value_t = 30_000)]
    outlier_base_ejection_ms: u64,
    /// ... and at most this long.
    #[arg(long, default_value_t = 300_000)]
    outlier_max_ejection_ms: u64,
    /// At most this share of a service's endpoints is out at once (one may always go).
    #[arg(long, default_value_t = 10)]
    outlier_max_ejection_percent: u32,
    /// How often ejected endpoints are checked for return.
    #[arg(long, default_value_t = 10_000)]
    outlier_interval_ms: u64,
}

impl OutlierArgs {
    fn options(&self) -> Option<kmesh_model::model::OutlierDetection> {
        (self.outlier_consecutive_failures > 0).then(|| kmesh_model::model::OutlierDetection {
            consecutive_failures: self.outlier_consecutive_failures,
            base_ejection_ms: self.outlier_base_ejection_ms.max(1),
            max_ejection_ms: self.outlier_max_ejection_ms.max(1),
            max_ejection_percent: self.outlier_max_ejection_percent.min(100),
            interval_ms: self.outlier_interval_ms.max(10),
        })
    }
}

#[derive(Args)]
struct XdsArgs {
    /// Take the configuration from this control plane (istiod: istiod.istio-system.svc:15012)
    /// over delta ADS instead of a file.
    #[arg(long, env = "XDS_ADDRESS")]
    xds_address: Option<String>,
    /// What to take from the control plane: `workload` (Istio's workload API, as ztunnel) or
    /// `kernel-native` (Envoy's listeners, routes, clusters and endpoints, as an Envoy
    /// sidecar; the kernel does their L4 part).
    #[arg(long, value_enum, default_value_t = Mode::Workload, env = "KMESH_MODE")]
    mode: Mode,
    /// Which ADS to speak: `delta` (responses carry changes) or `sotw` (state of the world:
    /// each response carries the whole set of its type, as Envoy's `api_type: GRPC`). Only the
    /// kernel-native mode takes `sotw`: istiod serves the workload API over delta only.
    #[arg(long, value_enum, default_value_t = Protocol::Delta, env = "KMESH_XDS_PROTOCOL")]
    xds_protocol: Protocol,
    /// Connect without TLS (local control planes only).
    #[arg(long)]
    xds_plaintext: bool,
    /// Root CA that signs the control plane's certificate.
    #[arg(long, default_value = "/var/run/secrets/istio/root-cert.pem")]
    xds_ca_file: PathBuf,
    /// Server name to verify in the control plane's certificate (default: the address's host).
    #[arg(long)]
    xds_server_name: Option<String>,
    /// Bearer token sent to the control plane (default with TLS:
    /// /var/run/secrets/tokens/istio-token).
    #[arg(long)]
    xds_token_file: Option<PathBuf>,
    /// This node's name (for locality); its region/zone default to those of its workloads.
    #[arg(long, env = "NODE_NAME", default_value = "")]
    node_name: String,
    #[arg(long, default_value = "")]
    node_region: String,
    #[arg(long, default_value = "")]
    node_zone: String,
    #[arg(long, default_value = "")]
    node_subzone: String,
    /// Longest pause between reconnection attempts, in milliseconds.
    #[arg(long, default_value_t = 15_000)]
    xds_backoff_max_ms: u64,
    /// Largest xDS response accepted, in bytes; a bigger one ends the stream with an error
    /// (the configuration held stays in force).
    #[arg(long, default_value_t = kmesh_daemon::xds::DEFAULT_MAX_MESSAGE_BYTES)]
    xds_max_message_bytes: usize,
    /// Largest subscription sent, in bytes (keep it under the control plane's receive limit:
    /// istiod's is gRPC's 4 MiB). A resubscription whose list of held resources would be
    /// larger goes without it, and the control plane sends everything again.
    #[arg(long, default_value_t = kmesh_daemon::xds::DEFAULT_MAX_REQUEST_BYTES)]
    xds_max_request_bytes: usize,
}

impl XdsArgs {
    fn options(&self) -> anyhow::Result<Option<XdsOptions>> {
        let Some(address) = self.xds_address.as_ref() else { return Ok(None) };
        anyhow::ensure!(
            self.xds_protocol == Protocol::Delta || self.mode == Mode::KernelNative,
            "--xds-protocol sotw is for --mode kernel-native: the workload API is served over delta \
             ADS only (istiod and ztunnel speak it so)"
        );
        let node = NodeInfo {
            name: self.node_name.clone(),
            locality: Locality {
                region: self.node_region.as_str().into(),
                zone: self.node_zone.as_str().into(),
                subzone: self.node_subzone.as_str().into(),
            },
            ..Default::default()
        };
        let identity = ProxyIdentity::from_env()?;
        // The cluster a node is in is what the control plane is told (locality scope CLUSTER).
        let node = NodeInfo { cluster_id: identity.cluster_id.clone(), ..node };
        let mut o = XdsOptions::new(address, node, identity);
        if !self.xds_plaintext {
            o.ca_file = Some(self.xds_ca_file.clone());
            o.token_file = Some(
                self.xds_token_file.clone().unwrap_or_else(|| "/var/run/secrets/tokens/istio-token".into()),
            );
        } else {
            o.token_file = self.xds_token_file.clone();
        }
        o.tls_server_name = self.xds_server_name.clone();
        o.backoff_max = Duration::from_millis(self.xds_backoff_max_ms.max(100));
        o.max_message_bytes = self.xds_max_message_bytes.max(4096);
        o.max_request_bytes = self.xds_max_request_bytes.max(4096);
        o.flavour = match self.xds_protocol {
            Protocol::Delta => kmesh_daemon::xds::AdsFlavour::Delta,
            Protocol::Sotw => kmesh_daemon::xds::AdsFlavour::StateOfTheWorld,
        };
        Ok(Some(o))
    }
}

#[derive(Args)]
struct Target {
    /// Network namespace path (e.g. /run/netns/NAME or /proc/PID/ns/net).
    #[arg(long, conflicts_with = "pid", required_unless_present = "pid")]
    netns: Option<PathBuf>,
    /// A process whose network namespace is meant.
    #[arg(long)]
    pid: Option<u32>,
    /// The daemon's admin socket (enrollment is served only there; needs root).
    #[arg(long, default_value = admin::DEFAULT_SOCKET, env = "KMESH_ADMIN_SOCKET")]
    admin_socket: PathBuf,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once
enum Cmd {
    /// Run the daemon.
    Run {
        /// Local mesh configuration (YAML); re-read when it changes.
        #[arg(
            long,
            env = "KMESH_CONFIG",
            conflicts_with = "xds_address",
            required_unless_present = "xds_address"
        )]
        config: Option<PathBuf>,
        #[command(flatten)]
        xds: XdsArgs,
        #[command(flatten)]
        outlier: OutlierArgs,
        /// cgroup2 directory to attach to (default: the cgroup2 mount, i.e. every pod).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// bpffs directory for pinned maps and links.
        #[arg(long, default_value = "/sys/fs/bpf/kmesh")]
        bpffs: PathBuf,
        /// Address of the read-only admin API (loopback by default). Not read from the
        /// environment: `KMESH_ADMIN_ADDR` tells the CLI where a daemon is, and setting it for
        /// `kmeshctl` must not move the daemon.
        #[arg(long, default_value = "127.0.0.1:15200")]
        admin: SocketAddr,
        /// The root-only Unix socket serving the whole admin API, enrollment included.
        #[arg(long, default_value = admin::DEFAULT_SOCKET)]
        admin_socket: PathBuf,
        /// Prometheus scrape endpoint (`/status/metric`, as Kmesh); `off` to disable.
        #[arg(long, default_value = "0.0.0.0:15020")]
        metrics_addr: String,
        /// How often to check the config file for changes.
        #[arg(long, default_value_t = 500)]
        poll_ms: u64,
        /// Detach the programs and remove the pins on exit (default: leave them, so traffic
        /// keeps flowing while the daemon restarts).
        #[arg(long)]
        uninstall_on_exit: bool,
        /// Where enrolled namespaces are saved, so that a restarted or upgraded daemon keeps
        /// them with their workloads and authorization.
        #[arg(long, default_value = "/run/kmesh/state.json")]
        state_file: PathBuf,
        /// Pin under this map layout version instead of the built-in one (tests use it to
        /// play an older release).
        #[arg(long, hide = true)]
        map_layout_version: Option<u32>,
        #[command(flatten)]
        caps: CapacityArgs,
        #[command(flatten)]
        monitoring: MonitoringArgs,
        #[command(flatten)]
        kube: KubeArgs,
        /// Connections the node itself opens into pods (kubelet's health probes): `exempt`
        /// admits them without consulting policies, as Istio ambient does; `enforce` polices
        /// them like any other source without an identity.
        #[arg(long, default_value = "exempt", value_parser = ["exempt", "enforce"])]
        node_probes: String,
        /// The node's network namespace (default: the daemon's own, which is the node's in the
        /// DaemonSet: hostNetwork).
        #[arg(long, default_value = "/proc/self/ns/net")]
        node_netns: PathBuf,
        #[command(flatten)]
        dns: DnsArgs,
    },
    /// Put a network namespace in the mesh.
    Enroll {
        #[command(flatten)]
        target: Target,
        /// Uid of the workload (pod) the namespace belongs to; gives its locality.
        #[arg(long)]
        workload: Option<String>,
    },
    /// Take a network namespace out of the mesh.
    Unenroll {
        #[command(flatten)]
        target: Target,
    },
    /// Validate a config file without applying it.
    CheckConfig { file: PathBuf },
    /// Detach every program and remove every pin under the bpffs directory.
    Uninstall {
        #[arg(long, default_value = "/sys/fs/bpf/kmesh")]
        bpffs: PathBuf,
        /// The daemon's state file, removed too.
        #[arg(long, default_value = "/run/kmesh/state.json")]
        state_file: PathBuf,
    },
}

/// The Kubernetes source: this node's pods enrolled by label.
#[derive(Debug, clap::Args)]
struct KubeArgs {
    /// `auto`: on when running in a pod (KUBERNETES_SERVICE_HOST is set) or given
    /// --kubeconfig.
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    kubernetes: String,
    /// Talk to the API server with this kubeconfig instead of the pod's service account.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The cluster's id, as in Istio's workload uids (`<cluster>//Pod/<ns>/<name>`).
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    cluster_id: String,
    /// Where the CNI plugin (`kmesh-cni`) hands over new pods (with the Kubernetes source).
    #[arg(long, default_value = kmesh_cni::DEFAULT_SOCKET)]
    cni_socket: PathBuf,
    /// Chain the CNI plugin into the primary conflist of this directory (`/etc/cni/net.d`),
    /// chain it again whenever it is rewritten, and take it out on exit.
    #[arg(long)]
    cni_conf_dir: Option<PathBuf>,
    /// Install the plugin binary into this directory (`/opt/cni/bin`).
    #[arg(long)]
    cni_bin_dir: Option<PathBuf>,
    /// The plugin binary to install (default: `kmesh-cni` next to this executable).
    #[arg(long)]
    cni_plugin: Option<PathBuf>,
    /// Namespaces the plugin lets through without asking the daemon (they must start while
    /// it is down); the daemon's own namespace (POD_NAMESPACE) is always added.
    #[arg(long, value_delimiter = ',', default_value = "kube-system")]
    cni_exclude_namespaces: Vec<String>,
}

/// Connection telemetry at start; `kmeshctl monitoring` switches it at runtime.
#[derive(Debug, clap::Args)]
struct MonitoringArgs {
    /// Access log: one line per closed or failed connection, as `text` or `json`, or `off`.
    #[arg(long, default_value = "text", value_parser = ["text", "json", "off"])]
    access_log: String,
    /// `kmesh_tcp_*` metrics by destination service.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    service_metrics: bool,
    /// `kmesh_tcp_workload_*` metrics by destination workload.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    workload_metrics: bool,
    /// `kmesh_tcp_connection_*`: one series per open connection (high cardinality).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    connection_metrics: bool,
    /// How often open connections report their counters, in milliseconds.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..))]
    report_interval_ms: u64,
}

fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup2 mount found; pass --cgroup")
}

/// The pods' DNS proxies.
#[derive(clap::Args, Debug)]
struct DnsArgs {
    /// `on`: every enrolled pod's DNS queries (UDP and TCP to port 53 of any resolver) go to a
    /// proxy the daemon runs inside the pod's network namespace, which answers the mesh's
    /// service names and forwards the rest to the resolver the pod asked. `off`: untouched.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    dns_proxy: String,
    /// The proxies' port on 127.0.0.1 and ::1 inside each pod.
    #[arg(long, default_value_t = kmesh_daemon::dns::DEFAULT_PORT)]
    dns_port: u16,
    /// The cluster's DNS domain (the pods' search domains end with it).
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// How long a forwarded query waits for the resolver before the pod gets SERVFAIL.
    #[arg(long, default_value_t = 2000)]
    dns_upstream_timeout_ms: u64,
}

impl DnsArgs {
    fn options(&self) -> Option<kmesh_daemon::dns::DnsOptions> {
        (self.dns_proxy == "on").then(|| kmesh_daemon::dns::DnsOptions {
            port: self.dns_port,
            cluster_domain: self.cluster_domain.trim_matches('.').to_ascii_lowercase(),
            upstream_timeout: std::time::Duration::from_millis(self.dns_upstream_timeout_ms.max(1)),
        })
    }
}

/// jemalloc, not glibc's malloc: after a large push glibc consolidated millions of freed small
/// chunks inside a later allocation, a 70-130 ms stall of one apply at 10k services x 10
/// endpoints (one-change p99 109-136 ms with glibc, 23 ms with jemalloc; daemon CPU per change
/// about halved). ztunnel makes the same choice.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main`: memory a burst freed (the decode of a full push) goes
/// back to the system within about a second, by a background thread, instead of staying
/// resident until later allocations happen to purge it (jemalloc's default: 10 s, on
/// allocation). One arena, not four per CPU: the daemon's heavy work runs on one thread at a
/// time (the decode on two), each thread's cache takes the small allocations, and memory one
/// thread freed is reused by the next instead of sitting in another arena (10k x 10 peak RSS
/// 233 -> 185 MiB, 100k x 1 385 -> 363 MiB, push time unchanged). Thread caches keep objects up
/// to 4 KiB, not 32: every thread that took part in a push (the runtime's, the decode's) kept
/// its cache of larger ones while the daemon sat idle (10k x 10: RSS held -1.5 MiB, push time
/// unchanged over three interleaved runs). `_RJEM_MALLOC_CONF` overrides all of these.
#[cfg(feature = "jemalloc")]
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8; 89] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:1000,narenas:1,tcache_max:4096\0";

fn main() -> anyhow::Result<()> {
    kmesh_daemon::logging::init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run {
            config,
            xds,
            cgroup,
            bpffs,
            admin,
            admin_socket,
            poll_ms,
            uninstall_on_exit,
            state_file,
            map_layout_version,
            metrics_addr,
            caps,
            monitoring,
            kube,
            node_probes,
            node_netns,
            dns,
            outlier,
        } => {
            let cgroup = match cgroup {
                Some(c) => c,
                None => cgroup2_mount()?,
            };
            let source = match (config, xds.options()?) {
                (Some(_), None) if xds.mode == Mode::KernelNative => {
                    anyhow::bail!("--mode kernel-native takes Envoy's xDS: give --xds-address, not --config")
                }
                (Some(c), None) => Source::File(c),
                (None, Some(x)) if xds.mode == Mode::KernelNative => Source::EnvoyXds(Box::new(x)),
                (None, Some(x)) => Source::Xds(Box::new(x)),
                _ => anyhow::bail!("give exactly one of --config and --xds-address"),
            };
            let node_name = xds.node_name.clone();
            let mut opts = RunOptions::new(source, cgroup, bpffs);
            opts.outlier = outlier.options();
            opts.node_netns = (node_probes == "exempt").then_some(node_netns);
            opts.dns = dns.options();
            let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
            let k8s_on = match kube.kubernetes.as_str() {
                "on" => true,
                "off" => false,
                _ => in_cluster || kube.kubeconfig.is_some(),
            };
            if k8s_on {
                anyhow::ensure!(
                    !node_name.is_empty(),
                    "the Kubernetes source needs this node's name: give --node-name or set NODE_NAME"
                );
                opts.k8s = Some(kmesh_daemon::k8s::K8sOptions::new(
                    kube.kubeconfig.clone(),
                    &node_name,
                    &kube.cluster_id,
                ));
                let mut exclude = kube.cni_exclude_namespaces.clone();
                if let Ok(own) = std::env::var("POD_NAMESPACE")
                    && !own.is_empty()
                    && !exclude.contains(&own)
                {
                    exclude.push(own);
                }
                let plugin = match kube.cni_plugin.clone() {
                    Some(p) => p,
                    None => std::env::current_exe()?.with_file_name(kmesh_cni::PLUGIN_TYPE),
                };
                opts.cni = Some(kmesh_daemon::cni::CniOptions {
                    socket: kube.cni_socket.clone(),
                    conf_dir: kube.cni_conf_dir.clone(),
                    bin_dir: kube.cni_bin_dir.clone(),
                    plugin,
                    exclude_namespaces: exclude,
                });
            }
            opts.admin_addr = admin;
            opts.admin_socket = admin_socket;
            opts.poll = Duration::from_millis(poll_ms.max(50));
            opts.uninstall_on_exit = uninstall_on_exit;
            opts.state_file = Some(state_file);
            opts.metrics_addr = match metrics_addr.as_str() {
                "off" => None,
                a => Some(
                    a.parse().with_context(|| format!("--metrics-addr {a:?} is not ADDRESS:PORT or off"))?,
                ),
            };
            if let Some(v) = map_layout_version {
                opts.load.layout_version = v;
            }
            opts.monitoring = Monitoring {
                access_log: monitoring.access_log != "off",
                access_log_format: if monitoring.access_log == "json" {
                    LogFormat::Json
                } else {
                    LogFormat::Text
                },
                service_metrics: monitoring.service_metrics,
                workload_metrics: monitoring.workload_metrics,
                connection_metrics: monitoring.connection_metrics,
            };
            opts.report_interval = Duration::from_millis(monitoring.report_interval_ms);
            opts.load.ceilings = Capacities {
                netns: caps.netns_capacity,
                frontends: caps.frontends_capacity,
                tables: caps.lb_tables_capacity,
                endpoints: caps.endpoints_capacity,
                backends: caps.backends_capacity,
                ports: caps.ports_capacity,
                authz_dest: caps.authz_dest_capacity,
                identity: caps.identity_capacity,
                authz_region: caps.authz_region_capacity,
                authz_verdict: caps.authz_verdict_capacity,
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(daemon::run(opts))
        }
        Cmd::Enroll { target, workload } => {
            let req = EnrollRequest { netns: target.netns, pid: target.pid, workload };
            let body = admin::request(
                &target.admin_socket,
                "POST",
                "/v1/enroll",
                Some(&serde_json::to_string(&req)?),
            )?;
            println!("{body}");
            Ok(())
        }
        Cmd::Unenroll { target } => {
            let req = EnrollRequest { netns: target.netns, pid: target.pid, workload: None };
            let body = admin::request(
                &target.admin_socket,
                "POST",
                "/v1/unenroll",
                Some(&serde_json::to_string(&req)?),
            )?;
            println!("{body}");
            Ok(())
        }
        Cmd::CheckConfig { file } => {
            let m = config::load_file(&file)?;
            println!(
                "{}: ok ({} workloads, {} services)",
                file.display(),
                m.workloads.len(),
                m.services.len()
            );
            let mut c = kmesh_daemon::compile::Compiler::default();
            c.full(&m, &Default::default(), &Default::default());
            for x in c.conflicts() {
                println!(
                    "warning: {} is claimed by {} and {:?}; {} owns it",
                    x.frontend, x.owner, x.ignored, x.owner
                );
            }
            Ok(())
        }
        Cmd::Uninstall { bpffs, state_file } => {
            let removed =
                kernel::uninstall(&bpffs).with_context(|| format!("removing {}", bpffs.display()))?;
            println!("removed {} pins and directories under {}", removed.len(), bpffs.display());
            if std::fs::remove_file(&state_file).is_ok() {
                println!("removed {}", state_file.display());
            }
            Ok(())
        }
    }
}
