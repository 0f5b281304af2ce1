//! Protobuf types of the control-plane protocol.
//!
//! `istio::workload` and `istio::security` come from this crate's own `.proto` files (same
//! packages, message names and field numbers as Istio's); the delta ADS envelope and service
//! come from Envoy's API via `envoy-types`.

#[allow(clippy::all)]
pub mod istio {
    pub mod workload {
        include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));
    }
    pub mod security {
        include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));
    }
}

/// `Node`, sent in the first request of a stream.
pub use envoy_types::pb::envoy::config::core::v3 as core;
/// Envoy's discovery service: `DeltaDiscoveryRequest`, `DeltaDiscoveryResponse`, `Resource`,
/// and the `AggregatedDiscoveryService` client and server.
pub use envoy_types::pb::envoy::service::discovery::v3 as discovery;
/// `google.rpc.Status`, carried by a NACK.
pub use envoy_types::pb::google::rpc;

/// Type URL of workload and service resources.
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of authorization policy resources.
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";
/// `google.protobuf.Struct` as Envoy's `Node.metadata` uses it.
pub use envoy_types::pb::google::protobuf as envoy_struct;
/// The `google.protobuf.Any` that Envoy's `Resource` carries.
pub use envoy_types::pb::google::protobuf::Any;
