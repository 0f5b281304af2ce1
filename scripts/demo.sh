#!/usr/bin/env bash
# The demo (README command 1): installs what is missing, builds, and runs the daemon on a local
# config with one client pod and three server pods in two zones (--kernel-native: Envoy's xDS
# from the in-repo control plane instead). Cleans up after itself, also on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
echo "== building (the first build takes a few minutes)"
cargo build --release --bins --examples 2>&1 | grep -E '^(error|warning: unused)|Finished' || true
test -x target/release/examples/demo || { echo "build failed; run: cargo build --release --bins --examples" >&2; exit 1; }
# --kernel-native: the same pods, with Envoy's xDS (listeners, clusters, endpoints) served by
# the in-repo control plane and done by the kernel.
if [ "${1:-}" = "--kernel-native" ]; then
  exec target/release/examples/demo_kernel_native
fi
# Envoy (from PyPI) for the demo's waypoint step.
source scripts/envoy.sh
exec target/release/examples/demo
