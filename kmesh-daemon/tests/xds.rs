//! The daemon as a delta ADS client of the in-repo control plane, over real gRPC on loopback,
//! with real traffic in the testbed. Needs root (the TLS test does not).
mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use kmesh_daemon::model::NodeInfo;
use kmesh_daemon::xds::{ProxyIdentity, XdsError, XdsOptions, probe};
use kmesh_model::config;
use kmesh_proto::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use kmesh_testbed::{ClientOptions, Testbed};
use kmesh_xds_server::{ControlPlane, ServerHandle, address_resources, authorization_resources};

fn resources(bed: &Testbed, backends: &[&str]) -> BTreeMap<String, Vec<u8>> {
    address_resources(&config::parse(&echo_config(bed, backends, "{}")).unwrap())
}

fn start_daemon(scratch: &Scratch, bed: &Testbed, cp: SocketAddr) -> Daemon {
    // --config is replaced by --xds-address; the scratch config file is not used.
    let d = Daemon::start_with(
        &[
            "--xds-address",
            &cp.to_string(),
            "--xds-plaintext",
            "--node-name",
            "node-a",
            "--xds-backoff-max-ms",
            "500",
        ],
        bed,
        &scratch.pins,
    );
    wait_for("readiness after the first sync", || d.get("/debug/ready").is_ok());
    d
}

fn enroll(d: &Daemon, bed: &Testbed) {
    enroll_as(d, bed, "client", Some("client")).unwrap();
}

/// Enrolls `pod`'s namespace, as `workload` when given; the admin API's answer.
fn enroll_as(
    d: &Daemon,
    bed: &Testbed,
    pod: &str,
    workload: Option<&str>,
) -> Result<String, kmesh_daemon::admin::ClientError> {
    let req = serde_json::json!({ "netns": bed.pod(pod).netns_path(), "workload": workload }).to_string();
    kmesh_daemon::admin::request(&d.socket, "POST", "/v1/enroll", Some(&req))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn initial_sync_updates_and_removals_reach_the_kernel() {
    if !root_or_skip("initial_sync_updates_and_removals_reach_the_kernel") {
        return;
    }
    let rt = runtime();
    let bed = bed();
    let scratch = Scratch::new();
    let cp = ControlPlane::new();
    cp.replace_all(ADDRESS_TYPE, resources(&bed, &["s1", "s2"]));
    let server: ServerHandle = rt.block_on(cp.spawn("127.0.0.1:0".parse().unwrap(), None)).unwrap();

    let d = start_daemon(&scratch, &bed, server.addr);
    enroll(&d, &bed);
    let s = connect(&bed, 60);
    assert_eq!(s.keys().cloned().collect::<Vec<_>>(), ["s1", "s2"], "{s:?}");

    // An endpoint added.
    cp.replace_all(ADDRESS_TYPE, resources(&bed, &["s1", "s2", "s3"]));
    wait_for("s3 in the kernel", || d.metric("kmesh_map_entries{map=\"ENDPOINTS\"}") == 3.0);
    assert_eq!(connect(&bed, 90).len(), 3);
    // Telemetry took the change in too (after the ACK): the new endpoint's connections are
    // counted under its name.
    wait_for("s3's connections in the metrics under its name", || {
        d.get("/metrics").unwrap().lines().any(|l| {
            l.starts_with("kmesh_tcp_connections_opened_total{")
                && l.contains("reporter=\"source\"")
                && l.contains("destination_workload=\"s3\"")
        })
    });

    // An endpoint removed: no connection goes to it.
    cp.remove(ADDRESS_TYPE, &["s1"]);
    wait_for("s1 out of the kernel", || d.metric("kmesh_map_entries{map=\"ENDPOINTS\"}") == 2.0);
    let s = connect(&bed, 60);
    assert!(!s.contains_key("s1"), "{s:?}");

    // The service removed: its frontend goes, the VIP is unroutable again.
    cp.remove(ADDRESS_TYPE, &[SVC_KEY]);
    wait_for("frontend removal", || d.metric("kmesh_map_entries{map=\"FRONTENDS\"}") == 0.0);
    let s = connect(&bed, 3);
    assert_eq!(s.get("!errno 101"), Some(&3), "{s:?}");

    assert!(cp.violations().is_empty(), "protocol violations: {:?}", cp.violations());
    assert!(cp.nacks().is_empty(), "unexpected NACKs: {:?}", cp.nacks());
    let subs = cp.subscriptions();
    assert!(
        subs.iter().any(|s| s.type_url == ADDRESS_TYPE)
            && subs.iter().any(|s| s.type_url == AUTHORIZATION_TYPE)
    );
    assert!(subs[0].node.starts_with("ztunnel~"), "node id {}", subs[0].node);
    drop(server);
}

#[test]
fn a_malformed_resource_is_nacked_by_name_and_the_rest_applied() {
    if !root_or_skip("a_malformed_resource_is_nacked_by_name_and_the_rest_applied") {
        return;
    }
    let (rt, bed, scratch, cp) = (runtime(), bed(), Scratch::new(), ControlPlane::new());
    cp.replace_all(ADDRESS_TYPE, resources(&bed, &["s1"]));
    let server = rt.block_on(cp.spawn("127.0.0.1:0".parse().unwrap(), None)).unwrap();
    let d = start_daemon(&scratch, &bed, server.addr);
    enroll(&d, &bed);

    // One push: s2 valid, "broken" not a protobuf at all.
    let mut good = resources(&bed, &["s1", "s2"]);
    let s2 = good.remove("s2").unwrap();
    cp.set(ADDRESS_TYPE, [("s2".to_string(), s2), ("broken".to_string(), vec![0xff, 0xff, 0x01])]);
    wait_for("the NACK", || !cp.nacks().is_empty());
    let nack = cp.nacks()[0].error.clone().unwrap();
    assert!(nack.contains("broken:") && !nack.contains("s2:"), "{nack}");
    wait_for("s2 in the kernel", || d.metric("kmesh_map_entries{map=\"ENDPOINTS\"}") == 2.0);
    let s = connect(&bed, 60);
    assert!(s.contains_key("s1") && s.contains_key("s2"), "{s:?}");
    let dump: serde_json::Value = serde_json::from_str(&d.get("/debug/config_dump").unwrap()).unwrap();
    assert!(dump["config_error"].as_str().unwrap().contains("broken"), "{dump}");
    assert!(cp.violations().is_empty(), "{:?}", cp.violations());
    // The operator sees it in the scrape too.
    assert_eq!(d.metric("kmesh_xds_responses_total{result=\"nack\"}"), cp.nacks().len() as f64);
    assert!(d.metric("kmesh_xds_responses_total{result=\"ack\"}") >= 1.0);
    assert_eq!(d.metric("kmesh_xds_connected"), 1.0);
}

#[test]
fn control_plane_restart_resumes_with_versions_and_traffic_never_stops() {
    if !root_or_skip("control_plane_restart_resumes_with_versions_and_traffic_never_stops") {
        return;
    }
    let rt = runtime();
    let bed = bed();
    let scratch = Scratch::new();
    let cp = ControlPlane::new();
    cp.replace_all(ADDRESS_TYPE, resources(&bed, &["s1", "s2", "s3"]));
    let server = rt.block_on(cp.spawn("127.0.0.1:0".parse().unwrap(), None)).unwrap();
    let addr = server.addr;
    let d = start_daemon(&scratch, &bed, addr);
    enroll(&d, &bed);
    let held_before = cp.version(ADDRESS_TYPE, "s1").unwrap();

    // A client connecting back to back through the whole outage (bounded: 4 s).
    let opts = ClientOptions { count: 500_000, duration_ms: 4000, interval_us: 200, ..Default::default() };
    let child = bed.pod("client").connect_background(format!("{VIP}:80").parse().unwrap(), &opts).unwrap();

    std::thread::sleep(Duration::from_millis(500));
    rt.block_on(server.stop());
    // While the control plane is down: s3 is removed there; the kernel keeps the last good state.
    cp.remove(ADDRESS_TYPE, &["s3"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(d.metric("kmesh_map_entries{map=\"ENDPOINTS\"}"), 3.0, "nothing flushed while disconnected");
    assert_eq!(d.metric("kmesh_xds_connected"), 0.0, "the scrape says the control plane is gone");
    assert!(d.metric("kmesh_xds_disconnects_total") >= 1.0);
    let opened = cp.streams_opened();
    let server = rt.block_on(cp.spawn(addr, None)).unwrap();
    wait_for("the reconnection", || cp.streams_opened() > opened);
    wait_for("s3 removed after the resync", || d.metric("kmesh_map_entries{map=\"ENDPOINTS\"}") == 2.0);
    let attempts = child.finish().unwrap();

    let failed = attempts.iter().filter(|a| !a.ok).count();
    eprintln!("{} connections across the control-plane restart, {failed} failed", attempts.len());
    assert!(attempts.len() > 100);
    assert_eq!(failed, 0, "{:?}", attempts.iter().find(|a| !a.ok));
    // The resubscription carried what the daemon held.
    let resub = cp.subscriptions().into_iter().rev().find(|s| s.type_url == ADDRESS_TYPE).unwrap();
    assert_eq!(resub.initial_resource_versions.get("s1"), Some(&held_before), "{resub:?}");
    assert!(resub.initial_resource_versions.contains_key("s3"));
    assert!(cp.violations().is_empty(), "{:?}", cp.violations());
    drop(server);
}

/// `n` services of `m` endpoints each, named as istiod names them, for scale tests.
fn scale_resources(n: usize, m: usize) -> BTreeMap<String, Vec<u8>> {
    use kmesh_model::model::{Protocol, Service, ServicePort, Workload};
    use kmesh_model::xds::{AddressResource, encode_address};
    use std::net::{IpAddr, Ipv4Addr};
    let mut res = BTreeMap::new();
    for s in 0..n {
        let hostname = format!("svc-{s}.bench.svc.cluster.local");
        let svc = Service {
            name: format!("svc-{s}").into(),
            namespace: "bench".into(),
            hostname: hostname.as_str().into(),
            addresses: vec![IpAddr::V4(Ipv4Addr::from(
                u32::from(Ipv4Addr::new(10, 112, 0, 0)) + s as u32 + 1,
            ))]
            .into(),
            ports: vec![ServicePort { service_port: 80, target_port: 8080, protocol: Protocol::Tcp }].into(),
            ..Default::default()
        };
        res.insert(svc.key(), encode_address(&AddressResource::Service(svc)));
        for e in 0..m {
            let k = (s * m + e) as u32 + 1;
            let w = Workload {
                uid: kmesh_model::model::Istr::unique(&format!("Kubernetes//Pod/bench/svc-{s}-{e}")),
                name: format!("svc-{s}-{e}").as_str().into(),
                profile: kmesh_daemon::model::WorkloadProfile {
                    namespace: "bench".into(),
                    ..Default::default()
                }
                .into(),
                addresses: kmesh_daemon::model::Addrs::One(IpAddr::V4(Ipv4Addr::from(
                    u32::from(Ipv4Addr::new(10, 128, 0, 0)) + k,
                ))),
                services: [(format!("bench/{hostname}").as_str().into(), vec![])].into_iter().collect(),
                ..Default::default()
            };
            res.insert(w.uid.to_string(), encode_address(&AddressResource::Workload(w)));
        }
    }
    res
}

/// Issue 18, item 6: at 110k resources the list of what the daemon holds is larger than the
/// 4 MiB a gRPC server such as istiod receives. The resubscription after a stream break must
/// still work, once (no reconnection loop), and end with exactly the control plane's state.
#[test]
fn a_resubscription_at_110k_resources_fits_the_control_planes_request_limit() {
    if !root_or_skip("a_resubscription_at_110k_resources_fits_the_control_planes_request_limit") {
        return;
    }
    let rt = runtime();
    let bed = bed();
    let scratch = Scratch::new();
    let cp = ControlPlane::new(); // istiod's receive limit: 4 MiB
    let mut all = scale_resources(10_000, 10);
    all.extend(resources(&bed, &["s1", "s2", "s3"]));
    let total = all.len();
    cp.replace_all(ADDRESS_TYPE, all);
    let server = rt.block_on(cp.spawn("127.0.0.1:0".parse().unwrap(), None)).unwrap();
    let d = start_daemon(&scratch, &bed, server.addr);
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait("the 110k push in the kernel", &|| d.metric("kmesh_map_entries{map=\"ENDPOINTS\"}") == 100_003.0);
    enroll(&d, &bed);

    // The control plane goes away; meanwhile 10 endpoints and a service go, and one comes.
    let opened = cp.streams_opened();
    let addr = server.addr;
    rt.block_on(server.stop());
    let gone: Vec<String> = (0..10).map(|e| format!("Kubernetes//Pod/bench/svc-7-{e}")).collect();
    let mut names: Vec<&str> = gone.iter().map(String::as_str).collect();
    names.push("bench/svc-7.bench.svc.cluster.local");
    cp.remove(ADDRESS_TYPE, &names);
    cp.set(ADDRESS_TYPE, scale_resources(10_001, 1).into_iter().filter(|(k, _)| k.contains("svc-10000")));
    let server = rt.block_on(cp.spawn(addr, None)).unwrap();
    wait("the resync", &|| {
        d.metric("kmesh_map_entries{map=\"ENDPOINTS\"}") == 99_994.0
            && d.metric("kmesh_map_entries{map=\"FRONTENDS\"}") == 10_001.0
    });
    assert_eq!(cp.streams_opened(), opened + 1, "one reconnection, not a loop");
    assert!(cp.violations().is_empty(), "{:?}", cp.violations());
    let resub = cp.subscriptions().into_iter().rev().find(|s| s.type_url == ADDRESS_TYPE).unwrap();
    assert!(resub.initial_resource_versions.is_empty(), "the held list ({total} names) did not fit");
    assert_eq!(d.metric("kmesh_xds_resyncs_without_versions_total"), 1.0);
    // Traffic is balanced as before.
    assert_eq!(connect(&bed, 60).len(), 3);
    drop(server);
}

/// A push larger than the control plane puts in one response (the in-repo one cuts at
/// `--max-response-bytes`; a full push of 100k x 10 is 294 MB, over the daemon's 256 MiB
/// bound) arrives in parts: the daemon applies and ACKs each, and ends with all of it.
#[test]
fn a_push_in_several_responses_is_applied_whole() {
    if !root_or_skip("a_push_in_several_responses_is_applied_whole") {
        return;
    }
    let rt = runtime();
    let bed = bed();
    let scratch = Scratch::new();
    let cp = ControlPlane::new().with_max_response_bytes(64 << 10);
    let mut all = scale_resources(1_000, 10);
    all.extend(resources(&bed, &["s1", "s2", "s3"]));
    cp.replace_all(ADDRESS_TYPE, all);
    let server = rt.block_on(cp.spawn("127.0.0.1:0".parse().unwrap(), None)).unwrap();
    let d = start_daemon(&scratch, &bed, server.addr);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while d.metric("kmesh_map_entries{map=\"ENDPOINTS\"}") != 10_003.0 {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for the push");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(d.metric("kmesh_map_entries{map=\"FRONTENDS\"}"), 1_001.0);
    let parts = cp.push_records().into_iter().filter(|p| p.answered.is_some()).count();
    assert!(parts > 10, "the push came in {parts} responses");
    assert!(cp.nacks().is_empty(), "{:?}", cp.nacks());
    assert!(cp.violations().is_empty(), "{:?}", cp.violations());
    enroll(&d, &bed);
    assert_eq!(connect(&bed, 60).len(), 3);
    drop(server);
}

/// Issue 18, item 8: endpoint churn through xDS (400 changes at about 200 a second, no
/// pause for the daemon) ends with the kernel's maps exactly equal to a from-scratch
/// compilation of the final state. The check: a daemon restarted on that state compiles it from
/// scratch against the maps and must find nothing to write or delete.
#[test]
fn churn_ends_with_maps_equal_to_a_fresh_compilation() {
    if !root_or_skip("churn_ends_with_maps_equal_to_a_fresh_compilation") {
        return;
    }
    let rt = runtime();
    let bed = bed();
    let scratch = Scratch::new();
    let cp = ControlPlane::new();
    let (services, per) = (60, 5);
    let all = scale_resources(services, per);
    cp.replace_all(ADDRESS_TYPE, all.clone());
    let server = rt.block_on(cp.spawn("127.0.0.1:0".parse().unwrap(), None)).unwrap();
    let mut d = start_daemon(&scratch, &bed, server.addr);
    let endpoints = |d: &Daemon| d.metric("kmesh_map_entries{map=\"ENDPOINTS\"}");
    wait_for("the initial push", || endpoints(&d) == (services * per) as f64);

    let mut present: std::collections::BTreeSet<String> =
        all.keys().filter(|k| k.starts_with("Kubernetes//")).cloned().collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..400 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let uid = format!("Kubernetes//Pod/bench/svc-{}-{}", x % services as u64, (x >> 32) % per as u64);
        if present.remove(&uid) {
            cp.remove(ADDRESS_TYPE, &[uid.as_str()]);
        } else {
            cp.set(ADDRESS_TYPE, [(uid.clone(), all[&uid].clone())]);
            present.insert(uid);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Equal, and still equal a moment later (a push still in flight can pass through the
    // final count on its way).
    wait_for("the final state in the kernel", || {
        endpoints(&d) == present.len() as f64 && {
            std::thread::sleep(Duration::from_millis(300));
            endpoints(&d) == present.len() as f64
        }
    });
    assert!(cp.nacks().is_empty(), "{:?}", cp.nacks());
    assert!(cp.violations().is_empty(), "{:?}", cp.violations());

    let mut c = d.child.take().unwrap();
    c.kill().unwrap();
    c.wait().unwrap();
    let d = start_daemon(&scratch, &bed, server.addr);
    let written = (d.metric("kmesh_map_writes_total"), d.metric("kmesh_map_deletes_total"));
    assert_eq!(
        written,
        (0.0, 0.0),
        "the maps after churn differ from a fresh compilation of the final state"
    );
    assert_eq!(d.metric("kmesh_apply_errors_total"), 0.0);
    drop(server);
}

/// A request over the control plane's receive limit is refused loudly, by name, not with a
/// silent OK that makes the client reconnect forever.
#[test]
fn a_request_over_the_control_planes_limit_is_refused_by_name() {
    let rt = runtime();
    let cp = ControlPlane::new().with_max_request_bytes(64);
    let server = rt.block_on(cp.spawn("127.0.0.1:0".parse().unwrap(), None)).unwrap();
    let identity = ProxyIdentity::from_vars(|_| None).unwrap();
    let o = XdsOptions::new(&server.addr.to_string(), NodeInfo::default(), identity);
    let e = rt.block_on(probe(&o)).unwrap_err();
    eprintln!("over the server's limit: {e}");
    let XdsError::Stream { status, .. } = &e else { panic!("{e:?}") };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{e}");
    assert!(status.message().contains("receives at most 64 bytes"), "{e}");
    assert_eq!(cp.violations().len(), 1, "{:?}", cp.violations());
}

/// A self-signed CA and a server certificate for 127.0.0.1 signed by it.
fn certs() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["istiod.test".to_string(), "127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[test]
fn tls_with_a_wrong_ca_or_a_missing_token_is_refused_with_a_clear_error() {
    let rt = runtime();
    let (ca, cert, key) = certs();
    let (other_ca, _, _) = certs();
    let dir = std::env::temp_dir().join(format!("kmesh-xds-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let (ca_file, other_ca_file, token_file, wrong_token_file) = (
        write("ca.pem", &ca),
        write("other-ca.pem", &other_ca),
        write("token", "s3cret\n"),
        write("wrong", "nope"),
    );

    let cp = ControlPlane::new().with_token("s3cret");
    let tls =
        tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(&cert, &key));
    let server = rt.block_on(cp.spawn("127.0.0.1:0".parse().unwrap(), Some(tls))).unwrap();
    let opts = |ca: &std::path::Path, token: Option<&std::path::Path>| {
        let identity = ProxyIdentity::from_vars(|_| None).unwrap();
        let mut o = XdsOptions::new(&server.addr.to_string(), NodeInfo::default(), identity);
        o.ca_file = Some(ca.to_owned());
        o.tls_server_name = Some("istiod.test".into());
        o.token_file = token.map(|t| t.to_owned());
        o
    };

    let ok = rt.block_on(probe(&opts(&ca_file, Some(&token_file))));
    assert!(ok.is_ok(), "{:?}", ok.err());

    let e = rt.block_on(probe(&opts(&other_ca_file, Some(&token_file)))).unwrap_err();
    eprintln!("wrong CA: {e}");
    assert!(matches!(e, XdsError::Connect { .. } | XdsError::Refused { .. }), "{e:?}");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");

    let e = rt.block_on(probe(&opts(&ca_file, Some(&dir.join("absent-token"))))).unwrap_err();
    eprintln!("missing token: {e}");
    assert!(matches!(e, XdsError::Token { .. }) && e.to_string().contains("absent-token"), "{e}");

    let e = rt.block_on(probe(&opts(&ca_file, Some(&wrong_token_file)))).unwrap_err();
    eprintln!("wrong token: {e}");
    assert!(e.to_string().contains("bearer token"), "{e}");

    let e = rt.block_on(probe(&opts(&dir.join("absent-ca.pem"), Some(&token_file)))).unwrap_err();
    assert!(matches!(e, XdsError::Ca { .. }), "{e}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 13, item 7: a response bigger than the configured bound ends the stream with an
/// error that says so, instead of being buffered whatever its size.
#[test]
fn a_response_over_the_size_bound_is_refused_with_a_clear_error() {
    let rt = runtime();
    let cp = ControlPlane::new();
    cp.set(ADDRESS_TYPE, (0..64).map(|i| (format!("w{i}"), vec![0x0a; 200])));
    let server = rt.block_on(cp.spawn("127.0.0.1:0".parse().unwrap(), None)).unwrap();
    let identity = ProxyIdentity::from_vars(|_| None).unwrap();
    let mut o = XdsOptions::new(&server.addr.to_string(), NodeInfo::default(), identity);
    assert!(rt.block_on(probe(&o)).is_ok(), "the default bound takes it");
    o.max_message_bytes = 8192;
    let e = rt.block_on(probe(&o)).unwrap_err();
    eprintln!("over the bound: {e}");
    assert!(matches!(e, XdsError::Stream { .. }), "{e:?}");
    assert!(e.to_string().contains("too large"), "{e}");
}

#[test]
fn authorization_resources_from_xds_are_enforced() {
    if !root_or_skip("authorization_resources_from_xds_are_enforced") {
        return;
    }
    use kmesh_proto::istio::security as ps;
    use prost::Message;
    let (rt, bed, scratch, cp) = (runtime(), bed(), Scratch::new(), ControlPlane::new());
    cp.replace_all(ADDRESS_TYPE, resources(&bed, &["s1"]));
    let server = rt.block_on(cp.spawn("127.0.0.1:0".parse().unwrap(), None)).unwrap();
    let d = start_daemon(&scratch, &bed, server.addr);
    // The server pod is enrolled: connections into it are authorized.
    enroll_as(&d, &bed, "s1", Some("s1")).unwrap();
    let s1 = SocketAddr::new(bed.pod("s1").ipv4.into(), 8080);
    assert!(bed.pod("client").connect(s1, 1, false).unwrap()[0].ok);

    let deny_all = ps::Authorization {
        name: "deny-all".into(),
        namespace: "default".into(),
        scope: ps::Scope::Namespace as i32,
        action: ps::Action::Deny as i32,
        rules: vec![ps::Rule { clauses: vec![ps::Clause { matches: vec![ps::Match::default()] }] }],
        dry_run: false,
        extensions: vec![],
    };
    cp.set(AUTHORIZATION_TYPE, [("default/deny-all".to_string(), deny_all.encode_to_vec())]);
    wait_for("the DENY policy in force", || !bed.pod("client").connect(s1, 1, false).unwrap()[0].ok);
    let a = bed.pod("client").connect(s1, 3, false).unwrap();
    assert!(a.iter().all(|a| a.errno == Some(libc::ECONNREFUSED)), "{a:?}");
    assert!(d.metric("kmesh_authz_decisions_total{policy=\"default/deny-all\",action=\"deny\"}") >= 3.0);

    cp.remove(AUTHORIZATION_TYPE, &["default/deny-all"]);
    wait_for("the policy removed", || bed.pod("client").connect(s1, 1, false).unwrap()[0].ok);
    assert!(cp.violations().is_empty() && cp.nacks().is_empty(), "{:?} {:?}", cp.violations(), cp.nacks());
}

/// What istiod sends and the project's own control plane got wrong before: a host-network
/// workload (network_mode, field 25), a capacity (field 27) and a service address range
/// (NetworkAddress.length). All are ACKed; the capacity weights the spread; the host-network
/// workload is never enrolled and its address (the node's) carries no identity.
#[test]
fn host_network_workloads_capacities_and_address_ranges_from_istio() {
    if !root_or_skip("host_network_workloads_capacities_and_address_ranges_from_istio") {
        return;
    }
    let (rt, bed, scratch, cp) = (runtime(), bed(), Scratch::new(), ControlPlane::new());
    // The client pod is not a workload here: it plays the node's own processes, at the address
    // of a host-network pod (the node's address) whose service account is `hostsa`.
    let client_ip = bed.pod("client").ipv4;
    let workloads = format!(
        "{}{}  - {{uid: hostnet, name: hostnet, namespace: default, addresses: [{client_ip}], node: node-a, service_account: hostsa, network_mode: HOST_NETWORK}}\n",
        workload(bed.pod("s1"), &[(SVC_KEY, "[]")], ", capacity: 3"),
        workload(bed.pod("s2"), &[(SVC_KEY, "[]")], ", capacity: 1"),
    );
    let text = config(
        "zone-a",
        &service(&format!("[{VIP}, 10.97.0.0/24]"), "[{service_port: 80, target_port: 8080}]", "{}"),
        &workloads,
    );
    let model = config::parse(&text).unwrap();
    cp.replace_all(ADDRESS_TYPE, address_resources(&model));
    let server = rt.block_on(cp.spawn("127.0.0.1:0".parse().unwrap(), None)).unwrap();
    let d = start_daemon(&scratch, &bed, server.addr);
    assert!(cp.nacks().is_empty(), "a real istiod's resources were refused: {:?}", cp.nacks());
    assert!(cp.violations().is_empty(), "{:?}", cp.violations());

    // The dump shows what arrived, with the host-network mode and the range.
    let dump: serde_json::Value = serde_json::from_str(&d.get("/debug/config_dump").unwrap()).unwrap();
    assert_eq!(dump["model"]["workloads"]["hostnet"]["network_mode"], "HostNetwork", "{dump}");
    assert_eq!(dump["model"]["workloads"]["s1"]["capacity"], 3);
    assert_eq!(dump["model"]["services"][SVC_KEY]["address_ranges"][0]["len"], 24, "{dump}");
    assert!(dump["xds"]["node_id"].as_str().unwrap().starts_with("ztunnel~"), "{dump}");
    assert_eq!(dump["xds"]["connected"], true);

    // A host-network pod is never enrolled, by its workload or by the node's namespace.
    let e = enroll_as(&d, &bed, "s3", Some("hostnet")).unwrap_err().to_string();
    assert!(e.contains("host-network") && e.contains("never enrolled"), "{e}");
    let req = serde_json::json!({ "netns": "/proc/self/ns/net" }).to_string();
    let e =
        kmesh_daemon::admin::request(&d.socket, "POST", "/v1/enroll", Some(&req)).unwrap_err().to_string();
    assert!(e.contains("node's own network namespace"), "{e}");
    let dump: serde_json::Value = serde_json::from_str(&d.get("/debug/config_dump").unwrap()).unwrap();
    assert_eq!(dump["enrolled"].as_array().unwrap().len(), 0);

    // Capacity 3 : 1 (field 27). With equal weights 200/200 would give chi-square ~133.
    enroll_as(&d, &bed, "client", None).unwrap();
    let s = connect(&bed, 2000);
    let obs = [s.get("s1").copied().unwrap_or(0), s.get("s2").copied().unwrap_or(0)];
    assert_eq!(obs[0] + obs[1], 2000, "{s:?}");
    assert_follows(&obs, &[3.0, 1.0]);

    // The range is carried but not balanced yet: a connection into it is left as dialled
    // (no route from the pod: ENETUNREACH, nothing leaves the machine).
    let a = bed.pod("client").connect("10.97.0.7:80".parse().unwrap(), 2, false).unwrap();
    assert!(a.iter().all(|a| a.errno == Some(libc::ENETUNREACH)), "{a:?}");

    // The node's address carries no identity: an ALLOW for `hostsa` does not admit it.
    enroll_as(&d, &bed, "s1", Some("s1")).unwrap();
    let s1 = SocketAddr::new(bed.pod("s1").ipv4.into(), 8080);
    assert!(bed.pod("client").connect(s1, 1, false).unwrap()[0].ok);
    let policy = config::parse(
        "policies: [{name: only-hostsa, namespace: default, scope: NAMESPACE, action: ALLOW,
                     rules: [{clauses: [{matches: [{principals: [{exact: spiffe://cluster.local/ns/default/sa/hostsa}]}]}]}]}]",
    )
    .unwrap();
    cp.replace_all(AUTHORIZATION_TYPE, authorization_resources(&policy));
    wait_for("the ALLOW policy in force", || !bed.pod("client").connect(s1, 1, false).unwrap()[0].ok);
    let a = bed.pod("client").connect(s1, 3, false).unwrap();
    assert!(a.iter().all(|a| a.errno == Some(libc::ECONNREFUSED)), "{a:?}");
    assert!(cp.nacks().is_empty(), "{:?}", cp.nacks());
}

/// A control plane that does not accept the daemon's node (here an istiod from before ambient,
/// which knew only sidecar and router) refuses the stream with its reason: the daemon logs it,
/// reports `kmesh_xds_connected 0`, shows the reason in the config dump, and keeps retrying.
#[test]
fn a_refused_node_is_reported_not_hidden() {
    if !root_or_skip("a_refused_node_is_reported_not_hidden") {
        return;
    }
    let (rt, bed, scratch) = (runtime(), bed(), Scratch::new());
    let cp = ControlPlane::new().with_node_types(&["sidecar", "router"]);
    cp.replace_all(ADDRESS_TYPE, resources(&bed, &["s1"]));
    let server = rt.block_on(cp.spawn("127.0.0.1:0".parse().unwrap(), None)).unwrap();
    let d = Daemon::start_with(
        &[
            "--xds-address",
            &server.addr.to_string(),
            "--xds-plaintext",
            "--node-name",
            "node-a",
            "--xds-backoff-max-ms",
            "300",
        ],
        &bed,
        &scratch.pins,
    );
    let reason = || -> Option<String> {
        let dump: serde_json::Value = serde_json::from_str(&d.get("/debug/config_dump").ok()?).ok()?;
        dump["xds"]["last_error"].as_str().map(str::to_string)
    };
    wait_for("the refusal in the config dump", || reason().is_some_and(|r| r.contains("invalid node type")));
    let r = reason().unwrap();
    assert!(r.contains("valid types: [sidecar router]") && r.contains("\"ztunnel~"), "{r}");
    assert_eq!(d.metric("kmesh_xds_connected"), 0.0);
    assert!(d.get("/debug/ready").is_err(), "ready without a configuration");
    wait_for("a retry", || cp.streams_opened() >= 2);
    // What the daemon said about itself, as istiod reads it.
    let node = &cp.nodes()[0];
    let meta = &node.metadata.as_ref().unwrap().fields;
    for k in ["NAME", "NAMESPACE", "INSTANCE_IPS", "NODE_NAME", "CLUSTER_ID"] {
        assert!(meta.contains_key(k), "metadata lacks {k}: {meta:?}");
    }
    assert!(cp.violations().iter().all(|v| v.contains("invalid node type")), "{:?}", cp.violations());
}

/// Issue 13, item 1: a DENY policy stays in force through SIGKILL restarts in xDS mode (the
/// first also an upgrade of the map layout), whichever type the control plane answers first.
/// Nothing the new daemon receives is applied until both types have arrived, so neither the
/// policy (Addresses first) nor the services (Authorization first) are withdrawn meanwhile.
#[test]
fn policy_and_services_survive_xds_restarts_whichever_type_arrives_first() {
    if !root_or_skip("policy_and_services_survive_xds_restarts_whichever_type_arrives_first") {
        return;
    }
    let (rt, bed, scratch, cp) = (runtime(), bed(), Scratch::new(), ControlPlane::new());
    // The VIP is backed by s2 and s3; s1 is enrolled and denies every connection into it.
    let mut w = workload(bed.pod("client"), &[], "") + &workload(bed.pod("s1"), &[], "");
    for s in ["s2", "s3"] {
        w += &workload(bed.pod(s), &[(SVC_KEY, "[]")], "");
    }
    let svc = service(&format!("[{VIP}]"), "[{service_port: 80, target_port: 8080}]", "{}");
    let text = config("zone-a", &svc, &w)
        + "policies:\n  - {name: deny-all, namespace: default, action: DENY, rules: [{clauses: [{matches: [{}]}]}]}\n";
    let model = config::parse(&text).unwrap();
    cp.replace_all(ADDRESS_TYPE, address_resources(&model));
    cp.replace_all(AUTHORIZATION_TYPE, authorization_resources(&model));
    let server = rt.block_on(cp.spawn("127.0.0.1:0".parse().unwrap(), None)).unwrap();
    let args = |layout: Option<&str>| {
        let mut a = vec![
            "--xds-address".to_string(),
            server.addr.to_string(),
            "--xds-plaintext".into(),
            "--node-name".into(),
            "node-a".into(),
            "--xds-backoff-max-ms".into(),
            "500".into(),
        ];
        if let Some(v) = layout {
            a.extend(["--map-layout-version".to_string(), v.to_string()]);
        }
        a
    };
    let start = |layout: Option<&str>| {
        let a = args(layout);
        Daemon::start_with(&a.iter().map(String::as_str).collect::<Vec<_>>(), &bed, &scratch.pins)
    };
    // The first daemon plays the previous release (map layout v0).
    let mut d = start(Some("0"));
    wait_for("readiness", || d.get("/debug/ready").is_ok());
    enroll_as(&d, &bed, "client", Some("client")).unwrap();
    enroll_as(&d, &bed, "s1", Some("s1")).unwrap();
    let s1: SocketAddr = SocketAddr::new(bed.pod("s1").ipv4.into(), 8080);
    wait_for("the DENY policy in force", || !bed.pod("client").connect(s1, 1, false).unwrap()[0].ok);

    for held in [AUTHORIZATION_TYPE, ADDRESS_TYPE] {
        let opts =
            ClientOptions { count: 100_000, duration_ms: 5000, interval_us: 2000, ..Default::default() };
        let denied = bed.pod("client").connect_background(s1, &opts).unwrap();
        let vip = bed.pod("client").connect_background(format!("{VIP}:80").parse().unwrap(), &opts).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let mut c = d.child.take().unwrap();
        c.kill().unwrap(); // SIGKILL
        c.wait().unwrap();
        cp.hold(held);
        let opened = cp.streams_opened();
        d = start(None);
        wait_for("the new stream", || cp.streams_opened() > opened);
        // The other type has been answered; the held one has not.
        wait_for("the partial sync", || {
            let dump: serde_json::Value =
                serde_json::from_str(&d.get("/debug/config_dump").unwrap()).unwrap();
            dump["xds"]["waiting_for"] == serde_json::json!([held])
        });
        std::thread::sleep(Duration::from_millis(1500));
        assert!(d.get("/debug/ready").is_err(), "not ready before every type has answered");
        cp.release(held);
        wait_for("readiness after the full sync", || d.get("/debug/ready").is_ok());
        let (denied, vip) = (denied.finish().unwrap(), vip.finish().unwrap());
        let admitted = denied.iter().filter(|a| a.ok).count();
        let failed = vip.iter().filter(|a| !a.ok).count();
        eprintln!(
            "restart with {held} answered last: {} connections on the denied path, {admitted} admitted; {} through the VIP, {failed} failed",
            denied.len(),
            vip.len()
        );
        assert!(denied.len() > 100 && vip.len() > 100);
        assert_eq!(admitted, 0, "the DENY policy was withdrawn during the restart");
        assert_eq!(
            failed,
            0,
            "the service was withdrawn during the restart: {:?}",
            vip.iter().find(|a| !a.ok)
        );
        assert!(
            !scratch.pins.join("v0").exists(),
            "the old layout is retired once the full sync is in force"
        );
    }
    assert!(cp.violations().is_empty() && cp.nacks().is_empty(), "{:?} {:?}", cp.violations(), cp.nacks());
}

/// Issue 13, item 3: two services claiming one VIP and port over xDS. The service whose key
/// sorts first owns the frontend, whatever the order of arrival; the conflict is reported
/// (metric, config dump); removing the other leaves the owner's frontend in place, and
/// removing the owner hands the frontend to the other.
#[test]
fn a_vip_claimed_by_two_services_goes_to_the_first_key_and_survives_removals() {
    if !root_or_skip("a_vip_claimed_by_two_services_goes_to_the_first_key_and_survives_removals") {
        return;
    }
    let (rt, bed, scratch, cp) = (runtime(), bed(), Scratch::new(), ControlPlane::new());
    const OTHER: &str = "default/zz-other.default.svc.cluster.local";
    let mut w = workload(bed.pod("client"), &[], "");
    for s in ["s1", "s2"] {
        w += &workload(bed.pod(s), &[(SVC_KEY, "[]")], "");
    }
    w += &workload(bed.pod("s3"), &[(OTHER, "[]")], "");
    let svcs = service(&format!("[{VIP}]"), "[{service_port: 80, target_port: 8080}]", "{}")
        + &format!(
            "  - {{name: zz-other, namespace: default, hostname: zz-other.default.svc.cluster.local, addresses: [{VIP}], ports: [{{service_port: 80, target_port: 8080}}]}}\n"
        );
    let all = address_resources(&config::parse(&config("zone-a", &svcs, &w)).unwrap());
    // The later key arrives first, the owner in a second push.
    let (owner_res, rest): (BTreeMap<_, _>, BTreeMap<_, _>) =
        all.into_iter().partition(|(k, _)| k == SVC_KEY);
    cp.replace_all(ADDRESS_TYPE, rest);
    let server = rt.block_on(cp.spawn("127.0.0.1:0".parse().unwrap(), None)).unwrap();
    let d = start_daemon(&scratch, &bed, server.addr);
    enroll(&d, &bed);
    assert_eq!(connect(&bed, 20).get("s3"), Some(&20), "alone, the other service owns the VIP");
    cp.set(ADDRESS_TYPE, owner_res.clone());
    wait_for("the first key taking the VIP", || !connect(&bed, 5).contains_key("s3"));
    let s = connect(&bed, 60);
    assert_eq!(s.keys().cloned().collect::<Vec<_>>(), ["s1", "s2"], "{s:?}");
    assert_eq!(d.metric("kmesh_frontend_conflicts"), 1.0);
    let dump: serde_json::Value = serde_json::from_str(&d.get("/debug/config_dump").unwrap()).unwrap();
    let c = &dump["frontend_conflicts"][0];
    assert_eq!((c["owner"].as_str(), c["ignored"][0].as_str()), (Some(SVC_KEY), Some(OTHER)), "{dump}");

    // The other service goes: the owner's frontend stays.
    cp.remove(ADDRESS_TYPE, &[OTHER]);
    wait_for("the conflict resolved", || d.metric("kmesh_frontend_conflicts") == 0.0);
    let s = connect(&bed, 30);
    assert_eq!(s.keys().cloned().collect::<Vec<_>>(), ["s1", "s2"], "{s:?}");

    // Back again, then the owner goes: the frontend passes to the other service.
    let again = address_resources(&config::parse(&config("zone-a", &svcs, &w)).unwrap());
    cp.set(ADDRESS_TYPE, again.into_iter().filter(|(k, _)| k == OTHER));
    wait_for("the conflict again", || d.metric("kmesh_frontend_conflicts") == 1.0);
    cp.remove(ADDRESS_TYPE, &[SVC_KEY]);
    wait_for("the other service taking over", || connect(&bed, 5).get("s3") == Some(&5));
    assert!(cp.nacks().is_empty(), "{:?}", cp.nacks());
}

/// The echo service (s1, s2), with `waypoint` naming the service of s3, whose workload takes
/// PROXY protocol on 15088.
fn waypoint_resources(bed: &Testbed, waypoint: bool) -> BTreeMap<String, Vec<u8>> {
    let wp = if waypoint { ", waypoint: {address: 10.96.0.99}" } else { "" };
    let services = format!(
        "  - {{name: echo, namespace: default, hostname: echo.default.svc.cluster.local, addresses: [{VIP}], ports: [{{service_port: 80, target_port: 8080}}]{wp}}}\n  - {{name: wp, namespace: default, hostname: wp.default.svc.cluster.local, addresses: [10.96.0.99], ports: [{{service_port: 15021}}]}}\n"
    );
    let mut w = workload(bed.pod("client"), &[], "");
    for s in ["s1", "s2"] {
        w += &workload(bed.pod(s), &[(SVC_KEY, "[]")], "");
    }
    w += &workload(
        bed.pod("s3"),
        &[("default/wp.default.svc.cluster.local", "[]")],
        ", application_tunnel: {protocol: PROXY, port: 15088}",
    );
    address_resources(&config::parse(&config("zone-a", &services, &w)).unwrap())
}

/// Issue 15: a waypoint given over xDS (Service.waypoint, Workload.application_tunnel) takes
/// the service's connections with the kernel's PROXY header; removing it over xDS sends new
/// connections direct again.
#[test]
fn a_waypoint_over_xds_takes_the_services_connections_until_it_is_removed() {
    if !root_or_skip("a_waypoint_over_xds_takes_the_services_connections_until_it_is_removed") {
        return;
    }
    let rt = runtime();
    let bed = bed();
    bed.serve_with_proxy(bed.pod("s3"), &[], &[], &[15088]).unwrap();
    let scratch = Scratch::new();
    let cp = ControlPlane::new();
    cp.replace_all(ADDRESS_TYPE, waypoint_resources(&bed, true));
    let server: ServerHandle = rt.block_on(cp.spawn("127.0.0.1:0".parse().unwrap(), None)).unwrap();
    let d = start_daemon(&scratch, &bed, server.addr);
    enroll(&d, &bed);
    let first = ClientOptions { count: 10, client_first: true, ..Default::default() };
    let through = || -> Vec<String> {
        let out = bed
            .pod("client")
            .connect_command(format!("{VIP}:80").parse().unwrap(), &first)
            .unwrap()
            .output()
            .unwrap();
        kmesh_testbed::parse_attempts(&String::from_utf8_lossy(&out.stdout))
            .unwrap()
            .into_iter()
            .map(|a| a.server.unwrap_or_else(|| format!("errno {:?}", a.errno)))
            .collect()
    };
    let client_ip = bed.pod("client").ipv4;
    for line in through() {
        assert!(
            line.starts_with(&format!("s3 proxy src={client_ip}:"))
                && line.ends_with(&format!(
                    " dst={VIP}:80 id=spiffe://cluster.local/ns/default/sa/client host=echo.default.svc.cluster.local"
                )),
            "{line}"
        );
    }
    cp.replace_all(ADDRESS_TYPE, waypoint_resources(&bed, false));
    wait_for("the waypoint removed", || through().iter().all(|l| l == "s1" || l == "s2"));
    let s = connect(&bed, 60);
    assert_eq!(s.keys().cloned().collect::<Vec<_>>(), ["s1", "s2"], "{s:?}");
    assert_eq!(d.metric("kmesh_xds_responses_total{result=\"nack\"}"), 0.0);
    assert!(cp.nacks().is_empty(), "{:?}", cp.nacks());
}
