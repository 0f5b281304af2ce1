//! Envoy's `DeltaDiscoveryResponse` as the workload source reads it: the fields it uses, with
//! the same numbers and wire types as `envoy.service.discovery.v3` (the rest are skipped when
//! decoding, as any unknown field is), and resource bodies as [`Bytes`].
//!
//! Decoded from a [`Bytes`] buffer, each body is a slice of that buffer, not a copy: a full push
//! of 110k resources (27 MB) is not copied a second time into 110k small vectors, and the
//! receive buffer goes back to the allocator once the last body is dropped (each body is
//! dropped as soon as it is decoded into the model).

use std::ops::Range;

use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};
use prost::{DecodeError, Message};

/// `envoy.service.discovery.v3.DeltaDiscoveryResponse`, without `control_plane` (7),
/// `removed_resource_names` (8) and `resource_errors` (9), which the daemon does not read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeltaDiscoveryResponse {
    /// 1
    pub system_version_info: String,
    /// 2
    pub resources: Vec<Resource>,
    /// 4
    pub type_url: String,
    /// 5
    pub nonce: String,
    /// 6
    pub removed_resources: Vec<String>,
}

impl Message for DeltaDiscoveryResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if !self.system_version_info.is_empty() {
            encoding::string::encode(1, &self.system_version_info, buf);
        }
        for r in &self.resources {
            encoding::bytes::encode(2, &r.raw, buf);
        }
        if !self.type_url.is_empty() {
            encoding::string::encode(4, &self.type_url, buf);
        }
        if !self.nonce.is_empty() {
            encoding::string::encode(5, &self.nonce, buf);
        }
        encoding::string::encode_repeated(6, &self.removed_resources, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => encoding::string::merge(wire_type, &mut self.system_version_info, buf, ctx),
            2 => {
                // From a `Bytes` buffer, a slice of it (no copy).
                let mut raw = Bytes::new();
                encoding::bytes::merge(wire_type, &mut raw, buf, ctx)?;
                self.resources.push(Resource::parse(raw));
                Ok(())
            }
            4 => encoding::string::merge(wire_type, &mut self.type_url, buf, ctx),
            5 => encoding::string::merge(wire_type, &mut self.nonce, buf, ctx),
            6 => encoding::string::merge_repeated(wire_type, &mut self.removed_resources, buf, ctx),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let s = |tag, v: &String| if v.is_empty() { 0 } else { encoding::string::encoded_len(tag, v) };
        s(1, &self.system_version_info)
            + self.resources.iter().map(|r| encoding::bytes::encoded_len(2, &r.raw)).sum::<usize>()
            + s(4, &self.type_url)
            + s(5, &self.nonce)
            + encoding::string::encoded_len_repeated(6, &self.removed_resources)
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// `envoy.service.discovery.v3.Resource`, kept as it was received (a slice of the response:
/// no field is copied) with where its `version` (1), `resource` (2, a `google.protobuf.Any`:
/// `type_url` 1, `value` 2) and `name` (3) are; other fields (`aliases`, `ttl`,
/// `cache_control`, `resource_name`, `metadata`) are skipped. A resource that does not
/// decode as prost would decode it (a field of another wire type, a string that is not
/// UTF-8, a length past its end) does not fail the response: it says what is wrong
/// ([`problem`](Self::problem)), and the response's other resources stand.
#[derive(Clone, Default, PartialEq)]
pub struct Resource {
    raw: Bytes,
    version: Range<usize>,
    name: Range<usize>,
    body: Option<(Range<usize>, Range<usize>)>,
    problem: Option<&'static str>,
}

impl Resource {
    /// A resource of these fields (encoded, as a control plane would send it).
    pub fn new(name: &str, version: &str, body: Option<(&str, &[u8])>) -> Resource {
        let mut raw = Vec::new();
        if !version.is_empty() {
            encoding::string::encode(1, &version.to_string(), &mut raw);
        }
        if let Some((type_url, value)) = body {
            let mut any = Vec::new();
            encoding::string::encode(1, &type_url.to_string(), &mut any);
            encoding::bytes::encode(2, &value.to_vec(), &mut any);
            encoding::bytes::encode(2, &any, &mut raw);
        }
        if !name.is_empty() {
            encoding::string::encode(3, &name.to_string(), &mut raw);
        }
        Resource::parse(raw.into())
    }

    /// Where the fields of the encoded resource `raw` are.
    fn parse(raw: Bytes) -> Resource {
        let mut r = Resource { raw, ..Default::default() };
        if let Err(problem) = r.locate() {
            r.version = 0..0;
            r.name = 0..0;
            r.body = None;
            r.problem = Some(problem);
        }
        r
    }

    fn locate(&mut self) -> Result<(), &'static str> {
        let raw = &self.raw[..];
        let mut at = raw;
        while !at.is_empty() {
            let (tag, wt) = encoding::decode_key(&mut at).map_err(|_| "a field key does not decode")?;
            match tag {
                1..=3 => {
                    if wt != WireType::LengthDelimited {
                        return Err("a field has the wrong wire type");
                    }
                    let field = delimited(raw, &mut at)?;
                    match tag {
                        1 => self.version = utf8(raw, field)?,
                        3 => self.name = utf8(raw, field)?,
                        // An `Any` given twice is merged, field by field, as prost does.
                        _ => self.body = Some(any(raw, field, self.body.take())?),
                    }
                }
                _ => encoding::skip_field(wt, tag, &mut at, DecodeContext::default())
                    .map_err(|_| "a field does not decode")?,
            }
        }
        Ok(())
    }

    /// The received bytes of the resource.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    pub fn name(&self) -> &str {
        self.str(&self.name)
    }

    pub fn version(&self) -> &str {
        self.str(&self.version)
    }

    /// The body's type URL and encoded value (`None` when the resource has none).
    pub fn body(&self) -> Option<(&str, &[u8])> {
        self.body.as_ref().map(|(t, v)| (self.str(t), &self.raw[v.clone()]))
    }

    /// What makes the resource undecodable, if anything (its fields then read empty).
    pub fn problem(&self) -> Option<&'static str> {
        self.problem
    }

    fn str(&self, r: &Range<usize>) -> &str {
        // SAFETY: every range is checked to be UTF-8 when the resource is parsed (`utf8`), and
        // neither the bytes (immutable `Bytes`) nor the ranges (private) change after.
        unsafe { std::str::from_utf8_unchecked(&self.raw[r.clone()]) }
    }
}

impl std::fmt::Debug for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resource")
            .field("name", &self.name())
            .field("version", &self.version())
            .field("type_url", &self.body().map(|b| b.0))
            .field("value_len", &self.body().map(|b| b.1.len()))
            .field("problem", &self.problem)
            .finish()
    }
}

/// The range of `raw` that the length-delimited field at `at` (just past its key) holds;
/// moves `at` past it.
fn delimited(raw: &[u8], at: &mut &[u8]) -> Result<Range<usize>, &'static str> {
    let len = encoding::decode_varint(at).map_err(|_| "a length does not decode")?;
    if len > at.remaining() as u64 {
        return Err("a field runs past the end of the resource");
    }
    let start = raw.len() - at.len();
    let end = start + len as usize;
    at.advance(len as usize);
    Ok(start..end)
}

fn utf8(raw: &[u8], r: Range<usize>) -> Result<Range<usize>, &'static str> {
    std::str::from_utf8(&raw[r.clone()]).map(|_| r).map_err(|_| "a string is not valid UTF-8")
}

/// The `type_url` and `value` of the `google.protobuf.Any` at `field` of `raw`, merged into
/// `prev` (an earlier one of the same resource).
fn any(
    raw: &[u8],
    field: Range<usize>,
    prev: Option<(Range<usize>, Range<usize>)>,
) -> Result<(Range<usize>, Range<usize>), &'static str> {
    let empty = field.start..field.start;
    let (mut type_url, mut value) = prev.unwrap_or((empty.clone(), empty));
    let mut at = &raw[..field.end];
    at.advance(field.start);
    while !at.is_empty() {
        let (tag, wt) = encoding::decode_key(&mut at).map_err(|_| "a field key does not decode")?;
        if tag == 1 || tag == 2 {
            if wt != WireType::LengthDelimited {
                return Err("a field has the wrong wire type");
            }
            let f = delimited(&raw[..field.end], &mut at)?;
            if tag == 1 { type_url = utf8(raw, f)? } else { value = f }
        } else {
            encoding::skip_field(wt, tag, &mut at, DecodeContext::default())
                .map_err(|_| "a field does not decode")?;
        }
    }
    Ok((type_url, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery;
    use prost::Message;

    fn full() -> discovery::DeltaDiscoveryResponse {
        discovery::DeltaDiscoveryResponse {
            system_version_info: "v7".into(),
            resources: vec![discovery::Resource {
                name: "default/a".into(),
                version: "v3".into(),
                aliases: vec!["alias".into()],
                resource_name: Some(discovery::ResourceName {
                    name: "default/a".into(),
                    ..Default::default()
                }),
                resource: Some(crate::Any { type_url: crate::ADDRESS_TYPE.into(), value: vec![1, 2, 3, 4] }),
                ttl: Some(envoy_types::pb::google::protobuf::Duration { seconds: 5, nanos: 0 }),
                ..Default::default()
            }],
            type_url: crate::ADDRESS_TYPE.into(),
            removed_resources: vec!["default/b".into()],
            removed_resource_names: vec![discovery::ResourceName {
                name: "default/b".into(),
                ..Default::default()
            }],
            nonce: "n9".into(),
            control_plane: Some(crate::core::ControlPlane { identifier: "istiod".into() }),
            ..Default::default()
        }
    }

    #[test]
    fn reads_every_field_it_has_from_envoys_message_and_skips_the_rest() {
        let wire = Bytes::from(full().encode_to_vec());
        let lean = DeltaDiscoveryResponse::decode(wire).unwrap();
        assert_eq!(lean.system_version_info, "v7");
        assert_eq!(lean.type_url, crate::ADDRESS_TYPE);
        assert_eq!(lean.nonce, "n9");
        assert_eq!(lean.removed_resources, ["default/b"]);
        let r = &lean.resources[..];
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].name(), r[0].version(), r[0].problem()), ("default/a", "v3", None));
        assert_eq!(r[0].body(), Some((crate::ADDRESS_TYPE, &[1u8, 2, 3, 4][..])));
    }

    #[test]
    fn a_resource_that_does_not_decode_says_why_and_the_others_stand() {
        let good = full().resources.remove(0).encode_to_vec();
        let mut bad_utf8 = Vec::new();
        encoding::bytes::encode(3, &vec![b'a', 0xff], &mut bad_utf8);
        let mut wrong_type = Vec::new();
        encoding::uint32::encode(3, &7, &mut wrong_type);
        let mut past_end = Vec::new();
        encoding::bytes::encode(2, &vec![0x12, 9, 1], &mut past_end);
        let mut wire = Vec::new();
        for raw in [&good, &bad_utf8, &wrong_type, &past_end] {
            encoding::bytes::encode(2, raw, &mut wire);
        }
        let lean = DeltaDiscoveryResponse::decode(Bytes::from(wire)).unwrap();
        let problems: Vec<_> = lean.resources.iter().map(|r| r.problem()).collect();
        assert_eq!(
            problems,
            [
                None,
                Some("a string is not valid UTF-8"),
                Some("a field has the wrong wire type"),
                Some("a field runs past the end of the resource")
            ]
        );
        assert_eq!(lean.resources[0].name(), "default/a");
        assert!(lean.resources[1..].iter().all(|r| r.name().is_empty() && r.body().is_none()));
        // prost refuses each of the three whole; its message decodes every good one alike.
        for raw in [&bad_utf8, &wrong_type, &past_end] {
            assert!(discovery::Resource::decode(raw.as_slice()).is_err());
        }
    }

    #[test]
    fn an_any_given_twice_is_merged_and_later_strings_win_as_prost_reads_them() {
        let mut raw = Vec::new();
        encoding::string::encode(3, &"first".to_string(), &mut raw);
        let mut any1 = Vec::new();
        encoding::string::encode(1, &"type/a".to_string(), &mut any1);
        encoding::bytes::encode(2, &vec![1u8], &mut any1);
        encoding::bytes::encode(2, &any1, &mut raw);
        let mut any2 = Vec::new();
        encoding::string::encode(1, &"type/b".to_string(), &mut any2);
        encoding::bytes::encode(2, &any2, &mut raw);
        encoding::string::encode(3, &"second".to_string(), &mut raw);
        encoding::string::encode(4, &"an alias".to_string(), &mut raw);
        let full = discovery::Resource::decode(raw.as_slice()).unwrap();
        let lean = Resource::parse(Bytes::from(raw));
        let any = full.resource.unwrap();
        assert_eq!(lean.name(), full.name);
        assert_eq!(lean.body(), Some((any.type_url.as_str(), any.value.as_slice())));
        assert_eq!(lean.body(), Some(("type/b", &[1u8][..])));
        assert_eq!(Resource::new("n", "v", Some(("t", &[5]))).body(), Some(("t", &[5u8][..])));
    }

    #[test]
    fn a_body_is_a_slice_of_the_received_buffer_not_a_copy() {
        let wire = Bytes::from(full().encode_to_vec());
        let range = wire.as_ptr_range();
        let lean = DeltaDiscoveryResponse::decode(wire.clone()).unwrap();
        let r = &lean.resources[0];
        let body = r.body().unwrap().1;
        assert!(range.contains(&body.as_ptr()), "the body points into the buffer it was decoded from");
        assert!(range.contains(&r.name().as_ptr()), "so does the name");
    }

    #[test]
    fn what_it_encodes_envoys_message_decodes_alike() {
        let lean = DeltaDiscoveryResponse::decode(Bytes::from(full().encode_to_vec())).unwrap();
        let back = discovery::DeltaDiscoveryResponse::decode(lean.encode_to_vec().as_slice()).unwrap();
        // The response's fields it does not read are gone; each resource is kept whole, as
        // it was received.
        let mut want = full();
        want.removed_resource_names.clear();
        want.control_plane = None;
        assert_eq!(back, want);
        assert_eq!(lean.encoded_len(), lean.encode_to_vec().len());
    }
}
