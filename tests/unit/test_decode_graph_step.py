"""The decode step a CUDA graph captures (`actors/runner/cuda_graphs.py`: static buffers, plans rebuilt inside
the step), run eagerly on CPU, equals the model runner's eager step, across attention-chunk boundaries and with
padding rows (batch 3 in the graph of 4)."""

from __future__ import annotations

import torch

from llama4serve.actors.attention_actor import AttentionActor
from llama4serve.actors.model.config import load_model_config
from llama4serve.actors.runner.cuda_graphs import DecodeGraphs
from llama4serve.actors.step_io import SamplingSpec, SeqStep, StepBatch
from llama4serve.cluster.checkpoints.maker import write_checkpoint

BLOCK, MAX_LEN = 8, 96


def test_graph_step_equals_eager_across_chunk_boundaries(tmp_path):
    write_checkpoint(tmp_path, "tiny-scout")
    cfg = load_model_config(tmp_path)
    chunk = cfg.attention_chunk_size
    full_per, chunk_per, chunks = MAX_LEN // BLOCK, chunk // BLOCK, MAX_LEN // chunk + 1
    num_seqs = 3
    actor = AttentionActor(str(tmp_path), "float32", full_per * num_seqs + 1, chunk_per * chunks * num_seqs + 1,
                           BLOCK, device="cpu")
    runner = actor.runner
    graphs = DecodeGraphs(runner, (1, 4), full_per * num_seqs, chunk_per * chunks * num_seqs, capture=False)

    def step(b: int, ids: list[int], start: int) -> SeqStep:
        def chunk_blocks(pos):
            first = (b * chunks + pos // chunk) * chunk_per
            return list(range(first, first + chunk_per))

        full = list(range(b * full_per, (b + 1) * full_per))
        return SeqStep(b, ids, start, full, chunk_blocks(start), chunk_blocks(start + len(ids)), SamplingSpec())

    prompts = [list(range(3, 3 + n)) for n in (29, 5, 17)]
    with torch.inference_mode():
        outs = runner.step(StepBatch([step(b, p, 0) for b, p in enumerate(prompts)], sum(map(len, prompts))))
        tokens = [[o.token_id] for o in outs]
        compared, positions = 0, set()
        for _ in range(40):
            batch = StepBatch([step(b, [t[-1]], len(p) + len(t) - 1) for b, (p, t) in enumerate(zip(prompts, tokens))],
                              num_seqs)
            eager = runner.model.logits(runner.hidden_states(batch))
            if graphs.applies(batch, None):
                torch.testing.assert_close(graphs.logits(batch), eager, atol=1e-4, rtol=1e-4)
                compared += 1
                positions.update(s.start_pos for s in batch.seqs)
            for t, nxt in zip(tokens, eager.argmax(-1).tolist()):
                t.append(nxt)
    assert compared >= 35 and {chunk, chunk + 1, 2 * chunk}.issubset(positions)
