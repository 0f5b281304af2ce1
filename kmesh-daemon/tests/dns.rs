//! The pods' DNS proxy, with real clients and a real resolver: `dnsmasq` in a pod of the
//! testbed is the cluster's DNS (local zones only, no upstream of its own: no query leaves the
//! machine), `dig` and glibc's resolver (`getent`, with the pod's own resolv.conf) ask it from
//! an enrolled pod and from one outside the mesh. Needs root.
mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kmesh_daemon::admin;
use kmesh_testbed::{Pod, PodSpec, Testbed};

const ECHO_V6: &str = "fd00:96::10";
const WILD_VIP: &str = "10.96.0.20";

fn bed() -> Testbed {
    let mut bed = Testbed::new().unwrap();
    for p in ["client", "s1", "s2", "s3", "dns", "outside"] {
        bed.add_pod(PodSpec::new(p, "node-a", "zone-a")).unwrap();
    }
    for s in ["s1", "s2"] {
        bed.serve(bed.pod(s), &[8080], &[]).unwrap();
    }
    bed
}

fn mesh_config(bed: &Testbed) -> String {
    let ports = "[{service_port: 80, target_port: 8080}]";
    let services = format!(
        "  - {{name: echo, namespace: default, hostname: echo.default.svc.cluster.local, addresses: [{VIP}, \"{ECHO_V6}\"], ports: {ports}}}
  - {{name: api, namespace: default, hostname: api.example.com, ports: {ports}}}
  - {{name: db, namespace: default, hostname: db.default.svc.cluster.local, ports: [{{service_port: 5432}}]}}
  - {{name: wild, namespace: default, hostname: \"*.wild.example\", addresses: [{WILD_VIP}], ports: {ports}}}
"
    );
    let echo = "default/echo.default.svc.cluster.local";
    let api = "default/api.example.com";
    let db = "default/db.default.svc.cluster.local";
    let mut w = workload(bed.pod("client"), &[], "");
    w += &workload(bed.pod("s1"), &[(echo, "[]"), (api, "[]"), (db, "[]")], "");
    w += &workload(bed.pod("s2"), &[(echo, "[]"), (api, "[]")], "");
    // Backs the headless service but is not healthy: never in its answers.
    w += &workload(bed.pod("s3"), &[(db, "[]")], ", status: UNHEALTHY");
    config("zone-a", &services, &w)
}

/// dnsmasq as the cluster's DNS in `pod`: authoritative for `corp.test` and `cluster.local`
/// (NXDOMAIN for anything it does not hold there), no upstream.
struct Resolver {
    child: Child,
}

impl Resolver {
    fn start(pod: &Pod, dir: &std::path::Path) -> Resolver {
        let hosts = dir.join("big-hosts");
        let lines: String = (1..=60).map(|i| format!("10.0.0.{i} big.corp.test\n")).collect();
        std::fs::write(&hosts, lines).unwrap();
        let child = pod
            .dnsmasq_command()
            .args(["--local-ttl=60", "--log-facility=-"])
            .args(["--local=/corp.test/", "--local=/cluster.local/"])
            .args([
                "--host-record=db.corp.test,10.1.2.3",
                "--host-record=kube.default.svc.cluster.local,10.96.0.1",
            ])
            .arg(format!("--addn-hosts={}", hosts.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (apt-get install dnsmasq-base; scripts/setup.sh installs it)");
        let r = Resolver { child };
        let ip = pod.ipv4.to_string();
        wait_for("dnsmasq", || dig(pod, &ip, &["db.corp.test"]).contains("10.1.2.3"));
        r
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `/etc/netns/<pod>/resolv.conf`, which `ip netns exec` shows the pod's processes as
/// /etc/resolv.conf; removed on drop.
struct ResolvConf(PathBuf);

impl ResolvConf {
    fn new(pod: &Pod, nameserver: &str) -> ResolvConf {
        let dir = PathBuf::from("/etc/netns").join(&pod.netns);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("resolv.conf"),
            format!(
                "search default.svc.cluster.local svc.cluster.local cluster.local\nnameserver {nameserver}\noptions ndots:5 timeout:3 attempts:1\n"
            ),
        )
        .unwrap();
        ResolvConf(dir)
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `dig @server args...` from inside the pod: its whole output.
fn dig(pod: &Pod, server: &str, args: &[&str]) -> String {
    let out = pod
        .command("dig")
        .arg(format!("@{server}"))
        .args(["+time=5", "+tries=1"])
        .args(args)
        .output()
        .expect("dig (apt-get install bind9-dnsutils; scripts/setup.sh installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The answer records of a dig output: (name, ttl, type, data).
fn answers(out: &str) -> Vec<(String, u32, String, String)> {
    let mut v = Vec::new();
    let mut inside = false;
    for l in out.lines() {
        if l.starts_with(";; ANSWER SECTION") {
            inside = true;
            continue;
        }
        if inside {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 5 {
                break;
            }
            v.push((f[0].to_string(), f[1].parse().unwrap(), f[3].to_string(), f[4].to_string()));
        }
    }
    v
}

fn status(out: &str) -> String {
    out.split("status: ").nth(1).map(|s| s.split(',').next().unwrap().to_string()).unwrap_or_default()
}

fn data(out: &str, ty: &str) -> BTreeSet<String> {
    answers(out).into_iter().filter(|a| a.2 == ty).map(|a| a.3).collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// glibc's resolver in the pod, with the pod's resolv.conf: `getent <db> <name>`.
fn getent(pod: &Pod, db: &str, name: &str) -> String {
    let out = pod.command("ip").args(["netns", "exec", &pod.netns, "getent", db, name]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_listening(d: &Daemon, cookie_count: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v: serde_json::Value = serde_json::from_str(&d.get("/debug/dns").unwrap()).unwrap();
        if v["pods"].as_array().is_some_and(|p| p.len() == cookie_count) {
            return v;
        }
        assert!(Instant::now() < deadline, "DNS proxies not listening: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn pods_resolve_mesh_names_and_everything_else_reaches_their_resolver() {
    if !root_or_skip("pods_resolve_mesh_names_and_everything_else_reaches_their_resolver") {
        return;
    }
    let bed = bed();
    let scratch = Scratch::new();
    let (client, outside, dnspod) = (bed.pod("client"), bed.pod("outside"), bed.pod("dns"));
    let ns4 = dnspod.ipv4.to_string();
    let ns6 = dnspod.ipv6.unwrap().to_string();
    let mut resolver = Resolver::start(dnspod, &scratch.dir);
    let _rc = (ResolvConf::new(client, &ns4), ResolvConf::new(outside, &ns4));

    scratch.write_config(&mesh_config(&bed));
    let mut d = Daemon::start(&scratch.config(), &bed, &scratch.pins, &[]);
    wait_for("readiness", || d.get("/debug/ready").is_ok());
    let req = serde_json::json!({ "netns": client.netns_path(), "workload": "client" }).to_string();
    admin::request(&d.socket, "POST", "/v1/enroll", Some(&req)).unwrap();
    let status_json = wait_listening(&d, 1);
    assert_eq!(status_json["pods"][0]["namespace"], "default", "{status_json}");
    let names: Vec<&str> =
        status_json["names"].as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert!(
        names.contains(&"api.example.com") && names.contains(&"echo.default.svc.cluster.local"),
        "{names:?}"
    );
    let dump: serde_json::Value = serde_json::from_str(&d.get("/debug/config_dump").unwrap()).unwrap();
    let api_addrs: Vec<String> = dump["model"]["services"]["default/api.example.com"]["addresses"]
        .as_array()
        .unwrap_or_else(|| panic!("no api.example.com in {dump}"))
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let (api4, api6) = (api_addrs[0].clone(), api_addrs[1].clone());
    assert!(api4.starts_with("240.240.") && api6.starts_with("2001:2:"), "{api_addrs:?}");

    // A service name: A and AAAA from the proxy, authoritative, TTL 30.
    let out = dig(client, &ns4, &["echo.default.svc.cluster.local"]);
    assert_eq!(data(&out, "A"), set(&[VIP]), "{out}");
    assert!(out.contains(" aa ") || out.contains("flags: qr aa"), "{out}");
    assert_eq!(answers(&out)[0].1, 30, "{out}");
    assert_eq!(
        data(&dig(client, &ns4, &["AAAA", "echo.default.svc.cluster.local"]), "AAAA"),
        set(&[ECHO_V6])
    );
    // Also when the pod asks the resolver's IPv6 address.
    assert_eq!(data(&dig(client, &ns6, &["echo.default.svc.cluster.local"]), "A"), set(&[VIP]));

    // glibc with the pod's search domains: short names, IPv4 and IPv6.
    for name in ["echo", "echo.default", "echo.default.svc", "echo.default.svc.cluster.local"] {
        let out = getent(client, "ahosts", name);
        assert!(out.contains(VIP) && out.contains(ECHO_V6), "getent ahosts {name}: {out:?}");
    }

    // A mesh-only hostname: the allocated VIP, straight and through a search domain (a CNAME
    // to the name), and a connection to it is balanced over its endpoints.
    let out = dig(client, &ns4, &["api.example.com"]);
    assert_eq!(data(&out, "A"), set(&[&api4]), "{out}");
    assert_eq!(data(&dig(client, &ns4, &["AAAA", "api.example.com"]), "AAAA"), set(&[&api6]));
    let out = dig(client, &ns4, &["api.example.com.default.svc.cluster.local"]);
    assert_eq!(data(&out, "CNAME"), set(&["api.example.com."]), "{out}");
    assert_eq!(data(&out, "A"), set(&[&api4]), "{out}");
    let out = getent(client, "ahostsv4", "api.example.com");
    assert!(out.contains(&api4), "{out:?}");
    let a = client.connect(format!("{api4}:80").parse().unwrap(), 60, false).unwrap();
    let s = spread(&a);
    assert!(s.get("s1").is_some_and(|n| *n > 5) && s.get("s2").is_some_and(|n| *n > 5), "{s:?}");
    // The mesh owns that name: other types are NODATA, not the upstream's NXDOMAIN.
    let out = dig(client, &ns4, &["TXT", "api.example.com"]);
    assert_eq!((status(&out), answers(&out).len()), ("NOERROR".into(), 0), "{out}");

    // Wildcard hostnames, and a headless service: its healthy workloads' addresses, TTL 5.
    assert_eq!(data(&dig(client, &ns4, &["any.thing.wild.example"]), "A"), set(&[WILD_VIP]));
    let out = dig(client, &ns4, &["db.default.svc.cluster.local"]);
    assert_eq!(data(&out, "A"), set(&[&bed.pod("s1").ipv4.to_string()]), "{out}");
    assert_eq!(answers(&out)[0].1, 5, "{out}");

    // Everything else is the resolver's answer, unchanged: its records and TTL, a cluster name
    // the mesh does not hold, NXDOMAIN.
    let out = dig(client, &ns4, &["db.corp.test"]);
    assert_eq!(data(&out, "A"), set(&["10.1.2.3"]), "{out}");
    assert_eq!(answers(&out)[0].1, 60, "{out}");
    assert_eq!(data(&dig(client, &ns6, &["db.corp.test"]), "A"), set(&["10.1.2.3"]));
    assert_eq!(data(&dig(client, &ns4, &["kube.default.svc.cluster.local"]), "A"), set(&["10.96.0.1"]));
    assert_eq!(status(&dig(client, &ns4, &["nope.corp.test"])), "NXDOMAIN");
    assert!(getent(client, "hosts", "db.corp.test").contains("10.1.2.3"));

    // A truncated answer makes dig retry over TCP, which is forwarded too; the proxy's own
    // answers work over TCP.
    let out = dig(client, &ns4, &["+noedns", "big.corp.test"]);
    assert!(out.contains("Truncated, retrying in TCP mode"), "{out}");
    assert_eq!(data(&out, "A").len(), 60, "{out}");
    assert_eq!(data(&dig(client, &ns4, &["+tcp", "echo.default.svc.cluster.local"]), "A"), set(&[VIP]));

    // A pod outside the mesh asks the resolver itself.
    assert_eq!(status(&dig(outside, &ns4, &["echo.default.svc.cluster.local"])), "NXDOMAIN");
    assert!(getent(outside, "hosts", "echo").is_empty());

    // kmeshctl shows the same: the pod's proxy and the names it answers.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kmeshctl"))
        .args(["--admin", &d.admin.to_string(), "--admin-socket"])
        .arg(&d.socket)
        .arg("dns")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("api.example.com\t30\t{api4} {api6}")), "{text}");
    assert!(text.contains("db.default.svc.cluster.local (headless)\t5\t"), "{text}");
    assert!(
        text.contains(&format!("{}\tdefault\t127.0.0.1:15053 [::1]:15053", client.netns_path().display())),
        "{text}"
    );

    let m = |r: &str| d.metric(&format!("kmesh_dns_queries_total{{result=\"{r}\"}}"));
    assert!(
        m("answered") >= 15.0 && m("forwarded") >= 7.0,
        "answered {} forwarded {}",
        m("answered"),
        m("forwarded")
    );
    assert!(d.metric("kmesh_dns_redirects_total{result=\"redirected\"}") >= 22.0);

    // The upstream fails: SERVFAIL, promptly. An address nobody answers (the proxy's timeout,
    // 2 s), then the resolver stopped (refused at once).
    let t = Instant::now();
    let out = dig(client, "10.244.0.250", &["db.corp.test"]);
    assert_eq!(status(&out), "SERVFAIL", "{out}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    drop(resolver);
    let t = Instant::now();
    assert_eq!(status(&dig(client, &ns4, &["db.corp.test"])), "SERVFAIL");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // Mesh names do not need it.
    assert_eq!(data(&dig(client, &ns4, &["echo.default.svc.cluster.local"]), "A"), set(&[VIP]));
    assert!(m("servfail") >= 2.0);

    // The daemon stops: the pod's queries go to its resolver again, never to a closed port.
    resolver = Resolver::start(dnspod, &scratch.dir);
    d.stop();
    assert_eq!(status(&dig(client, &ns4, &["echo.default.svc.cluster.local"])), "NXDOMAIN");
    assert_eq!(data(&dig(client, &ns4, &["db.corp.test"]), "A"), set(&["10.1.2.3"]));

    // A new daemon adopts the maps and the saved enrollment: the pod's proxy is back.
    let d = Daemon::start(&scratch.config(), &bed, &scratch.pins, &[]);
    wait_for("readiness", || d.get("/debug/ready").is_ok());
    wait_listening(&d, 1);
    let out = dig(client, &ns4, &["echo.default.svc.cluster.local"]);
    assert_eq!(data(&out, "A"), set(&[VIP]), "{out}\n{}", d.get("/debug/dns").unwrap());
    assert_eq!(data(&dig(client, &ns4, &["db.corp.test"]), "A"), set(&["10.1.2.3"]));
    drop(resolver);
}

#[test]
fn dns_proxy_off_leaves_pods_queries_alone() {
    if !root_or_skip("dns_proxy_off_leaves_pods_queries_alone") {
        return;
    }
    let bed = bed();
    let scratch = Scratch::new();
    let (client, dnspod) = (bed.pod("client"), bed.pod("dns"));
    let ns4 = dnspod.ipv4.to_string();
    let _resolver = Resolver::start(dnspod, &scratch.dir);
    scratch.write_config(&mesh_config(&bed));
    let d = Daemon::start(&scratch.config(), &bed, &scratch.pins, &["--dns-proxy", "off"]);
    wait_for("readiness", || d.get("/debug/ready").is_ok());
    let req = serde_json::json!({ "netns": client.netns_path(), "workload": "client" }).to_string();
    admin::request(&d.socket, "POST", "/v1/enroll", Some(&req)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&d.get("/debug/dns").unwrap()).unwrap();
    assert_eq!(v["enabled"], false);
    assert_eq!(status(&dig(client, &ns4, &["echo.default.svc.cluster.local"])), "NXDOMAIN");
    // Balancing is unaffected.
    let a = client.connect(format!("{VIP}:80").parse().unwrap(), 10, false).unwrap();
    assert!(a.iter().all(|a| a.ok), "{a:?}");
}
