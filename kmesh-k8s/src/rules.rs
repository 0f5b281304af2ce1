//! Which pods are in the mesh: a pure decision from the pod and its namespace's labels.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

/// The label that puts a pod or a namespace in the mesh (`kmesh`, compared without case) or
/// takes a pod out of it (`none`).
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
pub const MODE_KMESH: &str = "kmesh";
pub const MODE_NONE: &str = "none";
/// The annotation a pod in the mesh carries (Kmesh's).
pub const REDIRECTION: &str = "kmesh.net/redirection";
pub const REDIRECTION_ENABLED: &str = "enabled";
/// Present on pods that Istio injected a sidecar into.
pub const SIDECAR_STATUS: &str = "sidecar.istio.io/status";
pub const SIDECAR_CONTAINER: &str = "istio-proxy";
/// Gateways and waypoints that Istio deploys carry this label (value: the controller).
pub const GATEWAY_MANAGED: &str = "gateway.istio.io/managed";

/// The decision for one pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Enroll,
    Skip(Reason),
}

/// Why a pod is not in the mesh (shown in the daemon's dump and logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Neither the pod nor its namespace asks for the mesh.
    NotLabelled,
    /// `istio.io/dataplane-mode=none` on the pod.
    OptedOut,
    /// The pod asks for another data plane (`istio.io/dataplane-mode=ambient`, ...).
    OtherDataplane,
    HostNetwork,
    Sidecar,
    IstioGateway,
    Terminating,
    Finished,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reason::NotLabelled => "not_labelled",
            Reason::OptedOut => "opted_out",
            Reason::OtherDataplane => "other_dataplane",
            Reason::HostNetwork => "host_network",
            Reason::Sidecar => "sidecar",
            Reason::IstioGateway => "istio_gateway",
            Reason::Terminating => "terminating",
            Reason::Finished => "finished",
        })
    }
}

fn label<'a>(labels: Option<&'a BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    labels.and_then(|l| l.get(key)).map(|s| s.as_str())
}

/// Whether `pod` belongs in the mesh, given its namespace's labels (`None` when the namespace
/// is not known yet: only the pod's own label counts then).
///
/// Order: what can never be enrolled first (host network, a sidecar, an Istio gateway or
/// waypoint, a pod that is going away), then the pod's own label (`none` opts out, `kmesh`
/// opts in, another mode means another data plane owns it), then its namespace's label.
pub fn decide(pod: &Pod, namespace_labels: Option<&BTreeMap<String, String>>) -> Decision {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return Decision::Skip(Reason::HostNetwork);
    }
    if meta.annotations.as_ref().is_some_and(|a| a.contains_key(SIDECAR_STATUS))
        || spec.is_some_and(|s| {
            s.containers.iter().any(|c| c.name == SIDECAR_CONTAINER)
                || s.init_containers.iter().flatten().any(|c| c.name == SIDECAR_CONTAINER)
        })
    {
        return Decision::Skip(Reason::Sidecar);
    }
    if label(meta.labels.as_ref(), GATEWAY_MANAGED).is_some() {
        return Decision::Skip(Reason::IstioGateway);
    }
    if meta.deletion_timestamp.is_some() {
        return Decision::Skip(Reason::Terminating);
    }
    if matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")) {
        return Decision::Skip(Reason::Finished);
    }
    match label(meta.labels.as_ref(), DATAPLANE_MODE) {
        Some(v) if v.eq_ignore_ascii_case(MODE_NONE) => return Decision::Skip(Reason::OptedOut),
        Some(v) if v.eq_ignore_ascii_case(MODE_KMESH) => return Decision::Enroll,
        Some(_) => return Decision::Skip(Reason::OtherDataplane),
        None => {}
    }
    match label(namespace_labels, DATAPLANE_MODE) {
        Some(v) if v.eq_ignore_ascii_case(MODE_KMESH) => Decision::Enroll,
        _ => Decision::Skip(Reason::NotLabelled),
    }
}

/// Istio's workload uid for a pod (`<cluster>//Pod/<namespace>/<name>`): the key under which
/// the workload API (and the local YAML) describe it.
pub fn workload_uid(cluster_id: &str, namespace: &str, name: &str) -> String {
    format!("{cluster_id}//Pod/{namespace}/{name}")
}

/// The pod's namespace and name in a workload uid made by [`workload_uid`] for `cluster_id`.
pub fn pod_of_workload_uid<'a>(cluster_id: &str, uid: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = uid.strip_prefix(cluster_id)?.strip_prefix("//Pod/")?;
    let (ns, name) = rest.split_once('/')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains('/')).then_some((ns, name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn pod(labels: &[(&str, &str)]) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some("p".into());
        p.metadata.labels = Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        p.spec = Some(PodSpec {
            containers: vec![Container { name: "app".into(), ..Default::default() }],
            ..Default::default()
        });
        p
    }

    fn ns(v: Option<&str>) -> BTreeMap<String, String> {
        v.map(|v| (DATAPLANE_MODE.to_string(), v.to_string())).into_iter().collect()
    }

    #[test]
    fn a_pod_joins_by_its_own_label_or_its_namespace_and_none_opts_out() {
        assert_eq!(decide(&pod(&[]), Some(&ns(Some("kmesh")))), Decision::Enroll);
        assert_eq!(decide(&pod(&[]), Some(&ns(Some("Kmesh")))), Decision::Enroll, "compared without case");
        assert_eq!(decide(&pod(&[]), Some(&ns(None))), Decision::Skip(Reason::NotLabelled));
        assert_eq!(decide(&pod(&[]), None), Decision::Skip(Reason::NotLabelled));
        assert_eq!(decide(&pod(&[(DATAPLANE_MODE, "KMESH")]), Some(&ns(None))), Decision::Enroll);
        assert_eq!(decide(&pod(&[(DATAPLANE_MODE, "kmesh")]), None), Decision::Enroll);
        assert_eq!(
            decide(&pod(&[(DATAPLANE_MODE, "none")]), Some(&ns(Some("kmesh")))),
            Decision::Skip(Reason::OptedOut)
        );
        assert_eq!(
            decide(&pod(&[(DATAPLANE_MODE, "ambient")]), Some(&ns(Some("kmesh")))),
            Decision::Skip(Reason::OtherDataplane)
        );
        assert_eq!(decide(&pod(&[]), Some(&ns(Some("ambient")))), Decision::Skip(Reason::NotLabelled));
    }

    #[test]
    fn host_network_sidecars_gateways_and_dying_pods_are_never_enrolled() {
        let yes = ns(Some("kmesh"));
        let mut p = pod(&[(DATAPLANE_MODE, "kmesh")]);
        p.spec.as_mut().unwrap().host_network = Some(true);
        assert_eq!(decide(&p, Some(&yes)), Decision::Skip(Reason::HostNetwork));

        let mut p = pod(&[]);
        p.metadata.annotations = Some([(SIDECAR_STATUS.to_string(), "{}".to_string())].into());
        assert_eq!(decide(&p, Some(&yes)), Decision::Skip(Reason::Sidecar));
        let mut p = pod(&[]);
        p.spec.as_mut().unwrap().init_containers =
            Some(vec![Container { name: SIDECAR_CONTAINER.into(), ..Default::default() }]);
        assert_eq!(decide(&p, Some(&yes)), Decision::Skip(Reason::Sidecar), "native sidecar");
        let mut p = pod(&[]);
        p.spec
            .as_mut()
            .unwrap()
            .containers
            .push(Container { name: SIDECAR_CONTAINER.into(), ..Default::default() });
        assert_eq!(decide(&p, Some(&yes)), Decision::Skip(Reason::Sidecar));

        let p = pod(&[(GATEWAY_MANAGED, "istio.io-mesh-controller")]);
        assert_eq!(decide(&p, Some(&yes)), Decision::Skip(Reason::IstioGateway));

        let mut p = pod(&[]);
        p.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert_eq!(decide(&p, Some(&yes)), Decision::Skip(Reason::Terminating));
        let mut p = pod(&[]);
        p.status = Some(PodStatus { phase: Some("Succeeded".into()), ..Default::default() });
        assert_eq!(decide(&p, Some(&yes)), Decision::Skip(Reason::Finished));
        let mut p = pod(&[]);
        p.status = Some(PodStatus { phase: Some("Running".into()), ..Default::default() });
        assert_eq!(decide(&p, Some(&yes)), Decision::Enroll);
    }

    #[test]
    fn workload_uids_are_istios_and_read_back() {
        let u = workload_uid("Kubernetes", "default", "echo-0");
        assert_eq!(u, "Kubernetes//Pod/default/echo-0");
        assert_eq!(pod_of_workload_uid("Kubernetes", &u), Some(("default", "echo-0")));
        assert_eq!(pod_of_workload_uid("other", &u), None);
        assert_eq!(pod_of_workload_uid("Kubernetes", "Kubernetes//Pod/default"), None);
        assert_eq!(pod_of_workload_uid("Kubernetes", "echo"), None);
    }
}
