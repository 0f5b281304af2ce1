//! Addresses for mesh-only hostnames. A ServiceEntry-style service (a hostname outside the
//! Kubernetes service names, such as `api.example.com`) that the local file gives no address
//! cannot be dialled by name: like istiod's auto-allocation, which fills the same gap for
//! ServiceEntries, it is given one IPv4 address from 240.240.0.0/16 and one IPv6 address from
//! 2001:2::/48, chosen from a hash of its hostname so that it stays the same across reloads
//! and restarts (two hostnames whose hashes meet are told apart in the order of their keys; the
//! later one moves to the next free address). The DNS proxy answers the hostname with them and
//! the load balancer balances them like any VIP.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use crate::model::{Istr, Model, Service};

/// Whether a service gets addresses: none given (no VIP, no range), a plain hostname (not a
/// wildcard), and not a Kubernetes service name (`name.namespace.svc...`, where no address
/// means headless: its name resolves to its workloads).
pub fn needs_address(s: &Service) -> bool {
    s.addresses.is_empty()
        && s.address_ranges.is_empty()
        && !s.hostname.is_empty()
        && !s.hostname.starts_with('*')
        && s.hostname.split('.').nth(2) != Some("svc")
}

fn fnv64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.to_ascii_lowercase().trim_end_matches('.').bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The IPv4 address at `slot` (1..=65534) of 240.240.0.0/16.
fn v4(slot: u64) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(240, 240, (slot >> 8) as u8, slot as u8))
}

/// The IPv6 address in 2001:2::/48 with `low` as its last 64 bits.
fn v6(low: u64) -> IpAddr {
    let w = |i: u32| (low >> (48 - 16 * i)) as u16;
    IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, 0, w(0), w(1), w(2), w(3)))
}

/// Gives every service that [`needs_address`] one IPv4 and one IPv6 address, marked
/// `auto_allocated`. Deterministic: the same model gets the same addresses.
pub fn auto_allocate(model: &mut Model) {
    let mut used: BTreeSet<IpAddr> =
        model.services.values().flat_map(|s| s.addresses.iter().copied()).collect();
    let keys: Vec<Istr> =
        model.services.iter().filter(|(_, s)| needs_address(s)).map(|(k, _)| k.clone()).collect();
    for key in keys {
        let svc = model.services.get_mut(&key).expect("key taken from the map");
        let h = fnv64(&svc.hostname);
        let mut slot = h % 65534;
        let a4 = loop {
            let a = v4(slot + 1);
            if used.insert(a) {
                break a;
            }
            slot = (slot + 1) % 65534;
        };
        let mut low = h;
        let a6 = loop {
            let a = v6(low);
            if used.insert(a) {
                break a;
            }
            low = low.wrapping_add(1);
        };
        let s = Arc::make_mut(svc);
        s.addresses = vec![a4, a6].into();
        s.auto_allocated = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(yaml: &str) -> Model {
        crate::config::parse(yaml).unwrap()
    }

    #[test]
    fn mesh_only_hostnames_get_stable_addresses_in_istios_ranges() {
        let m = model(
            "services:
  - {name: api, namespace: default, hostname: api.example.com, ports: [{service_port: 80}]}
  - {name: db, namespace: default, hostname: db.default.svc.cluster.local, ports: [{service_port: 5432}]}
  - {name: w, namespace: default, hostname: '*.wild.example', ports: [{service_port: 80}]}
  - {name: given, namespace: default, hostname: given.example.com, addresses: [10.96.0.9], ports: [{service_port: 80}]}
",
        );
        let api = &m.services["default/api.example.com"];
        assert!(api.auto_allocated);
        assert_eq!(api.addresses.len(), 2);
        match (api.addresses[0], api.addresses[1]) {
            (IpAddr::V4(a), IpAddr::V6(b)) => {
                assert_eq!(a.octets()[..2], [240, 240]);
                assert_eq!(b.segments()[..3], [0x2001, 2, 0]);
            }
            other => panic!("{other:?}"),
        }
        // Headless Kubernetes services, wildcards and services with addresses are left alone.
        for k in
            ["default/db.default.svc.cluster.local", "default/*.wild.example", "default/given.example.com"]
        {
            assert!(!m.services[k].auto_allocated, "{k}");
        }
        assert_eq!(
            m.services["default/given.example.com"].addresses,
            vec!["10.96.0.9".parse::<IpAddr>().unwrap()]
        );
        // The same hostname gets the same addresses in another model with other services.
        let m2 = model(
            "services:
  - {name: other, namespace: x, hostname: other.example.org, ports: [{service_port: 80}]}
  - {name: api, namespace: default, hostname: api.example.com, ports: [{service_port: 80}]}
",
        );
        assert_eq!(m2.services["default/api.example.com"].addresses, api.addresses);
    }

    #[test]
    fn colliding_hostnames_get_distinct_addresses() {
        let mut m = Model::default();
        for i in 0..3000 {
            let s = Service {
                name: format!("s{i}").into(),
                namespace: "n".into(),
                hostname: format!("h{i}.example.com").into(),
                ..Default::default()
            };
            m.services.insert(s.key().into(), Arc::new(s));
        }
        auto_allocate(&mut m);
        let all: BTreeSet<IpAddr> = m.services.values().flat_map(|s| s.addresses.iter().copied()).collect();
        assert_eq!(all.len(), 6000, "every address is distinct");
    }
}
