//! Control-plane scale benchmark (not a test): the real daemon binary against the in-repo delta
//! ADS server on loopback. Prints, for N services with M endpoints each (default 10,000 x 10):
//! the time from the push to every map written, the time for one endpoint change to reach the
//! kernel, and the daemon's peak RSS and CPU seconds.
//!
//! With POLICED_PERCENT > 0, one ALLOW policy selects the workloads of that share of the
//! services (the authorization maps then hold their destinations and every workload's identity).
//!
//!   cargo build --release --bins --examples && target/release/examples/xds_bench [N] [M] [CHURN_SECS] [POLICED_PERCENT]
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kmesh_daemon::admin;
use kmesh_daemon::model::*;
use kmesh_model::xds::{AddressResource, encode_address};
use kmesh_proto::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use kmesh_testbed::{Testbed, with_default_signals};
use kmesh_xds_server::ControlPlane;

fn metric(admin_addr: SocketAddr, name: &str) -> f64 {
    admin::request(admin_addr, "GET", "/metrics", None)
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())))
        .unwrap_or(-1.0)
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return Ok(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    bail!("timed out waiting for {what}")
}

/// Memory fields of /proc/PID/status (`VmRSS`, `VmHWM`, `RssAnon`, ...), in MiB.
fn status_mib<const N: usize>(pid: u32, fields: [&str; N]) -> [f64; N] {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    fields.map(|f| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(f)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    })
}

/// (peak RSS in MiB, CPU seconds) of a process.
fn usage(pid: u32) -> (f64, f64) {
    let [hwm] = status_mib(pid, ["VmHWM"]);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (hwm, ticks / hz)
}

/// Whether service `svc`'s workloads are selected by the benchmark's policy.
fn policed(svc: usize) -> bool {
    // Read once: this runs for every workload built.
    static PCT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let pct = *PCT
        .get_or_init(|| std::env::args().skip(1).filter_map(|a| a.parse::<usize>().ok()).nth(3).unwrap_or(0));
    pct > 0 && svc.is_multiple_of(100 / pct.min(100))
}

fn workload(svc: usize, ep: usize, m: usize) -> Workload {
    let n = (svc * m + ep) as u32 + 1;
    let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + n);
    let mut services = BTreeMap::new();
    services.insert(format!("bench/svc-{svc}.bench.svc.cluster.local").as_str().into(), vec![]);
    Workload {
        uid: format!("Kubernetes//Pod/bench/svc-{svc}-{ep}").as_str().into(),
        name: format!("svc-{svc}-{ep}").as_str().into(),
        addresses: kmesh_daemon::model::Addrs::One(IpAddr::V4(addr)),
        status: HealthStatus::Healthy,
        // As in a cluster: the replicas of a deployment are alike but for their node.
        workload_name: format!("svc-{svc}").as_str().into(),
        canonical_name: format!("svc-{svc}").as_str().into(),
        profile: WorkloadProfile {
            namespace: "bench".into(),
            cluster_id: "Kubernetes".into(),
            service_account: "default".into(),
            trust_domain: "cluster.local".into(),
            authorization_policies: if policed(svc) {
                vec!["bench/allow".into()].into()
            } else {
                Box::default()
            },
            ..Default::default()
        }
        .into(),
        placement: Placement {
            node: format!("node-{}", ep % 3).into(),
            locality: Locality {
                region: "r".into(),
                zone: format!("z{}", ep % 3).into(),
                subzone: Default::default(),
            },
        }
        .into(),
        services: services.into_iter().collect(),
        ..Default::default()
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let n = args.first().copied().unwrap_or(10_000);
    let m = args.get(1).copied().unwrap_or(10);
    let churn_secs = args.get(2).copied().unwrap_or(20);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let bed = Testbed::new().context("needs root")?;
    let cp = ControlPlane::new();
    let server = rt.block_on(cp.spawn("127.0.0.1:0".parse()?, None))?;

    let exe = std::env::current_exe()?;
    let bin = exe.parent().and_then(|d| d.parent()).map(|d| d.join("kmesh-daemon")).context("daemon path")?;
    let pins = PathBuf::from(format!("/sys/fs/bpf/kmesh-bench-{}", std::process::id()));
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let admin_addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let spawn = || {
        let mut cmd = Command::new(&bin);
        // A bench that dies (a closed pipe, ^C) takes its daemon along, whose
        // --uninstall-on-exit then removes its pins. The thread that spawns is the main one.
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        with_default_signals(&mut cmd)
            .args([
                "run",
                "--xds-address",
                &server.addr.to_string(),
                "--xds-plaintext",
                "--node-name",
                "node-0",
            ])
            .arg("--cgroup")
            .arg(bed.cgroup())
            .arg("--bpffs")
            .arg(&pins)
            .args(["--admin", &admin_addr.to_string(), "--uninstall-on-exit", "--metrics-addr", "off"])
            .arg("--admin-socket")
            .arg(std::env::temp_dir().join(format!("kmesh-bench-{}-admin.sock", std::process::id())))
            .arg("--state-file")
            .arg(std::env::temp_dir().join(format!("kmesh-bench-{}-state.json", std::process::id())))
            .env("KMESH_LOG", std::env::var("KMESH_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .spawn()
            .context("starting kmesh-daemon")
    };
    let mut child = spawn()?;
    let pid = child.id();
    let r = (|| -> anyhow::Result<()> {
        wait_until("readiness", Duration::from_secs(20), || {
            admin::request(admin_addr, "GET", "/debug/ready", None).is_ok()
        })?;
        let (rss0, cpu0) = usage(pid);

        // Build the resources outside the timed region.
        let t = Instant::now();
        let mut res = BTreeMap::new();
        for s in 0..n {
            let svc = Service {
                name: format!("svc-{s}").into(),
                namespace: "bench".into(),
                hostname: format!("svc-{s}.bench.svc.cluster.local").into(),
                addresses: vec![IpAddr::V4(Ipv4Addr::from(
                    u32::from(Ipv4Addr::new(10, 96, 0, 0)) + s as u32 + 1,
                ))]
                .into(),
                ports: vec![ServicePort { service_port: 80, target_port: 8080, protocol: Protocol::Tcp }]
                    .into(),
                load_balancing: LoadBalancing::default(),
                ..Default::default()
            };
            res.insert(svc.key(), encode_address(&AddressResource::Service(svc)));
            for e in 0..m {
                let w = workload(s, e, m);
                res.insert(w.uid.to_string(), encode_address(&AddressResource::Workload(w)));
            }
        }
        println!("built {} resources ({n} services x {m} endpoints) in {:.2?}", res.len(), t.elapsed());

        let policy = kmesh_model::config::parse(
            "policies: [{name: allow, namespace: bench, scope: WORKLOAD_SELECTOR, rules: [{clauses: [{matches: [{namespaces: [{exact: bench}], destination_ports: [8080]}]}]}]}]",
        )?;
        if (0..n).any(policed) {
            cp.replace_all(AUTHORIZATION_TYPE, kmesh_xds_server::authorization_resources(&policy));
            // Applied before the addresses are pushed: the push timed below is then the first
            // one the control plane records after them (records do not name their type).
            let pseq = cp.seq();
            wait_until("the policy applied", Duration::from_secs(60), || {
                cp.push_records().iter().any(|p| p.seq >= pseq && p.answered.is_some())
            })?;
            println!(
                "one policy selects the workloads of {} services",
                (0..n).filter(|s| policed(*s)).count()
            );
        }
        let t0 = Instant::now();
        cp.replace_all(ADDRESS_TYPE, res);
        println!("the control plane took the resources in {:.2?}", t0.elapsed());
        let t0 = Instant::now();
        // The daemon ACKs a response once its maps are written: the push is timed to the ACK
        // (read from the control plane's records, in this process), not by scraping /metrics,
        // which would take CPU from the daemon while it works. The maps are checked after.
        let seq = cp.seq();
        let pushed = || cp.push_records().into_iter().find(|p| p.seq >= seq && p.answered.is_some());
        let full = wait_until("all maps written", Duration::from_secs(600), || pushed().is_some())?;
        let rec = pushed().context("the push's record")?;
        let cp_push = rec.sent.saturating_duration_since(t0);
        let daemon_push = rec.answered.unwrap_or(rec.sent).saturating_duration_since(rec.sent);
        for (map, want) in [("FRONTENDS", n), ("ENDPOINTS", n * m)] {
            let got = metric(admin_addr, &format!("kmesh_map_entries{{map=\"{map}\"}}"));
            if got != want as f64 {
                bail!("the push was ACKed with {got} entries in {map}, not {want}");
            }
        }
        // The daemon tidies its indexes once the push is ACKed (`Mesh::tidy`): its CPU is the
        // push's too, so it is read once that is done (an idle daemon takes next to none).
        std::thread::sleep(Duration::from_millis(200));
        let (rss1, cpu1) = usage(pid);

        // One endpoint goes: the service's table switches to a new generation without it.
        let victim = workload(n / 2, 0, m).uid;
        let t1 = Instant::now();
        cp.remove(ADDRESS_TYPE, &[victim.as_str()]);
        let one = wait_until("one endpoint change", Duration::from_secs(60), || {
            metric(admin_addr, "kmesh_map_entries{map=\"ENDPOINTS\"}") == (n * m - 1) as f64
        })?;
        let _ = t1;
        let (rss2, cpu2) = usage(pid);

        // More single-endpoint changes (an endpoint removed, then back), for percentiles and
        // the control plane's share.
        let changes = 25;
        let entries = |k: usize| metric(admin_addr, "kmesh_map_entries{map=\"ENDPOINTS\"}") == k as f64;
        let cp0 = cp.push_time();
        let mut lat = Vec::new();
        for i in 0..changes {
            let w = workload((i * 7919 + 1) % n, m - 1, m);
            let bytes = encode_address(&AddressResource::Workload(w.clone()));
            cp.remove(ADDRESS_TYPE, &[w.uid.as_str()]);
            lat.push(wait_until("a change", Duration::from_secs(60), || entries(n * m - 2))?);
            cp.set(ADDRESS_TYPE, [(w.uid.to_string(), bytes)]);
            lat.push(wait_until("a change", Duration::from_secs(60), || entries(n * m - 1))?);
        }
        let cp_share = (cp.push_time() - cp0).as_secs_f64() / lat.len() as f64;
        let (_, cpu3) = usage(pid);
        // What the daemon keeps once the push's transient memory has been given back.
        std::thread::sleep(Duration::from_secs(3));
        // Resident memory by kind: anonymous (heap, stacks), file-backed (the binary's pages,
        // and the observer's ring buffers, mapped from the BPF maps' inodes), shared memory.
        let [rss_held, anon, file, shmem] = status_mib(pid, ["VmRSS", "RssAnon", "RssFile", "RssShmem"]);
        if let Ok(to) = std::env::var("KMESH_BENCH_SMAPS") {
            // Every mapping's residency, for finding what holds the memory that is not heap.
            std::fs::copy(format!("/proc/{pid}/smaps"), &to).context("copying the daemon's smaps")?;
        }
        lat.sort();
        let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1000.0;
        let daemon_cpu = (cpu3 - cpu2) / lat.len() as f64;

        println!();
        println!("| measure | value |");
        println!("|---|---|");
        println!("| services x endpoints | {n} x {m} ({} workloads) |", n * m);
        println!("| push -> all maps written (ACKed) | {:.2} s |", full.as_secs_f64());
        println!(
            "| of which: control plane computing the push / sending it + daemon applying it | {:.2} / {:.2} s |",
            cp_push.as_secs_f64(),
            daemon_push.as_secs_f64()
        );
        println!("| one endpoint removed -> in the kernel | {:.1} ms |", one.as_secs_f64() * 1000.0);
        println!(
            "| one endpoint change -> in the kernel, p50 / p99 over {} | {:.1} / {:.1} ms |",
            lat.len(),
            pct(0.5),
            pct(0.99)
        );
        println!("| control plane's share per change (computing the push) | {:.2} ms |", cp_share * 1000.0);
        println!("| daemon CPU per change | {:.1} ms |", daemon_cpu * 1000.0);
        println!("| daemon CPU for the full push | {:.2} s |", cpu1 - cpu0);
        println!("| daemon CPU for the one change | {:.3} s |", cpu2 - cpu1);
        println!("| daemon RSS before the push | {rss0:.1} MiB |");
        println!("| daemon peak RSS (VmHWM) | {:.1} MiB |", rss1.max(rss2));
        println!(
            "| daemon RSS holding the configuration, 3 s after the changes (VmRSS) | {rss_held:.1} MiB |"
        );
        println!(
            "| of which anonymous (heap, stacks) / file-backed (the binary's pages, the rings' mappings) / shmem | {anon:.1} / {file:.1} / {shmem:.1} MiB |"
        );
        println!(
            "| map entries | frontends {}, tables {}, endpoints {}, backends {} |",
            metric(admin_addr, "kmesh_map_entries{map=\"FRONTENDS\"}"),
            metric(admin_addr, "kmesh_map_entries{map=\"LB_TABLES\"}"),
            metric(admin_addr, "kmesh_map_entries{map=\"ENDPOINTS\"}"),
            metric(admin_addr, "kmesh_map_entries{map=\"BACKENDS\"}")
        );

        // Churn: 500 endpoint changes a second for `churn_secs`, made on schedule whatever the
        // daemon does; a change's lag runs from making it to the ACK of the first push that
        // carries it (the daemon ACKs a response once it is in the kernel).
        let rate = 500usize;
        let nacks0 = cp.nacks().len();
        let (_, cpu_c0) = usage(pid);
        let mut made: Vec<(Instant, u64)> = Vec::new();
        let mut out: std::collections::BTreeSet<String> = Default::default();
        let t0 = Instant::now();
        for i in 0..rate * churn_secs {
            let due = t0 + Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
            let w = workload((i * 7919 + 13) % n, 1 + (i / 7) % (m - 1).max(1), m);
            if out.remove(w.uid.as_str()) {
                cp.set(ADDRESS_TYPE, [(w.uid.to_string(), encode_address(&AddressResource::Workload(w)))]);
            } else {
                cp.remove(ADDRESS_TYPE, &[w.uid.as_str()]);
                out.insert(w.uid.to_string());
            }
            made.push((Instant::now(), cp.seq()));
        }
        let last = cp.seq();
        wait_until("the churn applied", Duration::from_secs(300), || {
            cp.push_records().iter().any(|p| p.seq >= last && p.answered.is_some())
        })?;
        let churn_wall = t0.elapsed().as_secs_f64();
        let (_, cpu_c1) = usage(pid);
        let recs = cp.push_records();
        let mut lags: Vec<f64> = made
            .iter()
            .filter_map(|(t, seq)| {
                let i = recs.partition_point(|p| p.seq < *seq);
                let at = recs.get(i)?.answered?;
                Some(at.saturating_duration_since(*t).as_secs_f64() * 1000.0)
            })
            .collect();
        lags.sort_by(f64::total_cmp);
        let lp =
            |p: f64| lags.get(((lags.len() as f64 * p) as usize).min(lags.len().saturating_sub(1))).copied();
        let pushes = recs.iter().filter(|p| p.sent >= t0).count();
        println!(
            "| churn: {} changes at {rate}/s -> lag p50 / p99 / max | {:.0} / {:.0} / {:.0} ms ({} of them measured, in {pushes} pushes) |",
            made.len(),
            lp(0.5).unwrap_or(f64::NAN),
            lp(0.99).unwrap_or(f64::NAN),
            lags.last().copied().unwrap_or(f64::NAN),
            lags.len()
        );
        println!(
            "| churn: NACKs / daemon CPU | {} / {:.0}% of one core |",
            cp.nacks().len() - nacks0,
            (cpu_c1 - cpu_c0) / churn_wall * 100.0
        );

        // A restart on the state churn left (SIGKILL, as a crash or an OOM kill): a daemon
        // compiling it from scratch against the maps must find nothing to write.
        let _ = child.kill();
        let _ = child.wait();
        let t = Instant::now();
        child = spawn()?;
        let ready = wait_until("readiness after the restart", Duration::from_secs(120), || {
            admin::request(admin_addr, "GET", "/debug/ready", None).is_ok()
        })?;
        let _ = t;
        println!(
            "| restart (SIGKILL) on the final state: ready after / map entries written, deleted | {:.2} s / {}, {} |",
            ready.as_secs_f64(),
            metric(admin_addr, "kmesh_map_writes_total"),
            metric(admin_addr, "kmesh_map_deletes_total")
        );

        // A restart on a slightly changed configuration: ten endpoints (the first of ten
        // services, which nothing above touches) went while the daemon was down. It writes what
        // a daemon that never stopped would have written for that change, nothing more.
        let _ = child.kill();
        let _ = child.wait();
        let gone: Vec<String> = (0..10).map(|i| workload((i * 997 + 5) % n, 0, m).uid.to_string()).collect();
        cp.remove(ADDRESS_TYPE, &gone.iter().map(String::as_str).collect::<Vec<_>>());
        child = spawn()?;
        let ready = wait_until("readiness after the second restart", Duration::from_secs(120), || {
            admin::request(admin_addr, "GET", "/debug/ready", None).is_ok()
        })?;
        println!(
            "| restart (SIGKILL) after 10 endpoints went meanwhile: ready after / map entries written, deleted | {:.2} s / {}, {} |",
            ready.as_secs_f64(),
            metric(admin_addr, "kmesh_map_writes_total"),
            metric(admin_addr, "kmesh_map_deletes_total")
        );
        Ok(())
    })();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    drop(server);
    r
}
