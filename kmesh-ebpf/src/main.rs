//! Kernel side of the mesh, one file per hook family:
//!
//! - `connect`: `cgroup/connect4/6` rewrite a connect() to a service frontend to a backend
//!   (`lb` holds the lookup chain); no packet is ever NATed;
//! - `udp`: `cgroup/sendmsg4/6` and `recvmsg4/6` do the same per datagram for unconnected UDP
//!   sockets and show replies as coming from the frontend;
//! - `dns`: a pod's DNS queries go to the daemon's proxy inside the pod's namespace;
//! - `authz`: `sk_lookup` enforces L4 authorization in the destination pod's namespace;
//! - `sockops`: connection telemetry, the node's own connections, waypoint sockets;
//! - `waypoint`: `sk_msg` puts a PROXY protocol header in front of a waypoint connection.
//!
//! All decisions that can be made ahead of time (health, locality levels, weights, port
//! mappings, verdicts) are compiled into the maps (`maps`) by the daemon; the programs only
//! follow the lookup chains described in `kmesh_common`.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

mod authz;
mod connect;
mod dns;
mod lb;
mod maps;
mod shared;
mod sockops;
mod udp;
mod waypoint;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    panic!("kmesh-ebpf is a BPF object: kmesh-daemon/build.rs builds it for bpfel-unknown-none");
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
