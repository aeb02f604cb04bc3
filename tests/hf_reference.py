"""The reference: random Llama 4 checkpoints written by transformers itself, and its outputs (no KV cache)."""

from __future__ import annotations

from pathlib import Path

import torch

SCOUT_LIKE = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=32,
    intermediate_size_mlp=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=16,
    interleave_moe_layer_step=1,
    use_qk_norm=True,
    attention_chunk_size=16,
    attn_temperature_tuning=True,
    floor_scale=8,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    initializer_range=0.08,
    eos_token_id=[2],
    bos_token_id=1,
)
MAVERICK_LIKE = dict(
    SCOUT_LIKE,
    num_local_experts=8,
    interleave_moe_layer_step=2,
    use_qk_norm=False,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
VISION = dict(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vision_output_dim=64,
    image_size=56, patch_size=14, projector_input_dim=64, projector_output_dim=64,
)


def write_hf_checkpoint(path: Path, text: dict, *, tie: bool = False, dtype=torch.float32, seed: int = 0,
                        max_shard_size: str = "200KB") -> Path:
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Llama4Config(text_config=dict(text, tie_word_embeddings=tie), vision_config=VISION,
                       image_token_index=300, boi_token_index=301, eoi_token_index=302, tie_word_embeddings=tie)
    model = Llama4ForConditionalGeneration(cfg).to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return Path(path)


def load_hf(path: Path):
    from transformers import Llama4ForConditionalGeneration

    return Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, from one full forward without a cache. [len(ids) - 1]"""
    logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    return torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation, recomputed from scratch each step (no cache quirks involved)."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


def perturb_parameters(module: torch.nn.Module, seed: int) -> None:
    """transformers initialises biases to 0 and norms to 1; make every parameter count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                p.copy_(0.05 * noise)
            elif "norm" in name:
                p.copy_(1 + 0.1 * noise)
            elif p.dim() == 2:
                p.copy_(noise * p.shape[1] ** -0.5)
            else:
                p.copy_(noise * p.shape[0] ** -0.5)
