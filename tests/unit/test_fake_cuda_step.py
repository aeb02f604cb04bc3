"""A prefill and a decode step of tiny-scout and tiny-maverick on device="cuda" under FakeTensorMode, for 1x0
(the attention actor's model runner, experts in process) and each half of 1x2 (attention side with the router,
expert side). Fake tensors carry devices and shapes but no values, so a device mismatch raises, and so does any
data-dependent op (`.item()`, `.tolist()`, `nonzero`, a value-dependent shape) in the layer loop.

No Ray: the actors are built in process, `resolve_device` answers cuda:0 and `torch.cuda.set_device` is a
no-op. Checkpoint reads run outside the mode (safetensors builds real CPU tensors in C++) and enter it as fake CPU
tensors; the model's `.to(device)` makes each a fake cuda tensor. The process group is stood in for by a fake `all_to_all_single` that checks both tensors are on the
GPU and that the split sizes add up to their rows (fake outputs hold no data, so nothing is copied).
"""

from __future__ import annotations

import pytest
import torch
from fake_cuda import fake_cuda_mode

from llama4serve.actors import attention_actor
from torch._subclasses import fake_tensor
from torch._subclasses.fake_tensor import unset_fake_temporarily

from llama4serve.actors.attention_actor import AttentionActor
from llama4serve.actors.model.checkpoint import CheckpointReader
from llama4serve.actors.expert_actor import ExpertShardActor
from llama4serve.actors.model.config import load_model_config
from llama4serve.actors.model.experts import expert_split
from llama4serve.actors.parallel import router
from llama4serve.actors.parallel.router import ExpertLayout
from llama4serve.actors.runner.cuda_graphs import DecodeGraphs
from llama4serve.actors.step_io import SamplingSpec, SeqStep, StepBatch
from llama4serve.cluster.checkpoints.maker import write_checkpoint

BLOCK = 8


@pytest.fixture(scope="module", params=["tiny-scout", "tiny-maverick"])
def checkpoint(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    write_checkpoint(out, request.param)
    return str(out)


@pytest.fixture
def on_fake_cuda(monkeypatch):
    monkeypatch.setattr(attention_actor, "resolve_device", lambda requested, gpu_ids: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    # Fake mode keeps torch.tensor() results of at most one element as real constants and would copy them to
    # the (absent) GPU for real; none are needed as constants here.
    monkeypatch.setattr(fake_tensor, "CONSTANT_NUMEL_LIMIT", -1)
    mode = fake_cuda_mode()
    for name in ("get", "get_rows"):
        def read(self, *args, _read=getattr(CheckpointReader, name), **kwargs):
            with unset_fake_temporarily():
                tensor = _read(self, *args, **kwargs)
            return mode.from_tensor(tensor)  # a fake CPU tensor

        monkeypatch.setattr(CheckpointReader, name, read)
    calls = []

    def all_to_all_single(output, input, output_split_sizes, input_split_sizes):
        assert output.device.type == "cuda" and input.device.type == "cuda", (output.device, input.device)
        assert sum(output_split_sizes) == output.shape[0] and sum(input_split_sizes) == input.shape[0]
        calls.append((output.shape[0], input.shape[0]))

    monkeypatch.setattr(router.dist, "all_to_all_single", all_to_all_single)
    with mode, torch.inference_mode():
        yield calls


def _steps(chunk: int) -> tuple[StepBatch, StepBatch]:
    """(prefill, decode) of two sequences. Sequence 0's prompt crosses the first attention-chunk boundary (the
    chunk pool's padded path), sequence 1's stays in its chunk (the paged path); decode is paged for both."""
    n0, n1 = chunk + 5, 7
    per_chunk = chunk // BLOCK
    full0, full1 = list(range(0, 8)), list(range(8, 16))
    chunk0 = [list(range(0, per_chunk)), list(range(per_chunk, 2 * per_chunk))]
    chunk1 = list(range(2 * per_chunk, 3 * per_chunk))
    greedy = SamplingSpec(logprobs=2)
    prefill = StepBatch([
        SeqStep(0, list(range(3, 3 + n0)), 0, full0, chunk0[0], chunk0[1], greedy),
        SeqStep(1, list(range(5, 5 + n1)), 0, full1, chunk1, chunk1, greedy),
    ], moe_capacity=n0 + n1)
    decode = StepBatch([
        SeqStep(0, [9], n0, full0, chunk0[1], chunk0[1], greedy, num_generated=1),
        SeqStep(1, [11], n1, full1, chunk1, chunk1, greedy, num_generated=1),
    ], moe_capacity=2)
    return prefill, decode


def _run_attention_side(actor: AttentionActor, chunk: int) -> None:
    runner = actor.runner
    assert runner.portable and runner.fused is None and runner.flex_compiled
    runner.flex_compiled = False  # the compiled kernel needs a real GPU (scripts/gpu_check.py); same math
    for batch in _steps(chunk):
        hidden = runner.hidden_states(batch)  # [T, H]
        assert hidden.device.type == "cuda" and hidden.dtype == torch.bfloat16
        last = [len(batch.seqs[0].token_ids) - 1, hidden.shape[0] - 1]
        logits = runner.model.logits(hidden[last])
        assert logits.device.type == "cuda"
    for pool in actor.kv.k.values():
        assert pool.device.type == "cuda"


def test_attention_actor_with_local_experts(checkpoint, on_fake_cuda):
    cfg = load_model_config(checkpoint)
    actor = AttentionActor(checkpoint, "auto", 32, 16, BLOCK, device="cuda", cuda_graph_batch_sizes=None)
    assert actor.device.type == "cuda" and actor.dtype == torch.bfloat16  # dtype auto: bf16 on a GPU
    experts = actor.expert_load.routed
    assert all(w.device.type == "cuda" for w in experts.stacked_gate_up.values())
    _run_attention_side(actor, cfg.attention_chunk_size)
    assert not on_fake_cuda  # no process group in 1x0


def test_decode_graph_step_runs_on_static_buffers(checkpoint, on_fake_cuda):
    """The function a decode CUDA graph captures, run eagerly (capture needs a real GPU): padded to batch 4."""
    cfg = load_model_config(checkpoint)
    actor = AttentionActor(checkpoint, "auto", 32, 16, BLOCK, device="cuda", cuda_graph_batch_sizes=None)
    actor.runner.flex_compiled = False
    graphs = DecodeGraphs(actor.runner, (1, 4), 31, 15, capture=False)
    prefill, decode = _steps(cfg.attention_chunk_size)
    assert graphs.applies(decode, None) and not graphs.applies(prefill, None)
    logits = graphs.logits(decode)
    assert logits.shape == (2, cfg.vocab_size) and logits.device.type == "cuda"


def test_attention_actor_with_router(checkpoint, on_fake_cuda):
    cfg = load_model_config(checkpoint)
    bounds = expert_split(cfg.num_experts, 2)
    actor = AttentionActor(checkpoint, "auto", 32, 16, BLOCK, None, bounds, 1, device="cuda")
    assert actor.runner.graphs is None  # expert parallel: no decode graphs (capacity varies per step)
    _run_attention_side(actor, cfg.attention_chunk_size)
    assert len(on_fake_cuda) == 2 * 2 * len(cfg.moe_layers)  # dispatch + combine per MoE layer, two steps
    actor.router.idle_step(4)


@pytest.mark.parametrize("shard", [0, 1])
def test_expert_actor(checkpoint, on_fake_cuda, shard):
    cfg = load_model_config(checkpoint)
    bounds = expert_split(cfg.num_experts, 2)
    actor = ExpertShardActor(checkpoint, "auto", bounds, shard, device="cuda")
    actor.layout = ExpertLayout(bounds, 1, 3, actor.device)  # what join_group sets, without a process group
    for capacity in (cfg.attention_chunk_size + 12, 2):  # the prefill's and the decode's
        rows = actor.serve_step(capacity)
        assert rows.device.type == "cuda"
    assert len(on_fake_cuda) == 2 * 2 * len(cfg.moe_layers)
