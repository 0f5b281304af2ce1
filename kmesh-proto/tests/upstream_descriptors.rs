//! The wire contract of the project's `istio.workload` and `istio.security` protos, compared
//! with upstream's: every message field (number, label, type), every enum value and every
//! reserved number of Istio's workload API as upstream defines it (istio/ztunnel `proto/`,
//! August 2026), written down here from upstream's `.proto` files. A renumbered, retyped,
//! missing or extra field fails this test; update the list only from upstream's definitions,
//! never from ours.

const UPSTREAM: &str = r#"
field istio.security.Address.address = 1 Optional Bytes
field istio.security.Address.length = 2 Optional Uint32
field istio.security.Authorization.action = 4 Optional Enum .istio.security.Action
field istio.security.Authorization.dry_run = 6 Optional Bool
field istio.security.Authorization.extensions = 7 Repeated Message .istio.workload.Extension
field istio.security.Authorization.name = 1 Optional String
field istio.security.Authorization.namespace = 2 Optional String
field istio.security.Authorization.rules = 5 Repeated Message .istio.security.Rule
field istio.security.Authorization.scope = 3 Optional Enum .istio.security.Scope
field istio.security.Clause.matches = 2 Repeated Message .istio.security.Match
field istio.security.Match.destination_ips = 7 Repeated Message .istio.security.Address
field istio.security.Match.destination_ports = 9 Repeated Uint32
field istio.security.Match.extensions = 13 Repeated Message .istio.workload.Extension
field istio.security.Match.namespaces = 1 Repeated Message .istio.security.StringMatch
field istio.security.Match.not_destination_ips = 8 Repeated Message .istio.security.Address
field istio.security.Match.not_destination_ports = 10 Repeated Uint32
field istio.security.Match.not_namespaces = 2 Repeated Message .istio.security.StringMatch
field istio.security.Match.not_principals = 4 Repeated Message .istio.security.StringMatch
field istio.security.Match.not_service_accounts = 12 Repeated Message .istio.security.ServiceAccountMatch
field istio.security.Match.not_source_ips = 6 Repeated Message .istio.security.Address
field istio.security.Match.principals = 3 Repeated Message .istio.security.StringMatch
field istio.security.Match.service_accounts = 11 Repeated Message .istio.security.ServiceAccountMatch
field istio.security.Match.source_ips = 5 Repeated Message .istio.security.Address
field istio.security.Rule.clauses = 1 Repeated Message .istio.security.Clause
field istio.security.ServiceAccountMatch.namespace = 1 Optional String
field istio.security.ServiceAccountMatch.serviceAccount = 2 Optional String
field istio.security.StringMatch.exact = 1 Optional String oneof match_type
field istio.security.StringMatch.prefix = 2 Optional String oneof match_type
field istio.security.StringMatch.presence = 4 Optional Message .google.protobuf.Empty oneof match_type
field istio.security.StringMatch.suffix = 3 Optional String oneof match_type
field istio.workload.Address.service = 2 Optional Message .istio.workload.Service oneof type
field istio.workload.Address.workload = 1 Optional Message .istio.workload.Workload oneof type
field istio.workload.ApplicationTunnel.port = 2 Optional Uint32
field istio.workload.ApplicationTunnel.protocol = 1 Optional Enum .istio.workload.ApplicationTunnel.Protocol
field istio.workload.Extension.config = 2 Optional Message .google.protobuf.Any
field istio.workload.Extension.name = 1 Optional String
field istio.workload.GatewayAddress.address = 2 Optional Message .istio.workload.NetworkAddress oneof destination
field istio.workload.GatewayAddress.hbone_mtls_port = 3 Optional Uint32
field istio.workload.GatewayAddress.hostname = 1 Optional Message .istio.workload.NamespacedHostname oneof destination
field istio.workload.LoadBalancing.health_policy = 3 Optional Enum .istio.workload.LoadBalancing.HealthPolicy
field istio.workload.LoadBalancing.mode = 2 Optional Enum .istio.workload.LoadBalancing.Mode
field istio.workload.LoadBalancing.routing_preference = 1 Repeated Enum .istio.workload.LoadBalancing.Scope
field istio.workload.Locality.region = 1 Optional String
field istio.workload.Locality.subzone = 3 Optional String
field istio.workload.Locality.zone = 2 Optional String
field istio.workload.NamespacedHostname.hostname = 2 Optional String
field istio.workload.NamespacedHostname.namespace = 1 Optional String
field istio.workload.NetworkAddress.address = 2 Optional Bytes
field istio.workload.NetworkAddress.length = 3 optional Uint32
field istio.workload.NetworkAddress.network = 1 Optional String
field istio.workload.Port.app_protocol = 3 Optional Enum .istio.workload.AppProtocol
field istio.workload.Port.service_port = 1 Optional Uint32
field istio.workload.Port.target_port = 2 Optional Uint32
field istio.workload.PortList.ports = 1 Repeated Message .istio.workload.Port
field istio.workload.Service.addresses = 4 Repeated Message .istio.workload.NetworkAddress
field istio.workload.Service.canonical = 11 Optional Bool
field istio.workload.Service.extensions = 10 Repeated Message .istio.workload.Extension
field istio.workload.Service.hostname = 3 Optional String
field istio.workload.Service.ingress_use_waypoint = 12 Optional Bool
field istio.workload.Service.ip_families = 9 Optional Enum .istio.workload.IPFamilies
field istio.workload.Service.load_balancing = 8 Optional Message .istio.workload.LoadBalancing
field istio.workload.Service.name = 1 Optional String
field istio.workload.Service.namespace = 2 Optional String
field istio.workload.Service.ports = 5 Repeated Message .istio.workload.Port
field istio.workload.Service.subject_alt_names = 6 Repeated String
field istio.workload.Service.visibility = 14 Optional Enum .istio.workload.Service.Visibility
field istio.workload.Service.waypoint = 7 Optional Message .istio.workload.GatewayAddress
field istio.workload.Service.weighted_waypoints = 13 Repeated Message .istio.workload.WeightedWaypoint
field istio.workload.WeightedWaypoint.destination = 1 Optional Message .istio.workload.GatewayAddress
field istio.workload.WeightedWaypoint.weight = 2 Optional Uint32
field istio.workload.Workload.ServicesEntry.key = 1 Optional String
field istio.workload.Workload.ServicesEntry.value = 2 Optional Message .istio.workload.PortList
field istio.workload.Workload.addresses = 3 Repeated Bytes
field istio.workload.Workload.application_tunnel = 23 Optional Message .istio.workload.ApplicationTunnel
field istio.workload.Workload.authorization_policies = 16 Repeated String
field istio.workload.Workload.canonical_name = 10 Optional String
field istio.workload.Workload.canonical_revision = 11 Optional String
field istio.workload.Workload.capacity = 27 Optional Message .google.protobuf.UInt32Value
field istio.workload.Workload.cluster_id = 18 Optional String
field istio.workload.Workload.extensions = 26 Repeated Message .istio.workload.Extension
field istio.workload.Workload.hostname = 21 Optional String
field istio.workload.Workload.locality = 24 Optional Message .istio.workload.Locality
field istio.workload.Workload.name = 1 Optional String
field istio.workload.Workload.namespace = 2 Optional String
field istio.workload.Workload.native_tunnel = 14 Optional Bool
field istio.workload.Workload.network = 4 Optional String
field istio.workload.Workload.network_gateway = 19 Optional Message .istio.workload.GatewayAddress
field istio.workload.Workload.network_mode = 25 Optional Enum .istio.workload.NetworkMode
field istio.workload.Workload.node = 9 Optional String
field istio.workload.Workload.service_account = 7 Optional String
field istio.workload.Workload.services = 22 Repeated Message .istio.workload.Workload.ServicesEntry
field istio.workload.Workload.status = 17 Optional Enum .istio.workload.WorkloadStatus
field istio.workload.Workload.trust_domain = 6 Optional String
field istio.workload.Workload.tunnel_protocol = 5 Optional Enum .istio.workload.TunnelProtocol
field istio.workload.Workload.uid = 20 Optional String
field istio.workload.Workload.waypoint = 8 Optional Message .istio.workload.GatewayAddress
field istio.workload.Workload.workload_name = 13 Optional String
field istio.workload.Workload.workload_type = 12 Optional Enum .istio.workload.WorkloadType
reserved istio.workload.GatewayAddress "hbone_single_tls_port"
reserved istio.workload.GatewayAddress 4..5
reserved istio.workload.Workload 15..16
value istio.security.Action.ALLOW = 0
value istio.security.Action.DENY = 1
value istio.security.Scope.GLOBAL = 0
value istio.security.Scope.NAMESPACE = 1
value istio.security.Scope.WORKLOAD_SELECTOR = 2
value istio.workload.AppProtocol.GRPC = 3
value istio.workload.AppProtocol.HTTP11 = 1
value istio.workload.AppProtocol.HTTP2 = 2
value istio.workload.AppProtocol.TCP = 4
value istio.workload.AppProtocol.TLS = 5
value istio.workload.AppProtocol.UNKNOWN = 0
value istio.workload.ApplicationTunnel.Protocol.NONE = 0
value istio.workload.ApplicationTunnel.Protocol.PROXY = 1
value istio.workload.IPFamilies.AUTOMATIC = 0
value istio.workload.IPFamilies.DUAL = 3
value istio.workload.IPFamilies.IPV4_ONLY = 1
value istio.workload.IPFamilies.IPV6_ONLY = 2
value istio.workload.LoadBalancing.HealthPolicy.ALLOW_ALL = 1
value istio.workload.LoadBalancing.HealthPolicy.ONLY_HEALTHY = 0
value istio.workload.LoadBalancing.Mode.FAILOVER = 2
value istio.workload.LoadBalancing.Mode.PASSTHROUGH = 3
value istio.workload.LoadBalancing.Mode.STRICT = 1
value istio.workload.LoadBalancing.Mode.UNSPECIFIED_MODE = 0
value istio.workload.LoadBalancing.Scope.CLUSTER = 5
value istio.workload.LoadBalancing.Scope.NETWORK = 6
value istio.workload.LoadBalancing.Scope.NODE = 4
value istio.workload.LoadBalancing.Scope.REGION = 1
value istio.workload.LoadBalancing.Scope.SUBZONE = 3
value istio.workload.LoadBalancing.Scope.UNSPECIFIED_SCOPE = 0
value istio.workload.LoadBalancing.Scope.ZONE = 2
value istio.workload.NetworkMode.HOST_NETWORK = 1
value istio.workload.NetworkMode.STANDARD = 0
value istio.workload.Service.Visibility.NAMESPACE = 1
value istio.workload.Service.Visibility.PUBLIC = 0
value istio.workload.TunnelProtocol.HBONE = 1
value istio.workload.TunnelProtocol.LEGACY_ISTIO_MTLS = 2
value istio.workload.TunnelProtocol.NONE = 0
value istio.workload.WorkloadStatus.HEALTHY = 0
value istio.workload.WorkloadStatus.UNHEALTHY = 1
value istio.workload.WorkloadType.CRONJOB = 1
value istio.workload.WorkloadType.DEPLOYMENT = 0
value istio.workload.WorkloadType.JOB = 3
value istio.workload.WorkloadType.POD = 2
"#;

#[test]
fn the_protos_match_upstream_field_for_field() {
    let expected: Vec<&str> = UPSTREAM.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let ours = kmesh_proto::wire_contract(&["istio.workload", "istio.security"]);
    let missing: Vec<&&str> = expected.iter().filter(|l| !ours.iter().any(|o| o == **l)).collect();
    let extra: Vec<&String> = ours.iter().filter(|o| !expected.contains(&o.as_str())).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "the protos differ from upstream's\n  missing or different here: {missing:#?}\n  not upstream: {extra:#?}"
    );
}

#[test]
fn the_contract_sees_a_renumbering() {
    // The comparison itself must be able to fail: a set where Workload.capacity is 25 (the
    // mistake this test exists for) differs from the list above.
    use prost::Message;
    let mut set = prost_types::FileDescriptorSet::decode(kmesh_proto::DESCRIPTOR_SET).unwrap();
    let file = set.file.iter_mut().find(|f| f.package() == "istio.workload").unwrap();
    let w = file.message_type.iter_mut().find(|m| m.name() == "Workload").unwrap();
    let cap = w.field.iter_mut().find(|f| f.name() == "capacity").unwrap();
    cap.number = Some(25);
    let changed = kmesh_proto::wire_contract_of(&set.encode_to_vec(), &["istio.workload"]).unwrap();
    assert!(changed.iter().any(|l| l.starts_with("field istio.workload.Workload.capacity = 25 ")));
    assert!(!UPSTREAM.contains("field istio.workload.Workload.capacity = 25 "));
    assert!(UPSTREAM.contains(
        "field istio.workload.Workload.capacity = 27 Optional Message .google.protobuf.UInt32Value"
    ));
}
