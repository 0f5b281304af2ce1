//! The ADS service as gRPC sees it, and the delta response as the control plane sends it.
//!
//! A delta response is Envoy's `DeltaDiscoveryResponse` on the wire, byte for byte, but its
//! resources are not Envoy's owned `Resource`s: each is the name, version and body the
//! control plane holds, shared by reference count, and written into gRPC's send buffer when
//! the response is encoded. A full push of 110k resources (27 MB) thus copies each body once,
//! into that buffer, instead of once into a `Resource` and again into the buffer, and copies
//! no name or version at all.
//!
//! tonic's generated server fixes a method's message types, so the service is routed here by
//! hand: the two ADS methods, with prost's codec over these types.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use kmesh_proto::discovery::{DeltaDiscoveryRequest, DiscoveryRequest};
use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};
use prost::{DecodeError, Message};
use tonic::codegen::{BoxFuture, http};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

use crate::ControlPlane;

/// One resource of a delta response: Envoy's `Resource` with `name` (3), `version` (1) and
/// `resource` (2, an `Any` of the response's `type_url` and this body).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Outgoing {
    pub name: Arc<str>,
    pub version: Arc<str>,
    pub body: Bytes,
}

/// `envoy.service.discovery.v3.DeltaDiscoveryResponse` with the fields the control plane sets
/// (`removed_resource_names`, `control_plane` and `resource_errors` are never sent).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct DeltaResponse {
    /// 1
    pub system_version_info: String,
    /// 2
    pub resources: Vec<Outgoing>,
    /// 4; also each resource's `Any.type_url`
    pub type_url: String,
    /// 5
    pub nonce: String,
    /// 6
    pub removed_resources: Vec<String>,
}

/// The length of a string or bytes field's value, with its tag and length, as prost writes it
/// (an empty proto3 value is not written).
fn delimited_len(tag: u32, len: usize) -> usize {
    if len == 0 { 0 } else { encoding::key_len(tag) + encoding::encoded_len_varint(len as u64) + len }
}

fn put_delimited(tag: u32, value: &[u8], buf: &mut impl BufMut) {
    if value.is_empty() {
        return;
    }
    encoding::encode_key(tag, WireType::LengthDelimited, buf);
    encoding::encode_varint(value.len() as u64, buf);
    buf.put_slice(value);
}

impl DeltaResponse {
    /// The encoded `Any` of a resource's body (its length without tag and length).
    fn any_len(&self, r: &Outgoing) -> usize {
        delimited_len(1, self.type_url.len()) + delimited_len(2, r.body.len())
    }

    /// The encoded `Resource` (its length without tag and length). The `Any` is always
    /// written, as prost writes a message field that is set, even when it is empty.
    fn resource_len(&self, r: &Outgoing) -> usize {
        let any = self.any_len(r);
        delimited_len(3, r.name.len())
            + delimited_len(1, r.version.len())
            + encoding::key_len(2)
            + encoding::encoded_len_varint(any as u64)
            + any
    }
}

impl Message for DeltaResponse {
    /// Fields in the order of their numbers, as prost writes Envoy's generated types.
    fn encode_raw(&self, buf: &mut impl BufMut) {
        put_delimited(1, self.system_version_info.as_bytes(), buf);
        for r in &self.resources {
            encoding::encode_key(2, WireType::LengthDelimited, buf);
            encoding::encode_varint(self.resource_len(r) as u64, buf);
            put_delimited(1, r.version.as_bytes(), buf);
            encoding::encode_key(2, WireType::LengthDelimited, buf);
            encoding::encode_varint(self.any_len(r) as u64, buf);
            put_delimited(1, self.type_url.as_bytes(), buf);
            put_delimited(2, &r.body, buf);
            put_delimited(3, r.name.as_bytes(), buf);
        }
        put_delimited(4, self.type_url.as_bytes(), buf);
        put_delimited(5, self.nonce.as_bytes(), buf);
        encoding::string::encode_repeated(6, &self.removed_resources, buf);
    }

    /// Never decoded: the control plane only sends it (its test reads it back with Envoy's
    /// own type), so every field is skipped.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        delimited_len(1, self.system_version_info.len())
            + self
                .resources
                .iter()
                .map(|r| {
                    let len = self.resource_len(r);
                    encoding::key_len(2) + encoding::encoded_len_varint(len as u64) + len
                })
                .sum::<usize>()
            + delimited_len(4, self.type_url.len())
            + delimited_len(5, self.nonce.len())
            + encoding::string::encoded_len_repeated(6, &self.removed_resources)
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

const SERVICE: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
const DELTA_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
const SOTW_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";

/// The ADS service of a [`ControlPlane`], for a tonic server.
#[derive(Clone)]
pub struct AdsService {
    cp: ControlPlane,
}

impl AdsService {
    pub(crate) fn new(cp: ControlPlane) -> Self {
        Self { cp }
    }
}

impl NamedService for AdsService {
    const NAME: &'static str = SERVICE;
}

/// One call of a method: the control plane answering one stream.
struct Call(ControlPlane);

impl StreamingService<DeltaDiscoveryRequest> for Call {
    type Response = DeltaResponse;
    type ResponseStream = crate::ResponseStream;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<DeltaDiscoveryRequest>>) -> Self::Future {
        let cp = self.0.clone();
        Box::pin(async move { cp.delta_stream(request) })
    }
}

impl StreamingService<DiscoveryRequest> for Call {
    type Response = kmesh_proto::discovery::DiscoveryResponse;
    type ResponseStream = crate::sotw::SotwStream;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<DiscoveryRequest>>) -> Self::Future {
        let cp = self.0.clone();
        Box::pin(async move { cp.sotw_stream(request) })
    }
}

impl<B> tonic::codegen::Service<http::Request<B>> for AdsService
where
    B: tonic::codegen::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let cp = self.cp.clone();
        // Requests are limited as istiod limits them; responses are not (a full push is as
        // large as the state).
        let limits = (Some(cp.max_request_bytes), Some(usize::MAX));
        match req.uri().path() {
            DELTA_PATH => Box::pin(async move {
                let codec = ProstCodec::<DeltaResponse, DeltaDiscoveryRequest>::default();
                let mut grpc = Grpc::new(codec).apply_max_message_size_config(limits.0, limits.1);
                Ok(grpc.streaming(Call(cp), req).await)
            }),
            SOTW_PATH => Box::pin(async move {
                let codec =
                    ProstCodec::<kmesh_proto::discovery::DiscoveryResponse, DiscoveryRequest>::default();
                let mut grpc = Grpc::new(codec).apply_max_message_size_config(limits.0, limits.1);
                Ok(grpc.streaming(Call(cp), req).await)
            }),
            path => {
                let status = Status::unimplemented(format!("{path} is not a method of {SERVICE}"));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmesh_proto::discovery::{DeltaDiscoveryResponse, Resource};

    fn ours() -> DeltaResponse {
        let r = |name: &str, version: &str, body: &[u8]| Outgoing {
            name: name.into(),
            version: version.into(),
            body: Bytes::copy_from_slice(body),
        };
        DeltaResponse {
            system_version_info: "v3".into(),
            // A body of 200 bytes: lengths of two varint bytes.
            resources: vec![r("a", "v1", b"xyz"), r("b", "v2", &[7; 200]), r("", "", b"")],
            type_url: kmesh_proto::ADDRESS_TYPE.into(),
            removed_resources: vec!["c".into(), "d".into()],
            nonce: "n9".into(),
        }
    }

    fn envoys(m: &DeltaResponse) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            system_version_info: m.system_version_info.clone(),
            resources: m
                .resources
                .iter()
                .map(|r| Resource {
                    name: r.name.to_string(),
                    version: r.version.to_string(),
                    resource: Some(kmesh_proto::Any { type_url: m.type_url.clone(), value: r.body.to_vec() }),
                    ..Default::default()
                })
                .collect(),
            type_url: m.type_url.clone(),
            removed_resources: m.removed_resources.clone(),
            nonce: m.nonce.clone(),
            ..Default::default()
        }
    }

    /// What a client reads is what Envoy's own types would have sent: the same bytes, in the
    /// same order, with the same length, and Envoy's type reads it back as it was made.
    #[test]
    fn a_response_is_encoded_byte_for_byte_as_envoys_type_encodes_it() {
        let m = ours();
        let want = envoys(&m).encode_to_vec();
        assert_eq!(m.encode_to_vec(), want);
        assert_eq!(m.encoded_len(), want.len());
        assert_eq!(DeltaDiscoveryResponse::decode(&m.encode_to_vec()[..]).unwrap(), envoys(&m));
        let empty = DeltaResponse::default();
        assert_eq!(empty.encode_to_vec(), envoys(&empty).encode_to_vec());
    }
}
