//! The real kmesh-daemon, run as a user would: a YAML config with the benchmark's services,
//! programs attached to the mesh client pod's cgroup only (so no other path runs through
//! them), pins in a private bpffs folder, the client pod enrolled through the admin API.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::rules::Svc;

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("kmesh-daemon binary not found (looked for {0}); build it or set KMESH_DAEMON_BIN")]
    NoBinary(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kmesh-daemon did not become ready within {0:?} (see {1})")]
    NotReady(Duration, String),
    #[error("kmesh-daemon exited early with {0} (see {1})")]
    Exited(std::process::ExitStatus, String),
    #[error("enrolling {netns}: {stderr}")]
    Enroll { netns: String, stderr: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MeshError {
    let what = what.into();
    move |source| MeshError::Io { what, source }
}

/// `KMESH_DAEMON_BIN`, or `kmesh-daemon` next to this executable.
pub fn daemon_binary() -> Result<PathBuf, MeshError> {
    if let Ok(p) = std::env::var("KMESH_DAEMON_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(io("locating the current executable"))?;
    let mut tried = Vec::new();
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join("kmesh-daemon");
        if p.is_file() {
            return Ok(p);
        }
        tried.push(p.display().to_string());
    }
    Err(MeshError::NoBinary(tried.join(", ")))
}

/// A workload as the config writes it.
pub struct Member<'a> {
    pub uid: &'a str,
    pub address: std::net::Ipv4Addr,
}

/// The daemon config: every service with its one endpoint (the measured service's endpoint is
/// the server pod, listed in `members` with the client pod).
pub fn config_yaml(svcs: &[Svc], members: &[Member], server_uid: &str) -> String {
    let mut s = String::with_capacity(svcs.len() * 330 + 1024);
    s.push_str("# Written by kmesh-bench.\nnode: {name: node-a, locality: {region: region-1, zone: zone-a}}\nservices:\n");
    for v in svcs {
        let ports: Vec<String> =
            v.ports.iter().map(|(p, t)| format!("{{service_port: {p}, target_port: {t}}}")).collect();
        let _ = writeln!(
            s,
            "  - {{name: {n}, namespace: bench, hostname: {n}.bench.svc.cluster.local, addresses: [{vip}], ports: [{p}]}}",
            n = v.name,
            vip = v.vip,
            p = ports.join(", ")
        );
    }
    s.push_str("workloads:\n");
    let workload = |s: &mut String, uid: &str, addr: std::net::Ipv4Addr, svc: Option<&str>| {
        let services =
            svc.map(|n| format!("{{bench/{n}.bench.svc.cluster.local: []}}")).unwrap_or("{}".into());
        let _ = writeln!(
            s,
            "  - {{uid: {uid}, name: {uid}, namespace: bench, addresses: [{addr}], node: node-a, locality: {{region: region-1, zone: zone-a}}, service_account: {uid}, services: {services}}}"
        );
    };
    for v in svcs {
        let is_server = members.iter().any(|m| m.uid == server_uid && m.address == v.backend);
        if !is_server {
            workload(&mut s, &format!("ep-{}", v.name), v.backend, Some(&v.name));
        }
    }
    for m in members {
        let backs: Vec<&str> = svcs
            .iter()
            .filter(|v| m.uid == server_uid && v.backend == m.address)
            .map(|v| v.name.as_str())
            .collect();
        workload(&mut s, m.uid, m.address, backs.first().copied());
    }
    s
}

/// A minimal HTTP/1.1 request to the daemon's loopback admin API; the status and body.
pub fn admin_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// A running daemon. Stopped (SIGTERM: it detaches its programs and removes its pins) on drop.
pub struct Daemon {
    child: Child,
    pub admin: SocketAddr,
    /// The admin socket (enrollment).
    pub socket: PathBuf,
    pub bpffs: PathBuf,
    pub log: PathBuf,
    bin: PathBuf,
    /// From spawn to /debug/ready answering 200: programs loaded and attached, config applied.
    pub ready_after: Duration,
}

impl Daemon {
    /// Starts the daemon on `config`, attached to `cgroup`, and waits until it is ready.
    pub fn start(
        config: &Path,
        cgroup: &Path,
        bpffs: &Path,
        dir: &Path,
        limit: Duration,
    ) -> Result<Self, MeshError> {
        let bin = daemon_binary()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(io("picking an admin port"))?
            .port();
        let admin: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = dir.join("kmesh-daemon.log");
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io(format!("opening {}", log.display())))?;
        let logf2 = logf.try_clone().map_err(io("dup log"))?;
        let t0 = Instant::now();
        let child = kmesh_testbed::with_default_signals(&mut Command::new(&bin))
            .arg("run")
            .arg("--config")
            .arg(config)
            .arg("--cgroup")
            .arg(cgroup)
            .arg("--bpffs")
            .arg(bpffs)
            .args(["--admin", &admin.to_string(), "--metrics-addr", "off", "--poll-ms", "100"])
            .arg("--admin-socket")
            .arg(dir.join("kmesh-admin.sock"))
            .arg("--uninstall-on-exit")
            // Telemetry as shipped (metrics by service and by workload) but no access log:
            // the Envoys here log nothing either, as in Istio's default profile.
            .args(["--access-log", "off"])
            // Extra daemon flags for focused comparisons (e.g. telemetry off:
            // "--service-metrics false --workload-metrics false").
            .args(std::env::var("KMESH_BENCH_DAEMON_ARGS").unwrap_or_default().split_whitespace())
            .arg("--state-file")
            .arg(dir.join("kmesh-state.json"))
            .env("KMESH_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(logf2)
            .spawn()
            .map_err(io(format!("starting {}", bin.display())))?;
        let socket = dir.join("kmesh-admin.sock");
        let mut d =
            Self { child, admin, socket, bpffs: bpffs.to_path_buf(), log, bin, ready_after: Duration::ZERO };
        loop {
            if let Ok(Some(st)) = d.child.try_wait() {
                return Err(MeshError::Exited(st, d.log.display().to_string()));
            }
            if matches!(admin_get(admin, "/debug/ready"), Ok((200, _))) {
                d.ready_after = t0.elapsed();
                return Ok(d);
            }
            if t0.elapsed() > limit {
                return Err(MeshError::NotReady(limit, d.log.display().to_string()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Puts a pod's network namespace in the mesh as workload `uid`.
    pub fn enroll(&self, netns: &Path, uid: &str) -> Result<(), MeshError> {
        let out = Command::new(&self.bin)
            .arg("enroll")
            .arg("--netns")
            .arg(netns)
            .args(["--workload", uid, "--admin-socket"])
            .arg(&self.socket)
            .output()
            .map_err(io("running kmesh-daemon enroll"))?;
        if !out.status.success() {
            return Err(MeshError::Enroll {
                netns: netns.display().to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    /// A value of the daemon's /metrics, e.g. `kmesh_map_entries{map="FRONTENDS"}`.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = admin_get(self.admin, "/metrics").ok()?;
        body.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    }

    /// Stops the daemon and waits for it.
    pub fn stop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.bpffs.exists() {
            // It did not get to remove its pins: do it the documented way.
            let _ = Command::new(&self.bin).arg("uninstall").arg("--bpffs").arg(&self.bpffs).output();
            let _ = std::fs::remove_dir_all(&self.bpffs);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::services;
    use std::net::Ipv4Addr;

    #[test]
    fn config_lists_every_service_and_endpoint_once() {
        let server = Ipv4Addr::new(10, 244, 0, 2);
        let client = Ipv4Addr::new(10, 244, 0, 4);
        let members = [Member { uid: "server", address: server }, Member { uid: "c-kmesh", address: client }];
        let y = config_yaml(&services(5, server), &members, "server");
        assert_eq!(y.matches("hostname: ").count(), 5);
        assert_eq!(y.matches("  - {uid: ").count(), 6); // 4 filler endpoints + server + client
        assert!(y.contains("uid: server, name: server, namespace: bench, addresses: [10.244.0.2]"));
        assert!(y.contains("services: {bench/bench.bench.svc.cluster.local: []}"));
        assert!(y.contains("{service_port: 80, target_port: 8080}"));
        assert!(y.contains("uid: c-kmesh, name: c-kmesh, namespace: bench, addresses: [10.244.0.4], node: node-a, locality: {region: region-1, zone: zone-a}, service_account: c-kmesh, services: {}"));
    }
}
