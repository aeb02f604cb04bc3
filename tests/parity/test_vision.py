"""Vision tower parity with transformers' Llama 4 (float32): kernels against the reference modules, then the
projected image features of `VisionEncoder` on checkpoints that transformers itself writes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_reference import perturb_parameters
from llama4serve.actors.model.checkpoint import CheckpointReader
from llama4serve.actors.model.config import load_model_config
from llama4serve.actors.model.vision_model import VisionEncoder, merge_image_features, vision_weight_shapes
from llama4serve.kernels.vision import (encoder_layer, patch_embed, pixel_shuffle, vision_adapter,
                                        vision_rope_freqs_cis)

transformers = pytest.importorskip("transformers")
from transformers.models.llama4 import modeling_llama4 as hf  # noqa: E402

TEXT = dict(vocab_size=320, hidden_size=48, intermediate_size=32, intermediate_size_mlp=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_local_experts=4, bos_token_id=1,
            eos_token_id=[2])
# Shapes that modeling_llama4 can run images through: intermediate = hidden / ratio^2, square projector dims.
VISION_CONFIGS = {
    "56px-14": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                    image_size=56, patch_size=14, projector_input_dim=64, projector_output_dim=64,
                    vision_output_dim=64),
    "112px-14": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                     image_size=112, patch_size=14, projector_input_dim=96, projector_output_dim=96,
                     vision_output_dim=96, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    "64px-16": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                    image_size=64, patch_size=16, projector_input_dim=32, projector_output_dim=32,
                    vision_output_dim=32),
}
IMAGE_TOKEN, BOI, EOI = 300, 301, 302


def _rel_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max() / ref.abs().max()
    assert err <= rel, f"max |ours - ref| / max |ref| = {err:.2e} > {rel:.0e}"


def _vision_config(name: str):
    return transformers.Llama4VisionConfig(**VISION_CONFIGS[name])


# -- kernels against plain torch / the reference modules ------------------------------------------------------


def test_patch_embed_is_a_strided_convolution():
    pixels = torch.randn(3, 3, 56, 56)
    weight = torch.randn(32, 3 * 14 * 14)
    ref = F.conv2d(pixels, weight.view(32, 3, 14, 14), stride=14).flatten(2).transpose(1, 2)  # [N, 16, 32]
    torch.testing.assert_close(patch_embed(pixels, weight, 14), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", sorted(VISION_CONFIGS))
def test_rope_matches_reference(name):
    cfg = _vision_config(name)
    ref = hf.Llama4VisionRotaryEmbedding._compute_freqs_ci(cfg)[:, 0]  # [G*G + 1, Dh/2]
    ours = vision_rope_freqs_cis(cfg.image_size // cfg.patch_size, cfg.hidden_size // cfg.num_attention_heads,
                                 cfg.rope_parameters["rope_theta"])
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_pixel_shuffle_gathers_2x2_neighbours():
    x = torch.randn(2, 36, 5)  # 6x6 patches
    out = pixel_shuffle(x, 0.5)
    grid = x.view(2, 6, 6, 5)
    ref = torch.stack([torch.cat([grid[:, 2 * i + a, 2 * j + b] for a in range(2) for b in range(2)], -1)
                       for i in range(3) for j in range(3)], dim=1)  # [2, 9, 20]
    assert torch.equal(out, ref)
    assert torch.equal(out, hf.pixel_shuffle(x, 0.5))


@pytest.mark.parametrize("name", sorted(VISION_CONFIGS))
def test_encoder_layer_and_adapter_match_reference_modules(name):
    cfg = _vision_config(name)
    torch.manual_seed(0)
    layer = hf.Llama4VisionEncoderLayer(cfg).eval()
    adapter = hf.Llama4VisionPixelShuffleMLP(cfg).eval()
    perturb_parameters(layer, 1)
    perturb_parameters(adapter, 2)
    side = cfg.image_size // cfg.patch_size
    freqs = hf.Llama4VisionRotaryEmbedding._compute_freqs_ci(cfg)
    x = torch.randn(3, side * side + 1, cfg.hidden_size)
    a, m = layer.self_attn, layer.mlp
    w = {f"{n}_{k}": getattr(getattr(a, f"{n}_proj"), k) for n in "qkvo" for k in ("weight", "bias")}
    w |= {"fc1_weight": m.fc1.weight, "fc1_bias": m.fc1.bias, "fc2_weight": m.fc2.weight, "fc2_bias": m.fc2.bias,
          "input_norm_weight": layer.input_layernorm.weight, "input_norm_bias": layer.input_layernorm.bias,
          "post_norm_weight": layer.post_attention_layernorm.weight,
          "post_norm_bias": layer.post_attention_layernorm.bias}
    with torch.no_grad():
        ours = encoder_layer(x, w, cfg.num_attention_heads, freqs[:, 0], 1e-5)
        ref = layer(x, freqs_ci=freqs)[0]
        _rel_close(ours, ref)
        patches = x[:, :-1]
        _rel_close(vision_adapter(pixel_shuffle(patches, 0.5), adapter.mlp.fc1.weight, adapter.mlp.fc2.weight),
                   adapter(patches))


# -- the whole tower on checkpoints transformers writes -------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(VISION_CONFIGS))
def hf_checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.Llama4Config(text_config=TEXT, vision_config=VISION_CONFIGS[request.param],
                                    image_token_index=IMAGE_TOKEN, boi_token_index=BOI, eoi_token_index=EOI)
    model = transformers.Llama4ForConditionalGeneration(cfg).eval()
    perturb_parameters(model.vision_model, 3)
    perturb_parameters(model.multi_modal_projector, 4)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, max_shard_size="300KB")
    return path, model


@torch.no_grad()
def _hf_projected(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """What Llama4ForConditionalGeneration.forward scatters into the <|patch|> positions."""
    features = model.get_image_features(pixel_values=pixel_values, return_dict=True).last_hidden_state
    return model.multi_modal_projector(features.view(-1, features.size(-1)))


def test_checkpoint_names_and_shapes_are_ours(hf_checkpoint):
    path, _ = hf_checkpoint
    cfg = load_model_config(path)
    reader = CheckpointReader(path)
    shapes = vision_weight_shapes(cfg.vision, cfg.hidden_size)
    assert set(shapes) == {k for k in reader.weight_map if not k.startswith("language_model.")}
    assert all(tuple(reader.shape(name)) == shape for name, shape in shapes.items())


@pytest.mark.parametrize("num_tiles", [1, 5])
def test_image_features_match_transformers(hf_checkpoint, num_tiles):
    path, model = hf_checkpoint
    cfg = load_model_config(path)
    encoder = VisionEncoder(cfg.vision, CheckpointReader(path), torch.float32)
    size = cfg.vision.image_size
    pixels = torch.randn(num_tiles, 3, size, size, generator=torch.Generator().manual_seed(num_tiles))
    ours = encoder.image_features(pixels)
    assert ours.shape == (num_tiles * cfg.vision.tokens_per_tile, cfg.hidden_size)
    _rel_close(ours, _hf_projected(model, pixels))


def test_merged_embeddings_give_transformers_logits(hf_checkpoint):
    """Features replace exactly the <|patch|> embeddings: the text model on our merged embeddings reproduces
    transformers' forward with pixel_values (two images, the second with 2 tiles)."""
    path, model = hf_checkpoint
    cfg = load_model_config(path)
    assert cfg.image_token_index == IMAGE_TOKEN
    encoder = VisionEncoder(cfg.vision, CheckpointReader(path), torch.float32)
    size, per_tile = cfg.vision.image_size, cfg.vision.tokens_per_tile
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(7))
    ids = ([1, 5, BOI] + [IMAGE_TOKEN] * per_tile + [EOI, 9, 10, BOI] + [IMAGE_TOKEN] * per_tile + [303]
           + [IMAGE_TOKEN] * per_tile + [EOI, 11])
    ids = torch.tensor(ids)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        merged = merge_image_features(embeds, ids, encoder.image_features(pixels), IMAGE_TOKEN)
        ours = model.language_model(inputs_embeds=merged[None]).logits
        ref = model(input_ids=ids[None], pixel_values=pixels).logits
    _rel_close(ours, ref)
    assert not torch.allclose(merged, embeds)
    assert torch.equal(merged[ids != IMAGE_TOKEN], embeds[ids != IMAGE_TOKEN])


def test_bad_inputs_say_what_was_wrong(hf_checkpoint):
    path, _ = hf_checkpoint
    cfg = load_model_config(path)
    encoder = VisionEncoder(cfg.vision, CheckpointReader(path), torch.float32)
    with pytest.raises(ValueError, match=r"pixel_values has shape \(1, 3, 10, 10\)"):
        encoder.image_features(torch.zeros(1, 3, 10, 10))
    ids = torch.tensor([1, IMAGE_TOKEN, IMAGE_TOKEN])
    with pytest.raises(ValueError, match="2 image patch tokens .* but 3 image feature rows"):
        merge_image_features(torch.zeros(3, 4), ids, torch.zeros(3, 4), IMAGE_TOKEN)


def test_inconsistent_vision_config_is_refused_before_loading(tmp_path):
    from llama4serve.actors.model.config import parse_model_config

    from hf_reference import SCOUT_LIKE, VISION  # intermediate_size 64 != 32 / 0.5**2: text-only usable
    cfg = parse_model_config(transformers.Llama4Config(text_config=SCOUT_LIKE, vision_config=VISION).to_dict())
    assert cfg.vision is not None and cfg.vision.intermediate_size == 64
    with pytest.raises(ValueError, match="intermediate_size is 64; the pixel-shuffle adapter reads .* 128"):
        cfg.vision.validate()


def test_preset_checkpoint_features_match_transformers(tmp_path):
    """The checkpoint maker's vision tower (tiny-maverick) reads the same in transformers and here, on tiles
    from the image processor."""
    import io

    Image = pytest.importorskip("PIL.Image")
    from llama4serve.cluster.checkpoints.maker import write_checkpoint
    from llama4serve.cluster.inputs.image_processor import ImageProcessor

    path = write_checkpoint(tmp_path / "ck", "tiny-maverick")
    cfg = load_model_config(path)
    buf = io.BytesIO()
    Image.new("RGB", (90, 40), (200, 30, 90)).save(buf, format="PNG")
    image = ImageProcessor.from_dir(path).process(buf.getvalue())
    assert image.pixel_values.shape[0] > 1  # a grid plus the global tile
    ours = VisionEncoder(cfg.vision, CheckpointReader(path), torch.float32).image_features(image.pixel_values)
    model = transformers.Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    assert ours.shape == (image.num_patch_tokens, cfg.hidden_size)
    _rel_close(ours, _hf_projected(model, image.pixel_values.float()))
