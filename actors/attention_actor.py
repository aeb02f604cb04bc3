"""AttentionActor: one Ray actor holding the text model (embeddings, attention, dense MLPs, shared experts,
router, lm_head), its iRoPE KV cache, and — when `expert_actors = 0` — all routed experts.

Per step it receives a StepBatch (token ids, positions, block tables) and returns sampled tokens, never logits.
"""

from __future__ import annotations

import os

import torch

from llama4serve.kernels.device import resolve_device
from llama4serve.actors.step_io import SeqOutput, StepBatch
from llama4serve.actors.model.checkpoint import DTYPES, CheckpointReader
from llama4serve.actors.model.config import load_model_config
from llama4serve.actors.model.experts import LocalExperts
from llama4serve.actors.model.resident import tensor_bytes
from llama4serve.actors.runner.cuda_graphs import DEFAULT_BATCH_SIZES, DecodeGraphs
from llama4serve.actors.runner.image_features import ImageFeatureCache
from llama4serve.actors.runner.kv_cache import KVCache
from llama4serve.actors.model.text_model import Llama4TextModel
from llama4serve.actors.runner.model_runner import ModelRunner
from llama4serve.actors.parallel.process_group import join, make_exchange, master_address
from llama4serve.actors.parallel.router import ExpertLayout, Router



def ray_gpu_ids() -> list:
    """The GPUs Ray gave this actor ([] outside a Ray worker)."""
    try:
        import ray
    except ImportError:
        return []
    return ray.get_gpu_ids() if ray.is_initialized() else []


def actor_device(device: str) -> torch.device:
    """The device an actor computes on, from the `device` option and the GPUs Ray gave it; raises at once,
    naming CUDA, when "cuda" is asked for and there is none."""
    return resolve_device(device, ray_gpu_ids())


def torch_dtype_of(dtype: str, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
    """dtype "auto": bfloat16 on a GPU, the checkpoint's torch_dtype on CPU; else the named dtype."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else checkpoint_dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype is {dtype!r}; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


class ExpertLoad:
    """Routed experts (`RoutedExperts`) that also count the rows sent to each expert of each MoE layer: one
    index_add per MoE layer per step, on the rows' device, without a host sync."""

    def __init__(self, routed, moe_layers: tuple[int, ...], num_experts: int, device: torch.device | str = "cpu"):
        self.routed = routed
        self.row = {layer: r for r, layer in enumerate(moe_layers)}
        self.counts = torch.zeros(len(moe_layers), num_experts, dtype=torch.long, device=device)  # [MoE layers, E]

    @property
    def micro_batches(self) -> int:
        """Ping-pong micro-batches of this step's MoE layers (`Router.micro_batches`; 1 for local experts)."""
        return getattr(self.routed, "micro_batches", 1)

    def start(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, capacity: int, lane: int | None = None):
        if self.counts.device != expert_ids.device:
            self.counts = self.counts.to(expert_ids.device)
        self.counts[self.row[layer]].index_add_(0, expert_ids, torch.ones_like(expert_ids))
        return self.routed.start(layer, x, expert_ids, capacity, lane)

    def count(self, layers: list[int], expert_ids: torch.Tensor) -> None:
        """Adds one row to expert_ids[j] of MoE layer layers[j] (for a step routed in native code)."""
        rows = torch.tensor([self.row[layer] for layer in layers])
        self.counts.index_put_((rows, expert_ids.to(self.counts.device)), torch.ones_like(rows), accumulate=True)

    def take(self) -> torch.Tensor:
        """The counts since the last take, on the CPU: [MoE layers, E] int64."""
        counts, self.counts = self.counts.cpu(), torch.zeros_like(self.counts)
        return counts


class AttentionActor:
    def __init__(
        self,
        model_dir: str,
        dtype: str,
        num_full_blocks: int,
        num_chunk_blocks: int,
        block_size: int,
        torch_threads: int | None = None,
        expert_bounds: list[tuple[int, int]] | None = None,
        num_attention_ranks: int = 1,
        device: str = "auto",
        cuda_graph_batch_sizes: tuple[int, ...] | None = DEFAULT_BATCH_SIZES,
    ):
        """expert_bounds: expert ranges of the expert actors (ranks num_attention_ranks, ...); None keeps every
        routed expert in this actor. device: "auto" | "cpu" | "cuda" ("auto": the GPU Ray gave this actor, if
        any); weights, KV pools and every step's tensors live there. dtype "auto": bfloat16 on a GPU.
        cuda_graph_batch_sizes: on CUDA with every expert in this actor, decode steps of up to the largest of
        these batch sizes run as CUDA graphs (captured on first use); None or () turns them off."""
        self.device = dev = actor_device(device)  # first: a missing GPU fails before any loading
        if torch_threads:
            torch.set_num_threads(torch_threads)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        cfg = load_model_config(model_dir)
        reader = CheckpointReader(model_dir)
        self.dtype = torch_dtype = torch_dtype_of(dtype, cfg.torch_dtype, dev)
        self.router: Router | None = None
        if expert_bounds:
            world_size = num_attention_ranks + len(expert_bounds)
            layout = ExpertLayout(expert_bounds, num_attention_ranks, world_size, dev)
            self.router = routed = Router(layout, cfg.hidden_size, cfg.moe_layers, torch_dtype, dev)
        else:
            routed = LocalExperts(cfg, reader, 0, cfg.num_experts, torch_dtype, dev)
        self.expert_load = ExpertLoad(routed, cfg.moe_layers, cfg.num_experts, dev)
        model = Llama4TextModel(cfg, reader, torch_dtype, self.expert_load, dev)
        images = ImageFeatureCache.create(cfg, reader, torch_dtype)  # None for text-only checkpoints; on CPU
        reader.close()
        graphs = bool(cuda_graph_batch_sizes) and dev.type == "cuda" and self.router is None
        # With graphs each pool has one more block, the padding rows' scratch block that no sequence owns.
        self.kv = KVCache(cfg, num_full_blocks + graphs, num_chunk_blocks + graphs, block_size, torch_dtype, dev)
        self.runner = ModelRunner(cfg, model, self.kv, images, None if self.router else routed)
        if graphs:
            self.runner.graphs = DecodeGraphs(self.runner, tuple(cuda_graph_batch_sizes), num_full_blocks,
                                              num_chunk_blocks)
        self.all_to_all_seconds: list[float] = []  # per step with sequences, since the last take_metrics

    def ready(self) -> dict:
        import ray

        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "kv_cache_bytes": self.kv.nbytes(), "torch_threads": torch.get_num_threads(),
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}

    def resident_bytes(self) -> dict[str, int]:
        """Bytes of the tensors this actor holds (`actors.model.resident`): all of them, the KV pools, and the
        routed experts (0 with expert actors)."""
        local = self.expert_load.routed
        return {"total": tensor_bytes(self), "kv_cache": sum(self.kv.nbytes().values()),
                "routed_experts": tensor_bytes(local) if isinstance(local, LocalExperts) else 0}

    def master_address(self) -> tuple[str, int]:
        return master_address()

    def join_group(self, master: tuple[str, int], rank: int, world_size: int, timeout_s: float,
                   transport: str = "collective") -> str:
        """Joins the process group and sets the router's transport (`make_exchange`); returns the backend."""
        backend = join(master, rank, world_size, timeout_s, self.device)
        self.router.exchange = make_exchange(transport, rank, world_size, self.router.layout.first_expert_rank,
                                             timeout_s, self.device)
        return backend

    def exchange_name(self) -> str:
        """The router's transport: "collective" (the process group's all_to_all) or "shm"; "" without experts."""
        return self.router.exchange.name if self.router else ""

    def exchange_stats(self) -> tuple[float, int]:
        """(seconds from dispatch to combined results, MoE-layer exchanges) since start."""
        return (self.router.exchange_seconds, self.router.exchanges) if self.router else (0.0, 0)

    def take_metrics(self) -> dict:
        """What this actor counted since the last call, for the engine's metrics: expert_tokens [MoE layers, E]
        (rows routed to each expert) and all_to_all_seconds (per step with sequences)."""
        seconds, self.all_to_all_seconds = self.all_to_all_seconds, []
        return {"expert_tokens": self.expert_load.take(), "all_to_all_seconds": seconds}

    def step(self, batch: StepBatch) -> list[SeqOutput] | list[list[SeqOutput]]:
        """The step's outputs, one per sequence; with batch.num_steps > 1 one such list per decode step. An
        error aborts the group's exchange first: the expert ranks' loops, waiting for this rank, raise too."""
        try:
            return self._step(batch)
        except BaseException:
            if self.router is not None:
                self.router.exchange.abort()
            raise

    def _step(self, batch: StepBatch) -> list[SeqOutput] | list[list[SeqOutput]]:
        if self.router is not None:
            self.router.set_micro_batches(batch.micro_batches, batch.moe_capacity)
        if not batch.seqs:
            if self.router is not None:
                for _ in range(batch.num_steps):
                    self.router.idle_step(batch.moe_capacity)  # every rank joins every collective
            return [] if batch.num_steps == 1 else [[] for _ in range(batch.num_steps)]
        run = self.runner.step if batch.num_steps == 1 else self.runner.multi_step
        if self.router is None:
            return run(batch)
        before = self.router.exchange_seconds
        outputs = run(batch)
        if len(self.all_to_all_seconds) < 100_000:  # bounded when nobody takes them
            self.all_to_all_seconds.append(self.router.exchange_seconds - before)
        return outputs
