#!/usr/bin/env bash
# Builds the container image the Helm chart runs, from the release binaries, with no container
# engine and no base image (Python's standard library writes the archive; see scripts/image.py),
# then checks it: the layer unpacked into a scratch root and each binary run there with chroot.
#   scripts/image.sh [NAME:TAG]     default kmesh-rs:<version>; writes target/image/*.tar
# Load it with `docker load -i`, `podman load -i`, or `ctr -n k8s.io image import` on a node.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p kmesh-daemon -p kmesh-cni --bins
version=$(target/release/kmesh-daemon --version | awk '{print $2}')
ref="${1:-kmesh-rs:$version}"
mkdir -p target/image
out="target/image/${ref//[:\/]/_}.tar"
python3 scripts/image.py target/release "$out" "$ref"

# Smoke check: run the binaries from the unpacked image (its own loader and libraries).
root=$(mktemp -d /tmp/kmesh-image.XXXXXX)
trap 'rm -rf "$root"' EXIT
python3 - "$out" "$root" <<'PY'
import json, sys, tarfile, io, gzip
out, root = sys.argv[1], sys.argv[2]
with tarfile.open(out) as t:
    m = json.load(t.extractfile("manifest.json"))[0]
    layer = gzip.decompress(t.extractfile(m["Layers"][0]).read())
    tarfile.open(fileobj=io.BytesIO(layer)).extractall(root, filter="tar")
PY
chroot "$root" /usr/local/bin/kmesh-daemon --version
chroot "$root" /usr/local/bin/kmeshctl --help >/dev/null
CNI_COMMAND=VERSION chroot "$root" /usr/local/bin/kmesh-cni </dev/null
echo
echo "image ok: $out"
