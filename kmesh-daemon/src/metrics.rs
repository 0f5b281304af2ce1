//! The Prometheus exposition: daemon health (maps, applies, xDS, authorization, telemetry
//! events) read from the daemon's state at scrape time, plus the TCP families the telemetry
//! keeps, encoded by `prometheus-client` in the OpenMetrics text format.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kmesh_common::stat;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::kernel::Capacities;
use crate::observe::Observer;

/// The OpenMetrics text content type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The xDS client's state, kept by the stream loop.
#[derive(Debug, Default)]
pub struct XdsHealth {
    pub enabled: AtomicBool,
    pub connected: AtomicBool,
    pub acks: AtomicU64,
    pub nacks: AtomicU64,
    pub disconnects: AtomicU64,
    /// The Node id sent (set once the client starts).
    pub node_id: std::sync::OnceLock<String>,
    /// Why the last stream ended or could not open (cleared by the next response).
    pub last_error: std::sync::Mutex<Option<String>>,
    /// Subscribed types that have not answered yet on the current stream: until they have,
    /// nothing received on it is applied.
    pub waiting_for: std::sync::Mutex<Vec<String>>,
    /// Subscriptions sent without `initial_resource_versions` because the list was over the
    /// request limit (each makes the control plane send its whole type again).
    pub resyncs_without_versions: AtomicU64,
    /// Kernel-native mode: Envoy filter chains by what became of them (`compiled`,
    /// `passthrough`, `warming`, `not_compiled`).
    pub envoy_chains: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

type Labels = Vec<(&'static str, String)>;

fn gauges(r: &mut Registry, name: &str, help: &str, rows: impl IntoIterator<Item = (Labels, u64)>) {
    let f: Family<Labels, Gauge> = Family::default();
    for (l, v) in rows {
        f.get_or_create(&l).set(v as i64);
    }
    r.register(name, help, f);
}

/// A counter family whose values are read from elsewhere (the kernel, the mesh's counters).
fn counters(r: &mut Registry, name: &str, help: &str, rows: impl IntoIterator<Item = (Labels, u64)>) {
    let f: Family<Labels, Counter> = Family::default();
    for (l, v) in rows {
        f.get_or_create(&l).inc_by(v);
    }
    r.register(name, help, f);
}

fn counter(r: &mut Registry, name: &str, help: &str, v: u64) {
    let c: Counter = Counter::default();
    c.inc_by(v);
    r.register(name, help, c);
}

fn gauge(r: &mut Registry, name: &str, help: &str, v: u64) {
    let g: Gauge = Gauge::default();
    g.set(v as i64);
    r.register(name, help, g);
}

/// The kernel memory of each map (see [`crate::kernel::map_memory`]), read at most once a
/// second: each read opens every map, reads its fdinfo and closes it (a few tenths of a
/// millisecond for thirty maps), and a scraper polling every few milliseconds would otherwise
/// take a good part of a CPU from the daemon.
fn map_memory(layout_dir: &std::path::Path) -> Vec<(String, u64)> {
    type Cached = Option<(std::time::Instant, std::path::PathBuf, Vec<(String, u64)>)>;
    static CACHE: std::sync::Mutex<Cached> = std::sync::Mutex::new(None);
    let mut c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    match &*c {
        Some((at, dir, v)) if dir == layout_dir && at.elapsed() < std::time::Duration::from_secs(1) => {
            v.clone()
        }
        _ => {
            let v = crate::kernel::map_memory(layout_dir);
            *c = Some((std::time::Instant::now(), layout_dir.to_owned(), v.clone()));
            v
        }
    }
}

/// Everything `/status/metric` and the admin `/metrics` serve: from the observer alone (the
/// state the mesh last published, the kernel's counters, the telemetry families), never
/// waiting for an apply.
pub fn render(o: &Observer, ready: bool, xds: &XdsHealth, dns: Option<&crate::dns::DnsProxy>) -> String {
    let mut r = Registry::default();
    let p = &o.published;
    let counts = p.map_counts;
    let of_every_map = |c: &Capacities| -> Vec<(Labels, u64)> {
        c.all().into_iter().map(|(name, v)| (vec![("map", name.to_string())], u64::from(v))).collect()
    };
    let by_map = |v: &dyn Fn(&str, usize) -> u64| -> Vec<(Labels, u64)> {
        counts.as_array().iter().map(|(name, n)| (vec![("map", name.to_string())], v(name, *n))).collect()
    };
    gauge(&mut r, "kmesh_ready", "Programs attached and configuration applied", ready as u64);
    gauges(&mut r, "kmesh_map_entries", "Entries the daemon keeps in each BPF map", by_map(&|_, n| n as u64));
    gauges(
        &mut r,
        "kmesh_map_capacity",
        "Max entries of each BPF map the daemon writes, as it is now (maps grow with the configuration)",
        of_every_map(&p.capacities),
    );
    gauges(
        &mut r,
        "kmesh_map_ceiling",
        "How far each BPF map may grow (the --*-capacity flags)",
        of_every_map(&p.ceilings),
    );
    counter(&mut r, "kmesh_map_grows", "Times BPF maps were grown (make-before-break)", p.map_grows);
    let memory = map_memory(&p.layout_dir);
    gauges(
        &mut r,
        "kmesh_map_memory_bytes",
        "Kernel memory each BPF map takes (its memlock: buckets, preallocated and used entries)",
        memory.into_iter().map(|(name, b)| (vec![("map", name)], b)),
    );
    counters(
        &mut r,
        "kmesh_map_full_errors",
        "Configurations refused because a map would overflow",
        by_map(&|name, _| p.counters.map_full_errors.get(name).copied().unwrap_or(0)),
    );
    counter(
        &mut r,
        "kmesh_config_applies",
        "Successful applies of configuration or enrollment",
        p.counters.applies,
    );
    counter(&mut r, "kmesh_apply_errors", "Applies refused by the kernel side", p.counters.apply_errors);
    counter(
        &mut r,
        "kmesh_waypoint_slot_errors",
        "Hostname slots of waypoint PROXY headers that could not be written (PP_HOST full): those headers go without TLV 0xD1",
        p.counters.waypoint_slot_errors,
    );
    counter(
        &mut r,
        "kmesh_map_writes",
        "BPF map entries written (created or changed) by applies, every map family",
        p.counters.map_writes,
    );
    counter(
        &mut r,
        "kmesh_map_writes_ahead",
        "BPF map entries written while a full compilation still ran (part of kmesh_map_writes when the apply succeeds; undone when it fails)",
        p.counters.map_writes_ahead,
    );
    counter(
        &mut r,
        "kmesh_map_deletes",
        "BPF map entries deleted by applies, every map family",
        p.counters.map_deletes,
    );
    counter(&mut r, "kmesh_config_errors", "Config files refused by validation", p.counters.config_errors);
    gauge(
        &mut r,
        "kmesh_config_generation",
        "Configurations (file versions or xDS updates) applied since start: which one is in force",
        p.model_generation,
    );
    gauge(
        &mut r,
        "kmesh_frontend_conflicts",
        "Service addresses and ports claimed by more than one service (the first key owns each)",
        p.frontend_conflicts as u64,
    );
    gauge(
        &mut r,
        "kmesh_pins_missing",
        "bpffs pins found missing and not restorable",
        p.counters.pins_missing,
    );
    counter(
        &mut r,
        "kmesh_pins_restored",
        "bpffs map pins restored after removal by hand",
        p.counters.pins_restored,
    );
    gauge(
        &mut r,
        "kmesh_outlier_ejected",
        "Endpoints ejected by outlier detection now",
        p.outlier_ejected as u64,
    );
    counter(
        &mut r,
        "kmesh_outlier_ejections",
        "Ejections by outlier detection since start",
        p.outlier_ejections,
    );
    let chains = xds.envoy_chains.lock().unwrap().clone();
    if !chains.is_empty() {
        gauges(
            &mut r,
            "kmesh_envoy_filter_chains",
            "Kernel-native mode: Envoy filter chains by what became of them (not_compiled: the kernel cannot decide them at connect(); see /debug/config_dump)",
            ["compiled", "passthrough", "warming", "not_compiled"]
                .map(|s| (vec![("state", s.to_string())], chains.get(s).copied().unwrap_or(0))),
        );
    }
    if xds.enabled.load(Ordering::Relaxed) {
        gauge(
            &mut r,
            "kmesh_xds_connected",
            "1 while the xDS stream to the control plane is up",
            xds.connected.load(Ordering::Relaxed) as u64,
        );
        counters(
            &mut r,
            "kmesh_xds_responses",
            "xDS responses from the control plane, by what the daemon answered",
            [
                (vec![("result", "ack".to_string())], xds.acks.load(Ordering::Relaxed)),
                (vec![("result", "nack".to_string())], xds.nacks.load(Ordering::Relaxed)),
            ],
        );
        counter(
            &mut r,
            "kmesh_xds_disconnects",
            "xDS streams lost or refused",
            xds.disconnects.load(Ordering::Relaxed),
        );
        counter(
            &mut r,
            "kmesh_xds_resyncs_without_versions",
            "Subscriptions sent without the versions held (over --xds-max-request-bytes): the control plane resent the whole type",
            xds.resyncs_without_versions.load(Ordering::Relaxed),
        );
    }
    counters(
        &mut r,
        "kmesh_authz_decisions",
        "Connections allowed or denied, by deciding policy",
        o.authz_decisions()
            .into_iter()
            .map(|(policy, action, n)| (vec![("policy", policy), ("action", action.to_string())], n)),
    );
    {
        let st = o.stats();
        counters(
            &mut r,
            "kmesh_connect",
            "connect() calls of enrolled sockets by outcome",
            [
                (stat::REWRITTEN, "rewritten"),
                (stat::PASSED, "passed"),
                (stat::NO_ENDPOINT, "no_endpoint"),
                (stat::STRICT_NO_MATCH, "strict_no_match"),
                (stat::RETRIED, "retried"),
                (stat::INCONSISTENT, "inconsistent"),
                (stat::WAYPOINT_REDIRECTED, "waypoint"),
                (stat::WAYPOINT_UNREACHABLE, "waypoint_unreachable"),
                (stat::CIRCUIT_OPEN, "circuit_open"),
            ]
            .map(|(idx, name)| (vec![("result", name.to_string())], st[idx as usize])),
        );
        counters(
            &mut r,
            "kmesh_waypoint_connections",
            "Connections of enrolled pods sent to a waypoint instead of the service's endpoints, by waypoint workload and service",
            o.telemetry
                .waypoint_connections()
                .map(|((w, s), n)| (vec![("waypoint", w.clone()), ("destination_service", s.clone())], *n)),
        );
        counters(
            &mut r,
            "kmesh_waypoint_proxy_headers",
            "PROXY protocol headers the kernel put in front of connections sent to a waypoint, or could not (the socket was not tracked, or the header not inserted)",
            [(stat::PROXY_HEADER_SENT, "sent"), (stat::PROXY_HEADER_FAILED, "failed")]
                .map(|(idx, name)| (vec![("result", name.to_string())], st[idx as usize])),
        );
        counters(
            &mut r,
            "kmesh_udp_unconnected",
            "Unconnected UDP sockets: datagrams kept on their flow's backend, and replies shown from the VIP",
            [(stat::UDP_STICKY, "sticky"), (stat::UDP_REPLY_REWRITTEN, "reply_rewritten")]
                .map(|(idx, name)| (vec![("result", name.to_string())], st[idx as usize])),
        );
        counter(
            &mut r,
            "kmesh_authz_inconsistent",
            "Connections into enrolled pods dropped because a destination with policies had no verdict row",
            st[stat::AUTHZ_INCONSISTENT as usize],
        );
        counter(
            &mut r,
            "kmesh_authz_node_exempt",
            "Connections the node opened into pods with policies (kubelet's probes), admitted without consulting them",
            st[stat::AUTHZ_NODE_EXEMPT as usize],
        );
        counter(
            &mut r,
            "kmesh_telemetry_untracked_connections",
            "Connections of enrolled pods left without telemetry because the slots of the kernel's table of tracked connections (CONNS) where they could go were all taken",
            st[stat::TELEMETRY_UNTRACKED as usize],
        );
        counters(
            &mut r,
            "kmesh_events_lost",
            "Kernel events dropped because a ring buffer was full",
            [
                (vec![("ring", "TELEMETRY".to_string())], st[stat::TELEMETRY_LOST as usize]),
                (vec![("ring", "AUTHZ_EVENTS".to_string())], st[stat::AUTHZ_EVENTS_LOST as usize]),
            ],
        );
    }
    if let Some(d) = dns {
        counters(
            &mut r,
            "kmesh_dns_queries",
            "DNS queries of pods seen by their proxies, by what was done: answered from the mesh (with addresses or NODATA), forwarded to the resolver asked, SERVFAIL when it failed, FORMERR, dropped",
            d.shared.stats.by_result().map(|(name, n)| (vec![("result", name.to_string())], n)),
        );
        gauge(&mut r, "kmesh_dns_proxies", "Pods with a DNS proxy listening", d.pods_listening() as u64);
        gauge(
            &mut r,
            "kmesh_dns_names",
            "Names the DNS proxies answer from the mesh",
            d.shared.table().len() as u64,
        );
    }
    {
        let st = o.stats();
        counters(
            &mut r,
            "kmesh_dns_redirects",
            "Pods' DNS queries (connect() or datagram to port 53) sent to their proxy by the kernel, or left going to the resolver because the socket could not be given a port",
            [(stat::DNS_REDIRECTED, "redirected"), (stat::DNS_UNTRACKED, "untracked")]
                .map(|(idx, name)| (vec![("result", name.to_string())], st[idx as usize])),
        );
    }
    counter(
        &mut r,
        "kmesh_telemetry_events",
        "Connection events received from the kernel",
        o.telemetry.events,
    );
    counter(
        &mut r,
        "kmesh_telemetry_connections_summed",
        "Short connections the kernel summed by peers instead of reporting each (no access log)",
        o.telemetry.tallied,
    );
    gauge(
        &mut r,
        "kmesh_telemetry_open_connections",
        "Connections of enrolled pods tracked between open and close",
        o.telemetry.open_connections() as u64,
    );
    o.telemetry.register(&mut r);
    let mut t = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut t, &r);
    t
}
