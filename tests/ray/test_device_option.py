"""The `device` option reaches the actors: device="cuda" on a machine without CUDA fails at once, naming CUDA."""

from __future__ import annotations

import time

import pytest
import torch

from llama4serve.cluster import LLM, SamplingParams
from llama4serve.cluster.checkpoints.maker import write_checkpoint


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_llm_device_cuda_without_a_gpu_raises_at_once(ray_session, tmp_path):
    write_checkpoint(tmp_path, "tiny-scout")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="device is 'cuda'.*no CUDA device"):
        LLM(str(tmp_path), device="cuda")
    assert time.monotonic() - t0 < 5  # before any actor starts, not a placement or collective timeout


def test_cuda_graph_batch_sizes_reach_the_actors_and_can_be_turned_off(ray_session, tmp_path):
    write_checkpoint(tmp_path, "tiny-scout")
    with LLM(str(tmp_path), cuda_graph_batch_sizes=(), device="cpu") as llm:  # accepted, and CPU actors run
        assert llm.generate([5, 6, 7], SamplingParams(max_tokens=2, temperature=0))[0].token_ids
    with pytest.raises(ValueError, match="cuda_graph_batch_sizes"):
        LLM(str(tmp_path), cuda_graph_batch_sizes=("x",))
