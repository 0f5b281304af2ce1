//! L4 authorization: Istio's semantics, compiled per destination workload address into kernel
//! lookups, so that no connection needs a user-space round trip.
//!
//! The identity of a source is a function of its address (the workload that owns it), so a
//! destination's decision depends only on: the source's identity, which of the policies' CIDRs
//! contain the source address (its "region"), and the destination port. The compiler evaluates
//! Istio's rules for every identity the destination's policies tell apart, every region and
//! every port they name, and writes one verdict per combination; identities and ports that no
//! policy singles out share a fallback row. The kernel (`kmesh_authz`, sk_lookup) does four hash
//! lookups and one LPM lookup at most, in the destination pod's namespace, before the SYN finds
//! its listener.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use kmesh_common::*;
use serde::Serialize;

use crate::compile::{IdPool, addr_words, changed};
use crate::model::*;
use kmesh_model::delta::ModelChange;
use std::sync::Arc;

/// Who a source is: `(trust domain, namespace, service account)`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn of(w: &Workload) -> Self {
        Self {
            trust_domain: if w.trust_domain().is_empty() {
                "cluster.local".into()
            } else {
                w.trust_domain().to_string()
            },
            namespace: w.namespace().to_string(),
            service_account: if w.service_account().is_empty() {
                "default".into()
            } else {
                w.service_account().to_string()
            },
        }
    }

    pub fn principal(&self) -> String {
        format!("spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

fn string_matches(m: &StringMatch, v: &str) -> bool {
    match m {
        StringMatch::Exact(s) => v == s,
        StringMatch::Prefix(s) => v.starts_with(s.as_str()),
        StringMatch::Suffix(s) => v.ends_with(s.as_str()),
        StringMatch::Presence => !v.is_empty(),
    }
}

/// One connection as the rules see it. `identity` is `None` for a source address that belongs
/// to no workload: it matches no positive identity condition and every `not_` one.
pub struct Conn<'a> {
    pub identity: Option<&'a Identity>,
    /// Whether the source address is in a CIDR (answered per region at compile time).
    pub in_cidr: &'a dyn Fn(&Cidr) -> bool,
    pub dst: IpAddr,
    /// `None`: a port that no policy names.
    pub port: Option<u16>,
}

fn match_holds(m: &PolicyMatch, c: &Conn) -> bool {
    let id = c.identity;
    let any_ns = |l: &[StringMatch]| id.is_some_and(|i| l.iter().any(|s| string_matches(s, &i.namespace)));
    let any_pr = |l: &[StringMatch]| id.is_some_and(|i| l.iter().any(|s| string_matches(s, &i.principal())));
    let any_sa = |l: &[(String, String)]| {
        id.is_some_and(|i| l.iter().any(|(ns, sa)| *ns == i.namespace && *sa == i.service_account))
    };
    let any_src = |l: &[Cidr]| l.iter().any(|x| (c.in_cidr)(x));
    let any_dst = |l: &[Cidr]| l.iter().any(|x| x.contains(c.dst));
    let any_port = |l: &[u16]| c.port.is_some_and(|p| l.contains(&p));
    (m.namespaces.is_empty() || any_ns(&m.namespaces))
        && (m.not_namespaces.is_empty() || !any_ns(&m.not_namespaces))
        && (m.principals.is_empty() || any_pr(&m.principals))
        && (m.not_principals.is_empty() || !any_pr(&m.not_principals))
        && (m.service_accounts.is_empty() || any_sa(&m.service_accounts))
        && (m.not_service_accounts.is_empty() || !any_sa(&m.not_service_accounts))
        && (m.source_ips.is_empty() || any_src(&m.source_ips))
        && (m.not_source_ips.is_empty() || !any_src(&m.not_source_ips))
        && (m.destination_ips.is_empty() || any_dst(&m.destination_ips))
        && (m.not_destination_ips.is_empty() || !any_dst(&m.not_destination_ips))
        && (m.destination_ports.is_empty() || any_port(&m.destination_ports))
        && (m.not_destination_ports.is_empty() || !any_port(&m.not_destination_ports))
}

/// A policy matches when any rule does; a rule when all its clauses do; a clause when any of
/// its matches does. A policy without rules matches nothing.
pub fn policy_matches(p: &Policy, c: &Conn) -> bool {
    p.rules.iter().any(|r| r.clauses.iter().all(|cl| cl.matches.iter().any(|m| match_holds(m, c))))
}

/// Istio's decision: DENY policies first; then, if any ALLOW policy applies, one must match;
/// with none, allow. Returns the action and the deciding policy's index (None: the default).
pub fn decide(policies: &[&Policy], c: &Conn, include_dry_run: bool) -> (u8, Option<usize>) {
    let enforced = |p: &&Policy| include_dry_run || !p.dry_run;
    for (i, p) in policies.iter().enumerate() {
        if enforced(p) && p.action == PolicyAction::Deny && policy_matches(p, c) {
            return (VERDICT_DENY, Some(i));
        }
    }
    let mut any_allow = false;
    for (i, p) in policies.iter().enumerate() {
        if enforced(p) && p.action == PolicyAction::Allow {
            any_allow = true;
            if policy_matches(p, c) {
                return (VERDICT_ALLOW, Some(i));
            }
        }
    }
    if any_allow { (VERDICT_DENY, None) } else { (VERDICT_ALLOW, None) }
}

/// The policies that apply to a workload, in a stable order.
pub fn applicable<'a>(model: &'a Model, w: &Workload) -> Vec<&'a Policy> {
    model
        .policies
        .values()
        .map(|p| p.as_ref())
        .filter(|p| match p.scope {
            PolicyScope::Global => true,
            PolicyScope::Namespace => p.namespace == *w.namespace(),
            PolicyScope::WorkloadSelector => w.authorization_policies().iter().any(|k| *k == p.key()),
        })
        .collect()
}

/// The most verdict rows one destination address may compile to. Rows grow as (identities a
/// policy singles out + 2) x (source ranges + 1) x (ports named + 1); a configuration past this
/// is refused whole, naming the policies, instead of filling the verdict map for one pod.
pub const MAX_ROWS_PER_DESTINATION: usize = 65_536;

#[derive(Debug, thiserror::Error)]
#[error(
    "policies {policies:?} on workload {workload} compile to {rows} verdict rows per address \
     (identities they single out x source ranges x ports), over the bound of {bound}: narrow them \
     (fewer distinct principals, source ranges or ports per workload)",
    bound = MAX_ROWS_PER_DESTINATION
)]
pub struct AuthzError {
    pub workload: String,
    pub policies: Vec<String>,
    pub rows: usize,
}

/// The contents of the authorization maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthzState {
    pub dest: BTreeMap<[u32; 4], DestValue>,
    pub identity: BTreeMap<[u32; 4], u32>,
    /// (key, prefix length) -> region
    pub region: BTreeMap<(RegionKey, u32), u32>,
    pub verdict: BTreeMap<VerdictKey, VerdictValue>,
    pub counts: BTreeSet<CountKey>,
}

/// A change of the authorization maps: the entries to write (new or changed) and the keys to
/// delete, as the load-balancing [`crate::compile::Diff`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthzDiff {
    pub set: AuthzState,
    pub del_dest: Vec<[u32; 4]>,
    pub del_identity: Vec<[u32; 4]>,
    pub del_region: Vec<(RegionKey, u32)>,
    pub del_verdict: Vec<VerdictKey>,
    pub del_counts: Vec<CountKey>,
}

impl AuthzDiff {
    /// What takes the maps from `old` to `next`.
    pub fn between(old: &AuthzState, next: &AuthzState) -> Self {
        let (dest, del_dest) = changed(&old.dest, &next.dest);
        let (identity, del_identity) = changed(&old.identity, &next.identity);
        let (region, del_region) = changed(&old.region, &next.region);
        let (verdict, del_verdict) = changed(&old.verdict, &next.verdict);
        Self {
            set: AuthzState {
                dest,
                identity,
                region,
                verdict,
                counts: next.counts.difference(&old.counts).copied().collect(),
            },
            del_dest,
            del_identity,
            del_region,
            del_verdict,
            del_counts: old.counts.difference(&next.counts).copied().collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    pub fn writes(&self) -> usize {
        let s = &self.set;
        s.dest.len() + s.identity.len() + s.region.len() + s.verdict.len() + s.counts.len()
    }

    pub fn deletes(&self) -> usize {
        self.del_dest.len()
            + self.del_identity.len()
            + self.del_region.len()
            + self.del_verdict.len()
            + self.del_counts.len()
    }
}

impl AuthzState {
    /// Takes a diff in (what the maps hold once it is applied).
    pub fn apply(&mut self, d: AuthzDiff) {
        for k in &d.del_dest {
            self.dest.remove(k);
        }
        for k in &d.del_identity {
            self.identity.remove(k);
        }
        for k in &d.del_region {
            self.region.remove(k);
        }
        for k in &d.del_verdict {
            self.verdict.remove(k);
        }
        for k in &d.del_counts {
            self.counts.remove(k);
        }
        self.dest.extend(d.set.dest);
        self.identity.extend(d.set.identity);
        self.region.extend(d.set.region);
        self.verdict.extend(d.set.verdict);
        self.counts.extend(d.set.counts);
    }
}

/// What one destination address compiles to, without its dest id.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DestContent {
    regions: Vec<(Cidr, u32)>,
    /// (identity, region, port) -> verdict
    rows: BTreeMap<(u32, u32, u16), VerdictValue>,
}

impl DestContent {
    fn empty() -> Self {
        Self { regions: Vec::new(), rows: BTreeMap::new() }
    }
}

/// The id a policy prefers: a function of its key alone (FNV-1a), so that a restarted daemon
/// gives each policy the id the verdicts in force carry. Never 0 (the default's).
fn preferred_policy_id(key: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.max(1)
}

/// Ids that must stay stable across compilations.
#[derive(Clone, Debug, Default)]
pub struct AuthzCompiler {
    pub policy_ids: IdPool<String>,
    identity_ids: IdPool<Identity>,
    /// Destination address -> (dest id, what it was compiled to).
    dests: BTreeMap<[u32; 4], (u32, DestContent)>,
    next_dest_id: u32,
    /// Identity ids by address found in the maps at start (an earlier run's): an address keeps
    /// its id, so the verdict rows still in force read it as they did.
    adopted_identity: BTreeMap<[u32; 4], u32>,
    /// The identities of the model's workloads (not host-network), with their id and how many
    /// workloads carry each: every destination's rows are compiled against this set.
    identities: BTreeMap<Identity, (u32, usize)>,
    /// Address -> the uids of the workloads (not host-network) listing it, in uid order: the
    /// first owns the address (its identity, its destination).
    claims: std::collections::HashMap<[u32; 4], Vec<Istr>>,
    /// The memory above matches the maps in force, so a change can be compiled alone.
    ready: bool,
}

impl AuthzCompiler {
    /// Policy key by id, for logs and metrics.
    pub fn policy_name(&self, id: u32) -> Option<String> {
        self.policy_ids.iter().find(|(_, v)| **v == id).map(|(k, _)| k.clone())
    }

    /// A compiler for a daemon that found `applied` in the maps (a restart): addresses keep
    /// their identity ids, and no destination or policy id still used by an entry is handed
    /// out again, so every write of the first apply lands next to the entries in force instead
    /// of changing what they mean.
    pub fn adopting(applied: &AuthzState) -> Self {
        let mut c = Self::default();
        let dest_ids = applied
            .dest
            .values()
            .map(|d| d.dest_id)
            .chain(applied.verdict.keys().map(|k| k.dest_id))
            .chain(applied.region.keys().map(|(k, _)| u32::from_be_bytes(k.dest_id_be)));
        c.next_dest_id = dest_ids.max().unwrap_or(0);
        // Each destination in force with what it was compiled to, read back from its entries:
        // one whose compilation comes out the same keeps its dest id and nothing is rewritten.
        let mut contents: BTreeMap<u32, DestContent> = BTreeMap::new();
        for ((k, len), region) in &applied.region {
            let words: [u32; 4] = std::array::from_fn(|i| {
                u32::from_ne_bytes([k.addr[i * 4], k.addr[i * 4 + 1], k.addr[i * 4 + 2], k.addr[i * 4 + 3]])
            });
            let addr = crate::compile::words_addr(words);
            let bits = len.saturating_sub(if addr.is_ipv4() { 32 + 96 } else { 32 });
            let content = contents.entry(u32::from_be_bytes(k.dest_id_be)).or_insert_with(DestContent::empty);
            content.regions.push((Cidr { addr, len: bits as u8 }, *region));
        }
        for (k, v) in &applied.verdict {
            let content = contents.entry(k.dest_id).or_insert_with(DestContent::empty);
            content.rows.insert((k.identity, k.region, k.port), VerdictValue { check: 0, ..*v });
        }
        for (addr, d) in &applied.dest {
            if let Some(mut content) = contents.get(&d.dest_id).cloned() {
                content.regions.sort_by_key(|(_, r)| *r);
                c.dests.insert(*addr, (d.dest_id, content));
            }
        }
        c.identity_ids.reserve(applied.identity.values().filter(|id| **id > IDENTITY_OTHER).map(|id| id - 1));
        c.adopted_identity = applied.identity.clone();
        let policies = applied
            .verdict
            .values()
            .flat_map(|v| [v.policy_id, v.dry_policy_id])
            .chain(applied.counts.iter().map(|k| k.policy_id))
            .filter(|id| *id != 0);
        c.policy_ids.reserve(policies);
        c
    }

    /// Called once the first apply is in force: adopted ids no longer constrain anything.
    pub fn release_adopted(&mut self) {
        self.adopted_identity.clear();
        self.identity_ids.release_reserved();
        self.policy_ids.release_reserved();
    }

    /// Compiles the policies of `model` from scratch. On error the compiler must be rebuilt
    /// from the maps in force ([`adopting`](Self::adopting)): ids may have been handed out.
    pub fn compile(&mut self, model: &Model) -> Result<AuthzState, AuthzError> {
        self.ready = false;
        let mut out = AuthzState::default();
        self.identities.clear();
        self.claims.clear();
        if model.policies.is_empty() {
            // Nothing is policed: no destination, so no identity is ever read. Skipping the
            // per-workload work keeps a mesh without policies from paying for authorization
            // on every change (and IDENTITY empty).
            self.identity_ids.retain(&BTreeSet::new());
            self.policy_ids.retain(&BTreeSet::new());
            self.dests.clear();
            for action in [VERDICT_ALLOW, VERDICT_DENY] {
                out.counts.insert(CountKey { policy_id: 0, action: action as u32 });
            }
            self.ready = true;
            return Ok(out);
        }
        // Identities of every workload address (ids from 2: 0 unknown, 1 "any other").
        let mut used = BTreeSet::new();
        // A host-network workload's address is the node's: traffic from it may come from any
        // process on the node, so it carries no identity, and nothing is policed there.
        for w in model.workloads.values().filter(|w| !w.is_host_network()) {
            let ident = Identity::of(w);
            if self.identity_ids.get(&ident).is_none() {
                let adopted = w.addresses.iter().filter_map(|a| self.adopted_identity.get(&addr_words(*a)));
                for id in adopted.copied().filter(|id| *id > IDENTITY_OTHER).collect::<Vec<_>>() {
                    if self.identity_ids.claim(&ident, id - 1) {
                        break;
                    }
                }
            }
            let id = self.identity_ids.get_or_alloc(&ident) + 1;
            used.insert(ident.clone());
            self.identities.entry(ident).or_insert((id, 0)).1 += 1;
            // An address two workloads list belongs to the first uid, as in telemetry.
            for a in &w.addresses {
                out.identity.entry(addr_words(*a)).or_insert(id);
                self.claims.entry(addr_words(*a)).or_default().push(w.uid.clone());
            }
        }
        self.identity_ids.retain(&used);

        let used_policies: BTreeSet<String> = model.policies.keys().cloned().collect();
        self.policy_ids.retain(&used_policies);
        for key in model.policies.keys() {
            let id = self.policy_ids.get_or_alloc_preferring(key, preferred_policy_id(key));
            for action in [VERDICT_ALLOW, VERDICT_DENY] {
                out.counts.insert(CountKey { policy_id: id, action: action as u32 });
            }
        }
        for action in [VERDICT_ALLOW, VERDICT_DENY] {
            out.counts.insert(CountKey { policy_id: 0, action: action as u32 });
        }

        let mut dests = BTreeMap::new();
        for w in model.workloads.values().filter(|w| !w.is_host_network()) {
            for addr in &w.addresses {
                if dests.contains_key(&addr_words(*addr)) {
                    continue;
                }
                // An address two workloads list is policed as the first uid's (see identities).
                if let Some(content) = self.dest_content(model, w, *addr)? {
                    dests.insert(addr_words(*addr), content);
                }
            }
        }

        // A destination whose content changed gets a new dest id: its new entries are written
        // next to the old ones and the switch is one update of AUTHZ_DEST.
        let mut next_dests = BTreeMap::new();
        for (addr, content) in dests {
            let id = match self.dests.get(&addr) {
                Some((id, old)) if *old == content => *id,
                _ => self.next_dest(),
            };
            materialize(&addr, id, &content, &mut out);
            next_dests.insert(addr, (id, content));
        }
        self.dests = next_dests;
        self.ready = true;
        Ok(out)
    }

    fn next_dest(&mut self) -> u32 {
        self.next_dest_id = self.next_dest_id.wrapping_add(1).max(1);
        self.next_dest_id
    }

    /// What `addr` of workload `w` compiles to against the identities in use; `None` when no
    /// policy applies to `w`.
    fn dest_content(
        &self,
        model: &Model,
        w: &Workload,
        addr: IpAddr,
    ) -> Result<Option<DestContent>, AuthzError> {
        let policies = applicable(model, w);
        if policies.is_empty() {
            return Ok(None);
        }
        let ids: Vec<u32> = policies.iter().map(|p| self.policy_ids.get(&p.key()).unwrap_or(0)).collect();
        // The CIDRs that tell sources apart, and the ports the policies name.
        let mut cidrs: Vec<Cidr> = Vec::new();
        let mut ports: BTreeSet<u16> = BTreeSet::new();
        for m in policies.iter().flat_map(|p| &p.rules).flat_map(|r| &r.clauses).flat_map(|c| &c.matches) {
            for c in m.source_ips.iter().chain(&m.not_source_ips) {
                let c = c.network();
                if !cidrs.contains(&c) {
                    cidrs.push(c);
                }
            }
            ports.extend(m.destination_ports.iter().chain(&m.not_destination_ports));
        }
        let port_list: Vec<Option<u16>> =
            std::iter::once(None).chain(ports.iter().copied().map(Some)).collect();
        let other = Identity {
            trust_domain: "\u{0}".into(),
            namespace: "\u{0}other".into(),
            service_account: "\u{0}other".into(),
        };
        let mut rows = BTreeMap::new();
        let row_for = |ident: Option<&Identity>, key: u32, rows: &mut BTreeMap<_, _>| {
            let mut row = BTreeMap::new();
            for region in 0..=cidrs.len() {
                // Region r > 0 is "inside cidrs[r-1] and no more specific listed CIDR": an
                // address there is in every listed CIDR that contains cidrs[r-1].
                let inner = region.checked_sub(1).map(|r| cidrs[r]);
                let in_cidr = |c: &Cidr| inner.is_some_and(|i| c.len <= i.len && c.contains(i.addr));
                for port in &port_list {
                    let conn = Conn { identity: ident, in_cidr: &in_cidr, dst: addr, port: *port };
                    let (action, by) = decide(&policies, &conn, false);
                    let (dry, dry_by) = decide(&policies, &conn, true);
                    let mut v = VerdictValue {
                        action,
                        policy_id: by.map(|i| ids[i]).unwrap_or(0),
                        ..Default::default()
                    };
                    if dry != action {
                        v.dry_action = dry;
                        v.dry_policy_id = dry_by.map(|i| ids[i]).unwrap_or(0);
                    }
                    row.insert((region as u32, port.unwrap_or(PORT_OTHER)), v);
                }
            }
            for ((r, p), v) in &row {
                rows.insert((key, *r, *p), *v);
            }
            row
        };
        row_for(None, IDENTITY_UNKNOWN, &mut rows);
        let other_row = row_for(Some(&other), IDENTITY_OTHER, &mut rows);
        for (ident, (id, _)) in &self.identities {
            let mut mine = BTreeMap::new();
            let row = row_for(Some(ident), *id, &mut mine);
            if row != other_row {
                rows.extend(mine);
            }
        }
        if rows.len() > MAX_ROWS_PER_DESTINATION {
            return Err(AuthzError {
                workload: format!("{}/{}", w.namespace(), w.name),
                policies: policies.iter().map(|p| p.key()).collect(),
                rows: rows.len(),
            });
        }
        let regions = cidrs.iter().enumerate().map(|(i, c)| (*c, i as u32 + 1)).collect();
        Ok(Some(DestContent { regions, rows }))
    }

    /// Compiles what `change` touched alone, against `applied` (the maps in force, which this
    /// compiler's memory matches): the addresses of the workloads it changed get their
    /// identity and destination again. Returns `None` when a full compilation is needed: a
    /// policy changed, or the set of identities did (every destination's rows are compiled
    /// against it), or the memory does not match the maps (start, a refused apply).
    pub fn compile_change(
        &mut self,
        model: &Model,
        change: &ModelChange,
        applied: &AuthzState,
    ) -> Option<Result<AuthzDiff, AuthzError>> {
        if !self.ready || !change.policies.is_empty() || !self.adopted_identity.is_empty() {
            return None;
        }
        if model.policies.is_empty() {
            return Some(Ok(AuthzDiff::default()));
        }
        let policed = |w: &&Arc<Workload>| !w.is_host_network();
        // The identities' counts after the change; none may appear or disappear.
        let mut refs: BTreeMap<Identity, isize> = BTreeMap::new();
        for (uid, old) in &change.workloads {
            if let Some(w) = old.as_ref().filter(policed) {
                *refs.entry(Identity::of(w)).or_default() -= 1;
            }
            if let Some(w) = model.workloads.get(uid).filter(policed) {
                *refs.entry(Identity::of(w)).or_default() += 1;
            }
        }
        for (ident, d) in &refs {
            match self.identities.get(ident) {
                Some((_, n)) if *n as isize + d > 0 => {}
                _ => return None,
            }
        }
        // A refused compilation leaves the memory as it was: the claims are changed on a copy
        // of the entries touched, put in place only once every destination compiled.
        let mut touched: BTreeMap<[u32; 4], Vec<Istr>> = BTreeMap::new();
        for (uid, old) in &change.workloads {
            let new = model.workloads.get(uid).filter(policed);
            for (w, add) in [(old.as_ref().filter(policed), false), (new, true)] {
                for a in w.iter().flat_map(|w| &w.addresses) {
                    let k = addr_words(*a);
                    let list =
                        touched.entry(k).or_insert_with(|| self.claims.get(&k).cloned().unwrap_or_default());
                    list.retain(|u| u != uid);
                    if add {
                        let i = list.partition_point(|u| u < uid);
                        list.insert(i, uid.clone());
                    }
                }
            }
        }
        let mut d = AuthzDiff::default();
        let mut next_dests = Vec::new();
        for (addr, list) in &touched {
            let owner = list.first().and_then(|u| model.workloads.get(u));
            // The identity entry: the first claimant's.
            let id = owner.and_then(|w| self.identities.get(&Identity::of(w))).map(|(id, _)| *id);
            match (applied.identity.get(addr), id) {
                (a, Some(id)) if a != Some(&id) => {
                    d.set.identity.insert(*addr, id);
                }
                (Some(_), None) => d.del_identity.push(*addr),
                _ => {}
            }
            // The destination: the first claimant with a policy applying to it.
            let ip = crate::compile::words_addr(*addr);
            let mut content = None;
            for w in list.iter().filter_map(|u| model.workloads.get(u)) {
                match self.dest_content(model, w, ip) {
                    Ok(Some(c)) => {
                        content = Some(c);
                        break;
                    }
                    Ok(None) => {}
                    Err(e) => return Some(Err(e)),
                }
            }
            next_dests.push((*addr, content));
        }
        // Compiled: the memory takes the change.
        for (ident, delta) in refs {
            if let Some((_, n)) = self.identities.get_mut(&ident) {
                *n = (*n as isize + delta) as usize;
            }
        }
        for (addr, list) in touched {
            if list.is_empty() {
                self.claims.remove(&addr);
            } else {
                self.claims.insert(addr, list);
            }
        }
        for (addr, content) in next_dests {
            let old = self.dests.get(&addr);
            if old.map(|(_, c)| c) == content.as_ref() {
                continue;
            }
            if let Some((old_id, old_content)) = self.dests.remove(&addr) {
                let mut gone = AuthzState::default();
                materialize(&addr, old_id, &old_content, &mut gone);
                d.del_region.extend(gone.region.into_keys());
                d.del_verdict.extend(gone.verdict.into_keys());
            }
            match content {
                Some(c) => {
                    let id = self.next_dest();
                    materialize(&addr, id, &c, &mut d.set);
                    self.dests.insert(addr, (id, c));
                }
                None => d.del_dest.push(addr),
            }
        }
        Some(Ok(d))
    }
}

/// The entries destination `addr` with dest id `id` and `content` takes, into `out`.
fn materialize(addr: &[u32; 4], id: u32, content: &DestContent, out: &mut AuthzState) {
    out.dest.insert(*addr, DestValue { dest_id: id, check: 0 }.sealed(addr));
    for (cidr, region) in &content.regions {
        let words = addr_words(cidr.addr);
        let mut bytes = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        let len = if cidr.addr.is_ipv4() { 96 + cidr.len as u32 } else { cidr.len as u32 };
        out.region.insert((RegionKey { dest_id_be: id.to_be_bytes(), addr: bytes }, 32 + len), *region);
    }
    for ((identity, region, port), v) in &content.rows {
        let k = VerdictKey { dest_id: id, identity: *identity, region: *region, port: *port, _pad: 0 };
        out.verdict.insert(k, v.sealed(&k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn model(policies: &str) -> Model {
        config::parse(&format!(
            "workloads:
  - {{uid: server, name: server, namespace: prod, service_account: web, addresses: [10.244.0.10], authorization_policies: [prod/sel]}}
  - {{uid: friend, name: friend, namespace: prod, service_account: api, addresses: [10.244.0.20]}}
  - {{uid: stranger, name: stranger, namespace: dev, service_account: default, addresses: [10.244.0.30]}}
policies:
{policies}"
        ))
        .unwrap()
    }

    /// The verdict the kernel would reach for src -> server:port, following its fallbacks.
    fn kernel_verdict(s: &AuthzState, src: &str, port: u16) -> Option<VerdictValue> {
        let dst = addr_words("10.244.0.10".parse().unwrap());
        let d = s.dest.get(&dst)?;
        let src_ip: IpAddr = src.parse().unwrap();
        let ident = s.identity.get(&addr_words(src_ip)).copied().unwrap_or(IDENTITY_UNKNOWN);
        // Longest matching prefix among this destination's regions.
        let region = s
            .region
            .iter()
            .filter(|((k, _), _)| k.dest_id_be == d.dest_id.to_be_bytes())
            .filter(|((k, len), _)| {
                let words: [u32; 4] = std::array::from_fn(|i| {
                    u32::from_ne_bytes([
                        k.addr[i * 4],
                        k.addr[i * 4 + 1],
                        k.addr[i * 4 + 2],
                        k.addr[i * 4 + 3],
                    ])
                });
                let net = crate::compile::words_addr(words);
                let l = if net.is_ipv4() { len - 32 - 96 } else { len - 32 };
                Cidr { addr: net, len: l as u8 }.contains(src_ip)
            })
            .max_by_key(|((_, len), _)| *len)
            .map(|(_, r)| *r)
            .unwrap_or(0);
        let other = if ident == IDENTITY_UNKNOWN { IDENTITY_UNKNOWN } else { IDENTITY_OTHER };
        let key = |identity, port| VerdictKey { dest_id: d.dest_id, identity, region, port, _pad: 0 };
        [key(ident, port), key(ident, PORT_OTHER), key(other, port), key(other, PORT_OTHER)]
            .iter()
            .find_map(|k| s.verdict.get(k).copied())
    }

    fn allowed(policies: &str, src: &str, port: u16) -> bool {
        let s = AuthzCompiler::default().compile(&model(policies)).unwrap();
        match kernel_verdict(&s, src, port) {
            None => true,
            Some(v) => v.action == VERDICT_ALLOW,
        }
    }

    /// Issue 13, item 5: a restarted daemon's first apply goes from the maps an earlier run
    /// left to its own compilation. Written in `Dataplane::write_authz`'s order (identities,
    /// regions and verdict rows, then destinations), every source keeps the verdict in force
    /// until its destination switches, and has the new one after.
    #[test]
    fn a_restarted_compiler_writes_next_to_the_entries_in_force() {
        let policy = "  - {name: a, namespace: prod, rules: [{clauses: [{matches: [{service_accounts: [{namespace: prod, service_account: api}]}]}]}]}\n";
        let before = model(policy);
        let old = AuthzCompiler::default().compile(&before).unwrap();
        // While the daemon was down a workload appeared whose uid sorts first, so a fresh
        // compiler would hand it the id `friend` has in the maps.
        let mut after = before.clone();
        let text = "workloads: [{uid: a-new, name: a-new, namespace: prod, service_account: zz, addresses: [10.244.0.40]}]";
        let w = config::parse(text).unwrap().workloads.remove("a-new").unwrap();
        after.workloads.insert("a-new".into(), w);
        let next = AuthzCompiler::adopting(&old).compile(&after).unwrap();

        // Halfway: every lookup row of `next` written, destinations not switched yet.
        let mut half = old.clone();
        half.identity.extend(next.identity.clone());
        half.region.extend(next.region.clone());
        half.verdict.extend(next.verdict.clone());
        for (src, want) in [("10.244.0.20", true), ("10.244.0.30", false), ("192.168.9.9", false)] {
            let v = |s: &AuthzState| kernel_verdict(s, src, 80).map(|v| v.action == VERDICT_ALLOW);
            assert_eq!(v(&old), Some(want), "{src} before");
            assert_eq!(v(&half), Some(want), "{src} while the first apply is halfway");
            assert_eq!(v(&next), Some(want), "{src} after");
        }
        assert_eq!(kernel_verdict(&next, "10.244.0.40", 80).map(|v| v.action), Some(VERDICT_DENY));
        for (addr, id) in &old.identity {
            assert_eq!(next.identity.get(addr), Some(id), "an address keeps its identity id");
        }
        let old_dests: BTreeSet<u32> = old.dest.values().map(|d| d.dest_id).collect();
        for (k, v) in &next.verdict {
            if old.verdict.get(k) != Some(v) {
                assert!(!old_dests.contains(&k.dest_id), "{k:?} rewrites a row a destination in force reads");
            }
        }
    }

    /// Issue 18, item 4: a restart on the same policies finds every entry it would write
    /// already in force (destinations read back from their rows, policies by their preferred
    /// ids, identities by address) and writes nothing.
    #[test]
    fn a_restart_on_the_same_policies_writes_nothing() {
        let policies = "  - {name: a, namespace: prod, rules: [{clauses: [{matches: [{service_accounts: [{namespace: prod, service_account: api}], destination_ports: [8080]}]}]}]}
  - {name: d, namespace: prod, action: DENY, rules: [{clauses: [{matches: [{source_ips: [10.244.0.0/28, \"fd00::/64\"]}]}]}]}
  - {name: dr, namespace: prod, action: DENY, dry_run: true, rules: [{clauses: [{matches: [{namespaces: [{exact: dev}]}]}]}]}
";
        let m = model(policies);
        // A first run that saw other policies first, so that its ids are not a fresh run's.
        let mut live = AuthzCompiler::default();
        live.compile(&model("  - {name: zz, namespace: prod, rules: [{clauses: [{matches: [{}]}]}]}\n"))
            .unwrap();
        let old = live.compile(&m).unwrap();
        assert!(!old.verdict.is_empty() && !old.region.is_empty());
        let again = AuthzCompiler::adopting(&old).compile(&m).unwrap();
        assert_eq!(again, old);
    }

    /// The maps' meaning without ids (which differ between compilations of the same thing):
    /// identity by address, and per destination address its regions and rows, identities
    /// named through the compiler `c` that wrote them.
    fn meaning(s: &AuthzState, c: &AuthzCompiler) -> impl PartialEq + std::fmt::Debug {
        type Regions = BTreeSet<([u8; 16], u32, u32)>;
        type Rows = BTreeMap<(String, u32, u16), (u8, u32, u8, u32)>;
        let name = |id: u32| match id {
            0 | 1 => format!("#{id}"),
            _ => c
                .identity_ids
                .iter()
                .find(|(_, v)| **v + 1 == id)
                .map(|(k, _)| k.principal())
                .unwrap_or_default(),
        };
        let dests: BTreeMap<[u32; 4], (Regions, Rows)> = s
            .dest
            .iter()
            .map(|(addr, d)| {
                let id = d.dest_id;
                let regions = s
                    .region
                    .iter()
                    .filter(|((k, _), _)| u32::from_be_bytes(k.dest_id_be) == id)
                    .map(|((k, len), r)| (k.addr, *len, *r))
                    .collect();
                let rows = s
                    .verdict
                    .iter()
                    .filter(|(k, _)| k.dest_id == id)
                    .map(|(k, v)| {
                        (
                            (name(k.identity), k.region, k.port),
                            (v.action, v.policy_id, v.dry_action, v.dry_policy_id),
                        )
                    })
                    .collect();
                (*addr, (regions, rows))
            })
            .collect();
        let identity: BTreeMap<[u32; 4], String> = s.identity.iter().map(|(a, id)| (*a, name(*id))).collect();
        (identity, dests, s.counts.clone())
    }

    /// Issue 18, item 1: workload changes compiled alone give the maps a full compilation
    /// gives, step after step of a random walk (pods come, go, move address, change service
    /// account among the ones in use, share addresses, go host-network), and a change that
    /// brings a new identity falls back to a full compilation.
    #[test]
    fn a_change_compiled_alone_matches_a_full_compilation() {
        let policies = "  - {name: sel, namespace: prod, rules: [{clauses: [{matches: [{service_accounts: [{namespace: prod, service_account: api}], destination_ports: [8080]}]}]}]}
  - {name: d, namespace: prod, action: DENY, rules: [{clauses: [{matches: [{source_ips: [10.244.0.0/28]}]}]}]}
  - {name: dr, namespace: dev, action: DENY, dry_run: true, rules: [{clauses: [{matches: [{namespaces: [{exact: prod}]}]}]}]}
";
        let mut model = model(policies);
        let mut c = AuthzCompiler::default();
        let mut applied = c.compile(&model).unwrap();
        let mut seed = 0x2545_f491_u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let (mut alone, mut full) = (0, 0);
        for step in 0..300 {
            let mut m = model.clone();
            let i = next(12);
            if next(4) == 0 {
                m.workloads.remove(format!("w{i}").as_str());
            } else {
                let ns = ["prod", "dev"][next(2) as usize];
                let sa = ["web", "api", "default"][next(3) as usize];
                let host = if next(10) == 0 { ", network_mode: HOST_NETWORK" } else { "" };
                let sel = if next(2) == 0 { ", authorization_policies: [prod/sel]" } else { "" };
                let text = format!(
                    "workloads: [{{uid: w{i}, name: w{i}, namespace: {ns}, service_account: {sa}, addresses: [10.244.0.{}]{host}{sel}}}]",
                    next(8) + 1
                );
                let w = config::parse(&text).unwrap().workloads.into_values().next().unwrap();
                m.workloads.insert(w.uid.clone(), w);
            }
            let keys = kmesh_model::delta::ModelKeys::between(&model, &m);
            let mut now = model.clone();
            let change = now.take_from(&m, &keys);
            let d = match c.compile_change(&now, &change, &applied) {
                Some(d) => {
                    alone += 1;
                    d.unwrap()
                }
                None => {
                    full += 1;
                    AuthzDiff::between(&applied, &c.compile(&now).unwrap())
                }
            };
            applied.apply(d);
            let mut f = AuthzCompiler::default();
            let fresh = f.compile(&now).unwrap();
            assert_eq!(meaning(&applied, &c), meaning(&fresh, &f), "step {step}");
            // No entry is left behind under an old dest id.
            let ids: BTreeSet<u32> = applied.dest.values().map(|d| d.dest_id).collect();
            assert!(applied.verdict.keys().all(|k| ids.contains(&k.dest_id)), "step {step}: stale rows");
            model = m;
        }
        assert!(alone > 150 && full > 0, "alone {alone}, full {full}");
    }

    /// Issue 13, item 2: rows per destination are bounded; past the bound the configuration is
    /// refused with an error naming the policy and the workload.
    #[test]
    fn a_policy_compiling_past_the_row_bound_is_refused_by_name() {
        let cidrs: Vec<String> = (0..255).map(|i| format!("\"10.1.0.{i}/32\"")).collect();
        let ports: Vec<String> = (1..=128).map(|p| p.to_string()).collect();
        let policy = format!(
            "  - {{name: huge, namespace: prod, action: DENY, rules: [{{clauses: [{{matches: [{{source_ips: [{}], destination_ports: [{}]}}]}}]}}]}}",
            cidrs.join(", "),
            ports.join(", ")
        );
        let e = AuthzCompiler::default().compile(&model(&policy)).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("[\"prod/huge\"]") && msg.contains("on workload prod/"), "{msg}");
        assert!(e.rows > MAX_ROWS_PER_DESTINATION, "{msg}");
        // Just under the bound compiles.
        let policy = policy.replace(", 128]", "]");
        assert!(AuthzCompiler::default().compile(&model(&policy)).is_ok());
    }

    #[test]
    fn no_policy_allows_everything_and_writes_nothing() {
        let s = AuthzCompiler::default().compile(&model("  []")).unwrap();
        assert!(s.dest.is_empty() && s.verdict.is_empty());
        assert!(allowed("  []", "10.244.0.30", 80));
    }

    #[test]
    fn compiled_lookups_agree_with_the_rules() {
        let cases: &[(&str, &str, u16, bool)] = &[
            // DENY from namespace dev.
            (
                "  - {name: d, namespace: prod, action: DENY, rules: [{clauses: [{matches: [{namespaces: [{exact: dev}]}]}]}]}",
                "10.244.0.30",
                80,
                false,
            ),
            (
                "  - {name: d, namespace: prod, action: DENY, rules: [{clauses: [{matches: [{namespaces: [{exact: dev}]}]}]}]}",
                "10.244.0.20",
                80,
                true,
            ),
            // ALLOW only service account api: everyone else denied, unknown sources too.
            (
                "  - {name: a, namespace: prod, rules: [{clauses: [{matches: [{service_accounts: [{namespace: prod, service_account: api}]}]}]}]}",
                "10.244.0.20",
                80,
                true,
            ),
            (
                "  - {name: a, namespace: prod, rules: [{clauses: [{matches: [{service_accounts: [{namespace: prod, service_account: api}]}]}]}]}",
                "10.244.0.30",
                80,
                false,
            ),
            (
                "  - {name: a, namespace: prod, rules: [{clauses: [{matches: [{service_accounts: [{namespace: prod, service_account: api}]}]}]}]}",
                "192.168.9.9",
                80,
                false,
            ),
            // not_ forms: unknown sources satisfy not_ identity conditions.
            (
                "  - {name: a, namespace: prod, rules: [{clauses: [{matches: [{not_namespaces: [{prefix: de}]}]}]}]}",
                "192.168.9.9",
                80,
                true,
            ),
            (
                "  - {name: a, namespace: prod, rules: [{clauses: [{matches: [{not_namespaces: [{prefix: de}]}]}]}]}",
                "10.244.0.30",
                80,
                false,
            ),
            // CIDRs, nested: deny 10.244.0.0/24 except allow-listed /30 via an ALLOW with not_source_ips.
            (
                "  - {name: d, namespace: prod, action: DENY, rules: [{clauses: [{matches: [{source_ips: [\"10.244.0.0/24\"], not_source_ips: [\"10.244.0.20/30\"]}]}]}]}",
                "10.244.0.30",
                80,
                false,
            ),
            (
                "  - {name: d, namespace: prod, action: DENY, rules: [{clauses: [{matches: [{source_ips: [\"10.244.0.0/24\"], not_source_ips: [\"10.244.0.20/30\"]}]}]}]}",
                "10.244.0.21",
                80,
                true,
            ),
            (
                "  - {name: d, namespace: prod, action: DENY, rules: [{clauses: [{matches: [{source_ips: [\"10.244.0.0/24\"], not_source_ips: [\"10.244.0.20/30\"]}]}]}]}",
                "10.244.1.1",
                80,
                true,
            ),
            // Ports: only 8080 allowed.
            (
                "  - {name: a, namespace: prod, rules: [{clauses: [{matches: [{destination_ports: [8080]}]}]}]}",
                "10.244.0.30",
                8080,
                true,
            ),
            (
                "  - {name: a, namespace: prod, rules: [{clauses: [{matches: [{destination_ports: [8080]}]}]}]}",
                "10.244.0.30",
                9090,
                false,
            ),
            // Principals by suffix.
            (
                "  - {name: a, namespace: prod, rules: [{clauses: [{matches: [{principals: [{suffix: /sa/api}]}]}]}]}",
                "10.244.0.20",
                80,
                true,
            ),
            (
                "  - {name: a, namespace: prod, rules: [{clauses: [{matches: [{principals: [{suffix: /sa/api}]}]}]}]}",
                "10.244.0.30",
                80,
                false,
            ),
            // Presence: any identity, but not an unknown source.
            (
                "  - {name: a, namespace: prod, rules: [{clauses: [{matches: [{principals: [{presence: {}}]}]}]}]}",
                "10.244.0.30",
                80,
                true,
            ),
            (
                "  - {name: a, namespace: prod, rules: [{clauses: [{matches: [{principals: [{presence: {}}]}]}]}]}",
                "192.168.9.9",
                80,
                false,
            ),
            // Scope: a selector policy not listed by the server does not apply; another namespace's neither.
            (
                "  - {name: other, namespace: prod, scope: WORKLOAD_SELECTOR, action: DENY, rules: [{clauses: [{matches: [{}]}]}]}",
                "10.244.0.30",
                80,
                true,
            ),
            (
                "  - {name: sel, namespace: prod, scope: WORKLOAD_SELECTOR, action: DENY, rules: [{clauses: [{matches: [{}]}]}]}",
                "10.244.0.30",
                80,
                false,
            ),
            (
                "  - {name: ns, namespace: dev, scope: NAMESPACE, action: DENY, rules: [{clauses: [{matches: [{}]}]}]}",
                "10.244.0.30",
                80,
                true,
            ),
            // DENY wins over ALLOW.
            (
                "  - {name: a, namespace: prod, rules: [{clauses: [{matches: [{}]}]}]}\n  - {name: d, namespace: prod, action: DENY, rules: [{clauses: [{matches: [{namespaces: [{exact: dev}]}]}]}]}",
                "10.244.0.30",
                80,
                false,
            ),
            // Dry run: evaluated, never enforced.
            (
                "  - {name: d, namespace: prod, action: DENY, dry_run: true, rules: [{clauses: [{matches: [{}]}]}]}",
                "10.244.0.30",
                80,
                true,
            ),
            // An ALLOW policy without rules matches nothing: default deny.
            ("  - {name: a, namespace: prod}", "10.244.0.20", 80, false),
        ];
        for (i, (p, src, port, expect)) in cases.iter().enumerate() {
            assert_eq!(allowed(p, src, *port), *expect, "case {i}: {p} from {src}:{port}");
        }
    }

    #[test]
    fn dry_run_differences_are_reported() {
        let s = AuthzCompiler::default().compile(&model(
            "  - {name: d, namespace: prod, action: DENY, dry_run: true, rules: [{clauses: [{matches: [{}]}]}]}",
        )).unwrap();
        let v = kernel_verdict(&s, "10.244.0.30", 80).unwrap();
        assert_eq!((v.action, v.dry_action), (VERDICT_ALLOW, VERDICT_DENY));
        assert_ne!(v.dry_policy_id, 0);
    }

    #[test]
    fn unchanged_destinations_keep_their_id_and_changed_ones_switch() {
        let mut c = AuthzCompiler::default();
        let p1 = "  - {name: d, namespace: prod, action: DENY, rules: [{clauses: [{matches: [{namespaces: [{exact: dev}]}]}]}]}";
        let a = c.compile(&model(p1)).unwrap();
        let b = c.compile(&model(p1)).unwrap();
        assert_eq!(a, b);
        let p2 = "  - {name: d, namespace: prod, action: DENY, rules: [{clauses: [{matches: [{namespaces: [{exact: prod}]}]}]}]}";
        let d = c.compile(&model(p2)).unwrap();
        let id = |s: &AuthzState| s.dest.values().next().unwrap().dest_id;
        assert_ne!(id(&a), id(&d));
    }

    #[test]
    fn identities_no_policy_singles_out_share_the_fallback_row() {
        let s = AuthzCompiler::default().compile(&model(
            "  - {name: d, namespace: prod, action: DENY, rules: [{clauses: [{matches: [{namespaces: [{exact: dev}]}]}]}]}",
        )).unwrap();
        // Rows: unknown, other, and dev's identity only (prod identities behave like "other").
        let identities: BTreeSet<u32> = s.verdict.keys().map(|k| k.identity).collect();
        assert_eq!(identities.len(), 3, "{identities:?}");
    }

    #[test]
    fn a_host_network_workload_gives_the_node_address_no_identity_and_is_not_policed() {
        let m = config::parse(
            "workloads:
  - {uid: server, name: server, namespace: prod, service_account: web, addresses: [10.244.0.10]}
  - {uid: agent, name: agent, namespace: prod, service_account: api, addresses: [192.168.0.7], network_mode: HOST_NETWORK, authorization_policies: [prod/deny-all]}
policies:
  - {name: allow-api, namespace: prod, scope: NAMESPACE, action: ALLOW, rules: [{clauses: [{matches: [{principals: [{exact: spiffe://cluster.local/ns/prod/sa/api}]}]}]}]}
  - {name: deny-all, namespace: prod, scope: WORKLOAD_SELECTOR, action: DENY, rules: [{clauses: [{matches: [{}]}]}]}",
        )
        .unwrap();
        let s = AuthzCompiler::default().compile(&m).unwrap();
        let node = addr_words("192.168.0.7".parse().unwrap());
        assert!(!s.identity.contains_key(&node), "the node's address took the agent's identity");
        assert!(!s.dest.contains_key(&node), "the node's address is policed as the agent");
        assert!(s.dest.contains_key(&addr_words("10.244.0.10".parse().unwrap())));
        // So the server's ALLOW for the agent's service account does not admit the node.
        assert_eq!(kernel_verdict(&s, "192.168.0.7", 80).map(|v| v.action), Some(VERDICT_DENY));
    }
}
