"""Random checkpoints in the released quantized layouts (``llama4serve checkpoint --quantize fp8|int4``), and the
float copy of a quantized checkpoint that tests compare it with.

- fp8: Meta's FP8 Maverick layout (``quant_method: fbgemm_fp8``): the feed-forward linears (dense MLPs, shared
  experts) and the fused routed experts in e4m3 with float32 rowwise scales; attention, routers, vision tower and
  lm_head in ``modules_to_not_convert``.
- int4: compressed-tensors W4A16 (``pack-quantized``, symmetric int4, group size 128, or the largest power of two
  down to 16 that divides every input width of a smaller preset), every text linear with experts unfused per
  expert as llm-compressor writes them; routers, vision tower and lm_head in ``ignore``.
The layouts are read back by ``actors/model/quantized.py`` (see its docstring for the tensors).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from llama4serve.kernels.quant import QuantizedWeight, quantize_fp8_columns, quantize_int4_groups
from llama4serve.actors.model.checkpoint import CheckpointReader
from llama4serve.actors.model.config import parse_model_config
from llama4serve.actors.model.quantized import _read_one, load_quant_format, parse_quant_format, read_experts
from llama4serve.actors.model.weights import text_weight_shapes

SCHEMES = ("fp8", "int4")
_NOT_QUANTIZED = ["vision_model", "multi_modal_projector", "language_model.lm_head"]


def int4_group_size(config: dict) -> int:
    tc = config["text_config"]
    widths = [tc["hidden_size"], tc["intermediate_size"], tc["intermediate_size_mlp"],
              tc["num_attention_heads"] * tc["head_dim"]]
    return next(g for g in (128, 64, 32, 16) if all(w % g == 0 for w in widths))


def quantization_config(scheme: str, config: dict) -> dict:
    """config.json's ``quantization_config`` for ``scheme``, as the released checkpoints carry it."""
    if scheme == "fp8":
        layers = range(config["text_config"]["num_hidden_layers"])
        not_converted = [f"language_model.model.layers.{i}.self_attn" for i in layers]
        not_converted += [f"language_model.model.layers.{i}.feed_forward.router" for i in layers]
        return {"activation_scale_ub": 1200.0, "modules_to_not_convert": not_converted + _NOT_QUANTIZED,
                "quant_method": "fbgemm_fp8"}
    if scheme != "int4":
        raise ValueError(f"--quantize {scheme!r} is not supported; choose one of {', '.join(SCHEMES)}")
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    group = preset_name_to_scheme("W4A16", ["Linear"])
    group.weights.group_size = int4_group_size(config)
    qc = QuantizationConfig(config_groups={"group_0": group}, format="pack-quantized",
                            quantization_status="compressed",
                            ignore=["re:.*feed_forward\\.router$", "re:vision_model.*", "re:multi_modal_projector.*",
                                    "language_model.lm_head"])
    out = json.loads(qc.model_dump_json(exclude_none=True))
    out["quant_method"] = "compressed-tensors"
    return out


def _fbgemm(name: str, t: torch.Tensor, fmt) -> dict[str, torch.Tensor]:
    if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out], a scale per output
        codes, scales = zip(*(quantize_fp8_columns(w) for w in t))
        scales = torch.stack(scales)  # [E, out]
        scale_shape = (t.shape[0], 1, t.shape[2]) if name.endswith("gate_up_proj") else (t.shape[0], t.shape[2], 1)
        return {name: torch.stack(codes), name + "_scale": scales.reshape(scale_shape).contiguous()}
    module = name[: -len(".weight")]
    if not name.endswith("_proj.weight") or not fmt.quantizes(module):
        return {name: t}
    codes, scales = quantize_fp8_columns(t.t())  # rows of W [out, in] are columns of W^T
    return {name: codes.t().contiguous(), module + ".weight_scale": scales[:, None].contiguous()}


def _pack_int4(module: str, w: torch.Tensor, group: int, dtype) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes, scales = quantize_int4_groups(w.t(), group)  # [in, out], [G, out]
    return {module + ".weight_packed": pack_to_int32(codes.t().contiguous(), 4),
            module + ".weight_scale": scales.t().to(dtype).contiguous(),
            module + ".weight_shape": torch.tensor(list(w.shape))}


def _compressed(name: str, t: torch.Tensor, fmt) -> dict[str, torch.Tensor]:
    if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # unfused: experts.{e}.gate_proj ...
        prefix, out = name.rsplit(".", 1)[0], {}
        for e, w in enumerate(t):  # w [in, out]
            if name.endswith("gate_up_proj"):
                half = w.shape[1] // 2
                out.update(_pack_int4(f"{prefix}.{e}.gate_proj", w[:, :half].t(), fmt.group_size, t.dtype))
                out.update(_pack_int4(f"{prefix}.{e}.up_proj", w[:, half:].t(), fmt.group_size, t.dtype))
            else:
                out.update(_pack_int4(f"{prefix}.{e}.down_proj", w.t(), fmt.group_size, t.dtype))
        return out
    module = name[: -len(".weight")]
    if not name.startswith("language_model.") or not name.endswith("_proj.weight") or not fmt.quantizes(module):
        return {name: t}
    return _pack_int4(module, t, fmt.group_size, t.dtype)


def quantize_tensors(tensors: dict[str, torch.Tensor], qc: dict) -> dict[str, torch.Tensor]:
    """One shard's float tensors -> the tensors the checkpoint quantized by `qc` (a quantization_config) stores."""
    fmt = parse_quant_format(qc)
    convert = _fbgemm if fmt.method == "fbgemm_fp8" else _compressed
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        out.update(convert(name, t, fmt))
    return out


def write_dequantized_copy(quantized_dir: str | Path, out_dir: str | Path) -> Path:
    """A float checkpoint (the original layout and dtype) holding exactly the weights the loader dequantizes
    from ``quantized_dir``: what a quantized checkpoint's outputs are compared with."""
    src, out = Path(quantized_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model"):
            shutil.copy(f, out / f.name)
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    dtype = getattr(torch, config.get("dtype", "float32"))
    cfg, fmt, reader = parse_model_config(config), load_quant_format(src), CheckpointReader(src)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in text_weight_shapes(cfg).items():
        if name.endswith("experts.gate_up_proj"):
            prefix = name[: -len(".gate_up_proj")]
            gate_up, down = read_experts(reader, fmt, prefix, 0, shape[0], shape[0], shape[1], shape[2] // 2, dtype,
                                         packed=False)
            dense = [w.dequantize(dtype) if isinstance(w, QuantizedWeight) else w for w in (gate_up, down)]
            tensors[name], tensors[prefix + ".down_proj"] = dense
        elif name.endswith("_proj.weight") and not name.endswith("experts.down_proj"):
            w = _read_one(reader, fmt, name[: -len(".weight")], shape, dtype)
            tensors[name] = (w.dequantize(dtype) if isinstance(w, QuantizedWeight) else w).t().contiguous()
        elif not name.endswith("experts.down_proj"):
            tensors[name] = reader.get(name, dtype)
    for name in reader.weight_map:  # the vision tower and anything else stored float
        if not name.startswith("language_model.model.layers.") and name not in tensors:
            tensors[name] = reader.get(name, None)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
