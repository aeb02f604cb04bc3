"""scripts/gpu_check.py on a machine without CUDA: exits 2 with a message naming CUDA, in well under a minute."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_exits_2_naming_cuda_without_a_gpu():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "CUDA" in done.stderr
