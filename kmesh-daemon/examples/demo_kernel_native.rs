//! The demo in the kernel-native mode (`scripts/demo.sh --kernel-native`): the in-repo control
//! plane serves Envoy's listeners, clusters and endpoints from `config/envoy-demo.yaml`, the
//! daemon takes them as an Envoy sidecar would (`--mode kernel-native`), and the kernel
//! balances a pod's connections by each cluster's policy, with a circuit breaker and outlier
//! detection. Needs root; cleans up after itself, also on Ctrl-C.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use demo_support::{Cleanup, bin};
use kmesh_daemon::admin;
use kmesh_testbed::{PodSpec, Testbed, spread, with_default_signals};

mod demo_support;

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn show(title: &str, bed: &Testbed, target: &str, n: u32) -> anyhow::Result<BTreeMap<String, u32>> {
    let a = bed.pod("client").connect(target.parse()?, n, false)?;
    let s = spread(&a);
    println!("\n  {title}\n    {n} connections from client to {target}:");
    for (k, v) in &s {
        println!("      {k:<14} {v:>4}");
    }
    Ok(s)
}

fn dump(admin_addr: SocketAddr) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(&admin::request(admin_addr, "GET", "/debug/config_dump", None)?)?)
}

fn main() -> anyhow::Result<()> {
    demo_support::main_with(run)
}

fn run() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("kmesh-demo-kn-{}", std::process::id()));
    let cleanup = Cleanup::install(dir.clone());
    std::fs::create_dir_all(&dir)?;

    println!("== kmesh-rs demo, kernel-native mode: Envoy's xDS done by the kernel at connect()\n");
    let mut bed = Testbed::new().context("creating the testbed (needs root)")?;
    for p in [
        PodSpec::new("client", "node-a", "zone-a"),
        PodSpec::new("s1", "node-a", "zone-a"),
        PodSpec::new("s2", "node-b", "zone-b"),
        PodSpec::new("s3", "node-b", "zone-b"),
    ] {
        bed.add_pod(p)?;
    }
    for s in ["s1", "s2", "s3"] {
        bed.serve(bed.pod(s), &[8080], &[])?;
    }
    let ip = |p: &str| bed.pod(p).ipv4.to_string();
    println!("pods: client {}, s1 {}, s2 {}, s3 {}", ip("client"), ip("s1"), ip("s2"), ip("s3"));

    // The control plane's file: the template with the pods' addresses.
    let template = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/envoy-demo.yaml"),
    )?;
    let resources =
        template.replace("${S1}", &ip("s1")).replace("${S2}", &ip("s2")).replace("${S3}", &ip("s3"));
    let file = dir.join("envoy.yaml");
    std::fs::write(&file, &resources)?;
    let cp_addr = free_addr()?;
    let log = std::fs::File::create(dir.join("xds-server.log"))?;
    println!("\nstarting: kmesh-xds-server --envoy {} --listen {cp_addr}", file.display());
    let cp = with_default_signals(&mut Command::new(bin("kmesh-xds-server")?))
        .args(["--envoy"])
        .arg(&file)
        .args(["--listen", &cp_addr.to_string()])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    cleanup.adopt(cp);

    let pins = PathBuf::from(format!("/sys/fs/bpf/kmesh-demo-kn-{}", std::process::id()));
    let admin_addr = free_addr()?;
    let socket = dir.join("admin.sock");
    let log_path = dir.join("daemon.log");
    let log = std::fs::File::create(&log_path)?;
    println!(
        "starting: kmesh-daemon run --mode kernel-native --xds-address {cp_addr} --xds-plaintext --cgroup {} ...",
        bed.cgroup().display()
    );
    let d = with_default_signals(&mut Command::new(bin("kmesh-daemon")?))
        .args(["run", "--mode", "kernel-native", "--xds-address", &cp_addr.to_string(), "--xds-plaintext"])
        .arg("--cgroup")
        .arg(bed.cgroup())
        .arg("--bpffs")
        .arg(&pins)
        .args(["--admin", &admin_addr.to_string(), "--uninstall-on-exit", "--metrics-addr", "off"])
        .arg("--admin-socket")
        .arg(&socket)
        .arg("--state-file")
        .arg(dir.join("state.json"))
        .args(["--access-log", "off"])
        .env("KMESH_LOG", "warn,kmesh_daemon::outlier=info")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting kmesh-daemon")?;
    cleanup.adopt(d);
    let deadline = Instant::now() + Duration::from_secs(20);
    while admin::request(admin_addr, "GET", "/debug/ready", None).is_err() {
        if Instant::now() > deadline {
            bail!("kmesh-daemon did not become ready (its log: {})", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let req = serde_json::json!({ "netns": bed.pod("client").netns_path() }).to_string();
    admin::request(&socket, "POST", "/v1/enroll", Some(&req))?;
    println!("daemon ready: every listener, cluster and endpoint acknowledged; client enrolled");

    let d0 = dump(admin_addr)?;
    println!("\n  what each filter chain became (/debug/config_dump .envoy.chains):");
    for c in d0["envoy"]["chains"].as_array().into_iter().flatten() {
        let dests: Vec<&str> =
            c["destinations"].as_array().into_iter().flatten().filter_map(|v| v.as_str()).collect();
        println!(
            "    {:<16} {:<8} {:<12} {} {}",
            c["listener"].as_str().unwrap_or(""),
            c["chain"].as_str().unwrap_or(""),
            c["state"].as_str().unwrap_or(""),
            dests.join(" "),
            c["reason"].as_str().unwrap_or("")
        );
        for n in c["not_compiled"].as_array().into_iter().flatten() {
            println!("      not compiled: {}", n.as_str().unwrap_or(""));
        }
    }

    show("1. ROUND_ROBIN (listener bound to the VIP)", &bed, "10.96.0.10:80", 30)?;
    show(
        "2. weighted_clusters 1:3 (a 0.0.0.0 listener's chain matching 10.96.0.11/32)",
        &bed,
        "10.96.0.11:9000",
        400,
    )?;
    show("3. RING_HASH: one client, one endpoint", &bed, "10.96.0.12:80", 30)?;
    show("4. MAGLEV: one client, one endpoint", &bed, "10.96.0.13:80", 30)?;
    show("5. HTTP routes (RDS) that resolve to one cluster", &bed, "10.96.0.14:8000", 30)?;

    // 6. Circuit breaker: hold 4 connections open; max_connections is 2.
    println!("\n  6. circuit breaker max_connections: 2 (4 connections held open from the client)");
    let script = "import socket, sys\nsocks, out = [], []\nfor i in range(4):\n    s = socket.socket()\n    s.settimeout(2)\n    try:\n        s.connect(('10.96.0.15', 80)); socks.append(s); out.append('connected')\n    except OSError as e:\n        out.append('errno %d (%s)' % (e.errno, e.strerror))\nprint('; '.join(out), flush=True)\n";
    let out = bed.pod("client").command("python3").args(["-c", script]).output()?;
    println!("    {}", String::from_utf8_lossy(&out.stdout).trim());

    // 7. Outlier detection: s3's endpoint in this cluster is a port nothing listens on.
    show("7. outlier detection: s3 refuses (consecutive_5xx: 3)", &bed, "10.96.0.16:80", 12)?;
    std::thread::sleep(Duration::from_millis(400));
    let ej = dump(admin_addr)?["outlier"].clone();
    println!("    ejected now: {}", ej["ejected"]);
    show("   ... the next connections skip it", &bed, "10.96.0.16:80", 12)?;

    cleanup.finish();
    drop(bed);
    println!(
        "\ncleaned up: daemon and control plane stopped, programs detached, pins {} removed, pods deleted",
        pins.display()
    );
    Ok(())
}
