//! Telemetry overhead benchmark (not a test): connection set-up rate and latency between two
//! enrolled pods through a service VIP, with connection telemetry off, on with the default
//! families and access log, and on with per-connection series too (drained and turned into
//! metrics and access-log lines as the daemon does), in interleaved rounds. Needs root.
//!
//!   cargo build --release --bins --examples && target/release/examples/telemetry_bench [connections] [rounds]
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kmesh_daemon::config;
use kmesh_daemon::kernel::{self, Dataplane, LoadOptions};
use kmesh_daemon::mesh::Mesh;
use kmesh_daemon::netns;
use kmesh_daemon::telemetry::Monitoring;
use kmesh_testbed::{ClientOptions, PodSpec, Testbed, parse_attempts};

struct Round {
    rate: f64,
    p50: u64,
    p99: u64,
    drain_ms: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let n: u32 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(3000);
    let rounds: usize = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(6);
    let mut bed = Testbed::new()?;
    let client = bed.add_pod(PodSpec::new("client", "node-a", "zone-a"))?;
    let server = bed.add_pod(PodSpec::new("server", "node-a", "zone-a"))?;
    bed.serve(&server, &[8080], &[])?;
    client.for_many_short_connections()?;
    let pins = PathBuf::from(format!("/sys/fs/bpf/kmesh-telemetry-bench-{}", std::process::id()));
    let dp = Dataplane::load(&LoadOptions::new(bed.cgroup().to_owned(), pins.clone()))?;
    let mesh = Arc::new(Mutex::new(Mesh::new(dp)));
    let yaml = format!(
        "services:\n  - {{name: web, namespace: bench, hostname: web.bench.svc.cluster.local, addresses: [10.96.0.20], ports: [{{service_port: 80, target_port: 8080}}]}}\nworkloads:\n  - {{uid: client, name: client, namespace: bench, service_account: load, addresses: [{}]}}\n  - {{uid: server, name: server, namespace: bench, service_account: web, addresses: [{}], services: {{\"bench/web.bench.svc.cluster.local\": []}}}}\n",
        client.ipv4, server.ipv4
    );
    {
        let mut m = mesh.lock().unwrap();
        m.set_model(config::parse(&yaml)?)?;
        for p in [&client, &server] {
            m.enroll(netns::cookie_of(&p.netns_path())?, Some(&p.netns_path()), Some(p.spec.name.clone()))?;
        }
    }
    // The daemon drains every 200 ms; so does this.
    let stop = Arc::new(AtomicBool::new(false));
    let drain_ns = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let drainer = {
        let (mesh, stop, drain_ns) = (mesh.clone(), stop.clone(), drain_ns.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let lines = mesh.lock().unwrap().observer().drain_telemetry();
                std::hint::black_box(lines);
                drain_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let target: SocketAddr = "10.96.0.20:80".parse()?;
    let run = || -> anyhow::Result<Round> {
        let before = drain_ns.load(Ordering::Relaxed);
        let mut c = client.connect_command(target, &ClientOptions { count: n, ..Default::default() })?;
        let t = Instant::now();
        let out = c.output()?;
        let secs = t.elapsed().as_secs_f64();
        // Let the last events be drained before the next round.
        std::thread::sleep(Duration::from_millis(300));
        let a = parse_attempts(&String::from_utf8_lossy(&out.stdout))?;
        anyhow::ensure!(a.iter().all(|x| x.ok), "a connection failed");
        let mut lat: Vec<u64> = a.iter().map(|x| x.elapsed_us).collect();
        lat.sort_unstable();
        let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q) as usize];
        Ok(Round {
            rate: a.len() as f64 / secs,
            p50: p(0.5),
            p99: p(0.99),
            drain_ms: (drain_ns.load(Ordering::Relaxed) - before) as f64 / 1e6,
        })
    };
    let set = |mode: usize| -> anyhow::Result<()> {
        let m = match mode {
            0 => Monitoring {
                access_log: false,
                service_metrics: false,
                workload_metrics: false,
                connection_metrics: false,
                ..Default::default()
            },
            1 => Monitoring::default(),
            2 => Monitoring { connection_metrics: true, ..Default::default() },
            _ => Monitoring { access_log: false, ..Default::default() },
        };
        mesh.lock().unwrap().observer().set_monitoring(m, None)?;
        Ok(())
    };
    let _ = run()?; // warm-up
    const MODES: [&str; 4] = [
        "off",
        "on: service + workload metrics, access log (the defaults)",
        "on: defaults + per-connection series",
        "on: service + workload metrics, no access log (short connections summed in the kernel)",
    ];
    let mut results: [Vec<Round>; 4] = Default::default();
    for _ in 0..rounds {
        for (i, r) in results.iter_mut().enumerate() {
            set(i)?;
            r.push(run()?);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = drainer.join();
    let (events, summed) = {
        let m = mesh.lock().unwrap();
        let t = &m.observer().telemetry;
        (t.events, t.tallied)
    };
    println!(
        "{n} connections per round, {rounds} interleaved rounds per mode, medians; client and server pods both enrolled"
    );
    println!("| telemetry | connections/s | p50 us | p99 us | daemon drain CPU per 10k connections |");
    println!("|---|---|---|---|---|");
    for (i, label) in MODES.into_iter().enumerate() {
        let r = &results[i];
        println!(
            "| {label} | {:.0} | {:.0} | {:.0} | {:.1} ms |",
            median(r.iter().map(|x| x.rate).collect()),
            median(r.iter().map(|x| x.p50 as f64).collect()),
            median(r.iter().map(|x| x.p99 as f64).collect()),
            median(r.iter().map(|x| x.drain_ms * 10_000.0 / f64::from(n)).collect()),
        );
    }
    println!("({events} events drained in all, {summed} connections summed in the kernel)");
    drop(mesh);
    kernel::uninstall(&pins)?;
    Ok(())
}
