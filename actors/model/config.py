"""The model's shape, read from a Hugging Face Llama 4 `config.json` (immutable after construction)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """RoPE of the text model: `rope_type` "default" or "llama3" (Llama 3.1 frequency scaling)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class VisionConfig:
    """Vision tower shape (`Llama4VisionConfig`): tiles of `image_size` px, `patch_size` px patches, a bidirectional
    encoder with 2-D RoPE, pixel shuffle by `pixel_shuffle_ratio`, the adapter MLP and the projector to text."""

    hidden_size: int
    intermediate_size: int  # encoder MLP; also the pixel-shuffled width the adapter's fc1 reads
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: int  # tile side in pixels
    patch_size: int
    pixel_shuffle_ratio: float
    projector_input_dim: int
    projector_output_dim: int
    vision_output_dim: int  # multi_modal_projector.linear_1 input
    rope_theta: float
    norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    square: bool = True  # image_size given as one int (or equal sides)

    def validate(self) -> None:
        """Raises ValueError unless modeling_llama4 can run images through this shape: square tiles, a patch grid
        that pixel-shuffles evenly, `hidden_size / pixel_shuffle_ratio**2 == intermediate_size` (the adapter's fc1
        input) and a head_dim divisible by 4 (2-D RoPE splits it over x and y)."""
        w = "config.json: vision_config."
        if self.hidden_act != "gelu":
            raise ValueError(f"{w}hidden_act is {self.hidden_act!r}; only 'gelu' is supported")
        side, ratio = self.patches_per_side, self.pixel_shuffle_ratio
        if not self.square or self.image_size % self.patch_size or side * ratio != int(side * ratio):
            raise ValueError(
                f"{w}image_size {self.image_size} must be one int, a multiple of patch_size {self.patch_size}, "
                f"whose {side} patches per side shuffle evenly by pixel_shuffle_ratio {ratio}"
            )
        if int(self.hidden_size / ratio**2) != self.intermediate_size:
            raise ValueError(
                f"{w}intermediate_size is {self.intermediate_size}; the pixel-shuffle adapter reads "
                f"hidden_size / pixel_shuffle_ratio**2 = {int(self.hidden_size / ratio**2)} features"
            )
        if self.hidden_size % self.num_attention_heads or self.head_dim % 4:
            raise ValueError(
                f"{w}hidden_size {self.hidden_size} / num_attention_heads {self.num_attention_heads} must give a "
                "head_dim divisible by 4 (2-D RoPE over x and y)"
            )
        if not self.projector_input_dim == self.projector_output_dim == self.vision_output_dim:
            raise ValueError(
                f"{w}projector_input_dim {self.projector_input_dim}, projector_output_dim "
                f"{self.projector_output_dim} and vision_output_dim {self.vision_output_dim} must be equal (the "
                "adapter's fc2 is square and multi_modal_projector reads its output)"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """`<|patch|>` tokens one tile becomes after pixel shuffle (144 for the released 336 px / 14 px / 0.5)."""
        return int(self.patches_per_side**2 * self.pixel_shuffle_ratio**2)


@dataclass(frozen=True)
class ModelConfig:
    """Text-model shape of a Llama 4 checkpoint. Names follow `Llama4TextConfig`; `num_experts` is global."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # per routed expert and the shared expert
    intermediate_size_mlp: int  # dense (non-MoE) layers
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    num_experts: int
    num_experts_per_tok: int
    moe_layers: tuple[int, ...]
    use_rope: tuple[bool, ...]  # per layer; False = NoPE layer (`no_rope_layers[i] == 0`)
    is_chunked: tuple[bool, ...]  # per layer; True = chunked local attention (`layer_types`)
    attention_chunk_size: int | None
    use_qk_norm: bool
    attn_temperature_tuning: bool
    floor_scale: float
    attn_scale: float
    rope: RopeConfig
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    image_token_index: int | None = None
    torch_dtype: str = "float32"
    vision: VisionConfig | None = None  # None: text-only checkpoint (no `vision_config`)
    boi_token_index: int | None = None  # <|image_start|>
    eoi_token_index: int | None = None  # <|image_end|>

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx in self.moe_layers

    @property
    def chunked_layers(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.is_chunked) if c)

    @property
    def full_layers(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.is_chunked) if not c)


def _require(cfg: dict, key: str, where: str):
    if key not in cfg:
        raise ValueError(f"config.json: `{where}{key}` is missing; a Llama 4 config must define it")
    return cfg[key]


def _rope_config(text: dict) -> RopeConfig:
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", text.get("rope_theta", 500000.0))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"config.json: text_config.rope_parameters.rope_type is {rope_type!r}; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    return RopeConfig(
        theta=float(theta),
        rope_type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", text.get("max_position_embeddings", 8192))
        ),
    )


def parse_vision_config(cfg: dict) -> VisionConfig | None:
    """The `vision_config` of a parsed `config.json` (None when absent); defaults are Llama4VisionConfig's. Lenient,
    so a text-only deployment never fails on the vision part: `VisionConfig.validate()` checks it before use."""
    vision = cfg.get("vision_config")
    if not vision:
        return None
    image_size, patch_size = vision.get("image_size", 448), vision.get("patch_size", 14)
    rope = vision.get("rope_parameters") or {}
    return VisionConfig(
        hidden_size=int(vision.get("hidden_size", 768)),
        intermediate_size=int(vision.get("intermediate_size", 5632)),
        num_hidden_layers=int(vision.get("num_hidden_layers", 34)),
        num_attention_heads=int(vision.get("num_attention_heads", 16)),
        num_channels=int(vision.get("num_channels", 3)),
        image_size=int(image_size[0]) if isinstance(image_size, (list, tuple)) else int(image_size),
        patch_size=int(patch_size[0]) if isinstance(patch_size, (list, tuple)) else int(patch_size),
        pixel_shuffle_ratio=float(vision.get("pixel_shuffle_ratio", 0.5)),
        projector_input_dim=int(vision.get("projector_input_dim", 4096)),
        projector_output_dim=int(vision.get("projector_output_dim", 4096)),
        vision_output_dim=int(vision.get("vision_output_dim", 7680)),
        rope_theta=float(rope.get("rope_theta", vision.get("rope_theta", 10000.0))),
        norm_eps=float(vision.get("norm_eps", 1e-5)),
        hidden_act=str(vision.get("hidden_act", "gelu")),
        square=not isinstance(image_size, (list, tuple)) or len(set(image_size)) == 1,
    )


def parse_model_config(cfg: dict) -> ModelConfig:
    """Builds a ModelConfig from a parsed `config.json` (the multimodal `llama4` layout Meta released)."""
    if cfg.get("model_type") != "llama4":
        raise ValueError(
            f"config.json: model_type is {cfg.get('model_type')!r}; expected 'llama4' (a Llama 4 checkpoint "
            "in the Hugging Face layout with text_config and vision_config)"
        )
    text = _require(cfg, "text_config", "")
    w = "text_config."
    num_layers = int(_require(text, "num_hidden_layers", w))
    num_heads = int(_require(text, "num_attention_heads", w))
    hidden = int(_require(text, "hidden_size", w))
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: text_config.hidden_act is {text['hidden_act']!r}; only 'silu' is supported")
    top_k = int(text.get("num_experts_per_tok", 1))
    num_experts = int(text.get("num_local_experts", 16))
    if not 1 <= top_k <= num_experts:
        raise ValueError(
            f"config.json: text_config.num_experts_per_tok is {top_k}; allowed 1..{num_experts} (num_local_experts)"
        )

    # Defaults mirror Llama4TextConfig.__post_init__.
    interval = int(text.get("no_rope_layer_interval", 4))
    no_rope_layers = text.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(num_layers)]
    if len(no_rope_layers) < num_layers:
        raise ValueError(
            f"config.json: text_config.no_rope_layers has {len(no_rope_layers)} entries; "
            f"it needs one per layer ({num_layers})"
        )
    step = int(text.get("interleave_moe_layer_step", 1))
    moe_layers = text.get("moe_layers")
    if moe_layers is None:
        moe_layers = list(range(step - 1, num_layers, step))
    bad = [i for i in moe_layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"config.json: text_config.moe_layers has {bad}; allowed layer indices 0..{num_layers - 1}")
    layer_types = text.get("layer_types") or [
        "chunked_attention" if no_rope_layers[i] else "full_attention" for i in range(num_layers)
    ]
    unknown = sorted({t for t in layer_types[:num_layers]} - {"chunked_attention", "full_attention"})
    if unknown:
        raise ValueError(
            f"config.json: text_config.layer_types has {unknown}; allowed 'chunked_attention', 'full_attention'"
        )
    chunk = text.get("attention_chunk_size", 8192)
    eos = text.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return ModelConfig(
        vocab_size=int(_require(text, "vocab_size", w)),
        hidden_size=hidden,
        intermediate_size=int(_require(text, "intermediate_size", w)),
        intermediate_size_mlp=int(text.get("intermediate_size_mlp", 16384)),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=int(text.get("num_key_value_heads") or num_heads),
        head_dim=int(text.get("head_dim") or hidden // num_heads),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_layers=tuple(sorted(int(i) for i in moe_layers)),
        use_rope=tuple(bool(x) for x in no_rope_layers[:num_layers]),
        is_chunked=tuple(t == "chunked_attention" and chunk is not None for t in layer_types[:num_layers]),
        attention_chunk_size=None if chunk is None else int(chunk),
        use_qk_norm=bool(text.get("use_qk_norm", True)),
        attn_temperature_tuning=bool(text.get("attn_temperature_tuning", True)),
        floor_scale=float(text.get("floor_scale", 8192)),
        attn_scale=float(text.get("attn_scale", 0.1)),
        rope=_rope_config(text),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
        attention_bias=bool(text.get("attention_bias", False)),
        max_position_embeddings=int(text.get("max_position_embeddings", 131072)),
        bos_token_id=text.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=text.get("pad_token_id"),
        image_token_index=cfg.get("image_token_index"),
        vision=parse_vision_config(cfg),
        boi_token_index=cfg.get("boi_token_index"),
        eoi_token_index=cfg.get("eoi_token_index"),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or text.get("dtype") or "float32"),
    )


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Reads `model_dir/config.json`; raises ValueError naming what is missing or unsupported."""
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise ValueError(f"model directory {model_dir} does not exist")
    if not path.is_file():
        raise ValueError(f"{model_dir}: config.json is missing; expected a Llama 4 checkpoint in the HF layout")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return parse_model_config(cfg)
