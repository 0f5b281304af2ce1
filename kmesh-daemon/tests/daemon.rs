//! The whole daemon binary: config file reloads, refused configs, enrollment through the admin
//! API and CLI, readiness, restarts that keep traffic flowing, and uninstall. Needs root.
mod common;

use std::process::Command;

use common::*;
use kmesh_daemon::admin;

#[test]
fn daemon_follows_its_config_file_and_keeps_the_last_good_one() {
    if !root_or_skip("daemon_follows_its_config_file_and_keeps_the_last_good_one") {
        return;
    }
    let bed = bed();
    let scratch = Scratch::new();
    // No config file yet: up, but not ready.
    let d = Daemon::start(&scratch.config(), &bed, &scratch.pins, &[]);
    let e = d.get("/debug/ready").unwrap_err();
    assert!(matches!(e, admin::ClientError::Status { status: 503, .. }), "{e}");

    scratch.write_config(&echo_config(&bed, &["s1", "s2", "s3"], "{}"));
    wait_for("readiness", || d.get("/debug/ready").is_ok());

    // Enroll the client through the CLI, telling the daemon which workload it is.
    let out = Command::new(DAEMON)
        .args(["enroll", "--netns"])
        .arg(bed.pod("client").netns_path())
        .args(["--workload", "client", "--admin", &d.admin.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "enroll: {}", String::from_utf8_lossy(&out.stderr));
    let s = connect(&bed, 90);
    assert_eq!(s.len(), 3, "{s:?}");

    // A change in the file: s3 removed.
    scratch.write_config(&echo_config(&bed, &["s1", "s2"], "{}"));
    wait_for("the reload", || d.metric("kmesh_map_entries{map=\"BACKENDS\"}") == 2.0);
    let s = connect(&bed, 60);
    assert_eq!(s.get("s3"), None, "{s:?}");

    // Garbage and an invalid field: refused, the previous config stays in force.
    scratch.write_config("services: [ {name: broken");
    wait_for("the syntax error", || d.metric("kmesh_config_errors_total") == 1.0);
    let bad = echo_config(&bed, &["s1"], "{}")
        .replace("service_account: s1,", "status: SICK, service_account: s1,");
    assert!(bad.contains("SICK"));
    scratch.write_config(&bad);
    wait_for("the validation error", || d.metric("kmesh_config_errors_total") == 2.0);
    let dump: serde_json::Value = serde_json::from_str(&d.get("/debug/config_dump").unwrap()).unwrap();
    let err = dump["config_error"].as_str().unwrap();
    assert!(err.contains("workloads[1].status") && err.contains("SICK"), "{err}");
    let s = connect(&bed, 60);
    assert!(s.contains_key("s1") && s.contains_key("s2") && !s.contains_key("s3"), "{s:?}");
    assert!(d.get("/debug/ready").is_ok(), "still ready on the last good config");
}

#[test]
fn traffic_keeps_flowing_across_a_daemon_restart_and_uninstall_removes_everything() {
    if !root_or_skip("traffic_keeps_flowing_across_a_daemon_restart_and_uninstall_removes_everything") {
        return;
    }
    let bed = bed();
    let scratch = Scratch::new();
    scratch.write_config(&echo_config(&bed, &["s1", "s2", "s3"], "{}"));
    let mut d = Daemon::start(&scratch.config(), &bed, &scratch.pins, &[]);
    wait_for("readiness", || d.get("/debug/ready").is_ok());
    let req = serde_json::json!({ "netns": bed.pod("client").netns_path() }).to_string();
    admin::request(d.admin, "POST", "/v1/enroll", Some(&req)).unwrap();
    assert_eq!(connect(&bed, 30).len(), 3);

    // Daemon gone: programs and maps stay, so does the balancing.
    d.stop();
    let s = connect(&bed, 30);
    assert_eq!(s.values().sum::<u32>(), 30, "{s:?}");
    assert!(!s.keys().any(|k| k.starts_with('!')), "{s:?}");

    // A new daemon adopts the pins and the enrollment, and applies changes.
    scratch.write_config(&echo_config(&bed, &["s2"], "{}"));
    let mut d = Daemon::start(&scratch.config(), &bed, &scratch.pins, &["--uninstall-on-exit"]);
    wait_for("readiness", || d.get("/debug/ready").is_ok());
    assert_eq!(connect(&bed, 30).get("s2"), Some(&30));

    // Uninstall on exit: programs detached, pins gone, the VIP unroutable again.
    d.stop();
    assert!(!scratch.pins.exists(), "pins left in {}", scratch.pins.display());
    let a = bed.pod("client").connect(format!("{VIP}:80").parse().unwrap(), 1, false).unwrap();
    assert_eq!(a[0].errno, Some(libc::ENETUNREACH), "{a:?}");
}

#[test]
fn enroll_errors_are_clear() {
    if !root_or_skip("enroll_errors_are_clear") {
        return;
    }
    let bed = bed();
    let scratch = Scratch::new();
    scratch.write_config(&echo_config(&bed, &["s1"], "{}"));
    let d = Daemon::start(&scratch.config(), &bed, &scratch.pins, &[]);
    let e = admin::request(d.admin, "POST", "/v1/enroll", Some(r#"{"netns": "/run/netns/does-not-exist"}"#))
        .unwrap_err()
        .to_string();
    assert!(e.contains("400") && e.contains("does-not-exist"), "{e}");
    let e = admin::request(d.admin, "POST", "/v1/enroll", Some("{}")).unwrap_err().to_string();
    assert!(e.contains("exactly one of"), "{e}");
    // The CLI without a daemon says so.
    let out = Command::new(DAEMON).args(["enroll", "--pid", "1", "--admin", "127.0.0.1:1"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is kmesh-daemon running"));
}
