//! Pods on one machine, for tests, the demo and benchmarks.
//!
//! A [`Testbed`] is one isolated "cluster": a node network namespace holding a bridge, and pods
//! that are network namespaces joined to that bridge by a veth, each with its own cgroup under
//! the testbed's cgroup. Nothing has a default route and nothing is connected to the machine's
//! uplink, so no packet can leave the machine: a VIP that is not rewritten gets ENETUNREACH.
//!
//! Everything a testbed creates is named after the creating process (`kt<pid>-<n>`), removed
//! on drop (also when a test panics), removed by [`cleanup_signal_handler`] on SIGINT/SIGTERM,
//! and swept by the next testbed if its creator died without cleaning up.

use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the testbed needs root (network namespaces, cgroups)")]
    NotRoot,
    #[error("no cgroup2 mount found in /proc/mounts")]
    NoCgroup2,
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "testbed agent binary not found (looked for {0}); build it with `cargo build --release -p kmesh-testbed` or set KMESH_TESTBED_BIN"
    )]
    NoAgent(String),
    #[error("agent: {0}")]
    Agent(String),
}

pub type Result<T> = std::result::Result<T, Error>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// True when running as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The cgroup2 mount point.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(io("reading /proc/mounts"))?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .ok_or(Error::NoCgroup2)
}

/// CLOCK_MONOTONIC in nanoseconds: comparable between processes on this machine.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs `ip` with arguments, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    run("ip", args)
}

fn run(prog: &str, args: &[&str]) -> Result<String> {
    let out =
        Command::new(prog).args(args).stdin(Stdio::null()).output().map_err(io(format!("running {prog}")))?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: format!("{prog} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Prefix of every name this process gives to a namespace or cgroup.
fn process_prefix(pid: u32) -> String {
    format!("kt{pid}-")
}

/// The parent cgroup of all testbeds.
pub fn testbeds_cgroup() -> Result<PathBuf> {
    Ok(cgroup2_root()?.join("kmesh-testbed"))
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix("kt")?.split('-').next()?.parse().ok()
}

/// Kills every process in a cgroup tree and removes it, deepest first.
fn remove_cgroup_tree(path: &Path) {
    if !path.exists() {
        return;
    }
    if let Ok(entries) = fs::read_dir(path) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    // Killed processes leave the cgroup once they are reaped: allow a few seconds.
    for _ in 0..150 {
        let procs = fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<i32> = procs.lines().filter_map(|l| l.trim().parse().ok()).collect();
        for p in &pids {
            // SAFETY: sending a signal has no memory-safety preconditions.
            unsafe { libc::kill(*p, libc::SIGKILL) };
        }
        if fs::remove_dir(path).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("testbed: could not remove cgroup {}", path.display());
}

/// Makes a testbed's cgroup under the shared parent. Another testbed dropped at the same
/// moment removes the parent when it is empty, possibly between the parent's creation and the
/// child's: then the parent is made again.
fn create_bed_cgroup(path: &Path) -> std::io::Result<()> {
    let mut tries = 0;
    loop {
        match fs::create_dir_all(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 10 => tries += 1,
            r => return r,
        }
    }
}

fn netns_list() -> Vec<String> {
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Removes what testbeds made: with `Some(pid)` only that process's, with `None` everything
/// whose creator is no longer alive (`all_dead`) or everything (`!all_dead`).
pub fn sweep(only_pid: Option<u32>, include_live: bool) -> Vec<String> {
    let mut removed = Vec::new();
    let doomed = |name: &str| -> bool {
        match (owner_pid(name), only_pid) {
            (Some(p), Some(only)) => p == only,
            (Some(p), None) => include_live || !pid_alive(p),
            (None, _) => false,
        }
    };
    if let Ok(entries) = testbeds_cgroup().and_then(|root| fs::read_dir(root).map_err(io("listing testbeds")))
    {
        {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if e.path().is_dir() && doomed(&name) {
                    remove_cgroup_tree(&e.path());
                    removed.push(format!("cgroup {}", e.path().display()));
                }
            }
        }
    }
    if let Ok(root) = testbeds_cgroup() {
        let _ = fs::remove_dir(root); // only succeeds when no testbed is left
    }
    for ns in netns_list() {
        if doomed(&ns) {
            // Processes still in the namespace keep it alive but unreachable by name.
            let _ = ip(&["netns", "del", &ns]);
            removed.push(format!("netns {ns}"));
        }
    }
    removed
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// True once [`cleanup_signal_handler`] caught a signal. A main thread that fails because
/// its resources are being removed under it should then wait for the handler to exit.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Extra work for [`cleanup_signal_handler`] to do before removing the testbeds.
pub type CleanupHooks = Arc<Mutex<Vec<Box<dyn FnMut() + Send>>>>;

/// Blocks SIGINT and SIGTERM in every thread started after this call and handles them on a
/// dedicated thread: run `extra` (e.g. stop a daemon), remove everything this process's
/// testbeds made, and exit with 130. Call it first thing in `main`.
pub fn cleanup_signal_handler(extra: CleanupHooks) {
    // SAFETY: sigset manipulation on local, initialised sets.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::thread::spawn(move || {
            let mut sig = 0;
            libc::sigwait(&set, &mut sig);
            INTERRUPTED.store(true, Ordering::SeqCst);
            eprintln!("\ninterrupted: cleaning up");
            if let Ok(mut hooks) = extra.lock() {
                for h in hooks.iter_mut() {
                    h();
                }
            }
            for r in sweep(Some(std::process::id()), true) {
                eprintln!("removed {r}");
            }
            std::process::exit(130);
        });
    }
}

/// Clears the signal mask of the calling thread. Masks survive fork and exec: a child of a
/// process that blocked SIGTERM for [`cleanup_signal_handler`] would otherwise ignore SIGTERM.
/// Async-signal-safe, for use between fork and exec.
pub fn unblock_all_signals() {
    // SAFETY: sigemptyset/sigprocmask on a local set.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
}

/// Makes a command's child start with no blocked signals (see [`unblock_all_signals`]).
pub fn with_default_signals(c: &mut Command) -> &mut Command {
    // SAFETY: the closure only calls async-signal-safe functions.
    unsafe {
        c.pre_exec(|| {
            unblock_all_signals();
            Ok(())
        })
    }
}

/// Labels of a pod, used by configs (locality) and printed by the CLI.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodSpec {
    pub name: String,
    pub node: String,
    pub region: String,
    pub zone: String,
    /// Also give the pod an IPv6 address.
    pub ipv6: bool,
}

impl PodSpec {
    pub fn new(name: &str, node: &str, zone: &str) -> Self {
        Self {
            name: name.into(),
            node: node.into(),
            region: "region-1".into(),
            zone: zone.into(),
            ipv6: true,
        }
    }
}

/// A pod: a network namespace with one interface on the testbed's bridge and a cgroup.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pod {
    pub spec: PodSpec,
    /// Name under /run/netns.
    pub netns: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Option<Ipv6Addr>,
    pub cgroup: PathBuf,
}

static BED_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Pod addresses: 10.244.0.0/24 and fd00:244::/64, on the testbed's own isolated bridge.
pub const POD_V4_PREFIX: [u8; 3] = [10, 244, 0];

pub struct Testbed {
    name: String,
    node_ns: String,
    cgroup: PathBuf,
    pods: Vec<Pod>,
    children: Mutex<Vec<Child>>,
}

impl Testbed {
    /// Creates an empty testbed. Sweeps leftovers of testbeds whose process died first.
    pub fn new() -> Result<Self> {
        if !is_root() {
            return Err(Error::NotRoot);
        }
        sweep(None, false);
        let n = BED_COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{}{n}", process_prefix(std::process::id()));
        let cgroup = testbeds_cgroup()?.join(&name);
        let bed = Self {
            node_ns: format!("{name}-node"),
            name,
            cgroup,
            pods: Vec::new(),
            children: Mutex::new(Vec::new()),
        };
        create_bed_cgroup(&bed.cgroup).map_err(io(format!("creating {}", bed.cgroup.display())))?;
        ip(&["netns", "add", &bed.node_ns])?;
        ip(&["-n", &bed.node_ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &bed.node_ns, "link", "set", "br0", "up"])?;
        ip(&["-n", &bed.node_ns, "link", "set", "lo", "up"])?;
        Ok(bed)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cgroup that holds every pod's cgroup: attach the mesh programs here.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.spec.name == name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// The node itself, as a [`Pod`] whose commands run where kubelet would: in the node's
    /// network namespace, with the bridge's gateway addresses (10.244.0.1, fd00:244::1, given
    /// on first use) as their source, and in a `node` cgroup under the testbed's, so the mesh
    /// programs see its sockets as a cluster's host processes are seen under the cgroup root.
    pub fn node(&self) -> Result<Pod> {
        let ipv4 = Ipv4Addr::new(POD_V4_PREFIX[0], POD_V4_PREFIX[1], POD_V4_PREFIX[2], 1);
        let ipv6 = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 1);
        let have = ip(&["-n", &self.node_ns, "addr", "show", "dev", "br0"])?;
        if !have.contains(&format!("{ipv4}/24")) {
            ip(&["-n", &self.node_ns, "addr", "add", &format!("{ipv4}/24"), "dev", "br0"])?;
            ip(&["-n", &self.node_ns, "addr", "add", &format!("{ipv6}/64"), "dev", "br0", "nodad"])?;
        }
        let cgroup = self.cgroup.join("node");
        fs::create_dir_all(&cgroup).map_err(io(format!("creating {}", cgroup.display())))?;
        Ok(Pod {
            spec: PodSpec { ipv6: true, ..PodSpec::new("node", "node", "") },
            netns: self.node_ns.clone(),
            ipv4,
            ipv6: Some(ipv6),
            cgroup,
        })
    }

    /// Adds a pod with the next free address.
    pub fn add_pod(&mut self, spec: PodSpec) -> Result<Pod> {
        let host = self.pods.len() + 2;
        assert!(host < 250, "a testbed holds at most 248 pods");
        let idx = self.pods.len();
        let netns = format!("{}-{}", self.name, spec.name);
        let ipv4 = Ipv4Addr::new(POD_V4_PREFIX[0], POD_V4_PREFIX[1], POD_V4_PREFIX[2], host as u8);
        let ipv6 = spec.ipv6.then(|| Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, host as u16));
        let veth = format!("v{idx}");
        ip(&["netns", "add", &netns])?;
        ip(&[
            "-n",
            &self.node_ns,
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns,
        ])?;
        ip(&["-n", &self.node_ns, "link", "set", &veth, "master", "br0", "up"])?;
        ip(&["-n", &netns, "addr", "add", &format!("{ipv4}/24"), "dev", "eth0"])?;
        if let Some(v6) = ipv6 {
            ip(&["-n", &netns, "addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?;
        }
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        // The safety property everything else relies on.
        for fam in ["-4", "-6"] {
            let routes = ip(&["-n", &netns, fam, "route", "show", "default"])?;
            assert!(routes.trim().is_empty(), "pod {netns} has a default route: {routes}");
        }
        let cgroup = self.cgroup.join(&spec.name);
        fs::create_dir_all(&cgroup).map_err(io(format!("creating {}", cgroup.display())))?;
        let pod = Pod { spec, netns, ipv4, ipv6, cgroup };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Starts the agent's echo server in a pod on the given TCP and UDP ports (all addresses,
    /// IPv4 and IPv6); returns when it is listening. It is killed when the testbed drops.
    pub fn serve(&self, pod: &Pod, tcp: &[u16], udp: &[u16]) -> Result<u32> {
        self.serve_with_proxy(pod, tcp, udp, &[])
    }

    /// [`serve`](Self::serve), plus TCP ports that take a PROXY protocol v2 header first (as a
    /// waypoint's do) and answer with what it carried.
    pub fn serve_with_proxy(&self, pod: &Pod, tcp: &[u16], udp: &[u16], proxy_tcp: &[u16]) -> Result<u32> {
        self.serve_ports(pod, tcp, udp, proxy_tcp, &[])
    }

    /// [`serve_with_proxy`](Self::serve_with_proxy), plus ports that speak HTTP/1.1 (`200
    /// <name> <path>`; every other request under `/flaky` gets a 503).
    pub fn serve_ports(
        &self,
        pod: &Pod,
        tcp: &[u16],
        udp: &[u16],
        proxy_tcp: &[u16],
        http: &[u16],
    ) -> Result<u32> {
        self.serve_named(pod, &pod.spec.name, tcp, udp, proxy_tcp, http)
    }

    /// [`serve_ports`](Self::serve_ports) answering with `name` instead of the pod's name (a
    /// pod with several servers, each an endpoint of its own).
    pub fn serve_as(&self, pod: &Pod, name: &str, tcp: &[u16]) -> Result<u32> {
        self.serve_named(pod, name, tcp, &[], &[], &[])
    }

    fn serve_named(
        &self,
        pod: &Pod,
        name: &str,
        tcp: &[u16],
        udp: &[u16],
        proxy_tcp: &[u16],
        http: &[u16],
    ) -> Result<u32> {
        let mut args = vec!["serve".to_string(), "--name".into(), name.to_string()];
        for p in http {
            args.extend(["--http".into(), p.to_string()]);
        }
        for p in tcp {
            args.extend(["--tcp".into(), p.to_string()]);
        }
        for p in proxy_tcp {
            args.extend(["--proxy-tcp".into(), p.to_string()]);
        }
        for p in udp {
            args.extend(["--udp".into(), p.to_string()]);
        }
        let mut child = pod
            .command(agent_path()?)
            .args(&args)
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .map_err(io("starting the agent"))?;
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped");
        BufReader::new(stdout).read_line(&mut line).map_err(io("reading the agent"))?;
        if line.trim() != "ready" {
            let _ = child.kill();
            return Err(Error::Agent(format!("server in {} did not start: {line:?}", pod.netns)));
        }
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        Ok(pid)
    }

    /// Stops a server started with [`serve`](Self::serve).
    pub fn stop(&self, pid: u32) {
        let mut ch = self.children.lock().unwrap();
        if let Some(i) = ch.iter().position(|c| c.id() == pid) {
            let mut c = ch.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for mut c in self.children.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default() {
            let _ = c.kill();
            let _ = c.wait();
        }
        remove_cgroup_tree(&self.cgroup);
        for p in &self.pods {
            let _ = ip(&["netns", "del", &p.netns]);
        }
        let _ = ip(&["netns", "del", &self.node_ns]);
        // The shared parent goes when the last testbed does (fails harmlessly otherwise).
        if let Some(parent) = self.cgroup.parent() {
            let _ = fs::remove_dir(parent);
        }
    }
}

/// The agent binary (this crate's `kmesh-testbed`): `KMESH_TESTBED_BIN`, or next to the
/// running executable (target/release or target/release/deps).
pub fn agent_path() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("KMESH_TESTBED_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(io("locating the current executable"))?;
    let mut tried = Vec::new();
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join("kmesh-testbed");
        if p.is_file() {
            return Ok(p);
        }
        tried.push(p.display().to_string());
    }
    Err(Error::NoAgent(tried.join(", ")))
}

impl Pod {
    /// Sets per-namespace sysctls (`key=value`) in the pod.
    pub fn sysctl(&self, settings: &[&str]) -> Result<()> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.netns, "sysctl", "-q", "-w"])
            .args(settings)
            .output()
            .map_err(|e| Error::Agent(format!("running sysctl in {}: {e}", self.netns)))?;
        if !out.status.success() {
            return Err(Error::Agent(format!(
                "sysctl {settings:?} in {}: {}",
                self.netns,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// For a client making thousands of short connections: TIME_WAIT ports are reused and the
    /// ephemeral range is wide, so later rounds of a benchmark do not pay for a port search
    /// the earlier ones did not.
    pub fn for_many_short_connections(&self) -> Result<()> {
        self.sysctl(&["net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=10000 65000"])
    }

    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.netns))
    }

    /// Addresses of this pod, IPv4 first.
    pub fn addresses(&self) -> Vec<IpAddr> {
        let mut v = vec![IpAddr::V4(self.ipv4)];
        v.extend(self.ipv6.map(IpAddr::V6));
        v
    }

    /// `dnsmasq` as a resolver in this pod: port 53 on the pod's addresses, in the foreground,
    /// no upstream and no host files (nothing it is asked leaves the machine); the caller adds
    /// its zones and records (`--local=/zone/`, `--host-record=...`).
    pub fn dnsmasq_command(&self) -> Command {
        let listen: Vec<String> = self.addresses().iter().map(|a| a.to_string()).collect();
        let mut c = self.command("dnsmasq");
        c.args(["--keep-in-foreground", "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--pid-file="])
            .args(["--user=root", "--group=root", "--port=53"])
            .arg(format!("--listen-address={}", listen.join(",")));
        c
    }

    /// A command that runs inside the pod: in its cgroup (joined before exec, so every socket
    /// it opens belongs to the pod) and its network namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new(program);
        let procs = CString::new(self.cgroup.join("cgroup.procs").as_os_str().as_encoded_bytes())
            .expect("cgroup path has no NUL");
        let ns = Arc::new(File::open(self.netns_path()));
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // syscalls on values prepared before the fork.
        unsafe {
            c.pre_exec(move || {
                let ns = match ns.as_ref() {
                    Ok(f) => f.as_raw_fd(),
                    Err(_) => return Err(std::io::Error::from_raw_os_error(libc::ENOENT)),
                };
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                libc::close(fd);
                if !ok {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(ns, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                unblock_all_signals();
                Ok(())
            });
        }
        c
    }

    /// Opens `count` connections (TCP) or exchanges (UDP) to `target` from inside the pod and
    /// reports each one.
    pub fn connect(&self, target: SocketAddr, count: u32, udp: bool) -> Result<Vec<Attempt>> {
        let mut c = self.connect_command(target, &ClientOptions { count, udp, ..Default::default() })?;
        let out = c.output().map_err(io("running the agent client"))?;
        if !out.status.success() {
            return Err(Error::Agent(String::from_utf8_lossy(&out.stderr).into_owned()));
        }
        parse_attempts(&String::from_utf8_lossy(&out.stdout))
    }

    /// The agent client as a command, for callers that run it in the background.
    pub fn connect_command(&self, target: SocketAddr, o: &ClientOptions) -> Result<Command> {
        let mut c = self.command(agent_path()?);
        c.args(["connect", "--target", &target.to_string(), "--count", &o.count.to_string()]);
        c.args(["--timeout-ms", &o.timeout_ms.to_string(), "--interval-us", &o.interval_us.to_string()]);
        if o.duration_ms > 0 {
            c.args(["--duration-ms", &o.duration_ms.to_string()]);
        }
        if o.udp {
            c.arg("--udp");
        }
        if o.unconnected {
            c.arg("--unconnected");
        }
        if o.one_socket {
            c.arg("--one-socket");
        }
        if o.send_bytes > 0 {
            c.args(["--send", &o.send_bytes.to_string()]);
        }
        if o.client_first {
            c.arg("--client-first");
        }
        if let Some(path) = &o.http_path {
            c.args(["--http-path", path]);
            for h in &o.http_headers {
                c.args(["--http-header", h]);
            }
        }
        c.stdin(Stdio::null());
        Ok(c)
    }
}

/// The agent client running in the background (see [`Pod::connect_background`]).
pub struct BackgroundClient {
    child: Child,
    reader: std::thread::JoinHandle<String>,
}

impl BackgroundClient {
    /// Waits for the client to finish (it is bounded by count and duration) and returns every
    /// attempt it made.
    pub fn finish(mut self) -> Result<Vec<Attempt>> {
        self.child.wait().map_err(io("waiting for the agent client"))?;
        let text = self.reader.join().map_err(|_| Error::Agent("output reader panicked".into()))?;
        parse_attempts(&text)
    }
}

impl Pod {
    /// Starts the agent client in the background, collecting its report as it goes.
    pub fn connect_background(&self, target: SocketAddr, o: &ClientOptions) -> Result<BackgroundClient> {
        let mut child = self
            .connect_command(target, o)?
            .stdout(Stdio::piped())
            .spawn()
            .map_err(io("starting the agent client"))?;
        let out = child.stdout.take().expect("piped");
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            for line in BufReader::new(out).lines().map_while(std::result::Result::ok) {
                text.push_str(&line);
                text.push('\n');
            }
            text
        });
        Ok(BackgroundClient { child, reader })
    }
}

#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub count: u32,
    pub udp: bool,
    pub timeout_ms: u64,
    /// Pause between attempts.
    pub interval_us: u64,
    /// Stop after this long even if `count` is not reached (0: no limit).
    pub duration_ms: u64,
    /// TCP: after the server's name line, send this many bytes and read them echoed back.
    pub send_bytes: u32,
    /// UDP: sendto()/recvfrom() without connect(); `peer` is where the answer came from.
    pub unconnected: bool,
    /// UDP: every attempt from one socket.
    pub one_socket: bool,
    /// TCP: write a line first (a client-first protocol) and read it echoed.
    pub client_first: bool,
    /// TCP: one HTTP/1.1 GET of this path per attempt; `server` is `<status> <body line>`.
    pub http_path: Option<String>,
    /// Request headers of those GETs, `name: value`.
    pub http_headers: Vec<String>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            count: 1,
            udp: false,
            timeout_ms: 2000,
            interval_us: 0,
            duration_ms: 0,
            send_bytes: 0,
            unconnected: false,
            one_socket: false,
            client_first: false,
            http_path: None,
            http_headers: Vec::new(),
        }
    }
}

/// One connection attempt, as the agent client reports it (one JSON line each).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attempt {
    pub ok: bool,
    /// Name of the pod that answered.
    #[serde(default)]
    pub server: Option<String>,
    /// Where the socket ended up connected (after any rewrite).
    #[serde(default)]
    pub peer: Option<String>,
    #[serde(default)]
    pub errno: Option<i32>,
    #[serde(default)]
    pub error: Option<String>,
    /// CLOCK_MONOTONIC when connect() was called.
    pub start_ns: u64,
    /// From connect() to the server's first line (or the error), in microseconds.
    #[serde(default)]
    pub elapsed_us: u64,
}

pub fn parse_attempts(text: &str) -> Result<Vec<Attempt>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| Error::Agent(format!("bad agent line {l:?}: {e}"))))
        .collect()
}

/// Counts attempts per answering server (`"!errno"` keys for failures).
pub fn spread(attempts: &[Attempt]) -> std::collections::BTreeMap<String, u32> {
    let mut m = std::collections::BTreeMap::new();
    for a in attempts {
        let k = match (&a.server, a.errno) {
            (Some(s), _) if a.ok => s.clone(),
            (_, Some(e)) => format!("!errno {e}"),
            _ => "!failed".to_string(),
        };
        *m.entry(k).or_insert(0) += 1;
    }
    m
}
