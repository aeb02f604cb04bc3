"""Which device an actor computes on, and which collective backend its process group uses.

Ray gives an actor GPUs by setting CUDA_VISIBLE_DEVICES to exactly the ids in `ray.get_gpu_ids()`, in that
order, so inside the actor the first assigned GPU is cuda:0 whatever its physical id (GPU "3" of a node is
cuda:0 in an actor that got ["3"]). When CUDA_VISIBLE_DEVICES is not set (outside Ray, or Ray told not to set
it) the ids are physical indices and map to cuda:<id>. One actor computes on one GPU: the first of its ids.
"""

from __future__ import annotations

import os

import torch

DEVICES = ("auto", "cpu", "cuda")


def local_cuda_index(gpu_ids: list, cuda_visible_devices: str | None) -> int:
    """The torch index of the first of `gpu_ids` given the process's CUDA_VISIBLE_DEVICES (None: not set)."""
    if not gpu_ids:
        return 0
    first = str(gpu_ids[0]).strip()
    if cuda_visible_devices is None:
        return int(first)
    visible = [d.strip() for d in cuda_visible_devices.split(",") if d.strip()]
    if first in visible:
        return visible.index(first)
    raise RuntimeError(
        f"GPU id {first} is not in CUDA_VISIBLE_DEVICES={cuda_visible_devices!r}; the ids must be the ones Ray "
        "assigned this actor (ray.get_gpu_ids())"
    )


def _cuda_unavailable(requested: str, gpu_ids: list) -> RuntimeError:
    built = torch.version.cuda or "none (a CPU-only build)"
    return RuntimeError(
        f"device={requested!r} needs CUDA, but CUDA is not available in this process (torch {torch.__version__}, "
        f"CUDA build: {built}, visible GPUs: {torch.cuda.device_count()}, Ray GPU ids: {list(gpu_ids)}, "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). Use device='cpu', or run where a "
        "GPU and a CUDA build of torch are present and give the actors GPUs (num_gpus)."
    )


def resolve_device(requested: str, gpu_ids: list, cuda_visible_devices: str | None = None) -> torch.device:
    """The device to compute on. "cpu" -> cpu. "cuda" -> the first of the actor's GPUs (cuda:0 under Ray),
    raising at once, naming CUDA, when CUDA is unavailable. "auto" -> cuda when Ray assigned GPUs (`gpu_ids`
    non-empty), else cpu; assigned GPUs that torch cannot use raise like "cuda".

    gpu_ids: `ray.get_gpu_ids()` of the actor. cuda_visible_devices: defaults to the environment variable.
    """
    if requested not in DEVICES:
        raise ValueError(f"device is {requested!r}; allowed: {', '.join(DEVICES)}")
    if requested == "cpu" or (requested == "auto" and not gpu_ids):
        return torch.device("cpu")
    if not torch.cuda.is_available():  # NVML-based: answers in well under a second, also without a driver
        raise _cuda_unavailable(requested, gpu_ids)
    if cuda_visible_devices is None:
        cuda_visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    index = local_cuda_index(gpu_ids, cuda_visible_devices)
    count = torch.cuda.device_count()
    if index >= count:
        raise RuntimeError(
            f"GPU ids {list(gpu_ids)} map to cuda:{index}, but this process sees {count} CUDA device(s) "
            f"(CUDA_VISIBLE_DEVICES={cuda_visible_devices!r})"
        )
    return torch.device("cuda", index)


def collective_backend(device: torch.device | str) -> str:
    """The torch.distributed backend for tensors on `device`: NCCL for CUDA, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"
