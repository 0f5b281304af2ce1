//! The data plane on the real kernel: real eBPF programs attached to a testbed's cgroup, real
//! TCP and UDP between pods. Needs root; skips loudly otherwise.
mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use common::*;
use kmesh_daemon::kernel::{self, Capacities, KernelError};
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

    let a = env.connect("client", &format!("{VIP}:80"), 2400);
    let s = spread(&a);
    assert!(a.iter().all(|a| a.ok), "failed attempts: {s:?}");
    let backends: BTreeSet<IpAddr> = ["s1", "s2", "s3"].iter().map(|p| IpAddr::V4(env.pod(p).ipv4)).collect();
    for x in &a {
        let peer: SocketAddr = x.peer.as_ref().unwrap().parse().unwrap();
        assert!(backends.contains(&peer.ip()) && peer.port() == 8080, "connected to {peer}");
    }
    let counts: Vec<u32> = ["s1", "s2", "s3"].iter().map(|k| s.get(*k).copied().unwrap_or(0)).collect();
    assert_follows(&counts, &[1.0; 3]);
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

/// Issue 16, item 1: a UDP client that never calls connect() (every stub resolver) is
/// balanced datagram flow by datagram flow at sendmsg(), sees the answers come from the VIP
/// it asked (recvmsg()), keeps one backend per socket while that backend is in force (a flow,
/// as conntrack keeps one), and moves when it leaves the service.
#[test]
fn unconnected_udp_is_balanced_and_answers_come_from_the_vip() {
    if !root_or_skip("unconnected_udp_is_balanced_and_answers_come_from_the_vip") {
        return;
    }
    let mut env = Env::new(&three_backends_two_zones());
    start_servers(&env, &[], &[5353]);
    let ports = "[{service_port: 53, target_port: 5353, protocol: UDP}]";
    let pods: std::collections::BTreeMap<&str, kmesh_testbed::Pod> =
        ["s1", "s2", "s3"].into_iter().map(|n| (n, env.pod(n).clone())).collect();
    let cfg = |backends: &[&str]| {
        let w: String = backends.iter().map(|s| workload(&pods[s], &[(SVC_KEY, "[]")], "")).collect();
        config("zone-a", &service(&format!("[{VIP}]"), ports, "{}"), &w)
    };
    env.apply(&cfg(&["s1", "s2", "s3"]));
    env.enroll("client", None);
    let target: std::net::SocketAddr = format!("{VIP}:53").parse().unwrap();
    let run = |o: &ClientOptions| env.pod("client").connect_background(target, o).unwrap().finish().unwrap();
    let vip_answered =
        |a: &[kmesh_testbed::Attempt]| a.iter().all(|a| a.ok && a.peer.as_deref() == Some("10.96.0.10:53"));

    // A socket per datagram: a flow each, spread evenly.
    let a = run(&ClientOptions { count: 1500, udp: true, unconnected: true, ..Default::default() });
    assert!(vip_answered(&a), "{:?}", a.iter().find(|a| a.peer.as_deref() != Some("10.96.0.10:53")));
    let s = spread(&a);
    assert_follows(&[s["s1"], s["s2"], s["s3"]], &[1.0, 1.0, 1.0]);

    // One socket: one backend for all its datagrams.
    let one =
        ClientOptions { count: 50, udp: true, unconnected: true, one_socket: true, ..Default::default() };
    let a = run(&one);
    assert!(vip_answered(&a));
    assert_eq!(spread(&a).len(), 1, "{:?}", spread(&a));

    // The backend of a flow leaves the service: the next datagram goes to one still in it.
    env.apply(&cfg(&["s1"]));
    let o = ClientOptions { count: 400, duration_ms: 2000, interval_us: 5000, ..one.clone() };
    let bg = env.pod("client").connect_background(target, &o).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(600));
    let t_change = kmesh_testbed::monotonic_ns();
    env.apply(&cfg(&["s2"]));
    let t_applied = kmesh_testbed::monotonic_ns();
    let a = bg.finish().unwrap();
    assert!(vip_answered(&a), "{:?}", a.iter().find(|a| !a.ok));
    let before: Vec<_> =
        a.iter().filter(|x| x.start_ns < t_change).map(|x| x.server.clone().unwrap()).collect();
    let after: Vec<_> =
        a.iter().filter(|x| x.start_ns > t_applied).map(|x| x.server.clone().unwrap()).collect();
    assert!(!before.is_empty() && before.iter().all(|s| s == "s1"), "{before:?}");
    assert!(!after.is_empty() && after.iter().all(|s| s == "s2"), "{after:?}");

    // Outside the mesh nothing is rewritten: the VIP is not routable from s3.
    let a = env
        .pod("s3")
        .connect_background(target, &ClientOptions { timeout_ms: 300, ..one })
        .unwrap()
        .finish()
        .unwrap();
    assert_eq!(a[0].errno, Some(libc::ENETUNREACH), "{a:?}");
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
    let a = env.connect("client", &format!("{VIP}:80"), 2000);
    let s = spread(&a);
    let counts = [*s.get("s1").unwrap_or(&0), *s.get("s2").unwrap_or(&0)];
    assert_follows(&counts, &[1.0, 3.0]);
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
    let mut s3_server = 0;
    for s in ["s1", "s2", "s3"] {
        let pid = env.bed.serve(env.pod(s), &[8080], &[]).unwrap();
        if s == "s3" {
            s3_server = pid;
        }
    }
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
    // The removed backend goes away for real once its in-flight exchanges (about a
    // millisecond each) are done, as a draining pod does: a connection still routed to it
    // after the update would fail.
    std::thread::sleep(std::time::Duration::from_millis(100));
    env.bed.stop(s3_server);
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
    let mut env = Env::with_ceilings(&three_backends_two_zones(), caps, kernel::INITIAL_CAPACITY);
    start_servers(&env, &[8080], &[]);
    let cfg = echo_config(&env, "{}", &[]);
    env.apply(&cfg);
    env.enroll("client", None);
    let before = env.mesh().dataplane().read_state().unwrap();

    // Five ports need five frontends: refused before any write, though the new backend and
    // slots were written while the compilation ran (the model counts as large here): those
    // are deleted again.
    env.mesh().set_write_ahead(kernel::WriteAhead::Everything);
    let ports: Vec<String> =
        (0..5).map(|i| format!("{{service_port: {}, target_port: 8080}}", 80 + i)).collect();
    let mut w = String::new();
    for s in ["client", "s1", "s2", "s3"] {
        w += &workload(env.pod(s), &[(SVC_KEY, "[]")], "");
    }
    // (A node in another zone: a full compilation, the one that writes ahead.)
    let big = config("zone-b", &service(&format!("[{VIP}]"), &format!("[{}]", ports.join(", ")), "{}"), &w);
    let model = kmesh_daemon::config::parse(&big).unwrap();
    let err = env.mesh().set_model(model).unwrap_err();
    eprintln!("refused: {err}");
    assert!(matches!(err, KernelError::MapFull { map: "FRONTENDS", needed: 5, capacity: 4, .. }), "{err}");
    assert!(err.to_string().contains("--frontends-capacity"));
    assert_eq!(env.mesh().counters.map_full_errors.get("FRONTENDS"), Some(&1));
    assert!(env.mesh().counters.map_writes_ahead >= 2, "{:?}", env.mesh().counters);
    assert_eq!(env.mesh().dataplane().read_state().unwrap(), before, "nothing changed in the kernel");
    assert!(env.connect("client", &format!("{VIP}:80"), 10).iter().all(|a| a.ok));
}

/// Issue 13, item 2: one apply is one transaction across the load-balancing and the
/// authorization maps. A change that removes a backend and adds a policy whose verdict rows do
/// not fit is refused before any write: the backend stays in the kernel and in the model.
#[test]
fn a_change_whose_policy_does_not_fit_changes_no_map_of_either_family() {
    if !root_or_skip("a_change_whose_policy_does_not_fit_changes_no_map_of_either_family") {
        return;
    }
    let caps = Capacities { authz_verdict: 8, ..Capacities::default() };
    let mut env = Env::with_ceilings(&three_backends_two_zones(), caps, kernel::INITIAL_CAPACITY);
    start_servers(&env, &[8080], &[]);
    env.apply(&echo_config(&env, "{}", &[]));
    env.enroll("client", None);
    let before = env.mesh().dataplane().read_state().unwrap();
    let authz_before = env.mesh().dataplane().read_authz().unwrap();

    // s3 leaves the service, and a DENY on port 9090 for every pod of the namespace arrives:
    // 4 destinations x 2 identity rows x 2 ports = 16 verdict rows, capacity 8.
    let text = echo_config(&env, "{}", &[("s3", "absent")])
        + "policies:\n  - {name: no-9090, namespace: default, action: DENY, rules: [{clauses: [{matches: [{destination_ports: [9090]}]}]}]}\n";
    let model = kmesh_daemon::config::parse(&text).unwrap();
    let err = env.mesh().set_model(model).unwrap_err();
    eprintln!("refused: {err}");
    assert!(matches!(err, KernelError::MapFull { map: "AUTHZ_VERDICT", capacity: 8, .. }), "{err}");
    assert!(err.to_string().contains("--authz-verdict-capacity"), "{err}");
    assert_eq!(
        env.mesh().dataplane().read_state().unwrap(),
        before,
        "the load-balancing maps did not change"
    );
    assert_eq!(env.mesh().dataplane().read_authz().unwrap(), authz_before, "nor did the authorization maps");
    assert!(env.mesh().model().workloads.contains_key("s3"), "the model is the one in force");
    let s = spread(&env.connect("client", &format!("{VIP}:80"), 60));
    assert!(s.contains_key("s3"), "s3 still receives connections: {s:?}");

    // The same change without the policy goes through, and the next apply is consistent.
    env.apply(&echo_config(&env, "{}", &[("s3", "absent")]));
    let s = spread(&env.connect("client", &format!("{VIP}:80"), 30));
    assert!(!s.contains_key("s3"), "{s:?}");
}

/// Removes every entry of the pinned map `name` of `env` (an inconsistency only a bug, a hand
/// edit or a lost write could leave).
fn clear_pinned<K: aya::Pod, V: aya::Pod>(env: &Env, name: &'static str) -> usize {
    let data =
        kmesh_daemon::kernel::open_pinned(&kmesh_daemon::kernel::layout_dir(&env.pin_dir), name).unwrap();
    let mut m: aya::maps::HashMap<_, K, V> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap();
    let keys: Vec<K> = m.keys().map(Result::unwrap).collect();
    for k in &keys {
        m.remove(k).unwrap();
    }
    keys.len()
}

/// Issue 13, item 6: once a destination is known to be a frontend, an inconsistency behind it
/// refuses the connection (EAGAIN: retry) and is counted, instead of passing the VIP on to
/// whatever route the node has; and a policed destination without verdict rows drops the
/// connection instead of admitting it.
#[test]
fn inconsistent_tables_refuse_and_count_instead_of_passing() {
    if !root_or_skip("inconsistent_tables_refuse_and_count_instead_of_passing") {
        return;
    }
    let mut env = Env::new(&three_backends_two_zones());
    start_servers(&env, &[8080], &[]);
    let text = echo_config(&env, "{}", &[])
        + "policies:\n  - {name: allow-all, namespace: default, rules: [{clauses: [{matches: [{}]}]}]}\n";
    env.apply(&text);
    env.enroll("client", Some("client"));
    env.enroll("s1", Some("s1"));
    let s1 = format!("{}:8080", env.pod("s1").ipv4);
    assert!(env.connect("client", &format!("{VIP}:80"), 5).iter().all(|a| a.ok));
    assert!(env.connect("client", &s1, 1)[0].ok, "allowed by policy");

    let stat = |env: &mut Env, i: u32| env.mesh().observer().stats()[i as usize];
    let before = stat(&mut env, kmesh_common::stat::INCONSISTENT);
    assert!(clear_pinned::<kmesh_common::TableKey, kmesh_common::TableValue>(&env, "LB_TABLES") > 0);
    let a = env.connect("client", &format!("{VIP}:80"), 5);
    assert!(a.iter().all(|a| a.errno == Some(libc::EAGAIN)), "{a:?}");
    assert_eq!(stat(&mut env, kmesh_common::stat::INCONSISTENT) - before, 5);

    assert!(clear_pinned::<kmesh_common::VerdictKey, kmesh_common::VerdictValue>(&env, "AUTHZ_VERDICT") > 0);
    let a = env.connect("client", &s1, 3);
    assert!(a.iter().all(|a| a.errno == Some(libc::ECONNREFUSED)), "dropped, not admitted: {a:?}");
    assert_eq!(stat(&mut env, kmesh_common::stat::AUTHZ_INCONSISTENT), 3);
}

/// The value of the series of `name` whose labels include every `label="value"` pair.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Connections the kernel holds telemetry state for (`CONNS`).
fn tracked_connections(pin_dir: &std::path::Path) -> usize {
    let p = pin_dir.join(format!("v{}/maps/CONNS", kmesh_common::MAP_LAYOUT_VERSION));
    let data = aya::maps::MapData::from_pin(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let m: aya::maps::Array<_, kmesh_common::ConnMeta> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).unwrap();
    m.iter().filter(|s| s.as_ref().is_ok_and(|s| s.cookie != 0)).count()
}

/// The client holding one connection to the echo service, exchanging a line every 50 ms for
/// `secs` seconds (its output says `"ok":true` when every exchange worked).
fn hold_connection(env: &Env, secs: u32) -> std::process::Child {
    let mut hold = env.pod("client").command(kmesh_testbed::agent_path().unwrap());
    hold.args(["hold", "--target", &format!("{VIP}:80"), "--secs", &secs.to_string(), "--interval-ms", "50"]);
    hold.stdout(std::process::Stdio::piped()).stdin(std::process::Stdio::null()).spawn().unwrap()
}

/// Servers on s1 only (`s1_extra` in its workload entry), the echo service, the client and s1
/// enrolled, no event pending.
fn telemetry_env(s1_extra: &str) -> Env {
    let mut env = Env::new(&three_backends_two_zones());
    start_servers(&env, &[8080], &[]);
    let cfg = echo_config(&env, "{}", &[("s1", s1_extra), ("s2", "absent"), ("s3", "absent")]);
    env.apply(&cfg);
    env.enroll("client", Some("client"));
    env.enroll("s1", Some("s1"));
    let _ = env.mesh().observer().drain_telemetry();
    env
}

#[test]
fn connection_telemetry_counts_exact_bytes_with_istio_labels() {
    if !root_or_skip("connection_telemetry_counts_exact_bytes_with_istio_labels") {
        return;
    }
    exact_bytes(true);
}

/// Without access log, the kernel sums short connections by peers instead of sending a record
/// of each (`TFLAG_TALLY`): the same traffic gives the same series, to the byte.
#[test]
fn connections_summed_in_the_kernel_count_the_same_bytes() {
    if !root_or_skip("connections_summed_in_the_kernel_count_the_same_bytes") {
        return;
    }
    exact_bytes(false);
}

/// Known traffic over the echo service, with the access log on or off: the series it gives,
/// and the log lines or the kernel's sums.
fn exact_bytes(access_log: bool) {
    let mut env = telemetry_env(
        ", workload_name: s1-deploy, canonical_name: echo-app, canonical_revision: v2, cluster_id: c1",
    );
    let m = kmesh_daemon::telemetry::Monitoring { access_log, ..Default::default() };
    env.mesh().observer().set_monitoring(m, None).unwrap();
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
    // 20 that only read the name line and close at once (the client's socket, orphaned in
    // FIN_WAIT2, closes before or after the server's FIN: both must count 3 bytes).
    assert!(env.connect("client", &format!("{VIP}:80"), 20).iter().all(|a| a.ok));
    // And one connection to a port nobody listens on: refused, so it never establishes.
    let s1 = env.pod("s1").ipv4;
    assert!(env.connect("client", &format!("{s1}:9"), 1).iter().all(|a| !a.ok));
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Sums are taken two drains after the epoch they were made in.
    let mut lines = Vec::new();
    for _ in 0..2 {
        lines.extend(env.mesh().observer().drain_telemetry());
    }
    eprintln!("{}", lines.join("\n"));
    let summed = env.mesh().observer().telemetry.tallied;
    let text = env.mesh().observer().telemetry.render();
    let src = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("destination_workload", "s1-deploy"),
        ("destination_service", "echo.default.svc.cluster.local"),
    ];
    let get = |name: &str, l: &[(&str, &str)]| {
        sample(&text, name, l).unwrap_or_else(|| panic!("{name} {l:?} in\n{text}"))
    };
    assert_eq!(get("kmesh_tcp_connections_opened_total", &src), 23);
    assert_eq!(get("kmesh_tcp_connections_closed_total", &src), 23);
    // Both sides of every connection, and the refused one, reported their close: the kernel
    // holds no state for any of them.
    assert_eq!(tracked_connections(&env.pin_dir), 0, "connection state left behind");
    assert_eq!(get("kmesh_tcp_received_bytes_total", &src), 3 * 1000, "client to server");
    assert_eq!(get("kmesh_tcp_sent_bytes_total", &src), 3 * 1003 + 20 * 3, "server to client");
    // Istio's labels, filled from the model.
    let full = [
        ("source_principal", "spiffe://cluster.local/ns/default/sa/client"),
        ("destination_principal", "spiffe://cluster.local/ns/default/sa/s1"),
        ("destination_app", "echo-app"),
        ("destination_version", "v2"),
        ("destination_canonical_service", "echo-app"),
        ("destination_cluster", "c1"),
        ("destination_service_name", "echo"),
        ("destination_service_namespace", "default"),
        ("request_protocol", "tcp"),
        ("connection_security_policy", "none"),
    ];
    assert_eq!(get("kmesh_tcp_connections_opened_total", &[&src[..], &full[..]].concat()), 23);
    // The destination side reports the same, and knows the service from the target port.
    let dst = [
        ("reporter", "destination"),
        ("source_workload", "client"),
        ("destination_service", "echo.default.svc.cluster.local"),
    ];
    assert_eq!(get("kmesh_tcp_received_bytes_total", &dst), 3000);
    assert_eq!(get("kmesh_tcp_sent_bytes_total", &dst), 3009 + 60);
    // The workload family: by destination pod.
    let pod = [
        ("reporter", "source"),
        ("destination_pod_name", "s1"),
        ("destination_pod_address", &s1.to_string()),
    ];
    assert_eq!(get("kmesh_tcp_workload_connections_opened_total", &pod), 23);
    assert_eq!(get("kmesh_tcp_workload_received_bytes_total", &pod), 3000);
    // The refused connection: failed, for the workload (no service: dialled by pod address).
    assert_eq!(get("kmesh_tcp_workload_connections_failed_total", &pod), 1);
    assert_eq!(get("kmesh_tcp_retrans_total", &src), 0);
    if !access_log {
        // Not one record: every connection closed before its first report, and was summed.
        assert!(lines.is_empty(), "{lines:?}");
        assert_eq!(summed, 2 * 23 + 1);
        return;
    }
    assert_eq!(summed, 0, "logged connections are reported one by one");
    // One access-log line per closed connection and side, plus the failed one.
    assert_eq!(lines.len(), 2 * 23 + 1, "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("direction=outbound") && l.contains("sent_bytes=1000 received_bytes=1003"))
    );
    assert!(
        lines.iter().any(|l| l.contains(&format!("dst={s1}:9")) && l.contains("state=failed")),
        "{lines:?}"
    );
}

/// A pod behind two services on the same target port: the source side names the service
/// whose address the client dialled (connect() hands it to the connection's telemetry), not
/// the first of the pod's services the port matches (`alpha` sorts before `echo`).
#[test]
fn telemetry_names_the_service_the_client_dialled() {
    if !root_or_skip("telemetry_names_the_service_the_client_dialled") {
        return;
    }
    let mut env = Env::new(&three_backends_two_zones());
    start_servers(&env, &[8080], &[]);
    let alpha = "  - {name: alpha, namespace: default, hostname: alpha.default.svc.cluster.local, addresses: [10.96.0.20], ports: [{service_port: 80, target_port: 8080}]}\n";
    let services = service(&format!("[{VIP}]"), "[{service_port: 80, target_port: 8080}]", "{}") + alpha;
    let w = workload(env.pod("client"), &[], "")
        + &workload(env.pod("s1"), &[(SVC_KEY, "[]"), ("default/alpha.default.svc.cluster.local", "[]")], "");
    env.apply(&config("zone-a", &services, &w));
    env.enroll("client", Some("client"));
    let _ = env.mesh().observer().drain_telemetry();
    for (vip, n) in [(VIP, 5), ("10.96.0.20", 3)] {
        assert!(env.connect("client", &format!("{vip}:80"), n).iter().all(|a| a.ok));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = env.mesh().observer().drain_telemetry();
    let text = env.mesh().observer().telemetry.render();
    let opened = |svc: &str| {
        sample(
            &text,
            "kmesh_tcp_connections_opened_total",
            &[("reporter", "source"), ("destination_service", svc)],
        )
    };
    assert_eq!(opened("echo.default.svc.cluster.local"), Some(5), "{text}");
    assert_eq!(opened("alpha.default.svc.cluster.local"), Some(3), "{text}");
}

/// Switching telemetry off while connections are open: they still give their `CONNS` slots
/// back when they close (else each would hold one until the node reboots).
#[test]
fn connections_open_when_telemetry_goes_off_free_their_slots() {
    if !root_or_skip("connections_open_when_telemetry_goes_off_free_their_slots") {
        return;
    }
    let mut env = telemetry_env("");
    let child = hold_connection(&env, 1);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(tracked_connections(&env.pin_dir), 2, "both sides of the open connection");
    let off = kmesh_daemon::telemetry::Monitoring {
        access_log: false,
        service_metrics: false,
        workload_metrics: false,
        connection_metrics: false,
        ..Default::default()
    };
    env.mesh().observer().set_monitoring(off, None).unwrap();
    assert_eq!(env.mesh().observer().monitoring()["kernel_telemetry"], false);
    let out = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"ok\":true"), "{out:?}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(tracked_connections(&env.pin_dir), 0, "slots given back at close");
}

#[test]
fn long_lived_connections_report_before_they_close() {
    if !root_or_skip("long_lived_connections_report_before_they_close") {
        return;
    }
    let mut env = telemetry_env("");
    let mut m = env.mesh().observer().telemetry.settings.clone();
    m.connection_metrics = true;
    env.mesh().observer().set_monitoring(m, Some(std::time::Duration::from_millis(300))).unwrap();
    let child = hold_connection(&env, 3);
    let src = [("reporter", "source"), ("destination_workload", "s1")];
    std::thread::sleep(std::time::Duration::from_millis(200));
    // The client's socket and the server's are tracked while the connection lives.
    assert_eq!(tracked_connections(&env.pin_dir), 2, "both sides of the open connection");
    let mut seen = Vec::new();
    let mut opened = Vec::new();
    for _ in 0..5 {
        std::thread::sleep(std::time::Duration::from_millis(400));
        let _ = env.mesh().observer().drain_telemetry();
        let text = env.mesh().observer().telemetry.render();
        seen.push((
            sample(&text, "kmesh_tcp_received_bytes_total", &src).unwrap_or(0),
            sample(&text, "kmesh_tcp_connection_received_bytes_total", &src),
            sample(&text, "kmesh_tcp_connections_closed_total", &src).unwrap_or(0),
        ));
        opened.push(sample(&text, "kmesh_tcp_connections_opened_total", &src).unwrap_or(0));
    }
    eprintln!("while open (service bytes, connection series, closed): {seen:?}; opened {opened:?}");
    // Its open came with its first report, once.
    assert!(opened.iter().all(|n| *n == 1), "opened once while open: {opened:?}");
    assert!(seen.iter().all(|(_, _, closed)| *closed == 0), "still open: {seen:?}");
    assert!(seen.windows(2).filter(|w| w[1].0 > w[0].0).count() >= 3, "counters move while open: {seen:?}");
    assert!(
        seen.iter().all(|(b, c, _)| c == &Some(*b)),
        "one connection series with the same bytes: {seen:?}"
    );
    let out = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"ok\":true"), "{out:?}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let lines = env.mesh().observer().drain_telemetry();
    let text = env.mesh().observer().telemetry.render();
    assert_eq!(sample(&text, "kmesh_tcp_connections_closed_total", &src), Some(1));
    assert_eq!(tracked_connections(&env.pin_dir), 0, "both sides forgotten at close");
    assert_eq!(
        sample(&text, "kmesh_tcp_connection_received_bytes_total", &src),
        None,
        "series gone at close"
    );
    // The total equals what the access log says the client sent.
    let line = lines.iter().find(|l| l.contains("direction=outbound")).expect("access log line");
    let sent: u64 = line.split("sent_bytes=").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert_eq!(sample(&text, "kmesh_tcp_received_bytes_total", &src), Some(sent), "{line}");
}

/// A connection's open is reported when it is established only where outlier detection needs
/// each success at once (eager opens); otherwise it comes with the connection's first record
/// (a report every interval, 5 s here, or its close), and a short connection makes one record
/// per side instead of two. Either way it counts once.
#[test]
fn opens_come_with_the_first_record_unless_outlier_detection_wants_them_at_once() {
    if !root_or_skip("opens_come_with_the_first_record_unless_outlier_detection_wants_them_at_once") {
        return;
    }
    let mut env = telemetry_env("");
    let src = [("reporter", "source"), ("destination_workload", "s1")];
    let opened = |env: &mut Env| {
        let _ = env.mesh().observer().drain_telemetry();
        let text = env.mesh().observer().telemetry.render();
        sample(&text, "kmesh_tcp_connections_opened_total", &src).unwrap_or(0)
    };
    let mut counts = Vec::new();
    for eager in [false, true] {
        {
            let mut o = env.mesh().observer();
            o.collect_outcomes = eager;
            let m = o.telemetry.settings.clone();
            o.set_monitoring(m, Some(std::time::Duration::from_secs(5))).unwrap();
        }
        let before = opened(&mut env);
        let events_before = env.mesh().observer().telemetry.events;
        let child = hold_connection(&env, 2);
        std::thread::sleep(std::time::Duration::from_millis(700));
        let while_open = opened(&mut env) - before;
        let out = child.wait_with_output().unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("\"ok\":true"), "{out:?}");
        // Ten short connections.
        assert!(env.connect("client", &format!("{VIP}:80"), 10).iter().all(|a| a.ok));
        std::thread::sleep(std::time::Duration::from_millis(300));
        let after = opened(&mut env) - before;
        let events = env.mesh().observer().telemetry.events - events_before;
        counts.push((eager, while_open, after, events));
    }
    eprintln!("(eager, opened while open, opened after, events): {counts:?}");
    // Deferred: nothing while open (no report within 5 s), then the held connection and the
    // ten short ones, each side one record.
    assert_eq!(counts[0].1, 0, "{counts:?}");
    assert_eq!(counts[0].2, 11, "{counts:?}");
    assert_eq!(counts[0].3, 2 * 11, "{counts:?}");
    // Eager: the held connection at once, each side two records.
    assert_eq!(counts[1].1, 1, "{counts:?}");
    assert_eq!(counts[1].2, 11, "{counts:?}");
    assert_eq!(counts[1].3, 4 * 11, "{counts:?}");
}

#[test]
fn a_full_ring_buffer_counts_every_lost_event() {
    if !root_or_skip("a_full_ring_buffer_counts_every_lost_event") {
        return;
    }
    let mut env = telemetry_env("");
    let lost_before = env.mesh().observer().stats()[kmesh_common::stat::TELEMETRY_LOST as usize];
    let events_before = env.mesh().observer().telemetry.events;
    // Nobody drains while 6,000 short connections make 2 events each (a close carrying the
    // open on both sides): 12,000 events of 128 bytes do not fit in the 1 MiB ring.
    let n = 6000;
    let opts = ClientOptions { count: n, ..Default::default() };
    let a = env
        .pod("client")
        .connect_background(format!("{VIP}:80").parse().unwrap(), &opts)
        .unwrap()
        .finish()
        .unwrap();
    assert_eq!(a.iter().filter(|a| a.ok).count(), n as usize);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = env.mesh().observer().drain_telemetry();
    let received = env.mesh().observer().telemetry.events - events_before;
    let lost = env.mesh().observer().stats()[kmesh_common::stat::TELEMETRY_LOST as usize] - lost_before;
    eprintln!("{received} events received, {lost} lost");
    assert!(lost > 0, "the ring overflowed");
    assert_eq!(received + lost, 2 * u64::from(n), "every event is either received or counted lost");
}

/// Issue 18, item 3: maps start small and grow, make-before-break, as the configuration
/// needs. Connections opened back to back while a load-balancing map grows all succeed, a
/// UDP socket keeps its backend, the maps then hold exactly what was applied, no program is
/// loaded again (a grown map goes into its outer map's slot), no pin is left behind, the
/// maps' memory as the metrics read it follows the grown maps, and the authorization maps
/// grown later are the ones the pods' hooks enforce (a pod deleted while still enrolled, its
/// hook detached by the kernel, does not keep them from growing).
#[test]
fn maps_grow_under_load_and_lose_nothing() {
    if !root_or_skip("maps_grow_under_load_and_lose_nothing") {
        return;
    }
    let mut env = Env::with_ceilings(&three_backends_two_zones(), Capacities::default(), 2);
    start_servers(&env, &[8080], &[5353]);
    let pods: std::collections::BTreeMap<&str, kmesh_testbed::Pod> =
        ["client", "s1", "s2", "s3"].into_iter().map(|n| (n, env.pod(n).clone())).collect();
    let cfg = |extra_ports: u16, deny_on_s1: bool| {
        let mut ports = vec!["{service_port: 80, target_port: 8080}".to_string()];
        ports.push("{service_port: 53, target_port: 5353, protocol: UDP}".into());
        ports.extend((0..extra_ports).map(|i| format!("{{service_port: {}, target_port: 8080}}", 1000 + i)));
        let mut w = workload(&pods["client"], &[], "");
        for s in ["s1", "s2", "s3"] {
            let x = if s == "s1" && deny_on_s1 { ", authorization_policies: [default/no-8080]" } else { "" };
            w += &workload(&pods[s], &[(SVC_KEY, "[]")], x);
        }
        let mut text =
            config("zone-a", &service(&format!("[{VIP}]"), &format!("[{}]", ports.join(", ")), "{}"), &w);
        if deny_on_s1 {
            text += "policies:\n  - {name: no-8080, namespace: default, scope: WORKLOAD_SELECTOR, action: DENY, rules: [{clauses: [{matches: [{destination_ports: [8080]}]}]}]}\n";
        }
        text
    };
    env.apply(&cfg(0, false));
    // The first (full) compilation needs room for three endpoints: the maps grow once (the
    // guess made before compiling is exact here, so the apply does not grow a second time).
    assert_eq!(env.mesh().dataplane().grows(), 1, "{:?}", env.mesh().dataplane().capacities());
    assert_eq!(env.mesh().dataplane().read_state().unwrap(), *env.mesh().dataplane().applied());
    env.enroll("client", None);
    env.enroll("s1", None);
    let small = env.mesh().dataplane().capacities();
    assert!(small.frontends <= 4, "a map starts small: {small:?}");

    // Back-to-back TCP connections and one UDP socket's datagrams, across a change that needs
    // 42 frontends.
    let tcp = ClientOptions { count: 100_000, duration_ms: 2500, ..Default::default() };
    let udp = ClientOptions {
        count: 400,
        duration_ms: 2500,
        interval_us: 5000,
        udp: true,
        unconnected: true,
        one_socket: true,
        ..Default::default()
    };
    let c = env.pod("client").clone();
    let tcp_bg = c.connect_background(format!("{VIP}:80").parse().unwrap(), &tcp).unwrap();
    let udp_bg = c.connect_background(format!("{VIP}:53").parse().unwrap(), &udp).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(800));
    let grows = env.mesh().dataplane().grows();
    let layout = env.mesh().dataplane().layout_dir().to_path_buf();
    let memory = |map: &str| {
        let m = kmesh_daemon::kernel::map_memory(&layout);
        m.into_iter().find(|(n, _)| n == map).map(|(_, b)| b).unwrap_or(0)
    };
    let (connect_id, frontends_memory) =
        (env.mesh().dataplane().program_id("kmesh_connect4"), memory("FRONTENDS"));
    let t = std::time::Instant::now();
    env.apply(&cfg(40, false));
    eprintln!("apply with growth took {:?}", t.elapsed());
    let (tcp_a, udp_a) = (tcp_bg.finish().unwrap(), udp_bg.finish().unwrap());
    let dp = env.mesh().dataplane();
    let big = dp.capacities();
    eprintln!(
        "capacities {small:?} -> {big:?} in {} grows; {} TCP and {} UDP attempts",
        dp.grows() - grows,
        tcp_a.len(),
        udp_a.len()
    );
    assert!(dp.grows() > grows, "the change grew maps");
    assert!(big.frontends >= 42 && big.frontends <= 128, "{big:?}");
    assert_eq!(dp.program_id("kmesh_connect4"), connect_id, "no program was loaded again");
    assert!(
        memory("FRONTENDS") > frontends_memory,
        "the grown map's memory is counted: {frontends_memory} -> {}",
        memory("FRONTENDS")
    );
    assert!(tcp_a.len() > 100 && udp_a.len() > 100, "too few attempts to judge");
    assert_eq!(tcp_a.iter().filter(|a| !a.ok).count(), 0, "{:?}", tcp_a.iter().find(|a| !a.ok));
    assert!(
        udp_a.iter().all(|a| a.ok && a.peer.as_deref() == Some("10.96.0.10:53")),
        "{:?}",
        udp_a.iter().find(|a| !a.ok)
    );
    assert_eq!(spread(&udp_a).len(), 1, "the socket kept its backend: {:?}", spread(&udp_a));
    assert_eq!(dp.read_state().unwrap(), *dp.applied(), "the grown maps hold exactly what was applied");
    assert!(dp.missing_pins().is_empty(), "{:?}", dp.missing_pins());
    let maps_dir = dp.layout_dir().join("maps");
    let leftovers: Vec<_> = std::fs::read_dir(&maps_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with("_grown"))
        .map(|e| e.path())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let a = env.connect("client", &format!("{VIP}:1039"), 30);
    assert!(a.iter().all(|a| a.ok), "a new port works: {:?}", a.iter().find(|a| !a.ok));

    // A pod is deleted while the mesh still holds it: its namespace's hook is detached.
    let gone = env.bed.add_pod(PodSpec::new("gone", "node-a", "zone-a")).unwrap();
    env.enroll("gone", None);
    kmesh_testbed::ip(&["netns", "del", &gone.netns]).unwrap();

    // A policy that needs more authorization rows than the maps have: they grow, and the hook
    // in s1's namespace runs the program that reads the grown maps.
    let before = env.mesh().dataplane().capacities();
    env.apply(&cfg(40, true));
    let after = env.mesh().dataplane().capacities();
    eprintln!("authorization capacities {before:?} -> {after:?}");
    assert!(
        after.authz_dest > before.authz_dest
            || after.identity > before.identity
            || after.authz_verdict > before.authz_verdict,
        "{before:?} -> {after:?}"
    );
    let s1 = kmesh_daemon::netns::cookie_of(&env.pod("s1").netns_path()).unwrap();
    let (linked, loaded) = env.mesh().dataplane().authz_program_ids(s1).unwrap();
    assert_eq!(linked, loaded, "s1's hook runs the program loaded at start");
    let s1_addr = env.pod("s1").ipv4;
    let s2_addr = env.pod("s2").ipv4;
    let denied = env.connect("client", &format!("{s1_addr}:8080"), 5);
    assert!(denied.iter().all(|a| a.errno == Some(libc::ECONNREFUSED)), "{denied:?}");
    assert!(env.connect("client", &format!("{s2_addr}:8080"), 5).iter().all(|a| a.ok));
    assert_eq!(env.mesh().dataplane().read_authz().unwrap(), *env.mesh().dataplane().authz_applied());
}

/// Issue 18 (push time): maps grown ahead on another thread (for a large xDS batch, while it
/// is merged and compiled) are put in force by the next apply before its writes; if the maps
/// they would replace were written meanwhile, they are dropped, and no entry written in
/// between is lost.
#[test]
fn maps_grown_ahead_are_used_and_dropped_when_written_meanwhile() {
    if !root_or_skip("maps_grown_ahead_are_used_and_dropped_when_written_meanwhile") {
        return;
    }
    let mut env = Env::with_ceilings(&three_backends_two_zones(), Capacities::default(), 2);
    start_servers(&env, &[8080], &[]);
    let mut w = workload(env.pod("client"), &[], "");
    for s in ["s1", "s2", "s3"] {
        w += &workload(env.pod(s), &[(SVC_KEY, "[]")], "");
    }
    let cfg = |ports: &str| config("zone-a", &service(&format!("[{VIP}]"), ports, "{}"), &w);
    // Three endpoints do not fit maps of two: grown ahead, used by the apply, one grow.
    let ahead = kmesh_daemon::compile::MapCounts { endpoints: 3, backends: 3, ..Default::default() };
    env.mesh().grow_ahead(&ahead);
    env.apply(&cfg("[{service_port: 80, target_port: 8080}]"));
    let dp = env.mesh().dataplane();
    assert_eq!(dp.grows(), 1, "{:?}", dp.capacities());
    assert_eq!((dp.capacities().endpoints, dp.capacities().backends), (4, 4));
    assert_eq!(dp.read_state().unwrap(), *dp.applied());

    // NETNS grown ahead, then a namespace enrolled (its NETNS entry written) before the next
    // apply: the grown maps, copied before the entry, are dropped.
    env.mesh().grow_ahead(&kmesh_daemon::compile::MapCounts { netns: 3, ..Default::default() });
    env.enroll("client", None);
    env.apply(&cfg("[{service_port: 80, target_port: 8080}, {service_port: 81, target_port: 8080}]"));
    let dp = env.mesh().dataplane();
    assert_eq!(dp.grows(), 1, "the grown NETNS was dropped: {:?}", dp.capacities());
    assert_eq!(dp.applied().netns.len(), 1);
    assert_eq!(dp.read_state().unwrap(), *dp.applied(), "the enrolled namespace's entry is in the map");
    assert!(
        dp.layout_dir()
            .join("maps")
            .read_dir()
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().ends_with("_grown"))
    );
    let a = env.connect("client", &format!("{VIP}:81"), 20);
    assert!(a.iter().all(|a| a.ok), "{:?}", a.iter().find(|a| !a.ok));
}

/// Issue 18 (push time): a large full compilation's new entries are written on a second
/// thread while it runs (`kernel::prewrite`), into maps grown ahead first. The apply skips
/// them; a map it must grow again is filled afresh (what was written ahead into the map it
/// replaces goes with that map). The kernel ends up holding exactly the compiled state, and
/// every service answers.
#[test]
fn entries_written_while_compiling_are_skipped_or_written_again_after_a_grow() {
    if !root_or_skip("entries_written_while_compiling_are_skipped_or_written_again_after_a_grow") {
        return;
    }
    let mut env = Env::with_ceilings(&three_backends_two_zones(), Capacities::default(), 2);
    start_servers(&env, &[8080], &[]);
    env.mesh().set_write_ahead(kernel::WriteAhead::Everything);
    let vips = ["10.96.0.10", "10.96.0.11", "10.96.0.12"];
    let keys: Vec<String> = (0..3).map(|i| format!("default/echo{i}.default.svc.cluster.local")).collect();
    let mut services = String::new();
    for (i, vip) in vips.iter().enumerate() {
        services += &format!(
            "  - {{name: echo{i}, namespace: default, hostname: echo{i}.default.svc.cluster.local, addresses: [{vip}], ports: [{{service_port: 80, target_port: 8080}}, {{service_port: 53, target_port: 5353, protocol: UDP}}], load_balancing: {{}}}}\n"
        );
    }
    // (The UDP port gives the backends `BACKENDS` entries: see `BackendValue`.)
    let member: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "[]")).collect();
    let mut w = workload(env.pod("client"), &[], "");
    for s in ["s1", "s2", "s3"] {
        w += &workload(env.pod(s), &member, "");
    }
    // Grown ahead for fewer entries than three services make: the slots and tables written
    // ahead go into maps that the apply grows again, the backends stay.
    let ahead = kmesh_daemon::compile::MapCounts { endpoints: 3, backends: 3, ..Default::default() };
    env.mesh().grow_ahead(&ahead);
    env.apply(&config("zone-a", &services, &w));
    let ahead_written = env.mesh().counters.map_writes_ahead;
    let dp = env.mesh().dataplane();
    assert!(ahead_written >= 5, "backends and tables written ahead: {ahead_written}");
    assert!(dp.capacities().endpoints >= 9 && dp.capacities().tables >= 3, "{:?}", dp.capacities());
    assert_eq!(dp.read_state().unwrap(), *dp.applied(), "the kernel holds the compiled state");
    assert_eq!((dp.applied().endpoints.len(), dp.applied().tables.len()), (9, 3));
    env.enroll("client", None);
    for vip in vips {
        // 60 random picks miss one of three backends with odds of 3 * (2/3)^60, about 1e-10
        // (12 missed one in about 40 runs over the three services).
        let a = env.connect("client", &format!("{vip}:80"), 60);
        assert!(a.iter().all(|a| a.ok), "{vip}: {:?}", a.iter().find(|a| !a.ok));
        assert_eq!(spread(&a).len(), 3, "{vip}: {:?}", spread(&a));
    }
    // The same model again writes nothing, ahead or not.
    env.apply(&config("zone-a", &services, &w));
    assert_eq!(env.mesh().counters.map_writes_ahead, ahead_written);
    let dp = env.mesh().dataplane();
    assert_eq!(dp.read_state().unwrap(), *dp.applied());
}

#[test]
fn a_first_start_that_fails_leaves_no_pin_and_an_adopted_layout_is_left_alone() {
    if !root_or_skip("a_first_start_that_fails_leaves_no_pin_and_an_adopted_layout_is_left_alone") {
        return;
    }
    use kmesh_daemon::kernel::{Dataplane, LoadOptions};
    let bed = kmesh_testbed::Testbed::new().expect("testbed");
    let missing = bed.cgroup().join("not-there");
    // The maps are created and pinned before the cgroup is opened: a fresh start that fails
    // there takes its pins (and the directories it made) away again.
    let pins = pin_dir();
    let e = Dataplane::load(&LoadOptions::new(missing.clone(), pins.clone())).err().expect("no such cgroup");
    assert!(e.to_string().contains("not-there"), "the error names the cgroup: {e}");
    assert!(!pins.exists(), "a failed first start left {}", pins.display());

    // A layout in use (pinned by a run before) survives a start that fails.
    let dp = Dataplane::load(&LoadOptions::new(bed.cgroup().to_owned(), pins.clone())).expect("load");
    drop(dp);
    let layout = kernel::layout_dir(&pins);
    assert!(layout.join("maps").join("FRONTENDS").exists());
    assert!(Dataplane::load(&LoadOptions::new(missing, pins.clone())).is_err());
    assert!(layout.join("maps").join("FRONTENDS").exists(), "the adopted maps are still pinned");
    assert!(layout.join("links").read_dir().unwrap().next().is_some(), "and the links");
    kernel::uninstall(&pins).expect("uninstall");
}

/// The kernel's sums (`TFLAG_TALLY`) stay exact when both sides' programs add to them from
/// two CPUs at once, process and softirq context alike; and a connection that finds the map
/// full is sent as a record instead, so none is lost.
#[test]
fn summed_connections_stay_exact_under_load_and_a_full_map_loses_none() {
    if !root_or_skip("summed_connections_stay_exact_under_load_and_a_full_map_loses_none") {
        return;
    }
    let mut env = telemetry_env("");
    let m = kmesh_daemon::telemetry::Monitoring { access_log: false, ..Default::default() };
    env.mesh().observer().set_monitoring(m, None).unwrap();
    let drain = |env: &mut Env| {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let mut lines = Vec::new();
        for _ in 0..2 {
            lines.extend(env.mesh().observer().drain_telemetry());
        }
        assert!(lines.is_empty(), "no access log: {lines:?}");
    };
    let value = |env: &mut Env, name: &str, reporter: &str| {
        let text = env.mesh().observer().telemetry.render();
        sample(&text, name, &[("reporter", reporter), ("source_workload", "client")])
            .unwrap_or_else(|| panic!("{name} {reporter} in\n{text}"))
    };
    // Two clients at once, 400 connections each, 100 bytes each way after the name line.
    let opts = ClientOptions { count: 400, send_bytes: 100, ..Default::default() };
    let target: std::net::SocketAddr = format!("{VIP}:80").parse().unwrap();
    let clients: Vec<_> =
        (0..2).map(|_| env.pod("client").connect_background(target, &opts).unwrap()).collect();
    for c in clients {
        let a = c.finish().unwrap();
        assert!(a.iter().all(|a| a.ok), "{a:?}");
    }
    drain(&mut env);
    for reporter in ["source", "destination"] {
        assert_eq!(value(&mut env, "kmesh_tcp_connections_opened_total", reporter), 800, "{reporter}");
        assert_eq!(value(&mut env, "kmesh_tcp_connections_closed_total", reporter), 800, "{reporter}");
        assert_eq!(value(&mut env, "kmesh_tcp_received_bytes_total", reporter), 800 * 100, "{reporter}");
        assert_eq!(value(&mut env, "kmesh_tcp_sent_bytes_total", reporter), 800 * 103, "{reporter}");
    }
    assert_eq!(env.mesh().observer().telemetry.tallied, 1600);

    // Every entry taken, under the epoch in force: the next connections find no room.
    let dir = kmesh_daemon::kernel::layout_dir(&env.pin_dir);
    let conf: aya::maps::Array<_, u64> = aya::maps::Array::try_from(aya::maps::Map::Array(
        kmesh_daemon::kernel::open_pinned(&dir, "TELEMETRY_CONF").unwrap(),
    ))
    .unwrap();
    let epoch = conf.get(&kmesh_common::TCONF_TALLY_EPOCH, 0).unwrap() as u32;
    let mut tallies: aya::maps::PerCpuHashMap<_, kmesh_common::TallyKey, kmesh_common::TallyCounts> =
        aya::maps::PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(
            kmesh_daemon::kernel::open_pinned(&dir, "TALLIES").unwrap(),
        ))
        .unwrap();
    let cpus = aya::util::nr_cpus().unwrap();
    for i in 0..kmesh_common::TALLY_ENTRIES {
        // Loopback addresses no pod has, summing nothing.
        let key = kmesh_common::TallyKey {
            epoch,
            direction: 1,
            local: [0, 0, 0xffff, 0x7f00_0000 | i],
            ..Default::default()
        };
        let zeros =
            || aya::maps::PerCpuValues::try_from(vec![kmesh_common::TallyCounts::default(); cpus]).unwrap();
        // Entries come from the kernel's BPF allocator, whose caches refill in the background:
        // a burst of inserts can outrun them (ENOMEM), and then waits.
        let mut tries = 0;
        while let Err(e) = tallies.insert(key, zeros(), 0) {
            tries += 1;
            assert!(tries < 1000, "filler {i}: {e}");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    let events = env.mesh().observer().telemetry.events;
    assert!(env.connect("client", &format!("{VIP}:80"), 20).iter().all(|a| a.ok));
    drain(&mut env);
    for reporter in ["source", "destination"] {
        assert_eq!(value(&mut env, "kmesh_tcp_connections_opened_total", reporter), 820, "{reporter}");
        assert_eq!(value(&mut env, "kmesh_tcp_sent_bytes_total", reporter), 800 * 103 + 20 * 3, "{reporter}");
    }
    let o = env.mesh().observer();
    assert_eq!(o.telemetry.events - events, 40, "sent as records, both sides");
    assert_eq!(o.telemetry.tallied, 1600);
    drop(o);
    // The filler went with the drains: there is room again.
    assert!(tallies.keys().next().is_none(), "the map is empty again");
    assert!(env.connect("client", &format!("{VIP}:80"), 5).iter().all(|a| a.ok));
    drain(&mut env);
    assert_eq!(env.mesh().observer().telemetry.tallied, 1610);
    assert_eq!(value(&mut env, "kmesh_tcp_connections_opened_total", "source"), 825);
}
