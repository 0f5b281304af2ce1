//! Shared by the root integration tests: a testbed plus a loaded data plane attached to the
//! testbed's cgroup, with its own bpffs pin directory; everything is removed on drop.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use kmesh_daemon::config;
use kmesh_daemon::kernel::{self, Capacities, Dataplane, LoadOptions};
use kmesh_daemon::mesh::Mesh;
use kmesh_daemon::model::Model;
use kmesh_daemon::netns;
use kmesh_testbed::{Attempt, Pod, PodSpec, Testbed};

pub const SVC_KEY: &str = "default/echo.default.svc.cluster.local";

/// None (and a loud message) when the tests cannot run here.
pub fn root_or_skip(test: &str) -> bool {
    if !kmesh_testbed::is_root() {
        eprintln!("SKIPPED {test}: needs root to load eBPF programs and create namespaces");
        return false;
    }
    true
}

static N: AtomicU32 = AtomicU32::new(0);

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
        Self::with_capacities(pods, Capacities::default())
    }

    pub fn with_capacities(pods: &[PodSpec], capacities: Capacities) -> Env {
        let mut bed = Testbed::new().expect("testbed");
        for p in pods {
            bed.add_pod(p.clone()).expect("pod");
        }
        let pin_dir = pin_dir();
        let dp = Dataplane::load(&LoadOptions {
            cgroup: bed.cgroup().to_owned(),
            pin_dir: pin_dir.clone(),
            capacities,
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
        let cookie = netns::cookie_of(&self.bed.pod(pod).netns_path()).expect("cookie");
        self.mesh().enroll(cookie, workload.map(str::to_string)).expect("enroll");
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

pub fn peer_ip(a: &Attempt) -> IpAddr {
    a.peer.as_ref().unwrap().parse::<SocketAddr>().unwrap().ip()
}
