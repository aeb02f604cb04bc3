"""The fused batch-1 decode path (one native call per layer, actors/runner/fused_decode.py) against the torch path it
replaces (actors/model/text_model.py), step by step through prompts that cross attention chunks. No Ray: the attention
actor class and the scheduler run in this process."""

from __future__ import annotations

import pytest
import torch

from hf_reference import MAVERICK_LIKE, SCOUT_LIKE, write_hf_checkpoint
from llama4serve.actors.attention_actor import AttentionActor
from llama4serve.actors.step_io import StepBatch
from llama4serve.actors.model.config import load_model_config
from llama4serve.actors.runner.fused_decode import FusedDecode
from llama4serve.cluster.engine.block_manager import BlockManager
from llama4serve.cluster.sampling_params import SamplingParams
from llama4serve.cluster.engine.scheduler import Scheduler, Sequence
from llama4serve.kernels import native

CONFIGS = {
    "scout-like": SCOUT_LIKE,
    "maverick-like": MAVERICK_LIKE,  # dense layers between MoE layers, NoPE every 4th layer
    "no-qk-norm-no-temperature": dict(SCOUT_LIKE, use_qk_norm=False, attn_temperature_tuning=False),
    "attention-bias": dict(MAVERICK_LIKE, attention_bias=True),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_fused_decode_matches_torch_path(name, tmp_path):
    """Three sequences of different lengths decode side by side (positions up to 71: several chunk boundaries,
    16 tokens per chunk); at every all-decode step the fused path gives the torch path's hidden states, and each
    row bit for bit what that sequence gives alone. So does the path split at the router (what an attention actor
    with expert actors runs; here the routed experts are the actor's own, behind the same `start` protocol), also
    with ping-pong micro-batches."""
    if native.cpu_kernels() is None:
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    path = write_hf_checkpoint(tmp_path, CONFIGS[name], seed=3)
    cfg = load_model_config(path)
    actor = AttentionActor(str(path), "float32", num_full_blocks=64, num_chunk_blocks=32, block_size=8)
    runner = actor.runner
    assert runner.fused is not None
    split = FusedDecode.create(cfg, runner.model, actor.kv, None, runner.inv_freq)
    assert split.split
    experts = actor.expert_load.routed  # the actor's LocalExperts
    blocks = BlockManager(64, 32, 8, cfg.attention_chunk_size, bool(cfg.full_layers), bool(cfg.chunked_layers))
    scheduler = Scheduler(blocks, max_num_seqs=3, max_num_batched_tokens=64)
    g = torch.Generator().manual_seed(1)
    seqs = [Sequence(i, torch.randint(3, 300, (n,), generator=g).tolist(),
                     SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), seed=0)
            for i, n in enumerate((13, 5, 31))]
    for seq in seqs:
        scheduler.add(seq)
    decode_steps = 0
    while scheduler.has_work():
        scheduled = scheduler.schedule()
        batch = StepBatch([step for _, step in scheduled], moe_capacity=len(scheduled))
        if all(len(step.token_ids) == 1 for step in batch.seqs):
            token_ids, meta = runner.build_meta(batch)
            with torch.inference_mode():
                reference = runner.model.forward(token_ids, meta, actor.kv)
            counts_before = actor.expert_load.counts.clone()
            fused = runner.fused.forward(batch.seqs, actor.expert_load)
            torch.testing.assert_close(fused, reference, atol=2e-5, rtol=1e-4)
            assert int((actor.expert_load.counts - counts_before).sum()) == len(cfg.moe_layers) * len(batch.seqs)
            for row, step in enumerate(batch.seqs):
                assert torch.equal(runner.fused.forward([step], actor.expert_load)[0], fused[row])
            split_out = split.forward(batch.seqs, actor.expert_load, capacity=len(batch.seqs) + 2)
            torch.testing.assert_close(split_out, reference, atol=2e-5, rtol=1e-4)
            assert torch.equal(split.forward(batch.seqs[-1:], actor.expert_load)[0], split_out[-1])
            experts.micro_batches = 2  # ping-pong: the rows in two halves that take turns, the same bits
            assert torch.equal(split.forward(batch.seqs, actor.expert_load, len(batch.seqs)), split_out)
            del experts.micro_batches
            decode_steps += 1
        outputs = actor.step(batch)  # the runner takes the fused path for all-decode steps
        for (seq, step), out in zip(scheduled, outputs):
            seq.num_computed = step.end_pos
            blocks.finish_step(seq.seq_id)
            seq.output_ids.append(out.token_id)
            if len(seq.output_ids) == seq.params.max_tokens:
                scheduler.finish(seq, "length")
    assert decode_steps == 39
