//! A real API server for the Kubernetes tests (`../shared/k8s/apiserver.sh`: kube-apiserver,
//! etcd and a controller-manager on 127.0.0.1), and the harness that plays the kubelet: it
//! creates Node, Namespace and Pod objects, starts each pod's "sandbox" (a process in the pod's
//! network namespace, under a cgroup named after the pod's uid as kubelet names them) and
//! patches the pod's status with its IP.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kmesh_testbed::Pod as BedPod;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};

/// `apiserver.sh`: `KMESH_K8S_APISERVER_SH`, or `shared/k8s/` beside the repository.
pub fn apiserver_script() -> PathBuf {
    if let Ok(p) = std::env::var("KMESH_K8S_APISERVER_SH") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/k8s/apiserver.sh");
    assert!(
        p.is_file(),
        "no API server for the Kubernetes tests: {} is missing (set KMESH_K8S_APISERVER_SH)",
        p.display()
    );
    p
}

/// A running API server: the one the test command started (`KMESH_K8S_DIR` and
/// `KUBECONFIG` in the environment) or one started for this test (stopped on drop).
pub struct ApiServer {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    env: BTreeMap<String, String>,
    owned: bool,
}

fn parse_exports(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches(|c| c == '"' || c == '\'').to_string()))
        .collect()
}

impl ApiServer {
    /// The shared API server if the test command started one, else a new one.
    pub fn shared() -> ApiServer {
        match (std::env::var("KMESH_K8S_DIR"), std::env::var("KUBECONFIG")) {
            (Ok(dir), Ok(kc)) if Path::new(&kc).is_file() => {
                let out = Command::new("bash").arg(apiserver_script()).args(["env", &dir]).output().unwrap();
                ApiServer {
                    dir: dir.into(),
                    kubeconfig: kc.into(),
                    env: parse_exports(&String::from_utf8_lossy(&out.stdout)),
                    owned: false,
                }
            }
            _ => Self::start(),
        }
    }

    /// A new API server of this test's own (for tests that stop it).
    pub fn start() -> ApiServer {
        let dir =
            std::env::temp_dir().join(format!("kmesh-k8s-{}-{}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("bash")
            .arg(apiserver_script())
            .arg("start")
            .arg(&dir)
            .stderr(Stdio::inherit())
            .output()
            .expect("run apiserver.sh");
        assert!(out.status.success(), "apiserver.sh start failed");
        let env = parse_exports(&String::from_utf8_lossy(&out.stdout));
        let kubeconfig = PathBuf::from(env.get("KUBECONFIG").expect("apiserver.sh printed KUBECONFIG"));
        ApiServer { dir, kubeconfig, env, owned: true }
    }

    pub fn var(&self, k: &str) -> &str {
        self.env.get(k).map(String::as_str).unwrap_or_else(|| panic!("apiserver.sh printed no {k}"))
    }

    fn script(&self, cmd: &str) {
        let ok =
            Command::new("bash").arg(apiserver_script()).arg(cmd).arg(&self.dir).status().unwrap().success();
        assert!(ok, "apiserver.sh {cmd} failed");
    }

    /// Stops kube-apiserver alone (etcd keeps the state).
    pub fn pause(&self) {
        assert!(self.owned, "only a test's own API server may be paused");
        self.script("pause-apiserver");
    }

    pub fn resume(&self) {
        self.script("resume-apiserver");
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if self.owned {
            let _ = Command::new("bash").arg(apiserver_script()).arg("stop").arg(&self.dir).status();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A client of the API server and the kubelet's part.
pub struct Kube {
    pub rt: tokio::runtime::Runtime,
    pub client: Client,
}

fn meta(name: &str, labels: &[(&str, &str)]) -> serde_json::Value {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    serde_json::json!({ "name": name, "labels": labels })
}

impl Kube {
    pub fn new(api: &ApiServer) -> Kube {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let client = rt.block_on(kmesh_k8s::watch::client(Some(&api.kubeconfig))).expect("client");
        Kube { rt, client }
    }

    pub fn node(&self, name: &str, labels: &[(&str, &str)]) {
        let api = Api::<Node>::all(self.client.clone());
        let n: Node = serde_json::from_value(serde_json::json!({ "metadata": meta(name, labels) })).unwrap();
        self.rt.block_on(api.create(&PostParams::default(), &n)).expect("create node");
    }

    /// Replaces a Node's labels.
    pub fn label_node(&self, name: &str, labels: &[(&str, &str)]) {
        let api = Api::<Node>::all(self.client.clone());
        self.rt
            .block_on(api.patch(name, &PatchParams::default(), &Patch::Merge(self.label_patch(labels))))
            .expect("label node");
    }

    fn label_patch(&self, labels: &[(&str, &str)]) -> serde_json::Value {
        let l: BTreeMap<&str, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| (*k, if v.is_empty() { serde_json::Value::Null } else { serde_json::json!(v) }))
            .collect();
        serde_json::json!({ "metadata": { "labels": l } })
    }

    pub fn namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let api = Api::<Namespace>::all(self.client.clone());
        let n: Namespace =
            serde_json::from_value(serde_json::json!({ "metadata": meta(name, labels) })).unwrap();
        self.rt.block_on(api.create(&PostParams::default(), &n)).expect("create namespace");
    }

    /// Sets (or, with an empty value, removes) labels of a namespace.
    pub fn label_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let api = Api::<Namespace>::all(self.client.clone());
        self.rt
            .block_on(api.patch(name, &PatchParams::default(), &Patch::Merge(self.label_patch(labels))))
            .expect("label namespace");
    }

    /// Creates a pod scheduled on `node`; returns its uid.
    pub fn pod(&self, ns: &str, name: &str, node: &str, labels: &[(&str, &str)]) -> String {
        let api = Api::<Pod>::namespaced(self.client.clone(), ns);
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": meta(name, labels),
            "spec": { "nodeName": node, "containers": [{ "name": "app", "image": "registry.invalid/app" }] },
        }))
        .unwrap();
        let p = self.rt.block_on(api.create(&PostParams::default(), &p)).expect("create pod");
        p.metadata.uid.expect("uid")
    }

    /// What a kubelet reports once the pod's sandbox is up: Running, with its IP.
    pub fn pod_running(&self, ns: &str, name: &str, ip: &str) {
        let api = Api::<Pod>::namespaced(self.client.clone(), ns);
        let patch =
            serde_json::json!({ "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] } });
        self.rt
            .block_on(api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)))
            .expect("pod status");
    }

    pub fn delete_pod(&self, ns: &str, name: &str) {
        let api = Api::<Pod>::namespaced(self.client.clone(), ns);
        let dp = DeleteParams { grace_period_seconds: Some(0), ..Default::default() };
        self.rt.block_on(api.delete(name, &dp)).expect("delete pod");
    }

    pub fn get_pod(&self, ns: &str, name: &str) -> Option<Pod> {
        let api = Api::<Pod>::namespaced(self.client.clone(), ns);
        self.rt.block_on(api.get_opt(name)).expect("get pod")
    }

    /// The pod's `kmesh.net/redirection` annotation.
    pub fn redirection(&self, ns: &str, name: &str) -> Option<String> {
        self.get_pod(ns, name)?.metadata.annotations?.get("kmesh.net/redirection").cloned()
    }
}

/// A pod's sandbox as the kubelet and a container runtime leave it: a process in the pod's
/// network namespace, in a cgroup named after the pod's uid (cgroupfs driver layout).
pub struct Sandbox {
    child: Child,
    cgroup: PathBuf,
}

impl Sandbox {
    pub fn start(pod: &BedPod, uid: &str) -> Sandbox {
        let cgroup = pod.cgroup.join("kubepods/besteffort").join(format!("pod{uid}"));
        std::fs::create_dir_all(&cgroup).unwrap();
        let child = pod.command("sleep").arg("600").stdin(Stdio::null()).spawn().expect("start the sandbox");
        std::fs::write(cgroup.join("cgroup.procs"), child.id().to_string())
            .expect("move into the pod cgroup");
        Sandbox { child, cgroup }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut dir = self.cgroup.clone();
        // pod<uid>, besteffort, kubepods
        for _ in 0..3 {
            let _ = std::fs::remove_dir(&dir);
            dir.pop();
        }
    }
}

/// Waits up to `secs` for `cond`.
pub fn eventually(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {secs} s waiting for {what}");
}

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:x}", rand::random::<u32>())
}

/// The CNI plugins the test chain runs: Debian's `containernetworking-plugins`.
pub const CNI_PLUGINS: &str = "/usr/lib/cni";

/// A CNI plugin's answer: exit status and what it printed.
pub struct CniOutput {
    pub ok: bool,
    pub json: serde_json::Value,
    pub stdout: String,
}

/// Runs one CNI plugin as a container runtime does: `CNI_*` in the environment, the
/// configuration on stdin. `in_netns` runs it inside that network namespace (the testbed's
/// node namespace, so the primary plugin's bridge is never in the root namespace).
pub fn cni_exec(
    plugin: &Path,
    command: &str,
    conf: &serde_json::Value,
    netns: &Path,
    args: &str,
    cni_path: &str,
    in_netns: Option<&str>,
) -> CniOutput {
    use std::io::Write;
    let mut c = match in_netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(plugin);
            c
        }
        None => Command::new(plugin),
    };
    c.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "c0ffee")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap_or_else(|e| panic!("run {}: {e}", plugin.display()));
    // A plugin may answer without reading its configuration (then the write fails with
    // EPIPE): what it printed and how it exited say what happened.
    let wrote = child.stdin.take().unwrap().write_all(conf.to_string().as_bytes());
    let out = child.wait_with_output().unwrap();
    let mut stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
    if let Err(e) = wrote {
        stdout += &format!(
            "\n[harness: writing the configuration failed: {e}; the plugin exited with {}]\n",
            out.status
        );
    }
    CniOutput { ok: out.status.success(), json, stdout: stdout + &String::from_utf8_lossy(&out.stderr) }
}

/// A network namespace made for a CNI pod, deleted on drop.
pub struct NetnsGuard(pub String);

impl NetnsGuard {
    pub fn new(name: &str) -> NetnsGuard {
        kmesh_testbed::ip(&["netns", "add", name]).expect("ip netns add");
        NetnsGuard(name.to_string())
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = kmesh_testbed::ip(&["netns", "del", &self.0]);
    }
}
