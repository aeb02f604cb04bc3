"""The fused batch-1 decode path (one native call per layer, actors/fused_decode.py) against the torch path it
replaces (actors/model.py), step by step through prompts that cross attention chunks. No Ray: the attention
actor class and the scheduler run in this process."""

from __future__ import annotations

import pytest
import torch

from hf_reference import MAVERICK_LIKE, SCOUT_LIKE, write_hf_checkpoint
from llama4serve.actors.attention import AttentionActor
from llama4serve.actors.batch import StepBatch
from llama4serve.actors.config import load_model_config
from llama4serve.cluster.block_manager import BlockManager
from llama4serve.cluster.sampling_params import SamplingParams
from llama4serve.cluster.scheduler import Scheduler, Sequence
from llama4serve.kernels import native

CONFIGS = {
    "scout-like": SCOUT_LIKE,
    "maverick-like": MAVERICK_LIKE,  # dense layers between MoE layers, NoPE every 4th layer
    "no-qk-norm-no-temperature": dict(SCOUT_LIKE, use_qk_norm=False, attn_temperature_tuning=False),
    "attention-bias": dict(MAVERICK_LIKE, attention_bias=True),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_fused_decode_matches_torch_path(name, tmp_path):
    if native.cpu_kernels() is None:
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    path = write_hf_checkpoint(tmp_path, CONFIGS[name], seed=3)
    cfg = load_model_config(path)
    actor = AttentionActor(str(path), "float32", num_full_blocks=32, num_chunk_blocks=16, block_size=8)
    runner = actor.runner
    assert runner.fused is not None
    blocks = BlockManager(32, 16, 8, cfg.attention_chunk_size, bool(cfg.full_layers), bool(cfg.chunked_layers))
    scheduler = Scheduler(blocks, max_num_seqs=1, max_num_batched_tokens=64)
    prompt = torch.randint(3, 300, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    seq = Sequence(0, prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), seed=0)
    scheduler.add(seq)
    decode_steps = 0
    while len(seq.output_ids) < 40:  # positions 13..52: crosses chunks at 16, 32 and 48
        (_, step), = scheduler.schedule()
        batch = StepBatch([step], moe_capacity=1)
        if len(step.token_ids) == 1:
            token_ids, meta = runner.build_meta(batch)
            with torch.inference_mode():
                reference = runner.model.forward(token_ids, meta, actor.kv)
            counts_before = actor.expert_load.counts.clone()
            fused = runner.fused.forward(step, actor.expert_load)
            torch.testing.assert_close(fused, reference, atol=2e-5, rtol=1e-4)
            assert int((actor.expert_load.counts - counts_before).sum()) == len(cfg.moe_layers)
            decode_steps += 1
        out, = actor.step(batch)  # the runner takes the fused path for decode steps
        seq.num_computed = step.end_pos
        blocks.finish_step(seq.seq_id)
        seq.output_ids.append(out.token_id)
    assert decode_steps == 39
