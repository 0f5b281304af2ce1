//! A fast reader of the common `istio.workload.Address`: a workload with the fields istiod sets
//! for a pod, read in place from the resource's bytes. prost's decoder copies every string of
//! a message into a `String` of its own (a dozen per workload) and its services into a hash
//! map, all dropped as soon as the model's interned copies are made (decoding 100k workloads
//! took 123 ms on one core that way, 70 ms this way).
//!
//! The reader takes only what it can read exactly as prost would: each field at most once,
//! with its declared wire type, in UTF-8, and no field the model reads through the full
//! decoder (waypoint, network gateway, application tunnel, hostname, tunnel protocol,
//! workload type, native tunnel, extensions) and no unknown field. For anything else it
//! returns `None`, and the resource goes to the full decoder, so a workload reads the same
//! either way (a property test checks this).

use super::WorkloadFields;

/// Protobuf wire types.
const VARINT: u8 = 0;
const LEN: u8 = 2;

/// A cursor over one message's bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.0.split_first()?;
            self.0 = rest;
            if i == 9 && b > 1 {
                return None;
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }

    /// The next field's number and wire type; `None` at the end or on a malformed tag.
    fn tag(&mut self) -> Option<(u32, u8)> {
        let t = self.varint()?;
        let field = u32::try_from(t >> 3).ok().filter(|f| *f != 0)?;
        Some((field, (t & 7) as u8))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.varint()?).ok()?;
        if len > self.0.len() {
            return None;
        }
        let (b, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(b)
    }

    fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }

    fn at_end(&self) -> bool {
        self.0.is_empty()
    }

    /// Each field of the message in turn, as (number, wire type, reader of its value); stops
    /// (with `None` from `f`) when `f` does not take a field.
    fn fields(mut self, mut f: impl FnMut(u32, u8, &mut Self) -> Option<()>) -> Option<()> {
        while !self.at_end() {
            let (field, ty) = self.tag()?;
            f(field, ty, &mut self)?;
        }
        Some(())
    }
}

/// Marks field `n` as seen: `None` when it was seen already (prost would merge or overwrite;
/// the full decoder does that).
fn once(seen: &mut u32, n: u32) -> Option<()> {
    let bit = 1u32 << (n % 32);
    if *seen & bit != 0 {
        return None;
    }
    *seen |= bit;
    Some(())
}

/// The workload of an `Address` body, when it is one this reader takes (see the module).
pub(super) fn workload(body: &[u8]) -> Option<WorkloadFields<'_>> {
    let mut r = Reader(body);
    let (1, LEN) = r.tag()? else { return None };
    let w = r.bytes()?;
    if !r.at_end() {
        return None;
    }
    let mut out = WorkloadFields {
        uid: "",
        name: "",
        namespace: "",
        network: "",
        trust_domain: "",
        service_account: "",
        node: "",
        canonical_name: "",
        canonical_revision: "",
        workload_name: "",
        cluster_id: "",
        addresses: Vec::new(),
        status: 0,
        network_mode: 0,
        capacity: None,
        locality: None,
        services: Vec::new(),
        authorization_policies: Vec::new(),
    };
    let mut seen = 0u32;
    Reader(w).fields(|field, ty, r| {
        match (field, ty) {
            (3, LEN) => out.addresses.push(r.bytes()?),
            (16, LEN) => out.authorization_policies.push(r.str()?),
            (22, LEN) => out.services.push(service_entry(r.bytes()?)?),
            (17 | 25, VARINT) => {
                once(&mut seen, field)?;
                // An enum: prost keeps the low 32 bits.
                let v = r.varint()? as i32;
                if field == 17 { out.status = v } else { out.network_mode = v }
            }
            (24, LEN) => {
                once(&mut seen, field)?;
                out.locality = Some(locality(r.bytes()?)?);
            }
            (27, LEN) => {
                once(&mut seen, field)?;
                out.capacity = Some(uint32_value(r.bytes()?)?);
            }
            (1 | 2 | 4 | 6 | 7 | 9 | 10 | 11 | 13 | 18 | 20, LEN) => {
                once(&mut seen, field)?;
                let s = r.str()?;
                *match field {
                    1 => &mut out.name,
                    2 => &mut out.namespace,
                    4 => &mut out.network,
                    6 => &mut out.trust_domain,
                    7 => &mut out.service_account,
                    9 => &mut out.node,
                    10 => &mut out.canonical_name,
                    11 => &mut out.canonical_revision,
                    13 => &mut out.workload_name,
                    18 => &mut out.cluster_id,
                    _ => &mut out.uid,
                } = s;
            }
            _ => return None,
        }
        Some(())
    })?;
    // A key listed twice: prost keeps the last entry's ports (unchecked the others'); left to it.
    let keys = &out.services;
    if keys.iter().enumerate().any(|(i, (k, _))| keys[..i].iter().any(|(o, _)| o == k)) {
        return None;
    }
    Some(out)
}

/// One entry of `Workload.services` (a map entry: key 1, value 2, each at most once).
fn service_entry(b: &[u8]) -> Option<(&str, Vec<(u32, u32)>)> {
    let (mut key, mut ports) = ("", Vec::new());
    let mut seen = 0u32;
    Reader(b).fields(|field, ty, r| {
        match (field, ty) {
            (1, LEN) => key = r.str()?,
            (2, LEN) => ports = port_list(r.bytes()?)?,
            _ => return None,
        }
        once(&mut seen, field)
    })?;
    Some((key, ports))
}

/// A `PortList` (ports 1, each a `Port`: service port 1, target port 2, app protocol 3, each
/// at most once), as its (service port, target port) pairs.
fn port_list(b: &[u8]) -> Option<Vec<(u32, u32)>> {
    let mut out = Vec::new();
    Reader(b).fields(|field, ty, r| {
        let (1, LEN) = (field, ty) else { return None };
        let (mut pair, mut seen) = ((0u32, 0u32), 0u32);
        Reader(r.bytes()?).fields(|field, ty, r| {
            if ty != VARINT || !(1..=3).contains(&field) {
                return None;
            }
            once(&mut seen, field)?;
            // uint32 and enum fields: prost keeps the low 32 bits.
            let v = r.varint()? as u32;
            match field {
                1 => pair.0 = v,
                2 => pair.1 = v,
                _ => {}
            }
            Some(())
        })?;
        out.push(pair);
        Some(())
    })?;
    Some(out)
}

/// A `Locality`: region 1, zone 2, subzone 3.
fn locality(b: &[u8]) -> Option<[&str; 3]> {
    let mut out = [""; 3];
    let mut seen = 0u32;
    Reader(b).fields(|field, ty, r| {
        if ty != LEN || !(1..=3).contains(&field) {
            return None;
        }
        once(&mut seen, field)?;
        out[field as usize - 1] = r.str()?;
        Some(())
    })?;
    Some(out)
}

/// A `google.protobuf.UInt32Value`: value 1.
fn uint32_value(b: &[u8]) -> Option<u32> {
    let mut v = 0;
    let mut seen = 0u32;
    Reader(b).fields(|field, ty, r| {
        let (1, VARINT) = (field, ty) else { return None };
        once(&mut seen, field)?;
        v = r.varint()? as u32;
        Some(())
    })?;
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::super::{decode_address, decode_address_full};
    use kmesh_proto::istio::workload as pw;
    use proptest::prelude::*;
    use prost::Message;

    fn address(w: pw::Workload) -> Vec<u8> {
        pw::Address { r#type: Some(pw::address::Type::Workload(w)) }.encode_to_vec()
    }

    /// Workloads with the fields the fast reader takes, valid and not, and now and then one it
    /// leaves to the full decoder.
    fn workloads() -> impl Strategy<Value = pw::Workload> {
        let text = prop::sample::select(vec!["", "a", "ns", "r1", "z/2", "Kubernetes//Pod/ns/p-1", "p-1"]);
        let addr = prop::sample::select(vec![vec![], vec![10, 0, 0, 1], vec![1, 2, 3], [0xfd; 16].to_vec()]);
        let key = prop::sample::select(vec!["ns/a.svc", "ns/b.svc", "nokey", "/x", "ns/"]);
        let port = (prop::sample::select(vec![0u32, 80, 8080, 70_000]), 0u32..3);
        let services = prop::collection::vec((key, prop::collection::vec(port, 0..3)), 0..3);
        let strs = prop::collection::vec(text.clone(), 11);
        let extra = 0..12u8;
        (
            strs,
            prop::collection::vec(addr, 0..3),
            (0i32..3, 0i32..3, prop::option::of(prop::sample::select(vec![0u32, 5, 1 << 30]))),
            prop::option::of((text.clone(), text.clone(), text)),
            services,
            prop::collection::vec(prop::sample::select(vec!["ns/p", "ns/q"]), 0..2),
            extra,
        )
            .prop_map(
                |(s, addresses, (status, network_mode, capacity), loc, services, pols, extra)| {
                    let mut w = pw::Workload {
                        uid: s[0].into(),
                        name: s[1].into(),
                        namespace: s[2].into(),
                        network: s[3].into(),
                        trust_domain: s[4].into(),
                        service_account: s[5].into(),
                        node: s[6].into(),
                        canonical_name: s[7].into(),
                        canonical_revision: s[8].into(),
                        workload_name: s[9].into(),
                        cluster_id: s[10].into(),
                        addresses,
                        status,
                        network_mode: network_mode * 4, // 0 standard, 4 and 8 unknown
                        capacity,
                        locality: loc.map(|(region, zone, subzone)| pw::Locality {
                            region: region.into(),
                            zone: zone.into(),
                            subzone: subzone.into(),
                        }),
                        services: services
                            .into_iter()
                            .map(|(k, ports)| {
                                let ports = ports
                                    .into_iter()
                                    .map(|(p, t)| pw::Port {
                                        service_port: p,
                                        target_port: p / 2 * t,
                                        app_protocol: t as i32,
                                    })
                                    .collect();
                                (k.to_string(), pw::PortList { ports })
                            })
                            .collect(),
                        authorization_policies: pols.into_iter().map(String::from).collect(),
                        ..Default::default()
                    };
                    match extra {
                        0 => w.hostname = "h.example".into(),
                        1 => w.tunnel_protocol = 1,
                        2 => w.native_tunnel = true,
                        3 => w.workload_type = 2,
                        4 => {
                            w.application_tunnel = Some(pw::ApplicationTunnel { protocol: 1, port: 15008 });
                        }
                        _ => {}
                    }
                    w
                },
            )
    }

    /// Both decoders agree: the same workload, or both an error (the same one when at most one
    /// service is listed: with more, which bad key is named first depends on prost's map order).
    fn agree(bytes: &[u8], services: usize) -> Result<(), TestCaseError> {
        let (fast, full) = (decode_address(bytes), decode_address_full(bytes));
        match (&fast, &full) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(a), Err(b)) if services <= 1 => prop_assert_eq!(a, b),
            (Err(_), Err(_)) => {}
            _ => prop_assert!(false, "fast {fast:?}, full {full:?}"),
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn the_fast_reader_reads_a_workload_as_the_full_decoder_does(w in workloads()) {
            let n = w.services.len();
            agree(&address(w), n)?;
        }

        #[test]
        fn so_it_does_for_cut_and_altered_bytes(w in workloads(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut b = address(w);
            let i = at.index(b.len());
            agree(&b[..i], 3)?;
            b[i] = byte;
            agree(&b, 3)?;
        }
    }

    #[test]
    fn a_pods_workload_is_read_in_place_and_others_are_not() {
        let pod = pw::Workload {
            uid: "Kubernetes//Pod/ns/p-1".into(),
            name: "p-1".into(),
            namespace: "ns".into(),
            addresses: vec![vec![10, 0, 0, 1]],
            services: [(
                "ns/a.svc".to_string(),
                pw::PortList {
                    ports: vec![pw::Port { service_port: 80, target_port: 8080, app_protocol: 0 }],
                },
            )]
            .into(),
            locality: Some(pw::Locality { region: "r".into(), zone: "z".into(), subzone: String::new() }),
            capacity: Some(3),
            ..Default::default()
        };
        let bytes = address(pod.clone());
        let w = super::workload(&bytes).expect("read in place");
        assert_eq!(
            (w.uid, w.namespace, w.addresses.len(), w.capacity),
            ("Kubernetes//Pod/ns/p-1", "ns", 1, Some(3))
        );
        assert_eq!(w.services.len(), 1);
        assert_eq!(w.services[0].1, vec![(80, 8080)]);
        let waypoint = pw::Workload { hostname: "h".into(), ..pod.clone() };
        assert!(super::workload(&address(waypoint)).is_none(), "a field it leaves to the full decoder");
        let mut twice = address(pod);
        // Field 2 (namespace) once more, inside the workload: prost keeps the last.
        let extra = [0x12, 1, b'x'];
        twice[1] += extra.len() as u8;
        twice.extend(extra);
        assert!(super::workload(&twice).is_none(), "a field given twice");
        assert!(
            matches!(decode_address(&twice).unwrap(), super::super::AddressResource::Workload(w) if w.namespace() == "x")
        );
    }
}
