"""Sampling from logits: greedy, temperature, top-k, top-p, driven by caller-supplied uniforms.

Shapes: B rows, V vocabulary. The caller draws one uniform per row from that row's own generator, so a row's
token never depends on which other rows share the batch.
"""

import torch


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniform: torch.Tensor,
) -> torch.Tensor:
    """logits [B, V]; temperature [B] (<= 0 means greedy); top_k [B] (<= 0 means off); top_p [B] in (0, 1];
    uniform [B] in [0, 1). Returns token ids [B] (int64) by inverse-CDF over the filtered distribution."""
    greedy_ids = logits.argmax(dim=-1)
    greedy = temperature <= 0
    if bool(greedy.all()):
        return greedy_ids
    vocab = logits.shape[-1]
    temp = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    sorted_logits, sorted_ids = (logits.float() / temp[:, None]).sort(dim=-1, descending=True)  # [B, V]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    keep = ranks < k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    # top-p: keep a token while the mass strictly before it is below top_p (the first token always stays).
    keep &= (probs.cumsum(dim=-1) - probs) < top_p[:, None].float()
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    cdf = probs.cumsum(dim=-1)
    choice = torch.searchsorted(cdf, (uniform.float() * cdf[:, -1])[:, None]).clamp(max=vocab - 1)
    sampled = sorted_ids.gather(1, choice).squeeze(1)
    return torch.where(greedy, greedy_ids, sampled)


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probabilities of the model's distribution (raw logits, before temperature and filtering).

    logits [N, V], token_ids [N] -> (logprob of each token [N], top-n logprobs [N, n] and their ids [N, n]
    when num_top > 0, else None, None).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, token_ids[:, None]).squeeze(1)
    if num_top <= 0:
        return chosen, None, None
    top_values, top_ids = logp.topk(min(num_top, logits.shape[-1]), dim=-1)
    return chosen, top_values, top_ids


def apply_penalties(
    logits: torch.Tensor,
    prompt_mask: torch.Tensor,
    output_counts: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    repetition: torch.Tensor,
) -> torch.Tensor:
    """OpenAI presence/frequency penalties and the transformers/vLLM repetition penalty.

    logits [B, V]; prompt_mask [B, V] bool (token occurs in the prompt); output_counts [B, V] (occurrences among
    the generated tokens); presence, frequency, repetition [B]. Returns new logits [B, V]. The repetition
    penalty touches every token seen in the prompt or output (divide positive logits, multiply negative ones);
    presence and frequency touch generated tokens only: logit -= frequency * count + presence * (count > 0).
    """
    logits = logits.float()
    counts = output_counts.to(logits.dtype)
    generated = output_counts > 0
    rep = repetition[:, None].to(logits.dtype)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(prompt_mask | generated, penalized, logits)
    return logits - frequency[:, None].to(logits.dtype) * counts - presence[:, None].to(logits.dtype) * generated
