"""The portable path (torch's own kernels: flex_attention, grouped_mm; what a GPU runs) against transformers on
this CPU: the config variants and every topology, with the native CPU kernels off; also prefix caching (cache on
equals cache off, under preemption too) and quantized actors' resident bytes on that path. The native kernels are
chosen once per process, so the check runs in a child pytest with LLAMA4SERVE_NATIVE_KERNELS=0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_portable_path_matches_transformers_in_every_config_and_topology(tmp_path):
    checks = [
        str(TESTS / "parity" / "test_model_configs.py"),
        str(TESTS / "ray" / "test_expert_parallel.py") + "::test_outputs_independent_of_topology",
        str(TESTS / "ray" / "test_prefix_caching.py") + "::test_cache_on_gives_the_outputs_of_cache_off[1-0]",
        str(TESTS / "ray" / "test_prefix_caching.py") + "::test_tight_kv_budget_preempts_and_changes_nothing",
        str(TESTS / "ray" / "test_quantized_memory.py") + "::test_actors_in_this_process_hold_quantized_bytes",
    ]
    env = {**os.environ, "LLAMA4SERVE_NATIVE_KERNELS": "0"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *checks],
                         env=env, capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1]
