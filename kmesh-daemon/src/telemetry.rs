//! Connection telemetry: kernel open/report/close events turned into Istio-labelled TCP
//! metrics (Kmesh's service, workload and per-connection families, with the
//! `prometheus-client` crate) and access-log lines, with names taken from the model.
//!
//! The kernel sends cumulative counters per socket (at establishment, every report interval
//! while the connection is busy, and at close); this module keeps the last values it saw per
//! socket cookie and adds the differences to the counters, so totals move while a long-lived
//! connection is open and are exact when it closes.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use kmesh_common::{
    CONN_CLOSE, CONN_FAILED, CONN_OPEN, CONN_REPORT, ConnEvent, DIR_OUTBOUND, EV_NO_PEER_FIN, EV_OPENED,
    ORIG_VIA_WAYPOINT, TallyCounts, TallyKey,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use crate::authz::Identity;
use crate::compile::words_addr;
use crate::model::{Model, Service, Workload};
use kmesh_model::delta::ModelChange;

/// What is collected and reported; switchable at runtime (`kmeshctl monitoring`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Monitoring {
    /// One line per closed (or failed) connection.
    pub access_log: bool,
    pub access_log_format: LogFormat,
    /// `kmesh_tcp_*` by source workload and destination service.
    pub service_metrics: bool,
    /// `kmesh_tcp_workload_*` by source and destination workload.
    pub workload_metrics: bool,
    /// `kmesh_tcp_connection_*`: one series per long-lived connection (from its first
    /// periodic report until it closes; high cardinality).
    pub connection_metrics: bool,
}

impl Default for Monitoring {
    fn default() -> Self {
        Self {
            access_log: true,
            access_log_format: LogFormat::Text,
            service_metrics: true,
            workload_metrics: true,
            connection_metrics: false,
        }
    }
}

impl Monitoring {
    /// The kernel collects events only when something uses them.
    pub fn kernel_on(&self) -> bool {
        self.access_log || self.service_metrics || self.workload_metrics || self.connection_metrics
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Istio's labels for the source side.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct SourceLabels {
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
}

/// Istio's labels for the destination workload.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct DestinationLabels {
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
}

#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ServiceDestination {
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
}

#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct PodDestination {
    pub destination_pod_address: String,
    pub destination_pod_namespace: String,
    pub destination_pod_name: String,
}

#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct Protocol {
    pub request_protocol: String,
    pub response_flags: String,
    pub connection_security_policy: String,
}

/// Labels of `kmesh_tcp_*` (by destination service).
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ServiceLabels {
    pub reporter: String,
    #[prometheus(flatten)]
    pub source: SourceLabels,
    #[prometheus(flatten)]
    pub service: ServiceDestination,
    #[prometheus(flatten)]
    pub destination: DestinationLabels,
    #[prometheus(flatten)]
    pub protocol: Protocol,
}

/// Labels of `kmesh_tcp_workload_*` (by destination pod).
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct WorkloadLabels {
    pub reporter: String,
    #[prometheus(flatten)]
    pub source: SourceLabels,
    #[prometheus(flatten)]
    pub pod: PodDestination,
    #[prometheus(flatten)]
    pub destination: DestinationLabels,
    #[prometheus(flatten)]
    pub protocol: Protocol,
}

/// Labels of `kmesh_tcp_connection_*` (one open connection).
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub reporter: String,
    /// When the connection was established (RFC 3339, UTC).
    pub start_time: String,
    pub source_address: String,
    pub destination_address: String,
    #[prometheus(flatten)]
    pub source: SourceLabels,
    #[prometheus(flatten)]
    pub service: ServiceDestination,
    #[prometheus(flatten)]
    pub pod: PodDestination,
    #[prometheus(flatten)]
    pub destination: DestinationLabels,
    #[prometheus(flatten)]
    pub protocol: Protocol,
}

/// The counters of one label set, by direction as Istio names them.
#[derive(Clone, Debug)]
pub struct TcpFamilies<
    L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
> {
    pub opened: Family<L, Counter>,
    pub closed: Family<L, Counter>,
    pub failed: Family<L, Counter>,
    /// Bytes from the destination to the source (Istio: "sent during response").
    pub sent: Family<L, Counter>,
    /// Bytes from the source to the destination (Istio: "received during request").
    pub received: Family<L, Counter>,
    pub retrans: Family<L, Counter>,
    pub packet_loss: Family<L, Counter>,
}

impl<L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static> Default
    for TcpFamilies<L>
{
    fn default() -> Self {
        Self {
            opened: Family::default(),
            closed: Family::default(),
            failed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            retrans: Family::default(),
            packet_loss: Family::default(),
        }
    }
}

/// The counters of one label set, taken out of the families once: counting an event then
/// costs an atomic add, not a hash of two dozen label strings.
#[derive(Clone, Debug, Default)]
struct Handles {
    opened: Counter,
    closed: Counter,
    failed: Counter,
    sent: Counter,
    received: Counter,
    retrans: Counter,
    packet_loss: Counter,
}

impl Handles {
    fn add(&self, d: &Progress) {
        self.sent.inc_by(d.from_dst);
        self.received.inc_by(d.from_src);
        // Mostly nothing: an atomic add of 0 is not free.
        if d.retrans != 0 {
            self.retrans.inc_by(d.retrans);
        }
        if d.lost != 0 {
            self.packet_loss.inc_by(d.lost);
        }
    }
}

impl<L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static>
    TcpFamilies<L>
{
    /// The series of `l` (created at 0 in every family).
    /// Forgets the workload pairs that are not `live`, and the series no pair produces any more.
    fn prune(
        &self,
        owners: &mut HashMap<L, std::collections::HashSet<Owners>>,
        live: impl Fn(&Owners) -> bool,
    ) {
        owners.retain(|labels, pairs| {
            pairs.retain(&live);
            if pairs.is_empty() {
                self.remove(labels);
            }
            !pairs.is_empty()
        });
    }

    fn remove(&self, l: &L) {
        for f in [
            &self.opened,
            &self.closed,
            &self.failed,
            &self.sent,
            &self.received,
            &self.retrans,
            &self.packet_loss,
        ] {
            f.remove(l);
        }
    }

    fn handles(&self, l: &L) -> Handles {
        Handles {
            opened: self.opened.get_or_create_owned(l),
            closed: self.closed.get_or_create_owned(l),
            failed: self.failed.get_or_create_owned(l),
            sent: self.sent.get_or_create_owned(l),
            received: self.received.get_or_create_owned(l),
            retrans: self.retrans.get_or_create_owned(l),
            packet_loss: self.packet_loss.get_or_create_owned(l),
        }
    }

    /// Registers under `prefix` (`kmesh_tcp` or `kmesh_tcp_workload`); the crate appends
    /// `_total` to counters.
    fn register(&self, r: &mut Registry, prefix: &str, what: &str) {
        let families = [
            ("connections_opened", "TCP connections opened", &self.opened),
            ("connections_closed", "TCP connections closed", &self.closed),
            (
                "connections_failed",
                "TCP connections that never established (refused, reset or timed out)",
                &self.failed,
            ),
            ("sent_bytes", "Bytes sent during response (destination to source)", &self.sent),
            ("received_bytes", "Bytes received during request (source to destination)", &self.received),
            ("retrans", "Retransmitted TCP segments", &self.retrans),
            ("packet_loss", "TCP segments the sender marked lost at report time", &self.packet_loss),
        ];
        for (name, help, family) in families {
            r.register(format!("{prefix}_{name}"), format!("{help}, by {what}"), family.clone());
        }
    }
}

/// Per-connection counters (`kmesh_tcp_connection_*`), one series per open connection.
#[derive(Clone, Debug, Default)]
pub struct ConnectionFamilies {
    pub sent: Family<ConnectionLabels, Counter>,
    pub received: Family<ConnectionLabels, Counter>,
    pub retrans: Family<ConnectionLabels, Counter>,
    pub packet_lost: Family<ConnectionLabels, Counter>,
}

impl ConnectionFamilies {
    fn add(&self, l: &ConnectionLabels, d: &Progress) {
        self.sent.get_or_create(l).inc_by(d.from_dst);
        self.received.get_or_create(l).inc_by(d.from_src);
        self.retrans.get_or_create(l).inc_by(d.retrans);
        self.packet_lost.get_or_create(l).inc_by(d.lost);
    }

    fn remove(&self, l: &ConnectionLabels) {
        self.sent.remove(l);
        self.received.remove(l);
        self.retrans.remove(l);
        self.packet_lost.remove(l);
    }
}

/// Counters of one connection as last seen (source/destination view), or a difference.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub from_src: u64,
    pub from_dst: u64,
    pub retrans: u64,
    pub lost: u64,
}

impl Progress {
    fn since(&self, last: &Progress) -> Progress {
        Progress {
            from_src: self.from_src.saturating_sub(last.from_src),
            from_dst: self.from_dst.saturating_sub(last.from_dst),
            retrans: self.retrans.saturating_sub(last.retrans),
            lost: self.lost.saturating_sub(last.lost),
        }
    }

    /// A socket's counters as source/destination ones: what a server socket received is what
    /// its client sent.
    fn of_socket(outbound: bool, sent: u64, received: u64, retrans: u64, lost: u64) -> Progress {
        let (from_src, from_dst) = if outbound { (sent, received) } else { (received, sent) };
        Progress { from_src, from_dst, retrans, lost }
    }

    fn plus(&mut self, d: &Progress) {
        self.from_src += d.from_src;
        self.from_dst += d.from_dst;
        self.retrans += d.retrans;
        self.lost += d.lost;
    }

    /// Counters only grow (the kernel's lost count is momentary: keep the highest seen).
    fn max(&self, o: &Progress) -> Progress {
        Progress {
            from_src: self.from_src.max(o.from_src),
            from_dst: self.from_dst.max(o.from_dst),
            retrans: self.retrans.max(o.retrans),
            lost: self.lost.max(o.lost),
        }
    }
}

/// What one drain's events add to one peers' counters, added to them once at its end.
#[derive(Debug, Default)]
struct Tally {
    opened: u64,
    closed: u64,
    failed: u64,
    progress: Progress,
}

/// What every connection between the same peers (and for the same service) shares.
#[derive(Debug)]
struct Peers {
    service: ServiceLabels,
    workload: WorkloadLabels,
    by_service: Handles,
    by_workload: Handles,
    /// Uids of the source and destination workloads (None: not in the mesh).
    owners: Owners,
}

impl Peers {
    /// The counter sets the switches in force count into.
    fn counting(&self, m: &Monitoring) -> impl Iterator<Item = &Handles> {
        [(m.service_metrics, &self.by_service), (m.workload_metrics, &self.by_workload)]
            .into_iter()
            .filter_map(|(on, h)| on.then_some(h))
    }
}

/// The workloads a series is about: when one leaves the model, so does the series.
type Owners = (Option<kmesh_model::model::Istr>, Option<kmesh_model::model::Istr>);

/// Direction, source address, destination address and port, dialled service address and port.
type PeersKey = (u32, IpAddr, IpAddr, u16, IpAddr, u16);

/// A connection between its open and its close.
#[derive(Clone, Debug)]
struct OpenConn {
    peers: Arc<Peers>,
    src: SocketAddr,
    dst: SocketAddr,
    /// Its `kmesh_tcp_connection_*` series, when that family is on (boxed: a connection
    /// moves in and out of the open table at every event).
    connection: Option<Box<ConnectionLabels>>,
    last: Progress,
    seen: std::time::Instant,
}

/// One access-log record (a closed or failed connection).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AccessLog {
    pub src: String,
    pub src_workload: String,
    pub src_namespace: String,
    pub dst: String,
    pub dst_workload: String,
    pub dst_namespace: String,
    pub service: String,
    pub direction: &'static str,
    /// `closed`, or `failed` for a client connection that never established.
    pub state: &'static str,
    /// Bytes this socket sent and received.
    pub sent_bytes: u64,
    pub received_bytes: u64,
    pub retrans: u32,
    pub packet_loss: u32,
    pub srtt_us: u32,
    pub min_rtt_us: u32,
    pub duration_ms: f64,
    /// The waypoint (`namespace/workload`) the connection was sent to instead of the service's
    /// endpoints (empty: none).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub waypoint: String,
}

impl AccessLog {
    pub fn render(&self, format: LogFormat) -> String {
        match format {
            LogFormat::Json => serde_json::to_string(self).unwrap_or_default(),
            LogFormat::Text => {
                format!(
                    "src={} src_workload={}/{} dst={} dst_workload={}/{} service={} direction={} state={} sent_bytes={} received_bytes={} retrans={} packet_loss={} srtt={}us min_rtt={}us duration={:.3}ms",
                    self.src,
                    self.src_namespace,
                    self.src_workload,
                    self.dst,
                    self.dst_namespace,
                    self.dst_workload,
                    self.service,
                    self.direction,
                    self.state,
                    self.sent_bytes,
                    self.received_bytes,
                    self.retrans,
                    self.packet_loss,
                    self.srtt_us,
                    self.min_rtt_us,
                    self.duration_ms
                ) + &if self.waypoint.is_empty() {
                    String::new()
                } else {
                    format!(" waypoint={}", self.waypoint)
                }
            }
        }
    }
}

/// The model's workloads by address and services by (VIP, port), kept in step with the
/// model's changes (events arrive at connection rate; a scan of the model per event would not
/// scale, and neither would a rebuild per change).
#[derive(Debug, Default)]
struct Index {
    /// Address -> workloads listing it, smallest uid first: an address two workloads list
    /// belongs to the first uid (the rule the authorization compiler follows too).
    workloads: Claimed<(), Workload>,
    /// (VIP, port) -> services, smallest key first: a shared VIP belongs to the first service
    /// key (the compiler's rule).
    services: Claimed<u16, Service>,
    by_key: HashMap<kmesh_model::model::Istr, Arc<Service>>,
}

/// A map keyed by an address and a part `P`, IPv4 addresses held as 4 bytes (not the 17 of an
/// `IpAddr`): an entry of the workloads' address index is 16 bytes, the key and its owner's
/// pointer. Hashed with foldhash (seeded per process), not SipHash: a full push of 100k
/// workloads claims as many addresses, and every connection event looks two up.
#[derive(Debug)]
struct ByAddr<P, V> {
    v4: HashMap<(u32, P), V, foldhash::fast::RandomState>,
    v6: HashMap<(u128, P), V, foldhash::fast::RandomState>,
}

impl<P, V> Default for ByAddr<P, V> {
    fn default() -> Self {
        ByAddr { v4: HashMap::default(), v6: HashMap::default() }
    }
}

impl<P: std::hash::Hash + Eq, V> ByAddr<P, V> {
    fn get(&self, a: IpAddr, p: P) -> Option<&V> {
        match a {
            IpAddr::V4(a) => self.v4.get(&(a.to_bits(), p)),
            IpAddr::V6(a) => self.v6.get(&(a.to_bits(), p)),
        }
    }

    fn reserve(&mut self, n: usize) {
        self.v4.reserve(n);
    }

    fn get_mut(&mut self, a: IpAddr, p: P) -> Option<&mut V> {
        match a {
            IpAddr::V4(a) => self.v4.get_mut(&(a.to_bits(), p)),
            IpAddr::V6(a) => self.v6.get_mut(&(a.to_bits(), p)),
        }
    }

    fn insert(&mut self, a: IpAddr, p: P, v: V) {
        match a {
            IpAddr::V4(a) => self.v4.insert((a.to_bits(), p), v),
            IpAddr::V6(a) => self.v6.insert((a.to_bits(), p), v),
        };
    }

    fn remove(&mut self, a: IpAddr, p: P) {
        match a {
            IpAddr::V4(a) => self.v4.remove(&(a.to_bits(), p)),
            IpAddr::V6(a) => self.v6.remove(&(a.to_bits(), p)),
        };
    }
}

/// An index from an address (and a part `P`) to what claims it: the first claimant in key order
/// owns it, and the rare others wait apart, in key order, so that the owner is known again when
/// it goes. The common entry is one pointer: at 100k workloads the table is 2.2 MB, where an
/// entry that could also hold a list (two words) made it 3.3 MB.
#[derive(Debug)]
struct Claimed<P, T> {
    owners: ByAddr<P, Arc<T>>,
    waiting: ByAddr<P, Vec<Arc<T>>>,
}

impl<P, T> Default for Claimed<P, T> {
    fn default() -> Self {
        Claimed { owners: ByAddr::default(), waiting: ByAddr::default() }
    }
}

impl<P: std::hash::Hash + Eq + Copy, T: Claimant> Claimed<P, T> {
    fn owner(&self, a: IpAddr, p: P) -> Option<&Arc<T>> {
        self.owners.get(a, p)
    }

    fn reserve(&mut self, n: usize) {
        self.owners.reserve(n);
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        let (o, w) = (&self.owners, &self.waiting);
        o.v4.is_empty() && o.v6.is_empty() && w.v4.is_empty() && w.v6.is_empty()
    }

    /// Adds `v` as a claimant of `(a, p)`, replacing the claimant of the same key.
    fn claim(&mut self, a: IpAddr, p: P, v: &Arc<T>) {
        let Some(owner) = self.owners.get_mut(a, p) else {
            self.owners.insert(a, p, v.clone());
            return;
        };
        let order = v.claim_key().as_ref().cmp(owner.claim_key().as_ref());
        let waits = match order {
            std::cmp::Ordering::Equal => {
                *owner = v.clone();
                return;
            }
            std::cmp::Ordering::Less => std::mem::replace(owner, v.clone()),
            std::cmp::Ordering::Greater => v.clone(),
        };
        let key = waits.claim_key().into_owned();
        match self.waiting.get_mut(a, p) {
            Some(l) => match l.binary_search_by(|c| c.claim_key().as_ref().cmp(&key)) {
                Ok(i) => l[i] = waits,
                Err(i) => l.insert(i, waits),
            },
            None => self.waiting.insert(a, p, vec![waits]),
        }
    }

    /// Drops the claimant `key` of `(a, p)`; the first one waiting, if any, owns it next.
    fn unclaim(&mut self, a: IpAddr, p: P, key: &str) {
        let Some(owner) = self.owners.get_mut(a, p) else { return };
        let owns = owner.claim_key() == key;
        let Some(l) = self.waiting.get_mut(a, p) else {
            if owns {
                self.owners.remove(a, p);
            }
            return;
        };
        if owns {
            *owner = l.remove(0);
        } else {
            l.retain(|v| v.claim_key() != key);
        }
        if l.is_empty() {
            self.waiting.remove(a, p);
        }
    }
}

/// The key that orders claimants.
trait Claimant {
    fn claim_key(&self) -> std::borrow::Cow<'_, str>;
}

impl Claimant for Workload {
    fn claim_key(&self) -> std::borrow::Cow<'_, str> {
        std::borrow::Cow::Borrowed(&self.uid)
    }
}

impl Claimant for Service {
    fn claim_key(&self) -> std::borrow::Cow<'_, str> {
        std::borrow::Cow::Owned(self.key())
    }
}

impl Index {
    /// Takes in what `change` touched, as `model` now has it.
    fn update(&mut self, model: &Model, change: &ModelChange) {
        // A change touching much of the model (a first push) finds its workloads by one walk
        // over the model alongside it (both are in key order), not by a search each.
        let walk = change.workloads.len() * 4 >= model.workloads.len();
        let mut now = model.workloads.iter().peekable();
        let added = change.workloads.values().filter(|old| old.is_none()).count();
        self.workloads.reserve(added);
        for (uid, old) in &change.workloads {
            for a in old.iter().flat_map(|w| &w.addresses) {
                self.workloads.unclaim(*a, (), uid);
            }
            let w = if walk {
                kmesh_model::sorted::seek(&mut now, uid, |(k, _)| *k).map(|(_, w)| w)
            } else {
                model.workloads.get(uid)
            };
            if let Some(w) = w {
                for a in &w.addresses {
                    self.workloads.claim(*a, (), w);
                }
            }
        }
        for (key, old) in &change.services {
            if let Some(s) = old {
                for a in &s.addresses {
                    for p in &s.ports {
                        self.services.unclaim(*a, p.service_port, key);
                    }
                }
            }
            self.by_key.remove(key);
            if let Some(s) = model.services.get(key) {
                for a in &s.addresses {
                    for p in &s.ports {
                        self.services.claim(*a, p.service_port, s);
                    }
                }
                self.by_key.insert(key.clone(), s.clone());
            }
        }
    }
}

/// Open connections tracked at most: only a close event lost to a full ring buffer leaves one
/// behind. At the bound, connections without an event for 10 minutes are forgotten, and if that
/// is not enough the eighth with the oldest last event (counted in `open_evicted`): memory
/// stays bounded whatever the kernel sends.
pub const MAX_OPEN: usize = 524_288;

#[derive(Debug, Default)]
pub struct Telemetry {
    pub settings: Monitoring,
    pub service: TcpFamilies<ServiceLabels>,
    pub workload: TcpFamilies<WorkloadLabels>,
    pub connection: ConnectionFamilies,
    /// By socket cookie. Two lookups per kernel event: hashed with foldhash, not SipHash (the
    /// keys come from the kernel, not from the network).
    open: HashMap<u64, OpenConn, foldhash::fast::RandomState>,
    index: Index,
    /// Labels and counters by peers, valid for one model generation.
    peers: HashMap<PeersKey, Arc<Peers>, foldhash::fast::RandomState>,
    /// Every label set with a series, and the workload pairs that produced it.
    service_owners: HashMap<ServiceLabels, std::collections::HashSet<Owners>>,
    workload_owners: HashMap<WorkloadLabels, std::collections::HashSet<Owners>>,
    /// Events received from the kernel.
    pub events: u64,
    /// Connections the kernel summed by peers instead of reporting each (`TFLAG_TALLY`).
    pub tallied: u64,
    /// Open connections forgotten to stay within [`MAX_OPEN`].
    pub open_evicted: u64,
    /// The bound on open connections; 0 means [`MAX_OPEN`] (tests lower it).
    pub max_open: usize,
    /// Connections sent to a waypoint, by (waypoint `namespace/workload`, service).
    waypoint_connections: BTreeMap<(String, String), u64>,
    /// The counts of the drain being recorded, by peers (the address of their `Arc`): a short
    /// connection's record would otherwise be a dozen atomic adds on counters scattered over
    /// memory, most of the daemon's work per connection.
    pending: PendingTallies,
}

type PendingTallies = HashMap<usize, (Arc<Peers>, Tally), foldhash::fast::RandomState>;

/// Unknown peers get Istio's "unknown".
fn or_unknown(s: &str) -> String {
    if s.is_empty() { "unknown".into() } else { s.to_string() }
}

fn source_labels(w: Option<&Workload>) -> SourceLabels {
    let d = destination_labels(w);
    SourceLabels {
        source_workload: d.destination_workload,
        source_canonical_service: d.destination_canonical_service,
        source_canonical_revision: d.destination_canonical_revision,
        source_workload_namespace: d.destination_workload_namespace,
        source_principal: d.destination_principal,
        source_app: d.destination_app,
        source_version: d.destination_version,
        source_cluster: d.destination_cluster,
    }
}

fn destination_labels(w: Option<&Workload>) -> DestinationLabels {
    let Some(w) = w else {
        let u = || "unknown".to_string();
        return DestinationLabels {
            destination_workload: u(),
            destination_canonical_service: u(),
            destination_canonical_revision: u(),
            destination_workload_namespace: u(),
            destination_principal: u(),
            destination_app: u(),
            destination_version: u(),
            destination_cluster: u(),
        };
    };
    let workload = if w.workload_name.is_empty() { or_unknown(&w.name) } else { w.workload_name.to_string() };
    let canonical = if w.canonical_name.is_empty() { workload.clone() } else { w.canonical_name.to_string() };
    let revision =
        if w.canonical_revision.is_empty() { "latest".into() } else { w.canonical_revision.clone() };
    DestinationLabels {
        destination_workload: workload,
        destination_canonical_service: canonical.clone(),
        destination_canonical_revision: revision.to_string(),
        destination_workload_namespace: or_unknown(w.namespace()),
        destination_principal: Identity::of(w).principal(),
        destination_app: canonical,
        destination_version: revision.to_string(),
        destination_cluster: or_unknown(w.cluster_id()),
    }
}

/// Data bytes (sent, received) of a connection event (see [`kmesh_common::data_bytes`]).
pub fn data_bytes(e: &ConnEvent) -> (u64, u64) {
    kmesh_common::data_bytes(
        e.direction == DIR_OUTBOUND,
        e.kind == CONN_CLOSE,
        e.state,
        e.flags & EV_NO_PEER_FIN != 0,
        e.sent_bytes,
        e.received_bytes,
    )
}

/// Wall-clock time of an event that happened `ago` before now, in RFC 3339 (UTC, seconds).
fn rfc3339_ago(ago: std::time::Duration) -> String {
    let t = std::time::SystemTime::now().checked_sub(ago).unwrap_or(std::time::UNIX_EPOCH);
    let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

impl Telemetry {
    /// The service a connection was for: the VIP the client dialled, else the destination
    /// workload's service whose target port was reached.
    fn service_of(&self, e: &ConnEvent, dst: Option<&Workload>, dst_port: u16) -> Option<Arc<Service>> {
        if e.has_orig != 0
            && let Some(s) = self.index.services.owner(words_addr(e.orig_dst), e.orig_port)
        {
            return Some(s.clone());
        }
        let w = dst?;
        // The destination workload's own services, in key order (a few), not every service.
        for (key, maps) in w.services.iter() {
            let Some(s) = self.index.by_key.get(key.as_str()) else { continue };
            {
                let hit = s.ports.iter().any(|p| {
                    let target = maps
                        .iter()
                        .find(|m| m.service_port == p.service_port && m.target_port != 0)
                        .map(|m| m.target_port)
                        .unwrap_or(if p.target_port != 0 { p.target_port } else { p.service_port });
                    target == dst_port
                });
                if hit {
                    return Some(s.clone());
                }
            }
        }
        None
    }

    /// The connection an event is about: its peers' labels and counters (cached), addresses
    /// and, when that family is on, its own series.
    fn conn(&mut self, e: &ConnEvent, now: std::time::Instant) -> OpenConn {
        let outbound = e.direction == DIR_OUTBOUND;
        let (src, src_port, dst, dst_port) = if outbound {
            (e.local, e.local_port, e.remote, e.remote_port)
        } else {
            (e.remote, e.remote_port, e.local, e.local_port)
        };
        let (src_ip, dst_ip) = (words_addr(src), words_addr(dst));
        let orig = if e.has_orig != 0 { words_addr(e.orig_dst) } else { IpAddr::from([0u8; 16]) };
        let key = (e.direction, src_ip, dst_ip, dst_port, orig, e.orig_port);
        let peers = match self.peers.get(&key) {
            Some(p) => p.clone(),
            None => {
                let p = Arc::new(self.peers_of(e, outbound, src_ip, dst_ip, dst_port));
                if self.peers.len() >= MAX_OPEN {
                    self.peers.clear();
                }
                self.service_owners.entry(p.service.clone()).or_default().insert(p.owners.clone());
                self.workload_owners.entry(p.workload.clone()).or_default().insert(p.owners.clone());
                self.peers.insert(key, p.clone());
                p
            }
        };
        let (src, dst) = (SocketAddr::new(src_ip, src_port), SocketAddr::new(dst_ip, dst_port));
        OpenConn { peers, src, dst, connection: None, last: Progress::default(), seen: now }
    }

    /// The `kmesh_tcp_connection_*` labels of a connection (given to long-lived connections
    /// at their first report: short ones never pay for a series of their own).
    fn connection_labels(c: &OpenConn, e: &ConnEvent) -> ConnectionLabels {
        let p = &c.peers;
        ConnectionLabels {
            reporter: p.service.reporter.clone(),
            start_time: rfc3339_ago(std::time::Duration::from_nanos(e.duration_ns)),
            source_address: c.src.to_string(),
            destination_address: c.dst.to_string(),
            source: p.service.source.clone(),
            service: p.service.service.clone(),
            pod: p.workload.pod.clone(),
            destination: p.service.destination.clone(),
            protocol: p.service.protocol.clone(),
        }
    }

    fn peers_of(
        &self,
        e: &ConnEvent,
        outbound: bool,
        src_ip: IpAddr,
        dst_ip: IpAddr,
        dst_port: u16,
    ) -> Peers {
        let sw = self.index.workloads.owner(src_ip, ()).map(|w| w.as_ref());
        let dw = self.index.workloads.owner(dst_ip, ()).map(|w| w.as_ref());
        let svc = self.service_of(e, dw, dst_port);
        let reporter = if outbound { "source" } else { "destination" }.to_string();
        let source = source_labels(sw);
        let destination = destination_labels(dw);
        let service = match &svc {
            Some(s) => ServiceDestination {
                destination_service: s.hostname.to_string(),
                destination_service_namespace: s.namespace.to_string(),
                destination_service_name: s.name.to_string(),
            },
            None => ServiceDestination {
                destination_service: "unknown".into(),
                destination_service_namespace: "unknown".into(),
                destination_service_name: "unknown".into(),
            },
        };
        let pod = PodDestination {
            // Only pods of the mesh: a label per outside address would grow without bound.
            destination_pod_address: dw.map(|_| dst_ip.to_string()).unwrap_or_else(|| "unknown".into()),
            destination_pod_namespace: dw
                .map(|w| w.namespace().to_string())
                .unwrap_or_else(|| "unknown".into()),
            destination_pod_name: dw.map(|w| or_unknown(&w.name)).unwrap_or_else(|| "unknown".into()),
        };
        let protocol = Protocol {
            request_protocol: "tcp".into(),
            response_flags: "-".into(),
            connection_security_policy: "none".into(),
        };
        let service = ServiceLabels {
            reporter: reporter.clone(),
            source: source.clone(),
            service,
            destination: destination.clone(),
            protocol: protocol.clone(),
        };
        let workload = WorkloadLabels { reporter, source, pod, destination, protocol };
        Peers {
            by_service: self.service.handles(&service),
            by_workload: self.workload.handles(&workload),
            service,
            workload,
            owners: (sw.map(|w| w.uid.clone()), dw.map(|w| w.uid.clone())),
        }
    }

    /// Takes one kernel event in; returns its access-log line when it closes a connection and
    /// access logs are on. Names come from the model last given to [`model_changed`](Self::model_changed).
    pub fn record(&mut self, e: &ConnEvent) -> Option<String> {
        let line = self.record_at(e, std::time::Instant::now());
        self.flush();
        line
    }

    /// The kernel's events of one drain, in order, seen at `now` (one clock read for all of
    /// them: at tens of thousands of connections a second, reading the clock for each was a
    /// fifth of the daemon's work); returns the access-log lines.
    pub fn record_all(&mut self, events: &[ConnEvent]) -> Vec<String> {
        let now = std::time::Instant::now();
        let lines = events.iter().filter_map(|e| self.record_at(e, now)).collect();
        self.flush();
        lines
    }

    /// The kernel's sums of short connections by peers (see `kmesh_common::TallyKey`): each
    /// counts as that many connections, opened and closed (or failed), with these bytes.
    pub fn record_tallies(&mut self, sums: &[(TallyKey, TallyCounts)]) {
        if sums.is_empty() {
            return;
        }
        let now = std::time::Instant::now();
        for (k, v) in sums {
            let outbound = k.direction as u32 == DIR_OUTBOUND;
            // The peers of a record with these addresses and ports (the other side's port
            // plays no part in them).
            let (local_port, remote_port) = if outbound { (0, k.dst_port) } else { (k.dst_port, 0) };
            let e = ConnEvent {
                kind: CONN_CLOSE,
                direction: k.direction as u32,
                local: k.local,
                remote: k.remote,
                local_port,
                remote_port,
                orig_port: k.orig_port,
                has_orig: k.has_orig,
                orig_dst: k.orig_dst,
                ..ConnEvent::default()
            };
            let c = self.conn(&e, now);
            if v.opened != 0 {
                self.count_open(&c, &e, v.opened);
            }
            let t = Self::tally(&mut self.pending, &c.peers);
            t.closed += v.closed;
            t.failed += v.failed;
            t.progress.plus(&Progress::of_socket(outbound, v.sent, v.received, v.retrans, v.lost));
            self.tallied += v.closed + v.failed;
        }
        self.flush();
    }

    /// The counts of the events recorded since the last flush, into the counters.
    fn flush(&mut self) {
        for (_, (peers, t)) in self.pending.drain() {
            for h in peers.counting(&self.settings) {
                for (c, n) in [(&h.opened, t.opened), (&h.closed, t.closed), (&h.failed, t.failed)] {
                    if n != 0 {
                        c.inc_by(n);
                    }
                }
                h.add(&t.progress);
            }
        }
    }

    /// What the drain being recorded adds to `peers`' counters.
    fn tally<'a>(pending: &'a mut PendingTallies, peers: &Arc<Peers>) -> &'a mut Tally {
        &mut pending.entry(Arc::as_ptr(peers) as usize).or_insert_with(|| (peers.clone(), Tally::default())).1
    }

    /// [`record`](Self::record) of an event seen at `now`.
    fn record_at(&mut self, e: &ConnEvent, now: std::time::Instant) -> Option<String> {
        self.events += 1;
        // An open missed (daemon restarted, or telemetry switched on since): the connection
        // counts from its start.
        let mut c = match self.open.remove(&e.cookie) {
            Some(c) if e.kind != CONN_OPEN => c,
            _ => self.conn(e, now),
        };
        c.seen = now;
        match e.kind {
            CONN_OPEN => {
                self.count_open(&c, e, 1);
                if self.open.len() >= self.open_cap() {
                    self.make_room();
                }
                self.open.insert(e.cookie, c);
                None
            }
            CONN_REPORT | CONN_CLOSE => {
                if e.flags & EV_OPENED != 0 {
                    // The connection's first record: it carries the open.
                    self.count_open(&c, e, 1);
                }
                let (sent, received) = data_bytes(e);
                let outbound = e.direction == DIR_OUTBOUND;
                let now = Progress::of_socket(outbound, sent, received, e.retrans as u64, e.lost as u64);
                let delta = now.since(&c.last);
                let t = Self::tally(&mut self.pending, &c.peers);
                t.progress.plus(&delta);
                if e.kind == CONN_CLOSE {
                    t.closed += 1;
                    if let Some(l) = &c.connection {
                        self.connection.remove(l);
                    }
                    return self
                        .settings
                        .access_log
                        .then(|| self.access_log(e, &c, "closed", sent, received));
                }
                if self.settings.connection_metrics && c.connection.is_none() {
                    c.connection = Some(Box::new(Self::connection_labels(&c, e)));
                }
                if let Some(l) = &c.connection {
                    self.connection.add(l, &delta);
                }
                c.last = now.max(&c.last);
                self.open.insert(e.cookie, c);
                None
            }
            CONN_FAILED => {
                Self::tally(&mut self.pending, &c.peers).failed += 1;
                if let Some(l) = &c.connection {
                    self.connection.remove(l);
                }
                self.settings.access_log.then(|| self.access_log(e, &c, "failed", 0, 0))
            }
            _ => None,
        }
    }

    /// `n` opens of connections like `c`: counted by their peers, and by waypoint when they
    /// went through one.
    fn count_open(&mut self, c: &OpenConn, e: &ConnEvent, n: u64) {
        Self::tally(&mut self.pending, &c.peers).opened += n;
        if e.has_orig == ORIG_VIA_WAYPOINT && e.direction == DIR_OUTBOUND {
            let d = &c.peers.service.destination;
            let key = (
                format!("{}/{}", d.destination_workload_namespace, d.destination_workload),
                c.peers.service.service.destination_service.clone(),
            );
            // Bounded like the other tables: pairs past the bound are not counted.
            if self.waypoint_connections.len() < MAX_OPEN || self.waypoint_connections.contains_key(&key) {
                *self.waypoint_connections.entry(key).or_default() += n;
            }
        }
    }

    fn access_log(
        &self,
        e: &ConnEvent,
        c: &OpenConn,
        state: &'static str,
        sent: u64,
        received: u64,
    ) -> String {
        let l = &c.peers.service;
        AccessLog {
            src: c.src.to_string(),
            src_workload: l.source.source_workload.clone(),
            src_namespace: l.source.source_workload_namespace.clone(),
            dst: c.dst.to_string(),
            dst_workload: l.destination.destination_workload.clone(),
            dst_namespace: l.destination.destination_workload_namespace.clone(),
            service: l.service.destination_service.clone(),
            direction: if e.direction == DIR_OUTBOUND { "outbound" } else { "inbound" },
            state,
            sent_bytes: sent,
            received_bytes: received,
            retrans: e.retrans,
            packet_loss: e.lost,
            srtt_us: e.srtt_us,
            // No RTT sample yet (a connection that never established): the kernel keeps ~0.
            min_rtt_us: if e.min_rtt_us == u32::MAX { 0 } else { e.min_rtt_us },
            duration_ms: (e.duration_ns as f64 / 1e3).round() / 1e3,
            waypoint: if e.has_orig == ORIG_VIA_WAYPOINT {
                format!(
                    "{}/{}",
                    l.destination.destination_workload_namespace, l.destination.destination_workload
                )
            } else {
                String::new()
            },
        }
        .render(self.settings.access_log_format)
    }

    /// Re-indexes names, and deletes the series of workloads that left the model (as Kmesh
    /// does): a cluster with pod churn would otherwise grow its scrape forever.
    pub fn model_changed(&mut self, model: &Model, change: &ModelChange) {
        self.index.update(model, change);
        if change.workloads.is_empty() && change.services.is_empty() {
            return;
        }
        self.peers.clear();
        // Only a workload the model held before can have left it.
        let gone: Vec<&kmesh_model::model::Istr> = change
            .workloads
            .iter()
            .filter(|(uid, old)| old.is_some() && !model.workloads.contains_key(*uid))
            .map(|(uid, _)| uid)
            .collect();
        if gone.is_empty() {
            return;
        }
        let live = |o: &Owners| [&o.0, &o.1].iter().all(|u| u.as_ref().is_none_or(|u| !gone.contains(&u)));
        self.service.prune(&mut self.service_owners, live);
        self.workload.prune(&mut self.workload_owners, live);
    }

    /// Connections currently tracked between open and close.
    pub fn open_connections(&self) -> usize {
        self.open.len()
    }

    /// Frees room in the open-connection table: connections silent for 10 minutes go, then, if
    /// the table is still over seven eighths full, the oldest until it is not.
    fn make_room(&mut self) {
        let horizon = std::time::Duration::from_secs(600);
        let before = self.open.len();
        self.open.retain(|_, c| c.seen.elapsed() < horizon);
        let target = self.open_cap() / 8 * 7;
        if self.open.len() > target {
            let mut seen: Vec<(std::time::Instant, u64)> =
                self.open.iter().map(|(k, c)| (c.seen, *k)).collect();
            let excess = self.open.len() - target;
            seen.select_nth_unstable(excess - 1);
            for (_, k) in &seen[..excess] {
                self.open.remove(k);
            }
        }
        self.open_evicted += (before - self.open.len()) as u64;
    }

    fn open_cap(&self) -> usize {
        if self.max_open == 0 { MAX_OPEN } else { self.max_open.max(8) }
    }

    /// Forgets every open connection (the kernel stopped reporting: no close will come).
    pub fn forget_open(&mut self) {
        self.open.clear();
    }

    /// The workload an address belongs to in the model in force (indexed; see `Index`).
    pub fn workload_at(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.index.workloads.owner(ip, ())
    }

    /// Adds the TCP families to a registry.
    /// Connections sent to a waypoint since start, by (waypoint, service).
    pub fn waypoint_connections(&self) -> impl Iterator<Item = (&(String, String), &u64)> {
        self.waypoint_connections.iter()
    }

    pub fn register(&self, r: &mut Registry) {
        if self.settings.service_metrics {
            self.service.register(r, "kmesh_tcp", "source workload and destination service");
        }
        if self.settings.workload_metrics {
            self.workload.register(r, "kmesh_tcp_workload", "source and destination workload");
        }
        if !self.settings.connection_metrics {
            return;
        }
        let c = &self.connection;
        r.register(
            "kmesh_tcp_connection_sent_bytes",
            "Bytes sent during response on an open connection",
            c.sent.clone(),
        );
        r.register(
            "kmesh_tcp_connection_received_bytes",
            "Bytes received during request on an open connection",
            c.received.clone(),
        );
        r.register(
            "kmesh_tcp_connection_retrans",
            "Retransmitted segments on an open connection",
            c.retrans.clone(),
        );
        r.register(
            "kmesh_tcp_connection_packet_lost",
            "Segments marked lost on an open connection (highest seen)",
            c.packet_lost.clone(),
        );
    }

    /// The TCP families in Prometheus text format (what `/status/metric` serves of them).
    pub fn render(&self) -> String {
        let mut r = Registry::default();
        self.register(&mut r);
        let mut t = String::new();
        let _ = prometheus_client::encoding::text::encode_registry(&mut t, &r);
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmesh_common::tcp_state::TIME_WAIT;

    /// Gives `t` the model `next` as the mesh does: as a change from the model it `had`.
    fn give(t: &mut Telemetry, had: &mut Model, next: &Model) {
        let keys = kmesh_model::delta::ModelKeys::between(had, next);
        let change = had.take_from(next, &keys);
        t.model_changed(had, &change);
    }

    #[test]
    fn rfc3339_of_a_known_instant() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        // 2000-03-01T00:00:00Z = 951868800.
        let ago = now - std::time::Duration::from_secs(951_868_800);
        assert_eq!(rfc3339_ago(ago), "2000-03-01T00:00:00Z");
    }

    fn ev(kind: u32, sent: u64, received: u64, state: u32) -> ConnEvent {
        ConnEvent {
            kind,
            direction: DIR_OUTBOUND,
            sent_bytes: sent,
            received_bytes: received,
            state,
            cookie: 7,
            ..Default::default()
        }
    }

    /// Issue 13, item 7: the open-connection table is bounded whatever the kernel sends (opens
    /// whose closes never come), and emptied when the kernel stops reporting.
    #[test]
    fn the_open_connection_table_is_bounded_and_forgotten_when_telemetry_stops() {
        let mut t = Telemetry { max_open: 64, ..Default::default() };
        for cookie in 0..1000u64 {
            t.record(&ConnEvent { cookie, ..ev(CONN_OPEN, 0, 0, 1) });
            assert!(t.open_connections() <= 64, "{} open after {cookie}", t.open_connections());
        }
        assert!(t.open_evicted >= 1000 - 64, "{}", t.open_evicted);
        // The newest are kept.
        t.record(&ConnEvent { cookie: 999, ..ev(CONN_CLOSE, 10, 0, TIME_WAIT) });
        assert!(t.open_connections() < 64);
        t.forget_open();
        assert_eq!(t.open_connections(), 0);
    }

    /// An address two workloads list is the first uid's, in telemetry as in authorization.
    #[test]
    fn a_shared_workload_address_is_the_first_uids_everywhere() {
        let model = crate::config::parse(
            "workloads:\n  - {uid: b, name: b, namespace: d, service_account: sb, addresses: [10.0.0.9]}\n  - {uid: a, name: a, namespace: d, service_account: sa, addresses: [10.0.0.9]}\npolicies: [{name: p, namespace: d, rules: [{clauses: [{matches: [{}]}]}]}]\n",
        );
        // The YAML refuses duplicates; over xDS they arrive. Build the model by hand.
        assert!(model.is_err());
        let one = |uid: &str, sa: &str| {
            crate::config::parse(&format!(
                "workloads: [{{uid: {uid}, name: {uid}, namespace: d, service_account: {sa}, addresses: [10.0.0.9]}}]"
            ))
            .unwrap()
            .workloads
            .remove(uid)
            .unwrap()
        };
        let mut m = Model::default();
        m.workloads.insert("b".into(), one("b", "sb"));
        m.workloads.insert("a".into(), one("a", "sa"));
        // Identities are compiled where something is policed.
        m.policies = crate::config::parse(
            "policies: [{name: p, namespace: d, action: DENY, rules: [{clauses: [{matches: [{namespaces: [{exact: x}]}]}]}]}]",
        )
        .unwrap()
        .policies;
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let mut t = Telemetry::default();
        give(&mut t, &mut Model::default(), &m);
        assert_eq!(t.workload_at(ip).map(|w| w.uid.as_str()), Some("a"));
        let s = crate::authz::AuthzCompiler::default().compile(&m).unwrap();
        let id = s.identity[&crate::compile::addr_words(ip)];
        let a_only = {
            let mut m2 = m.clone();
            m2.workloads.remove("b");
            crate::authz::AuthzCompiler::default().compile(&m2).unwrap()
        };
        assert_eq!(id, a_only.identity[&crate::compile::addr_words(ip)], "the address carries a's identity");
    }

    /// The address index keeps every claimant of a shared address (IPv4 and IPv6 alike), so
    /// the owner is known again whichever of them comes or goes, and forgets the address when
    /// the last one goes.
    #[test]
    fn a_shared_address_passes_to_the_next_uid_as_claimants_come_and_go() {
        let one = |uid: &str, addr: &str| {
            crate::config::parse(&format!(
                "workloads: [{{uid: {uid}, name: {uid}, namespace: d, addresses: [\"{addr}\"]}}]"
            ))
            .unwrap()
            .workloads
            .remove(uid)
            .unwrap()
        };
        let (v4, v6): (IpAddr, IpAddr) = ("10.0.0.9".parse().unwrap(), "fd00::9".parse().unwrap());
        let mut t = Telemetry::default();
        let mut had = Model::default();
        let mut step = |uids: &[&str]| {
            let mut m = Model::default();
            for u in uids {
                m.workloads
                    .insert((*u).into(), one(u, if u.ends_with('6') { "fd00::9" } else { "10.0.0.9" }));
            }
            give(&mut t, &mut had, &m);
            (t.workload_at(v4).map(|w| w.uid.to_string()), t.workload_at(v6).map(|w| w.uid.to_string()))
        };
        let s = |x: &str| Some(x.to_string());
        assert_eq!(step(&["c"]), (s("c"), None));
        assert_eq!(step(&["c", "b", "a6"]), (s("b"), s("a6")));
        assert_eq!(step(&["c", "b", "a", "a6", "b6"]), (s("a"), s("a6")));
        assert_eq!(step(&["c", "b", "b6"]), (s("b"), s("b6")));
        assert_eq!(step(&["c"]), (s("c"), None));
        assert_eq!(step(&[]), (None, None));
        assert!(t.index.workloads.is_empty());
    }

    /// The value of the first series of metric `name` in a rendering.
    fn first_value(text: &str, name: &str) -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn reports_add_differences_and_the_close_completes_them() {
        let mut t = Telemetry::default();
        t.record(&ev(CONN_OPEN, 1, 0, 1));
        t.record(&ev(CONN_REPORT, 101, 50, 1));
        t.record(&ev(CONN_REPORT, 301, 60, 1));
        // Closed from TIME_WAIT: SYN and our FIN acked, their FIN received.
        let line = t.record(&ev(CONN_CLOSE, 302, 61, TIME_WAIT)).unwrap();
        assert!(line.contains("sent_bytes=300 received_bytes=60"), "{line}");
        let text = t.render();
        assert!(text.contains("kmesh_tcp_received_bytes_total{reporter=\"source\""), "{text}");
        let value = |name: &str| first_value(&text, name).unwrap_or_else(|| panic!("{name} in {text}"));
        // Client to server (received during request) 300, server to client 60.
        assert_eq!(value("kmesh_tcp_received_bytes_total"), 300);
        assert_eq!(value("kmesh_tcp_sent_bytes_total"), 60);
        assert_eq!(value("kmesh_tcp_workload_received_bytes_total"), 300);
        assert_eq!(value("kmesh_tcp_connections_closed_total"), 1);
        assert_eq!(t.open_connections(), 0);
    }

    /// Without eager opens a connection's open comes with its first record: a short one's
    /// close, a long one's first report. Each open counts once; a close or report without the
    /// flag (an open already reported, or missed) counts none.
    #[test]
    fn an_open_that_comes_with_the_first_record_counts_once() {
        let mut t = Telemetry::default();
        let value = |t: &Telemetry, name: &str| first_value(&t.render(), name).unwrap_or(0);
        // A short connection: its close is its only record.
        let first = |e: ConnEvent| ConnEvent { flags: e.flags | EV_OPENED, ..e };
        let line = t.record(&ConnEvent { cookie: 1, ..first(ev(CONN_CLOSE, 11, 5, TIME_WAIT)) }).unwrap();
        assert!(line.contains("sent_bytes=9 received_bytes=4"), "{line}");
        assert_eq!(value(&t, "kmesh_tcp_connections_opened_total"), 1);
        assert_eq!(value(&t, "kmesh_tcp_connections_closed_total"), 1);
        assert_eq!(t.open_connections(), 0);
        // A long one: its first report opens it, later ones and the close do not again.
        t.record(&ConnEvent { cookie: 2, ..first(ev(CONN_REPORT, 101, 50, 1)) });
        assert_eq!(value(&t, "kmesh_tcp_connections_opened_total"), 2);
        assert_eq!(t.open_connections(), 1);
        t.record(&ConnEvent { cookie: 2, ..ev(CONN_REPORT, 201, 50, 1) });
        t.record(&ConnEvent { cookie: 2, ..ev(CONN_CLOSE, 202, 51, TIME_WAIT) });
        assert_eq!(value(&t, "kmesh_tcp_connections_opened_total"), 2);
        assert_eq!(value(&t, "kmesh_tcp_connections_closed_total"), 2);
        assert_eq!(value(&t, "kmesh_tcp_received_bytes_total"), 9 + 200);
        // A failed connection never opened.
        t.record(&ConnEvent { cookie: 3, ..ev(CONN_FAILED, 0, 0, 2) });
        assert_eq!(value(&t, "kmesh_tcp_connections_opened_total"), 2);
    }

    /// A drain's events are counted once at its end, and come to the same counters as the
    /// same events recorded one at a time, also when two peers entries (ports 80 and 81 of
    /// unknown peers) count into one series.
    #[test]
    fn a_drain_counts_what_its_events_count_one_by_one() {
        let first = |e: ConnEvent| ConnEvent { flags: e.flags | EV_OPENED, ..e };
        let to = |port: u16, e: ConnEvent| ConnEvent { remote_port: port, ..e };
        let events: Vec<ConnEvent> = vec![
            ConnEvent { cookie: 1, ..first(to(80, ev(CONN_CLOSE, 11, 5, TIME_WAIT))) },
            ConnEvent { cookie: 2, ..first(to(81, ev(CONN_CLOSE, 21, 7, TIME_WAIT))) },
            ConnEvent { cookie: 3, ..first(to(80, ev(CONN_REPORT, 101, 50, 1))) },
            ConnEvent { cookie: 3, retrans: 2, ..to(80, ev(CONN_REPORT, 201, 50, 1)) },
            ConnEvent { cookie: 4, ..to(80, ev(CONN_FAILED, 0, 0, 2)) },
            ConnEvent { cookie: 3, ..to(80, ev(CONN_CLOSE, 202, 51, TIME_WAIT)) },
            ConnEvent { cookie: 5, ..first(to(80, ev(CONN_CLOSE, 31, 9, TIME_WAIT))) },
        ];
        let mut batch = Telemetry::default();
        batch.settings.access_log = true;
        let lines = batch.record_all(&events);
        let mut single = Telemetry::default();
        single.settings.access_log = true;
        let one_by_one: Vec<String> = events.iter().filter_map(|e| single.record(e)).collect();
        assert_eq!(lines.len(), 5, "four closes and a failure: {lines:?}");
        assert_eq!(lines.len(), one_by_one.len());
        let text = batch.render();
        assert_eq!(text, single.render());
        // Unknown peers on either port share one series: four opens and closes, one failure,
        // the bytes the four clients sent.
        let value = |name: &str| first_value(&text, name).unwrap_or_else(|| panic!("{name} in {text}"));
        assert_eq!(value("kmesh_tcp_connections_opened_total"), 4);
        assert_eq!(value("kmesh_tcp_connections_closed_total"), 4);
        assert_eq!(value("kmesh_tcp_connections_failed_total"), 1);
        assert_eq!(value("kmesh_tcp_received_bytes_total"), 9 + 19 + 200 + 29);
        assert_eq!(value("kmesh_tcp_retrans_total"), 2);
        assert!(batch.pending.is_empty(), "nothing is left uncounted after a drain");
    }

    /// The kernel's sums of short connections (`TFLAG_TALLY`) come to the same series as the
    /// connections' own records: by direction, with a server socket's destination port its
    /// local one, bytes turned around for the server side, failures not opened.
    #[test]
    fn kernel_sums_count_what_their_connections_count_one_by_one() {
        let first = |e: ConnEvent| ConnEvent { flags: e.flags | EV_OPENED, ..e };
        let a = |last: u8| crate::compile::addr_words(IpAddr::from([10, 0, 0, last]));
        let out = |cookie: u64, port: u16, e: ConnEvent| ConnEvent {
            cookie,
            local: a(1),
            remote: a(2),
            local_port: 40000 + cookie as u16,
            remote_port: port,
            ..e
        };
        let inb = |cookie: u64, e: ConnEvent| ConnEvent {
            direction: kmesh_common::DIR_INBOUND,
            local: a(2),
            remote: a(1),
            local_port: 8080,
            remote_port: 40000 + cookie as u16,
            ..out(cookie, 0, e)
        };
        let events = vec![
            out(1, 80, first(ev(CONN_CLOSE, 11, 5, TIME_WAIT))),
            out(2, 80, ConnEvent { retrans: 3, ..first(ev(CONN_CLOSE, 21, 7, TIME_WAIT)) }),
            out(3, 81, first(ev(CONN_CLOSE, 31, 9, TIME_WAIT))),
            out(4, 80, ev(CONN_FAILED, 0, 0, 2)),
            inb(1, first(ev(CONN_CLOSE, 5, 10, kmesh_common::tcp_state::LAST_ACK))),
            inb(2, first(ev(CONN_CLOSE, 7, 20, kmesh_common::tcp_state::LAST_ACK))),
        ];
        let mut records = Telemetry::default();
        records.record_all(&events);
        // What the kernel sums for the same connections.
        let mut sums: Vec<(TallyKey, TallyCounts)> = Vec::new();
        for e in &events {
            let outbound = e.direction == DIR_OUTBOUND;
            let key = TallyKey {
                epoch: 9,
                direction: e.direction as u16,
                local: e.local,
                remote: e.remote,
                dst_port: if outbound { e.remote_port } else { e.local_port },
                ..Default::default()
            };
            let i = sums.iter().position(|(k, _)| *k == key).unwrap_or_else(|| {
                sums.push((key, TallyCounts::default()));
                sums.len() - 1
            });
            let c = &mut sums[i].1;
            if e.kind == CONN_FAILED {
                c.failed += 1;
                continue;
            }
            let (sent, received) = data_bytes(e);
            c.opened += 1;
            c.closed += 1;
            c.sent += sent;
            c.received += received;
            c.retrans += e.retrans as u64;
        }
        assert_eq!(sums.len(), 3, "two ports out (the failure shares one), one port in");
        let mut summed = Telemetry::default();
        summed.record_tallies(&sums);
        let text = summed.render();
        // The same series with the same values (a family's series come in no set order).
        let sorted = |t: &str| {
            let mut l: Vec<String> = t.lines().map(str::to_string).collect();
            l.sort();
            l
        };
        assert_eq!(sorted(&text), sorted(&records.render()));
        assert_eq!(summed.tallied, 6);
        let value = |name: &str, reporter: &str| {
            sample_of(&text, name, reporter).unwrap_or_else(|| panic!("{name} {reporter} in {text}"))
        };
        assert_eq!(value("kmesh_tcp_connections_opened_total", "source"), 3);
        assert_eq!(value("kmesh_tcp_connections_failed_total", "source"), 1);
        // Client to server: without the SYN and the FIN.
        assert_eq!(value("kmesh_tcp_received_bytes_total", "source"), 9 + 19 + 29);
        assert_eq!(value("kmesh_tcp_retrans_total", "source"), 3);
        // The server side: what it received is what the client sent (data bytes).
        assert_eq!(value("kmesh_tcp_received_bytes_total", "destination"), 9 + 19);
        assert_eq!(value("kmesh_tcp_sent_bytes_total", "destination"), 4 + 6);
    }

    /// The first series of `name` by this reporter.
    fn sample_of(text: &str, name: &str, reporter: &str) -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{reporter=\"{reporter}\"")))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    #[test]
    fn series_of_a_workload_that_left_the_model_are_deleted() {
        let yaml = |with_s2: bool| {
            let mut y = String::from(
                "workloads:\n  - {uid: c, name: c, namespace: d, addresses: [10.0.0.1]}\n  - {uid: s1, name: s1, namespace: d, addresses: [10.0.0.2]}\n",
            );
            if with_s2 {
                y += "  - {uid: s2, name: s2, namespace: d, addresses: [10.0.0.3]}\n";
            }
            crate::config::parse(&y).unwrap()
        };
        let to = |ip: [u8; 4], cookie: u64, kind: u32| ConnEvent {
            kind,
            direction: DIR_OUTBOUND,
            local: crate::compile::addr_words(IpAddr::from([10, 0, 0, 1])),
            remote: crate::compile::addr_words(IpAddr::from(ip)),
            remote_port: 80,
            cookie,
            sent_bytes: 1,
            ..Default::default()
        };
        let mut t = Telemetry::default();
        let mut had = Model::default();
        give(&mut t, &mut had, &yaml(true));
        for (ip, cookie) in [([10, 0, 0, 2], 1), ([10, 0, 0, 3], 2), ([10, 0, 0, 9], 3)] {
            t.record(&to(ip, cookie, CONN_OPEN));
        }
        let text = t.render();
        assert!(text.contains("destination_pod_name=\"s2\"") && text.contains("destination_workload=\"s2\""));
        assert!(!text.contains("10.0.0.9"), "no series per outside address: {text}");
        give(&mut t, &mut had, &yaml(false));
        let text = t.render();
        assert!(!text.contains("\"s2\""), "s2's series went with it: {text}");
        assert!(text.contains("destination_pod_name=\"s1\"") && text.contains("destination_workload=\"s1\""));
    }

    #[test]
    fn json_access_log_and_switches() {
        let mut t = Telemetry::default();
        t.settings.access_log_format = LogFormat::Json;
        t.record(&ev(CONN_OPEN, 1, 0, 1));
        let line = t.record(&ev(CONN_CLOSE, 11, 5, 7)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!((v["sent_bytes"].as_u64(), v["state"].as_str()), (Some(10), Some("closed")), "{v}");
        t.settings.access_log = false;
        t.settings.service_metrics = false;
        assert!(t.record(&ev(CONN_FAILED, 0, 0, 2)).is_none());
        assert!(!t.render().contains("kmesh_tcp_connections_failed_total{"), "service family off");
        assert!(t.render().contains("kmesh_tcp_workload_connections_failed_total{"), "workload family on");
    }
}
