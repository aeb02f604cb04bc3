"""Deployment configuration (pydantic, `extra="forbid"`, immutable)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EngineOptions(BaseModel):
    """How one model instance runs: topology, KV cache and batching limits (everything but the checkpoint)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attention_actors: int = Field(1, ge=1, le=64, description="Attention actors (data parallel over requests).")
    expert_actors: int = Field(0, ge=0, le=512, description="Expert shard actors; 0 keeps experts in the attention actor.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight and activation dtype; 'auto' takes the checkpoint's torch_dtype."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where each actor computes: 'cuda' on the GPU Ray gave it (fails at once naming CUDA when there "
        "is none), 'cpu', or 'auto' (cuda when Ray assigned the actor GPUs, else cpu). With dtype 'auto', a GPU "
        "runs bfloat16.",
    )
    cuda_graph_batch_sizes: tuple[int, ...] = Field(
        (1, 2, 4, 8, 16, 32, 64),
        description="Decode batch sizes captured as CUDA graphs on GPU actors holding all experts (a step runs as "
        "the smallest that fits; larger steps run eagerly); () turns CUDA graphs off.",
    )
    block_size: int | None = Field(
        None, ge=1, le=1024,
        description="Tokens per KV block; must divide attention_chunk_size. Default: the largest of 16, 8, 4, 2, 1 "
        "that divides it.",
    )
    kv_cache_tokens: int = Field(
        65536, ge=16, description="Token capacity of the full-attention (NoPE) KV pool of each attention actor."
    )
    num_full_blocks: int | None = Field(None, ge=1, description="Override: blocks in the full-attention pool.")
    num_chunk_blocks: int | None = Field(None, ge=1, description="Override: blocks in the chunked-attention pool.")
    enable_prefix_caching: bool = Field(
        True,
        description="Reuse the KV blocks of a cached prompt prefix (both pools; freed blocks stay cached until "
        "evicted, least recently used first) and route a request to the attention actor holding its longest one.",
    )
    max_model_len: int | None = Field(
        None, ge=1, description="Longest prompt + output; default min(max_position_embeddings, kv_cache_tokens)."
    )
    max_num_seqs: int = Field(64, ge=1, description="Sequences running at once per attention actor.")
    max_num_batched_tokens: int = Field(2048, ge=1, description="Tokens per step (chunked prefill budget).")
    num_scheduler_steps: int = Field(
        1, ge=1, le=64,
        description="Decode steps per data-plane call while every running sequence decodes and none waits "
        "(multi-step scheduling): fewer round trips; streamed tokens arrive in bursts of this many.",
    )
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads per actor; default: cores.")
    seed: int = Field(0, ge=0, description="Seed for requests that give none.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Placement-group strategy: PACK for one node, SPREAD across nodes."
    )
    num_cpus_per_actor: float = Field(1.0, ge=0, description="Logical CPUs reserved per data-plane actor.")
    num_gpus_per_actor: float | None = Field(
        None, ge=0, description="GPUs per actor; default 1 when the cluster has GPUs, else 0."
    )
    attention_resources: dict[str, float] = Field(
        default_factory=dict, description="Extra custom resources for each attention actor's bundle."
    )
    expert_resources: dict[str, float] = Field(
        default_factory=dict, description="Extra custom resources for each expert actor's bundle."
    )
    collective_timeout_s: float = Field(
        180.0, gt=0, description="Timeout of every collective and of every step: a dead peer raises, never hangs."
    )
    expert_transport: Literal["auto", "collective", "shm"] = Field(
        "auto", description="How MoE tokens move between attention and expert actors: 'collective' (the process "
        "group's all_to_all: gloo on CPU, NCCL on GPU), 'shm' (shared memory, every rank on one machine, CPU), "
        "'auto' (shm where it can run, else the collective).",
    )
    ping_pong: bool = Field(
        False, description="Decode steps of at least 8 rows (on the busiest attention actor) exchange each MoE "
        "layer's rows as two micro-batches, one's attention computing while the other's experts do (MegaScale-Infer); "
        "needs the shared-memory transport. Off by default: on CPUs the attention and expert actors share the cores "
        "(each phase takes them all), so there is no idle time to fill; docs/benchmarks.md has the numbers.",
    )
    placement_timeout_s: float = Field(120.0, gt=0, description="How long to wait for Ray to place the actors.")
    max_actor_restarts: int = Field(
        3, ge=0, le=100,
        description="Times a dead data-plane actor is replaced (in-flight requests continue) within "
        "actor_restart_window_s; one more failure takes the instance down. 0: no recovery (fail-stop).",
    )
    actor_restart_window_s: float = Field(
        600.0, gt=0, description="Window of the restart budget max_actor_restarts, per actor, in seconds."
    )
    max_images_per_request: int = Field(8, ge=0, description="Most images one request may carry (0: no images).")
    max_image_bytes: int = Field(
        20 * 2**20, ge=1, description="Largest accepted image file, in bytes (after base64 decoding)."
    )
    max_image_pixels: int = Field(
        25_000_000, ge=4, description="Most decoded pixels (width x height) of one image; larger images are refused."
    )


class EngineConfig(EngineOptions):
    """One model instance: its checkpoint plus the options it runs with."""

    model: str = Field(description="Directory of a Llama 4 checkpoint in the Hugging Face layout.")


def resolve_max_model_len(options: EngineOptions, max_position_embeddings: int) -> int:
    """The longest prompt + output one instance accepts: max_model_len, else what the model and cache allow."""
    return options.max_model_len or min(max_position_embeddings, options.kv_cache_tokens)
