//! Waypoint routes, the load-balancing compiler's part of issue 15: a service (or a workload)
//! that names a waypoint gets a route fragment whose table's slots are the waypoint's usable
//! endpoints (healthy, taking PROXY protocol) with their PROXY ports; its frontends name that
//! table in `waypoint_id`. Resolution (by hostname, VIP or workload address) is recorded so
//! that a change to what a route resolved through recompiles it, and only it.

use super::*;

/// Prefix of the fragment key of a workload whose own waypoint takes the connections
/// addressed to it (`Workload.waypoint`): `@wl/<uid>`. No service key starts with `@`.
pub(super) const WORKLOAD_FRAGMENT: &str = "@wl/";

/// The fragment key of the waypoint route of a service key or workload fragment key: its
/// waypoint's endpoints, the table a frontend's `waypoint_id` names.
pub fn route_key(owner: &str) -> String {
    format!("{owner}#waypoint")
}

/// What resolving a waypoint read: a service (its members, its addresses) or an address (a
/// VIP or a workload's).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum WaypointDep {
    Service(String),
    Addr(IpAddr),
}

/// A compiled waypoint route: what it depends on, whose endpoints it uses, its backend keys.
#[derive(Clone, Debug, Default)]
pub(super) struct RouteInfo {
    pub(super) deps: Vec<WaypointDep>,
    pub(super) members: Vec<Istr>,
    pub(super) backends: BTreeSet<BackendKey>,
}

/// The waypoints a service sends its connections through: `weighted_waypoints` when given
/// (chosen per connection by weight), else `waypoint`.
pub fn service_waypoints(svc: &Service) -> Vec<(&GatewayAddress, u32)> {
    if !svc.weighted_waypoints.is_empty() {
        return svc.weighted_waypoints.iter().map(|w| (&w.destination, w.weight)).collect();
    }
    svc.waypoint.iter().map(|g| (&**g, 1)).collect()
}

/// The port a waypoint endpoint takes redirected connections on: its PROXY application
/// tunnel's (0: the port dialled). `None`: it takes no PROXY protocol, so it cannot be told
/// where a connection was going, and is not used (it would need Istio's HBONE).
pub fn waypoint_port(w: &Workload) -> Option<u16> {
    match w.application_tunnel() {
        Some(ApplicationTunnel { protocol: TunnelProtocol::Proxy, port }) => Some(port),
        _ => None,
    }
}

impl Compiler {
    /// Adds (or, with `add` false, removes) a route's dependencies and members to the indexes.
    pub(super) fn index_route(&mut self, rk: &str, info: &RouteInfo, add: bool) {
        for dep in &info.deps {
            if add {
                self.route_deps.entry(dep.clone()).or_default().insert(rk.to_string());
            } else if let Some(set) = self.route_deps.get_mut(dep) {
                set.remove(rk);
                if set.is_empty() {
                    self.route_deps.remove(dep);
                }
            }
        }
        for uid in &info.members {
            if add {
                *self.waypoint_uids.entry(uid.clone()).or_default() += 1;
            } else if let Some(n) = self.waypoint_uids.get_mut(uid) {
                *n -= 1;
                if *n == 0 {
                    self.waypoint_uids.remove(uid);
                }
            }
        }
    }

    /// The service that claims TCP frontends on `ip` (a VIP), if any.
    fn service_at(&self, ip: IpAddr) -> Option<&Istr> {
        let addr = addr_words(ip);
        let lo = FrontendKey { addr, port: 0, proto: 0, _pad: 0 };
        let hi = FrontendKey { addr, port: u16::MAX, proto: u8::MAX, _pad: u8::MAX };
        self.claims
            .range(lo..=hi)
            .flat_map(|(_, owners)| owners.keys())
            .find(|k| !k.starts_with(WORKLOAD_FRAGMENT))
    }

    /// The workloads a waypoint names (healthy or not), and what finding them read.
    fn resolve_waypoint<'m>(
        &self,
        model: &'m Model,
        g: &GatewayAddress,
        deps: &mut Vec<WaypointDep>,
    ) -> Vec<&'m Workload> {
        let members_of = |key: &str| -> Vec<&'m Workload> {
            self.members
                .get(key)
                .into_iter()
                .flatten()
                .filter_map(|uid| model.workloads.get(uid).map(|w| w.as_ref()))
                .collect()
        };
        match &g.destination {
            GatewayDestination::Hostname { namespace, hostname } => {
                let key = format!("{namespace}/{hostname}");
                deps.push(WaypointDep::Service(key.clone()));
                members_of(&key)
            }
            GatewayDestination::Address { network, address } => {
                deps.push(WaypointDep::Addr(*address));
                if !network.is_empty() && *network != model.node.network {
                    return Vec::new();
                }
                if let Some(key) = self.service_at(*address) {
                    deps.push(WaypointDep::Service(key.to_string()));
                    return members_of(key);
                }
                model.workload_by_address(*address).into_iter().collect()
            }
        }
    }

    /// The frontends of a workload whose waypoint takes the connections addressed to it: each
    /// of its addresses on any TCP port (`PORT_ANY`), through its route.
    pub(super) fn compile_workload_frontends(&mut self, w: &Workload, prev: &MapState) -> Option<Piece> {
        if w.waypoint().is_none() || w.addresses.is_empty() {
            return None;
        }
        let key = format!("{WORKLOAD_FRAGMENT}{}", w.uid);
        let rk = Istr::from(route_key(&key).as_str());
        let mut out = Piece::default();
        for a in &w.addresses {
            let fk = FrontendKey { addr: addr_words(*a), port: PORT_ANY, proto: PROTO_TCP, _pad: 0 };
            if self.ids.services.get(&rk).is_none()
                && let Some(v) = prev.frontends.get(&fk)
            {
                self.ids.services.adopt(&rk, v.waypoint_id);
            }
            let waypoint_id = self.ids.services.get_or_alloc(&rk);
            let fv = FrontendValue { service_id: 0, target_port: 0, flags: 0, waypoint_id, check: 0 };
            out.frontends.push((fk, fv.sealed(&fk)));
        }
        out.settle();
        Some(out)
    }

    /// Compiles the waypoint route of `owner` (a service key or a workload fragment key): one
    /// table per address family whose slots are the usable endpoints of its waypoints, with
    /// each one's PROXY port. `None` when the owner no longer has a waypoint.
    pub(super) fn compile_route(
        &mut self,
        model: &Model,
        owner: &str,
        prev: &MapState,
    ) -> Option<(Piece, RouteInfo)> {
        let rk = route_key(owner);
        let route_id = self.ids.services.get(rk.as_str())?;
        // (waypoint, weight), the families to serve, the frontend ports (network order).
        let (waypoints, families, ports): (Vec<(GatewayAddress, u32)>, BTreeSet<u8>, Vec<u16>) =
            match owner.strip_prefix(WORKLOAD_FRAGMENT) {
                Some(uid) => {
                    let w = model.workloads.get(uid)?;
                    let g = w.waypoint()?.clone();
                    (vec![(g, 1)], w.addresses.iter().map(family_of).collect(), vec![PORT_ANY])
                }
                None => {
                    let svc = model.services.get(owner)?;
                    let wps: Vec<(GatewayAddress, u32)> =
                        service_waypoints(svc).into_iter().map(|(g, w)| (g.clone(), w)).collect();
                    if wps.is_empty() {
                        return None;
                    }
                    let ports = svc
                        .ports
                        .iter()
                        .filter(|p| p.protocol == Protocol::Tcp)
                        .map(|p| p.service_port.to_be())
                        .collect();
                    (wps, svc.addresses.iter().map(family_of).collect(), ports)
                }
            };
        let mut info = RouteInfo::default();
        let mut resolved = Vec::new();
        for (g, weight) in &waypoints {
            let ws: Vec<&Workload> = self
                .resolve_waypoint(model, g, &mut info.deps)
                .into_iter()
                .filter(|w| w.status == HealthStatus::Healthy && waypoint_port(w).is_some())
                .collect();
            resolved.push((ws, (*weight).min(1000)));
        }
        let weighted = resolved.len() > 1;
        let mut out = Piece::default();
        for family in families {
            let mut slots = Vec::new();
            let mut addrs = Vec::new();
            for (ws, weight) in &resolved {
                let usable: Vec<(&Workload, IpAddr)> = ws
                    .iter()
                    .filter_map(|w| Some((*w, *w.addresses.iter().find(|a| family_of(a) == family)?)))
                    .collect();
                if *weight == 0 || usable.is_empty() {
                    continue;
                }
                // A waypoint's share is its weight, split evenly among its endpoints.
                let each = (*weight as u64 * 1000 / usable.len() as u64).max(1) as u32;
                for (w, addr) in usable {
                    let bkey = (route_id, w.uid.clone(), family);
                    let backend_id = self.backend_id(&bkey, addr);
                    info.backends.insert(bkey);
                    if !info.members.contains(&w.uid) {
                        info.members.push(w.uid.clone());
                    }
                    // (No `BACKENDS` entry: waypoints take TCP, whose connect() reads the slot.)
                    addrs.push((backend_id, addr_words(addr)));
                    if let Some(p) = waypoint_port(w).filter(|p| *p != 0) {
                        for port in &ports {
                            let pk =
                                PortKey { service_id: route_id, backend_id, service_port: *port, _pad: 0 };
                            out.ports.push((
                                pk,
                                PortValue { target_port: p.to_be(), _pad: 0, check: 0 }.sealed(&pk),
                            ));
                        }
                    }
                    slots.push((backend_id, each));
                }
            }
            let mut levels: [Vec<(u32, u32)>; LEVELS] = Default::default();
            levels[0] = slots;
            let tkey = TableKey { service_id: route_id, class_id: 0, family, _pad: [0; 3] };
            addrs.sort_unstable_by_key(|(id, _)| *id);
            addrs.dedup_by_key(|(id, _)| *id);
            let flags = TBL_F_WAYPOINT | if weighted { TBL_F_WEIGHTED } else { 0 };
            emit_table(&mut out, prev, tkey, flags, &levels, &addrs, 0);
        }
        out.settle();
        Some((out, info))
    }
}
