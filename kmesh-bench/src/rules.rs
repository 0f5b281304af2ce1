//! The services every data path is given, and the kube-proxy-style rule sets for them: the
//! iptables-restore input of kube-proxy's iptables mode and the nft script of its nftables
//! mode. Both are loaded inside a client pod's network namespace only (nat OUTPUT), never in
//! the root namespace.

use std::fmt::Write;
use std::net::Ipv4Addr;

/// The service every data path is measured on.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const HTTP_PORT: u16 = 80;
pub const NGINX_PORT: u16 = 8080;
pub const BULK_PORT: u16 = 5201;
/// The pod network, which kube-proxy does not masquerade.
pub const POD_CIDR: &str = "10.244.0.0/16";

/// A service: a VIP, its ports (service port, target port) and one endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Svc {
    pub name: String,
    pub vip: Ipv4Addr,
    pub ports: Vec<(u16, u16)>,
    pub backend: Ipv4Addr,
}

fn nth(base: Ipv4Addr, i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + i as u32 + 1)
}

/// `n` services: `n - 1` fillers (VIPs from 10.100.0.1, endpoints from 10.128.0.1, never
/// dialled) and then the measured service, last, backed by `server`.
pub fn services(n: usize, server: Ipv4Addr) -> Vec<Svc> {
    let n = n.max(1);
    let mut v: Vec<Svc> = (0..n - 1)
        .map(|i| Svc {
            name: format!("svc-{i}"),
            vip: nth(Ipv4Addr::new(10, 100, 0, 0), i),
            ports: vec![(HTTP_PORT, NGINX_PORT)],
            backend: nth(Ipv4Addr::new(10, 128, 0, 0), i),
        })
        .collect();
    v.push(Svc {
        name: "bench".into(),
        vip: VIP,
        // The HTTP port is the very last rule of the iptables chain.
        ports: vec![(BULK_PORT, BULK_PORT), (HTTP_PORT, NGINX_PORT)],
        backend: server,
    });
    v
}

/// kube-proxy's iptables mode: nat OUTPUT -> KUBE-SERVICES (one rule per service port, in
/// order) -> KUBE-SVC-* (masquerade check, endpoint choice) -> KUBE-SEP-* (DNAT), plus the
/// masquerade and filter chains it installs. Only the last `full` service ports get their own
/// KUBE-SVC/KUBE-SEP chains; the others jump to one shared empty chain, which costs a packet
/// of the measured service nothing (it never visits them) but keeps iptables-restore fast
/// (creating 200,000 chains takes minutes).
pub fn iptables_restore(svcs: &[Svc], full: usize) -> String {
    let ports: Vec<(&Svc, u16, u16)> =
        svcs.iter().flat_map(|s| s.ports.iter().map(move |(p, t)| (s, *p, *t))).collect();
    let first_full = ports.len().saturating_sub(full);
    let mut s = String::with_capacity(ports.len() * 200);
    s.push_str("*filter\n:KUBE-SERVICES - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n");
    s.push_str("-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n");
    s.push_str("-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    s.push_str("COMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-SVC-FILLER - [0:0]\n");
    for (i, _) in ports.iter().enumerate().skip(first_full) {
        let _ = writeln!(s, ":KUBE-SVC-{i:016X} - [0:0]\n:KUBE-SEP-{i:016X} - [0:0]");
    }
    s.push_str("-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    s.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    s.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    s.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    s.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    s.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    for (i, (svc, port, _)) in ports.iter().enumerate() {
        let chain = if i >= first_full { format!("KUBE-SVC-{i:016X}") } else { "KUBE-SVC-FILLER".into() };
        let _ = writeln!(
            s,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"bench/{}:p{port} cluster IP\" -m tcp --dport {port} -j {chain}",
            svc.vip, svc.name
        );
    }
    for (i, (svc, port, target)) in ports.iter().enumerate().skip(first_full) {
        let (vip, be, name) = (svc.vip, svc.backend, &svc.name);
        let _ = writeln!(
            s,
            "-A KUBE-SVC-{i:016X} ! -s {POD_CIDR} -d {vip}/32 -p tcp -m comment --comment \"bench/{name}:p{port} cluster IP\" -m tcp --dport {port} -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(
            s,
            "-A KUBE-SVC-{i:016X} -m comment --comment \"bench/{name}:p{port} -> {be}:{target}\" -j KUBE-SEP-{i:016X}"
        );
        let _ = writeln!(
            s,
            "-A KUBE-SEP-{i:016X} -s {be}/32 -m comment --comment \"bench/{name}:p{port}\" -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(
            s,
            "-A KUBE-SEP-{i:016X} -p tcp -m comment --comment \"bench/{name}:p{port}\" -m tcp -j DNAT --to-destination {be}:{target}"
        );
    }
    s.push_str("COMMIT\n");
    s
}

/// kube-proxy's nftables mode, in table `ip kube-proxy`: nat-output -> services, one lookup of
/// `daddr . proto . dport` in the verdict map `service-ips` -> service-* chain (masquerade
/// check, endpoint choice by `numgen`) -> endpoint-* chain (DNAT); the filter-output check
/// of new connections against the `no-endpoint-services` map; the masquerading chain. As
/// for iptables, only the last `full` service ports get their own chains (the kernel
/// validates chain jumps at load, which makes 100,000 chains take minutes to load); the
/// others map to one shared empty chain. The script replaces the table atomically.
pub fn nft_script(svcs: &[Svc], full: usize) -> String {
    let ports: Vec<(&Svc, u16, u16)> =
        svcs.iter().flat_map(|s| s.ports.iter().map(move |(p, t)| (s, *p, *t))).collect();
    let first_full = ports.len().saturating_sub(full);
    let mut s = String::with_capacity(ports.len() * 80);
    s.push_str("table ip kube-proxy\ndelete table ip kube-proxy\ntable ip kube-proxy {\n");
    s.push_str("  chain mark-for-masquerade {\n    mark set mark or 0x4000\n  }\n");
    s.push_str("  chain masquerading {\n    mark and 0x4000 == 0 return\n    mark set mark xor 0x4000\n    masquerade fully-random\n  }\n");
    s.push_str(
        "  map no-endpoint-services {\n    type ipv4_addr . inet_proto . inet_service : verdict\n  }\n",
    );
    s.push_str("  chain reject-chain {\n    reject\n  }\n");
    s.push_str("  chain service-endpoints-check {\n    ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n  }\n");
    s.push_str("  chain filter-output {\n    type filter hook output priority -110; policy accept;\n    ct state new jump service-endpoints-check\n  }\n");
    s.push_str("  chain nat-output {\n    type nat hook output priority -100; policy accept;\n    jump services\n  }\n");
    s.push_str("  chain nat-postrouting {\n    type nat hook postrouting priority 100; policy accept;\n    jump masquerading\n  }\n");
    s.push_str("  chain service-filler {\n  }\n");
    for (i, (svc, port, target)) in ports.iter().enumerate().skip(first_full) {
        let (vip, be) = (svc.vip, svc.backend);
        let _ = writeln!(
            s,
            "  chain service-{i} {{\n    ip daddr {vip} tcp dport {port} ip saddr != {POD_CIDR} jump mark-for-masquerade\n    numgen random mod 1 vmap {{ 0 : goto endpoint-{i} }}\n  }}"
        );
        let _ = writeln!(
            s,
            "  chain endpoint-{i} {{\n    ip saddr {be} jump mark-for-masquerade\n    meta l4proto tcp dnat to {be}:{target}\n  }}"
        );
    }
    s.push_str(
        "  map service-ips {\n    type ipv4_addr . inet_proto . inet_service : verdict\n    elements = {\n",
    );
    for (i, (svc, port, _)) in ports.iter().enumerate() {
        let chain = if i >= first_full { format!("service-{i}") } else { "service-filler".into() };
        let sep = if i + 1 == ports.len() { "" } else { "," };
        let _ = writeln!(s, "      {} . tcp . {port} : goto {chain}{sep}", svc.vip);
    }
    s.push_str("    }\n  }\n");
    s.push_str("  chain services {\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }\n}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);

    #[test]
    fn measured_service_is_last_and_fillers_are_distinct() {
        let v = services(1000, SERVER);
        assert_eq!(v.len(), 1000);
        assert_eq!(v.last().unwrap().vip, VIP);
        assert_eq!(v.last().unwrap().ports.last(), Some(&(HTTP_PORT, NGINX_PORT)));
        let mut vips: Vec<_> = v.iter().map(|s| s.vip).collect();
        vips.sort();
        vips.dedup();
        assert_eq!(vips.len(), 1000);
        assert_eq!(services(1, SERVER).len(), 1);
        assert_eq!(services(100_000, SERVER)[99_998].vip, Ipv4Addr::new(10, 101, 134, 159));
    }

    #[test]
    fn iptables_rules_end_with_the_measured_service() {
        let text = iptables_restore(&services(10, SERVER), 3);
        let portals: Vec<&str> = text.lines().filter(|l| l.starts_with("-A KUBE-SERVICES")).collect();
        assert_eq!(portals.len(), 11); // 9 fillers + 2 ports of the measured service
        assert!(
            portals.last().unwrap().contains("-d 10.96.0.10/32")
                && portals.last().unwrap().contains("--dport 80")
        );
        assert!(portals[0].ends_with("-j KUBE-SVC-FILLER"));
        assert!(text.contains("-j DNAT --to-destination 10.244.0.2:8080"));
        assert!(text.contains("-j DNAT --to-destination 10.244.0.2:5201"));
        assert_eq!(text.matches("-j DNAT").count(), 3);
        assert_eq!(text.matches("COMMIT").count(), 2);
    }

    #[test]
    fn nft_map_has_every_service_port() {
        let text = nft_script(&services(10, SERVER), 2);
        assert_eq!(text.matches(" . tcp . ").count(), 11);
        assert!(text.contains("10.96.0.10 . tcp . 80 : goto service-10\n"));
        assert!(text.contains("10.100.0.1 . tcp . 80 : goto service-filler,"));
        assert!(text.contains("dnat to 10.244.0.2:8080"));
        assert_eq!(text.matches("dnat to").count(), 2);
        // Balanced braces: nft refuses anything else.
        assert_eq!(text.matches('{').count(), text.matches('}').count());
    }
}
