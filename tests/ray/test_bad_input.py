"""Bad input raises ValueError naming the field and the allowed range; nothing is loaded half-way."""

from __future__ import annotations

import json
import shutil

import pytest

from hf_reference import MAVERICK_LIKE, write_hf_checkpoint
from llama4serve.cluster import LLM, SamplingParams


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("bad"), MAVERICK_LIKE)


@pytest.fixture(scope="module")
def llm(ray_session, ckpt):
    with LLM(ckpt, dtype="float32", max_model_len=200) as llm:
        yield llm


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_tokens=-1), r"max_tokens is -1; allowed an integer >= 0"),
        (dict(top_p=0.0), r"top_p is 0.0; allowed \(0, 1\]"),
        (dict(top_p=1.5), r"top_p is 1.5; allowed \(0, 1\]"),
        (dict(temperature=-0.5), r"temperature is -0.5; allowed 0..100"),
        (dict(top_k=-2), r"top_k is -2"),
        (dict(logprobs=21), r"logprobs is 21; allowed None, True, or an integer 0..20"),
        (dict(seed=-1), r"seed is -1"),
    ],
)
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_prompts(llm):
    with pytest.raises(ValueError, match="prompt is empty; it needs at least 1 token"):
        llm.generate([[]], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match=r"prompt token id 320 at index 1 is outside the vocabulary; allowed 0..319"):
        llm.generate([5, 320, 7], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match=r"prompt has 201 tokens; this deployment accepts at most 200 \(max_model_len\)"):
        llm.generate([5] * 201, SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="no tokenizer.json; pass token ids"):
        llm.generate("hello", SamplingParams(max_tokens=1))
    # A batch with one bad prompt queues nothing, and the engine still serves.
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[5, 6], [1000]], SamplingParams(max_tokens=1))
    assert not llm.engine.has_work()
    assert len(llm.generate([5, 6, 7], SamplingParams(max_tokens=3, temperature=0))[0].token_ids) == 3


def test_bad_checkpoint_dirs(ray_session, ckpt, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="config.json is missing"):
        LLM(tmp_path)
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    with pytest.raises(ValueError, match="model_type is 'llama'; expected 'llama4'"):
        LLM(other)
    (other / "config.json").write_text(json.dumps(cfg))
    shard = sorted(other.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ValueError, match=f"shard files named in model.safetensors.index.json are missing: \\['{shard.name}'\\]"):
        LLM(other)
    cfg["text_config"]["num_hidden_layers"] = 5
    shutil.rmtree(other)
    shutil.copytree(ckpt, other)
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"no_rope_layers has 4 entries; it needs one per layer \(5\)"):
        LLM(other)
    cfg["text_config"]["no_rope_layers"] = [1, 1, 1, 0, 1]
    cfg["text_config"]["layer_types"] = None
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="tensor 'language_model.model.layers.4.input_layernorm.weight' is missing"):
        LLM(other)
