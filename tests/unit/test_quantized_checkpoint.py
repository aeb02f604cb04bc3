"""Quantized random checkpoints (`checkpoint --quantize fp8|int4`): the released layouts, the same weights as the
float checkpoint, expert shards reading only their bytes, and malformed checkpoints failing at load by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama4serve.actors.model.checkpoint import CheckpointReader
from llama4serve.actors.model.config import load_model_config
from llama4serve.actors.model.experts import LocalExperts, expert_split
from llama4serve.actors.model.weights import check_checkpoint
from llama4serve.cluster.checkpoints.maker import write_checkpoint
from llama4serve.cluster.checkpoints.quantize import write_dequantized_copy
from llama4serve.cluster.cli.main import main

L0 = "language_model.model.layers.0."


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    out = {"float": write_checkpoint(root / "float", "tiny-scout")}
    for scheme in ("fp8", "int4"):
        assert main(["checkpoint", "--preset", "tiny-scout", "--quantize", scheme, "--out", str(root / scheme)]) == 0
        out[scheme] = root / scheme
    return out


def _tensors(path: Path) -> dict[str, str]:
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]


def test_fp8_is_metas_fbgemm_layout(checkpoints):
    path = checkpoints["fp8"]
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fbgemm_fp8" and "language_model.lm_head" in qc["modules_to_not_convert"]
    assert f"{L0}self_attn" in qc["modules_to_not_convert"] and "vision_model" in qc["modules_to_not_convert"]
    reader = CheckpointReader(path)
    assert reader.dtype_name(L0 + "feed_forward.experts.gate_up_proj") == "F8_E4M3"
    assert reader.shape(L0 + "feed_forward.experts.gate_up_proj_scale") == [16, 1, 64]
    assert reader.shape(L0 + "feed_forward.experts.down_proj_scale") == [16, 64, 1]
    assert reader.shape(L0 + "feed_forward.shared_expert.gate_proj.weight_scale") == [32, 1]
    assert reader.dtype_name(L0 + "self_attn.q_proj.weight") == "F32"  # attention stays float
    assert reader.dtype_name(L0 + "feed_forward.router.weight") == "F32"


def test_int4_is_compressed_tensors_w4a16(checkpoints):
    path = checkpoints["int4"]
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    names = _tensors(path)
    assert L0 + "feed_forward.experts.gate_up_proj" not in names  # unfused per expert
    reader = CheckpointReader(path)
    assert reader.shape(L0 + "feed_forward.experts.3.gate_proj.weight_packed") == [32, 64 // 8]
    assert reader.shape(L0 + "self_attn.q_proj.weight_scale") == [64, 64 // 32]
    assert reader.get(L0 + "self_attn.q_proj.weight_shape", None).tolist() == [64, 64]
    assert reader.dtype_name(L0 + "feed_forward.router.weight") == "F32" and "language_model.lm_head.weight" in names


@pytest.mark.parametrize("scheme,bound", [("fp8", 0.07), ("int4", 0.07)])
def test_same_weights_as_the_float_checkpoint(checkpoints, tmp_path, scheme, bound):
    copy = CheckpointReader(write_dequantized_copy(checkpoints[scheme], tmp_path / "copy"))
    ref = CheckpointReader(checkpoints["float"])
    for name in (L0 + "feed_forward.experts.gate_up_proj", L0 + "feed_forward.shared_expert.down_proj.weight",
                 "language_model.lm_head.weight", L0 + "self_attn.o_proj.weight"):
        a, b = copy.get(name, torch.float32), ref.get(name, torch.float32)
        assert (a - b).abs().max() <= bound * b.abs().max(), name
    assert torch.equal(copy.get("language_model.lm_head.weight", None), ref.get("language_model.lm_head.weight", None))


@pytest.mark.parametrize("scheme", ["fp8", "int4"])
def test_expert_shard_reads_only_its_bytes(checkpoints, scheme):
    path = checkpoints[scheme]
    cfg = load_model_config(path)
    full = CheckpointReader(path)
    LocalExperts(cfg, full, 0, cfg.num_experts, torch.float32)
    for e0, e1 in expert_split(cfg.num_experts, 3):
        reader = CheckpointReader(path)
        LocalExperts(cfg, reader, e0, e1, torch.float32)
        assert reader.bytes_read <= 1.1 * full.bytes_read * (e1 - e0) / cfg.num_experts + 64


def _rewrite(path: Path, name: str, tensor: torch.Tensor | None) -> None:
    shard = path / _tensors(path)[name]
    tensors = load_file(shard)
    if tensor is None:
        del tensors[name]
        index = json.loads((path / "model.safetensors.index.json").read_text())
        del index["weight_map"][name]
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        tensors[name] = tensor
    save_file(tensors, str(shard))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("scheme,name,tensor,message", [
    ("fp8", L0 + "feed_forward.experts.down_proj_scale", None, "'.*down_proj_scale' is missing"),
    ("fp8", L0 + "feed_forward.shared_expert.up_proj.weight_scale", torch.ones(32),
     r"up_proj.weight_scale' is F32 \(32,\); expected F32 or BF16 or F16 \(32, 1\)"),
    ("int4", L0 + "self_attn.k_proj.weight_scale", None, "'.*k_proj.weight_scale' is missing"),
    ("int4", L0 + "feed_forward.experts.5.down_proj.weight_packed", torch.zeros(64, 3, dtype=torch.int32),
     r"experts.5.down_proj.weight_packed' is I32 \(64, 3\); expected I32 \(64, 4\)"),
    ("int4", L0 + "self_attn.v_proj.weight_shape", torch.tensor([64, 32]), r"weight_shape' is \[64, 32\]"),
])
def test_malformed_checkpoint_fails_at_load_with_the_name(checkpoints, tmp_path, scheme, name, tensor, message):
    path = _copy(checkpoints[scheme], tmp_path / "bad")
    _rewrite(path, name, tensor)
    cfg = load_model_config(path)
    with pytest.raises(ValueError, match=message):
        check_checkpoint(cfg, CheckpointReader(path))


@pytest.mark.parametrize("change,message", [
    ({"quant_method": "awq"}, "quant_method 'awq' is not supported"),
    ({"format": "marlin-24"}, "compressed-tensors format 'marlin-24' .* is not supported"),
])
def test_unknown_scheme_fails_at_load(checkpoints, tmp_path, change, message):
    path = _copy(checkpoints["int4"], tmp_path / "bad")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(change)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        check_checkpoint(load_model_config(path), CheckpointReader(path))
