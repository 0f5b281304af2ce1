//! The Kubernetes source against a real API server (`../shared/k8s/`), with the test playing
//! the kubelet: Node, Namespace and Pod objects in the API server, each pod's sandbox a process
//! in a testbed network namespace under a cgroup named after the pod's uid.

mod common;

use std::time::{Duration, Instant};

use common::k8s::{ApiServer, CNI_PLUGINS, Kube, NetnsGuard, Sandbox, cni_exec, eventually, unique};
use common::{Daemon, Scratch, root_or_skip};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule};
use kmesh_testbed::{Attempt, PodSpec, Testbed, spread};
use kube::api::{Api, PostParams};

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

/// The dump's entry for a pod, if the daemon sees it.
fn k8s_pod_opt<'a>(dump: &'a serde_json::Value, ns: &str, name: &str) -> Option<&'a serde_json::Value> {
    dump["kubernetes"]["pods"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["namespace"] == ns && p["name"] == name))
}

fn k8s_pod<'a>(dump: &'a serde_json::Value, ns: &str, name: &str) -> &'a serde_json::Value {
    k8s_pod_opt(dump, ns, name).unwrap_or_else(|| panic!("no pod {ns}/{name} in {}", dump["kubernetes"]))
}

fn start(scratch: &Scratch, bed: &Testbed, api: &ApiServer, node: &str) -> Daemon {
    start_with(scratch, bed, &api.kubeconfig, node, &[])
}

fn start_with(
    scratch: &Scratch,
    bed: &Testbed,
    kubeconfig: &std::path::Path,
    node: &str,
    extra: &[&str],
) -> Daemon {
    let kc = kubeconfig.display().to_string();
    let cni = scratch.dir.join("cni.sock").display().to_string();
    let mut args = vec!["--kubeconfig", &kc, "--node-name", node, "--cni-socket", &cni];
    args.extend(extra);
    Daemon::start(&scratch.config(), bed, &scratch.pins, &args)
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

/// The primary network of the test node: Debian's bridge plugin on the testbed's bridge (in
/// the testbed's node namespace), host-local addresses, no gateway and no routes.
fn primary_conflist(ipam_dir: &std::path::Path) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "testnet",
        "plugins": [{
            "type": "bridge", "bridge": "br0", "isGateway": false, "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": "10.244.0.0/24", "rangeStart": "10.244.0.100", "rangeEnd": "10.244.0.150" }]],
                "dataDir": ipam_dir,
            },
        }],
    })
}

fn read_json(p: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn chained(conflist: &serde_json::Value) -> bool {
    conflist["plugins"].as_array().and_then(|a| a.last()).is_some_and(|p| p["type"] == "kmesh-cni")
}

#[test]
fn the_cni_chain_enrolls_a_pod_before_its_first_connection_and_stays_chained() {
    if !root_or_skip("the_cni_chain_enrolls_a_pod_before_its_first_connection_and_stays_chained") {
        return;
    }
    let api = ApiServer::shared();
    let kube = Kube::new(&api);
    let (node, ns) = (unique("node"), unique("mesh"));
    kube.node(&node, &[]);
    kube.namespace(&ns, &[(MODE, "kmesh")]);
    let bed = bed(&["client"]);
    let scratch = Scratch::new();
    scratch.write_config(&config(&bed, &node, &ns));
    let (net_d, bin, ipam) = (scratch.dir.join("net.d"), scratch.dir.join("bin"), scratch.dir.join("ipam"));
    std::fs::create_dir_all(&net_d).unwrap();
    let conflist_path = net_d.join("10-testnet.conflist");
    let primary = primary_conflist(&ipam);
    std::fs::write(&conflist_path, primary.to_string()).unwrap();
    let mut d = start_with(
        &scratch,
        &bed,
        &api.kubeconfig,
        &node,
        &["--cni-conf-dir", net_d.to_str().unwrap(), "--cni-bin-dir", bin.to_str().unwrap()],
    );
    eventually("the plugin chained and installed", 10, || {
        chained(&read_json(&conflist_path)) && bin.join("kmesh-cni").is_file()
    });
    eventually("ready", 10, || d.get("/debug/ready").is_ok());

    // The runtime's part: the pod's namespace, then the chain, in order, each plugin given the
    // previous one's result.
    let _uid = kube.pod(&ns, "web", &node, &[]);
    let netns = NetnsGuard::new(&format!("{}-cni-web", bed.name()));
    let conflist = read_json(&conflist_path);
    let cni_path = format!("{}:{CNI_PLUGINS}", bin.display());
    let args =
        format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=c0ffee");
    let node_ns = format!("{}-node", bed.name());
    let run_chain = |command: &str, conflist: &serde_json::Value| -> Vec<common::k8s::CniOutput> {
        let mut plugins: Vec<serde_json::Value> = conflist["plugins"].as_array().unwrap().clone();
        if command == "DEL" {
            plugins.reverse();
        }
        let mut prev: Option<serde_json::Value> = None;
        let mut outs = Vec::new();
        for p in plugins {
            let mut conf = p.clone();
            conf["cniVersion"] = conflist["cniVersion"].clone();
            conf["name"] = conflist["name"].clone();
            if let Some(r) = &prev {
                conf["prevResult"] = r.clone();
            }
            let ty = p["type"].as_str().unwrap();
            let (path, in_ns) = if ty == "kmesh-cni" {
                (bin.join(ty), None)
            } else {
                (std::path::Path::new(CNI_PLUGINS).join(ty), Some(node_ns.as_str()))
            };
            let out = cni_exec(&path, command, &conf, &netns.path(), &args, &cni_path, in_ns);
            assert!(out.ok, "{command} {ty}: {}", out.stdout);
            if command == "ADD" {
                prev = Some(out.json.clone());
            }
            outs.push(out);
        }
        outs
    };
    let added = run_chain("ADD", &conflist);
    let result = &added.last().unwrap().json;
    assert_eq!(
        result,
        &{
            let mut r = added[0].json.clone();
            r["cniVersion"] = serde_json::json!("1.0.0");
            r
        },
        "kmesh-cni passes the primary plugin's result through"
    );
    let ip = result["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_string();
    // The pod's first connections, made at once: balanced.
    let cg = bed.cgroup().join("web");
    std::fs::create_dir_all(&cg).unwrap();
    let web = kmesh_testbed::Pod {
        spec: PodSpec { ipv6: false, ..PodSpec::new("web", &node, "") },
        netns: netns.0.clone(),
        ipv4: ip.parse().unwrap(),
        ipv6: None,
        cgroup: cg,
    };
    let a = web.connect(ECHO.parse().unwrap(), 40, false).unwrap();
    let s = spread(&a);
    assert!(all_ok(&a) && s.contains_key("s1") && s.contains_key("s2"), "first connections: {s:?}");
    kube.pod_running(&ns, "web", &ip);
    eventually("web annotated", 20, || kube.redirection(&ns, "web").as_deref() == Some("enabled"));

    // The primary plugin rewrites its file without the entry: it is chained again.
    let rewritten = std::time::Instant::now();
    std::fs::write(&conflist_path, primary.to_string()).unwrap();
    eventually("chained again", 10, || chained(&read_json(&conflist_path)));
    println!("re-chained {:?} after the primary plugin rewrote its file", rewritten.elapsed());

    // A namespace that does not exist is refused by name.
    let mut bad = conflist["plugins"][1].clone();
    bad["cniVersion"] = serde_json::json!("1.0.0");
    bad["name"] = serde_json::json!("testnet");
    let out = cni_exec(
        &bin.join("kmesh-cni"),
        "ADD",
        &bad,
        std::path::Path::new("/run/netns/nope"),
        &args,
        &cni_path,
        None,
    );
    assert!(!out.ok && out.json["code"] == 11 && out.stdout.contains("/run/netns/nope"), "{}", out.stdout);

    // DEL (in reverse order) takes the pod out.
    run_chain("DEL", &conflist);
    assert!(none_ok(&web.connect(ECHO.parse().unwrap(), 3, false).unwrap()), "web unenrolled by DEL");

    // Daemon down: the entry goes with it; a plugin still called fails closed (the kubelet
    // retries the sandbox), DEL still succeeds.
    d.stop();
    assert!(!chained(&read_json(&conflist_path)), "the entry is removed when the daemon exits");
    let out = cni_exec(&bin.join("kmesh-cni"), "ADD", &bad, &netns.path(), &args, &cni_path, None);
    assert!(!out.ok, "{}", out.stdout);
    assert_eq!(out.json["code"], 11, "{}", out.stdout);
    assert!(out.json["msg"].as_str().unwrap().contains("not reachable"), "{}", out.stdout);
    assert!(cni_exec(&bin.join("kmesh-cni"), "DEL", &bad, &netns.path(), &args, &cni_path, None).ok);
    // Namespaces excluded from the plugin are let through even so.
    let sys = "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns";
    let out = cni_exec(&bin.join("kmesh-cni"), "ADD", &bad, &netns.path(), sys, &cni_path, None);
    assert!(out.ok, "{}", out.stdout);

    // Bad input gets CNI error JSON.
    let plugin = bin.join("kmesh-cni");
    let garbage = {
        use std::io::Write;
        let mut c = std::process::Command::new(&plugin)
            .env("CNI_COMMAND", "ADD")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(b"{not json").unwrap();
        let o = c.wait_with_output().unwrap();
        (o.status.success(), serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap())
    };
    assert!(!garbage.0 && garbage.1["code"] == 6, "{:?}", garbage.1);
    let out = cni_exec(&plugin, "FROB", &bad, &netns.path(), &args, &cni_path, None);
    assert!(
        !out.ok && out.json["code"] == 4 && out.json["msg"].as_str().unwrap().contains("FROB"),
        "{}",
        out.stdout
    );
    let out = cni_exec(&plugin, "ADD", &bad, std::path::Path::new(""), &args, &cni_path, None);
    assert!(!out.ok && out.json["code"] == 4 && out.stdout.contains("CNI_NETNS"), "{}", out.stdout);
    let out = cni_exec(&plugin, "VERSION", &serde_json::json!({}), &netns.path(), "", &cni_path, None);
    assert!(
        out.ok && out.json["supportedVersions"].as_array().unwrap().contains(&serde_json::json!("1.0.0")),
        "{}",
        out.stdout
    );
}

/// The rules of the chart's ClusterRole, as rendered in `deploy/manifests/kmesh.yaml`.
fn chart_rules() -> Vec<PolicyRule> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/manifests/kmesh.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let role = text
        .split("\n---\n")
        .filter_map(|doc| serde_yaml::from_str::<ClusterRole>(doc).ok())
        .find(|r| r.metadata.name.as_deref() == Some("kmesh"))
        .expect("a ClusterRole named kmesh in the rendered chart");
    role.rules.unwrap_or_default()
}

/// A ServiceAccount bound to a ClusterRole with `rules`, and a kubeconfig carrying a token for
/// it minted with the TokenRequest API (as the kubelet projects it into the chart's pods).
fn service_account_kubeconfig(
    kube: &Kube,
    api: &ApiServer,
    ns: &str,
    sa: &str,
    rules: Vec<PolicyRule>,
    dir: &std::path::Path,
) -> std::path::PathBuf {
    let pp = PostParams::default();
    let role_name = format!("{ns}-{sa}");
    let account: ServiceAccount =
        serde_json::from_value(serde_json::json!({"metadata": {"name": sa, "namespace": ns}})).unwrap();
    let role = ClusterRole {
        metadata: serde_json::from_value(serde_json::json!({"name": role_name})).unwrap(),
        rules: Some(rules),
        ..Default::default()
    };
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": role_name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}],
    }))
    .unwrap();
    let accounts = Api::<ServiceAccount>::namespaced(kube.client.clone(), ns);
    let token = kube.rt.block_on(async {
        accounts.create(&pp, &account).await.expect("create service account");
        Api::<ClusterRole>::all(kube.client.clone()).create(&pp, &role).await.expect("create role");
        Api::<ClusterRoleBinding>::all(kube.client.clone())
            .create(&pp, &binding)
            .await
            .expect("create binding");
        let req = TokenRequest {
            spec: Some(TokenRequestSpec { expiration_seconds: Some(3600), ..Default::default() }),
            ..Default::default()
        };
        let t = accounts.create_token_request(sa, &pp, &req).await.expect("TokenRequest");
        t.status.and_then(|s| s.token).expect("a minted token")
    });
    // The admin kubeconfig with its token swapped for the service account's.
    let admin = std::fs::read_to_string(&api.kubeconfig).unwrap();
    let kc: String =
        admin
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("token:") {
                    format!("    token: {token}")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
    assert!(kc.contains(&token), "the admin kubeconfig has no token line to swap:\n{admin}");
    let path = dir.join(format!("kubeconfig-{sa}"));
    std::fs::write(&path, kc).unwrap();
    path
}

#[test]
fn the_charts_service_account_and_rbac_are_enough_and_a_missing_permission_is_named() {
    if !root_or_skip("the_charts_service_account_and_rbac_are_enough_and_a_missing_permission_is_named") {
        return;
    }
    let api = ApiServer::shared();
    let kube = Kube::new(&api);
    let rules = chart_rules();
    let (system, mesh) = (unique("kmesh-system"), unique("mesh"));
    kube.namespace(&system, &[]);
    kube.namespace(&mesh, &[(MODE, "kmesh")]);
    let bed = bed(&["client", "nopatch", "nowatch"]);
    let keys = Scratch::new();

    // Exactly the chart's RBAC: the pod is enrolled, annotated, balanced; the daemon is ready.
    let node = unique("node");
    kube.node(&node, &[]);
    let kc = service_account_kubeconfig(&kube, &api, &system, "kmesh", rules.clone(), &keys.dir);
    let scratch = Scratch::new();
    scratch.write_config(&config(&bed, &node, &mesh));
    let _c = run_pod(&kube, &bed, &mesh, "client", &node, &[]);
    let d = start_with(&scratch, &bed, &kc, &node, &[]);
    eventually("client annotated", 20, || kube.redirection(&mesh, "client").as_deref() == Some("enabled"));
    let s = spread(&connect(&bed, "client", ECHO, 40));
    assert!(s.contains_key("s1") && s.contains_key("s2"), "{s:?}");
    eventually("ready", 10, || d.get("/debug/ready").is_ok());
    drop(d);
    drop(scratch); // detaches its programs from the testbed's cgroup

    // Without `patch` on pods/status: still enrolled (the kernel needs no API server), the pod
    // not annotated, and the dump says which permission is missing.
    let node = unique("node");
    kube.node(&node, &[]);
    let fewer: Vec<PolicyRule> =
        rules.iter().filter(|r| !r.resources.iter().flatten().any(|x| x == "pods/status")).cloned().collect();
    assert!(fewer.len() < rules.len(), "the chart grants patch on pods/status: {rules:?}");
    let kc = service_account_kubeconfig(&kube, &api, &system, "nopatch", fewer, &keys.dir);
    let scratch = Scratch::new();
    scratch.write_config(&config(&bed, &node, &mesh));
    let _n = run_pod(&kube, &bed, &mesh, "nopatch", &node, &[]);
    let d = start_with(&scratch, &bed, &kc, &node, &[]);
    eventually("nopatch enrolled", 20, || all_ok(&connect(&bed, "nopatch", ECHO, 2)));
    eventually("the annotation error in the dump", 20, || {
        let dmp = dump(&d);
        let e =
            k8s_pod_opt(&dmp, &mesh, "nopatch").and_then(|p| p["annotation_error"].as_str()).unwrap_or("");
        e.contains("forbidden") && e.contains("cannot patch resource \"pods/status\"")
    });
    assert_eq!(kube.redirection(&mesh, "nopatch"), None);
    drop(d);
    drop(scratch); // detaches its programs from the testbed's cgroup

    // Without `watch` on pods: not ready, naming the condition, and the dump names the refusal.
    let node = unique("node");
    kube.node(&node, &[]);
    let nowatch: Vec<PolicyRule> = rules
        .iter()
        .cloned()
        .map(|mut r| {
            if r.resources.iter().flatten().any(|x| x == "pods") {
                r.verbs.retain(|v| v != "watch");
            }
            r
        })
        .collect();
    let kc = service_account_kubeconfig(&kube, &api, &system, "nowatch", nowatch, &keys.dir);
    let scratch = Scratch::new();
    scratch.write_config(&config(&bed, &node, &mesh));
    let _w = run_pod(&kube, &bed, &mesh, "nowatch", &node, &[]);
    let d = start_with(&scratch, &bed, &kc, &node, &[]);
    eventually("the refusal in the dump", 20, || {
        let e = dump(&d)["kubernetes"]["last_error"].as_str().unwrap_or("").to_string();
        e.contains("cannot watch resource \"pods\"")
    });
    eventually("not ready without the pods watch", 5, || {
        d.get("/debug/ready")
            .is_err_and(|e| e.to_string().contains("kubernetes watches not synced or refused"))
    });
}
