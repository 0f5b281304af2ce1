//! Passive outlier detection in the workload-API mode, switched on per node with flags: a
//! crashed pod stops receiving new connections before the control plane notices. Needs root.
mod common;

use std::time::{Duration, Instant};

use common::*;

fn ejected(d: &Daemon) -> serde_json::Value {
    let dump: serde_json::Value = serde_json::from_str(&d.get("/debug/config_dump").unwrap()).unwrap();
    dump["outlier"]["ejected"].clone()
}

#[test]
fn with_the_flags_a_pod_that_refuses_is_skipped_until_its_ejection_ends() {
    if !root_or_skip("with_the_flags_a_pod_that_refuses_is_skipped_until_its_ejection_ends") {
        return;
    }
    let bed = bed();
    let scratch = Scratch::new();
    // s3 maps the service port to one nothing listens on: it refuses every connection, as a
    // pod whose server crashed does while the control plane still lists it.
    let mut w = workload(bed.pod("client"), &[], "");
    w += &workload(bed.pod("s1"), &[(SVC_KEY, "[]")], "");
    w += &workload(bed.pod("s2"), &[(SVC_KEY, "[]")], "");
    w += &workload(bed.pod("s3"), &[(SVC_KEY, "[{service_port: 80, target_port: 9999}]")], "");
    let svc = service(&format!("[{VIP}]"), "[{service_port: 80, target_port: 8080}]", "{}");
    scratch.write_config(&config("zone-a", &svc, &w));
    let flags = [
        "--outlier-consecutive-failures",
        "2",
        "--outlier-base-ejection-ms",
        "1000",
        "--outlier-interval-ms",
        "100",
        "--outlier-max-ejection-percent",
        "34",
    ];
    let d = Daemon::start(&scratch.config(), &bed, &scratch.pins, &flags);
    wait_for("readiness", || d.get("/debug/ready").is_ok());
    let req =
        serde_json::json!({ "netns": bed.pod("client").netns_path(), "workload": "client" }).to_string();
    kmesh_daemon::admin::request(&d.socket, "POST", "/v1/enroll", Some(&req)).unwrap();

    // Random balancing: s3 fails its share until two of its connections in a row failed.
    let mut failed = 0;
    let mut n = 0;
    while ejected(&d).as_object().is_none_or(|m| m.is_empty()) {
        failed += connect(&bed, 10).get("!errno 111").copied().unwrap_or(0);
        n += 10;
        assert!(n < 300, "s3 never ejected ({failed} of {n} refused)");
        std::thread::sleep(Duration::from_millis(50));
    }
    let at = Instant::now();
    assert!(failed >= 2, "{failed}");
    let ip3 = bed.pod("s3").ipv4.to_string();
    assert!(ejected(&d).get(&ip3).is_some(), "{}", ejected(&d));
    let s = connect(&bed, 60);
    assert_eq!(s.keys().cloned().collect::<Vec<_>>(), ["s1", "s2"], "s3 is skipped: {s:?}");

    // Readmitted after its second.
    wait_for("s3 readmitted", || ejected(&d).as_object().is_some_and(|m| m.is_empty()));
    assert!(at.elapsed() >= Duration::from_millis(700), "{:?}", at.elapsed());
    let s = connect(&bed, 90);
    assert!(s.contains_key("!errno 111"), "readmitted, it takes its share again: {s:?}");

    // The ejection is counted.
    let dump: serde_json::Value = serde_json::from_str(&d.get("/debug/config_dump").unwrap()).unwrap();
    assert!(dump["outlier"]["ejections_total"].as_u64().unwrap() >= 1);
}
