//! Compiles the protos with protox (a pure-Rust protobuf compiler): no protoc needed, so code
//! generation works on a fresh machine from the crate registry alone. The compiled descriptor
//! set is kept too, so a test can compare every field number with upstream's.
use prost::Message;

fn main() {
    let protos = ["proto/istio/workload/workload.proto", "proto/istio/security/authorization.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"]).expect("compiling the protos");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    std::fs::write(out.join("descriptors.bin"), fds.encode_to_vec()).expect("writing the descriptor set");
    let mut cfg = prost_build::Config::new(); // google.protobuf.* maps to prost-types
    cfg.compile_fds(fds).expect("generating Rust from the protos");
}
