//! Envoy's `DeltaDiscoveryResponse` as the workload source reads it: the fields it uses, with
//! the same numbers and wire types as `envoy.service.discovery.v3` (the rest are skipped when
//! decoding, as any unknown field is), and resource bodies as [`Bytes`].
//!
//! Decoded from a [`Bytes`] buffer, each body is a slice of that buffer, not a copy: a full push
//! of 110k resources (27 MB) is not copied a second time into 110k small vectors, and the
//! receive buffer goes back to the allocator once the last body is dropped (each body is
//! dropped as soon as it is decoded into the model).

use prost::bytes::Bytes;

/// `envoy.service.discovery.v3.DeltaDiscoveryResponse`, without `control_plane` (7),
/// `removed_resource_names` (8) and `resource_errors` (9), which the daemon does not read.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeltaDiscoveryResponse {
    #[prost(string, tag = "1")]
    pub system_version_info: String,
    #[prost(message, repeated, tag = "2")]
    pub resources: Vec<Resource>,
    #[prost(string, tag = "4")]
    pub type_url: String,
    #[prost(string, tag = "5")]
    pub nonce: String,
    #[prost(string, repeated, tag = "6")]
    pub removed_resources: Vec<String>,
}

/// `envoy.service.discovery.v3.Resource`, without `aliases` (4), `ttl` (6), `cache_control`
/// (7), `resource_name` (8) and `metadata` (9).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Resource {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(message, optional, tag = "2")]
    pub resource: Option<Any>,
    #[prost(string, tag = "3")]
    pub name: String,
}

/// `google.protobuf.Any` with its value as a [`Bytes`] slice.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Any {
    #[prost(string, tag = "1")]
    pub type_url: String,
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
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
        assert_eq!((r[0].name.as_str(), r[0].version.as_str()), ("default/a", "v3"));
        let any = r[0].resource.as_ref().unwrap();
        assert_eq!(any.type_url, crate::ADDRESS_TYPE);
        assert_eq!(&any.value[..], [1, 2, 3, 4]);
    }

    #[test]
    fn a_body_is_a_slice_of_the_received_buffer_not_a_copy() {
        let wire = Bytes::from(full().encode_to_vec());
        let range = wire.as_ptr_range();
        let lean = DeltaDiscoveryResponse::decode(wire.clone()).unwrap();
        let body = &lean.resources[0].resource.as_ref().unwrap().value;
        assert!(range.contains(&body.as_ptr()), "the body points into the buffer it was decoded from");
    }

    #[test]
    fn what_it_encodes_envoys_message_decodes_alike() {
        let lean = DeltaDiscoveryResponse::decode(Bytes::from(full().encode_to_vec())).unwrap();
        let back = discovery::DeltaDiscoveryResponse::decode(lean.encode_to_vec().as_slice()).unwrap();
        let mut want = full();
        want.removed_resource_names.clear();
        want.control_plane = None;
        for r in &mut want.resources {
            r.aliases.clear();
            r.resource_name = None;
            r.ttl = None;
        }
        assert_eq!(back, want);
    }
}
