//! Passive outlier detection from what the kernel sees: each outbound connection the connect
//! programs sent to an endpoint either establishes (the handshake completed) or fails before it
//! does (refused, reset, timed out). An endpoint that fails `consecutive_failures` times in a
//! row is ejected: the compiler leaves it out of every table, so new connections skip it,
//! until its ejection time has passed at an interval check. Pure: time is passed in.
//!
//! Envoy's semantics, per endpoint address: ejection time is `base_ejection_ms` times the
//! number of times the endpoint was ejected (at most `max_ejection_ms`); at most
//! `max_ejection_percent` of a service's endpoints are out at once, but one may always go;
//! an ejected endpoint returns at the first interval check after its time, whatever its state
//! (if it still fails, it is ejected again, for longer).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use kmesh_model::model::{Istr, Model, OutlierDetection};

#[derive(Clone, Debug, Default)]
struct Host {
    consecutive: u32,
    ejections: u32,
    /// When it was ejected and for how long.
    ejected: Option<(Instant, Duration)>,
}

/// The detector's state; `ejected()` is what the compiler leaves out.
#[derive(Debug, Default)]
pub struct Detector {
    /// The node's default (the workload-API mode's flags); services may carry their own.
    pub default: Option<OutlierDetection>,
    hosts: HashMap<IpAddr, Host>,
    ejected: BTreeSet<IpAddr>,
    next_check: Option<Instant>,
    /// Ejections since start, for the metrics.
    pub ejections_total: u64,
}

/// The services an address backs, with their settings (the first service's wins) and member
/// addresses, for the ejection cap.
fn services_of(model: &Model, ip: IpAddr) -> Vec<(String, Option<OutlierDetection>, Vec<IpAddr>)> {
    let keys: BTreeSet<&Istr> = model
        .workloads
        .values()
        .filter(|w| w.addresses.contains(&ip))
        .flat_map(|w| w.services.keys())
        .collect();
    keys.into_iter()
        .map(|k| {
            let members = model
                .workloads
                .values()
                .filter(|w| w.services.get(k.as_str()).is_some())
                .flat_map(|w| w.addresses.first().copied())
                .collect();
            (
                k.to_string(),
                model.services.get(k.as_str()).and_then(|s| s.outlier.as_deref().copied()),
                members,
            )
        })
        .collect()
}

impl Detector {
    pub fn new(default: Option<OutlierDetection>) -> Self {
        Self { default, ..Default::default() }
    }

    /// Whether any detection can happen (a default, or a service that asks for it).
    pub fn active(&self, model: &Model) -> bool {
        self.default.is_some() || model.services.values().any(|s| s.outlier.is_some())
    }

    /// Whether successes still matter (an endpoint is out or has failures counted).
    pub fn busy(&self) -> bool {
        !self.ejected.is_empty() || self.hosts.values().any(|h| h.consecutive > 0)
    }

    pub fn ejected(&self) -> &BTreeSet<IpAddr> {
        &self.ejected
    }

    /// Takes connection outcomes in (`true`: established). Returns whether the ejected set
    /// changed.
    pub fn record(&mut self, model: &Model, outcomes: &[(IpAddr, bool)], now: Instant) -> bool {
        let mut changed = false;
        for (ip, ok) in outcomes {
            if *ok {
                if let Some(h) = self.hosts.get_mut(ip) {
                    h.consecutive = 0;
                    if h.ejections == 0 {
                        self.hosts.remove(ip);
                    }
                }
                continue;
            }
            let h = self.hosts.entry(*ip).or_default();
            h.consecutive += 1;
            if h.ejected.is_some() {
                continue;
            }
            let services = services_of(model, *ip);
            let Some(cfg) = services.iter().find_map(|(_, c, _)| *c).or(self.default) else { continue };
            if h.consecutive < cfg.consecutive_failures.max(1) {
                continue;
            }
            // The cap: in every service it backs, the ejected share stays within the percent
            // (counting this one), unless none is out yet.
            let allowed = services.iter().all(|(_, _, members)| {
                let out = members.iter().filter(|m| self.ejected.contains(m)).count();
                out == 0 || (out + 1) * 100 <= members.len() * cfg.max_ejection_percent as usize
            });
            if !allowed {
                continue;
            }
            let h = self.hosts.get_mut(ip).expect("inserted above");
            h.ejections += 1;
            let len = Duration::from_millis(
                cfg.base_ejection_ms.saturating_mul(u64::from(h.ejections)).min(cfg.max_ejection_ms.max(1)),
            );
            h.ejected = Some((now, len));
            h.consecutive = 0;
            self.ejected.insert(*ip);
            self.ejections_total += 1;
            changed = true;
            tracing::warn!(endpoint = %ip, ejection_ms = len.as_millis() as u64, times = h.ejections,
                "outlier ejected: new connections skip it");
            let check = now + Duration::from_millis(cfg.interval_ms.max(1));
            self.next_check = Some(self.next_check.map_or(check, |c| c.min(check)));
        }
        changed
    }

    /// The interval check: endpoints whose ejection time has passed return. Returns whether
    /// the ejected set changed.
    pub fn tick(&mut self, model: &Model, now: Instant) -> bool {
        let Some(at) = self.next_check else { return false };
        if now < at {
            return false;
        }
        let mut back = Vec::new();
        for ip in &self.ejected {
            if let Some(Host { ejected: Some((since, len)), .. }) = self.hosts.get(ip)
                && now >= *since + *len
            {
                back.push(*ip);
            }
        }
        for ip in &back {
            if let Some(h) = self.hosts.get_mut(ip) {
                h.ejected = None;
                h.consecutive = 0;
            }
            self.ejected.remove(ip);
            tracing::info!(endpoint = %ip, "outlier returned: new connections may use it again");
        }
        // The next check, at the shortest interval among the endpoints still out.
        self.next_check = self
            .ejected
            .iter()
            .filter_map(|ip| services_of(model, *ip).iter().find_map(|(_, c, _)| *c).or(self.default))
            .map(|c| now + Duration::from_millis(c.interval_ms.max(1)))
            .min();
        !back.is_empty()
    }

    /// What `/debug/config_dump` shows: each ejected endpoint with the time it has left.
    pub fn status(&self, now: Instant) -> BTreeMap<String, serde_json::Value> {
        self.ejected
            .iter()
            .filter_map(|ip| {
                let h = self.hosts.get(ip)?;
                let (since, len) = h.ejected?;
                let left = (since + len).saturating_duration_since(now);
                Some((
                    ip.to_string(),
                    serde_json::json!({"times_ejected": h.ejections, "ms_left": left.as_millis() as u64}),
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmesh_model::model::{PortMapping, Service, Workload};
    use std::sync::Arc;

    fn model(n: u8, cfg: Option<OutlierDetection>) -> Model {
        let mut m = Model::default();
        m.services
            .insert("ns/s".into(), Arc::new(Service { outlier: cfg.map(Box::new), ..Default::default() }));
        for i in 1..=n {
            let services = [(Istr::new("ns/s"), Vec::<PortMapping>::new())].into_iter().collect();
            m.workloads.insert(
                Istr::unique(&format!("w{i}")),
                Arc::new(Workload {
                    uid: Istr::unique(&format!("w{i}")),
                    addresses: kmesh_model::model::Addrs::One(IpAddr::from([10, 0, 0, i])),
                    services,
                    ..Default::default()
                }),
            );
        }
        m
    }

    fn ip(i: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, i])
    }

    const CFG: OutlierDetection = OutlierDetection {
        consecutive_failures: 3,
        base_ejection_ms: 1000,
        max_ejection_ms: 300_000,
        max_ejection_percent: 50,
        interval_ms: 100,
    };

    #[test]
    fn ejected_after_consecutive_failures_and_back_after_base_times_count() {
        let m = model(4, Some(CFG));
        let mut d = Detector::default();
        let t0 = Instant::now();
        // A success in between resets the count.
        assert!(!d.record(&m, &[(ip(1), false), (ip(1), false), (ip(1), true), (ip(1), false)], t0));
        assert!(!d.record(&m, &[(ip(1), false)], t0));
        assert!(d.record(&m, &[(ip(1), false)], t0), "third in a row");
        assert_eq!(d.ejected().iter().copied().collect::<Vec<_>>(), [ip(1)]);
        // Not back before its time, back at the first check after it.
        assert!(!d.tick(&m, t0 + Duration::from_millis(950)));
        assert!(d.tick(&m, t0 + Duration::from_millis(1050)));
        assert!(d.ejected().is_empty());
        // Ejected again: twice as long.
        let t1 = t0 + Duration::from_secs(2);
        d.record(&m, &[(ip(1), false); 3], t1);
        assert!(!d.tick(&m, t1 + Duration::from_millis(1500)));
        assert!(d.tick(&m, t1 + Duration::from_millis(2100)));
    }

    #[test]
    fn at_most_the_percent_is_out_but_one_always_may_go() {
        let m = model(4, Some(CFG));
        let mut d = Detector::default();
        let t = Instant::now();
        for i in 1..=4 {
            d.record(&m, &[(ip(i), false); 3], t);
        }
        assert_eq!(d.ejected().len(), 2, "50% of 4");
        let m = model(2, Some(OutlierDetection { max_ejection_percent: 10, ..CFG }));
        let mut d = Detector::default();
        for i in 1..=2 {
            d.record(&m, &[(ip(i), false); 3], t);
        }
        assert_eq!(d.ejected().len(), 1, "10% of 2 rounds to none, but one may go");
    }

    #[test]
    fn nothing_happens_without_settings_and_the_node_default_applies() {
        let m = model(2, None);
        let mut d = Detector::default();
        assert!(!d.record(&m, &[(ip(1), false); 10], Instant::now()));
        let mut d = Detector::new(Some(CFG));
        assert!(d.record(&m, &[(ip(1), false); 3], Instant::now()));
    }
}
