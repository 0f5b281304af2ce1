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
        .args(["--workload", "client", "--admin-socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "enroll: {}", String::from_utf8_lossy(&out.stderr));
    let s = connect(&bed, 90);
    assert_eq!(s.len(), 3, "{s:?}");

    // A change in the file: s3 removed.
    scratch.write_config(&echo_config(&bed, &["s1", "s2"], "{}"));
    wait_for("the reload", || d.metric("kmesh_map_entries{map=\"ENDPOINTS\"}") == 2.0);
    let s = connect(&bed, 60);
    assert_eq!(s.get("s3"), None, "{s:?}");

    // Garbage and an invalid field: refused, the previous config stays in force. (The count
    // may already hold one error: the file missing at start, if the daemon polled before the
    // first write.)
    let errors = d.metric("kmesh_config_errors_total");
    scratch.write_config("services: [ {name: broken");
    wait_for("the syntax error", || d.metric("kmesh_config_errors_total") == errors + 1.0);
    let bad = echo_config(&bed, &["s1"], "{}")
        .replace("service_account: s1,", "status: SICK, service_account: s1,");
    assert!(bad.contains("SICK"));
    scratch.write_config(&bad);
    wait_for("the validation error", || d.metric("kmesh_config_errors_total") == errors + 2.0);
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
    admin::request(&d.socket, "POST", "/v1/enroll", Some(&req)).unwrap();
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
    let e =
        admin::request(&d.socket, "POST", "/v1/enroll", Some(r#"{"netns": "/run/netns/does-not-exist"}"#))
            .unwrap_err()
            .to_string();
    assert!(e.contains("400") && e.contains("does-not-exist"), "{e}");
    let e = admin::request(&d.socket, "POST", "/v1/enroll", Some("{}")).unwrap_err().to_string();
    assert!(e.contains("exactly one of"), "{e}");
    // Issue 13, item 4: paths that are not network namespaces are refused by name, and a FIFO
    // (which a blocking open would wait on forever) does not stall the daemon.
    let fifo = scratch.dir.join("a-fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for p in [fifo.clone(), scratch.config(), "/proc/self/ns/uts".into()] {
        let req = serde_json::json!({ "netns": p }).to_string();
        let t = std::time::Instant::now();
        let e = admin::request(&d.socket, "POST", "/v1/enroll", Some(&req)).unwrap_err().to_string();
        assert!(e.contains("400") && e.contains("is not a network namespace"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(2), "{} took {:?}", p.display(), t.elapsed());
    }
    // The loopback address is read-only: every mutating endpoint is refused there, naming the
    // socket, and nothing changed.
    let req = serde_json::json!({ "netns": bed.pod("client").netns_path() }).to_string();
    admin::request(&d.socket, "POST", "/v1/enroll", Some(&req)).unwrap();
    for (path, body) in [
        ("/v1/unenroll", req.as_str()),
        ("/v1/enroll", req.as_str()),
        ("/debug/loggers", r#"{"filter": "off"}"#),
        ("/debug/monitoring", r#"{"access_log": "off"}"#),
    ] {
        let e = admin::request(d.admin, "POST", path, Some(body)).unwrap_err().to_string();
        assert!(e.contains("403") && e.contains(d.socket.to_str().unwrap()), "{path}: {e}");
    }
    let dump: serde_json::Value = serde_json::from_str(&d.get("/debug/config_dump").unwrap()).unwrap();
    assert_eq!(dump["enrolled"].as_array().unwrap().len(), 1, "still enrolled");
    assert_eq!(connect(&bed, 10).get("s1"), Some(&10));
    // The socket is root's alone.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!((meta.permissions().mode() & 0o777, meta.uid()), (0o600, 0));
    // The CLI without a daemon says so.
    let out = Command::new(DAEMON)
        .args(["enroll", "--pid", "1", "--admin-socket", "/nonexistent/admin.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is kmesh-daemon running"));
}

#[test]
fn sigkill_restarts_lose_no_connection() {
    if !root_or_skip("sigkill_restarts_lose_no_connection") {
        return;
    }
    use std::process::Stdio;
    let bed = bed();
    let scratch = Scratch::new();
    scratch.write_config(&echo_config(&bed, &["s1", "s2", "s3"], "{}"));
    // The first daemon plays the previous release: its pins are under map layout v0, so the
    // first restart is also an upgrade to the built-in layout.
    let mut d = Daemon::start(&scratch.config(), &bed, &scratch.pins, &["--map-layout-version", "0"]);
    wait_for("readiness", || d.get("/debug/ready").is_ok());
    let req =
        serde_json::json!({ "netns": bed.pod("client").netns_path(), "workload": "client" }).to_string();
    admin::request(&d.socket, "POST", "/v1/enroll", Some(&req)).unwrap();

    // Three long connections through the VIP, exchanging a line every 100 ms for 30 s...
    let holds: Vec<_> = (0..3)
        .map(|_| {
            let mut c = bed.pod("client").command(kmesh_testbed::agent_path().unwrap());
            c.args(["hold", "--target", &format!("{VIP}:80"), "--secs", "30", "--interval-ms", "100"]);
            c.stdout(Stdio::piped()).stdin(Stdio::null()).spawn().unwrap()
        })
        .collect();
    // ... and new connections back to back for the same 30 s.
    let opts = kmesh_testbed::ClientOptions {
        count: 1_000_000,
        duration_ms: 30_000,
        interval_us: 1000,
        ..Default::default()
    };
    let loop_child =
        bed.pod("client").connect_background(format!("{VIP}:80").parse().unwrap(), &opts).unwrap();

    // SIGKILL the daemon five times; each new one adopts the pins (the first one upgrades).
    for i in 0..5 {
        std::thread::sleep(std::time::Duration::from_millis(4000));
        let mut c = d.child.take().unwrap();
        c.kill().unwrap(); // SIGKILL
        c.wait().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        d = Daemon::start(&scratch.config(), &bed, &scratch.pins, &[]);
        wait_for("readiness after restart", || d.get("/debug/ready").is_ok());
        if i == 0 {
            wait_for("the v0 layout retired", || !scratch.pins.join("v0").exists());
        }
    }
    let attempts = loop_child.finish().unwrap();
    let failed = attempts.iter().filter(|a| !a.ok).count();
    let misrouted =
        attempts.iter().filter(|a| a.ok && !matches!(a.server.as_deref(), Some("s1" | "s2" | "s3"))).count();
    let mut long_ok = 0;
    for h in holds {
        let out = h.wait_with_output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["ok"], true, "a long connection broke: {v}");
        assert!(v["exchanges"].as_u64().unwrap() > 200, "{v}");
        long_ok += 1;
    }
    eprintln!(
        "restart figure: 5 SIGKILL restarts (the first an upgrade v0 -> v{}) in 30 s: {} connections attempted, {failed} failed, {misrouted} misrouted; {long_ok}/3 long connections intact",
        kmesh_common::MAP_LAYOUT_VERSION,
        attempts.len()
    );
    assert!(attempts.len() > 1000);
    assert_eq!(failed, 0, "{:?}", attempts.iter().find(|a| !a.ok));
    assert_eq!(misrouted, 0);
    assert!(scratch.pins.join(format!("v{}/maps/FRONTENDS", kmesh_common::MAP_LAYOUT_VERSION)).exists());
    // The enrollment, with its workload, came through every restart (state file).
    let dump: serde_json::Value = serde_json::from_str(&d.get("/debug/config_dump").unwrap()).unwrap();
    assert_eq!(dump["enrolled"][0]["workload"], "client", "{}", dump["enrolled"]);
}

#[test]
fn a_deleted_pod_is_unenrolled() {
    if !root_or_skip("a_deleted_pod_is_unenrolled") {
        return;
    }
    let mut bed = bed();
    let gone = bed.add_pod(kmesh_testbed::PodSpec::new("gone", "node-a", "zone-a")).unwrap();
    let scratch = Scratch::new();
    scratch.write_config(&echo_config(&bed, &["s1"], "{}"));
    let d = Daemon::start(&scratch.config(), &bed, &scratch.pins, &[]);
    wait_for("readiness", || d.get("/debug/ready").is_ok());
    for pod in ["client", "gone"] {
        let req = serde_json::json!({ "netns": bed.pod(pod).netns_path() }).to_string();
        admin::request(&d.socket, "POST", "/v1/enroll", Some(&req)).unwrap();
    }
    assert_eq!(d.metric("kmesh_map_entries{map=\"NETNS\"}"), 2.0);
    // The pod is deleted (its namespace goes) while the mesh holds it.
    kmesh_testbed::ip(&["netns", "del", &gone.netns]).unwrap();
    wait_for("the gone pod unenrolled", || d.metric("kmesh_map_entries{map=\"NETNS\"}") == 1.0);
    assert_eq!(connect(&bed, 10).get("s1"), Some(&10), "the other pod is unaffected");
}

#[test]
fn pins_removed_by_hand_are_detected_reported_and_restored() {
    if !root_or_skip("pins_removed_by_hand_are_detected_reported_and_restored") {
        return;
    }
    let bed = bed();
    let scratch = Scratch::new();
    scratch.write_config(&echo_config(&bed, &["s1", "s2", "s3"], "{}"));
    let d = Daemon::start(&scratch.config(), &bed, &scratch.pins, &[]);
    wait_for("readiness", || d.get("/debug/ready").is_ok());
    let req = serde_json::json!({ "netns": bed.pod("client").netns_path() }).to_string();
    admin::request(&d.socket, "POST", "/v1/enroll", Some(&req)).unwrap();

    // Every map pin removed (issue 13, item 5: every one comes back).
    let dir = scratch.pins.join(format!("v{}", kmesh_common::MAP_LAYOUT_VERSION));
    let names = |d: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    };
    let maps = names(&dir.join("maps"));
    assert_eq!(maps.len(), 30, "{maps:?}");
    for m in &maps {
        std::fs::remove_file(dir.join("maps").join(m)).unwrap();
    }
    std::fs::remove_file(dir.join("links/kmesh_connect4")).unwrap();
    wait_for("the map pins restored", || d.metric("kmesh_pins_restored_total") >= 25.0);
    assert_eq!(names(&dir.join("maps")), maps);
    assert_eq!(d.metric("kmesh_pins_missing"), 1.0, "the link pin is reported missing");
    // Traffic never noticed.
    assert_eq!(connect(&bed, 30).len(), 3);
}

/// Issue 13, item 5: a restarted daemon enforces with its own authorization program, swapped
/// into the namespace's existing link in one step, and the policy holds throughout.
/// Issue 18, item 4: a restart takes the ids in force back from the maps. On an unchanged
/// configuration it writes no entry at all, even one that fills more than half of a map
/// (which used to be refused, forever, because everything was rewritten next to itself); on
/// a changed one it writes what a daemon that never stopped writes for the same change.
#[test]
fn a_restart_writes_only_what_is_stale() {
    if !root_or_skip("a_restart_writes_only_what_is_stale") {
        return;
    }
    let bed = bed();
    let scratch = Scratch::new();
    let text = |backends: &[&str]| {
        let mut w = workload(bed.pod("client"), &[], "");
        for s in backends {
            let extra = if *s == "s1" { ", authorization_policies: [default/p]" } else { "" };
            w += &workload(bed.pod(s), &[(SVC_KEY, "[]")], extra);
        }
        config("zone-a", &service(&format!("[{VIP}]"), "[{service_port: 80, target_port: 8080}]", "{}"), &w)
            + "policies:\n  - {name: p, namespace: default, scope: WORKLOAD_SELECTOR, action: ALLOW, rules: [{clauses: [{matches: [{namespaces: [{exact: default}]}]}]}]}\n"
    };
    // Three slots in a map of five: more than half.
    let caps = ["--endpoints-capacity", "5"];
    scratch.write_config(&text(&["s1", "s2", "s3"]));
    let start = || {
        let d = Daemon::start(&scratch.config(), &bed, &scratch.pins, &caps);
        wait_for("readiness", || d.get("/debug/ready").is_ok());
        d
    };
    let kill = |d: &mut Daemon| {
        let mut c = d.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    };
    let changes = |d: &Daemon| (d.metric("kmesh_map_writes_total"), d.metric("kmesh_map_deletes_total"));
    let mut d = start();
    let req =
        serde_json::json!({ "netns": bed.pod("client").netns_path(), "workload": "client" }).to_string();
    admin::request(&d.socket, "POST", "/v1/enroll", Some(&req)).unwrap();
    assert_eq!(connect(&bed, 60).len(), 3);
    assert!(changes(&d).0 > 10.0, "the first run wrote everything: {:?}", changes(&d));
    kill(&mut d);

    let mut d = start();
    assert_eq!(changes(&d), (0.0, 0.0), "a restart on the same configuration writes nothing");
    assert_eq!(d.metric("kmesh_apply_errors_total"), 0.0);
    assert_eq!(connect(&bed, 60).len(), 3);
    // The same change made live, then undone, for reference.
    scratch.write_config(&text(&["s1", "s2"]));
    wait_for("s3 out", || d.metric("kmesh_map_entries{map=\"ENDPOINTS\"}") == 2.0);
    let live = changes(&d);
    scratch.write_config(&text(&["s1", "s2", "s3"]));
    wait_for("s3 back", || d.metric("kmesh_map_entries{map=\"ENDPOINTS\"}") == 3.0);
    kill(&mut d);

    scratch.write_config(&text(&["s1", "s2"]));
    let d = start();
    wait_for("s3 out after the restart", || d.metric("kmesh_map_entries{map=\"ENDPOINTS\"}") == 2.0);
    eprintln!("removing s3: live {live:?}, at a restart {:?}", changes(&d));
    assert_eq!(changes(&d), live, "a restart on a changed configuration writes only the difference");
    let s = connect(&bed, 40);
    assert_eq!(s.keys().cloned().collect::<Vec<_>>(), ["s1", "s2"], "{s:?}");
}

/// kubelet probes a pod from the node's own network namespace, an address with no identity:
/// under an ALLOW policy that admits nobody the node is still let in (Istio ambient's
/// behaviour), counted, and forgotten when its connection closes; a mesh peer the policy does
/// not name is refused; `--node-probes enforce` polices the node too.
#[test]
fn kubelet_probes_from_the_node_pass_allow_policies() {
    if !root_or_skip("kubelet_probes_from_the_node_pass_allow_policies") {
        return;
    }
    let bed = bed();
    let node = bed.node().unwrap();
    let scratch = Scratch::new();
    let text = echo_config(&bed, &["s2", "s3"], "{}")
        + &workload(bed.pod("s1"), &[], "")
        + "policies:\n  - {name: only-prod, namespace: default, action: ALLOW, rules: [{clauses: [{matches: [{namespaces: [{exact: prod}]}]}]}]}\n";
    scratch.write_config(&text);
    let node_netns = format!("/run/netns/{}", node.netns);
    let start = |extra: &[&str]| {
        let mut args = vec!["--node-netns", node_netns.as_str()];
        args.extend_from_slice(extra);
        let d = Daemon::start(&scratch.config(), &bed, &scratch.pins, &args);
        wait_for("readiness", || d.get("/debug/ready").is_ok());
        let req = serde_json::json!({ "netns": bed.pod("s1").netns_path(), "workload": "s1" }).to_string();
        admin::request(&d.socket, "POST", "/v1/enroll", Some(&req)).unwrap();
        d
    };
    let mut d = start(&[]);
    let s1 = bed.pod("s1");
    let s1_v4 = std::net::SocketAddr::new(s1.ipv4.into(), 8080);
    let s1_v6 = std::net::SocketAddr::new(s1.ipv6.unwrap().into(), 8080);
    let refused =
        |a: &[kmesh_testbed::Attempt]| a.iter().all(|a| !a.ok && a.errno == Some(libc::ECONNREFUSED));
    assert!(refused(&bed.pod("client").connect(s1_v4, 2, false).unwrap()), "the policy admits no mesh peer");
    for target in [s1_v4, s1_v6] {
        let a = node.connect(target, 3, false).unwrap();
        assert!(a.iter().all(|a| a.ok && a.server.as_deref() == Some("s1")), "probe to {target}: {a:?}");
    }
    // A pod without policies is reached without a mark.
    assert!(
        node.connect(std::net::SocketAddr::new(bed.pod("s2").ipv4.into(), 8080), 1, false).unwrap()[0].ok
    );
    assert_eq!(d.metric("kmesh_authz_node_exempt_total"), 6.0);
    let dump: serde_json::Value = serde_json::from_str(&d.get("/debug/authz").unwrap()).unwrap();
    assert_eq!(dump["node_netns_exempt"], true, "{dump}");
    // A mark goes when its socket reaches CLOSE: for the side that closed first, once the
    // server's FIN has come back (a moment after the client returns).
    let open = || -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(&d.get("/debug/authz").unwrap()).unwrap()["node_connections_open"].clone()
    };
    wait_for("the node's marks forgotten when its connections close", || open() == 0);
    d.stop();

    let mut d = start(&["--node-probes", "enforce"]);
    assert!(refused(&node.connect(s1_v4, 2, false).unwrap()), "enforce: the node is policed like anyone");
    assert_eq!(d.metric("kmesh_authz_node_exempt_total"), 6.0, "nothing more was exempted");
    d.stop();
}

#[test]
fn a_restart_swaps_in_its_own_authorization_program() {
    if !root_or_skip("a_restart_swaps_in_its_own_authorization_program") {
        return;
    }
    let bed = bed();
    let scratch = Scratch::new();
    let text = echo_config(&bed, &["s2", "s3"], "{}")
        + &workload(bed.pod("s1"), &[], "")
        + "policies:\n  - {name: deny-all, namespace: default, action: DENY, rules: [{clauses: [{matches: [{}]}]}]}\n";
    scratch.write_config(&text);
    let mut d = Daemon::start(&scratch.config(), &bed, &scratch.pins, &[]);
    wait_for("readiness", || d.get("/debug/ready").is_ok());
    let req = serde_json::json!({ "netns": bed.pod("s1").netns_path(), "workload": "s1" }).to_string();
    admin::request(&d.socket, "POST", "/v1/enroll", Some(&req)).unwrap();
    let s1: std::net::SocketAddr = std::net::SocketAddr::new(bed.pod("s1").ipv4.into(), 8080);
    assert!(!bed.pod("client").connect(s1, 1, false).unwrap()[0].ok, "denied");
    let program = |d: &Daemon| {
        let v: serde_json::Value = serde_json::from_str(&d.get("/debug/authz").unwrap()).unwrap();
        let p = &v["namespaces"][0]["program"];
        (p["linked"].as_u64().unwrap(), p["loaded"].as_u64().unwrap())
    };
    let (linked, loaded) = program(&d);
    assert_eq!(linked, loaded);

    let opts = kmesh_testbed::ClientOptions {
        count: 100_000,
        duration_ms: 3000,
        interval_us: 1000,
        ..Default::default()
    };
    let denied = bed.pod("client").connect_background(s1, &opts).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut c = d.child.take().unwrap();
    c.kill().unwrap();
    c.wait().unwrap();
    let d = Daemon::start(&scratch.config(), &bed, &scratch.pins, &[]);
    wait_for("readiness", || d.get("/debug/ready").is_ok());
    let (linked2, loaded2) = program(&d);
    assert_ne!(loaded2, loaded, "a new daemon loads its own program");
    assert_eq!(linked2, loaded2, "the namespace's link runs the new daemon's program");
    let a = denied.finish().unwrap();
    assert!(a.len() > 100);
    assert_eq!(a.iter().filter(|a| a.ok).count(), 0, "a connection was admitted during the restart");
}

#[test]
fn kmeshctl_round_trips_each_command() {
    if !root_or_skip("kmeshctl_round_trips_each_command") {
        return;
    }
    let bed = bed();
    let scratch = Scratch::new();
    scratch.write_config(&echo_config(&bed, &["s1", "s2"], "{}"));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let d = Daemon::start(&scratch.config(), &bed, &scratch.pins, &["--metrics-addr", &metrics.to_string()]);
    wait_for("readiness", || d.get("/debug/ready").is_ok());
    let req =
        serde_json::json!({ "netns": bed.pod("client").netns_path(), "workload": "client" }).to_string();
    admin::request(&d.socket, "POST", "/v1/enroll", Some(&req)).unwrap();
    let ctl = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_kmeshctl"))
            .args(["--admin", &d.admin.to_string(), "--admin-socket"])
            .arg(&d.socket)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The Prometheus endpoint Kmesh users scrape.
    let m = admin::request(metrics, "GET", "/status/metric", None).unwrap();
    assert!(m.contains("kmesh_ready 1") && m.contains("kmesh_map_entries{map=\"FRONTENDS\"} 1"), "{m}");

    let (ok, out, _) = ctl(&["version"]);
    let layout = format!("kmesh-daemon 0.1.0 (map layout v{})", kmesh_common::MAP_LAYOUT_VERSION);
    assert!(ok && out.contains(&layout), "{out}");

    let (ok, out, _) = ctl(&["dump", "maps"]);
    assert!(ok, "{out}");
    let s1 = bed.pod("s1").ipv4;
    assert!(
        out.contains(&format!("{VIP}:80/TCP\t{SVC_KEY}")) && out.contains(&format!("{s1} (default/s1)")),
        "{out}"
    );
    assert!(out.contains("client"), "enrolled workload listed: {out}");
    let (ok, out, _) = ctl(&["dump", "maps", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok && v["frontends"][0]["tables"][0]["levels"][0].as_array().unwrap().len() == 2, "{v}");

    let (ok, out, _) = ctl(&["dump", "config"]);
    assert!(ok && out.contains("s2\tdefault") && out.contains(SVC_KEY), "{out}");

    let (ok, out, _) = ctl(&["log"]);
    assert!(ok && out.trim() == "info", "{out}");
    let (ok, out, _) = ctl(&["log", "debug,kmesh::authz=warn"]);
    assert!(ok && out.contains("debug,kmesh::authz=warn"), "{out}");
    assert_eq!(ctl(&["log"]).1.trim(), "debug,kmesh::authz=warn");
    let (ok, _, err) = ctl(&["log", "info,[[bad"]);
    assert!(!ok && err.contains("invalid log filter"), "{err}");

    // Monitoring: show, switch families, and turn the kernel side off and on.
    let (ok, out, _) = ctl(&["monitoring"]);
    assert!(ok && out.contains("access log\ton (text)") && out.contains("connection metrics\toff"), "{out}");
    let (ok, out, _) = ctl(&["monitoring", "--access-log-format", "json", "--connection-metrics", "on"]);
    assert!(ok && out.contains("access log\ton (json)") && out.contains("connection metrics\ton"), "{out}");
    let events = |d: &Daemon| d.metric("kmesh_telemetry_events_total");
    // One record per short connection (its close carries its open; no outlier detection here).
    assert_eq!(connect(&bed, 5).values().sum::<u32>(), 5);
    wait_for("telemetry events", || events(&d) >= 5.0);
    let (ok, out, _) = ctl(&["monitoring", "--all", "off", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok && v["kernel_telemetry"] == false && v["settings"]["access_log"] == false, "{v}");
    let before = events(&d);
    assert_eq!(connect(&bed, 5).values().sum::<u32>(), 5);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(events(&d), before, "no events while telemetry is off");
    let (ok, out, _) = ctl(&["monitoring", "--all", "on"]);
    assert!(ok && out.contains("kernel telemetry\ton"), "{out}");
    assert_eq!(connect(&bed, 5).values().sum::<u32>(), 5);
    wait_for("events again", || events(&d) >= before + 5.0);
    // Without the access log, short connections are summed in the kernel, not sent one by one.
    let (ok, out, _) = ctl(&["monitoring", "--access-log", "off"]);
    assert!(ok && out.contains("access log\toff"), "{out}");
    // Connections opened, as the client side counts them (over every series).
    let opened = |d: &Daemon| -> f64 {
        let text = d.get("/metrics").unwrap();
        text.lines()
            .filter(|l| l.starts_with("kmesh_tcp_connections_opened_total{reporter=\"source\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let (before, opened_before) = (events(&d), opened(&d));
    assert_eq!(connect(&bed, 5).values().sum::<u32>(), 5);
    wait_for("the kernel's sums", || d.metric("kmesh_telemetry_connections_summed_total") >= 5.0);
    assert_eq!(opened(&d), opened_before + 5.0);
    assert_eq!(events(&d), before, "no record of a summed connection");
    let (ok, _, err) = ctl(&["monitoring", "--report-interval-ms", "5"]);
    assert!(!ok && err.contains("at least 100"), "{err}");

    // Authorization status: the enrolled namespace, enforced.
    let (ok, out, _) = ctl(&["authz"]);
    assert!(ok && out.contains("client\tyes") && out.contains("policies in force\t0"), "{out}");
    let (ok, out, _) = ctl(&["authz", "status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok && v["namespaces"][0]["enforced"] == true, "{v}");

    // Errors a person can act on.
    let out = Command::new(env!("CARGO_BIN_EXE_kmeshctl"))
        .args(["--admin", "127.0.0.1:1", "version"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is kmesh-daemon running"));
}

/// Issue 13, item 8: under 10,000 services, while the configuration is recompiled in full
/// (the node's zone flips every second) and pods are enrolled and unenrolled 10 times a second,
/// scrapes are answered without waiting for the applies and connection telemetry stays exact.
#[test]
fn scrapes_and_telemetry_do_not_wait_for_applies_under_10k_services() {
    if !root_or_skip("scrapes_and_telemetry_do_not_wait_for_applies_under_10k_services") {
        return;
    }
    use std::time::{Duration, Instant};
    let bed = bed();
    let scratch = Scratch::new();
    let text = |zone: &str| {
        let mut t = echo_config(&bed, &["s1", "s2", "s3"], "{}")
            .replace("zone: zone-a}}", &format!("zone: {zone}}}}}"));
        let mut fill = String::new();
        for i in 0..10_000u32 {
            fill += &format!(
                "  - {{name: f{i}, namespace: fill, hostname: f{i}.fill.svc.cluster.local, addresses: [10.100.{}.{}], ports: [{{service_port: 80, target_port: 8080}}]}}\n",
                i / 256,
                i % 256
            );
        }
        t = t.replacen("services:\n", &format!("services:\n{fill}"), 1);
        // Five workloads back every filler service: 50,000 endpoint slots to compile.
        let keys: Vec<String> =
            (0..10_000).map(|i| format!("\"fill/f{i}.fill.svc.cluster.local\": []")).collect();
        for w in 0..5 {
            t += &format!(
                "  - {{uid: fw{w}, name: fw{w}, namespace: fill, addresses: [10.244.50.{}], services: {{{}}}}}\n",
                w + 1,
                keys.join(", ")
            );
        }
        t
    };
    scratch.write_config(&text("zone-a"));
    let d = Daemon::start(&scratch.config(), &bed, &scratch.pins, &[]);
    let t0 = Instant::now();
    while d.get("/debug/ready").is_err() {
        assert!(t0.elapsed() < Duration::from_secs(60), "not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.metric("kmesh_map_entries{map=\"FRONTENDS\"}") > 10_000.0);
    let req =
        serde_json::json!({ "netns": bed.pod("client").netns_path(), "workload": "client" }).to_string();
    admin::request(&d.socket, "POST", "/v1/enroll", Some(&req)).unwrap();

    let opts = kmesh_testbed::ClientOptions {
        count: 100_000,
        duration_ms: 6000,
        interval_us: 3000,
        ..Default::default()
    };
    let client = bed.pod("client").connect_background(format!("{VIP}:80").parse().unwrap(), &opts).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let applies = |d: &Daemon| d.metric("kmesh_config_generation");
    std::thread::scope(|sc| {
        // Full recompilations: the node's zone flips, every second.
        let rewriter = sc.spawn(|| {
            let mut took = Vec::new();
            for i in 0..5 {
                let before = applies(&d);
                let t = Instant::now();
                scratch.write_config(&text(if i % 2 == 0 { "zone-b" } else { "zone-a" }));
                while applies(&d) <= before && t.elapsed() < Duration::from_secs(20) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                took.push(t.elapsed());
                std::thread::sleep(Duration::from_millis(300));
            }
            took
        });
        // Enrollments and unenrollments, 10 a second.
        let stop2 = stop.clone();
        let socket = d.socket.clone();
        let bed = &bed;
        sc.spawn(move || {
            let mut i = 0u32;
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                let pod = ["s1", "s2", "s3"][(i / 2 % 3) as usize];
                let path = if i.is_multiple_of(2) { "/v1/enroll" } else { "/v1/unenroll" };
                let req = serde_json::json!({ "netns": bed.pod(pod).netns_path() }).to_string();
                admin::request(&socket, "POST", path, Some(&req)).unwrap();
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            i
        });
        // Scrapes every 20 ms.
        let stop3 = stop.clone();
        let d = &d;
        let scraper = sc.spawn(move || {
            let mut lat = Vec::new();
            while !stop3.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                d.get("/metrics").unwrap();
                lat.push(t.elapsed());
                std::thread::sleep(Duration::from_millis(20));
            }
            lat
        });
        let took = rewriter.join().unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut lat = scraper.join().unwrap();
        lat.sort();
        let mut took_sorted = took.clone();
        took_sorted.sort();
        let median_apply = took_sorted[took_sorted.len() / 2];
        let (p50, max) = (lat[lat.len() / 2], *lat.last().unwrap());
        eprintln!(
            "10k services: full applies took {took:?} (median {median_apply:?}); {} scrapes meanwhile: p50 {p50:?}, max {max:?}",
            lat.len()
        );
        assert!(median_apply > Duration::from_millis(100), "applies too fast to tell: {took:?}");
        assert!(max * 2 < median_apply, "a scrape waited for an apply: max {max:?}, applies {took:?}");
    });
    let attempts = client.finish().unwrap();
    let ok = attempts.iter().filter(|a| a.ok).count();
    assert!(
        ok > 500 && ok == attempts.len(),
        "{} of {} connections failed",
        attempts.len() - ok,
        attempts.len()
    );
    // Every connection counted once, nothing lost.
    std::thread::sleep(Duration::from_millis(600));
    let text = d.get("/metrics").unwrap();
    let opened: f64 = text
        .lines()
        .filter(|l| l.starts_with("kmesh_tcp_connections_opened_total{") && l.contains("reporter=\"source\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    eprintln!("telemetry: {ok} connections made, {opened} counted by the source reporter");
    assert_eq!(opened as usize, ok, "telemetry is not exact under applies");
    assert_eq!(d.metric("kmesh_events_lost_total{ring=\"TELEMETRY\"}"), 0.0);
}
