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

pub use envoy_types::pb::envoy::config::core::v3 as core;
/// Envoy's discovery service: `DeltaDiscoveryRequest`, `DeltaDiscoveryResponse`, `Resource`,
/// and the `AggregatedDiscoveryService` client and server.
pub use envoy_types::pb::envoy::service::discovery::v3 as discovery;
/// The delta response as the workload source decodes it: bodies sliced out of the received
/// buffer (see the module).
pub mod lean;
/// `google.rpc.Status`, carried by a NACK.
pub use envoy_types::pb::google::rpc;
/// `Node`, sent in the first request of a stream.
/// The protobuf runtime the generated types implement (`Message::encoded_len`, `decode`).
pub use prost;

/// Type URL of workload and service resources.
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of authorization policy resources.
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";
/// `google.protobuf.Struct` as Envoy's `Node.metadata` uses it.
pub use envoy_types::pb::google::protobuf as envoy_struct;
/// The `google.protobuf.Any` that Envoy's `Resource` carries.
pub use envoy_types::pb::google::protobuf::Any;

/// The compiled `FileDescriptorSet` of this crate's protos (encoded), for checks against
/// upstream's definitions.
pub const DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

/// One line per message field and enum value of the given packages, sorted: the wire contract
/// in a form a test can compare with upstream's. Fields read
/// `field <message>.<name> = <number> <label> <type>[ <type name>][ oneof <name>]`,
/// enum values `value <enum>.<name> = <number>`.
pub fn wire_contract(packages: &[&str]) -> Vec<String> {
    wire_contract_of(DESCRIPTOR_SET, packages).expect("the build script wrote a valid set")
}

/// [`wire_contract`] of any encoded `FileDescriptorSet`.
pub fn wire_contract_of(descriptor_set: &[u8], packages: &[&str]) -> Result<Vec<String>, prost::DecodeError> {
    use prost::Message;
    use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};
    fn enums(out: &mut Vec<String>, scope: &str, es: &[EnumDescriptorProto]) {
        for e in es {
            for v in &e.value {
                out.push(format!("value {scope}.{}.{} = {}", e.name(), v.name(), v.number()));
            }
        }
    }
    fn messages(out: &mut Vec<String>, scope: &str, ms: &[DescriptorProto]) {
        for m in ms {
            let full = format!("{scope}.{}", m.name());
            for f in &m.field {
                let label =
                    if f.proto3_optional() { "optional".to_string() } else { format!("{:?}", f.label()) };
                let mut line = format!("field {full}.{} = {} {label} {:?}", f.name(), f.number(), f.r#type());
                if !f.type_name().is_empty() {
                    line.push(' ');
                    line.push_str(f.type_name());
                }
                if let Some(i) = f.oneof_index
                    && !f.proto3_optional()
                {
                    line.push_str(&format!(" oneof {}", m.oneof_decl[i as usize].name()));
                }
                out.push(line);
            }
            for r in &m.reserved_range {
                out.push(format!("reserved {full} {}..{}", r.start(), r.end()));
            }
            for n in &m.reserved_name {
                out.push(format!("reserved {full} {n:?}"));
            }
            enums(out, &full, &m.enum_type);
            messages(out, &full, &m.nested_type);
        }
    }
    let set = FileDescriptorSet::decode(descriptor_set)?;
    let mut out = Vec::new();
    for file in set.file.iter().filter(|f| packages.contains(&f.package())) {
        enums(&mut out, file.package(), &file.enum_type);
        messages(&mut out, file.package(), &file.message_type);
    }
    out.sort();
    Ok(out)
}

/// Envoy's own resources, for the kernel-native mode (Envoy xDS: LDS, RDS, CDS, EDS), as
/// `envoy-types` generates them from Envoy's protos.
pub mod envoy {
    pub use envoy_types::pb::envoy::config::cluster::v3 as cluster;
    pub use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
    pub use envoy_types::pb::envoy::config::listener::v3 as listener;
    pub use envoy_types::pb::envoy::config::route::v3 as route;
    pub use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
    pub use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_proxy;
    pub use envoy_types::pb::envoy::r#type::v3 as types;

    /// `Listener` (LDS).
    pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    /// `RouteConfiguration` (RDS).
    pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    /// `Cluster` (CDS).
    pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    /// `ClusterLoadAssignment` (EDS).
    pub const ENDPOINT_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    /// The network filters the kernel-native mode reads.
    pub const TCP_PROXY_TYPE: &str =
        "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
    pub const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
}
