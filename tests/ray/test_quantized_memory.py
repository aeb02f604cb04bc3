"""Quantized weights stay quantized in the actors: an attention or expert actor holds at most 1.15x the quantized
weight bytes plus its KV cache, for fp8 (Meta's fbgemm layout) and int4 (compressed-tensors W4A16), on the native
CPU path and on the portable torch path (what a GPU runs), after it has served a step.

Method: `actors.model.resident.tensor_bytes` walks everything an actor object references (model, experts, KV
pools, router buffers, scratch) and sums the distinct tensor storages, a storage counted whole once however many
views share it; a float copy kept anywhere (e.g. experts dequantized at load) counts. The expectation comes from
the checkpoint's safetensors headers alone: quantized codes at their stored size (fp8 1 byte, int4 half a byte),
scales as float32, every float tensor at the compute dtype (float32), only the expert slices an actor owns. RSS
growth is not used: on these tiny checkpoints (well under 1 MB of weights) the megabytes that imports and the
allocator add would hide any copy. The routed experts alone are held to the same bound, since on tiny presets the
float embeddings and lm_head are most of the bytes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import ray

from llama4serve.actors.attention_actor import AttentionActor
from llama4serve.actors.expert_actor import ExpertShardActor
from llama4serve.actors.model.checkpoint import CheckpointReader
from llama4serve.actors.model.config import load_model_config
from llama4serve.actors.model.experts import expert_split, portable_path
from llama4serve.actors.step_io import SamplingSpec, SeqStep, StepBatch
from llama4serve.cluster import LLM, SamplingParams
from llama4serve.cluster.checkpoints.maker import write_checkpoint

LIMIT = 1.15
STORED = {"F8_E4M3": 1, "I32": 4, "I8": 1, "U8": 1}  # quantized codes, held as stored


def _expert_of(name: str) -> int | None:
    """Expert index of a per-expert tensor (`...experts.7.gate_proj...`), -1 for a fused one, None otherwise."""
    if ".feed_forward.experts." not in name:
        return None
    part = name.split(".feed_forward.experts.")[1].split(".")[0]
    return int(part) if part.isdigit() else -1


def expected_bytes(model_dir: Path, experts: tuple[int, int] | None, others: bool) -> tuple[int, int]:
    """(all weights, routed experts) an actor holding the routed experts [e0, e1) (None: none) and, with
    `others`, every other tensor should hold, from the checkpoint headers."""
    reader = CheckpointReader(model_dir)
    total = routed = 0
    for name in reader.weight_map:
        if name.endswith(".weight_shape"):
            continue  # the int4 shape record, not held
        dtype, numel = reader.dtype_name(name), math.prod(reader.shape(name))
        nbytes = numel * STORED.get(dtype, 4)  # float tensors and scales: float32
        expert = _expert_of(name)
        if expert is None:
            total += nbytes if others else 0
            continue
        if experts is None:
            continue
        e0, e1 = experts
        if expert == -1:  # fused [E, ...]: the actor's rows only
            nbytes = nbytes * (e1 - e0) // reader.shape(name)[0]
        elif not e0 <= expert < e1:
            continue
        total, routed = total + nbytes, routed + nbytes
    reader.close()
    return total, routed


def check(held: dict[str, int], expect: tuple[int, int], what: str) -> None:
    total, routed = expect
    kv = held.get("kv_cache", 0)
    assert held["total"] <= LIMIT * total + kv, (
        f"{what}: holds {held['total']} tensor bytes; at most {LIMIT} x {total} quantized weight bytes + {kv} KV")
    assert held["total"] >= total + kv, f"{what}: holds {held['total']} bytes, less than its weights ({total}) + KV"
    assert held["routed_experts"] <= LIMIT * routed, (
        f"{what}: routed experts hold {held['routed_experts']} bytes; at most {LIMIT} x {routed} quantized bytes")


@pytest.fixture(scope="module", params=[("fp8", "tiny-maverick"), ("int4", "tiny-scout")], ids=lambda p: p[0])
def quantized(request, tmp_path_factory):
    scheme, preset = request.param
    return write_checkpoint(tmp_path_factory.mktemp(scheme), preset, quantize=scheme)


def _prefill(num_tokens: int) -> StepBatch:
    blocks = [0, 1, 2, 3][: -(-num_tokens // 8)]  # block size 8
    return StepBatch([SeqStep(0, list(range(3, 3 + num_tokens)), 0, blocks, [], blocks, SamplingSpec())],
                     moe_capacity=num_tokens)


def test_actors_in_this_process_hold_quantized_bytes(quantized):
    """AttentionActor with every expert (1x0) and the two ExpertShardActors of 1x2, built in this process on
    whichever path it runs (the native kernels here; the portable path in tests/parity/test_portable_path.py's
    child run)."""
    cfg = load_model_config(quantized)
    attention = AttentionActor(str(quantized), "float32", 4, 4, 8, device="cpu")
    attention.runner.step(_prefill(11))  # the portable path dequantizes each layer's experts here, then drops them
    check(attention.resident_bytes(), expected_bytes(quantized, (0, cfg.num_experts), True), "attention 1x0")
    bounds = expert_split(cfg.num_experts, 2)
    for shard, bound in enumerate(bounds):
        actor = ExpertShardActor(str(quantized), "float32", bounds, shard, device="cpu")
        check(actor.resident_bytes(), expected_bytes(quantized, bound, False), f"expert {shard}")
    if os.environ.get("LLAMA4SERVE_NATIVE_KERNELS") == "0":
        assert portable_path("cpu")


def test_ray_actors_hold_quantized_bytes(ray_session, quantized):
    """The deployed actors, 1x0 and 1x2, after serving requests."""
    cfg = load_model_config(quantized)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    for experts in (0, 2):
        with LLM(str(quantized), expert_actors=experts, dtype="float32", block_size=8) as llm:
            llm.generate([[5, 6, 7, 8, 9], list(range(3, 20))], params)
            plane = llm.engine.data_plane
            held = ray.get(plane.attention[0].resident_bytes.remote(), timeout=60)
            check(held, expected_bytes(quantized, None if experts else (0, cfg.num_experts), True),
                  f"attention 1x{experts}")
            bounds = expert_split(cfg.num_experts, experts) if experts else []
            for shard, (actor, bound) in enumerate(zip(plane.experts, bounds)):
                held = ray.get(actor.resident_bytes.remote(), timeout=60)
                check(held, expected_bytes(quantized, bound, False), f"expert {shard} of 1x{experts}")
