"""What the Serve deployments load when their module is imported (in a fresh interpreter each): the Ingress
runs in a CPU pod, so no torch and no engine; neither the Ingress, the Engine nor the data-plane actors load the
random-checkpoint maker, the presets, the benchmarks or the command line (DESIGN.md §5). And no module of
cluster/, actors/ or kernels/ is over 300 lines (issue 14)."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

NEVER_AT_RUNTIME = ("llama4serve.cluster.checkpoints", "llama4serve.cluster.cli")


@lru_cache(maxsize=None)
def loaded_after_import(module: str) -> tuple[str, ...]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return tuple(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_ingress_module_imports_without_torch():
    # The acceptance check of issue 14, verbatim.
    code = "import sys, llama4serve.cluster.serving.ingress; assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_ingress_loads_no_engine():
    loaded = loaded_after_import("llama4serve.cluster.serving.ingress")
    assert not [m for m in loaded if m == "torch" or m.startswith(("torch.", "llama4serve.cluster.engine",
                                                                   "llama4serve.kernels"))]


@pytest.mark.parametrize("module", [
    "llama4serve.cluster.serving.ingress",
    "llama4serve.cluster.serving.engine_deployment",
    "llama4serve.actors.attention_actor",
    "llama4serve.actors.expert_actor",
])
def test_no_checkpoint_maker_presets_benchmarks_or_cli(module):
    loaded = loaded_after_import(module)
    assert not [m for m in loaded if m.startswith(NEVER_AT_RUNTIME)]


def test_no_module_over_300_lines_and_a_small_cluster_folder():
    root = Path(__file__).resolve().parents[2]
    long = {str(p.relative_to(root)): n for top in ("cluster", "actors", "kernels") for p in (root / top).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 300}
    assert not long, long
    assert len(list((root / "cluster").glob("*.py"))) <= 12  # one role per folder below it
