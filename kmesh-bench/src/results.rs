//! What a run records (`results.json`) and the medians the report is made of.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::stats::median;

/// The data paths, in report order.
pub const PATHS: [(&str, &str); 7] = [
    ("direct", "direct to the pod"),
    ("kmesh", "kmesh-rs (eBPF connect rewrite)"),
    ("kmesh-waypoint", "kmesh-rs to a waypoint (Envoy, PROXY header from the kernel)"),
    ("iptables", "iptables DNAT (kube-proxy iptables)"),
    ("nftables", "nftables DNAT (kube-proxy nftables)"),
    ("envoy-client", "Envoy, client sidecar"),
    ("envoy-both", "Envoy, both sidecars"),
];

/// The request tests, in report order: (id, label, connections).
pub const TESTS: [(&str, &str, u32); 6] = [
    ("short-c1", "short connections, 1 client", 1),
    ("short-c16", "short connections, 16 clients", 16),
    ("keepalive-c1", "keep-alive, 1 client", 1),
    ("keepalive-c16", "keep-alive, 16 clients", 16),
    ("txn-c1", "short transaction incl. connect(), in-repo client, 1 client", 1),
    ("txn-c16", "short transactions incl. connect(), in-repo client, 16 clients", 16),
];

pub fn path_label(id: &str) -> &str {
    PATHS.iter().find(|(p, _)| *p == id).map(|(_, l)| *l).unwrap_or(id)
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub meta: Meta,
    pub method: Method,
    /// One entry per (round, test, path): the raw figures.
    pub samples: Vec<Sample>,
    pub scale: Vec<ScaleSample>,
    pub control_plane: Vec<ControlPoint>,
    /// Kernel time of the data plane's eBPF programs per transaction, per path.
    #[serde(default)]
    pub bpf_cost: Vec<BpfCost>,
    /// Things the report must say (unavailable features, failures of one path or point).
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Meta {
    pub started: String,
    pub command: String,
    pub smoke: bool,
    pub total_seconds: f64,
    pub machine: BTreeMap<String, String>,
    pub tools: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Method {
    pub rounds: usize,
    pub seconds_per_run: u64,
    pub probe_ms: u64,
    pub scale_points: Vec<usize>,
    pub scale_rounds: usize,
    pub base_services: usize,
    pub nginx_workers: u32,
    pub envoy_concurrency: u32,
    pub body_bytes: usize,
    pub iptables_full_chains: usize,
    pub nft_full_chains: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Sample {
    pub round: usize,
    pub test: String,
    pub path: String,
    pub requests: u64,
    pub errors: u64,
    pub rps: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    /// Bulk test only.
    pub gbps: f64,
    pub cpu_client_s: f64,
    pub cpu_server_s: f64,
    pub cpu_proxy_s: f64,
    /// Busy CPU of the whole machine over the run (includes softirq work and any noise).
    pub cpu_machine_s: f64,
    pub wall_s: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScaleSample {
    pub services: usize,
    pub path: String,
    pub round: usize,
    /// The probe's figures (flattened: the JSON keeps one level).
    #[serde(flatten)]
    pub probe: crate::probe::ProbeResult,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ControlPoint {
    pub services: usize,
    pub path: String,
    /// Time to program the kernel: daemon start to ready (kmesh), iptables-restore or nft -f.
    pub program_s: f64,
    pub cpu_s: f64,
    pub rss_mib: f64,
    pub hwm_mib: f64,
    pub bpf_map_bytes: u64,
    pub bpf_maps: usize,
    /// Every BPF map the daemon holds, with its memory.
    #[serde(default)]
    pub maps: Vec<crate::procs::MapMemory>,
    /// Service frontends in the daemon's map (proof the config was applied whole).
    pub frontends: Option<f64>,
    pub error: Option<String>,
}

/// What the data plane's eBPF programs cost one short transaction (connect, one request,
/// close) of one path, from the kernel's own accounting (`kernel.bpf_stats_enabled`): runs
/// and nanoseconds per transaction, by program.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BpfCost {
    pub path: String,
    pub transactions: u64,
    pub p50_us: f64,
    /// Program name -> (runs, nanoseconds) per transaction.
    pub programs: BTreeMap<String, (f64, f64)>,
}

impl BpfCost {
    pub fn total_ns(&self) -> f64 {
        self.programs.values().map(|(_, ns)| ns).sum::<f64>().max(0.0)
    }

    pub fn total_runs(&self) -> f64 {
        self.programs.values().map(|(r, _)| r).sum::<f64>().max(0.0)
    }
}

/// Medians over rounds of one (test, path).
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub rounds: usize,
    pub errors: u64,
    pub rps: Option<f64>,
    pub p50_us: Option<f64>,
    pub p90_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub gbps: Option<f64>,
    /// CPU seconds per 10,000 requests.
    pub cpu10k_client: Option<f64>,
    pub cpu10k_server: Option<f64>,
    pub cpu10k_proxy: Option<f64>,
    pub cpu10k_total: Option<f64>,
    pub cpu10k_machine: Option<f64>,
}

/// Per-sample figures that ratios are taken of.
pub fn m_p50(s: &Sample) -> f64 {
    s.p50_us
}
pub fn m_rps(s: &Sample) -> f64 {
    s.rps
}
pub fn m_gbps(s: &Sample) -> f64 {
    s.gbps
}
/// Client + server + proxy CPU seconds per 10,000 requests.
pub fn m_cpu10k(s: &Sample) -> f64 {
    if s.requests == 0 {
        return f64::NAN;
    }
    (s.cpu_client_s + s.cpu_server_s + s.cpu_proxy_s) / s.requests as f64 * 1e4
}

impl Results {
    /// Paired ratio `a / b` of one test: the median over rounds of the ratio of the two paths'
    /// figures in the same round (both ran back to back, so drift between rounds cancels).
    pub fn paired(&self, test: &str, a: &str, b: &str, f: fn(&Sample) -> f64) -> Option<f64> {
        let ratios: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.test == test && s.path == a)
            .filter_map(|sa| {
                let sb =
                    self.samples.iter().find(|s| s.test == test && s.path == b && s.round == sa.round)?;
                let (va, vb) = (f(sa), f(sb));
                (va > 0.0 && vb > 0.0).then(|| va / vb)
            })
            .collect();
        median(&ratios)
    }

    /// Paired ratio of connect() p50 between two paths at one scale point.
    pub fn connect_paired(&self, services: usize, a: &str, b: &str) -> Option<f64> {
        let at = |p: &str, round: usize| {
            self.scale
                .iter()
                .find(|s| s.services == services && s.path == p && s.round == round && s.probe.count > 0)
                .map(|s| s.probe.p50_us)
        };
        let ratios: Vec<f64> = self
            .scale
            .iter()
            .filter(|s| s.services == services && s.path == a)
            .filter_map(|sa| Some(at(a, sa.round)? / at(b, sa.round)?))
            .collect();
        median(&ratios)
    }

    pub fn summary(&self, test: &str, path: &str) -> Summary {
        let v: Vec<&Sample> = self.samples.iter().filter(|s| s.test == test && s.path == path).collect();
        let m = |f: &dyn Fn(&Sample) -> f64| median(&v.iter().map(|s| f(s)).collect::<Vec<_>>());
        let per10k = |f: &dyn Fn(&Sample) -> f64| {
            median(
                &v.iter()
                    .filter(|s| s.requests > 0)
                    .map(|s| f(s) / s.requests as f64 * 1e4)
                    .collect::<Vec<_>>(),
            )
        };
        let positive = |x: Option<f64>| x.filter(|x| *x > 0.0);
        Summary {
            rounds: v.len(),
            errors: v.iter().map(|s| s.errors).sum(),
            rps: positive(m(&|s| s.rps)),
            p50_us: positive(m(&|s| s.p50_us)),
            p90_us: positive(m(&|s| s.p90_us)),
            p99_us: positive(m(&|s| s.p99_us)),
            gbps: positive(m(&|s| s.gbps)),
            cpu10k_client: per10k(&|s| s.cpu_client_s),
            cpu10k_server: per10k(&|s| s.cpu_server_s),
            cpu10k_proxy: per10k(&|s| s.cpu_proxy_s),
            cpu10k_total: per10k(&|s| s.cpu_client_s + s.cpu_server_s + s.cpu_proxy_s),
            cpu10k_machine: per10k(&|s| s.cpu_machine_s),
        }
    }

    /// Median connect() p50 in microseconds at a scale point.
    pub fn connect_p50(&self, services: usize, path: &str) -> Option<f64> {
        let v: Vec<f64> = self
            .scale
            .iter()
            .filter(|s| s.services == services && s.path == path && s.probe.count > 0)
            .map(|s| s.probe.p50_us)
            .collect();
        median(&v)
    }

    pub fn connect_p99(&self, services: usize, path: &str) -> Option<f64> {
        let v: Vec<f64> = self
            .scale
            .iter()
            .filter(|s| s.services == services && s.path == path && s.probe.count > 0)
            .map(|s| s.probe.p99_us)
            .collect();
        median(&v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_are_medians_over_rounds() {
        let mut r = Results::default();
        for (round, rps, cpu) in [(0, 100.0, 1.0), (1, 300.0, 3.0), (2, 200.0, 2.0)] {
            r.samples.push(Sample {
                round,
                test: "short-c16".into(),
                path: "direct".into(),
                requests: 10_000,
                rps,
                p50_us: rps / 2.0,
                cpu_client_s: cpu,
                cpu_server_s: 1.0,
                ..Default::default()
            });
        }
        let s = r.summary("short-c16", "direct");
        assert_eq!(s.rounds, 3);
        assert_eq!(s.rps, Some(200.0));
        assert_eq!(s.p50_us, Some(100.0));
        assert_eq!(s.cpu10k_client, Some(2.0));
        assert!((s.cpu10k_total.unwrap() - 3.0).abs() < 1e-9);
        assert_eq!(s.gbps, None);
        assert_eq!(r.summary("short-c16", "kmesh").rps, None);
        // Paired ratios: per round, then the median.
        for (round, rps) in [(0, 50.0), (1, 300.0), (2, 400.0)] {
            r.samples.push(Sample {
                round,
                test: "short-c16".into(),
                path: "kmesh".into(),
                rps,
                ..Default::default()
            });
        }
        // Rounds: 50/100, 300/300, 400/200 -> median 1.0 (the ratio of medians would be 1.5).
        assert_eq!(r.paired("short-c16", "kmesh", "direct", m_rps), Some(1.0));
        assert_eq!(r.paired("short-c16", "nobody", "direct", m_rps), None);
    }
}
