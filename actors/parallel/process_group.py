"""One torch.distributed process group over all attention and expert ranks of a model instance.

Rank 0 picks its node's IP and a free port; every rank then joins with the same address. The backend follows the
device the exchanged tensors live on (`kernels.device.collective_backend`): NCCL for CUDA tensors, gloo for CPU
tensors. Every collective carries `timeout_s`, so a dead or stuck peer raises instead of hanging; on NCCL that
needs async error handling (TORCH_NCCL_ASYNC_ERROR_HANDLING=2: a timed-out collective aborts the communicator
and raises, instead of blocking the stream forever, and the process lives on; 1 would also tear it down, and
with it an attention actor's KV cache that the engine's recovery keeps). A recovery calls `join` again on every
rank: the old group is destroyed first, and rank 0 picks a new port.

`make_exchange` then picks the router's transport (`exchange`): shared memory when every rank is on this
machine and the tensors are on the CPU, else the collective; a new group gets a new shared file.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from llama4serve.kernels.device import collective_backend
from llama4serve.actors.parallel import shm_transport
from llama4serve.actors.parallel.exchange import CollectiveExchange

TRANSPORTS = ("auto", "collective", "shm")
SLOT_BYTES = 1 << 20  # per (attention rank, expert rank) block each way; larger blocks take the collective


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
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")  # read when the communicator is made
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


def make_exchange(transport: str, rank: int, world_size: int, first_expert_rank: int, timeout_s: float,
                  device: torch.device | str = "cpu", slot_bytes: int = SLOT_BYTES,
                  spin_s: float = 0.0) -> CollectiveExchange:
    """The router's transport for the group just joined (every rank calls it, in the same order as `join`).
    transport: "collective" (gloo/NCCL all_to_all), "shm" (shared memory; raises unless every rank is on one
    x86 machine with CPU tensors), "auto" (shm where it can run, else the collective)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"expert_transport is {transport!r}; allowed: {', '.join(TRANSPORTS)}")
    collective = CollectiveExchange(first_expert_rank, world_size)
    if transport == "collective":
        return collective
    cpu = torch.device(device).type == "cpu" and shm_transport.SYS_FUTEX is not None
    if not cpu and transport == "auto":
        return collective
    path = shm_transport.create_file(world_size, first_expert_rank, slot_bytes) if rank == 0 and cpu else ""
    mine = (shm_transport.machine_key() if cpu else "", os.getpid(), path)
    peers: list = [None] * world_size
    dist.all_gather_object(peers, mine)
    usable = all(p[0] and p[0] == peers[0][0] for p in peers)
    try:
        exchange = collective
        if usable:
            lanes = [shm_transport.ShmExchange(peers[0][2], rank, first_expert_rank, world_size,
                                               [p[1] for p in peers], slot_bytes, timeout_s, spin_s, lane)
                     for lane in range(shm_transport.LANES)]
            for lane in lanes:
                lane.lanes = lanes
            exchange = lanes[0]
        dist.barrier()  # every rank has mapped the file: its name can go
    finally:
        if path:
            os.unlink(path)
    if not usable and transport == "shm":
        raise ValueError("expert_transport 'shm' needs every rank on one x86 machine with CPU tensors; use 'auto' "
                         "(the process group's all_to_all across nodes or on GPUs)")
    return exchange
