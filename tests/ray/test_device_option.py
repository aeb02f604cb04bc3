"""The `device` option reaches the actors: device="cuda" on a machine without CUDA fails at once, naming CUDA."""

from __future__ import annotations

import time

import pytest
import torch

from llama4serve.cluster import LLM
from llama4serve.cluster.checkpoints.maker import write_checkpoint


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_llm_device_cuda_without_a_gpu_raises_at_once(ray_session, tmp_path):
    write_checkpoint(tmp_path, "tiny-scout")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="device is 'cuda'.*no CUDA device"):
        LLM(str(tmp_path), device="cuda")
    assert time.monotonic() - t0 < 5  # before any actor starts, not a placement or collective timeout
