"""Quantized checkpoints as released: which modules a `quantization_config` quantizes, which tensors each one
then holds, and reading them into `kernels.quant.QuantizedWeight` (kept quantized in memory).

Formats (config.json `quantization_config`):
- Meta's FP8 (`quant_method: fbgemm_fp8`, Llama-4-Maverick-17B-128E-Instruct-FP8): a linear `M` is `M.weight`
  float8_e4m3fn [out, in] + `M.weight_scale` float32 [out, 1] (rowwise); fused experts are
  `experts.gate_up_proj` e4m3 [E, H, 2I] + `experts.gate_up_proj_scale` [E, 1, 2I] and `experts.down_proj` e4m3
  [E, I, H] + `experts.down_proj_scale` [E, H, 1] (transformers' FbgemmFp8Llama4TextExperts). Modules named in
  `modules_to_not_convert` (substring match, as transformers does) stay float.
- compressed-tensors (`quant_method: compressed-tensors`), parsed by the `compressed-tensors` package:
  `float-quantized` FP8 (channel strategy): `M.weight` e4m3 [out, in] + `M.weight_scale` [out, 1];
  `pack-quantized` W4A16 (int4, symmetric, group strategy): `M.weight_packed` int32 [out, in / 8],
  `M.weight_scale` [out, in / group_size], `M.weight_shape` int [2] = (out, in). Experts are per-expert linears
  `experts.{e}.gate_proj|up_proj|down_proj` (llm-compressor unfuses them). `ignore` entries (names or `re:` patterns)
  stay float.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from llama4serve.kernels.linear import pack_weight
from llama4serve.kernels.quant import FP8, INT4, QuantizedWeight
from llama4serve.actors.model.checkpoint import CheckpointReader

FBGEMM = "fbgemm_fp8"
COMPRESSED = "compressed-tensors"


@dataclass(frozen=True)
class QuantFormat:
    """How a checkpoint is quantized: method, scheme (fp8 | int4), int4 group size, and the float modules."""

    method: str
    scheme: str
    group_size: int = 0
    not_converted: tuple[str, ...] = ()  # fbgemm_fp8: substrings
    activation_scale_ub: float | None = None  # fbgemm_fp8: bound on activation row maxima (scaled fp8 matmuls)
    ignore: tuple[str, ...] = ()  # compressed-tensors: names or "re:" patterns

    def quantizes(self, module: str) -> bool:
        if self.method == FBGEMM:
            return not any(key in module for key in self.not_converted)
        for entry in self.ignore:
            if entry == module or (entry.startswith("re:") and re.match(entry[3:], module)):
                return False
        return True


def _compressed_format(qc: dict, where: str) -> QuantFormat:
    from compressed_tensors.quantization import QuantizationConfig  # the authority on its own config

    cfg = QuantizationConfig.model_validate(qc)
    if len(cfg.config_groups) != 1:
        raise ValueError(f"{where}: {len(cfg.config_groups)} config_groups; one scheme for all Linear layers expected")
    weights = next(iter(cfg.config_groups.values())).weights
    fmt = cfg.format
    if (fmt == "pack-quantized" and weights.num_bits == 4 and weights.type == "int" and weights.symmetric
            and weights.strategy == "group"):
        return QuantFormat(COMPRESSED, INT4, weights.group_size, ignore=tuple(cfg.ignore or ()))
    if fmt in ("float-quantized", "naive-quantized") and weights.num_bits == 8 and weights.type == "float" and (
            weights.strategy == "channel"):
        return QuantFormat(COMPRESSED, FP8, ignore=tuple(cfg.ignore or ()))
    raise ValueError(f"{where}: compressed-tensors format {fmt!r} with weights {weights.num_bits}-bit "
                     f"{weights.type} {weights.strategy} is not supported; supported: pack-quantized int4 group "
                     "(W4A16) and float-quantized fp8 channel (FP8-dynamic)")


def load_quant_format(model_dir: str | Path) -> QuantFormat | None:
    """The checkpoint's quantization, or None for a float checkpoint; ValueError for a scheme we cannot load."""
    path = Path(model_dir) / "config.json"
    qc = json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
    return parse_quant_format(qc, str(path)) if qc else None


def parse_quant_format(qc: dict, path: str = "config.json") -> QuantFormat:
    """A `quantization_config` dict -> QuantFormat; ValueError naming the scheme when it is not one we load."""
    method = qc.get("quant_method")
    if method == FBGEMM:
        ub = qc.get("activation_scale_ub")
        return QuantFormat(FBGEMM, FP8, not_converted=tuple(qc.get("modules_to_not_convert") or ()),
                           activation_scale_ub=None if ub is None else float(ub))
    if method == COMPRESSED:
        return _compressed_format(qc, path)
    raise ValueError(f"{path}: quantization_config quant_method {method!r} is not supported; "
                     f"expected {FBGEMM!r} or {COMPRESSED!r}")


def _expect(reader: CheckpointReader, name: str, shape: tuple[int, ...], dtypes: tuple[str, ...], why: str) -> None:
    """Header-only check of one tensor: present, with `shape` and one of the safetensors `dtypes`."""
    if not reader.has(name):
        raise ValueError(f"{reader.model_dir}: tensor {name!r} is missing; {why}")
    found, dtype = tuple(reader.shape(name)), reader.dtype_name(name)
    if found != tuple(shape) or dtype not in dtypes:
        raise ValueError(f"{reader.model_dir}: tensor {name!r} is {dtype} {found}; expected "
                         f"{' or '.join(dtypes)} {tuple(shape)} ({why})")


_FLOATS = ("F32", "BF16", "F16")


def check_linear(reader: CheckpointReader, fmt: QuantFormat | None, module: str, out_in: tuple[int, int]) -> None:
    """Raises ValueError naming the tensor of linear `module` [out, in] that is missing or mis-shaped."""
    out, k = out_in
    if fmt is None or not fmt.quantizes(module):
        return _expect(reader, module + ".weight", out_in, _FLOATS, "a float linear weight [out, in]")
    why = f"{fmt.method} quantizes {module} as {fmt.scheme}"
    if fmt.scheme == FP8:
        _expect(reader, module + ".weight", out_in, ("F8_E4M3",), why)
        return _expect(reader, module + ".weight_scale", (out, 1), _FLOATS, why + " with one scale per output row")
    if k % fmt.group_size:
        raise ValueError(f"{reader.model_dir}: {module} has {k} inputs, not a multiple of group_size {fmt.group_size}")
    _expect(reader, module + ".weight_packed", (out, k // 8), ("I32",), why + " packed 8 per int32")
    _expect(reader, module + ".weight_scale", (out, k // fmt.group_size), _FLOATS, why + " with group scales")
    _expect(reader, module + ".weight_shape", (2,), ("I32", "I64"), why)
    stored = reader.get(module + ".weight_shape", None).tolist()
    if stored != [out, k]:
        raise ValueError(f"{reader.model_dir}: tensor {module + '.weight_shape'!r} is {stored}; expected {[out, k]}")


def _read_one(reader: CheckpointReader, fmt: QuantFormat | None, module: str, out_in: tuple[int, int], dtype):
    """Linear `module` as [in, out]: a float tensor or a `QuantizedWeight`."""
    check_linear(reader, fmt, module, out_in)
    if fmt is None or not fmt.quantizes(module):
        return reader.get(module + ".weight", dtype).t()
    scale = reader.get(module + ".weight_scale", torch.float32)
    if fmt.scheme == FP8:
        return _fp8(fmt, reader.get(module + ".weight", None).t(), scale.view(-1))
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    codes = unpack_from_int32(reader.get(module + ".weight_packed", None), 4, torch.Size(out_in))  # [out, in] int8
    return QuantizedWeight(INT4, codes.t(), scale.t(), fmt.group_size)


def _fp8(fmt: QuantFormat, codes: torch.Tensor, scales: torch.Tensor) -> QuantizedWeight:
    weight = QuantizedWeight(FP8, codes, scales)
    weight.activation_scale_ub = fmt.activation_scale_ub
    return weight


def read_linear(reader: CheckpointReader, fmt: QuantFormat | None, modules: list[str],
                shapes: list[tuple[int, int]], dtype: torch.dtype, device: torch.device | str = "cpu"):
    """Linears `modules` ([out, in] each) fused along their outputs -> the packed [in, sum(out)] weight `linear`
    takes, on `device`; quantized modules stay quantized."""
    parts = [_read_one(reader, fmt, m, s, dtype) for m, s in zip(modules, shapes)]
    return pack_weight(_concat(parts, dtype).to(device), dtype)


def _concat(parts: list, dtype: torch.dtype):
    if all(isinstance(p, QuantizedWeight) for p in parts):
        out = parts[0]
        for p in parts[1:]:
            out = out.concat_columns(p)
        return out
    parts = [p.dequantize(dtype) if isinstance(p, QuantizedWeight) else p for p in parts]
    return torch.cat(parts, dim=1)


def check_experts(reader: CheckpointReader, fmt: QuantFormat | None, prefix: str, num_experts: int, hidden: int,
                  inter: int) -> None:
    """Checks the routed experts of one MoE layer (`prefix` = "...feed_forward.experts")."""
    if reader.has(prefix + ".gate_up_proj"):
        fused = {".gate_up_proj": ((num_experts, hidden, 2 * inter), (num_experts, 1, 2 * inter)),
                 ".down_proj": ((num_experts, inter, hidden), (num_experts, hidden, 1))}
        quantized = fmt is not None and fmt.method == FBGEMM and fmt.quantizes(prefix)
        for name, (shape, scale_shape) in fused.items():
            why = f"{FBGEMM} fused experts" if quantized else "fused float experts [E, in, out]"
            _expect(reader, prefix + name, shape, ("F8_E4M3",) if quantized else _FLOATS, why)
            if quantized:
                _expect(reader, prefix + name + "_scale", scale_shape, ("F32",), why + ", one scale per output")
        return
    if fmt is None or fmt.method != COMPRESSED:
        raise ValueError(f"{reader.model_dir}: tensor {prefix + '.gate_up_proj'!r} is missing from the checkpoint")
    for e in range(num_experts):
        for name, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
            check_linear(reader, fmt, f"{prefix}.{e}.{name}", shape)


def read_experts(reader: CheckpointReader, fmt: QuantFormat | None, prefix: str, first: int, last: int,
                 num_experts: int, hidden: int, inter: int, dtype, packed: bool = True):
    """Experts [first, last) of one MoE layer, reading only their bytes -> (gate_up, down): per expert
    [H, 2I] and [I, H] packed for `linear` (quantized ones stay quantized), or with packed=False stacked
    [E_local, H, 2I] and [E_local, I, H] for the portable path: float in `dtype`, or one stacked
    `QuantizedWeight` each when the experts are quantized (dequantized a layer at a time, at use)."""
    check_experts(reader, fmt, prefix, num_experts, hidden, inter)
    if reader.has(prefix + ".gate_up_proj") and reader.dtype_name(prefix + ".gate_up_proj") != "F8_E4M3":
        gate_up = _own(reader.get_rows(prefix + ".gate_up_proj", first, last, dtype))
        down = _own(reader.get_rows(prefix + ".down_proj", first, last, dtype))
        if not packed:
            return gate_up, down
        return [pack_weight(w) for w in gate_up], [pack_weight(w) for w in down]
    if reader.has(prefix + ".gate_up_proj"):  # fbgemm fp8, fused
        parts = []
        for name in (".gate_up_proj", ".down_proj"):
            codes = _own(reader.get_rows(prefix + name, first, last, None))  # [n, in, out] e4m3
            scales = _own(reader.get_rows(prefix + name + "_scale", first, last, torch.float32))  # [n, 1|out, out|1]
            if not packed:
                parts.append(_fp8(fmt, codes, scales.reshape(last - first, -1)))
                continue
            parts.append([_fp8(fmt, c, s.view(-1)) for c, s in zip(codes, scales)])
        gate_up, down = parts
        if not packed:
            return gate_up, down
    else:  # compressed-tensors, per expert
        gate_up = [_concat([_read_one(reader, fmt, f"{prefix}.{e}.{n}", (inter, hidden), dtype)
                            for n in ("gate_proj", "up_proj")], dtype) for e in range(first, last)]
        down = [_read_one(reader, fmt, f"{prefix}.{e}.down_proj", (hidden, inter), dtype) for e in range(first, last)]
    if not packed:
        return _stack(gate_up, dtype), _stack(down, dtype)
    return [pack_weight(w, dtype) for w in gate_up], [pack_weight(w, dtype) for w in down]


def _own(rows: torch.Tensor) -> torch.Tensor:
    """Rows read with `get_rows` in storage of their own: safetensors' slices can be views of the whole
    tensor's storage, which would keep every expert of the layer alive in this shard."""
    if rows.untyped_storage().nbytes() > rows.numel() * rows.element_size():
        return rows.clone()
    return rows


def _stack(weights: list, dtype):
    """Per-expert weights -> one stacked QuantizedWeight, or a float [E, K, M] when some are float (`ignore`)."""
    if all(isinstance(w, QuantizedWeight) for w in weights):
        return QuantizedWeight.stack(weights)
    return torch.stack([w.dequantize(dtype) if isinstance(w, QuantizedWeight) else w.to(dtype) for w in weights])
