#!/usr/bin/env bash
# Where the daemon's memory goes while it holds a large mesh: N services x M endpoints served
# over delta xDS by the in-repo control plane (from a generated YAML file), the daemon run
# under heaptrack (built with the system allocator, which heaptrack sees), killed once the
# push is in the kernel and has settled, and what it still held printed by allocation site.
#
#   scripts/heap-profile.sh [N] [M]     # as root; default 10000 10; about a minute
#
# Output: target/heap/profile-NxM.zst (open with `heaptrack --analyze` or heaptrack_gui) and a
# summary of the largest holders on stdout. Nothing leaves the machine: the control plane and
# the daemon's admin listen on 127.0.0.1, and no pod is made.
set -euo pipefail
N=${1:-10000}
M=${2:-10}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
[ "$(id -u)" = 0 ] || { echo "heap-profile.sh: needs root (it loads the daemon's eBPF programs)" >&2; exit 1; }
command -v heaptrack >/dev/null || { apt-get update -qq && apt-get install -y -qq heaptrack >/dev/null; }
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

out=$root/target/heap
mkdir -p "$out"
cargo build --release -q -p kmesh-xds-server
CARGO_PROFILE_RELEASE_DEBUG=line-tables-only CARGO_TARGET_DIR=$out cargo build --release -q -p kmesh-daemon --no-default-features --bin kmesh-daemon

cfg=$out/mesh-${N}x${M}.yaml
python3 - "$N" "$M" > "$cfg" <<'EOF'
import sys
n, m = int(sys.argv[1]), int(sys.argv[2])
print("services:")
for s in range(n):
    a = 0x0A600000 + s + 1
    print(f"  - {{name: svc-{s}, namespace: bench, hostname: svc-{s}.bench.svc.cluster.local, "
          f"addresses: [{a>>24}.{(a>>16)&255}.{(a>>8)&255}.{a&255}], ports: [{{service_port: 80, target_port: 8080}}]}}")
print("workloads:")
for s in range(n):
    for e in range(m):
        a = 0x0A800000 + s * m + e + 1
        print(f"  - {{uid: Kubernetes//Pod/bench/svc-{s}-{e}, name: svc-{s}-{e}, namespace: bench, workload_name: svc-{s}, canonical_name: svc-{s}, "
              f"addresses: [{a>>24}.{(a>>16)&255}.{(a>>8)&255}.{a&255}], node: node-{e%3}, "
              f"locality: {{region: r, zone: z{e%3}}}, service_account: default, trust_domain: cluster.local, "
              f"services: {{bench/svc-{s}.bench.svc.cluster.local: []}}}}")
EOF

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
xds=127.0.0.1:$(free_port)
admin=127.0.0.1:$(free_port)
cg=/sys/fs/cgroup/unified/kmesh-heap-$$
pins=/sys/fs/bpf/kmesh-heap-$$
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
mkdir -p "$cg"
cp_pid=
ht_pid=
cleanup() {
    [ -n "$ht_pid" ] && { pkill -9 -f -- "--bpffs $pins" || true; wait "$ht_pid" 2>/dev/null || true; }
    [ -n "$cp_pid" ] && kill "$cp_pid" 2>/dev/null || true
    rm -rf "$pins" "/tmp/kmesh-heap-$$".*
    rmdir "$cg" 2>/dev/null || true
}
trap cleanup EXIT

target/release/kmesh-xds-server --config "$cfg" --listen "$xds" > "$out/xds-server.log" 2>&1 &
cp_pid=$!
rm -f "$out/profile-${N}x${M}.zst"
heaptrack -o "$out/profile-${N}x${M}" "$out/release/kmesh-daemon" run --xds-address "$xds" --xds-plaintext \
    --node-name node-0 --cgroup "$cg" --bpffs "$pins" --admin "$admin" --metrics-addr off \
    --admin-socket "/tmp/kmesh-heap-$$.sock" --state-file "/tmp/kmesh-heap-$$.state" \
    > "$out/daemon.log" 2>&1 &
ht_pid=$!

want=$((N * M))
for _ in $(seq 1 600); do
    got=$(curl -sf "http://$admin/metrics" | sed -n 's/^kmesh_map_entries{map="ENDPOINTS"} //p' || true)
    [ "${got:-0}" = "$want" ] && break
    sleep 0.5
done
[ "${got:-0}" = "$want" ] || { echo "heap-profile.sh: the push did not reach the kernel (ENDPOINTS=${got:-none}, want $want); see $out/daemon.log" >&2; exit 1; }
sleep 3
pid=$(pgrep -f -- "--bpffs $pins" | while read -r p; do [ "$(cat /proc/$p/comm)" = kmesh-daemon ] && echo "$p"; done | head -1)
echo "daemon holding ${N} x ${M}: VmRSS $(awk '/VmRSS/ {print $2, $3}' /proc/$pid/status)"
# SIGKILL: what the daemon held at that moment is what heaptrack reports as leaked.
kill -9 "$pid"
wait "$ht_pid" 2>/dev/null || true
ht_pid=
heaptrack_print -f "$out/profile-${N}x${M}.zst" --print-leaks 1 --print-peaks 0 --print-allocators 0 \
    --print-temporary 0 --merge-backtraces 1 --shorten-templates 1 > "$out/profile-${N}x${M}.txt" 2>/dev/null || true
grep -m1 -E "^total memory leaked" "$out/profile-${N}x${M}.txt" || true
sed -n '/MOST MEMORY LEAKED/,/^$/p' "$out/profile-${N}x${M}.txt" | head -150
echo "full report: $out/profile-${N}x${M}.txt"
