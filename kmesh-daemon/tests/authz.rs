//! L4 authorization with Istio's semantics, enforced in the kernel at the destination, with
//! real TCP from testbed pods. Needs root.
mod common;

use std::time::Instant;

use common::*;
use kmesh_testbed::{ClientOptions, PodSpec, monotonic_ns};

const SERVER: &str = "10.244.0.2";
const C_PROD: &str = "10.244.0.3";
const C_DEV: &str = "10.244.0.4";
const P_PROD: &str = "spiffe://cluster.local/ns/prod/sa/api";

fn pods() -> Vec<PodSpec> {
    ["server", "c-prod", "c-dev", "c-out"].iter().map(|n| PodSpec::new(n, "node-a", "zone-a")).collect()
}

/// server (prod/web, listing prod/sel), c-prod (prod/api), c-dev (dev/default); c-out is not a
/// workload at all.
fn config(policies: &str) -> String {
    format!(
        "workloads:
  - {{uid: server, name: server, namespace: prod, service_account: web, addresses: [{SERVER}], authorization_policies: [prod/sel]}}
  - {{uid: c-prod, name: c-prod, namespace: prod, service_account: api, addresses: [{C_PROD}]}}
  - {{uid: c-dev, name: c-dev, namespace: dev, service_account: default, addresses: [{C_DEV}]}}
policies:
{policies}"
    )
}

fn env() -> Env {
    let mut env = Env::new(&pods());
    assert_eq!(env.pod("server").ipv4.to_string(), SERVER);
    assert_eq!(env.pod("c-prod").ipv4.to_string(), C_PROD);
    assert_eq!(env.pod("c-dev").ipv4.to_string(), C_DEV);
    env.bed.serve(env.pod("server"), &[8080, 9090], &[]).unwrap();
    env.apply(&config("  []"));
    env.enroll("server", Some("server"));
    env.enroll("c-prod", Some("c-prod"));
    env.enroll("c-dev", Some("c-dev"));
    env
}

/// One policy whose single rule has one clause with one match (YAML flow map).
fn rule(name: &str, action: &str, m: &str) -> String {
    format!(
        "  - {{name: {name}, namespace: prod, action: {action}, rules: [{{clauses: [{{matches: [{m}]}}]}}]}}\n"
    )
}

fn allow(m: &str) -> String {
    rule("a", "ALLOW", m)
}

fn deny(m: &str) -> String {
    rule("d", "DENY", m)
}

/// Connects once and tells whether the server answered; a denial must come back at once as a
/// refusal (the SYN is answered with a reset), not as a timeout.
fn reaches(env: &Env, from: &str, port: u16) -> bool {
    let t = Instant::now();
    let a = env.connect(from, &format!("{SERVER}:{port}"), 1);
    let a = &a[0];
    if a.ok {
        assert_eq!(a.server.as_deref(), Some("server"));
        return true;
    }
    assert_eq!(a.errno, Some(libc::ECONNREFUSED), "denied connections are refused: {a:?}");
    assert!(t.elapsed().as_millis() < 1000, "refusal took {:?}", t.elapsed());
    false
}

#[test]
fn policies_decide_like_istio_for_every_match_field() {
    if !root_or_skip("policies_decide_like_istio_for_every_match_field") {
        return;
    }
    let mut env = env();
    let ns = |s: &str| format!("{{namespaces: [{s}]}}");
    let cases: Vec<(&str, String, &str, u16, bool)> = vec![
        ("no policy: allowed", "  []".into(), "c-dev", 8080, true),
        ("ALLOW namespaces exact: match", allow(&ns("{exact: prod}")), "c-prod", 8080, true),
        ("ALLOW namespaces exact: other namespace denied", allow(&ns("{exact: prod}")), "c-dev", 8080, false),
        ("ALLOW namespaces: source without identity denied", allow(&ns("{exact: prod}")), "c-out", 8080, false),
        ("DENY namespaces: match denied", deny(&ns("{exact: dev}")), "c-dev", 8080, false),
        ("DENY namespaces: no match allowed", deny(&ns("{exact: dev}")), "c-prod", 8080, true),
        ("ALLOW not_namespaces: other allowed", allow("{not_namespaces: [{exact: dev}]}"), "c-prod", 8080, true),
        ("ALLOW not_namespaces: listed denied", allow("{not_namespaces: [{exact: dev}]}"), "c-dev", 8080, false),
        ("ALLOW not_namespaces: no identity satisfies it", allow("{not_namespaces: [{exact: dev}]}"), "c-out", 8080, true),
        ("ALLOW principals exact: match", allow(&format!("{{principals: [{{exact: \"{P_PROD}\"}}]}}")), "c-prod", 8080, true),
        ("ALLOW principals exact: other denied", allow(&format!("{{principals: [{{exact: \"{P_PROD}\"}}]}}")), "c-dev", 8080, false),
        ("ALLOW not_principals: listed denied", allow(&format!("{{not_principals: [{{exact: \"{P_PROD}\"}}]}}")), "c-prod", 8080, false),
        ("ALLOW not_principals: other allowed", allow(&format!("{{not_principals: [{{exact: \"{P_PROD}\"}}]}}")), "c-dev", 8080, true),
        ("ALLOW principals prefix", allow("{principals: [{prefix: \"spiffe://cluster.local/ns/dev/\"}]}"), "c-dev", 8080, true),
        ("ALLOW principals prefix: other denied", allow("{principals: [{prefix: \"spiffe://cluster.local/ns/dev/\"}]}"), "c-prod", 8080, false),
        ("ALLOW principals suffix", allow("{principals: [{suffix: /sa/api}]}"), "c-prod", 8080, true),
        ("ALLOW principals presence: any identity", allow("{principals: [{presence: {}}]}"), "c-dev", 8080, true),
        ("ALLOW principals presence: no identity denied", allow("{principals: [{presence: {}}]}"), "c-out", 8080, false),
        ("ALLOW service_accounts: match", allow("{service_accounts: [{namespace: prod, service_account: api}]}"), "c-prod", 8080, true),
        ("ALLOW service_accounts: other denied", allow("{service_accounts: [{namespace: prod, service_account: api}]}"), "c-dev", 8080, false),
        ("ALLOW not_service_accounts: listed denied", allow("{not_service_accounts: [{namespace: dev, service_account: default}]}"), "c-dev", 8080, false),
        ("ALLOW not_service_accounts: other allowed", allow("{not_service_accounts: [{namespace: dev, service_account: default}]}"), "c-prod", 8080, true),
        ("ALLOW source_ips /32: match", allow(&format!("{{source_ips: [\"{C_PROD}/32\"]}}")), "c-prod", 8080, true),
        ("ALLOW source_ips /32: other denied", allow(&format!("{{source_ips: [\"{C_PROD}/32\"]}}")), "c-dev", 8080, false),
        ("CIDR edge: last address of 10.244.0.0/30 allowed", allow("{source_ips: [\"10.244.0.0/30\"]}"), "c-prod", 8080, true),
        ("CIDR edge: first address past 10.244.0.0/30 denied", allow("{source_ips: [\"10.244.0.0/30\"]}"), "c-dev", 8080, false),
        ("ALLOW not_source_ips: listed denied", allow(&format!("{{not_source_ips: [\"{C_DEV}/32\"]}}")), "c-dev", 8080, false),
        ("ALLOW not_source_ips: unlisted pod outside the mesh allowed", allow(&format!("{{not_source_ips: [\"{C_DEV}/32\"]}}")), "c-out", 8080, true),
        ("ALLOW destination_ports: listed port", allow("{destination_ports: [8080]}"), "c-dev", 8080, true),
        ("ALLOW destination_ports: other port denied", allow("{destination_ports: [8080]}"), "c-dev", 9090, false),
        ("ALLOW not_destination_ports: listed denied", allow("{not_destination_ports: [9090]}"), "c-dev", 9090, false),
        ("ALLOW not_destination_ports: other allowed", allow("{not_destination_ports: [9090]}"), "c-dev", 8080, true),
        ("ALLOW destination_ips: own address", allow(&format!("{{destination_ips: [\"{SERVER}/32\"]}}")), "c-dev", 8080, true),
        ("ALLOW not_destination_ips: own address denied", allow(&format!("{{not_destination_ips: [\"{SERVER}/32\"]}}")), "c-dev", 8080, false),
        ("scope NAMESPACE of the server applies", "  - {name: n, namespace: prod, scope: NAMESPACE, action: DENY, rules: [{clauses: [{matches: [{}]}]}]}\n".into(), "c-prod", 8080, false),
        ("scope NAMESPACE of another namespace does not", "  - {name: n, namespace: dev, scope: NAMESPACE, action: DENY, rules: [{clauses: [{matches: [{}]}]}]}\n".into(), "c-prod", 8080, true),
        ("scope WORKLOAD_SELECTOR listed by the server applies", "  - {name: sel, namespace: prod, scope: WORKLOAD_SELECTOR, action: DENY, rules: [{clauses: [{matches: [{}]}]}]}\n".into(), "c-prod", 8080, false),
        ("scope WORKLOAD_SELECTOR not listed does not", "  - {name: other, namespace: prod, scope: WORKLOAD_SELECTOR, action: DENY, rules: [{clauses: [{matches: [{}]}]}]}\n".into(), "c-prod", 8080, true),
        ("scope GLOBAL applies everywhere", "  - {name: g, namespace: istio-system, scope: GLOBAL, action: DENY, rules: [{clauses: [{matches: [{}]}]}]}\n".into(), "c-prod", 8080, false),
        ("DENY overrides ALLOW", format!("{}{}", allow("{}"), deny(&ns("{exact: dev}"))), "c-dev", 8080, false),
        ("ALLOW and DENY: the rest allowed", format!("{}{}", allow("{}"), deny(&ns("{exact: dev}"))), "c-prod", 8080, true),
        ("dry-run DENY is never enforced", "  - {name: d, namespace: prod, action: DENY, dry_run: true, rules: [{clauses: [{matches: [{}]}]}]}\n".into(), "c-dev", 8080, true),
        ("ALLOW without rules: default deny", "  - {name: a, namespace: prod}\n".into(), "c-prod", 8080, false),
        ("all clauses of a rule must hold", "  - {name: a, namespace: prod, rules: [{clauses: [{matches: [{namespaces: [{exact: dev}]}]}, {matches: [{destination_ports: [9090]}]}]}]}\n".into(), "c-dev", 8080, false),
        ("any match of a clause is enough", allow("{namespaces: [{exact: nope}]}, {destination_ports: [8080]}"), "c-dev", 8080, true),
        ("a client outside the mesh is policed too", deny("{source_ips: [\"10.244.0.5/32\"]}"), "c-out", 8080, false),
    ];
    let mut failures = Vec::new();
    for (name, policies, from, port, expect) in &cases {
        env.apply(&config(policies));
        let got = reaches(&env, from, *port);
        if got != *expect {
            failures.push(format!(
                "{name}: {from} -> :{port} expected {}",
                if *expect { "allowed" } else { "denied" }
            ));
        }
    }
    eprintln!("{} authorization cases, {} failed", cases.len(), failures.len());
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn decisions_are_counted_and_denials_logged_by_policy() {
    if !root_or_skip("decisions_are_counted_and_denials_logged_by_policy") {
        return;
    }
    let mut env = env();
    env.apply(&config(&deny("{namespaces: [{exact: dev}]}")));
    let _ = env.mesh().observer().drain_denials();
    let denied = env.connect("c-dev", &format!("{SERVER}:8080"), 3);
    let allowed = env.connect("c-prod", &format!("{SERVER}:8080"), 2);
    assert!(denied.iter().all(|a| !a.ok) && allowed.iter().all(|a| a.ok));
    let counts = env.mesh().observer().authz_decisions();
    let get =
        |p: &str, a: &str| counts.iter().find(|(pp, aa, _)| pp == p && *aa == a).map(|c| c.2).unwrap_or(0);
    assert_eq!(get("prod/d", "deny"), 3, "{counts:?}");
    assert_eq!(get("default", "allow"), 2, "{counts:?}");
    let lines = env.mesh().observer().drain_denials();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[0].contains(&format!("src={C_DEV}:")) && lines[0].contains("(dev/c-dev)"), "{}", lines[0]);
    assert!(
        lines[0].contains(&format!("dst={SERVER}:8080 (prod/server)")) && lines[0].contains("policy=prod/d"),
        "{}",
        lines[0]
    );

    // Dry run: allowed, but reported.
    env.apply(&config("  - {name: dr, namespace: prod, action: DENY, dry_run: true, rules: [{clauses: [{matches: [{}]}]}]}\n"));
    assert!(env.connect("c-dev", &format!("{SERVER}:8080"), 1)[0].ok);
    let lines = env.mesh().observer().drain_denials();
    assert!(
        lines.iter().any(|l| l.starts_with("allowed") && l.contains("dry-run would deny (policy=prod/dr)")),
        "{lines:?}"
    );
}

#[test]
fn policy_changes_decide_the_very_next_connection() {
    if !root_or_skip("policy_changes_decide_the_very_next_connection") {
        return;
    }
    let mut env = env();
    let opts = ClientOptions { count: 100_000, duration_ms: 3000, interval_us: 500, ..Default::default() };
    let child =
        env.pod("c-dev").connect_background(format!("{SERVER}:8080").parse().unwrap(), &opts).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(800));
    let t_add_start = monotonic_ns();
    env.apply(&config(&deny("{namespaces: [{exact: dev}]}")));
    let t_add = monotonic_ns();
    std::thread::sleep(std::time::Duration::from_millis(800));
    let t_rm_start = monotonic_ns();
    env.apply(&config("  []"));
    let t_rm = monotonic_ns();
    let a = child.finish().unwrap();
    let before: Vec<_> = a.iter().filter(|x| x.start_ns < t_add_start).collect();
    let during: Vec<_> = a.iter().filter(|x| x.start_ns >= t_add && x.start_ns < t_rm_start).collect();
    let after: Vec<_> = a.iter().filter(|x| x.start_ns >= t_rm).collect();
    eprintln!(
        "{} attempts: {} before the DENY (all must pass), {} under it (all refused), {} after its removal (all pass)",
        a.len(),
        before.len(),
        during.len(),
        after.len()
    );
    assert!(before.len() > 20 && during.len() > 20 && after.len() > 20);
    assert!(before.iter().all(|x| x.ok), "{:?}", before.iter().find(|x| !x.ok));
    assert!(during.iter().all(|x| x.errno == Some(libc::ECONNREFUSED)), "{:?}", during.iter().find(|x| x.ok));
    assert!(after.iter().all(|x| x.ok), "{:?}", after.iter().find(|x| !x.ok));
}
