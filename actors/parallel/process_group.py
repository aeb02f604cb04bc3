"""One torch.distributed process group over all attention and expert ranks of a model instance.

Rank 0 picks its node's IP and a free port; every rank then joins with the same address. The backend follows the
device the exchanged tensors live on (`kernels.device.collective_backend`): NCCL for CUDA tensors, gloo for CPU
tensors. Every collective carries `timeout_s`, so a dead or stuck peer raises instead of hanging; on NCCL that
needs async error handling on (TORCH_NCCL_ASYNC_ERROR_HANDLING=1: a timed-out collective aborts the
communicator and raises, instead of blocking the stream forever).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from llama4serve.kernels.device import collective_backend


def master_address() -> tuple[str, int]:
    """(this node's IP, a free TCP port on it): called on rank 0."""
    import ray

    ip = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return ip, s.getsockname()[1]


def join(master: tuple[str, int], rank: int, world_size: int, timeout_s: float,
         device: torch.device | str = "cpu") -> str:
    """Joins the group (blocks until all ranks have joined or `timeout_s` passes). Returns the backend, which
    follows `device`, the device this rank's exchanged tensors live on."""
    backend = collective_backend(device)
    extra = {}
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # read when the communicator is made
        torch.cuda.set_device(device)
        extra["device_id"] = torch.device(device)  # binds the communicator to this rank's GPU at once
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master[0]}:{master[1]}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        **extra,
    )
    return backend
