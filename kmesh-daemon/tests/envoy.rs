//! The kernel-native mode: the daemon takes Envoy's own xDS (LDS, RDS, CDS, EDS) from the
//! in-repo control plane over real gRPC, and the kernel balances real connections in the
//! testbed as the listeners and clusters say. Needs root.
mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use common::envoy_res::*;
use common::*;
use kmesh_proto::envoy::{
    CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, cluster as pc, endpoint as pe, listener as pl,
};
use kmesh_proto::prost::Message;
use kmesh_testbed::Testbed;
use kmesh_xds_server::ControlPlane;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn start_daemon(scratch: &Scratch, bed: &Testbed, cp: SocketAddr) -> Daemon {
    kernel_native_daemon(bed, &scratch.pins, cp, "delta")
}

/// `n` connections from the client to `target`, in order, made from one CPU (round robin is
/// per CPU, as Envoy's is per worker thread).
fn connect_on_one_cpu(bed: &Testbed, target: &str, n: u32) -> Vec<kmesh_testbed::Attempt> {
    // SAFETY: plain libc calls on this thread's own affinity; the client inherits it.
    unsafe {
        let mut old: libc::cpu_set_t = std::mem::zeroed();
        libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut old);
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut one);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one);
        let a = bed.pod("client").connect(target.parse().unwrap(), n, false).unwrap();
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &old);
        a
    }
}

fn spread(bed: &Testbed, target: &str, n: u32) -> BTreeMap<String, u32> {
    kmesh_testbed::spread(&bed.pod("client").connect(target.parse().unwrap(), n, false).unwrap())
}

/// s3 joins `echo` by EDS and round robin takes it in turn (10/10/10 of 30 from one CPU); then
/// a malformed listener is NACKed by name and the VIP still reaches all three.
fn s3_added_then_a_broken_listener_nacked(cp: &ControlPlane, bed: &Testbed) {
    let vip = format!("{VIP}:80");
    cp.replace_all(ENDPOINT_TYPE, [assignment(bed, "echo", &["s1", "s2", "s3"])].into());
    wait_for("s3 in echo", || spread(bed, &vip, 6).len() == 3);
    let a = connect_on_one_cpu(bed, &vip, 30);
    assert_eq!(kmesh_testbed::spread(&a).values().copied().collect::<Vec<_>>(), [10, 10, 10]);
    let before = cp.nacks().len();
    let mut bad =
        pl::Listener { name: "broken".into(), address: Some(address("not-an-ip", 80)), ..Default::default() };
    bad.filter_chains.push(chain(&[], tcp("echo")));
    cp.set(LISTENER_TYPE, [("broken".to_string(), bad.encode_to_vec())]);
    wait_for("a NACK", || cp.nacks().len() > before);
    let nack = cp.nacks().last().unwrap().error.clone().unwrap();
    assert!(nack.contains("listener broken") && nack.contains("not-an-ip"), "{nack}");
    assert_eq!(spread(bed, &vip, 9).len(), 3);
}

fn chain_state(d: &Daemon, listener: &str) -> Vec<(String, String)> {
    let dump: serde_json::Value = serde_json::from_str(&d.get("/debug/config_dump").unwrap()).unwrap();
    dump["envoy"]["chains"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["listener"] == listener)
        .map(|c| {
            let skipped: Vec<&str> =
                c["not_compiled"].as_array().into_iter().flatten().filter_map(|v| v.as_str()).collect();
            let skipped = skipped.join("; ");
            (
                c["state"].as_str().unwrap().to_string(),
                format!("{}{skipped}", c["reason"].as_str().unwrap_or("")),
            )
        })
        .collect()
}

#[test]
fn envoy_listeners_and_clusters_are_balanced_by_the_kernel() {
    if !root_or_skip("envoy_listeners_and_clusters_are_balanced_by_the_kernel") {
        return;
    }
    let rt = runtime();
    let bed = bed();
    let scratch = Scratch::new();
    let cp = ControlPlane::new();
    use pc::cluster::LbPolicy;
    cp.replace_all(
        CLUSTER_TYPE,
        [
            eds_cluster("echo", LbPolicy::RoundRobin),
            static_cluster(&bed, "a", &["s1"]),
            static_cluster(&bed, "b", &["s3"]),
        ]
        .into(),
    );
    cp.replace_all(ENDPOINT_TYPE, [assignment(&bed, "echo", &["s1", "s2"])].into());
    cp.replace_all(
        LISTENER_TYPE,
        [
            // A listener bound to the VIP (one shape istiod emits).
            listener("echo_80", VIP, 80, vec![chain(&[], tcp("echo"))]),
            // A listener of every address whose chains match destination prefixes (istiod's
            // other outbound shape), one of them with weighted clusters.
            listener(
                "0.0.0.0_9000",
                "0.0.0.0",
                9000,
                vec![
                    chain(&["10.96.0.11"], tcp_weighted(&[("a", 1), ("b", 3)])),
                    chain(&["10.96.0.14"], tcp("echo")),
                ],
            ),
            // HTTP: a virtual host that resolves to one cluster is compiled, one that routes by
            // header is not (and is reported).
            listener(
                "0.0.0.0_8000",
                "0.0.0.0",
                8000,
                vec![chain(
                    &[],
                    http(vec![
                        route(&["10.96.0.12", "echo.default"], vec![to_cluster("/", None, "echo")]),
                        route(
                            &["10.96.0.13"],
                            vec![to_cluster("/", Some("x-v2"), "b"), to_cluster("/", None, "a")],
                        ),
                    ]),
                )],
            ),
        ]
        .into(),
    );
    let server = rt.block_on(cp.spawn("127.0.0.1:0".parse().unwrap(), None)).unwrap();
    let d = start_daemon(&scratch, &bed, server.addr);

    // ROUND_ROBIN: strictly in turn from one CPU.
    let a = connect_on_one_cpu(&bed, &format!("{VIP}:80"), 40);
    let order: Vec<String> = a.iter().map(|a| a.server.clone().unwrap_or_else(|| format!("{a:?}"))).collect();
    for w in order.windows(2) {
        assert_ne!(w[0], w[1], "round robin takes turns: {order:?}");
    }
    assert_eq!(kmesh_testbed::spread(&a), [("s1".into(), 20), ("s2".into(), 20)].into());

    // Weighted clusters 1:3, and a prefix-matched chain of the same listener.
    let s = spread(&bed, "10.96.0.11:9000", 1800);
    assert_follows(&[s.get("s1").copied().unwrap_or(0), s.get("s3").copied().unwrap_or(0)], &[1.0, 3.0]);
    assert_eq!(spread(&bed, "10.96.0.14:9000", 20).keys().cloned().collect::<Vec<_>>(), ["s1", "s2"]);

    // HTTP: decided by the virtual host that names the address.
    assert_eq!(spread(&bed, "10.96.0.12:8000", 20).keys().cloned().collect::<Vec<_>>(), ["s1", "s2"]);
    let states = chain_state(&d, "0.0.0.0_8000");
    assert_eq!(states[0].0, "compiled", "{states:?}");
    assert!(
        states[0].1.contains("10.96.0.13:8000: virtual host") && states[0].1.contains("header \"x-v2\""),
        "{states:?}"
    );
    // ... and a destination not compiled is left alone (no route in the pod: unreachable).
    assert!(spread(&bed, "10.96.0.13:8000", 1).keys().all(|k| k.starts_with('!')));

    // EDS: an endpoint added reaches the kernel; round robin covers all three in turn. A
    // malformed listener is NACKed by name; what was in force stays.
    s3_added_then_a_broken_listener_nacked(&cp, &bed);

    // A listener removed: its destination is no longer balanced.
    cp.remove(LISTENER_TYPE, &["echo_80", "broken"]);
    wait_for("echo_80 gone", || spread(&bed, &format!("{VIP}:80"), 1).keys().all(|k| k.starts_with('!')));
    // A cluster removed: the chains that use it wait for it (pass unchanged meanwhile).
    cp.remove(CLUSTER_TYPE, &["a"]);
    wait_for("chain waiting for cluster a", || {
        chain_state(&d, "0.0.0.0_9000").first().is_some_and(|(s, r)| s == "warming" && r.contains("\"a\""))
    });
    assert_eq!(d.metric("kmesh_envoy_filter_chains{state=\"warming\"}"), 1.0);
    assert!(cp.violations().is_empty(), "{:?}", cp.violations());
}

/// State-of-the-world ADS: each response is the whole set of its type. What an LDS or CDS
/// response leaves out is removed, EDS follows the clusters' names, a malformed resource is
/// NACKed by name (the last version accepted goes back with the NACK) while the rest applies,
/// and after the stream breaks the kernel keeps the last good state until the next stream
/// brings the current one.
#[test]
fn state_of_the_world_ads_is_taken_with_the_same_discipline() {
    if !root_or_skip("state_of_the_world_ads_is_taken_with_the_same_discipline") {
        return;
    }
    let rt = runtime();
    let bed = bed();
    let scratch = Scratch::new();
    let cp = ControlPlane::new();
    use pc::cluster::LbPolicy;
    cp.replace_all(
        CLUSTER_TYPE,
        [eds_cluster("echo", LbPolicy::RoundRobin), static_cluster(&bed, "a", &["s1"])].into(),
    );
    cp.replace_all(ENDPOINT_TYPE, [assignment(&bed, "echo", &["s1", "s2"])].into());
    let lds = |extra: Vec<(String, Vec<u8>)>| -> BTreeMap<String, Vec<u8>> {
        let mut m: BTreeMap<String, Vec<u8>> = [
            listener("echo_80", VIP, 80, vec![chain(&[], tcp("echo"))]),
            listener("0.0.0.0_9000", "0.0.0.0", 9000, vec![chain(&["10.96.0.11"], tcp("a"))]),
        ]
        .into();
        m.extend(extra);
        m
    };
    cp.replace_all(LISTENER_TYPE, lds(vec![]));
    let server = rt.block_on(cp.spawn("127.0.0.1:0".parse().unwrap(), None)).unwrap();
    let d = kernel_native_daemon(&bed, &scratch.pins, server.addr, "sotw");
    let vip = format!("{VIP}:80");
    assert_eq!(spread(&bed, &vip, 20).keys().cloned().collect::<Vec<_>>(), ["s1", "s2"]);
    assert_eq!(spread(&bed, "10.96.0.11:9000", 5).keys().cloned().collect::<Vec<_>>(), ["s1"]);

    // EDS: an endpoint added reaches the kernel, in turn.
    // A malformed listener in the whole set: NACKed by name, the rest of the set stays.
    s3_added_then_a_broken_listener_nacked(&cp, &bed);
    assert_eq!(d.metric("kmesh_xds_responses_total{result=\"nack\"}"), 1.0);

    // Left out of the next whole set: removed.
    cp.replace_all(LISTENER_TYPE, {
        let mut m = lds(vec![]);
        m.remove("echo_80");
        m
    });
    wait_for("echo_80 gone", || spread(&bed, &vip, 1).keys().all(|k| k.starts_with('!')));
    assert_eq!(spread(&bed, "10.96.0.11:9000", 3).keys().cloned().collect::<Vec<_>>(), ["s1"]);

    // The stream breaks and the control plane is away: the last good state stays in force.
    let (opened, addr) = (cp.streams_opened(), server.addr);
    rt.block_on(server.stop());
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(spread(&bed, "10.96.0.11:9000", 3).keys().cloned().collect::<Vec<_>>(), ["s1"]);
    // Back, with echo_80 again: the new stream subscribes with the versions it accepted, and
    // the whole set it gets brings echo_80 back.
    cp.replace_all(LISTENER_TYPE, lds(vec![]));
    let server = rt.block_on(cp.spawn(addr, None)).unwrap();
    wait_for("resubscribed", || cp.streams_opened() > opened);
    wait_for("echo_80 back", || spread(&bed, &vip, 6).len() == 3);
    let subs = cp.subscriptions();
    assert!(subs.iter().any(|s| s.type_url == ENDPOINT_TYPE), "EDS resubscribed by name: {subs:?}");
    assert!(cp.violations().is_empty(), "{:?}", cp.violations());
    drop(server);
}

fn outlier_status(d: &Daemon) -> serde_json::Value {
    let dump: serde_json::Value = serde_json::from_str(&d.get("/debug/config_dump").unwrap()).unwrap();
    dump["outlier"].clone()
}

/// Envoy's outlier detection done by the kernel's eyes: an endpoint that refuses connections
/// is ejected after `consecutive_5xx` failures in a row (connect failures are local-origin
/// errors, which Envoy counts as 5xx), skipped by new connections, and readmitted after
/// `base_ejection_time` at an `interval` check; ejected again, it stays out twice as long.
#[test]
fn an_endpoint_that_refuses_is_ejected_then_readmitted() {
    if !root_or_skip("an_endpoint_that_refuses_is_ejected_then_readmitted") {
        return;
    }
    let rt = runtime();
    let bed = bed();
    let scratch = Scratch::new();
    let cp = ControlPlane::new();
    let dur = |ms: i64| kmesh_proto::envoy_struct::Duration {
        seconds: ms / 1000,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    };
    let u32v = |v: u32| Some(kmesh_proto::envoy_struct::UInt32Value { value: v });
    let c = pc::Cluster {
        name: "flaky".into(),
        cluster_discovery_type: Some(pc::cluster::ClusterDiscoveryType::Type(
            pc::cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(eds_over_ads()),
        outlier_detection: Some(pc::OutlierDetection {
            consecutive_5xx: u32v(3),
            interval: Some(dur(200)),
            base_ejection_time: Some(dur(1000)),
            max_ejection_percent: u32v(50),
            ..Default::default()
        }),
        ..Default::default()
    };
    cp.replace_all(CLUSTER_TYPE, [("flaky".to_string(), c.encode_to_vec())].into());
    // s2's endpoint is a port nothing listens on: every connection to it is refused.
    let mut eps = endpoints(&bed, &["s1", "s2"]);
    eps[0].lb_endpoints[1].host_identifier = Some(pe::lb_endpoint::HostIdentifier::Endpoint(pe::Endpoint {
        address: Some(address(&bed.pod("s2").ipv4.to_string(), 9999)),
        ..Default::default()
    }));
    let a = pe::ClusterLoadAssignment { cluster_name: "flaky".into(), endpoints: eps, ..Default::default() };
    cp.replace_all(ENDPOINT_TYPE, [("flaky".to_string(), a.encode_to_vec())].into());
    cp.replace_all(
        LISTENER_TYPE,
        [listener("flaky_80", "10.96.0.20", 80, vec![chain(&[], tcp("flaky"))])].into(),
    );
    let server = rt.block_on(cp.spawn("127.0.0.1:0".parse().unwrap(), None)).unwrap();
    let d = start_daemon(&scratch, &bed, server.addr);
    let target = "10.96.0.20:80";

    // Round robin alternates: s2 refuses every other connection until three failures in a
    // row... which round robin never gives (s1 succeeds in between). Envoy counts per host:
    // a success of another host does not reset s2's count.
    let s = kmesh_testbed::spread(&connect_on_one_cpu(&bed, target, 6));
    assert_eq!(s.get("!errno 111"), Some(&3), "{s:?}");
    wait_for("s2 ejected", || outlier_status(&d)["ejected"].as_object().is_some_and(|m| m.len() == 1));
    let ejected_at = std::time::Instant::now();
    let st = outlier_status(&d);
    let ip2 = bed.pod("s2").ipv4.to_string();
    assert_eq!(st["ejected"][&ip2]["times_ejected"], 1, "{st}");
    assert_eq!(spread(&bed, target, 20), [("s1".to_string(), 20)].into(), "an ejected endpoint is skipped");

    // Back after its second (at an interval check), refused again, out for twice as long.
    wait_for("s2 readmitted", || outlier_status(&d)["ejected"].as_object().is_some_and(|m| m.is_empty()));
    let out_for = ejected_at.elapsed();
    assert!(
        out_for >= std::time::Duration::from_millis(600) && out_for < std::time::Duration::from_millis(1800),
        "{out_for:?}"
    );
    let s = kmesh_testbed::spread(&connect_on_one_cpu(&bed, target, 6));
    assert_eq!(s.get("!errno 111"), Some(&3), "readmitted, it takes connections again: {s:?}");
    wait_for("s2 ejected again", || outlier_status(&d)["ejected"].as_object().is_some_and(|m| m.len() == 1));
    let st = outlier_status(&d);
    assert_eq!(st["ejected"][&ip2]["times_ejected"], 2, "{st}");
    assert!(st["ejected"][&ip2]["ms_left"].as_u64().unwrap() > 1500, "{st}");
    assert_eq!(st["ejections_total"], 2);
    assert_eq!(d.metric("kmesh_outlier_ejections_total"), 2.0);
    assert_eq!(d.metric("kmesh_outlier_ejected"), 1.0);
}

/// RING_HASH and MAGLEV, hashed by client: every connection of a client reaches the same
/// endpoint; removing another endpoint leaves it there; removing its own moves it.
#[test]
fn ring_hash_and_maglev_keep_a_client_on_its_endpoint() {
    if !root_or_skip("ring_hash_and_maglev_keep_a_client_on_its_endpoint") {
        return;
    }
    let rt = runtime();
    let bed = bed();
    let scratch = Scratch::new();
    let cp = ControlPlane::new();
    use pc::cluster::LbPolicy;
    cp.replace_all(
        CLUSTER_TYPE,
        [eds_cluster("ring", LbPolicy::RingHash), eds_cluster("maglev", LbPolicy::Maglev)].into(),
    );
    let all = ["s1", "s2", "s3"];
    cp.replace_all(ENDPOINT_TYPE, [assignment(&bed, "ring", &all), assignment(&bed, "maglev", &all)].into());
    cp.replace_all(
        LISTENER_TYPE,
        [
            listener("ring_80", "10.96.0.30", 80, vec![chain(&[], tcp("ring"))]),
            listener("maglev_80", "10.96.0.31", 80, vec![chain(&[], tcp("maglev"))]),
        ]
        .into(),
    );
    let server = rt.block_on(cp.spawn("127.0.0.1:0".parse().unwrap(), None)).unwrap();
    let _d = start_daemon(&scratch, &bed, server.addr);
    for (cluster, vip) in [("ring", "10.96.0.30:80"), ("maglev", "10.96.0.31:80")] {
        let s = spread(&bed, vip, 30);
        assert_eq!(s.len(), 1, "{cluster}: one client, one endpoint: {s:?}");
        let mine = s.keys().next().unwrap().clone();
        // Another endpoint goes: the client stays.
        let other = *all.iter().find(|p| **p != mine).unwrap();
        let rest: Vec<&str> = all.iter().copied().filter(|p| *p != other).collect();
        cp.set(ENDPOINT_TYPE, [assignment(&bed, cluster, &rest)]);
        wait_for("the removal", || !spread(&bed, vip, 3).contains_key(other) && cp.acks().len() > 3);
        assert_eq!(spread(&bed, vip, 30), [(mine.clone(), 30)].into(), "{cluster}: stays on {mine}");
        // Its own goes: it moves, to one endpoint again.
        let left: Vec<&str> = rest.iter().copied().filter(|p| **p != mine).collect();
        cp.set(ENDPOINT_TYPE, [assignment(&bed, cluster, &left)]);
        wait_for("the move", || !spread(&bed, vip, 3).contains_key(&mine));
        assert_eq!(spread(&bed, vip, 30).len(), 1, "{cluster}");
    }
}

/// Opens `n` connections to `target` from the client pod and holds them until the returned
/// guard is dropped; each is `ok <server>` or its errno.
struct Held {
    child: std::process::Child,
    pub results: Vec<String>,
}

fn hold(bed: &Testbed, target: &str, n: u32) -> Held {
    use std::io::BufRead;
    let (ip, port) = target.rsplit_once(':').unwrap();
    let script = format!(
        "import socket, sys\n\
         socks, out = [], []\n\
         for i in range({n}):\n\
         \x20   s = socket.socket()\n\
         \x20   s.settimeout(2)\n\
         \x20   try:\n\
         \x20       s.connect(('{ip}', {port}))\n\
         \x20       out.append('ok:' + s.recv(64).decode().split()[0])\n\
         \x20       socks.append(s)\n\
         \x20   except OSError as e:\n\
         \x20       out.append(str(e.errno))\n\
         print(' '.join(out), flush=True)\n\
         sys.stdin.read()\n"
    );
    let mut child = bed
        .pod("client")
        .command("python3")
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    Held { child, results: line.split_whitespace().map(String::from).collect() }
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// A circuit breaker's max_connections is enforced at connect() (ENOBUFS past it, counted),
/// and connections are released when they close; LEAST_REQUEST spreads held connections
/// evenly by the kernel's count of each endpoint's active connections.
#[test]
fn circuit_breakers_and_least_request_count_active_connections() {
    if !root_or_skip("circuit_breakers_and_least_request_count_active_connections") {
        return;
    }
    let rt = runtime();
    let bed = bed();
    let scratch = Scratch::new();
    let cp = ControlPlane::new();
    use pc::cluster::LbPolicy;
    let mut capped = pc::Cluster {
        name: "capped".into(),
        cluster_discovery_type: Some(pc::cluster::ClusterDiscoveryType::Type(
            pc::cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(eds_over_ads()),
        ..Default::default()
    };
    capped.circuit_breakers = Some(pc::CircuitBreakers {
        thresholds: vec![pc::circuit_breakers::Thresholds {
            max_connections: Some(kmesh_proto::envoy_struct::UInt32Value { value: 3 }),
            ..Default::default()
        }],
        ..Default::default()
    });
    cp.replace_all(
        CLUSTER_TYPE,
        [("capped".to_string(), capped.encode_to_vec()), eds_cluster("least", LbPolicy::LeastRequest)].into(),
    );
    cp.replace_all(
        ENDPOINT_TYPE,
        [assignment(&bed, "capped", &["s1", "s2"]), assignment(&bed, "least", &["s1", "s2", "s3"])].into(),
    );
    cp.replace_all(
        LISTENER_TYPE,
        [
            listener("capped_80", "10.96.0.40", 80, vec![chain(&[], tcp("capped"))]),
            listener("least_80", "10.96.0.41", 80, vec![chain(&[], tcp("least"))]),
        ]
        .into(),
    );
    let server = rt.block_on(cp.spawn("127.0.0.1:0".parse().unwrap(), None)).unwrap();
    let d = start_daemon(&scratch, &bed, server.addr);

    let refused_before = d.metric("kmesh_connect_total{result=\"circuit_open\"}");
    let h = hold(&bed, "10.96.0.40:80", 5);
    let ok = h.results.iter().filter(|r| r.starts_with("ok:")).count();
    assert_eq!((ok, &h.results[3..]), (3, &["105".to_string(), "105".to_string()][..]), "{:?}", h.results);
    assert_eq!(spread(&bed, "10.96.0.40:80", 2), [("!errno 105".to_string(), 2)].into());
    assert_eq!(d.metric("kmesh_connect_total{result=\"circuit_open\"}") - refused_before, 4.0);
    drop(h);
    // Released at close: the limit admits again.
    wait_for("connections released", || spread(&bed, "10.96.0.40:80", 1).keys().all(|k| !k.starts_with('!')));
    assert_eq!(spread(&bed, "10.96.0.40:80", 10).values().sum::<u32>(), 10);

    // Least request: 30 held connections over 3 endpoints come out even (random would not).
    let h = hold(&bed, "10.96.0.41:80", 30);
    let mut per: BTreeMap<&str, u32> = BTreeMap::new();
    for r in &h.results {
        *per.entry(r.strip_prefix("ok:").expect("all connect")).or_default() += 1;
    }
    let (min, max) = (per.values().min().unwrap(), per.values().max().unwrap());
    assert!(per.len() == 3 && max - min <= 4, "{per:?}");
}
