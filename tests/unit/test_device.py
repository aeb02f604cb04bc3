"""Device choice per actor and the collective backend (kernels/device.py)."""

import time

import pytest
import torch

from llama4serve.kernels.device import collective_backend, local_cuda_index, resolve_device


def test_cpu_and_auto_without_gpus():
    assert resolve_device("cpu", []) == torch.device("cpu")
    assert resolve_device("cpu", ["0"]) == torch.device("cpu")
    assert resolve_device("auto", []) == torch.device("cpu")


def test_unknown_device_names_the_choices():
    with pytest.raises(ValueError, match="auto, cpu, cuda"):
        resolve_device("gpu", [])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cuda_without_cuda_raises_at_once_naming_cuda():
    for requested, gpu_ids in (("cuda", []), ("cuda", ["0"]), ("auto", ["0"])):
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="CUDA") as err:
            resolve_device(requested, gpu_ids)
        assert time.monotonic() - start < 5
        assert "device='cpu'" in str(err.value)


def test_ray_gpu_ids_map_to_local_indices():
    # Ray sets CUDA_VISIBLE_DEVICES to the actor's ids: its first GPU is cuda:0 whatever the physical id.
    assert local_cuda_index(["3"], "3") == 0
    assert local_cuda_index([5, 6], "5,6") == 0
    assert local_cuda_index(["6"], "5,6") == 1
    # Without CUDA_VISIBLE_DEVICES the ids are physical indices.
    assert local_cuda_index(["2"], None) == 2
    assert local_cuda_index([], None) == 0
    with pytest.raises(RuntimeError, match="CUDA_VISIBLE_DEVICES"):
        local_cuda_index(["7"], "0,1")


def test_resolve_cuda_with_gpus(monkeypatch):
    # No GPU here: stand in for torch.cuda's two answers that resolve_device reads.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda", ["3"], cuda_visible_devices="3") == torch.device("cuda", 0)
    assert resolve_device("auto", ["3"], cuda_visible_devices="3") == torch.device("cuda", 0)
    assert resolve_device("cuda", [], cuda_visible_devices=None) == torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match="sees 1 CUDA device"):
        resolve_device("cuda", ["1"], cuda_visible_devices=None)


def test_backend_follows_the_device():
    assert collective_backend(torch.device("cuda", 0)) == "nccl"
    assert collective_backend("cuda") == "nccl"
    assert collective_backend(torch.device("cpu")) == "gloo"
    assert collective_backend("cpu") == "gloo"
