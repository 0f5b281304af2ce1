//! Connection telemetry: kernel open/close events turned into Istio-style TCP metrics and
//! access-log lines, with names taken from the model.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use kmesh_common::{CONN_CLOSE, CONN_OPEN, ConnEvent, DIR_OUTBOUND};

use crate::authz::Identity;
use crate::compile::words_addr;
use crate::model::Model;

/// Istio's standard labels (the TCP subset Kmesh reports).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Labels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub opened: u64,
    pub closed: u64,
    /// Bytes from the destination to the source (Istio: "sent during response").
    pub sent_bytes: u64,
    /// Bytes from the source to the destination (Istio: "received during request").
    pub received_bytes: u64,
    pub retrans: u64,
    pub packet_loss: u64,
}

#[derive(Debug, Default)]
pub struct Telemetry {
    pub series: BTreeMap<Labels, Counters>,
    pub events: u64,
}

fn who(model: &Model, addr: [u32; 4]) -> (String, String, String) {
    match model.workload_by_address(words_addr(addr)) {
        Some(w) => (w.name.clone(), w.namespace.clone(), Identity::of(w).principal()),
        None => ("unknown".into(), "unknown".into(), "unknown".into()),
    }
}

/// A metric family: name, help text, and the counter it reads.
type Family = (&'static str, &'static str, fn(&Counters) -> u64);

// TCP states (include/net/tcp_states.h).
const FIN_WAIT2: u32 = 5;
const TIME_WAIT: u32 = 6;
const CLOSE_WAIT: u32 = 8;
const LAST_ACK: u32 = 9;
const CLOSING: u32 = 11;

/// Data bytes (sent, received) of a closed connection. The kernel's `bytes_acked` also counts
/// the SYN (on the side that sent it, i.e. the client) and an acknowledged FIN, and
/// `bytes_received` counts a received FIN; which FINs were exchanged follows from the state
/// the socket was in when it closed.
pub fn data_bytes(e: &ConnEvent) -> (u64, u64) {
    let syn = u64::from(e.direction == DIR_OUTBOUND);
    let fin_acked = u64::from(matches!(e.state, FIN_WAIT2 | TIME_WAIT | LAST_ACK | CLOSING));
    let fin_received = u64::from(matches!(e.state, FIN_WAIT2 | TIME_WAIT | CLOSE_WAIT | LAST_ACK | CLOSING));
    (e.sent_bytes.saturating_sub(syn + fin_acked), e.received_bytes.saturating_sub(fin_received))
}

impl Telemetry {
    /// Records one event; returns the access-log line of a closed connection.
    pub fn record(&mut self, e: &ConnEvent, model: &Model) -> Option<String> {
        self.events += 1;
        let outbound = e.direction == DIR_OUTBOUND;
        let (src, src_port, dst, dst_port) = if outbound {
            (e.local, e.local_port, e.remote, e.remote_port)
        } else {
            (e.remote, e.remote_port, e.local, e.local_port)
        };
        let (sw, sns, sp) = who(model, src);
        let (dw, dns, dp) = who(model, dst);
        let service = if e.has_orig != 0 {
            let vip = words_addr(e.orig_dst);
            model
                .services
                .values()
                .find(|s| s.addresses.contains(&vip) && s.ports.iter().any(|p| p.service_port == e.orig_port))
                .map(|s| s.hostname.clone())
                .unwrap_or_else(|| "unknown".into())
        } else {
            "unknown".into()
        };
        let labels = Labels {
            reporter: if outbound { "source" } else { "destination" },
            source_workload: sw.clone(),
            source_workload_namespace: sns.clone(),
            source_principal: sp,
            destination_workload: dw.clone(),
            destination_workload_namespace: dns.clone(),
            destination_principal: dp,
            destination_service: service.clone(),
        };
        let (sent, received) = data_bytes(e);
        // From the socket's point of view: what it received is what its peer sent.
        let (from_src, from_dst) = if outbound { (sent, received) } else { (received, sent) };
        let c = self.series.entry(labels).or_default();
        match e.kind {
            CONN_OPEN => {
                c.opened += 1;
                None
            }
            CONN_CLOSE => {
                c.closed += 1;
                c.sent_bytes += from_dst;
                c.received_bytes += from_src;
                c.retrans += e.retrans as u64;
                c.packet_loss += e.lost as u64;
                Some(format!(
                    "src={} src_workload={sns}/{sw} dst={} dst_workload={dns}/{dw} service={service} direction={} state=closed sent_bytes={} received_bytes={} retrans={} packet_loss={} srtt={}us min_rtt={}us duration={:.3}ms",
                    SocketAddr::new(words_addr(src), src_port),
                    SocketAddr::new(words_addr(dst), dst_port),
                    if outbound { "outbound" } else { "inbound" },
                    sent,
                    received,
                    e.retrans,
                    e.lost,
                    e.srtt_us,
                    e.min_rtt_us,
                    e.duration_ns as f64 / 1e6
                ))
            }
            _ => None,
        }
    }

    /// The counters in Prometheus text format.
    pub fn render(&self) -> String {
        let families: [Family; 6] = [
            ("kmesh_tcp_connections_opened_total", "TCP connections opened", |c| c.opened),
            ("kmesh_tcp_connections_closed_total", "TCP connections closed", |c| c.closed),
            ("kmesh_tcp_sent_bytes_total", "Bytes sent during response (destination to source)", |c| {
                c.sent_bytes
            }),
            (
                "kmesh_tcp_received_bytes_total",
                "Bytes received during request (source to destination)",
                |c| c.received_bytes,
            ),
            ("kmesh_tcp_retrans_total", "Retransmitted segments", |c| c.retrans),
            ("kmesh_tcp_packet_loss_total", "Segments considered lost", |c| c.packet_loss),
        ];
        let mut t = String::new();
        for (name, help, get) in families {
            t += &format!("# HELP {name} {help}.\n# TYPE {name} counter\n");
            for (l, c) in &self.series {
                t += &format!(
                    "{name}{{reporter=\"{}\",source_workload=\"{}\",source_workload_namespace=\"{}\",source_principal=\"{}\",destination_workload=\"{}\",destination_workload_namespace=\"{}\",destination_principal=\"{}\",destination_service=\"{}\",request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"none\"}} {}\n",
                    l.reporter,
                    l.source_workload,
                    l.source_workload_namespace,
                    l.source_principal,
                    l.destination_workload,
                    l.destination_workload_namespace,
                    l.destination_principal,
                    l.destination_service,
                    get(c)
                );
            }
        }
        t
    }
}
