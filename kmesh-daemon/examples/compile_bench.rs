//! Times the compiler and the diff on a large model (no root needed).
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use kmesh_daemon::compile::{Ids, MapState, compile, diff};
use kmesh_daemon::model::*;

fn main() {
    let (n, m) = (10_000usize, 10usize);
    let mut model = Model::default();
    for s in 0..n {
        let key = format!("bench/svc-{s}.bench.svc.cluster.local");
        model.services.insert(
            kmesh_daemon::model::Istr::new(&key),
            Arc::new(Service {
                name: format!("svc-{s}").into(),
                namespace: "bench".into(),
                hostname: format!("svc-{s}.bench.svc.cluster.local").into(),
                addresses: kmesh_daemon::model::Addrs::One(IpAddr::V4(Ipv4Addr::from(
                    0x0a60_0000u32 + s as u32 + 1,
                ))),
                ports: vec![ServicePort { service_port: 80, target_port: 8080, protocol: Protocol::Tcp }]
                    .into(),
                load_balancing: LoadBalancing::default(),
                ..Default::default()
            }),
        );
        for e in 0..m {
            let mut services = BTreeMap::new();
            services.insert(kmesh_daemon::model::Istr::new(&key), vec![]);
            let uid = kmesh_daemon::model::Istr::unique(&format!("w-{s}-{e}"));
            model.workloads.insert(
                uid.clone(),
                Arc::new(Workload {
                    uid,
                    name: Default::default(),
                    profile: WorkloadProfile { namespace: "bench".into(), ..Default::default() }.into(),
                    addresses: kmesh_daemon::model::Addrs::One(IpAddr::V4(Ipv4Addr::from(
                        0x0a80_0000u32 + (s * m + e) as u32 + 1,
                    ))),
                    status: HealthStatus::Healthy,
                    services: services.into_iter().collect(),
                    ..Default::default()
                }),
            );
        }
    }
    let enrolled = BTreeMap::new();
    let mut ids = Ids::default();
    let t = Instant::now();
    let s1 = compile(&model, &enrolled, &mut ids, &MapState::default());
    println!("full compile: {:?}", t.elapsed());
    model.workloads.remove("w-5000-0");
    let t = Instant::now();
    let mut ids2 = ids.clone();
    println!("ids clone: {:?}", t.elapsed());
    let t = Instant::now();
    let m2 = model.clone();
    println!("model clone: {:?}", t.elapsed());
    let t = Instant::now();
    let s2 = compile(&m2, &enrolled, &mut ids2, &s1);
    println!("recompile after one change: {:?}", t.elapsed());
    let t = Instant::now();
    let d = diff(&s1, &s2);
    println!("diff: {:?} ({} writes, {} deletes)", t.elapsed(), d.writes(), d.deletes());
    let t = Instant::now();
    let _p = s1.peak_counts(&s2);
    println!("peak counts: {:?}", t.elapsed());
}
