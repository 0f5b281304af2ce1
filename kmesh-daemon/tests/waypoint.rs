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
