//! The Kubernetes source: which pods on this node belong in the mesh ([`rules`]), where a
//! running pod's network namespace is ([`procfs`]), and a watch of this node, the namespaces
//! and this node's pods against the API server ([`watch`]). The daemon turns the view into
//! enrollments; nothing here touches the data plane.

pub mod procfs;
pub mod rules;
pub mod watch;

pub use rules::{Decision, Reason};
pub use watch::{ClusterWatch, K8sError, NodeView, PodView};
