//! `sk_lookup` (`kmesh_authz`): L4 authorization in the destination pod's namespace, decided
//! when a new connection looks up its socket.

use aya_ebpf::{btf_maps::lpm_trie::Key, macros::sk_lookup, programs::SkLookupContext};
use kmesh_common::*;

use crate::maps::{
    AUTHZ_COUNTS, AUTHZ_DEST, AUTHZ_EVENTS, AUTHZ_REGION, AUTHZ_VERDICT, IDENTITY, Lookup, NODE_CONNS,
};
use crate::shared::{BPF_RB_NO_WAKEUP, count};

/// A verdict row: `Ok(None)` when absent, `Err(())` when the bytes found belong to another row
/// (a freed element handed to another key under us).
#[inline(always)]
fn verdict(dest_id: u32, identity: u32, region: u32, port: u16) -> Result<Option<VerdictValue>, ()> {
    let key = VerdictKey { dest_id, identity, region, port, _pad: 0 };
    match unsafe { AUTHZ_VERDICT.find(key) }.copied() {
        None => Ok(None),
        Some(v) if v.belongs_to(&key) => Ok(Some(v)),
        Some(_) => Err(()),
    }
}

/// The row that decides: this identity on this port, on any port, then the fallback identity
/// the same way. A destination with policies always has fallback rows, so none found is an
/// inconsistency, as is a torn read: both are `Err`.
#[inline(always)]
fn first_verdict(
    dest_id: u32,
    region: u32,
    identity: u32,
    other: u32,
    port: u16,
) -> Result<VerdictValue, ()> {
    if let Some(v) = verdict(dest_id, identity, region, port)? {
        return Ok(v);
    }
    if let Some(v) = verdict(dest_id, identity, region, PORT_OTHER)? {
        return Ok(v);
    }
    if let Some(v) = verdict(dest_id, other, region, port)? {
        return Ok(v);
    }
    if let Some(v) = verdict(dest_id, other, region, PORT_OTHER)? {
        return Ok(v);
    }
    Err(())
}

/// The identity of a source address (`IDENTITY_UNKNOWN` when it has none); `None` when the
/// value read twice belonged to another address.
#[inline(always)]
fn identity_of(src: &[u32; 4]) -> Option<u32> {
    let mut attempt = 0;
    while attempt < 2 {
        attempt += 1;
        match unsafe { IDENTITY.find(*src) }.copied() {
            None => return Some(IDENTITY_UNKNOWN),
            Some(x) if x.belongs_to(src) => return Some(x.id),
            Some(_) => {}
        }
    }
    None
}

#[inline(always)]
fn count_decision(policy_id: u32, action: u8) {
    let key = CountKey { policy_id, action: action as u32 };
    if let Some(p) = AUTHZ_COUNTS.get_ptr_mut(key) {
        // SAFETY: this CPU's slot of a per-CPU value.
        unsafe { *p += 1 };
    }
}

const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;

#[sk_lookup]
pub fn kmesh_authz(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // Every context field is read once, at a constant offset (volatile keeps the compiler from
    // merging the IPv4 and IPv6 reads into a computed offset, which the verifier rejects).
    use core::ptr::read_volatile as rv;
    let (family, proto) = unsafe { (rv(&(*l).family), rv(&(*l).protocol)) };
    let (r4, l4) = unsafe { (rv(&(*l).remote_ip4), rv(&(*l).local_ip4)) };
    let r6 = unsafe {
        [rv(&(*l).remote_ip6[0]), rv(&(*l).remote_ip6[1]), rv(&(*l).remote_ip6[2]), rv(&(*l).remote_ip6[3])]
    };
    let l6 = unsafe {
        [rv(&(*l).local_ip6[0]), rv(&(*l).local_ip6[1]), rv(&(*l).local_ip6[2]), rv(&(*l).local_ip6[3])]
    };
    let (src, dst) = if family == 2 {
        (v4_mapped(r4), v4_mapped(l4))
    } else if family == 10 {
        (r6, l6)
    } else {
        return SK_PASS;
    };
    // Values are copied and checked against their key (see `key_check`); a destination whose
    // entry reads as another's twice, or a source whose identity does, is dropped.
    let mut dest = None;
    let mut attempt = 0;
    while attempt < 2 {
        attempt += 1;
        match unsafe { AUTHZ_DEST.find(dst) }.copied() {
            None => return SK_PASS,
            Some(d) if d.belongs_to(&dst) => {
                dest = Some(d);
                break;
            }
            Some(_) => {}
        }
    }
    let Some(d) = dest else {
        count(stat::AUTHZ_INCONSISTENT);
        return SK_DROP;
    };
    let dest_id = d.dest_id;
    let port = unsafe { (*l).local_port } as u16;
    let node = NodeConnKey { src, dst, src_port: u16::from_be(unsafe { (*l).remote_port }), dst_port: port };
    if unsafe { NODE_CONNS.get(node) }.is_some() {
        count(stat::AUTHZ_NODE_EXEMPT);
        return SK_PASS;
    }
    let Some(identity) = identity_of(&src) else {
        count(stat::AUTHZ_INCONSISTENT);
        return SK_DROP;
    };
    let mut rkey = RegionKey { dest_id_be: dest_id.to_be_bytes(), addr: [0; 16] };
    let mut i = 0;
    while i < 4 {
        let b = src[i].to_ne_bytes();
        rkey.addr[i * 4] = b[0];
        rkey.addr[i * 4 + 1] = b[1];
        rkey.addr[i * 4 + 2] = b[2];
        rkey.addr[i * 4 + 3] = b[3];
        i += 1;
    }
    let region = unsafe { AUTHZ_REGION.find(&Key { prefix_len: 160, data: rkey }) }.copied().unwrap_or(0);
    let other = if identity == IDENTITY_UNKNOWN { IDENTITY_UNKNOWN } else { IDENTITY_OTHER };
    let Ok(v) = first_verdict(dest_id, region, identity, other, port) else {
        // No row, or a torn one: the maps are inconsistent. Fail closed.
        count(stat::AUTHZ_INCONSISTENT);
        return SK_DROP;
    };
    count_decision(v.policy_id, v.action);
    if v.action == VERDICT_DENY || v.dry_action != 0 {
        let ev = AuthzEvent {
            src,
            dst,
            src_port: u16::from_be(unsafe { (*l).remote_port }),
            dst_port: port,
            policy_id: v.policy_id,
            action: v.action,
            dry_action: v.dry_action,
            proto: proto as u8,
            _pad: 0,
            dry_policy_id: v.dry_policy_id,
        };
        if AUTHZ_EVENTS.output_untyped::<AuthzEvent>(&ev, BPF_RB_NO_WAKEUP).is_err() {
            count(stat::AUTHZ_EVENTS_LOST);
        }
    }
    if v.action == VERDICT_DENY { SK_DROP } else { SK_PASS }
}
