#!/usr/bin/env bash
# Installs what building and running this project needs on a fresh machine of this kind.
# Idempotent: every step checks first and does nothing when it is already satisfied.
set -euo pipefail

log() { printf '[setup] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "[setup] must run as root (loads eBPF programs, creates namespaces and cgroups)" >&2
  exit 1
fi

# 1. Debian packages: iproute2 for namespaces/veth/bridge, procps for ps/pkill.
need_apt=()
command -v ip >/dev/null || need_apt+=(iproute2)
command -v pkill >/dev/null || need_apt+=(procps)
# The Kubernetes tests run a real CNI chain: Debian's bridge + host-local, then kmesh-cni.
[ -x /usr/lib/cni/bridge ] || need_apt+=(containernetworking-plugins)
# The DNS proxy tests run a real resolver (dnsmasq) and real clients (dig; getent is glibc's).
command -v dnsmasq >/dev/null || need_apt+=(dnsmasq-base)
command -v dig >/dev/null || need_apt+=(bind9-dnsutils)
# The daemon's allocator (jemalloc, built from source by tikv-jemalloc-sys) needs make and cc.
command -v make >/dev/null || need_apt+=(make)
command -v cc >/dev/null || need_apt+=(gcc)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

# 2. Rust toolchains: stable for user space, nightly + rust-src for the eBPF crate.
export PATH="$HOME/.cargo/bin:$PATH"
rustup toolchain list | grep -q '^nightly' || { log "rustup toolchain install nightly"; rustup toolchain install nightly --profile minimal; }
rustup component list --toolchain nightly --installed | grep -q '^rust-src' \
  || { log "rustup component add rust-src (nightly)"; rustup component add rust-src --toolchain nightly; }
for c in clippy rustfmt; do
  rustup component list --installed | grep -q "^$c" || rustup component add "$c"
done

# 3. bpf-linker 0.13.0 linked against the nightly rustc's own libLLVM (Debian has no LLVM 22).
SYS=$(rustup run nightly rustc --print sysroot)/lib
SO=$(cd "$SYS" && ls libLLVM.so.*-rust-* | head -n1)
D=$HOME/.cargo/bpf-linker-llvm/$SO
linker_ok() {
  command -v bpf-linker >/dev/null || return 1
  bpf-linker --version 2>/dev/null | grep -q '0.13.0' || return 1
  readelf -d "$(command -v bpf-linker)" 2>/dev/null | grep -q "$D" || return 1
}
if ! linker_ok; then
  log "building bpf-linker 0.13.0 against $SO (about 3 minutes, once per machine)"
  mkdir -p "$D/lib"
  ln -sf "$SYS/$SO" "$D/lib/libLLVM.so"
  ln -sf "$SYS/$SO" "$D/lib/$SO"
  LLVM_PREFIX="$D" cargo +stable install bpf-linker@0.13.0 --locked --force \
    --no-default-features --features llvm-22
fi

# 4. bpffs, where the daemon pins its maps and links.
if ! mountpoint -q /sys/fs/bpf; then
  log "mounting bpffs at /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi

# 5. cgroup2 must be mounted somewhere (it is at /sys/fs/cgroup/unified on this machine kind).
if ! awk '$3=="cgroup2"{f=1} END{exit !f}' /proc/mounts; then
  log "mounting cgroup2 at /sys/fs/cgroup/unified"
  mkdir -p /sys/fs/cgroup/unified
  mount -t cgroup2 none /sys/fs/cgroup/unified
fi
log "ready"
