use super::*;
use crate::config;

const SVC: &str = "default/echo.default.svc.cluster.local";

fn model(services_yaml: &str, workloads_yaml: &str) -> Model {
    let text = format!(
        "node: {{name: node-a, locality: {{region: r1, zone: z1}}}}\nservices:\n{services_yaml}\nworkloads:\n{workloads_yaml}"
    );
    config::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn echo_service(lb: &str) -> String {
    format!(
        "  - {{name: echo, namespace: default, hostname: echo.default.svc.cluster.local, addresses: [10.96.0.10], ports: [{{service_port: 80, target_port: 8080}}], load_balancing: {lb}}}"
    )
}

fn workload(name: &str, ip: &str, zone: &str, extra: &str) -> String {
    format!(
        "  - {{uid: {name}, name: {name}, namespace: default, addresses: [{ip}], node: node-{zone}, locality: {{region: r1, zone: {zone}}}, services: {{\"{SVC}\": []}}{extra}}}"
    )
}

fn compile_fresh(m: &Model, enrolled: &BTreeMap<u64, Enrollment>) -> (MapState, Ids) {
    let mut ids = Ids::default();
    let s = compile(m, enrolled, &mut ids, &MapState::default());
    (s, ids)
}

fn no_clients() -> BTreeMap<u64, Enrollment> {
    BTreeMap::new()
}

/// Backend addresses per level of the one table with this class and family.
fn levels(s: &MapState, class_id: u32, family: u8) -> Vec<Vec<IpAddr>> {
    let (k, t) = s.tables.iter().find(|(k, _)| k.class_id == class_id && k.family == family).expect("table");
    s.table_levels(k, t)
        .into_iter()
        .map(|l| l.into_iter().map(|a| words_addr(a.expect("reachable slot"))).collect())
        .collect()
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

#[test]
fn random_service_has_one_table_with_every_healthy_endpoint() {
    let w = [
        workload("a", "10.244.0.2", "z1", ""),
        workload("b", "10.244.0.3", "z2", ""),
        workload("c", "10.244.0.4", "z2", ", status: UNHEALTHY"),
    ]
    .join("\n");
    let m = model(&echo_service("{}"), &w);
    let (s, _) = compile_fresh(&m, &no_clients());
    assert_eq!(s.frontends.len(), 1);
    let (fk, fv) = s.frontends.iter().next().unwrap();
    assert_eq!(words_addr(fk.addr), "10.96.0.10".parse::<IpAddr>().unwrap());
    assert_eq!(u16::from_be(fk.port), 80);
    assert_eq!(fk.proto, PROTO_TCP);
    assert_eq!(u16::from_be(fv.target_port), 8080);
    assert_eq!(fv.flags & FE_F_LOCALITY, 0);
    assert_eq!(s.tables.len(), 1);
    assert_eq!(levels(&s, 0, FAMILY_V4)[0], ips(&["10.244.0.2", "10.244.0.3"]));
    assert_eq!(s.endpoints.len(), 2, "the unhealthy workload gets no slot");
    assert!(s.backends.is_empty(), "a TCP service's backends need no BACKENDS entry: {:?}", s.backends);
}

#[test]
fn slots_carry_their_backends_address_and_only_udp_services_have_backends_entries() {
    let w = [workload("a", "10.244.0.2", "z1", ""), workload("b", "10.244.0.3", "z1", "")].join("\n");
    let udp = "  - {name: echo, namespace: default, hostname: echo.default.svc.cluster.local, addresses: [10.96.0.10], ports: [{service_port: 80, target_port: 8080}, {service_port: 53, target_port: 5353, protocol: UDP}]}";
    let (s, ids) = compile_fresh(&model(udp, &w), &no_clients());
    assert_eq!(s.endpoints.len(), 2);
    for (name, ip) in [("a", "10.244.0.2"), ("b", "10.244.0.3")] {
        let sid = ids.services.get(SVC).unwrap();
        let id = ids.backends.get(&(sid, name.into(), FAMILY_V4)).unwrap();
        let slot = s.endpoints.values().find(|e| e.backend_id == id).expect("a slot of the backend");
        assert_eq!(words_addr(slot.addr), ip.parse::<IpAddr>().unwrap(), "the slot's address");
        // What a UDP socket's sticky backend is checked against, with the same address.
        assert_eq!(s.backends.get(&id).map(|b| words_addr(b.addr)), Some(ip.parse().unwrap()));
    }
    // Counted ahead of a push the same way.
    let m = model(udp, &w);
    let guess = expected_peaks(&m, &MapState::default());
    assert_eq!((guess.endpoints, guess.backends), (2, 2));
    // Without the UDP port, none.
    let (tcp, _) = compile_fresh(&model(&echo_service("{}"), &w), &no_clients());
    assert!(tcp.backends.is_empty());
    assert_eq!(expected_peaks(&model(&echo_service("{}"), &w), &MapState::default()).backends, 0);
}

#[test]
fn allow_all_health_policy_keeps_unhealthy_endpoints() {
    let w = [workload("a", "10.244.0.2", "z1", ""), workload("c", "10.244.0.4", "z2", ", status: UNHEALTHY")]
        .join("\n");
    let m = model(&echo_service("{health_policy: ALLOW_ALL}"), &w);
    let (s, _) = compile_fresh(&m, &no_clients());
    assert_eq!(levels(&s, 0, FAMILY_V4)[0].len(), 2);
}

#[test]
fn failover_ranks_endpoints_by_matched_scopes_of_the_node() {
    let w = [
        workload("same-zone", "10.244.0.2", "z1", ""),
        workload("other-zone", "10.244.0.3", "z2", ""),
        "  - {uid: far, name: far, namespace: default, addresses: [10.244.0.5], locality: {region: r2, zone: z9}, services: {\"default/echo.default.svc.cluster.local\": []}}".to_string(),
    ]
    .join("\n");
    let m = model(&echo_service("{routing_preference: [REGION, ZONE], mode: FAILOVER}"), &w);
    let (s, _) = compile_fresh(&m, &no_clients());
    let l = levels(&s, 0, FAMILY_V4);
    assert_eq!(l[0], ips(&["10.244.0.2"]));
    assert_eq!(l[1], ips(&["10.244.0.3"]));
    assert_eq!(l[2], ips(&["10.244.0.5"]));
    assert_eq!(s.frontends.values().next().unwrap().flags & FE_F_LOCALITY, FE_F_LOCALITY);
    assert_eq!(s.tables.values().next().unwrap().flags & TBL_F_STRICT, 0);
}

#[test]
fn strict_keeps_only_full_matches_and_may_be_empty() {
    let w = [workload("a", "10.244.0.2", "z1", ""), workload("b", "10.244.0.3", "z2", "")].join("\n");
    let m = model(&echo_service("{routing_preference: [ZONE], mode: STRICT}"), &w);
    let (s, _) = compile_fresh(&m, &no_clients());
    let t = s.tables.values().next().unwrap();
    assert_eq!(t.flags & TBL_F_STRICT, TBL_F_STRICT);
    assert_eq!(levels(&s, 0, FAMILY_V4)[0], ips(&["10.244.0.2"]));
    assert_eq!(t.counts[1..], [0; LEVELS - 1]);

    let w = workload("b", "10.244.0.3", "z2", "");
    let m = model(&echo_service("{routing_preference: [ZONE], mode: STRICT}"), &w);
    let (s, _) = compile_fresh(&m, &no_clients());
    let t = s.tables.values().next().unwrap();
    assert_eq!(t.counts, [0; LEVELS]);
    assert_eq!(kmesh_common::pick_level(t), None);
}

#[test]
fn enrolled_clients_in_other_zones_get_their_own_tables() {
    let w = [
        workload("a", "10.244.0.2", "z1", ""),
        workload("b", "10.244.0.3", "z2", ""),
        // A client pod in zone z2 that backs no service.
        "  - {uid: client-z2, name: client, namespace: default, addresses: [10.244.0.9], node: node-z2, locality: {region: r1, zone: z2}}".to_string(),
    ]
    .join("\n");
    let m = model(&echo_service("{routing_preference: [ZONE], mode: FAILOVER}"), &w);
    let mut enrolled = BTreeMap::new();
    enrolled.insert(11, Enrollment { workload: Some("client-z2".into()) });
    enrolled.insert(12, Enrollment { workload: None });
    let (s, _) = compile_fresh(&m, &enrolled);
    let class = s.netns[&11].class_id;
    assert_ne!(class, 0);
    assert_eq!(s.netns[&12].class_id, 0, "no workload: the node's locality");
    assert_eq!(levels(&s, 0, FAMILY_V4)[0], ips(&["10.244.0.2"]));
    assert_eq!(levels(&s, class, FAMILY_V4)[0], ips(&["10.244.0.3"]));
    assert_eq!(levels(&s, class, FAMILY_V4)[1], ips(&["10.244.0.2"]));
}

#[test]
fn random_services_ignore_client_classes() {
    let w = [
        workload("a", "10.244.0.2", "z1", ""),
        "  - {uid: client-z2, name: client, namespace: default, addresses: [10.244.0.9], locality: {region: r1, zone: z2}}".to_string(),
    ]
    .join("\n");
    let m = model(&echo_service("{}"), &w);
    let mut enrolled = BTreeMap::new();
    enrolled.insert(11, Enrollment { workload: Some("client-z2".into()) });
    let (s, _) = compile_fresh(&m, &enrolled);
    assert_eq!(s.tables.len(), 1);
    assert_eq!(s.tables.keys().next().unwrap().class_id, 0);
}

#[test]
fn twenty_ports_are_twenty_frontends_over_one_table() {
    let ports: Vec<String> =
        (0..20).map(|i| format!("{{service_port: {}, target_port: {}}}", 8000 + i, 9000 + i)).collect();
    let svc = format!(
        "  - {{name: echo, namespace: default, hostname: echo.default.svc.cluster.local, addresses: [10.96.0.10], ports: [{}]}}",
        ports.join(", ")
    );
    let m = model(&svc, &workload("a", "10.244.0.2", "z1", ""));
    let (s, _) = compile_fresh(&m, &no_clients());
    assert_eq!(s.frontends.len(), 20);
    assert_eq!(s.tables.len(), 1);
    assert_eq!(s.endpoints.len(), 1);
    assert!(s.ports.is_empty());
    // connect() is told it need not look for overrides.
    assert_eq!(s.tables.values().next().unwrap().flags & TBL_F_PORTS, 0);
}

#[test]
fn per_workload_target_ports_override_only_when_they_differ() {
    let w = [
        workload("a", "10.244.0.2", "z1", "").replace("[]}", "[{service_port: 80, target_port: 8080}]}"),
        workload("b", "10.244.0.3", "z1", "").replace("[]}", "[{service_port: 80, target_port: 9999}]}"),
    ]
    .join("\n");
    let m = model(&echo_service("{}"), &w);
    let (s, ids) = compile_fresh(&m, &no_clients());
    assert_eq!(s.ports.len(), 1);
    let (k, v) = s.ports.iter().next().unwrap();
    let sid = ids.services.get(SVC).unwrap();
    let b = ids.backends.get(&(sid, "b".into(), FAMILY_V4)).unwrap();
    assert_eq!(k.backend_id, b);
    assert_eq!(u16::from_be(v.target_port), 9999);
    let t = *s.tables.values().next().unwrap();
    assert_ne!(t.flags & TBL_F_PORTS, 0, "connect() must look the override up");
    // The override goes: the flag with it, and no slot is rewritten for that (same generation).
    let w2 = w.replace("target_port: 9999", "target_port: 8080");
    let mut ids = ids;
    let s2 = compile(&model(&echo_service("{}"), &w2), &no_clients(), &mut ids, &s);
    assert!(s2.ports.is_empty());
    let t2 = *s2.tables.values().next().unwrap();
    assert_eq!(t2.flags & TBL_F_PORTS, 0);
    assert_eq!((t2.generation, t2.flags | TBL_F_PORTS), (t.generation, t.flags));
}

#[test]
fn capacities_make_a_weighted_table_with_cumulative_weights() {
    let w = [
        workload("a", "10.244.0.2", "z1", ", capacity: 1"),
        workload("b", "10.244.0.3", "z1", ", capacity: 3"),
    ]
    .join("\n");
    let m = model(&echo_service("{}"), &w);
    let (s, _) = compile_fresh(&m, &no_clients());
    let t = s.tables.values().next().unwrap();
    assert_eq!(t.flags & TBL_F_WEIGHTED, TBL_F_WEIGHTED);
    assert_eq!(t.weights[0], 4);
    let cums: Vec<u32> = s.endpoints.values().map(|e| e.cum_weight).collect();
    assert_eq!(cums, vec![1, 4]);
    // Equal capacities are plain random.
    let w = [
        workload("a", "10.244.0.2", "z1", ", capacity: 2"),
        workload("b", "10.244.0.3", "z1", ", capacity: 2"),
    ]
    .join("\n");
    let (s, _) = compile_fresh(&model(&echo_service("{}"), &w), &no_clients());
    assert_eq!(s.tables.values().next().unwrap().flags & TBL_F_WEIGHTED, 0);
}

#[test]
fn ipv6_and_dual_stack_services_get_a_table_per_family() {
    let svc = "  - {name: echo, namespace: default, hostname: echo.default.svc.cluster.local, addresses: [10.96.0.10, \"fd00:96::10\"], ports: [{service_port: 80}]}";
    let w = [
        "  - {uid: a, name: a, namespace: default, addresses: [10.244.0.2, \"fd00:244::2\"], services: {\"default/echo.default.svc.cluster.local\": []}}".to_string(),
        "  - {uid: b, name: b, namespace: default, addresses: [10.244.0.3], services: {\"default/echo.default.svc.cluster.local\": []}}".to_string(),
    ]
    .join("\n");
    let (s, _) = compile_fresh(&model(svc, &w), &no_clients());
    assert_eq!(s.frontends.len(), 2);
    assert_eq!(levels(&s, 0, FAMILY_V4)[0], ips(&["10.244.0.2", "10.244.0.3"]));
    assert_eq!(levels(&s, 0, FAMILY_V6)[0], ips(&["fd00:244::2"]));
}

#[test]
fn passthrough_services_have_no_frontends() {
    let m = model(&echo_service("{mode: PASSTHROUGH}"), &workload("a", "10.244.0.2", "z1", ""));
    let (s, _) = compile_fresh(&m, &no_clients());
    assert!(s.frontends.is_empty() && s.tables.is_empty());
}

#[test]
fn recompiling_the_same_model_changes_nothing() {
    let w = [workload("a", "10.244.0.2", "z1", ""), workload("b", "10.244.0.3", "z2", "")].join("\n");
    let m = model(&echo_service("{routing_preference: [ZONE]}"), &w);
    let mut ids = Ids::default();
    let s1 = compile(&m, &no_clients(), &mut ids, &MapState::default());
    let s2 = compile(&m, &no_clients(), &mut ids, &s1);
    assert_eq!(s1, s2);
    assert!(diff(&s1, &s2).is_empty());
}

#[test]
fn removing_a_backend_switches_the_table_to_a_new_generation() {
    let w3 = [
        workload("a", "10.244.0.2", "z1", ""),
        workload("b", "10.244.0.3", "z1", ""),
        workload("c", "10.244.0.4", "z1", ""),
    ]
    .join("\n");
    let w2 = [workload("a", "10.244.0.2", "z1", ""), workload("c", "10.244.0.4", "z1", "")].join("\n");
    let mut ids = Ids::default();
    let s1 = compile(&model(&echo_service("{}"), &w3), &no_clients(), &mut ids, &MapState::default());
    let s2 = compile(&model(&echo_service("{}"), &w2), &no_clients(), &mut ids, &s1);
    let (t1, t2) = (s1.tables.values().next().unwrap(), s2.tables.values().next().unwrap());
    assert_eq!(t2.generation, t1.generation + 1);
    assert_eq!(levels(&s2, 0, FAMILY_V4)[0], ips(&["10.244.0.2", "10.244.0.4"]));

    let d = diff(&s1, &s2);
    // The new slots and the table switch are written; the frontend is untouched.
    assert_eq!(d.set.endpoints.len(), 2);
    assert_eq!(d.set.tables.len(), 1);
    assert!(d.set.frontends.is_empty());
    // Every old slot goes, after the switch (a TCP service has no BACKENDS entries).
    assert_eq!(d.del_endpoints.len(), 3);
    assert!(d.del_backends.is_empty());
    // During the transition both generations exist.
    assert_eq!(s1.peak_counts(&s2).endpoints, 5);
}

#[test]
fn removing_a_service_deletes_its_frontends_tables_and_slots() {
    let mut ids = Ids::default();
    let w = workload("a", "10.244.0.2", "z1", "");
    let s1 = compile(&model(&echo_service("{}"), &w), &no_clients(), &mut ids, &MapState::default());
    let m2 = model("  []", &w);
    let s2 = compile(&m2, &no_clients(), &mut ids, &s1);
    assert_eq!(s2, MapState::default());
    let d = diff(&s1, &s2);
    assert_eq!(d.del_frontends.len(), 1);
    assert_eq!(d.del_tables.len(), 1);
    assert_eq!(d.del_endpoints.len(), 1);
    assert!(d.del_backends.is_empty());
    assert_eq!(ids.services.iter().count(), 0, "the service id is forgotten");
}

#[test]
fn ids_are_not_reused_right_away() {
    let mut pool: IdPool<String> = IdPool::default();
    let a = pool.get_or_alloc(&"a".to_string());
    pool.retain(&BTreeSet::new());
    let b = pool.get_or_alloc(&"b".to_string());
    assert_ne!(a, b);
    assert_eq!(pool.get_or_alloc(&"b".to_string()), b);
}

#[test]
fn address_words_round_trip() {
    for s in ["10.96.0.1", "255.255.255.255", "fd00::1", "::1", "2001:db8::ffff:1"] {
        let ip: IpAddr = s.parse().unwrap();
        assert_eq!(words_addr(addr_words(ip)), ip);
    }
}

/// Issue 18, item 4: a restarted daemon knows no names, only the maps. Compiling the same
/// model takes every id back from what the entries hold (frontends name their service, slots
/// their backends, namespaces their class) and writes nothing; a changed model writes what a
/// daemon that never stopped would write; no backend id ever goes to another address.
#[test]
fn a_restarted_compiler_takes_its_ids_back_from_the_maps() {
    let w = [
        workload("a", "10.244.0.2", "z1", ""),
        workload("b", "10.244.0.3", "z2", ""),
        workload("c", "10.244.0.4", "z2", ""),
        "  - {uid: client-z2, name: client, namespace: default, addresses: [10.244.0.9], node: node-z2, locality: {region: r1, zone: z2}}".to_string(),
    ]
    .join("\n");
    let other = "  - {name: other, namespace: default, hostname: other.default.svc.cluster.local, addresses: [10.96.0.11], ports: [{service_port: 53, target_port: 5353, protocol: UDP}]}";
    let services = format!("{}\n{other}", echo_service("{routing_preference: [ZONE], mode: FAILOVER}"));
    let m = model(&services, &w);
    let mut enrolled = BTreeMap::new();
    enrolled.insert(11, Enrollment { workload: Some("client-z2".into()) });
    // A first run that went through changes, so that ids are not simply 1, 2, 3.
    let mut live = Ids::default();
    let scratch = model(&echo_service("{}"), &workload("x", "10.244.0.7", "z1", ""));
    let s0 = compile(&scratch, &no_clients(), &mut live, &MapState::default());
    let old = compile(&m, &enrolled, &mut live, &s0);
    assert!(old.netns[&11].class_id != 0 && old.tables.len() >= 3);

    let mut ids = Ids::adopting(&old);
    let same = compile(&m, &enrolled, &mut ids, &old);
    let d = diff(&old, &same);
    assert!(d.is_empty(), "a restart on the same model writes {} and deletes {}", d.writes(), d.deletes());

    // Changed while the daemon was down: `c` gone, `d` new.
    let w2 = w.replace("uid: c, name: c", "uid: d, name: d").replace("10.244.0.4", "10.244.0.5");
    let m2 = model(&services, &w2);
    let mut continuing = live.clone();
    let want = diff(&old, &compile(&m2, &enrolled, &mut continuing, &old));
    let mut ids = Ids::adopting(&old);
    let got_state = compile(&m2, &enrolled, &mut ids, &old);
    let got = diff(&old, &got_state);
    assert_eq!((got.writes(), got.deletes()), (want.writes(), want.deletes()), "only the difference");
    let old_addrs: BTreeMap<u32, [u32; 4]> = old.endpoints.values().map(|e| (e.backend_id, e.addr)).collect();
    for e in got_state.endpoints.values() {
        if let Some(o) = old_addrs.get(&e.backend_id) {
            assert_eq!(*o, e.addr, "backend id {} was given to another address", e.backend_id);
        }
    }
    assert_consistent(&got_state);
}

/// What a map state means to a connect(): for every frontend, the backend addresses at each
/// level of the class-0 table of its family (ids and generations do not matter).
type View = BTreeMap<(IpAddr, u16, u8), (u16, u32, Vec<BTreeSet<IpAddr>>)>;

fn view(s: &MapState) -> View {
    let mut out = BTreeMap::new();
    for (fk, fv) in &s.frontends {
        let addr = words_addr(fk.addr);
        let family = if addr.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 };
        let tkey = TableKey { service_id: fv.service_id, class_id: 0, family, _pad: [0; 3] };
        let t = s.tables.get(&tkey).copied().unwrap_or_default();
        let levels = s
            .table_levels(&tkey, &t)
            .into_iter()
            .map(|l| l.into_iter().map(|a| words_addr(a.expect("reachable slot"))).collect())
            .collect();
        out.insert((addr, u16::from_be(fk.port), fk.proto), (fv.flags, t.flags, levels));
    }
    out
}

/// Every key a reader can follow exists.
fn assert_consistent(s: &MapState) {
    for fv in s.frontends.values() {
        assert!(s.tables.keys().any(|k| k.service_id == fv.service_id), "frontend without a table");
    }
    for (tk, t) in &s.tables {
        for level in s.table_levels(tk, t) {
            assert!(level.iter().all(Option::is_some), "a slot or its backend is missing");
        }
    }
}

#[test]
fn incremental_compilation_matches_a_full_one_through_random_changes() {
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let svc_key = |i: u64| format!("default/s{i}.default.svc.cluster.local");
    let mut model = Model::default();
    let mut compiler = Compiler::default();
    let mut kernel = compiler.full(&model, &BTreeMap::new(), &MapState::default());
    let mut busiest = 0;
    let mut shared_vips = 0;
    for step in 0..400 {
        let mut m = model.clone();
        match next(6) {
            // A service appears or changes.
            0 | 1 => {
                let i = next(8);
                let lb = if next(2) == 0 { "{}" } else { "{routing_preference: [ZONE], mode: FAILOVER}" };
                // VIPs from a pool of three: services share them (issue 13, item 3).
                let text = format!(
                    "services: [{{name: s{i}, namespace: default, hostname: s{i}.default.svc.cluster.local, addresses: [10.96.0.{}], ports: [{{service_port: {}, target_port: 8080}}], load_balancing: {lb}}}]",
                    next(3),
                    80 + next(3)
                );
                let s = config::parse(&text).unwrap().services.into_values().next().unwrap();
                m.services.insert(svc_key(i).into(), s);
            }
            // A service goes.
            2 => {
                m.services.remove(svc_key(next(8)).as_str());
            }
            // A workload appears, moves or changes health.
            3 | 4 => {
                let i = next(30);
                let status = if next(4) == 0 { "UNHEALTHY" } else { "HEALTHY" };
                let text = format!(
                    "workloads: [{{uid: w{i}, name: w{i}, namespace: default, addresses: [10.244.1.{}], status: {status}, locality: {{zone: z{}}}, services: {{\"{}\": [], \"{}\": []}}}}]",
                    next(12) + 1,
                    next(2),
                    svc_key(next(8)),
                    svc_key(next(8))
                );
                let w = config::parse(&text).unwrap().workloads.into_values().next().unwrap();
                m.workloads.insert(w.uid.clone(), w);
            }
            // A workload goes.
            _ => {
                m.workloads.remove(format!("w{}", next(30)).as_str());
            }
        }
        // The change as a source hands it over: the keys it touched, and what they held.
        let keys = kmesh_model::delta::ModelKeys::between(&model, &m);
        let mut now = model.clone();
        let change = now.take_from(&m, &keys);
        assert_eq!(now, m);
        let d = compiler.incremental(&now, &change, &kernel).expect("no node or client change");
        kernel.apply(d);
        assert_consistent(&kernel);
        assert_eq!(kernel, compiler.state_with(&kernel), "step {step}: bookkeeping drifted");
        let mut ids = Ids::default();
        let fresh = compile(&m, &BTreeMap::new(), &mut ids, &MapState::default());
        assert_eq!(
            view(&kernel),
            view(&fresh),
            "step {step}: incremental result differs from a full compile"
        );
        // Conflicts are kept in step, not recomputed: they must equal a fresh compiler's.
        let mut fresh_compiler = Compiler::default();
        fresh_compiler.full(&m, &BTreeMap::new(), &MapState::default());
        assert_eq!(compiler.conflicts(), fresh_compiler.conflicts(), "step {step}: conflicts drifted");
        busiest = busiest.max(kernel.endpoints.len());
        if !compiler.conflicts().is_empty() {
            shared_vips += 1;
            // The owner is the service whose key sorts first.
            for c in compiler.conflicts() {
                assert!(c.ignored.iter().all(|i| *i > c.owner), "{c:?}");
            }
        }
        model = m;
    }
    assert!(busiest >= 6, "the random walk never built a real mesh (max {busiest} slots)");
    assert!(shared_vips > 20, "the random walk rarely shared a VIP ({shared_vips} steps)");
    // Ids of everything removed were given back: every backend id still held belongs to a
    // workload that still lists a service that still exists.
    assert_eq!(compiler.ids.services.iter().count(), model.services.len());
    let sids: BTreeMap<u32, &Istr> = compiler.ids.services.iter().map(|(k, v)| (*v, k)).collect();
    for ((sid, uid, family), _) in compiler.ids.backends.iter() {
        let key = sids.get(sid).expect("backend id of a removed service");
        let w = model.workloads.get(uid).expect("backend id of a removed workload");
        assert!(
            w.services.contains_key(key.as_str()) && w.addresses.iter().any(|a| family_of(a) == *family),
            "stale backend id {uid} family {family}"
        );
    }
}

/// What a connect() could follow in `s` and fail to find: every frontend's tables (for the
/// node class and each enrolled client class), every slot of each table's generation, each
/// slot's backend, and the check of every value against its key.
fn unreachable_keys(s: &MapState) -> Vec<String> {
    let mut missing = Vec::new();
    let mut classes: BTreeSet<u32> = s.netns.values().map(|v| v.class_id).collect();
    classes.insert(0);
    for (fk, fv) in &s.frontends {
        let family = if words_addr(fk.addr).is_ipv4() { FAMILY_V4 } else { FAMILY_V6 };
        let wanted: Vec<u32> =
            if fv.flags & FE_F_LOCALITY != 0 { classes.iter().copied().collect() } else { vec![0] };
        for class_id in wanted {
            let tk = TableKey { service_id: fv.service_id, class_id, family, _pad: [0; 3] };
            let Some(t) = s.tables.get(&tk) else {
                missing.push(format!("table {tk:?} of frontend {fk:?}"));
                continue;
            };
            for level in 0..LEVELS {
                for index in 0..t.counts[level] {
                    let ek = slot_key(&tk, t.generation, level as u8, index);
                    match s.endpoints.get(&ek) {
                        None => missing.push(format!("slot {ek:?}")),
                        // A UDP socket's sticky backend is checked against `BACKENDS`.
                        Some(e) if fk.proto == PROTO_UDP && !s.backends.contains_key(&e.backend_id) => {
                            missing.push(format!("backend {} of slot {ek:?}", e.backend_id))
                        }
                        Some(_) => {}
                    }
                }
            }
        }
    }
    for (k, v) in &s.frontends {
        if !v.belongs_to(k) {
            missing.push(format!("check of frontend {k:?}"));
        }
    }
    missing
}

/// Issue 13, item 9: a diff written one key at a time, in the order the kernel side writes it
/// (sets leaves first, deletions roots first), never leaves a reachable key missing in
/// between. Checked after every single write, through a series of changes that add, remove
/// and reweigh endpoints, change the client classes, and remove the service.
#[test]
fn every_intermediate_state_of_an_apply_has_every_reachable_key() {
    let ws = |names: &[(&str, &str, &str)]| -> String {
        names
            .iter()
            .map(|(n, ip, extra)| workload(n, ip, if *n == "c" { "z2" } else { "z1" }, extra))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let locality = "{routing_preference: [REGION, ZONE], mode: FAILOVER}";
    let steps: Vec<(Model, BTreeMap<u64, Enrollment>)> = vec![
        (model(&echo_service("{}"), &ws(&[("a", "10.244.0.2", ""), ("b", "10.244.0.3", "")])), no_clients()),
        (model(&echo_service("{}"), &ws(&[("a", "10.244.0.2", ""), ("c", "10.244.0.4", "")])), no_clients()),
        (
            model(&echo_service(locality), &ws(&[("a", "10.244.0.2", ""), ("c", "10.244.0.4", "")])),
            no_clients(),
        ),
        (
            model(
                &echo_service(locality),
                &ws(&[("a", "10.244.0.2", ", capacity: 3"), ("c", "10.244.0.4", "")]),
            ),
            [(7u64, Enrollment { workload: Some("c".into()) })].into_iter().collect(),
        ),
        (model(&echo_service("{}"), &ws(&[("b", "10.244.0.3", "")])), no_clients()),
        (model("  []", &ws(&[("b", "10.244.0.3", "")])), no_clients()),
    ];
    let mut ids = Ids::default();
    let mut prev = MapState::default();
    let mut writes = 0;
    for (step, (m, enrolled)) in steps.iter().enumerate() {
        let next = compile(m, enrolled, &mut ids, &prev);
        let d = diff(&prev, &next);
        let mut s = prev.clone();
        let mut check = |s: &MapState, what: &str| {
            writes += 1;
            let missing = unreachable_keys(s);
            assert!(missing.is_empty(), "step {step}, after {what}: unreachable {missing:?}");
        };
        macro_rules! sets {
            ($($f:ident),*) => {$(
                for (k, v) in &d.set.$f {
                    s.$f.insert(*k, *v);
                    check(&s, concat!("writing ", stringify!($f)));
                }
            )*};
        }
        sets!(backends, ports, endpoints, tables, frontends, netns);
        macro_rules! dels {
            ($($f:ident: $d:ident),*) => {$(
                for k in &d.$d {
                    s.$f.remove(k);
                    check(&s, concat!("deleting from ", stringify!($f)));
                }
            )*};
        }
        dels!(netns: del_netns, frontends: del_frontends, tables: del_tables, endpoints: del_endpoints, ports: del_ports, backends: del_backends);
        assert_eq!(s, next, "step {step}: the writes end at the compiled state");
        prev = next;
    }
    assert!(writes > 20, "only {writes} writes checked");
}

/// Issue 13, item 8: an enrollment into a locality class that already has tables writes one
/// NETNS entry and nothing else, and ends where a full compilation would; a new class or a
/// class left unused takes the full path.
#[test]
fn an_enrollment_into_an_existing_class_writes_only_its_namespace() {
    let client = |uid: &str, zone: &str| {
        format!(
            "  - {{uid: {uid}, name: {uid}, namespace: default, addresses: [10.244.9.{}], locality: {{region: r1, zone: {zone}}}}}",
            uid.len()
        )
    };
    let w = [
        workload("a", "10.244.0.2", "z1", ""),
        workload("b", "10.244.0.3", "z2", ""),
        client("c2", "z2"),
        client("cc2", "z2"),
        client("ccc3", "z3"),
    ]
    .join("\n");
    let m = model(&echo_service("{routing_preference: [ZONE], mode: FAILOVER}"), &w);
    let e = |list: &[(u64, Option<&str>)]| -> BTreeMap<u64, Enrollment> {
        list.iter().map(|(c, w)| (*c, Enrollment { workload: w.map(String::from) })).collect()
    };
    let mut compiler = Compiler::default();
    let e1 = e(&[(1, Some("c2"))]);
    let mut kernel = compiler.full(&m, &e1, &MapState::default());

    // Same zone as c2, and a pod without a workload (the node's class): NETNS only.
    let e2 = e(&[(1, Some("c2")), (2, Some("cc2")), (3, None)]);
    let d = compiler.enrollment(&m, &e1, &e2).expect("existing classes");
    assert_eq!((d.set.netns.len(), d.writes(), d.deletes()), (2, 2, 0), "{d:?}");
    kernel.apply(d);
    let full = Compiler::default().full(&m, &e2, &kernel);
    assert_eq!(view(&kernel), view(&full));
    assert_eq!(kernel.netns.values().map(|v| v.class_id).collect::<BTreeSet<_>>().len(), 2);

    // Leaving, while its class stays in use: NETNS only.
    let e3 = e(&[(1, Some("c2")), (3, None)]);
    let d = compiler.enrollment(&m, &e2, &e3).expect("class still in use");
    assert_eq!((d.writes(), d.deletes()), (0, 1));
    kernel.apply(d);
    assert_eq!(kernel.netns.len(), 2);

    // A zone with no tables yet, or the last client of a class leaving: full compilation.
    assert!(compiler.enrollment(&m, &e3, &e(&[(1, Some("c2")), (3, None), (4, Some("ccc3"))])).is_none());
    assert!(compiler.enrollment(&m, &e3, &e(&[(3, None)])).is_none());
}

// ---------------------------------------------------------------------------------------------
// Waypoints.
// ---------------------------------------------------------------------------------------------

const WP: &str = "default/wp.default.svc.cluster.local";

/// echo (VIP 10.96.0.10:80) naming `waypoint`; the waypoint service wp (VIP 10.96.0.99) backed
/// by wp-1 (PROXY on 15088) and wp-2 (no application tunnel: HBONE only); one echo endpoint.
fn waypoint_model(waypoint: &str, extra_workloads: &str) -> Model {
    let services = format!(
        "  - {{name: echo, namespace: default, hostname: echo.default.svc.cluster.local, addresses: [10.96.0.10], ports: [{{service_port: 80, target_port: 8080}}, {{service_port: 53, protocol: UDP}}], {waypoint}}}
  - {{name: wp, namespace: default, hostname: wp.default.svc.cluster.local, addresses: [10.96.0.99], ports: [{{service_port: 15021}}]}}"
    );
    let w = [
        workload("a", "10.244.0.2", "z1", ""),
        format!(
            "  - {{uid: wp-1, name: wp-1, namespace: default, addresses: [10.244.0.50], services: {{\"{WP}\": []}}, application_tunnel: {{protocol: PROXY, port: 15088}}}}"
        ),
        format!("  - {{uid: wp-2, name: wp-2, namespace: default, addresses: [10.244.0.51], services: {{\"{WP}\": []}}}}"),
        extra_workloads.to_string(),
    ]
    .join("\n");
    model(&services, &w)
}

/// The frontend of echo:80/TCP and the backends (with PROXY ports) its waypoint table leads to.
fn waypoint_route(s: &MapState, port: u16, proto: u8) -> (FrontendValue, Vec<(IpAddr, u16)>) {
    let (_, fv) = s
        .frontends
        .iter()
        .find(|(k, _)| {
            words_addr(k.addr) == "10.96.0.10".parse::<IpAddr>().unwrap()
                && u16::from_be(k.port) == port
                && k.proto == proto
        })
        .expect("frontend");
    let tk = TableKey { service_id: fv.waypoint_id, class_id: 0, family: FAMILY_V4, _pad: [0; 3] };
    let Some(t) = s.tables.get(&tk) else { return (*fv, vec![]) };
    assert_ne!(
        t.flags & TBL_F_WAYPOINT,
        0,
        "a waypoint table says so (its empty form refuses with ENETUNREACH)"
    );
    let mut out = Vec::new();
    for index in 0..t.counts[0] {
        let e = s.endpoints[&slot_key(&tk, t.generation, 0, index)];
        let pk = PortKey {
            service_id: fv.waypoint_id,
            backend_id: e.backend_id,
            service_port: port.to_be(),
            _pad: 0,
        };
        out.push((words_addr(e.addr), s.ports.get(&pk).map(|p| u16::from_be(p.target_port)).unwrap_or(0)));
    }
    (*fv, out)
}

#[test]
fn a_service_with_a_waypoint_sends_its_tcp_ports_to_the_waypoints_proxy_port() {
    for waypoint in [
        "waypoint: {hostname: {namespace: default, hostname: wp.default.svc.cluster.local}}",
        "waypoint: {address: 10.96.0.99}",
    ] {
        let m = waypoint_model(waypoint, "");
        let (s, _) = compile_fresh(&m, &no_clients());
        let (fv, route) = waypoint_route(&s, 80, PROTO_TCP);
        assert_ne!(fv.waypoint_id, 0, "{waypoint}");
        assert_ne!(fv.waypoint_id, fv.service_id);
        // Only wp-1 takes PROXY protocol; wp-2 (HBONE only) cannot be told the destination.
        assert_eq!(route, vec![("10.244.0.50".parse().unwrap(), 15088)], "{waypoint}");
        // The service's own table is still there, for the waypoint's own connections.
        assert_eq!(levels(&s, 0, FAMILY_V4)[0], ips(&["10.244.0.2"]));
        // Waypoints take TCP: the UDP port goes direct.
        assert_eq!(waypoint_route(&s, 53, PROTO_UDP).0.waypoint_id, 0);
        assert_consistent(&s);
    }
}

#[test]
fn a_waypoint_without_usable_endpoints_gets_an_empty_table_that_refuses() {
    let m = waypoint_model(
        "waypoint: {hostname: {namespace: default, hostname: nowhere.default.svc.cluster.local}}",
        "",
    );
    let (s, _) = compile_fresh(&m, &no_clients());
    let (fv, route) = waypoint_route(&s, 80, PROTO_TCP);
    assert_ne!(fv.waypoint_id, 0);
    assert!(route.is_empty());
    let t = s.tables.iter().find(|(k, _)| k.service_id == fv.waypoint_id).expect("an empty waypoint table").1;
    assert_eq!(pick_level(t), None);
    assert_ne!(t.flags & TBL_F_WAYPOINT, 0);
}

#[test]
fn weighted_waypoints_split_connections_by_weight_whatever_their_sizes() {
    let extra = "  - {uid: wp-3, name: wp-3, namespace: default, addresses: [10.244.0.52], application_tunnel: {protocol: PROXY}}";
    let m = waypoint_model(
        "weighted_waypoints: [{destination: {address: 10.96.0.99}, weight: 1}, {destination: {address: 10.244.0.52}, weight: 3}]",
        extra,
    );
    let (s, _) = compile_fresh(&m, &no_clients());
    let (fv, route) = waypoint_route(&s, 80, PROTO_TCP);
    // wp-3 (given by its own address) takes PROXY on the port dialled: no port entry.
    assert_eq!(route, vec![("10.244.0.50".parse().unwrap(), 15088), ("10.244.0.52".parse().unwrap(), 0)]);
    let tk = TableKey { service_id: fv.waypoint_id, class_id: 0, family: FAMILY_V4, _pad: [0; 3] };
    let t = s.tables[&tk];
    assert_ne!(t.flags & TBL_F_WEIGHTED, 0);
    let first = s.endpoints[&slot_key(&tk, t.generation, 0, 0)].cum_weight;
    assert_eq!((first, t.weights[0] - first), (1000, 3000), "1:3 as weighted");
}

#[test]
fn a_waypoints_own_namespace_is_flagged_so_its_connections_go_direct() {
    let m = waypoint_model("waypoint: {address: 10.96.0.99}", "");
    let enrolled = BTreeMap::from([
        (7u64, Enrollment { workload: Some("wp-1".into()) }),
        (8u64, Enrollment { workload: Some("a".into()) }),
    ]);
    let (s, _) = compile_fresh(&m, &enrolled);
    assert_eq!(s.netns[&7].flags, NS_F_WAYPOINT);
    assert_eq!(s.netns[&8].flags, 0);
    assert!(s.netns[&7].belongs_to(&7));
}

#[test]
fn a_workload_with_a_waypoint_sends_every_tcp_port_of_its_address_through_it() {
    let extra = "  - {uid: pod, name: pod, namespace: default, addresses: [10.244.0.77], waypoint: {address: 10.96.0.99}}";
    let m = waypoint_model("", extra);
    let (s, _) = compile_fresh(&m, &no_clients());
    let fk = FrontendKey {
        addr: addr_words("10.244.0.77".parse().unwrap()),
        port: PORT_ANY,
        proto: PROTO_TCP,
        _pad: 0,
    };
    let fv = s.frontends[&fk];
    assert_eq!(fv.service_id, 0, "no service behind a workload's own address");
    let tk = TableKey { service_id: fv.waypoint_id, class_id: 0, family: FAMILY_V4, _pad: [0; 3] };
    let t = s.tables[&tk];
    let e = s.endpoints[&slot_key(&tk, t.generation, 0, 0)];
    let pk =
        PortKey { service_id: fv.waypoint_id, backend_id: e.backend_id, service_port: PORT_ANY, _pad: 0 };
    assert_eq!(u16::from_be(s.ports[&pk].target_port), 15088);
}

#[test]
fn waypoint_changes_recompile_incrementally_to_what_a_full_compile_gives() {
    let base = waypoint_model("waypoint: {address: 10.96.0.99}", "");
    // wp-9, enrolled before it exists, becomes a waypoint endpoint and stops being one.
    let enrolled = BTreeMap::from([
        (9u64, Enrollment { workload: Some("a".into()) }),
        (10u64, Enrollment { workload: Some("wp-9".into()) }),
    ]);
    let mut compiler = Compiler::default();
    let mut kernel = compiler.full(&base, &enrolled, &MapState::default());
    let mut model = base.clone();
    let mut flags = Vec::new();
    type Step = Box<dyn Fn(&mut Model)>;
    let steps: Vec<Step> = vec![
        // A second waypoint pod that takes PROXY appears.
        Box::new(|m: &mut Model| {
            let mut w = (*m.workloads["wp-1"]).clone();
            w.uid = "wp-9".into();
            w.addresses = Addrs::One("10.244.0.59".parse().unwrap());
            m.workloads.insert("wp-9".into(), Arc::new(w));
        }),
        // wp-1 turns unhealthy.
        Box::new(|m: &mut Model| {
            let mut w = (*m.workloads["wp-1"]).clone();
            w.status = HealthStatus::Unhealthy;
            m.workloads.insert("wp-1".into(), Arc::new(w));
        }),
        // The waypoint service moves to another VIP: the address no longer resolves.
        Box::new(|m: &mut Model| {
            let mut s = (*m.services[WP]).clone();
            s.addresses = vec!["10.96.0.98".parse().unwrap()].into();
            m.services.insert(WP.into(), Arc::new(s));
        }),
        // ... and comes back.
        Box::new(|m: &mut Model| {
            let mut s = (*m.services[WP]).clone();
            s.addresses = vec!["10.96.0.99".parse().unwrap()].into();
            m.services.insert(WP.into(), Arc::new(s));
        }),
        // echo drops its waypoint.
        Box::new(|m: &mut Model| {
            let mut s = (*m.services[SVC]).clone();
            s.waypoint = None;
            m.services.insert(SVC.into(), Arc::new(s));
        }),
    ];
    for (i, step) in steps.iter().enumerate() {
        let mut m = model.clone();
        step(&mut m);
        let keys = kmesh_model::delta::ModelKeys::between(&model, &m);
        let mut now = model.clone();
        let change = now.take_from(&m, &keys);
        // A change of an enrolled workload (wp-9's) is compiled whole, as the mesh does.
        let d = match compiler.incremental(&now, &change, &kernel) {
            Some(d) => d,
            None => diff(&kernel, &compiler.full(&now, &enrolled, &kernel)),
        };
        kernel.apply(d);
        assert_eq!(kernel, compiler.state_with(&kernel), "step {i}: bookkeeping drifted");
        let fresh = Compiler::default().full(&m, &enrolled, &MapState::default());
        assert_eq!(kernel.netns, fresh.netns, "step {i}: the waypoint flag drifted");
        flags.push(kernel.netns[&10].flags);
        assert_eq!(
            waypoint_route(&kernel, 80, PROTO_TCP).1,
            waypoint_route(&fresh, 80, PROTO_TCP).1,
            "step {i}: incremental route differs from a full compile"
        );
        assert_eq!(view(&kernel), view(&fresh), "step {i}");
        assert_consistent(&kernel);
        model = m;
    }
    assert_eq!(flags, [NS_F_WAYPOINT, NS_F_WAYPOINT, 0, NS_F_WAYPOINT, 0]);
    // Nothing of the route is left once echo has no waypoint.
    assert_eq!(waypoint_route(&kernel, 80, PROTO_TCP).0.waypoint_id, 0);
    assert!(!compiler.ids.services.iter().any(|(k, _)| k.ends_with("#waypoint")));
    assert_eq!(kernel.tables.len(), 2, "echo's and wp's own tables only");
}

#[test]
fn a_restarted_compiler_rewrites_nothing_of_waypoint_routes() {
    let extra = "  - {uid: pod, name: pod, namespace: default, addresses: [10.244.0.77], waypoint: {address: 10.96.0.99}}";
    let m = waypoint_model(
        "weighted_waypoints: [{destination: {address: 10.96.0.99}, weight: 1}, {destination: {address: 10.244.0.51}, weight: 1}]",
        extra,
    );
    let enrolled = BTreeMap::from([(7u64, Enrollment { workload: Some("wp-1".into()) })]);
    let state = Compiler::default().full(&m, &enrolled, &MapState::default());
    let mut restarted = Compiler::with_ids(Ids::adopting(&state));
    let again = restarted.full(&m, &enrolled, &state);
    assert!(diff(&state, &again).is_empty(), "a restart on an unchanged model writes nothing");
}

/// Outlier ejection: an ejected address leaves every table it is in when its workloads are
/// recompiled, and comes back when the ejection ends.
#[test]
fn an_ejected_address_leaves_its_tables_incrementally() {
    let w = [workload("a", "10.244.0.2", "z1", ""), workload("b", "10.244.0.3", "z1", "")].join("\n");
    let m = model(&echo_service("{}"), &w);
    let mut c = Compiler { eject_everywhere: true, ..Default::default() };
    let s0 = c.full(&m, &no_clients(), &MapState::default());
    let mut state = s0.clone();
    let change = |uids: &[&str]| kmesh_model::delta::ModelChange {
        workloads: uids.iter().map(|u| (Istr::from(*u), Some(m.workloads[*u].clone()))).collect(),
        ..Default::default()
    };
    c.ejected.insert("10.244.0.3".parse().unwrap());
    let d = c.incremental(&m, &change(&["b"]), &state).expect("incremental");
    state.apply(d);
    assert_eq!(levels(&state, 0, FAMILY_V4)[0], ips(&["10.244.0.2"]));
    c.ejected.clear();
    let d = c.incremental(&m, &change(&["b"]), &state).expect("incremental");
    state.apply(d);
    assert_eq!(levels(&state, 0, FAMILY_V4)[0], ips(&["10.244.0.2", "10.244.0.3"]));
}

#[test]
fn the_guess_of_a_full_compilations_peaks_matches_a_plain_mesh_and_never_goes_below_what_is_held() {
    // Random load balancing, one address and port, no client classes: the guess is exact.
    let w = (0..20)
        .map(|i| workload(&format!("w{i}"), &format!("10.244.0.{}", i + 2), "z1", ""))
        .collect::<Vec<_>>();
    let m = model(&echo_service("{}"), &w.join("\n"));
    let (s, _) = compile_fresh(&m, &no_clients());
    let guess = expected_peaks(&m, &MapState::default());
    assert_eq!(
        (guess.frontends, guess.tables, guess.endpoints, guess.backends),
        (s.frontends.len(), s.tables.len(), s.endpoints.len(), s.backends.len())
    );
    // Against what the maps hold, the guess is at least that (the peak holds both).
    let small = model(&echo_service("{}"), &w[..2].join("\n"));
    let held = expected_peaks(&small, &s);
    assert_eq!((held.endpoints, held.backends, held.frontends), (20, 0, 1));
}
