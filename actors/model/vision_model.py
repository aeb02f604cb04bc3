"""The Llama 4 vision tower for one process: weights by checkpoint name (`vision_model.*`,
`multi_modal_projector.linear_1.weight`), tiles -> projected image features, and the merge into text embeddings.

Shapes: N tiles, C channels, S tile side, T = tokens_per_tile (<|patch|> tokens per tile after pixel shuffle),
Hv vision hidden, H text hidden, L prompt tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama4serve.kernels.vision import encoder_layer, patch_embed, pixel_shuffle, vision_adapter, vision_rope_freqs_cis
from llama4serve.actors.model.checkpoint import CheckpointReader
from llama4serve.actors.model.config import VisionConfig

VISION_PREFIX = "vision_model."
PROJECTOR = "multi_modal_projector.linear_1.weight"


def vision_weight_shapes(cfg: VisionConfig, text_hidden_size: int) -> dict[str, tuple[int, ...]]:
    """Every vision tensor of a checkpoint with its shape, named as Llama4ForConditionalGeneration saves them."""
    hv, inter, p = cfg.hidden_size, cfg.intermediate_size, VISION_PREFIX
    shapes: dict[str, tuple[int, ...]] = {
        p + "class_embedding": (hv,),
        p + "positional_embedding_vlm": (cfg.patches_per_side**2 + 1, hv),
        p + "patch_embedding.linear.weight": (hv, cfg.num_channels * cfg.patch_size**2),
    }
    for norm in ("layernorm_pre", "layernorm_post"):
        shapes[f"{p}{norm}.weight"] = shapes[f"{p}{norm}.bias"] = (hv,)
    for i in range(cfg.num_hidden_layers):
        layer = f"{p}model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{layer}self_attn.{proj}.weight"] = (hv, hv)
            shapes[f"{layer}self_attn.{proj}.bias"] = (hv,)
        shapes[layer + "mlp.fc1.weight"], shapes[layer + "mlp.fc1.bias"] = (inter, hv), (inter,)
        shapes[layer + "mlp.fc2.weight"], shapes[layer + "mlp.fc2.bias"] = (hv, inter), (hv,)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"{layer}{norm}.weight"] = shapes[f"{layer}{norm}.bias"] = (hv,)
    shapes[p + "vision_adapter.mlp.fc1.weight"] = (cfg.projector_input_dim, inter)
    shapes[p + "vision_adapter.mlp.fc2.weight"] = (cfg.projector_output_dim, cfg.projector_output_dim)
    shapes[PROJECTOR] = (text_hidden_size, cfg.vision_output_dim)
    return shapes


class VisionEncoder:
    """Vision tower + multi_modal_projector (Llama4ForConditionalGeneration.get_image_features, then
    multi_modal_projector). Holds about 0.8 B parameters at full size (Scout/Maverick); tiny presets: a few MB."""

    def __init__(self, cfg: VisionConfig, reader: CheckpointReader, dtype: torch.dtype,
                 text_hidden_size: int | None = None):
        cfg.validate()
        self.cfg = cfg
        self.dtype = dtype
        if text_hidden_size is None:  # the projector's rows are the text hidden size
            text_hidden_size = reader.shape(PROJECTOR)[0]
        self.text_hidden_size = text_hidden_size
        shapes = vision_weight_shapes(cfg, text_hidden_size)

        def get(name: str) -> torch.Tensor:
            return reader.get(name, dtype, shapes[name])

        p = VISION_PREFIX
        self.patch_weight = get(p + "patch_embedding.linear.weight")  # [Hv, C*P*P]
        self.class_embedding = get(p + "class_embedding")  # [Hv]
        self.positional_embedding = get(p + "positional_embedding_vlm")  # [G*G + 1, Hv]
        self.pre_norm = (get(p + "layernorm_pre.weight"), get(p + "layernorm_pre.bias"))
        self.post_norm = (get(p + "layernorm_post.weight"), get(p + "layernorm_post.bias"))
        self.layers: list[dict[str, torch.Tensor]] = []
        for i in range(cfg.num_hidden_layers):
            layer = f"{p}model.layers.{i}."
            w = {f"{n}_{kind}": get(f"{layer}self_attn.{n}_proj.{kind}") for n in "qkvo" for kind in ("weight", "bias")}
            for fc in ("fc1", "fc2"):
                w[f"{fc}_weight"], w[f"{fc}_bias"] = get(f"{layer}mlp.{fc}.weight"), get(f"{layer}mlp.{fc}.bias")
            for ours, theirs in (("input_norm", "input_layernorm"), ("post_norm", "post_attention_layernorm")):
                w[f"{ours}_weight"], w[f"{ours}_bias"] = get(f"{layer}{theirs}.weight"), get(f"{layer}{theirs}.bias")
            self.layers.append(w)
        self.adapter_fc1 = get(p + "vision_adapter.mlp.fc1.weight")  # [proj_in, Hv / r^2]
        self.adapter_fc2 = get(p + "vision_adapter.mlp.fc2.weight")  # [proj_out, proj_out]
        self.projector = get(PROJECTOR)  # [H, vision_output_dim]
        self.freqs_cis = vision_rope_freqs_cis(cfg.patches_per_side, cfg.head_dim, cfg.rope_theta)  # [G*G+1, Dh/2]

    @property
    def tokens_per_tile(self) -> int:
        return self.cfg.tokens_per_tile

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C, S, S] (normalised tiles, in prompt order) -> projected features [N * T, H].

        Row k * T + t is the embedding of the t-th <|patch|> token of tile k (row-major over the shuffled grid).
        """
        cfg = self.cfg
        expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected [num_tiles, *{expected}]")
        x = patch_embed(pixel_values.to(self.dtype), self.patch_weight, cfg.patch_size)  # [N, G*G, Hv]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([x, cls], dim=1) + self.positional_embedding  # class token LAST: [N, G*G + 1, Hv]
        x = F.layer_norm(x, x.shape[-1:], *self.pre_norm, cfg.norm_eps)
        for w in self.layers:
            x = encoder_layer(x, w, cfg.num_attention_heads, self.freqs_cis, cfg.norm_eps)
        x = F.layer_norm(x, x.shape[-1:], *self.post_norm, cfg.norm_eps)[:, :-1]  # drop the class token
        x = vision_adapter(pixel_shuffle(x, cfg.pixel_shuffle_ratio), self.adapter_fc1, self.adapter_fc2)  # [N, T, .]
        return x.reshape(-1, x.shape[-1]) @ self.projector.t()  # [N*T, H]


def merge_image_features(input_embeds: torch.Tensor, token_ids: torch.Tensor, features: torch.Tensor,
                         image_token_id: int) -> torch.Tensor:
    """Text embeddings input_embeds [L, H] with the rows at `token_ids == image_token_id` (<|patch|>, config's
    `image_token_index`) replaced, in order, by features [F, H]; returns a new tensor (inputs untouched).

    F must equal the number of <|patch|> tokens in token_ids [L], like transformers' masked_scatter. With chunked
    prefill, pass the chunk's own slice of the request's features: rows [p0, p0 + F) where p0 counts the
    <|patch|> tokens of the earlier chunks. Other image tokens (<|image_start|>, <|image|>, separators) keep
    their text embeddings.
    """
    mask = token_ids == image_token_id  # [L]
    count = int(mask.sum())
    if count != features.shape[0]:
        raise ValueError(
            f"prompt has {count} image patch tokens (id {image_token_id}) but {features.shape[0]} image feature rows "
            "were given; each <|patch|> token takes one row, in order"
        )
    out = input_embeds.clone()
    out[mask] = features.to(out.dtype)
    return out
