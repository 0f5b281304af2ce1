//! Builds the eBPF object with the nightly toolchain (`-Z build-std=core`, bpf-linker) and
//! leaves it in $OUT_DIR/kmesh-ebpf, where `kernel.rs` embeds it.
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=KMESH_EBPF_TOOLCHAIN");
    let tc = std::env::var("KMESH_EBPF_TOOLCHAIN").ok();
    let toolchain = match tc.as_deref() {
        Some(t) if !t.is_empty() => aya_build::Toolchain::Custom(t),
        _ => aya_build::Toolchain::Nightly,
    };
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../kmesh-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package { name: "kmesh-ebpf", root_dir, ..Default::default() }],
        toolchain,
    )
}
