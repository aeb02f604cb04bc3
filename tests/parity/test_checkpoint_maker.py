"""Random checkpoints load in transformers without missing keys, run, and carry a consistent tokenizer."""

import json

import pytest
import torch
from safetensors import safe_open

from llama4serve.cluster.checkpoints.maker import tensor_specs, write_checkpoint
from llama4serve.cluster.cli.main import main
from llama4serve.cluster.checkpoints.presets import PRESETS, get_preset
from llama4serve.cluster.inputs.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {name: write_checkpoint(root / name, name, seed=0) for name in PRESETS}


@pytest.fixture(scope="module")
def models(checkpoints):
    loaded = {}
    for name, path in checkpoints.items():
        model, info = transformers.Llama4ForConditionalGeneration.from_pretrained(path, output_loading_info=True)
        loaded[name] = (model.eval(), info)
    return loaded


def _shard_keys(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    keys = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(path / shard), "pt") as f:
            keys.update(dict.fromkeys(f.keys(), shard))
    return index, keys


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_loads_in_transformers_without_key_problems(models, preset):
    model, info = models[preset]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info.get("error_msgs")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_text_and_image_forward_are_finite(models, preset):
    model, _ = models[preset]
    cfg = get_preset(preset)
    vision = cfg["vision_config"]
    ids = torch.tensor([[cfg["text_config"]["bos_token_id"], 5, 17, 99, 300, 42, 7, 8, 9, 10]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], cfg["text_config"]["vocab_size"])
    assert torch.isfinite(logits).all()
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    image_tokens = int(patches * vision["pixel_shuffle_ratio"] ** 2)
    ids = torch.tensor([[cfg["text_config"]["bos_token_id"], cfg["boi_token_index"]]
                        + [cfg["image_token_index"]] * image_tokens + [cfg["eoi_token_index"], 5, 6]])
    pixels = torch.randn(1, 3, vision["image_size"], vision["image_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_image = model(input_ids=ids, pixel_values=pixels).logits
        text_only = model(input_ids=ids).logits
    assert torch.isfinite(with_image).all()
    assert not torch.allclose(with_image, text_only)  # the image features replaced the <|patch|> embeddings


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_shards_and_index(checkpoints, preset):
    path = checkpoints[preset]
    index, keys = _shard_keys(path)
    assert len(set(index["weight_map"].values())) >= 2
    assert index["weight_map"] == keys
    assert set(keys) == {s.name for s in tensor_specs(get_preset(preset))}
    assert index["metadata"]["total_size"] == 4 * index["metadata"]["total_parameters"]
    config = json.loads((path / "config.json").read_text())
    assert config["dtype"] == "float32"
    assert {k: v for k, v in config.items() if k not in ("dtype", "transformers_version")} == get_preset(preset)
    assert ("language_model.lm_head.weight" in keys) == (not config["tie_word_embeddings"])


@pytest.mark.parametrize("preset", ["tiny-scout", "tiny-maverick"])
def test_special_token_ids_match_config(checkpoints, preset):
    path = checkpoints[preset]
    config = json.loads((path / "config.json").read_text())
    text = config["text_config"]
    ours = Tokenizer.from_dir(path)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    ids = {t: ours.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eom|>", "<|eot|>",
                                            "<|finetune_right_pad|>", "<|image_start|>", "<|image_end|>",
                                            "<|patch|>")}
    assert text["bos_token_id"] == ids["<|begin_of_text|>"] == hf.bos_token_id
    assert text["eos_token_id"] == [ids["<|end_of_text|>"], ids["<|eom|>"], ids["<|eot|>"]] == ours.eos_token_ids
    assert text["pad_token_id"] == ids["<|finetune_right_pad|>"] == hf.pad_token_id
    assert config["boi_token_index"] == ids["<|image_start|>"]
    assert config["eoi_token_index"] == ids["<|image_end|>"]
    assert config["image_token_index"] == ids["<|patch|>"]
    assert max(ids.values()) < ours.vocab_size <= text["vocab_size"]
    text_in = "Le café 🦙 日本"
    assert ours.encode(text_in) == hf(text_in)["input_ids"]
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == text["eos_token_id"]


@pytest.mark.parametrize("preset", ["tiny-scout", "tiny-maverick"])
def test_greedy_decoding_is_not_degenerate(models, checkpoints, preset):
    model, _ = models[preset]
    prompt = torch.tensor([Tokenizer.from_dir(checkpoints[preset]).encode("The market opens early in Paris")])
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    new = out[0, prompt.shape[1]:].tolist()
    assert len(new) == 24 and len(set(new)) >= 8, new


def test_temperature_tuning_changes_tiny_scout(models):
    model, _ = models["tiny-scout"]
    ids = torch.arange(1, 41).unsqueeze(0)  # past floor_scale (8) and attention_chunk_size (32)
    layers = model.language_model.model.layers
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        for layer in layers:
            layer.self_attn.attn_temperature_tuning = False
        plain = model(input_ids=ids).logits
        for layer in layers:
            layer.self_attn.attn_temperature_tuning = True
    assert torch.allclose(tuned[:, :7], plain[:, :7], atol=1e-5)  # scale is 1 below floor_scale
    assert not torch.allclose(tuned[:, 7:], plain[:, 7:], atol=1e-3)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = write_checkpoint(tmp_path / "a", "tiny-maverick", seed=3, max_shard_bytes=300_000)
    b = write_checkpoint(tmp_path / "b", "tiny-maverick", seed=3)
    c = write_checkpoint(tmp_path / "c", "tiny-maverick", seed=4)
    index_a, keys_a = _shard_keys(a)
    assert len(set(index_a["weight_map"].values())) > len(set(_shard_keys(b)[0]["weight_map"].values()))
    for name in ("tokenizer.json", "config.json", "model-00001-of-00006.safetensors"):
        assert (b / name).read_bytes() == (write_checkpoint(tmp_path / "b2", "tiny-maverick", seed=3) / name
                                           ).read_bytes()
    key = "language_model.model.layers.1.feed_forward.experts.gate_up_proj"
    tensors = []
    for path in (a, b, c):
        index = json.loads((path / "model.safetensors.index.json").read_text())
        with safe_open(str(path / index["weight_map"][key]), "pt") as f:
            tensors.append(f.get_tensor(key))
    assert torch.equal(tensors[0], tensors[1])  # sharding does not change values
    assert not torch.equal(tensors[0], tensors[2])
    for shard in set(index_a["weight_map"].values()):  # a shard fits the limit or holds one larger tensor
        num_tensors = sum(1 for v in keys_a.values() if v == shard)
        assert (a / shard).stat().st_size <= 300_000 + 10_000 or num_tensors == 1  # 10 kB header slack


def test_bfloat16_checkpoint_via_cli(tmp_path, capsys):
    assert main(["checkpoint", "--preset", "tiny-scout", "--out", str(tmp_path / "ck"), "--dtype", "bfloat16"]) == 0
    assert "tiny-scout" in capsys.readouterr().out
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    model, info = transformers.Llama4ForConditionalGeneration.from_pretrained(
        tmp_path / "ck", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16


def test_bad_arguments_say_what_was_wrong(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'huge'.*tiny-scout"):
        write_checkpoint(tmp_path, "huge")
    with pytest.raises(ValueError, match="dtype 'int8'"):
        write_checkpoint(tmp_path, "tiny-scout", dtype="int8")
