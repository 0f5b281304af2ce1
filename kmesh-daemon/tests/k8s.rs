//! The Kubernetes source against a real API server (`../shared/k8s/`), with the test playing
//! the kubelet: Node, Namespace and Pod objects in the API server, each pod's sandbox a process
//! in a testbed network namespace under a cgroup named after the pod's uid.

mod common;

use std::time::{Duration, Instant};

use common::k8s::{ApiServer, Kube, Sandbox, eventually, unique};
use common::{Daemon, Scratch, root_or_skip};
use kmesh_testbed::{Attempt, PodSpec, Testbed, spread};

const MODE: &str = "istio.io/dataplane-mode";
const ECHO: &str = "10.96.0.10:80";
const NEAR: &str = "10.96.0.11:80";

/// Two services over s1 (zone-a) and s2 (zone-b): `echo` spreads at random, `near` prefers the
/// client's zone. `client` in `ns` is a workload of the config (zone-a); other pods are not,
/// so they take this node's locality.
fn config(bed: &Testbed, node: &str, ns: &str) -> String {
    let w = |name: &str, zone: &str| {
        format!(
            "  - {{uid: {name}, name: {name}, namespace: default, addresses: [\"{}\"], node: other, locality: {{region: region-1, zone: {zone}}}, service_account: {name}, services: {{\"default/echo.default.svc.cluster.local\": [], \"default/near.default.svc.cluster.local\": []}}}}\n",
            bed.pod(name).ipv4
        )
    };
    format!(
        "node: {{name: {node}, locality: {{region: region-1, zone: zone-a}}}}
services:
  - {{name: echo, namespace: default, hostname: echo.default.svc.cluster.local, addresses: [10.96.0.10], ports: [{{service_port: 80, target_port: 8080}}]}}
  - {{name: near, namespace: default, hostname: near.default.svc.cluster.local, addresses: [10.96.0.11], ports: [{{service_port: 80, target_port: 8080}}], load_balancing: {{routing_preference: [REGION, ZONE], mode: FAILOVER}}}}
workloads:
{}{}  - {{uid: \"Kubernetes//Pod/{ns}/client\", name: client, namespace: {ns}, addresses: [\"{}\"], node: {node}, locality: {{region: region-1, zone: zone-a}}, service_account: client}}
",
        w("s1", "zone-a"),
        w("s2", "zone-b"),
        bed.pod("client").ipv4,
    )
}

fn bed(pods: &[&str]) -> Testbed {
    let mut bed = Testbed::new().unwrap();
    for (name, zone) in [("s1", "zone-a"), ("s2", "zone-b")] {
        bed.add_pod(PodSpec { ipv6: false, ..PodSpec::new(name, "other", zone) }).unwrap();
    }
    for p in pods {
        bed.add_pod(PodSpec { ipv6: false, ..PodSpec::new(p, "this", "") }).unwrap();
    }
    for s in ["s1", "s2"] {
        bed.serve(bed.pod(s), &[8080], &[]).unwrap();
    }
    bed
}

fn connect(bed: &Testbed, from: &str, target: &str, n: u32) -> Vec<Attempt> {
    bed.pod(from).connect(target.parse().unwrap(), n, false).unwrap()
}

fn all_ok(a: &[Attempt]) -> bool {
    a.iter().all(|x| x.ok)
}

fn none_ok(a: &[Attempt]) -> bool {
    a.iter().all(|x| !x.ok)
}

/// One pod as the kubelet runs it: the object, its sandbox, and its status.
fn run_pod(kube: &Kube, bed: &Testbed, ns: &str, name: &str, node: &str, labels: &[(&str, &str)]) -> Sandbox {
    let uid = kube.pod(ns, name, node, labels);
    let sb = Sandbox::start(bed.pod(name), &uid);
    kube.pod_running(ns, name, &bed.pod(name).ipv4.to_string());
    sb
}

fn dump(d: &Daemon) -> serde_json::Value {
    serde_json::from_str(&d.get("/debug/config_dump").unwrap()).unwrap()
}

fn k8s_pod<'a>(dump: &'a serde_json::Value, ns: &str, name: &str) -> &'a serde_json::Value {
    dump["kubernetes"]["pods"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["namespace"] == ns && p["name"] == name))
        .unwrap_or_else(|| panic!("no pod {ns}/{name} in {}", dump["kubernetes"]))
}

fn start(scratch: &Scratch, bed: &Testbed, api: &ApiServer, node: &str) -> Daemon {
    let kc = api.kubeconfig.display().to_string();
    Daemon::start(&scratch.config(), bed, &scratch.pins, &["--kubeconfig", &kc, "--node-name", node])
}

#[test]
fn pods_join_and_leave_the_mesh_by_label_and_the_nodes_locality_drives_failover() {
    if !root_or_skip("pods_join_and_leave_the_mesh_by_label_and_the_nodes_locality_drives_failover") {
        return;
    }
    let api = ApiServer::shared();
    let kube = Kube::new(&api);
    let (node, nsm, nsp) = (unique("node"), unique("mesh"), unique("plain"));
    kube.node(&node, &[]);
    kube.namespace(&nsm, &[(MODE, "Kmesh")]);
    kube.namespace(&nsp, &[]);
    let bed = bed(&["client", "optout", "plain"]);
    let scratch = Scratch::new();
    scratch.write_config(&config(&bed, &node, &nsm));
    let _sandboxes = [
        run_pod(&kube, &bed, &nsm, "client", &node, &[]),
        run_pod(&kube, &bed, &nsm, "optout", &node, &[(MODE, "none")]),
        run_pod(&kube, &bed, &nsp, "plain", &node, &[]),
    ];
    let d = start(&scratch, &bed, &api, &node);

    // A pod in a labelled namespace: enrolled, annotated, balanced.
    eventually("client annotated", 20, || kube.redirection(&nsm, "client").as_deref() == Some("enabled"));
    let a = connect(&bed, "client", ECHO, 60);
    let s = spread(&a);
    assert!(all_ok(&a) && s.contains_key("s1") && s.contains_key("s2"), "{s:?}");
    // The pod-level opt-out wins over the namespace; an unlabelled namespace is untouched.
    for (ns, p) in [(&nsm, "optout"), (&nsp, "plain")] {
        assert_eq!(kube.redirection(ns, p), None, "{p}");
        assert!(none_ok(&connect(&bed, p, ECHO, 3)), "{p} is not in the mesh");
    }
    let dmp = dump(&d);
    assert_eq!(k8s_pod(&dmp, &nsm, "optout")["reason"], "opted_out", "{dmp}");
    assert_eq!(k8s_pod(&dmp, &nsp, "plain")["reason"], "not_labelled", "{dmp}");

    // Labelling a namespace enrolls its running pods; with no Node labels the configured
    // locality (zone-a) holds for a pod the config does not describe.
    kube.label_namespace(&nsp, &[(MODE, "kmesh")]);
    eventually("plain annotated", 20, || kube.redirection(&nsp, "plain").as_deref() == Some("enabled"));
    assert_eq!(spread(&connect(&bed, "plain", NEAR, 20)), [("s1".to_string(), 20)].into());
    // The Node's topology labels are this node's locality, kept current.
    kube.label_node(
        &node,
        &[("topology.kubernetes.io/region", "region-1"), ("topology.kubernetes.io/zone", "zone-b")],
    );
    eventually("traffic follows the node's zone", 20, || {
        spread(&connect(&bed, "plain", NEAR, 5)) == [("s2".to_string(), 5)].into()
    });
    assert_eq!(spread(&connect(&bed, "plain", NEAR, 20)), [("s2".to_string(), 20)].into());
    assert_eq!(dump(&d)["kubernetes"]["node_locality"]["zone"], "zone-b");
    // The config's own workload keeps its own zone.
    assert_eq!(spread(&connect(&bed, "client", NEAR, 20)), [("s1".to_string(), 20)].into());

    // Unlabelling the namespace unenrolls its pods and removes the annotation.
    kube.label_namespace(&nsp, &[(MODE, "")]);
    eventually("plain unannotated", 20, || kube.redirection(&nsp, "plain").is_none());
    assert!(none_ok(&connect(&bed, "plain", ECHO, 3)));

    // A deleted pod is unenrolled.
    kube.delete_pod(&nsm, "client");
    eventually("client unenrolled", 20, || none_ok(&connect(&bed, "client", ECHO, 2)));
    let dmp = dump(&d);
    let enrolled: Vec<&serde_json::Value> = dmp["enrolled"].as_array().unwrap().iter().collect();
    assert!(enrolled.is_empty(), "{enrolled:?}");
}

#[test]
fn a_restarted_daemon_recovers_every_enrollment_and_catches_up() {
    if !root_or_skip("a_restarted_daemon_recovers_every_enrollment_and_catches_up") {
        return;
    }
    let api = ApiServer::shared();
    let kube = Kube::new(&api);
    let (node, ns) = (unique("node"), unique("mesh"));
    kube.node(&node, &[]);
    kube.namespace(&ns, &[(MODE, "kmesh")]);
    let bed = bed(&["client", "gone", "late"]);
    let scratch = Scratch::new();
    scratch.write_config(&config(&bed, &node, &ns));
    let _c = run_pod(&kube, &bed, &ns, "client", &node, &[]);
    let _g = run_pod(&kube, &bed, &ns, "gone", &node, &[]);
    let mut d = start(&scratch, &bed, &api, &node);
    for p in ["client", "gone"] {
        eventually("pods annotated", 20, || kube.redirection(&ns, p).as_deref() == Some("enabled"));
    }
    assert!(all_ok(&connect(&bed, "gone", ECHO, 5)));

    // While the daemon is down: one pod goes, another comes.
    d.child.take().map(|mut c| {
        c.kill().unwrap();
        c.wait().unwrap()
    });
    kube.delete_pod(&ns, "gone");
    let _l = run_pod(&kube, &bed, &ns, "late", &node, &[]);
    // Traffic of enrolled pods keeps flowing with no daemon at all.
    assert!(all_ok(&connect(&bed, "client", ECHO, 20)));

    let started = Instant::now();
    let d = start(&scratch, &bed, &api, &node);
    eventually("late annotated", 20, || kube.redirection(&ns, "late").as_deref() == Some("enabled"));
    eventually("gone unenrolled", 20, || none_ok(&connect(&bed, "gone", ECHO, 2)));
    println!("restart: caught up in {:?}", started.elapsed());
    assert!(all_ok(&connect(&bed, "client", ECHO, 20)));
    assert!(all_ok(&connect(&bed, "late", ECHO, 20)));
    let dmp = dump(&d);
    let mut workloads: Vec<String> = dmp["enrolled"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["workload"].as_str().unwrap().to_string())
        .collect();
    workloads.sort();
    assert_eq!(workloads, vec![format!("Kubernetes//Pod/{ns}/client"), format!("Kubernetes//Pod/{ns}/late")]);
}

#[test]
fn an_api_server_outage_keeps_traffic_flowing_and_the_watches_resume() {
    if !root_or_skip("an_api_server_outage_keeps_traffic_flowing_and_the_watches_resume") {
        return;
    }
    let api = ApiServer::start();
    let kube = Kube::new(&api);
    let (node, ns, later) = (unique("node"), unique("mesh"), unique("later"));
    kube.node(&node, &[]);
    kube.namespace(&ns, &[(MODE, "kmesh")]);
    kube.namespace(&later, &[]);
    let bed = bed(&["client", "slow", "other"]);
    let scratch = Scratch::new();
    scratch.write_config(&config(&bed, &node, &ns));
    let _c = run_pod(&kube, &bed, &ns, "client", &node, &[]);
    let _o = run_pod(&kube, &bed, &later, "other", &node, &[]);
    // `slow` is scheduled but its sandbox only starts during the outage.
    let slow_uid = kube.pod(&ns, "slow", &node, &[]);
    let d = start(&scratch, &bed, &api, &node);
    eventually("client annotated", 20, || kube.redirection(&ns, "client").as_deref() == Some("enabled"));

    api.pause();
    let paused = Instant::now();
    eventually("the daemon sees the watches broken", 30, || dump(&d)["kubernetes"]["connected"] == false);
    let _s = Sandbox::start(bed.pod("slow"), &slow_uid);
    let mut flowed = 0;
    while paused.elapsed() < Duration::from_secs(30) {
        let a = connect(&bed, "client", ECHO, 10);
        assert!(all_ok(&a), "traffic during the outage: {:?}", spread(&a));
        flowed += a.len();
        std::thread::sleep(Duration::from_secs(2));
    }
    // The pod whose sandbox came up meanwhile is enrolled from what the watch last saw.
    assert!(all_ok(&connect(&bed, "slow", ECHO, 5)), "slow enrolled during the outage");
    api.resume();
    println!("API server down for {:?}; {flowed} connections made meanwhile, all balanced", paused.elapsed());

    // Watches resume: the annotation that could not be written is, and a new label is seen.
    eventually("slow annotated after the outage", 60, || {
        kube.redirection(&ns, "slow").as_deref() == Some("enabled")
    });
    kube.label_namespace(&later, &[(MODE, "kmesh")]);
    eventually("other enrolled after the outage", 30, || {
        kube.redirection(&later, "other").as_deref() == Some("enabled")
    });
    assert!(all_ok(&connect(&bed, "other", ECHO, 5)));
    eventually("the daemon sees the watches streaming", 10, || dump(&d)["kubernetes"]["connected"] == true);
    assert_eq!(dump(&d)["kubernetes"]["last_error"], serde_json::Value::Null);
}
