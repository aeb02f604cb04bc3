"""Every text-model tensor a Llama 4 checkpoint must hold, with its shape from config.json. Used to check a
checkpoint before any actor starts loading it, so a bad directory fails fast with a ValueError."""

from __future__ import annotations

from llama4serve.actors.model.checkpoint import LM_HEAD, TEXT_PREFIX, CheckpointReader
from llama4serve.actors.model.config import ModelConfig
from llama4serve.actors.model.quantized import check_experts, check_linear, load_quant_format


def text_weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, hq, hkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    p = TEXT_PREFIX
    shapes: dict[str, tuple[int, ...]] = {p + "embed_tokens.weight": (cfg.vocab_size, h), p + "norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes[LM_HEAD] = (cfg.vocab_size, h)
    for i in range(cfg.num_hidden_layers):
        layer = f"{p}layers.{i}."
        shapes[layer + "input_layernorm.weight"] = (h,)
        shapes[layer + "post_attention_layernorm.weight"] = (h,)
        for name, shape in (("q", (hq * d, h)), ("k", (hkv * d, h)), ("v", (hkv * d, h)), ("o", (h, hq * d))):
            shapes[f"{layer}self_attn.{name}_proj.weight"] = shape
            if cfg.attention_bias:
                shapes[f"{layer}self_attn.{name}_proj.bias"] = shape[:1]
        f = layer + "feed_forward."
        if cfg.is_moe_layer(i):
            e, im = cfg.num_experts, cfg.intermediate_size
            shapes[f + "router.weight"] = (e, h)
            shapes[f + "experts.gate_up_proj"] = (e, h, 2 * im)
            shapes[f + "experts.down_proj"] = (e, im, h)
            prefix = f + "shared_expert."
        else:
            im = cfg.intermediate_size_mlp
            prefix = f
        shapes[prefix + "gate_proj.weight"] = (im, h)
        shapes[prefix + "up_proj.weight"] = (im, h)
        shapes[prefix + "down_proj.weight"] = (h, im)
    return shapes


def check_checkpoint(cfg: ModelConfig, reader: CheckpointReader) -> None:
    """Raises ValueError naming the first missing or mis-shaped tensor (reads only the shard headers). Linear
    weights and experts of a quantized checkpoint are checked in the layout its quantization_config implies."""
    fmt = load_quant_format(reader.model_dir)
    for name, shape in text_weight_shapes(cfg).items():
        if fmt is not None and name.endswith("experts.gate_up_proj"):
            check_experts(reader, fmt, name[: -len(".gate_up_proj")], shape[0], shape[1], shape[2] // 2)
            continue
        if fmt is not None and name.endswith("experts.down_proj"):
            continue
        if fmt is not None and name.endswith("_proj.weight"):
            check_linear(reader, fmt, name[: -len(".weight")], shape)
            continue
        if not reader.has(name):
            raise ValueError(f"{reader.model_dir}: tensor {name!r} is missing from the checkpoint")
        found = tuple(reader.shape(name))
        if found != shape:
            raise ValueError(f"{reader.model_dir}: tensor {name!r} has shape {found}; config.json implies {shape}")
