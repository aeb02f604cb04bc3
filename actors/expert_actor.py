"""ExpertShardActor: a Ray actor holding experts [e0, e1) of every MoE layer, read straight from the safetensors
slices it owns. Each step it serves every MoE layer's dispatch/compute/combine in layer order: called once per
step (`run_step`) over the collective, or, over shared memory, in a standing loop (`serve`) that the transport
tells each layer's rows."""

from __future__ import annotations

import os
import threading

import torch

from llama4serve.actors.attention_actor import actor_device, torch_dtype_of
from llama4serve.actors.model.checkpoint import CheckpointReader
from llama4serve.actors.model.config import load_model_config
from llama4serve.actors.model.experts import LocalExperts
from llama4serve.actors.model.resident import tensor_bytes
from llama4serve.actors.parallel.exchange import CollectiveExchange
from llama4serve.actors.parallel.process_group import join, make_exchange
from llama4serve.actors.parallel.router import ExpertLayout, header_rows, serve_moe_layer
from llama4serve.actors.parallel.shm_transport import Stopped


class ExpertShardActor:
    def __init__(self, model_dir: str, dtype: str, bounds: list[tuple[int, int]], shard: int,
                 torch_threads: int | None = None, device: str = "auto"):
        """device: "auto" | "cpu" | "cuda", as for `AttentionActor`; the shard's experts live there."""
        self.device = dev = actor_device(device)  # first: a missing GPU fails before any loading
        if torch_threads:
            torch.set_num_threads(torch_threads)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        self.cfg = load_model_config(model_dir)
        self.dtype = torch_dtype_of(dtype, self.cfg.torch_dtype, dev)
        self.bounds = bounds
        self.shard = shard
        reader = CheckpointReader(model_dir)
        e0, e1 = bounds[shard]
        self.experts = LocalExperts(self.cfg, reader, e0, e1, self.dtype, dev)
        self.bytes_read = reader.bytes_read
        reader.close()
        self.layout: ExpertLayout | None = None
        self.exchange: CollectiveExchange | None = None  # the router's transport, set by join_group
        self.rows_served = 0
        self.serving = threading.Lock()  # held by the standing loop (`serve`)

    def ready(self) -> dict:
        import ray

        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), "bytes_read": self.bytes_read,
                "experts": self.bounds[self.shard], "device": str(self.device)}

    def resident_bytes(self) -> dict[str, int]:
        """Bytes of the tensors this actor holds (`actors.model.resident`): all of them and the routed experts."""
        return {"total": tensor_bytes(self), "routed_experts": tensor_bytes(self.experts)}

    def join_group(self, master: tuple[str, int], rank: int, world_size: int, first_expert_rank: int, timeout_s: float,
                   transport: str = "collective") -> str:
        if self.exchange is not None and self.exchange.standing:  # a loop of the old group still waiting
            self.exchange.stop()
            if not self.serving.acquire(timeout=timeout_s):
                raise TimeoutError(f"the expert loop of the old group did not stop within {timeout_s:.0f} s")
            self.serving.release()
        backend = join(master, rank, world_size, timeout_s, self.device)
        self.layout = ExpertLayout(self.bounds, first_expert_rank, world_size, self.device)
        self.exchange = make_exchange(transport, rank, world_size, first_expert_rank, timeout_s, self.device)
        return backend

    def standing(self) -> bool:
        """True when the transport feeds a standing loop (`serve`, started once per group) in place of
        `run_step` calls."""
        return self.exchange.standing

    def serve(self) -> int:
        """The standing loop: serves each MoE layer as its dispatch comes in, layer after layer and step after
        step, with no call per step. Returns the rows it served once `join_group` stops it; raises (after
        aborting the group, so no peer waits for it) on an error, a peer's death or abort, or a timeout."""
        ex, layers, h = self.exchange, self.cfg.moe_layers, self.cfg.hidden_size
        head, start, i = header_rows(self.layout, h, self.dtype), self.rows_served, 0
        with self.serving:
            try:
                while True:
                    # A step's first MoE layer comes when it comes; a ping-pong layer's micro-batches, one per
                    # lane, right behind each other.
                    rows, layer, micro_batches = ex.await_dispatch(idle=i == 0)
                    for lane in ex.lanes[:micro_batches]:
                        if lane is not ex:
                            rows, layer, _ = lane.await_dispatch()
                        if layer != layers[i]:
                            raise RuntimeError(f"expert rank {self.shard}: MoE layer {layer} dispatched, "
                                               f"{layers[i]} due")
                        self.rows_served += int(serve_moe_layer(self.layout, self.experts, layer, h, self.dtype,
                                                                rows - head, self.device, lane))
                    i = (i + 1) % len(layers)
            except Stopped:
                return self.rows_served - start
            except BaseException:
                ex.abort()
                raise

    def run_step(self, capacity: int, num_steps: int = 1) -> int:
        """Serves one engine step (num_steps decode steps with multi-step scheduling): every MoE layer once per
        step, in order. Returns rows served."""
        served = int(sum(self.serve_step(capacity) for _ in range(num_steps)))  # one sync, after the layer loops
        self.rows_served += served
        return served

    def serve_step(self, capacity: int) -> torch.Tensor:
        """Every MoE layer of one step, in order, without a host sync: rows served as a 0-dim device tensor."""
        rows = torch.zeros((), dtype=torch.long, device=self.device)
        for layer in self.cfg.moe_layers:
            rows += serve_moe_layer(self.layout, self.experts, layer, self.cfg.hidden_size, self.dtype, capacity,
                                    self.device, self.exchange)
        return rows
