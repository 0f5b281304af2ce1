//! The data plane on the real kernel: real eBPF programs attached to a testbed's cgroup, real
//! TCP and UDP between pods. Needs root; skips loudly otherwise.
mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use common::*;
use kmesh_daemon::kernel::{Capacities, KernelError};
use kmesh_testbed::{ClientOptions, PodSpec, monotonic_ns};

const VIP: &str = "10.96.0.10";

fn three_backends_two_zones() -> Vec<PodSpec> {
    vec![
        PodSpec::new("client", "node-a", "zone-a"),
        PodSpec::new("s1", "node-a", "zone-a"),
        PodSpec::new("s2", "node-b", "zone-b"),
        PodSpec::new("s3", "node-b", "zone-b"),
    ]
}

/// Config: the echo service on VIP:80 -> 8080, backed by s1..s3 (with per-pod `extra`).
fn echo_config(env: &Env, lb: &str, extra: &[(&str, &str)]) -> String {
    let mut w = workload(env.pod("client"), &[], "");
    for s in ["s1", "s2", "s3"] {
        let x = extra.iter().find(|(n, _)| *n == s).map(|(_, x)| *x).unwrap_or("");
        if x == "absent" {
            continue;
        }
        w += &workload(env.pod(s), &[(SVC_KEY, "[]")], x);
    }
    config("zone-a", &service(&format!("[{VIP}]"), "[{service_port: 80, target_port: 8080}]", lb), &w)
}

fn start_servers(env: &Env, tcp: &[u16], udp: &[u16]) {
    for s in ["s1", "s2", "s3"] {
        env.bed.serve(env.pod(s), tcp, udp).unwrap();
    }
}

#[test]
fn vip_spreads_connections_uniformly_over_three_backends() {
    if !root_or_skip("vip_spreads_connections_uniformly_over_three_backends") {
        return;
    }
    let mut env = Env::new(&three_backends_two_zones());
    start_servers(&env, &[8080], &[]);
    let cfg = echo_config(&env, "{}", &[]);
    env.apply(&cfg);
    env.enroll("client", Some("client"));

    let a = env.connect("client", &format!("{VIP}:80"), 600);
    let s = spread(&a);
    eprintln!("spread over 600 connections: {s:?}");
    assert!(a.iter().all(|a| a.ok), "failed attempts: {s:?}");
    let backends: BTreeSet<IpAddr> = ["s1", "s2", "s3"].iter().map(|p| IpAddr::V4(env.pod(p).ipv4)).collect();
    for x in &a {
        let peer: SocketAddr = x.peer.as_ref().unwrap().parse().unwrap();
        assert!(backends.contains(&peer.ip()) && peer.port() == 8080, "connected to {peer}");
    }
    let counts: Vec<u32> = ["s1", "s2", "s3"].iter().map(|k| s.get(*k).copied().unwrap_or(0)).collect();
    let chi2 = chi_square(&counts, &[200.0; 3]);
    // Two degrees of freedom: p > 0.001 <=> chi2 < 13.816.
    eprintln!("chi-square {chi2:.2} (p > 0.001 needs < 13.816)");
    assert!(chi2 < 13.816, "spread {counts:?} is not uniform (chi2 {chi2:.2})");
}

#[test]
fn failover_keeps_traffic_in_zone_and_fails_over_level_by_level() {
    if !root_or_skip("failover_keeps_traffic_in_zone_and_fails_over_level_by_level") {
        return;
    }
    let mut env = Env::new(&three_backends_two_zones());
    start_servers(&env, &[8080], &[]);
    let lb = "{routing_preference: [REGION, ZONE], mode: FAILOVER}";
    let cfg = echo_config(&env, lb, &[]);
    env.apply(&cfg);
    env.enroll("client", Some("client"));

    let s = spread(&env.connect("client", &format!("{VIP}:80"), 200));
    assert_eq!(s.get("s1"), Some(&200), "all connections stay in zone-a: {s:?}");

    // The local endpoint turns unhealthy: the next level (same region, other zone) takes over.
    let cfg = echo_config(&env, lb, &[("s1", ", status: UNHEALTHY")]);
    env.apply(&cfg);
    let s = spread(&env.connect("client", &format!("{VIP}:80"), 200));
    assert_eq!(s.get("s1"), None, "{s:?}");
    assert_eq!(s.get("s2").unwrap_or(&0) + s.get("s3").unwrap_or(&0), 200, "{s:?}");

    // ... and back when it recovers; then removed altogether.
    let cfg = echo_config(&env, lb, &[]);
    env.apply(&cfg);
    assert_eq!(spread(&env.connect("client", &format!("{VIP}:80"), 50)).get("s1"), Some(&50));
    let cfg = echo_config(&env, lb, &[("s1", "absent")]);
    env.apply(&cfg);
    let s = spread(&env.connect("client", &format!("{VIP}:80"), 100));
    assert_eq!(s.get("s2").unwrap_or(&0) + s.get("s3").unwrap_or(&0), 100, "{s:?}");
}

#[test]
fn failover_follows_the_clients_own_zone() {
    if !root_or_skip("failover_follows_the_clients_own_zone") {
        return;
    }
    let mut pods = three_backends_two_zones();
    pods.push(PodSpec::new("client-b", "node-b", "zone-b"));
    let mut env = Env::new(&pods);
    start_servers(&env, &[8080], &[]);
    let mut cfg = echo_config(&env, "{routing_preference: [ZONE], mode: FAILOVER}", &[]);
    cfg += &workload(env.pod("client-b"), &[], "");
    env.apply(&cfg);
    env.enroll("client", Some("client"));
    env.enroll("client-b", Some("client-b"));
    let a = spread(&env.connect("client", &format!("{VIP}:80"), 60));
    let b = spread(&env.connect("client-b", &format!("{VIP}:80"), 60));
    assert_eq!(a.get("s1"), Some(&60), "zone-a client: {a:?}");
    assert_eq!(b.get("s2").unwrap_or(&0) + b.get("s3").unwrap_or(&0), 60, "zone-b client: {b:?}");
}

#[test]
fn strict_without_a_local_endpoint_fails_with_ehostunreach() {
    if !root_or_skip("strict_without_a_local_endpoint_fails_with_ehostunreach") {
        return;
    }
    let mut env = Env::new(&three_backends_two_zones());
    start_servers(&env, &[8080], &[]);
    let lb = "{routing_preference: [ZONE], mode: STRICT}";
    let cfg = echo_config(&env, lb, &[]);
    env.apply(&cfg);
    env.enroll("client", Some("client"));
    assert_eq!(spread(&env.connect("client", &format!("{VIP}:80"), 30)).get("s1"), Some(&30));

    let cfg = echo_config(&env, lb, &[("s1", "absent")]);
    env.apply(&cfg);
    let a = env.connect("client", &format!("{VIP}:80"), 5);
    assert!(a.iter().all(|a| a.errno == Some(libc::EHOSTUNREACH)), "{a:?}");
}

#[test]
fn service_without_endpoints_refuses_connections() {
    if !root_or_skip("service_without_endpoints_refuses_connections") {
        return;
    }
    let mut env = Env::new(&three_backends_two_zones());
    let cfg = echo_config(&env, "{}", &[("s1", "absent"), ("s2", "absent"), ("s3", "absent")]);
    env.apply(&cfg);
    env.enroll("client", None);
    let a = env.connect("client", &format!("{VIP}:80"), 3);
    assert!(a.iter().all(|a| a.errno == Some(libc::ECONNREFUSED)), "{a:?}");
}

#[test]
fn ipv6_and_v4_mapped_destinations_are_balanced() {
    if !root_or_skip("ipv6_and_v4_mapped_destinations_are_balanced") {
        return;
    }
    let mut env = Env::new(&three_backends_two_zones());
    start_servers(&env, &[8080], &[]);
    let mut w = workload(env.pod("client"), &[], "");
    for s in ["s1", "s2", "s3"] {
        w += &workload(env.pod(s), &[(SVC_KEY, "[]")], "");
    }
    let svc = service(&format!("[{VIP}, \"fd00:96::10\"]"), "[{service_port: 80, target_port: 8080}]", "{}");
    env.apply(&config("zone-a", &svc, &w));
    env.enroll("client", None);

    let v6 = env.connect("client", "[fd00:96::10]:80", 60);
    assert!(v6.iter().all(|a| a.ok), "{:?}", spread(&v6));
    assert!(v6.iter().all(|a| peer_ip(a).is_ipv6()));
    assert_eq!(spread(&v6).len(), 3, "{:?}", spread(&v6));

    // A dual-stack socket dialling the IPv4 VIP v4-mapped goes through connect6.
    let mapped = env.connect("client", &format!("[::ffff:{VIP}]:80"), 30);
    assert!(mapped.iter().all(|a| a.ok), "{:?}", spread(&mapped));
    for a in &mapped {
        let IpAddr::V6(p) = peer_ip(a) else { panic!("peer {:?}", a.peer) };
        assert!(p.to_ipv4_mapped().is_some(), "expected a v4-mapped backend, got {p}");
    }
}

#[test]
fn a_service_with_twenty_ports_maps_each_to_its_target() {
    if !root_or_skip("a_service_with_twenty_ports_maps_each_to_its_target") {
        return;
    }
    let mut env = Env::new(&three_backends_two_zones());
    let targets: Vec<u16> = (0..20).map(|i| 9000 + i).collect();
    start_servers(&env, &targets, &[]);
    let ports: Vec<String> =
        (0..20).map(|i| format!("{{service_port: {}, target_port: {}}}", 7000 + i, 9000 + i)).collect();
    let mut w = String::new();
    for s in ["s1", "s2", "s3"] {
        w += &workload(env.pod(s), &[(SVC_KEY, "[]")], "");
    }
    env.apply(&config("zone-a", &service(&format!("[{VIP}]"), &format!("[{}]", ports.join(", ")), "{}"), &w));
    env.enroll("client", None);
    for i in 0..20u16 {
        let a = env.connect("client", &format!("{VIP}:{}", 7000 + i), 3);
        for x in &a {
            assert!(x.ok, "port {}: {x:?}", 7000 + i);
            let peer: SocketAddr = x.peer.as_ref().unwrap().parse().unwrap();
            assert_eq!(peer.port(), 9000 + i);
        }
    }
}

#[test]
fn per_workload_target_ports_override_the_service_default() {
    if !root_or_skip("per_workload_target_ports_override_the_service_default") {
        return;
    }
    let mut env = Env::new(&three_backends_two_zones());
    env.bed.serve(env.pod("s1"), &[8080], &[]).unwrap();
    env.bed.serve(env.pod("s2"), &[9999], &[]).unwrap();
    let mut w = workload(env.pod("s1"), &[(SVC_KEY, "[]")], "");
    w += &workload(env.pod("s2"), &[(SVC_KEY, "[{service_port: 80, target_port: 9999}]")], "");
    env.apply(&config(
        "zone-a",
        &service(&format!("[{VIP}]"), "[{service_port: 80, target_port: 8080}]", "{}"),
        &w,
    ));
    env.enroll("client", None);
    let a = env.connect("client", &format!("{VIP}:80"), 60);
    let s = spread(&a);
    assert!(a.iter().all(|a| a.ok), "{s:?}");
    assert!(s.contains_key("s1") && s.contains_key("s2"), "{s:?}");
}

#[test]
fn udp_frontends_are_balanced_at_connect() {
    if !root_or_skip("udp_frontends_are_balanced_at_connect") {
        return;
    }
    let mut env = Env::new(&three_backends_two_zones());
    start_servers(&env, &[], &[5353]);
    let mut w = String::new();
    for s in ["s1", "s2", "s3"] {
        w += &workload(env.pod(s), &[(SVC_KEY, "[]")], "");
    }
    let ports = "[{service_port: 53, target_port: 5353, protocol: UDP}]";
    env.apply(&config("zone-a", &service(&format!("[{VIP}]"), ports, "{}"), &w));
    env.enroll("client", None);
    let a = env.connect_udp("client", &format!("{VIP}:53"), 60);
    let s = spread(&a);
    assert!(a.iter().all(|a| a.ok), "{s:?}");
    assert_eq!(s.len(), 3, "{s:?}");
    // TCP on the same port is not a frontend: it passes unchanged and cannot be routed.
    let t = env.connect("client", &format!("{VIP}:53"), 1);
    assert_eq!(t[0].errno, Some(libc::ENETUNREACH), "{t:?}");
}

#[test]
fn capacity_weights_shift_the_spread() {
    if !root_or_skip("capacity_weights_shift_the_spread") {
        return;
    }
    let mut env = Env::new(&three_backends_two_zones());
    start_servers(&env, &[8080], &[]);
    let cfg = echo_config(&env, "{}", &[("s1", ", capacity: 1"), ("s2", ", capacity: 3"), ("s3", "absent")]);
    env.apply(&cfg);
    env.enroll("client", None);
    let a = env.connect("client", &format!("{VIP}:80"), 800);
    let s = spread(&a);
    eprintln!("weighted 1:3 spread over 800: {s:?}");
    let counts = [*s.get("s1").unwrap_or(&0), *s.get("s2").unwrap_or(&0)];
    let chi2 = chi_square(&counts, &[200.0, 600.0]);
    // One degree of freedom: p > 0.001 <=> chi2 < 10.828.
    assert!(chi2 < 10.828, "spread {counts:?} does not follow 1:3 (chi2 {chi2:.2})");
}

#[test]
fn workload_addresses_and_unenrolled_pods_pass_unchanged() {
    if !root_or_skip("workload_addresses_and_unenrolled_pods_pass_unchanged") {
        return;
    }
    let mut pods = three_backends_two_zones();
    pods.push(PodSpec::new("outsider", "node-a", "zone-a"));
    let mut env = Env::new(&pods);
    start_servers(&env, &[8080], &[]);
    let cfg = echo_config(&env, "{}", &[]);
    env.apply(&cfg);
    env.enroll("client", None);

    // A workload reached by its own address goes exactly there.
    let s2 = env.pod("s2").ipv4;
    let a = env.connect("client", &format!("{s2}:8080"), 20);
    assert!(a.iter().all(|a| a.ok && a.server.as_deref() == Some("s2")), "{a:?}");

    // A pod that is not enrolled is untouched: its VIP connect cannot be routed.
    let a = env.connect("outsider", &format!("{VIP}:80"), 3);
    assert!(a.iter().all(|a| a.errno == Some(libc::ENETUNREACH)), "{a:?}");
    // ... until it is enrolled, and again after it is unenrolled.
    env.enroll("outsider", None);
    assert!(env.connect("outsider", &format!("{VIP}:80"), 3).iter().all(|a| a.ok));
    let cookie = kmesh_daemon::netns::cookie_of(&env.pod("outsider").netns_path()).unwrap();
    assert!(env.mesh().unenroll(cookie).unwrap());
    let a = env.connect("outsider", &format!("{VIP}:80"), 1);
    assert_eq!(a[0].errno, Some(libc::ENETUNREACH), "{a:?}");
}

#[test]
fn removing_a_backend_under_load_loses_nothing() {
    if !root_or_skip("removing_a_backend_under_load_loses_nothing") {
        return;
    }
    let mut env = Env::new(&three_backends_two_zones());
    start_servers(&env, &[8080], &[]);
    let cfg = echo_config(&env, "{}", &[]);
    env.apply(&cfg);
    env.enroll("client", None);

    // A client opening connections back to back for 3 s (bounded count and time).
    let opts = ClientOptions { count: 200_000, duration_ms: 3000, ..Default::default() };
    let child = env.pod("client").connect_background(format!("{VIP}:80").parse().unwrap(), &opts).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let cfg = echo_config(&env, "{}", &[("s3", "absent")]);
    env.apply(&cfg);
    let applied_ns = monotonic_ns();
    let attempts = child.finish().unwrap();

    let failed = attempts.iter().filter(|a| !a.ok).count();
    let before = attempts.iter().filter(|a| a.start_ns < applied_ns).count();
    let after: Vec<_> = attempts.iter().filter(|a| a.start_ns >= applied_ns).collect();
    let to_removed_after = after.iter().filter(|a| a.server.as_deref() == Some("s3")).count();
    eprintln!(
        "connections: {} total, {before} before the update, {} after; failed {failed}; to the removed backend after the update {to_removed_after}",
        attempts.len(),
        after.len()
    );
    assert!(before > 50 && after.len() > 50, "too few connections to judge");
    assert_eq!(failed, 0, "failed connects: {:?}", attempts.iter().find(|a| !a.ok));
    assert_eq!(to_removed_after, 0);
}

#[test]
fn a_full_map_is_refused_whole_and_the_previous_state_stays() {
    if !root_or_skip("a_full_map_is_refused_whole_and_the_previous_state_stays") {
        return;
    }
    let caps = Capacities { frontends: 4, ..Capacities::default() };
    let mut env = Env::with_capacities(&three_backends_two_zones(), caps);
    start_servers(&env, &[8080], &[]);
    let cfg = echo_config(&env, "{}", &[]);
    env.apply(&cfg);
    env.enroll("client", None);
    let before = env.mesh().dataplane().read_state().unwrap();

    // Five ports need five frontends: refused before any write.
    let ports: Vec<String> =
        (0..5).map(|i| format!("{{service_port: {}, target_port: 8080}}", 80 + i)).collect();
    let mut w = String::new();
    for s in ["s1", "s2", "s3"] {
        w += &workload(env.pod(s), &[(SVC_KEY, "[]")], "");
    }
    let big = config("zone-a", &service(&format!("[{VIP}]"), &format!("[{}]", ports.join(", ")), "{}"), &w);
    let model = kmesh_daemon::config::parse(&big).unwrap();
    let err = env.mesh().set_model(model).unwrap_err();
    eprintln!("refused: {err}");
    assert!(matches!(err, KernelError::MapFull { map: "FRONTENDS", needed: 5, capacity: 4, .. }), "{err}");
    assert!(err.to_string().contains("--frontends-capacity"));
    assert_eq!(env.mesh().counters.map_full_errors.get("FRONTENDS"), Some(&1));
    assert_eq!(env.mesh().dataplane().read_state().unwrap(), before, "nothing changed in the kernel");
    assert!(env.connect("client", &format!("{VIP}:80"), 10).iter().all(|a| a.ok));
}

#[test]
fn connection_telemetry_counts_exact_bytes_with_istio_labels() {
    if !root_or_skip("connection_telemetry_counts_exact_bytes_with_istio_labels") {
        return;
    }
    let mut env = Env::new(&three_backends_two_zones());
    start_servers(&env, &[8080], &[]);
    let cfg = echo_config(&env, "{}", &[("s2", "absent"), ("s3", "absent")]);
    env.apply(&cfg);
    env.enroll("client", Some("client"));
    env.enroll("s1", Some("s1"));
    let _ = env.mesh().drain_telemetry();
    // 3 connections through the VIP, each sending 1,000 bytes and receiving them back after
    // the server's 3-byte name line ("s1\n").
    let opts = ClientOptions { count: 3, send_bytes: 1000, ..Default::default() };
    let a = env
        .pod("client")
        .connect_background(format!("{VIP}:80").parse().unwrap(), &opts)
        .unwrap()
        .finish()
        .unwrap();
    assert!(a.iter().all(|a| a.ok), "{a:?}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let lines = env.mesh().drain_telemetry();
    eprintln!("{}", lines.join("\n"));
    let series = env.mesh().telemetry.series.clone();
    let find = |reporter: &str| {
        series
            .iter()
            .find(|(l, _)| {
                l.reporter == reporter && l.source_workload == "client" && l.destination_workload == "s1"
            })
            .map(|(l, c)| (l.clone(), *c))
            .unwrap_or_else(|| panic!("no {reporter} series in {series:#?}"))
    };
    let (src_labels, src) = find("source");
    assert_eq!((src.opened, src.closed), (3, 3), "{src:?}");
    assert_eq!(src.received_bytes, 3 * 1000, "client to server");
    assert_eq!(src.sent_bytes, 3 * 1003, "server to client");
    assert_eq!(src_labels.destination_service, "echo.default.svc.cluster.local");
    assert_eq!(src_labels.source_principal, "spiffe://cluster.local/ns/default/sa/client");
    let (_, dst) = find("destination");
    assert_eq!((dst.opened, dst.closed, dst.received_bytes, dst.sent_bytes), (3, 3, 3000, 3009), "{dst:?}");
    // One access-log line per closed connection and side.
    assert_eq!(lines.len(), 6, "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("direction=outbound") && l.contains("sent_bytes=1000 received_bytes=1003"))
    );
}
