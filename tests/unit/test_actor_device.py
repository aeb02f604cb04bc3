"""Actors pick their device and dtype before loading anything: device="cuda" without CUDA fails at once."""

from __future__ import annotations

import time

import pytest
import torch

from llama4serve.actors.attention_actor import AttentionActor, torch_dtype_of
from llama4serve.actors.expert_actor import ExpertShardActor
from llama4serve.actors.parallel.process_group import collective_backend

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")


@needs_no_cuda
@pytest.mark.parametrize("make", [
    lambda: AttentionActor("/nonexistent", "auto", 4, 4, 8, device="cuda"),
    lambda: ExpertShardActor("/nonexistent", "auto", [(0, 16)], 0, device="cuda"),
])
def test_cuda_without_a_gpu_raises_at_once_naming_cuda(make):
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="CUDA"):  # before the (missing) checkpoint is touched
        make()
    assert time.monotonic() - t0 < 5


def test_dtype_auto_is_bfloat16_on_a_gpu_and_the_checkpoints_on_cpu():
    assert torch_dtype_of("auto", "float32", torch.device("cuda", 0)) == torch.bfloat16
    assert torch_dtype_of("auto", "float32", torch.device("cpu")) == torch.float32
    assert torch_dtype_of("float32", "bfloat16", torch.device("cuda", 0)) == torch.float32
    with pytest.raises(ValueError, match="allowed"):
        torch_dtype_of("int8", "float32", torch.device("cpu"))


def test_process_group_backend_follows_the_device():
    assert collective_backend(torch.device("cuda", 0)) == "nccl"
    assert collective_backend("cpu") == "gloo"
