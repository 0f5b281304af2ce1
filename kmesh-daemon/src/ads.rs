//! One ADS call (delta or state of the world) over a tonic channel, with a receive buffer that
//! follows the message in hand.
//!
//! tonic's generated client reads responses through `tonic::Streaming`, whose buffer grows to
//! the largest message the stream has carried and keeps that size for the stream's life: after
//! the first full push of 10k services x 10 endpoints (a 26 MB response) the daemon held those
//! 26 MB until the next reconnection, a seventh of its heap. Here the gRPC framing (gRPC over
//! HTTP/2: length-prefixed messages, status in the trailers) is read directly from the HTTP/2 body, and
//! once a large message is decoded its buffer goes back to the allocator as soon as what was
//! decoded from it is dropped (bodies decoded as `Bytes` are slices of it). Requests, headers,
//! the bearer token, TLS and HTTP/2 are tonic's and hyper's as before.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;
use http_body_util::BodyExt;
use kmesh_proto::discovery::{DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse};
use prost::Message;
use tokio::sync::mpsc;
use tonic::client::GrpcService;
use tonic::transport::Channel;
use tonic::{Code, Status};

const DELTA_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
const SOTW_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";

/// A gRPC message's prefix: a compression flag and a big-endian length.
const PREFIX: usize = 5;

/// A buffer larger than this is given back once the message it held is decoded.
const KEEP: usize = 64 * 1024;

/// A channel to the control plane with what every call on it sends.
pub struct Ads {
    channel: Channel,
    /// `authorization: Bearer ...`, read when the channel was made.
    token: Option<http::HeaderValue>,
    /// The largest response taken (`--xds-max-message-bytes`).
    max_message: usize,
}

impl Ads {
    pub fn new(channel: Channel, token: Option<http::HeaderValue>, max_message: usize) -> Self {
        Self { channel, token, max_message }
    }

    /// Opens a delta ADS stream sending what `requests` yields, its responses read as `Resp`
    /// (Envoy's `DeltaDiscoveryResponse`, or `kmesh_proto::lean`'s).
    pub async fn delta<Resp: Message + Default>(
        &mut self,
        requests: mpsc::Receiver<DeltaDiscoveryRequest>,
    ) -> Result<Inbound<Resp>, Status> {
        self.call(DELTA_PATH, requests).await
    }

    /// Opens a state-of-the-world ADS stream sending what `requests` yields.
    pub async fn sotw(
        &mut self,
        requests: mpsc::Receiver<DiscoveryRequest>,
    ) -> Result<Inbound<DiscoveryResponse>, Status> {
        self.call(SOTW_PATH, requests).await
    }

    async fn call<Req, Resp>(
        &mut self,
        path: &'static str,
        requests: mpsc::Receiver<Req>,
    ) -> Result<Inbound<Resp>, Status>
    where
        Req: Message + Send + 'static,
        Resp: Message + Default,
    {
        let mut req = http::Request::new(tonic::body::Body::new(Outbound { requests }));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = http::Uri::from_static(path);
        let h = req.headers_mut();
        h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
        h.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        if let Some(t) = &self.token {
            h.insert(http::header::AUTHORIZATION, t.clone());
        }
        std::future::poll_fn(|cx| GrpcService::poll_ready(&mut self.channel, cx))
            .await
            .map_err(|e| Status::from_error(e.into()))?;
        let resp =
            GrpcService::call(&mut self.channel, req).await.map_err(|e| Status::from_error(e.into()))?;
        // A refusal comes as headers only ("trailers-only"), whatever the HTTP status.
        if let Some(status) = Status::from_header_map(resp.headers())
            && status.code() != Code::Ok
        {
            return Err(status);
        }
        if resp.status() != http::StatusCode::OK {
            return Err(Status::unknown(format!("the control plane answered HTTP {}", resp.status())));
        }
        Ok(Inbound {
            body: resp.into_body(),
            buf: BytesMut::new(),
            max_message: self.max_message,
            ended: None,
            receiving: None,
            _msg: std::marker::PhantomData,
        })
    }
}

/// Requests as gRPC frames, as they are sent; the call's request side ends when the sender is
/// dropped.
struct Outbound<Req> {
    requests: mpsc::Receiver<Req>,
}

impl<Req: Message> http_body::Body for Outbound<Req> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.requests.poll_recv(cx).map(|r| r.map(|m| Ok(Frame::data(frame(&m)))))
    }
}

/// One message with its prefix (uncompressed).
fn frame(m: &impl Message) -> Bytes {
    let len = m.encoded_len();
    let mut b = BytesMut::with_capacity(PREFIX + len);
    b.put_u8(0);
    b.put_u32(len as u32);
    m.encode(&mut b).expect("the buffer was sized for the message");
    b.freeze()
}

/// The responses of one call.
pub struct Inbound<Resp> {
    body: tonic::body::Body,
    buf: BytesMut,
    max_message: usize,
    /// How the call ended, once its trailers (or an error) came.
    ended: Option<Status>,
    /// When the first bytes of a large message came (for the debug log of its receipt).
    receiving: Option<std::time::Instant>,
    _msg: std::marker::PhantomData<fn() -> Resp>,
}

impl<Resp: Message + Default> Inbound<Resp> {
    /// The next response; `None` when the control plane ended the call with an OK status.
    /// Cancel-safe: what has arrived stays in the buffer when the future is dropped.
    pub async fn message(&mut self) -> Result<Option<Resp>, Status> {
        loop {
            if let Some(m) = self.decode()? {
                return Ok(Some(m));
            }
            if let Some(status) = &self.ended {
                return match status.code() {
                    Code::Ok if self.buf.is_empty() => Ok(None),
                    Code::Ok => Err(Status::internal(format!(
                        "the call ended inside a message ({} bytes of it received)",
                        self.buf.len()
                    ))),
                    _ => Err(status.clone()),
                };
            }
            match self.body.frame().await {
                None => {
                    self.ended = Some(Status::internal("the control plane ended the call without a status"))
                }
                Some(Err(status)) => self.ended = Some(status),
                Some(Ok(f)) => match f.into_data() {
                    Ok(data) => self.buf.extend_from_slice(&data),
                    Err(f) => {
                        let trailers = f.into_trailers().unwrap_or_default();
                        self.ended = Some(Status::from_header_map(&trailers).unwrap_or_else(|| {
                            Status::internal("the control plane ended the call without a grpc-status")
                        }));
                    }
                },
            }
        }
    }

    /// A whole message from the buffer, if one has arrived.
    fn decode(&mut self) -> Result<Option<Resp>, Status> {
        if self.buf.len() < PREFIX {
            return Ok(None);
        }
        if self.buf[0] != 0 {
            return Err(Status::internal(
                "the control plane sent a compressed message without being offered compression",
            ));
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.max_message {
            return Err(Status::resource_exhausted(format!(
                "a response of {len} bytes is too large: --xds-max-message-bytes is {}",
                self.max_message
            )));
        }
        if self.buf.len() < PREFIX + len {
            // Room for the whole message at once, not by doubling.
            self.buf.reserve(PREFIX + len - self.buf.len());
            if len > KEEP && self.receiving.is_none() {
                self.receiving = Some(std::time::Instant::now());
            }
            return Ok(None);
        }
        let decoding = std::time::Instant::now();
        // Decoded from shared bytes, `Bytes` fields (resource bodies, see
        // `kmesh_proto::lean`) are slices of the message, not copies.
        let message = self.buf.split_to(PREFIX + len).freeze().slice(PREFIX..);
        let m = Resp::decode(message)
            .map_err(|e| Status::internal(format!("a response does not decode: {e}")))?;
        if let Some(since) = self.receiving.take() {
            tracing::debug!(
                bytes = len,
                receive_us = (decoding - since).as_micros() as u64,
                envelope_decode_us = decoding.elapsed().as_micros() as u64,
                "large response received"
            );
        }
        if PREFIX + len > KEEP {
            // What follows the message shares its allocation: copied out, the large buffer
            // goes back to the allocator once the message's bodies are dropped.
            let rest = std::mem::take(&mut self.buf);
            self.buf = BytesMut::from(&rest[..]);
        }
        Ok(Some(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmesh_proto::discovery::{DeltaDiscoveryResponse, Resource};

    /// Responses as a control plane sends them: the given data frames, then trailers.
    fn inbound(data: Vec<Bytes>, status: Code, max_message: usize) -> Inbound<DeltaDiscoveryResponse> {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", (status as i32).to_string().parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, Status>> =
            data.into_iter().map(|d| Ok(Frame::data(d))).chain([Ok(Frame::trailers(trailers))]).collect();
        let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
        Inbound {
            body: tonic::body::Body::new(body),
            buf: BytesMut::new(),
            max_message,
            ended: None,
            receiving: None,
            _msg: std::marker::PhantomData,
        }
    }

    fn response(nonce: &str, resources: usize) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            nonce: nonce.into(),
            resources: (0..resources)
                .map(|i| Resource {
                    name: format!("resource-{i:08}"),
                    version: "v1".into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    #[test]
    fn messages_across_frames_are_read_in_order_and_a_large_ones_buffer_is_given_back() {
        let big = response("big", 60_000);
        let small = response("small", 1);
        let mut wire = BytesMut::new();
        wire.extend_from_slice(&frame(&big));
        wire.extend_from_slice(&frame(&small));
        assert!(wire.len() > 16 * KEEP, "{}", wire.len());
        // Cut anywhere: 16 KiB data frames, the small message's start in the big one's last frame.
        let frames: Vec<Bytes> = wire.freeze().chunks(16 * 1024).map(Bytes::copy_from_slice).collect();
        let mut s = inbound(frames, Code::Ok, 64 << 20);
        block_on(async {
            assert_eq!(s.message().await.unwrap(), Some(big));
            assert!(s.buf.capacity() <= KEEP, "the large buffer is kept: {} bytes", s.buf.capacity());
            assert_eq!(s.message().await.unwrap(), Some(small));
            assert_eq!(s.message().await.unwrap(), None, "the call ended with an OK status");
        });
    }

    #[test]
    fn an_error_status_a_cut_message_and_an_oversized_one_are_errors_that_say_so() {
        let one = frame(&response("one", 1));
        let mut s = inbound(vec![one.clone()], Code::Unavailable, 64 << 20);
        block_on(async {
            assert!(s.message().await.unwrap().is_some());
            assert_eq!(s.message().await.unwrap_err().code(), Code::Unavailable);
        });
        let mut s = inbound(vec![one.slice(..one.len() - 1)], Code::Ok, 64 << 20);
        let e = block_on(s.message()).unwrap_err();
        assert!(e.message().contains("inside a message"), "{e}");
        let mut s = inbound(vec![frame(&response("big", 100))], Code::Ok, 64);
        let e = block_on(s.message()).unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert!(e.message().contains("too large") && e.message().contains("--xds-max-message-bytes"), "{e}");
    }
}
