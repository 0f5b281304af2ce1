//! Waypoints, the user-space side: the TLV slots of the PROXY protocol header the kernel puts
//! in front of a connection sent to a waypoint (`kmesh-ebpf/src/waypoint.rs`). The routing
//! itself (which frontends go through which waypoint endpoints) is the compiler's
//! (`compile::Compiler::compile_route`).
//!
//! Two maps hold the slots, both written here: `PP_IDENT`, the SPIFFE identity of each enrolled
//! namespace's workload (TLV `0xD0`), and `PP_HOST`, the hostname of the service behind each
//! frontend that has a waypoint (TLV `0xD1`). What to write is computed by pure functions from
//! the model, the enrollments and the compiler's diff, so a change costs what it changes.

use std::collections::BTreeMap;

use kmesh_common::{FrontendKey, PP2_TYPE_PEER_IDENTITY, PP2_TYPE_SERVICE_HOSTNAME, PpSlot, pp_slot};

use crate::authz::Identity;
use crate::compile::{Diff, Enrollment};
use crate::kernel::{KernelError, WaypointMaps};
use crate::model::Model;

/// The identity slot of a namespace enrolled as `e`: its workload's SPIFFE identity, or all
/// padding when it has no workload in the model (or an identity too long for a slot, which
/// is logged).
pub fn identity_slot(model: &Model, e: &Enrollment) -> PpSlot {
    let Some(w) = e.workload.as_ref().and_then(|uid| model.workloads.get(uid.as_str())) else {
        return PpSlot::default();
    };
    let id = Identity::of(w).principal();
    pp_slot(PP2_TYPE_PEER_IDENTITY, id.as_bytes()).unwrap_or_else(|| {
        tracing::warn!(identity = %id, "identity too long for the PROXY header's slot; sent without it");
        PpSlot::default()
    })
}

/// The hostname slot of a service hostname (`None`: too long, logged).
pub fn hostname_slot(hostname: &str) -> Option<PpSlot> {
    let s = pp_slot(PP2_TYPE_SERVICE_HOSTNAME, hostname.as_bytes());
    if s.is_none() {
        tracing::warn!(%hostname, "hostname too long for the PROXY header's slot; sent without it");
    }
    s
}

/// What `PP_HOST` needs after `d`: the slots to write (frontends that go through a waypoint,
/// with the hostname of the service that owns them) and the keys to remove (frontends gone
/// or without a waypoint now). `owner` names the service key owning a frontend; `written`
/// is what the map holds.
pub fn host_changes<'a>(
    d: &Diff,
    model: &Model,
    owner: impl Fn(&FrontendKey) -> Option<&'a kmesh_model::model::Istr>,
    written: &BTreeMap<FrontendKey, PpSlot>,
) -> (Vec<(FrontendKey, PpSlot)>, Vec<FrontendKey>) {
    let mut set = Vec::new();
    let mut del = Vec::new();
    for (fk, v) in &d.set.frontends {
        let slot = (v.waypoint_id != 0)
            .then(|| owner(fk).and_then(|k| model.services.get(k.as_str())))
            .flatten()
            .and_then(|svc| hostname_slot(&svc.hostname));
        match slot {
            Some(s) if written.get(fk) != Some(&s) => set.push((*fk, s)),
            Some(_) => {}
            None if written.contains_key(fk) => del.push(*fk),
            None => {}
        }
    }
    del.extend(d.del_frontends.iter().filter(|fk| written.contains_key(fk)));
    (set, del)
}

/// The slots the kernel holds, and the maps to write them to.
pub struct Headers {
    maps: WaypointMaps,
    idents: BTreeMap<u64, PpSlot>,
    hosts: BTreeMap<FrontendKey, PpSlot>,
    host_write_errors: u64,
}

impl Headers {
    /// Takes over the maps with what they hold (adopted from an earlier run).
    pub fn new(maps: WaypointMaps) -> Self {
        let idents = maps.idents();
        let hosts = maps.hosts();
        Self { maps, idents, hosts, host_write_errors: 0 }
    }

    /// Brings `PP_IDENT` to the enrollments (a handful of entries per node: compared whole).
    pub fn sync_idents(
        &mut self,
        model: &Model,
        enrolled: &BTreeMap<u64, Enrollment>,
    ) -> Result<(), KernelError> {
        for (cookie, e) in enrolled {
            let slot = identity_slot(model, e);
            if self.idents.get(cookie) != Some(&slot) {
                self.maps.set_ident(*cookie, &slot)?;
                self.idents.insert(*cookie, slot);
            }
        }
        let gone: Vec<u64> = self.idents.keys().filter(|c| !enrolled.contains_key(c)).copied().collect();
        for c in gone {
            self.maps.remove_ident(c);
            self.idents.remove(&c);
        }
        Ok(())
    }

    /// Writes the hostname slots a diff needs before it is applied (a frontend never goes
    /// through a waypoint before its slot is there); returns the keys to remove once it is.
    /// A slot that cannot be written (`PP_HOST` holds 65,536) does not stop the apply: those
    /// connections' headers go without the hostname TLV, which is logged and counted.
    pub fn before_apply<'a>(
        &mut self,
        d: &Diff,
        model: &Model,
        owner: impl Fn(&FrontendKey) -> Option<&'a kmesh_model::model::Istr>,
    ) -> Vec<FrontendKey> {
        let (set, del) = host_changes(d, model, owner, &self.hosts);
        let mut failed = 0;
        let mut last = None;
        for (fk, slot) in set {
            match self.maps.set_host(&fk, &slot) {
                Ok(()) => {
                    self.hosts.insert(fk, slot);
                }
                Err(e) => {
                    failed += 1;
                    last = Some(e);
                }
            }
        }
        if let Some(e) = last {
            self.host_write_errors += failed;
            tracing::warn!(frontends = failed, error = %e,
                "hostname slots of waypoint headers not written: those connections' headers go without TLV 0xD1");
        }
        del
    }

    /// Hostname slots that could not be written since start.
    pub fn host_write_errors(&self) -> u64 {
        self.host_write_errors
    }

    /// Removes hostname slots of frontends the applied diff removed or took off waypoints.
    pub fn after_apply(&mut self, del: &[FrontendKey]) {
        for fk in del {
            self.maps.remove_host(fk);
            self.hosts.remove(fk);
        }
    }
}
