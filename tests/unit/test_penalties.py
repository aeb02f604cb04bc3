"""apply_penalties against a per-token loop written from the OpenAI and transformers definitions."""

import torch

from llama4serve.kernels.sampling import apply_penalties


def _reference(logits, prompt_ids, output_ids, presence, frequency, repetition):
    out = logits.clone()
    for token in set(prompt_ids) | set(output_ids):  # transformers RepetitionPenaltyLogitsProcessor
        out[token] = out[token] / repetition if out[token] > 0 else out[token] * repetition
    for token in set(output_ids):  # OpenAI: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
        out[token] -= output_ids.count(token) * frequency + presence
    return out


def test_penalties_match_the_definitions():
    g = torch.Generator().manual_seed(0)
    vocab = 50
    logits = torch.randn(3, vocab, generator=g)
    rows = [([1, 2, 2, 7], [2, 9, 9, 9], 0.5, 0.3, 1.4), ([], [4, 4], -1.0, 2.0, 1.0), ([3], [], 0.0, 0.0, 0.7)]
    prompt_mask = torch.zeros(3, vocab, dtype=torch.bool)
    counts = torch.zeros(3, vocab)
    for r, (prompt, output, *_rest) in enumerate(rows):
        prompt_mask[r, prompt] = True
        for t in output:
            counts[r, t] += 1
    got = apply_penalties(logits, prompt_mask, counts, *(torch.tensor([row[i] for row in rows]) for i in (2, 3, 4)))
    for r, (prompt, output, presence, frequency, repetition) in enumerate(rows):
        torch.testing.assert_close(got[r], _reference(logits[r], prompt, output, presence, frequency, repetition))
