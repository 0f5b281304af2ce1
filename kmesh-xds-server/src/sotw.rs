//! State-of-the-world ADS (`StreamAggregatedResources`), as Envoy speaks it with
//! `api_type: GRPC`: every response of a type carries the whole set the stream subscribed to
//! (every resource of a wildcard type, every named one that exists of EDS and RDS), with a
//! version and a nonce. A request that names the latest nonce of its type ACKs it (or NACKs it
//! with `error_detail`); one that names an older nonce is stale and ignored, as the xDS protocol
//! says; one that names a nonce never sent is a protocol violation. A request may change the
//! names of a named subscription at any time; the stream then gets the new set.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::pin::Pin;

use kmesh_proto::discovery::{DiscoveryRequest, DiscoveryResponse};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{ControlPlane, NAMED_TYPES, Subscription, TYPES, TypeState};

pub(crate) type SotwStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

/// How many of a type's latest nonces a stream remembers. A request naming one of them that is
/// not the latest is stale; one naming a nonce before all of them (once the history is full)
/// is taken as stale too, as it cannot be told from one never sent.
const NONCE_HISTORY: usize = 256;

/// One subscribed type on one stream.
#[derive(Default)]
struct Watch {
    /// `None`: every resource of the type.
    names: Option<BTreeSet<String>>,
    /// The latest nonces sent for this type (at most [`NONCE_HISTORY`], oldest first), to
    /// tell a stale nonce from one never sent; `latest` is the only one an ACK may name.
    nonces: VecDeque<String>,
    latest: Option<String>,
    /// Whether the latest response was ACKed or NACKed.
    answered: bool,
    /// The change sequence number the latest response was current to.
    seq: u64,
    /// Subscribed while the type was held: answered on release.
    owed: bool,
}

#[derive(Default)]
pub(crate) struct StreamState {
    node: Option<String>,
    types: BTreeMap<String, Watch>,
}

impl ControlPlane {
    pub(crate) fn sotw_stream(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        self.open_stream(request.metadata())?;
        let rx = self.drive(
            request.into_inner(),
            StreamState::default(),
            |cp, st, req| cp.on_sotw_request(st, req).map(|r| r.into_iter().collect()),
            |cp, st| {
                let types: Vec<String> = st.types.keys().cloned().collect();
                types.iter().filter_map(|t| cp.sotw_update(st, t)).collect()
            },
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    fn on_sotw_request(
        &self,
        st: &mut StreamState,
        req: DiscoveryRequest,
    ) -> Result<Option<DiscoveryResponse>, Status> {
        let node = self.accept_node(&mut st.node, req.node.as_ref())?;
        let t = req.type_url.as_str();
        if !TYPES.contains(&t) {
            return Err(self.violation(format!("unknown type_url {t:?}")));
        }
        // As istiod reads it: no names is every resource of a wildcard type, and none of a
        // named one (an EDS or RDS subscription emptied); `*` is every resource of either.
        let named = NAMED_TYPES.contains(&t);
        let wildcard = req.resource_names == ["*"] || (req.resource_names.is_empty() && !named);
        if !wildcard && !named {
            return Err(self.violation(format!(
                "{t} is a wildcard type; named subscriptions {:?} are not served",
                req.resource_names
            )));
        }
        let names = (!wildcard).then(|| req.resource_names.iter().cloned().collect::<BTreeSet<_>>());
        let w = st.types.entry(t.to_string()).or_default();
        if !req.response_nonce.is_empty() {
            // Older than the history: sent (nonces count up) or never; taken as stale.
            let seq = |n: &str| n.strip_prefix('n').and_then(|v| v.parse::<u64>().ok());
            let older = matches!(
                (seq(&req.response_nonce), w.nonces.front().and_then(|n| seq(n))),
                (Some(a), Some(oldest)) if a < oldest && w.nonces.len() == NONCE_HISTORY
            );
            if !older && !w.nonces.contains(&req.response_nonce) {
                return Err(self.violation(format!(
                    "request for {t} names nonce {:?}, which was never sent for it",
                    req.response_nonce
                )));
            }
            if w.latest.as_ref() != Some(&req.response_nonce) {
                // Stale: a newer response is on its way; its ACK will say what the client wants.
                return Ok(None);
            }
            if !w.answered {
                w.answered = true;
                let error = req.error_detail.as_ref().map(|s| s.message.clone());
                self.record_answer(&node, t, &req.response_nonce, error);
            }
            if names == w.names {
                return Ok(None);
            }
            w.names = names;
        } else {
            // A subscription (the stream's first request of this type, or a repeat of it).
            self.state.lock().unwrap().subscriptions.push(Subscription {
                node,
                type_url: t.to_string(),
                initial_resource_versions: BTreeMap::new(),
            });
            w.names = names;
            if self.is_held(t) {
                w.owed = true;
                return Ok(None);
            }
        }
        Ok(Some(self.sotw_response(st, t)))
    }

    /// The whole set of `type_url` the stream subscribed to, if anything in it changed since its
    /// latest response (or the subscription is owed an answer and no longer held).
    fn sotw_update(&self, st: &mut StreamState, type_url: &str) -> Option<DiscoveryResponse> {
        let w = st.types.get_mut(type_url)?;
        if w.owed {
            if self.is_held(type_url) {
                return None;
            }
            w.owed = false;
            return Some(self.sotw_response(st, type_url));
        }
        let started = std::time::Instant::now();
        let s = self.state.lock().unwrap();
        let now = s.seq;
        let empty = TypeState::default();
        let log = &s.resources.get(type_url).unwrap_or(&empty).log;
        let touched =
            log.range(w.seq + 1..).any(|(_, n)| w.names.as_ref().is_none_or(|names| names.contains(&**n)));
        drop(s);
        self.push_ns.fetch_add(started.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
        if !touched {
            w.seq = now;
            return None;
        }
        Some(self.sotw_response(st, type_url))
    }

    /// A response with the stream's whole set of `type_url`, recorded as its latest.
    fn sotw_response(&self, st: &mut StreamState, type_url: &str) -> DiscoveryResponse {
        let started = std::time::Instant::now();
        let w = st.types.entry(type_url.to_string()).or_default();
        let mut s = self.state.lock().unwrap();
        let now = s.seq;
        s.next_nonce += 1;
        let nonce = format!("n{}", s.next_nonce);
        let empty = TypeState::default();
        let items = &s.resources.get(type_url).unwrap_or(&empty).items;
        let any =
            |b: &prost::bytes::Bytes| kmesh_proto::Any { type_url: type_url.to_string(), value: b.to_vec() };
        let resources = match &w.names {
            None => items.values().map(|(_, b)| any(b)).collect(),
            Some(names) => names.iter().filter_map(|n| items.get(n.as_str())).map(|(_, b)| any(b)).collect(),
        };
        let resp = DiscoveryResponse {
            version_info: format!("v{now}"),
            resources,
            type_url: type_url.to_string(),
            nonce: nonce.clone(),
            ..Default::default()
        };
        drop(s);
        if w.nonces.len() == NONCE_HISTORY {
            w.nonces.pop_front();
        }
        w.nonces.push_back(nonce.clone());
        w.latest = Some(nonce.clone());
        w.answered = false;
        w.seq = now;
        self.push_ns.fetch_add(started.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
        self.record_push(&nonce, now);
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(t: &str, names: &[&str], nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            node: Some(kmesh_proto::core::Node {
                id: "sidecar~10.0.0.5~a.default~default.svc.cluster.local".into(),
                ..Default::default()
            }),
            type_url: t.into(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn sizes(r: &DiscoveryResponse) -> Vec<u8> {
        r.resources.iter().map(|a| a.value[0]).collect()
    }

    /// Each response carries the whole subscribed set; an ACK of the latest nonce is recorded,
    /// a stale one ignored, an unknown one refused; a change of names is answered at once.
    #[test]
    fn every_response_is_the_whole_set_and_only_the_latest_nonce_counts() {
        const L: &str = kmesh_proto::envoy::LISTENER_TYPE;
        const E: &str = kmesh_proto::envoy::ENDPOINT_TYPE;
        let cp = ControlPlane::new();
        cp.replace_all(L, [("a".to_string(), vec![1]), ("b".to_string(), vec![2])].into());
        cp.replace_all(E, [("x".to_string(), vec![7]), ("y".to_string(), vec![8])].into());
        let mut st = StreamState::default();
        let first = cp.on_sotw_request(&mut st, req(L, &[], "")).unwrap().unwrap();
        assert_eq!(sizes(&first), [1, 2]);
        cp.set(L, [("c".to_string(), vec![3])]);
        let second = cp.sotw_update(&mut st, L).unwrap();
        assert_eq!(sizes(&second), [1, 2, 3], "the whole set, not the change");
        assert!(cp.sotw_update(&mut st, L).is_none(), "nothing changed since");
        // The first nonce is stale now: ignored, not recorded.
        assert!(cp.on_sotw_request(&mut st, req(L, &[], &first.nonce)).unwrap().is_none());
        assert!(cp.acks().is_empty());
        assert!(cp.on_sotw_request(&mut st, req(L, &[], &second.nonce)).unwrap().is_none());
        assert_eq!(cp.acks().len(), 1);
        assert!(cp.on_sotw_request(&mut st, req(L, &[], "n999")).is_err(), "never sent");
        // Named: only what is named; a change of names is answered with the new set.
        let mut st = StreamState::default();
        let r = cp.on_sotw_request(&mut st, req(E, &["x", "z"], "")).unwrap().unwrap();
        assert_eq!(sizes(&r), [7]);
        cp.set(E, [("y".to_string(), vec![9])]);
        assert!(cp.sotw_update(&mut st, E).is_none(), "y is not subscribed");
        let r = cp.on_sotw_request(&mut st, req(E, &["x", "y"], &r.nonce)).unwrap().unwrap();
        assert_eq!(sizes(&r), [7, 9]);
        // Emptied: none (not every one, as for a wildcard type).
        let r = cp.on_sotw_request(&mut st, req(E, &[], &r.nonce)).unwrap().unwrap();
        assert!(r.resources.is_empty());
        // A wildcard type named by resource is refused.
        let mut st = StreamState::default();
        assert!(cp.on_sotw_request(&mut st, req(L, &["a"], "")).is_err());
    }
}
