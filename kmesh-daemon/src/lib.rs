//! kmesh-daemon: the node agent of the mesh.
//!
//! Data flows one way: a source (`config`: the local YAML file, in `kmesh-model`) produces a
//! validated [`model::Model`]; [`compile`] turns the model and the enrolled namespaces into the exact
//! contents of every BPF map and a make-before-break diff; [`kernel`] is the only module that
//! makes bpf() calls; [`mesh`] keeps the three in step; [`observe`] drains and counts what the
//! kernel reports, under its own lock. [`admin`] is the operator's surface.

pub use kmesh_model::{config, model};

pub mod admin;
pub mod ads;
pub mod authz;
pub mod cni;
pub mod compile;
pub mod daemon;
pub mod dns;
pub mod envoy;
pub mod k8s;
pub mod kernel;
pub mod logging;
pub mod mesh;
pub mod metrics;
pub mod netns;
pub mod observe;
pub mod outlier;
pub mod telemetry;
pub mod waypoint;
pub mod xds;

/// The CPUs this process may use, read once: `std::thread::available_parallelism` reads the
/// cgroup's files on every call (milliseconds on a busy node), and the answer does not change
/// in a way the callers (decoding, program loading) need to follow.
pub fn cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
