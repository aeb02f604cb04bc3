#!/usr/bin/env bash
# Installs llama4serve and its dependencies into the current Python environment.
# torch: the CPU wheel 2.13.0 only when no torch is installed (an unpinned torch pulls CUDA packages).
# Usage: scripts/install.sh [extras]   e.g. scripts/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
extras="${1:-}"
if [ -n "$extras" ]; then target=".[$extras]"; else target="."; fi
python3 -m pip install -q -e "$target"
