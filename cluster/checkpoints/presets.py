"""Named model presets: complete Hugging Face ``config.json`` dicts for random Llama 4 checkpoints.

Each preset is the dict transformers 5.23 writes for ``Llama4ForConditionalGeneration`` (derived lists such as
``moe_layers``, ``no_rope_layers`` and ``layer_types`` spelled out), without ``dtype``, which the checkpoint maker
adds. Special-token ids are those of ``tokenizer_files`` (the same tokenizer for every preset).

- ``tiny-scout``: Scout-like (every layer MoE, 16 experts, QK norm, llama3 RoPE scaling), 4 layers, hidden 64.
- ``tiny-maverick``: Maverick-like (MoE on odd layers, dense MLP elsewhere, 32 experts, no QK norm, plain RoPE).
- ``bench-small``: about 145 M parameters (hidden 512, 8 layers, 16 experts) for throughput measurements.

Every preset has a small vision tower (``vision_config``) whose shapes modeling_llama4 can run images through:
tiny presets 56 px tiles (4 ``<|patch|>`` tokens per tile), bench-small 112 px tiles (16 per tile).
"""

from __future__ import annotations

import copy

from llama4serve.cluster.checkpoints.tokenizer_files import BOS_TOKEN, PAD_TOKEN, special_token_id


def _text_config(*, vocab_size: int, hidden_size: int, intermediate_size: int, intermediate_size_mlp: int,
                 num_hidden_layers: int, num_attention_heads: int, num_key_value_heads: int, head_dim: int,
                 num_local_experts: int, interleave_moe_layer_step: int, use_qk_norm: bool, rope_parameters: dict,
                 attention_chunk_size: int, floor_scale: int, max_position_embeddings: int) -> dict:
    no_rope_layer_interval = 4
    no_rope_layers = [int((i + 1) % no_rope_layer_interval != 0) for i in range(num_hidden_layers)]
    moe_layers = list(range(interleave_moe_layer_step - 1, num_hidden_layers, interleave_moe_layer_step))
    return {
        "attention_bias": False,
        "attention_chunk_size": attention_chunk_size,
        "attention_dropout": 0.0,
        "attn_scale": 0.1,
        "attn_temperature_tuning": True,
        "bos_token_id": special_token_id(BOS_TOKEN),
        # Released Scout/Maverick: [<|end_of_text|>, <|eom|>, <|eot|>].
        "eos_token_id": [special_token_id(t) for t in ("<|end_of_text|>", "<|eom|>", "<|eot|>")],
        "floor_scale": floor_scale,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "interleave_moe_layer_step": interleave_moe_layer_step,
        "intermediate_size": intermediate_size,
        "intermediate_size_mlp": intermediate_size_mlp,
        "layer_types": ["chunked_attention" if r else "full_attention" for r in no_rope_layers],
        "max_position_embeddings": max_position_embeddings,
        "model_type": "llama4_text",
        "moe_layers": moe_layers,
        "no_rope_layer_interval": no_rope_layer_interval,
        "no_rope_layers": no_rope_layers,
        "num_attention_heads": num_attention_heads,
        "num_experts_per_tok": 1,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_key_value_heads,
        "num_local_experts": num_local_experts,
        "output_router_logits": False,
        "pad_token_id": special_token_id(PAD_TOKEN),
        "rms_norm_eps": 1e-05,
        "rope_parameters": rope_parameters,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "use_qk_norm": use_qk_norm,
        "vocab_size": vocab_size,
    }


def _vision_config(*, hidden_size: int, num_hidden_layers: int, num_attention_heads: int, image_size: int,
                   projector_dim: int) -> dict:
    # Consistency rules of modeling_llama4: the pixel-shuffle adapter's fc1 takes hidden_size / ratio**2 features,
    # which is the encoder's intermediate_size; fc2 is square (projector_input_dim == projector_output_dim), and
    # multi_modal_projector.linear_1 reads vision_output_dim == projector_output_dim features.
    pixel_shuffle_ratio = 0.5
    return {
        "attention_dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_size": hidden_size,
        "image_size": image_size,
        "initializer_range": 0.02,
        "intermediate_size": int(hidden_size / pixel_shuffle_ratio**2),
        "model_type": "llama4_vision_model",
        "multi_modal_projector_bias": False,
        "norm_eps": 1e-05,
        "num_attention_heads": num_attention_heads,
        "num_channels": 3,
        "num_hidden_layers": num_hidden_layers,
        "patch_size": 14,
        "pixel_shuffle_ratio": pixel_shuffle_ratio,
        "projector_dropout": 0.0,
        "projector_input_dim": projector_dim,
        "projector_output_dim": projector_dim,
        "rope_parameters": {"rope_theta": 10000, "rope_type": "default"},
        "vision_feature_select_strategy": "default",
        "vision_output_dim": projector_dim,
    }


def _llama4_config(text_config: dict, vision_config: dict) -> dict:
    return {
        "architectures": ["Llama4ForConditionalGeneration"],
        "boi_token_index": special_token_id("<|image_start|>"),
        "eoi_token_index": special_token_id("<|image_end|>"),
        "image_token_index": special_token_id("<|patch|>"),
        "model_type": "llama4",
        "text_config": text_config,
        "tie_word_embeddings": False,
        "vision_config": vision_config,
    }


TINY_VOCAB_SIZE = 608  # 605 tokenizer entries rounded up to a multiple of 8

# 56 px tiles of 4x4 patches of 14 px -> 4 <|patch|> tokens per tile after pixel shuffle; about 0.2 MB in float32.
_TINY_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56, projector_dim=64)

PRESETS: dict[str, dict] = {
    "tiny-scout": _llama4_config(
        _text_config(
            vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=32, intermediate_size_mlp=64,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=16,
            interleave_moe_layer_step=1, use_qk_norm=True,
            rope_parameters={"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 64, "rope_theta": 500000.0, "rope_type": "llama3"},
            attention_chunk_size=32, floor_scale=8, max_position_embeddings=4096,
        ),
        _vision_config(**_TINY_VISION),
    ),
    "tiny-maverick": _llama4_config(
        _text_config(
            vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=32, intermediate_size_mlp=128,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=32,
            interleave_moe_layer_step=2, use_qk_norm=False,
            rope_parameters={"rope_theta": 500000.0, "rope_type": "default"},
            attention_chunk_size=32, floor_scale=8, max_position_embeddings=4096,
        ),
        _vision_config(**_TINY_VISION),
    ),
    "bench-small": _llama4_config(
        _text_config(
            vocab_size=32000, hidden_size=512, intermediate_size=512, intermediate_size_mlp=1024,
            num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_local_experts=16,
            interleave_moe_layer_step=1, use_qk_norm=True,
            rope_parameters={"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_theta": 500000.0, "rope_type": "llama3"},
            attention_chunk_size=256, floor_scale=8192, max_position_embeddings=32768,
        ),
        _vision_config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=112, projector_dim=128),
    ),
}


def get_preset(name: str) -> dict:
    """A deep copy of the named preset's ``config.json`` dict (``ValueError`` naming the choices if unknown)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])
