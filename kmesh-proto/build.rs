//! Compiles the protos with protox (a pure-Rust protobuf compiler): no protoc needed, so code
//! generation works on a fresh machine from the crate registry alone.
fn main() {
    let protos = ["proto/istio/workload/workload.proto", "proto/istio/security/authorization.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"]).expect("compiling the protos");
    let mut cfg = prost_build::Config::new(); // google.protobuf.* maps to prost-types
    cfg.compile_fds(fds).expect("generating Rust from the protos");
}
