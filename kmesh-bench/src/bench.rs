//! The run: a testbed with one server pod (nginx, iperf3, the server-side Envoy) and one
//! client pod per data path, every path measured in interleaved rounds, then connect() cost
//! and the control plane at growing service counts.
//!
//! Each path has its own client pod so that no path pays for another's machinery: NAT rules
//! (and the conntrack they switch on) live only in the iptables and nftables pods, the eBPF
//! programs are attached only to the mesh pod's cgroup, and the Envoy sidecars run only in
//! the Envoy pods (plus the server-side one, which only the both-sides path dials).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use kmesh_testbed::{Pod, PodSpec, Testbed};

use crate::envoy::{EnvoySpec, WaypointSpec, bootstrap, waypoint_bootstrap};
use crate::mesh::{Daemon, Member, config_yaml};
use crate::probe::ProbeResult;
use crate::procs::{self, cpu_total, machine_busy_seconds, run_bounded, wait_listening};
use crate::results::{BpfCost, ControlPoint, Method, PATHS, Results, Sample, ScaleSample, TESTS};
use crate::rules::{self, BULK_PORT, HTTP_PORT, NGINX_PORT, VIP};
use crate::tools::{parse_iperf3, parse_wrk};

pub const BODY_BYTES: usize = 64;
/// Where the service VIPs live (the iptables and nftables pods route it onto the bridge).
const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The slice of time each path's in-repo client works in turn when all run at once: long
/// next to a transaction (~0.1 ms), short next to the seconds over which this machine's speed
/// drifts.
pub const TURN_MS: u64 = 50;
const ENVOY_HTTP: u16 = 15001;
const ENVOY_TCP: u16 = 15002;
const ENVOY_IN_HTTP: u16 = 15006;
const ENVOY_IN_TCP: u16 = 15007;
/// The service whose connections go through the waypoint (pod `wp`, Envoy taking PROXY
/// protocol on `WAYPOINT_PORT`), and the waypoint's own service.
const WAYPOINTED_VIP: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 1);
const WAYPOINT_VIP: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 2);
const WAYPOINT_PORT: u16 = 15088;

#[derive(Clone, Debug)]
pub struct Options {
    pub smoke: bool,
    pub rounds: usize,
    pub seconds: u64,
    pub probe_ms: u64,
    pub scale: Vec<usize>,
    pub scale_rounds: usize,
    pub base_services: usize,
    pub nginx_workers: u32,
    pub envoy_concurrency: u32,
    pub envoy_bin: PathBuf,
    pub iptables_full_chains: usize,
    pub nft_full_chains: usize,
    /// Only these request tests / paths (empty: all), for focused comparisons.
    pub only_tests: Vec<String>,
    pub only_paths: Vec<String>,
}

impl Options {
    pub fn wants_test(&self, t: &str) -> bool {
        self.only_tests.is_empty() || self.only_tests.iter().any(|x| x == t)
    }

    pub fn wants_path(&self, p: &str) -> bool {
        self.only_paths.is_empty() || self.only_paths.iter().any(|x| x == p)
    }

    pub fn method(&self) -> Method {
        Method {
            rounds: self.rounds,
            seconds_per_run: self.seconds,
            probe_ms: self.probe_ms,
            scale_points: self.scale.clone(),
            scale_rounds: self.scale_rounds,
            base_services: self.base_services,
            nginx_workers: self.nginx_workers,
            envoy_concurrency: self.envoy_concurrency,
            body_bytes: BODY_BYTES,
            iptables_full_chains: self.iptables_full_chains,
            nft_full_chains: self.nft_full_chains,
        }
    }
}

/// What the Ctrl-C handler needs to stop the daemon: its pid and bpffs folder.
pub type DaemonSlot = Arc<Mutex<Option<(u32, PathBuf)>>>;

/// How a path is reached from its client pod.
struct PathDef {
    id: &'static str,
    pod: String,
    /// Where the HTTP client dials.
    http: SocketAddr,
    /// Where iperf3 dials.
    bulk: SocketAddr,
    /// The sidecars of this path (their CPU is the path's proxy CPU).
    proxies: Vec<u32>,
}

pub struct Env {
    // Field order is drop order: the daemon first, then the servers, then the pods.
    daemon: Option<Daemon>,
    daemon_slot: DaemonSlot,
    servers: Vec<Child>,
    bed: Testbed,
    dir: PathBuf,
    bpffs: PathBuf,
    server_ip: Ipv4Addr,
    nginx: Vec<u32>,
    iperf: u32,
    envoy_client: u32,
    envoy_client2: u32,
    envoy_server: u32,
    envoy_waypoint: u32,
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop();
        }
        *self.daemon_slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
        for c in &mut self.servers {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sysctl(pod: &Pod, kv: &[&str]) {
    // Per-namespace settings; a missing key (e.g. conntrack not loaded yet) is not fatal.
    let _ = pod.sysctl(kv);
}

fn spawn_logged(mut cmd: Command, log: &Path) -> anyhow::Result<Child> {
    let f = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let f2 = f.try_clone()?;
    let c = cmd.stdin(Stdio::null()).stdout(f).stderr(f2).spawn();
    c.with_context(|| format!("starting {:?}", cmd.get_program()))
}

/// `yaml` (a daemon config) plus the waypointed service (WAYPOINTED_VIP, backed by the
/// server pod's workload `server`) whose waypoint is the pod `wp` (its own service at WAYPOINT_VIP, PROXY
/// protocol on WAYPOINT_PORT).
fn with_waypoint(yaml: &str, server: Ipv4Addr, wp: Ipv4Addr) -> String {
    let services = format!(
        "  - {{name: waypointed, namespace: bench, hostname: waypointed.bench.svc.cluster.local, addresses: [{WAYPOINTED_VIP}], ports: [{{service_port: {HTTP_PORT}, target_port: {NGINX_PORT}}}, {{service_port: {BULK_PORT}}}], waypoint: {{address: {WAYPOINT_VIP}}}}}
  - {{name: waypoint, namespace: bench, hostname: waypoint.bench.svc.cluster.local, addresses: [{WAYPOINT_VIP}], ports: [{{service_port: 15021}}]}}
workloads:
  - {{uid: wp, name: wp, namespace: bench, addresses: [{wp}], node: node-a, service_account: waypoint, services: {{bench/waypoint.bench.svc.cluster.local: []}}, application_tunnel: {{protocol: PROXY, port: {WAYPOINT_PORT}}}}}
"
    );
    // The server pod's workload backs the waypointed service too (an address has one workload).
    let server_line = format!("addresses: [{server}],");
    yaml.replacen("workloads:\n", &services, 1)
        .lines()
        .map(|l| {
            if l.contains("{uid: server,") && l.contains(&server_line) {
                l.replacen("services: {", "services: {bench/waypointed.bench.svc.cluster.local: [], ", 1)
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn nginx_conf(dir: &Path, listen: &[SocketAddr], workers: u32) -> String {
    let body = "x".repeat(BODY_BYTES - 1) + "\n";
    let listens: String = listen.iter().map(|a| format!("    listen {a} backlog=4096;\n")).collect();
    format!(
        "daemon off;
master_process on;
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log crit;
events {{
  worker_connections 8192;
}}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_requests 100000000;
  keepalive_timeout 120s;
  server {{
{listens}    location / {{
      default_type text/plain;
      return 200 \"{body_esc}\";
    }}
  }}
}}
",
        d = dir.display(),
        body_esc = body.replace('\n', "\\n"),
    )
}

impl Env {
    pub fn setup(opts: &Options, daemon_slot: DaemonSlot) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("kmesh-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let bpffs = PathBuf::from(format!("/sys/fs/bpf/kmesh-bench-{}", std::process::id()));
        let mut bed = Testbed::new().context("creating the testbed (needs root)")?;
        for name in ["server", "c-direct", "c-kmesh", "c-ipt", "c-nft", "c-envoy", "c-envoy2", "wp"] {
            let mut spec = PodSpec::new(name, "node-a", "zone-a");
            spec.ipv6 = false;
            let pod = bed.add_pod(spec)?;
            // Short-connection runs open tens of thousands of connections.
            sysctl(&pod, &["net.ipv4.ip_local_port_range=1024 65000", "net.ipv4.tcp_tw_reuse=1"]);
            if name == "c-ipt" || name == "c-nft" {
                // The kernel routes a connect() before NAT sees its SYN, so, as on a node,
                // the VIP range needs a route: here onto the testbed's isolated bridge (no
                // default route, no uplink; a VIP that NAT misses goes nowhere).
                kmesh_testbed::ip(&["-n", &pod.netns, "route", "add", SERVICE_CIDR, "dev", "eth0"])?;
            }
        }
        let server = bed.pod("server").clone();
        let sip = server.ipv4;
        let mut env = Env {
            daemon: None,
            daemon_slot,
            servers: Vec::new(),
            bed,
            dir: dir.clone(),
            bpffs,
            server_ip: sip,
            nginx: Vec::new(),
            iperf: 0,
            envoy_client: 0,
            envoy_client2: 0,
            envoy_server: 0,
            envoy_waypoint: 0,
        };

        // nginx in the server pod, on the pod address and on loopback (for the server Envoy).
        let ndir = dir.join("nginx");
        std::fs::create_dir_all(&ndir)?;
        let conf = ndir.join("nginx.conf");
        let listen: Vec<SocketAddr> =
            vec![(sip, NGINX_PORT).into(), (Ipv4Addr::LOCALHOST, NGINX_PORT).into()];
        std::fs::write(&conf, nginx_conf(&ndir, &listen, opts.nginx_workers))?;
        let mut c = server.command("nginx");
        c.arg("-p").arg(&ndir).arg("-c").arg(&conf).arg("-e").arg(ndir.join("error.log"));
        let mut child = spawn_logged(c, &ndir.join("stdout.log"))?;
        wait_listening(&mut child, &[NGINX_PORT], Duration::from_secs(10)).context("nginx did not start")?;
        let master = child.id();
        env.servers.push(child);
        let t0 = Instant::now();
        while procs::process_tree(master).len() < 1 + opts.nginx_workers as usize
            && t0.elapsed().as_secs() < 5
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        env.nginx = procs::process_tree(master);

        // iperf3 server for the bulk transfer.
        let mut c = server.command("iperf3");
        c.args(["-s", "-p", &BULK_PORT.to_string()]);
        let mut child = spawn_logged(c, &dir.join("iperf3.log"))?;
        wait_listening(&mut child, &[BULK_PORT], Duration::from_secs(10))
            .context("iperf3 -s did not start")?;
        env.iperf = child.id();
        env.servers.push(child);

        // Envoys: server-side sidecar, client sidecar alone, client sidecar for both sides.
        let lo = |p: u16| -> SocketAddr { (Ipv4Addr::LOCALHOST, p).into() };
        let srv = |p: u16| -> SocketAddr { (sip, p).into() };
        let specs = [
            (
                "server",
                "envoy-server",
                EnvoySpec {
                    admin: lo(15000),
                    http_listen: srv(ENVOY_IN_HTTP),
                    http_upstream: lo(NGINX_PORT),
                    tcp_listen: srv(ENVOY_IN_TCP),
                    tcp_upstream: lo(BULK_PORT),
                },
                [ENVOY_IN_HTTP, ENVOY_IN_TCP],
            ),
            (
                "c-envoy",
                "envoy-client",
                EnvoySpec {
                    admin: lo(15000),
                    http_listen: lo(ENVOY_HTTP),
                    http_upstream: srv(NGINX_PORT),
                    tcp_listen: lo(ENVOY_TCP),
                    tcp_upstream: srv(BULK_PORT),
                },
                [ENVOY_HTTP, ENVOY_TCP],
            ),
            (
                "c-envoy2",
                "envoy-client2",
                EnvoySpec {
                    admin: lo(15000),
                    http_listen: lo(ENVOY_HTTP),
                    http_upstream: srv(ENVOY_IN_HTTP),
                    tcp_listen: lo(ENVOY_TCP),
                    tcp_upstream: srv(ENVOY_IN_TCP),
                },
                [ENVOY_HTTP, ENVOY_TCP],
            ),
        ];
        // The waypoint: the mesh client's connections to WAYPOINTED_VIP arrive here with a
        // PROXY header (the daemon config names this pod's service as that service's waypoint).
        let waypoint = waypoint_bootstrap(&WaypointSpec {
            admin: lo(15000),
            listen: (Ipv4Addr::UNSPECIFIED, WAYPOINT_PORT).into(),
            vip: WAYPOINTED_VIP,
            http_port: HTTP_PORT,
            http_upstream: srv(NGINX_PORT),
            bulk_port: BULK_PORT,
            bulk_upstream: srv(BULK_PORT),
        });
        let configs = specs
            .into_iter()
            .map(|(pod, name, spec, ports)| (pod, name, bootstrap(&spec), ports.to_vec()))
            .chain([("wp", "envoy-waypoint", waypoint, vec![WAYPOINT_PORT])]);
        let mut started = Vec::new();
        for (pod, name, yaml, ports) in configs {
            let cfg = dir.join(format!("{name}.yaml"));
            std::fs::write(&cfg, yaml)?;
            let mut c = env.bed.pod(pod).command(&opts.envoy_bin);
            c.arg("-c").arg(&cfg).args([
                "--concurrency",
                &opts.envoy_concurrency.to_string(),
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ]);
            let child = spawn_logged(c, &dir.join(format!("{name}.log")))?;
            started.push((child, ports, name));
        }
        for (mut child, ports, name) in started {
            let r = wait_listening(&mut child, &ports, Duration::from_secs(30));
            let pid = child.id();
            env.servers.push(child);
            r.with_context(|| {
                format!("{name} did not start (log: {})", dir.join(format!("{name}.log")).display())
            })?;
            match name {
                "envoy-server" => env.envoy_server = pid,
                "envoy-client" => env.envoy_client = pid,
                "envoy-waypoint" => env.envoy_waypoint = pid,
                _ => env.envoy_client2 = pid,
            }
        }
        Ok(env)
    }

    fn paths(&self) -> Vec<PathDef> {
        let sip = self.server_ip;
        let vip = |p| SocketAddr::from((VIP, p));
        let lo = |p| SocketAddr::from((Ipv4Addr::LOCALHOST, p));
        let daemon = self.daemon.as_ref().map(|d| vec![d.pid()]).unwrap_or_default();
        let def = |id, pod: &str, http, bulk, proxies| PathDef { id, pod: pod.into(), http, bulk, proxies };
        vec![
            def("direct", "c-direct", (sip, NGINX_PORT).into(), (sip, BULK_PORT).into(), vec![]),
            def("kmesh", "c-kmesh", vip(HTTP_PORT), vip(BULK_PORT), daemon.clone()),
            def(
                "kmesh-waypoint",
                "c-kmesh",
                (WAYPOINTED_VIP, HTTP_PORT).into(),
                (WAYPOINTED_VIP, BULK_PORT).into(),
                daemon.into_iter().chain([self.envoy_waypoint]).collect(),
            ),
            def("iptables", "c-ipt", vip(HTTP_PORT), vip(BULK_PORT), vec![]),
            def("nftables", "c-nft", vip(HTTP_PORT), vip(BULK_PORT), vec![]),
            def("envoy-client", "c-envoy", lo(ENVOY_HTTP), lo(ENVOY_TCP), vec![self.envoy_client]),
            def(
                "envoy-both",
                "c-envoy2",
                lo(ENVOY_HTTP),
                lo(ENVOY_TCP),
                vec![self.envoy_client2, self.envoy_server],
            ),
        ]
    }

    /// Loads `n` services into iptables (c-ipt pod); seconds taken.
    fn program_iptables(&self, n: usize, full: usize) -> anyhow::Result<f64> {
        let text = rules::iptables_restore(&rules::services(n, self.server_ip), full);
        self.load_rules("c-ipt", "iptables.rules", &text, &["iptables-restore"])
    }

    /// Loads `n` services into nftables (c-nft pod); seconds taken.
    fn program_nft(&self, n: usize, full: usize) -> anyhow::Result<f64> {
        let text = rules::nft_script(&rules::services(n, self.server_ip), full);
        self.load_rules("c-nft", "kube-proxy.nft", &text, &["nft", "-f"])
    }

    /// Writes `text` to `file` and loads it with `loader FILE` inside `pod`; seconds the
    /// loader took. Conntrack then forgets closed connections at once, as the short-connection
    /// tests would otherwise fill its table.
    fn load_rules(&self, pod: &str, file: &str, text: &str, loader: &[&str]) -> anyhow::Result<f64> {
        let file = self.dir.join(file);
        std::fs::write(&file, text)?;
        let pod = self.bed.pod(pod);
        let t0 = Instant::now();
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &pod.netns]).args(loader).arg(&file);
        run_bounded(&mut c, Duration::from_secs(300))?;
        let dt = t0.elapsed().as_secs_f64();
        sysctl(
            pod,
            &[
                "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1",
                "net.netfilter.nf_conntrack_tcp_timeout_close=1",
            ],
        );
        Ok(dt)
    }

    /// (Re)starts the daemon with `n` services and enrolls the mesh client pod.
    fn start_daemon(&mut self, n: usize) -> anyhow::Result<ControlPoint> {
        if let Some(mut d) = self.daemon.take() {
            d.stop();
            *self.daemon_slot.lock().unwrap() = None;
        }
        let client = self.bed.pod("c-kmesh").clone();
        let members = [
            Member { uid: "server", address: self.server_ip },
            Member { uid: "c-kmesh", address: client.ipv4 },
        ];
        let cfg = self.dir.join("mesh.yaml");
        let yaml = config_yaml(&rules::services(n, self.server_ip), &members, "server");
        std::fs::write(&cfg, with_waypoint(&yaml, self.server_ip, self.bed.pod("wp").ipv4))?;
        let d = Daemon::start(&cfg, &client.cgroup, &self.bpffs, &self.dir, Duration::from_secs(300))?;
        *self.daemon_slot.lock().unwrap() = Some((d.pid(), self.bpffs.clone()));
        let cpu_s = procs::cpu_seconds(d.pid());
        d.enroll(&client.netns_path(), "c-kmesh")?;
        let (rss_mib, hwm_mib) = procs::memory_mib(d.pid());
        let maps = procs::bpf_maps(d.pid());
        let point = ControlPoint {
            services: n,
            path: "kmesh".into(),
            program_s: d.ready_after.as_secs_f64(),
            cpu_s,
            rss_mib,
            hwm_mib,
            bpf_map_bytes: maps.iter().map(|m| m.bytes).sum(),
            bpf_maps: maps.len(),
            maps,
            frontends: d.metric("kmesh_map_entries{map=\"FRONTENDS\"}"),
            error: None,
        };
        self.daemon = Some(d);
        Ok(point)
    }

    fn probe(
        &self,
        pod: &str,
        target: SocketAddr,
        http: bool,
        ms: u64,
    ) -> anyhow::Result<(ProbeResult, f64)> {
        self.probe_turn(pod, target, http, ms, None, 1)
    }

    /// [`Self::probe`] as turn `turn.0` of `turn.1` probes sharing `ms` of time.
    fn probe_turn(
        &self,
        pod: &str,
        target: SocketAddr,
        http: bool,
        ms: u64,
        turn: Option<(usize, usize)>,
        clients: u32,
    ) -> anyhow::Result<(ProbeResult, f64)> {
        let exe = std::env::current_exe()?;
        let mut c = self.bed.pod(pod).command(exe);
        c.args(["probe", "--target", &target.to_string(), "--duration-ms", &ms.to_string()]);
        if http {
            c.arg("--http");
        }
        if clients > 1 {
            c.args(["--clients", &clients.to_string()]);
        }
        if let Some((i, n)) = turn {
            c.args(["--turn", &i.to_string(), "--turns", &n.to_string(), "--turn-ms", &TURN_MS.to_string()]);
        }
        let f = run_bounded(&mut c, Duration::from_millis(ms + 15_000))?;
        let r: ProbeResult = serde_json::from_str(f.stdout.trim())
            .with_context(|| format!("probe output {:?} {:?}", f.stdout, f.stderr))?;
        Ok((r, f.cpu_s))
    }

    /// One probe per `(pod, target)`, all at once, taking turns of [`TURN_MS`]: each works
    /// `ms` in all (the run lasts `ms` times their number) with `clients` connections at a time.
    /// Results in the order given.
    fn probe_interleaved(
        &self,
        probes: &[(&str, SocketAddr)],
        http: bool,
        ms: u64,
        clients: u32,
    ) -> anyhow::Result<Vec<(ProbeResult, f64)>> {
        let n = probes.len();
        let total = ms * n as u64;
        std::thread::scope(|s| {
            let running: Vec<_> = probes
                .iter()
                .enumerate()
                .map(|(i, (pod, target))| {
                    s.spawn(move || self.probe_turn(pod, *target, http, total, Some((i, n)), clients))
                })
                .collect();
            running
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("probe thread panicked"))))
                .collect()
        })
    }

    /// One request over every path: each must answer, and the mesh path must have been
    /// rewritten in connect() (its socket's peer is the server pod, not the VIP).
    fn validate(&self) -> anyhow::Result<Vec<String>> {
        let mut lines = Vec::new();
        for p in self.paths() {
            let (r, _) = self.probe(&p.pod, p.http, true, 300)?;
            if r.count == 0 || r.errors > 0 {
                bail!(
                    "path {} does not work: {} requests answered, {} failed (errno {:?})",
                    p.id,
                    r.count,
                    r.errors,
                    r.first_errno
                );
            }
            if p.id == "kmesh" && r.peer != Some(format!("{}:{NGINX_PORT}", self.server_ip)) {
                bail!("the mesh path was not rewritten in connect(): peer {:?}", r.peer);
            }
            lines.push(format!("{:<13} {} -> peer {}", p.id, p.http, r.peer.unwrap_or_default()));
        }
        Ok(lines)
    }

    fn run_wrk(&self, p: &PathDef, conns: u32, short: bool, secs: u64) -> anyhow::Result<Sample> {
        let threads = conns.min(2);
        let mut c = self.bed.pod(&p.pod).command("wrk");
        c.args(["-t", &threads.to_string(), "-c", &conns.to_string(), "-d", &format!("{secs}s")]);
        c.args(["--latency", "--timeout", "2s"]);
        if short {
            c.args(["-H", "Connection: close"]);
        }
        c.arg(format!("http://{}/", p.http));
        let (s0, p0, m0) = (cpu_total(&self.nginx), cpu_total(&p.proxies), machine_busy_seconds());
        let f = run_bounded(&mut c, Duration::from_secs(secs + 20))?;
        let (s1, p1, m1) = (cpu_total(&self.nginx), cpu_total(&p.proxies), machine_busy_seconds());
        let w = parse_wrk(&f.stdout)?;
        Ok(Sample {
            requests: w.requests,
            errors: w.errors,
            rps: w.rps,
            p50_us: w.p50_us,
            p90_us: w.p90_us,
            p99_us: w.p99_us,
            cpu_client_s: f.cpu_s,
            cpu_server_s: s1 - s0,
            cpu_proxy_s: p1 - p0,
            cpu_machine_s: m1 - m0,
            wall_s: f.wall_s,
            ..Default::default()
        })
    }

    /// Short transactions over every path of `paths` at once, in turns (see
    /// [`Self::probe_interleaved`]): `ms` of work each, `clients` at a time. nginx serves them
    /// all: its CPU is read at every turn's end and charged to the path whose turn it was (the
    /// kernel's work for a client socket, e.g. sock_ops on an acknowledgement, often runs in the
    /// server's context); the machine's is shared out by requests served. Each path's client is
    /// its own, and so are its proxies but for one that several paths share (the daemon serves
    /// both mesh paths; it works in its own time, not in their turns), whose CPU is shared out
    /// between them by requests served.
    fn run_txn(&self, paths: &[&PathDef], ms: u64, clients: u32) -> anyhow::Result<Vec<Sample>> {
        let mut proxy_pids: Vec<u32> = paths.iter().flat_map(|p| p.proxies.iter().copied()).collect();
        proxy_pids.sort_unstable();
        proxy_pids.dedup();
        let proxies0: BTreeMap<u32, f64> = proxy_pids.iter().map(|&p| (p, cpu_total(&[p]))).collect();
        let (s0, m0) = (cpu_total(&self.nginx), machine_busy_seconds());
        let t0 = Instant::now();
        let jobs: Vec<(&str, SocketAddr)> = paths.iter().map(|p| (p.pod.as_str(), p.http)).collect();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (results, by_turn) = std::thread::scope(|s| {
            let meter = s.spawn(|| {
                procs::cpu_by_turn(&self.nginx, Duration::from_millis(TURN_MS), paths.len(), &stop)
            });
            let r = self.probe_interleaved(&jobs, true, ms, clients);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            (r, meter.join().ok().flatten())
        });
        let results = results?;
        let wall = t0.elapsed().as_secs_f64();
        let (s1, m1) = (cpu_total(&self.nginx), machine_busy_seconds());
        let all = results.iter().map(|(r, _)| r.count).sum::<u64>().max(1) as f64;
        // Each proxy's CPU over the stretch, and the requests of the paths it serves.
        let proxy_cpu: BTreeMap<u32, (f64, u64)> = proxy_pids
            .iter()
            .map(|&pid| {
                let served = paths.iter().zip(&results).filter(|(p, _)| p.proxies.contains(&pid));
                (pid, (cpu_total(&[pid]) - proxies0[&pid], served.map(|(_, (r, _))| r.count).sum()))
            })
            .collect();
        Ok(paths
            .iter()
            .zip(results)
            .enumerate()
            .map(|(i, (p, (r, cpu)))| {
                let share = r.count as f64 / all;
                let proxy: f64 = p
                    .proxies
                    .iter()
                    .map(|pid| {
                        let (s, n) = proxy_cpu[pid];
                        s * r.count as f64 / n.max(1) as f64
                    })
                    .sum();
                let server = by_turn.as_ref().map(|v| v[i] as f64 / 1e9).unwrap_or((s1 - s0) * share);
                Sample {
                    requests: r.count,
                    errors: r.errors,
                    rps: r.count as f64 / (ms as f64 / 1000.0),
                    p50_us: r.p50_us,
                    p90_us: r.p90_us,
                    p99_us: r.p99_us,
                    cpu_client_s: cpu,
                    cpu_server_s: server,
                    cpu_proxy_s: proxy,
                    cpu_machine_s: (m1 - m0) * share,
                    wall_s: wall,
                    ..Default::default()
                }
            })
            .collect())
    }

    /// Short transactions over `p` with the kernel counting the run time of every eBPF
    /// program, for the cost per transaction of the data plane's programs.
    fn bpf_cost(&self, p: &PathDef, ms: u64) -> anyhow::Result<BpfCost> {
        let _stats = BpfStats::enable()?;
        let before = prog_stats()?;
        let (r, _) = self.probe(&p.pod, p.http, true, ms)?;
        let after = prog_stats()?;
        let n = r.count.max(1) as f64;
        let programs = after
            .iter()
            .filter_map(|(name, (runs, ns))| {
                let (r0, n0) = before.get(name).copied().unwrap_or((0, 0));
                let runs = runs.saturating_sub(r0);
                (runs > 0).then(|| (name.clone(), (runs as f64 / n, ns.saturating_sub(n0) as f64 / n)))
            })
            .collect();
        Ok(BpfCost { path: p.id.into(), transactions: r.count, p50_us: r.p50_us, programs })
    }

    fn run_bulk(&self, p: &PathDef, secs: u64) -> anyhow::Result<Sample> {
        let mut last = None;
        for _ in 0..10 {
            let mut c = self.bed.pod(&p.pod).command("iperf3");
            c.args(["-c", &p.bulk.ip().to_string(), "-p", &p.bulk.port().to_string()]);
            c.args(["-t", &secs.to_string(), "-J", "--connect-timeout", "2000"]);
            let srv = [self.iperf];
            let (s0, p0, m0) = (cpu_total(&srv), cpu_total(&p.proxies), machine_busy_seconds());
            // iperf3 exits non-zero on failure but still prints its JSON.
            let out = run_bounded(&mut c, Duration::from_secs(secs + 20));
            let (s1, p1, m1) = (cpu_total(&srv), cpu_total(&p.proxies), machine_busy_seconds());
            let (text, cpu, wall) = match &out {
                Ok(f) => (f.stdout.clone(), f.cpu_s, f.wall_s),
                Err(procs::ProcError::Failed { stderr, .. }) => (stderr.clone(), 0.0, 0.0),
                Err(e) => bail!("iperf3: {e}"),
            };
            match parse_iperf3(&text) {
                Ok(gbps) => {
                    return Ok(Sample {
                        gbps,
                        cpu_client_s: cpu,
                        cpu_server_s: s1 - s0,
                        cpu_proxy_s: p1 - p0,
                        cpu_machine_s: m1 - m0,
                        wall_s: wall,
                        ..Default::default()
                    });
                }
                Err(e) => {
                    // The server takes one test at a time and may still be closing the last.
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(300));
                }
            }
        }
        bail!("iperf3 over {}: {}", p.id, last.map(|e| e.to_string()).unwrap_or_default())
    }
}

/// `kernel.bpf_stats_enabled` on while held (each program run then also reads the clock
/// twice, a few tens of nanoseconds), back to what it was when dropped.
struct BpfStats(String);

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> anyhow::Result<Self> {
        let old = std::fs::read_to_string(BPF_STATS).with_context(|| format!("reading {BPF_STATS}"))?;
        std::fs::write(BPF_STATS, "1").with_context(|| format!("writing {BPF_STATS}"))?;
        Ok(Self(old.trim().to_string()))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.0);
    }
}

/// Run count and run time (ns) of every loaded eBPF program named `kmesh_*`, summed by name
/// (from `bpftool prog show`).
fn prog_stats() -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    let out = Command::new("bpftool").args(["prog", "show", "-j"]).output().context("running bpftool")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool prog show -j")?;
    let mut m: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for p in v.as_array().into_iter().flatten() {
        let Some(name) = p["name"].as_str().filter(|n| n.starts_with("kmesh_")) else { continue };
        let e = m.entry(name.to_string()).or_default();
        e.0 += p["run_cnt"].as_u64().unwrap_or(0);
        e.1 += p["run_time_ns"].as_u64().unwrap_or(0);
    }
    Ok(m)
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[bench] {}", msg.as_ref());
}

/// Runs everything and fills `res`.
pub fn run(opts: &Options, res: &mut Results, daemon_slot: DaemonSlot) -> anyhow::Result<()> {
    let t_setup = Instant::now();
    let mut env = Env::setup(opts, daemon_slot)?;
    let base = opts.base_services;
    let ipt_s = env.program_iptables(base, opts.iptables_full_chains)?;
    let nft_s = env.program_nft(base, opts.nft_full_chains)?;
    let cp = env.start_daemon(base)?;
    log(format!(
        "testbed ready in {:.1}s: nginx, iperf3, 3 Envoys; {base} services in iptables ({ipt_s:.2}s), nftables ({nft_s:.2}s), kmesh-daemon ({:.2}s)",
        t_setup.elapsed().as_secs_f64(),
        cp.program_s
    ));
    for l in env.validate()? {
        log(format!("  {l}"));
    }
    let paths: Vec<PathDef> = env.paths().into_iter().filter(|p| opts.wants_path(p.id)).collect();

    // Warm-up: caches, Envoy's upstream pools, nginx workers.
    for p in &paths {
        env.run_wrk(p, 2, false, 1).with_context(|| format!("warm-up of {}", p.id))?;
    }

    // Data paths: for each round and test, every path in turn, starting at a different path
    // each round (A B C .. then B C .. A), so that drift hits every path alike.
    let n = paths.len();
    for round in 0..opts.rounds {
        let t_round = Instant::now();
        let order: Vec<&PathDef> = (0..n).map(|i| &paths[(i + round) % n]).collect();
        for (test, _, conns) in TESTS.into_iter().filter(|t| opts.wants_test(t.0)) {
            if test.starts_with("txn-") {
                // The in-repo client runs every path at once, in turns.
                let samples = env
                    .run_txn(&order, opts.probe_ms, conns)
                    .with_context(|| format!("{test} over every path"))?;
                for (p, mut s) in order.iter().zip(samples) {
                    s.round = round;
                    s.test = test.into();
                    s.path = p.id.into();
                    res.samples.push(s);
                }
                continue;
            }
            for p in &order {
                let mut s = env
                    .run_wrk(p, conns, test.starts_with("short"), opts.seconds)
                    .with_context(|| format!("{test} over {}", p.id))?;
                s.round = round;
                s.test = test.into();
                s.path = p.id.into();
                res.samples.push(s);
            }
        }
        for p in order.iter().filter(|_| opts.wants_test("bulk")) {
            let mut s = env.run_bulk(p, opts.seconds).with_context(|| format!("bulk over {}", p.id))?;
            s.round = round;
            s.test = "bulk".into();
            s.path = p.id.into();
            res.samples.push(s);
        }
        log(format!("round {}/{} done in {:.0}s", round + 1, opts.rounds, t_round.elapsed().as_secs_f64()));
    }
    // The kernel's own account of the programs' run time, per transaction, on the paths
    // without a proxy (the direct client's sockets pass through the same hooks).
    if opts.wants_test("txn-c1") && opts.rounds > 0 {
        for p in paths.iter().filter(|p| p.id == "direct" || p.id == "kmesh") {
            match env.bpf_cost(p, opts.probe_ms) {
                Ok(c) => {
                    let per: Vec<String> = c
                        .programs
                        .iter()
                        .map(|(n, (runs, ns))| format!("{n} {runs:.1} runs {ns:.0} ns"))
                        .collect();
                    log(format!(
                        "eBPF per transaction over {}: {:.0} ns in {:.1} runs ({})",
                        p.id,
                        c.total_ns(),
                        c.total_runs(),
                        per.join(", ")
                    ));
                    res.bpf_cost.push(c);
                }
                Err(e) => res.notes.push(format!("eBPF run time over {} not measured: {e:#}", p.id)),
            }
        }
    }
    for (test, _, _) in TESTS.iter().chain([&("bulk", "", 0)]) {
        let line: Vec<String> = PATHS
            .iter()
            .map(|(p, _)| {
                let s = res.summary(test, p);
                if *test == "bulk" {
                    format!("{p} {:.1}G", s.gbps.unwrap_or(0.0))
                } else {
                    format!("{p} {:.0}us/{:.0}rps", s.p50_us.unwrap_or(0.0), s.rps.unwrap_or(0.0))
                }
            })
            .collect();
        log(format!("{test}: {}", line.join(", ")));
    }

    // Scale: connect() cost and programming time as the number of services grows.
    for &svcs in &opts.scale {
        let t_point = Instant::now();
        let mut failed: Vec<&str> = Vec::new();
        let loaded = [
            ("iptables", env.program_iptables(svcs, opts.iptables_full_chains)),
            ("nftables", env.program_nft(svcs, opts.nft_full_chains)),
        ];
        for (path, r) in loaded {
            match r {
                Ok(s) => res.control_plane.push(ControlPoint {
                    services: svcs,
                    path: path.into(),
                    program_s: s,
                    ..Default::default()
                }),
                Err(e) => {
                    failed.push(path);
                    res.notes.push(format!("{path} with {svcs} services could not be loaded: {e:#}"));
                }
            }
        }
        match env.start_daemon(svcs) {
            Ok(cp) => res.control_plane.push(cp),
            Err(e) => {
                failed.push("kmesh");
                res.notes.push(format!("kmesh-daemon with {svcs} services: {e:#}"));
                res.control_plane.push(ControlPoint {
                    services: svcs,
                    path: "kmesh".into(),
                    error: Some(format!("{e:#}")),
                    ..Default::default()
                });
            }
        }
        let probes: Vec<(&str, &str, SocketAddr)> = vec![
            ("direct", "c-direct", (env.server_ip, NGINX_PORT).into()),
            ("kmesh", "c-kmesh", (VIP, HTTP_PORT).into()),
            ("iptables", "c-ipt", (VIP, HTTP_PORT).into()),
            ("nftables", "c-nft", (VIP, HTTP_PORT).into()),
        ];
        let probes: Vec<_> = probes.into_iter().filter(|(p, _, _)| !failed.contains(p)).collect();
        for round in 0..opts.scale_rounds {
            // Every path at once, in turns (a different path first each round).
            let order: Vec<_> = (0..probes.len()).map(|i| probes[(i + round) % probes.len()]).collect();
            let jobs: Vec<(&str, SocketAddr)> =
                order.iter().map(|(_, pod, target)| (*pod, *target)).collect();
            let results = env.probe_interleaved(&jobs, false, opts.probe_ms, 1)?;
            for ((path, _, _), (r, _)) in order.into_iter().zip(results) {
                if r.count == 0 {
                    res.notes.push(format!(
                        "connect() over {path} with {svcs} services failed every time (errno {:?})",
                        r.first_errno
                    ));
                }
                res.scale.push(ScaleSample { services: svcs, path: path.into(), round, probe: r });
            }
        }
        let line: Vec<String> = probes
            .iter()
            .map(|(p, _, _)| format!("{p} {:.1}us", res.connect_p50(svcs, p).unwrap_or(f64::NAN)))
            .collect();
        let kp = res.control_plane.iter().rev().find(|c| c.services == svcs && c.path == "kmesh");
        log(format!(
            "{svcs} services ({:.0}s): connect() p50 {}; daemon ready in {:.2}s, RSS {:.0} MiB, BPF maps {:.1} MiB",
            t_point.elapsed().as_secs_f64(),
            line.join(", "),
            kp.map(|c| c.program_s).unwrap_or(f64::NAN),
            kp.map(|c| c.rss_mib).unwrap_or(f64::NAN),
            kp.map(|c| c.bpf_map_bytes as f64 / 1048576.0).unwrap_or(f64::NAN),
        ));
    }
    drop(env);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_waypoint_config_is_one_the_daemon_takes() {
        let server = Ipv4Addr::new(10, 244, 0, 2);
        let members = [
            Member { uid: "server", address: server },
            Member { uid: "c-kmesh", address: Ipv4Addr::new(10, 244, 0, 3) },
        ];
        let yaml = config_yaml(&rules::services(3, server), &members, "server");
        let m = kmesh_model::config::parse(&with_waypoint(&yaml, server, Ipv4Addr::new(10, 244, 0, 9)))
            .unwrap_or_else(|e| panic!("{e}"));
        let svc = &m.services["bench/waypointed.bench.svc.cluster.local"];
        assert!(svc.waypoint.is_some());
        assert!(m.workloads["server"].services.contains_key("bench/waypointed.bench.svc.cluster.local"));
        assert!(m.workloads["wp"].application_tunnel().is_some());
        assert_eq!(m.services.len(), 3 + 2);
    }
}
