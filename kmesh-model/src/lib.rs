//! The mesh model and the sources that produce it. Pure: no I/O besides reading a config file.
//!
//! - [`model`]: workloads and services as Istio's workload API defines them, already validated.
//! - [`config`]: the local YAML file (the embedded default source, standing in for istiod).
//! - [`delta`]: a change of the model as the keys it touches and what they held before.
//! - [`alloc`]: addresses for mesh-only hostnames the local file gives none.
//! - [`xds`]: Istio workload and authorization resources from the control plane.
//! - [`repack`]: B-tree indexes rebuilt full after a bulk insert in key order.
//! - [`sorted`]: one walk over a sorted index alongside sorted keys, for bulk changes.
//! - [`names`]: workload and service names read out of the uid or key that holds them.
//! - [`shared`]: values many workloads hold alike (service lists, localities), interned.

pub mod alloc;
pub mod config;
pub mod delta;
pub mod istr;
pub mod model;
pub mod names;
pub mod repack;
pub mod shared;
pub mod sorted;
pub mod vecmap;
pub mod xds;
