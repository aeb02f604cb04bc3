"""Random Llama 4 checkpoints in the released Hugging Face layout (``llama4serve checkpoint``).

Writes ``config.json``, ``generation_config.json``, sharded ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json``, the tokenizer files and the image processor's settings (``processor_config.json``,
``preprocessor_config.json``). Tensor names and shapes are those transformers'
``Llama4ForConditionalGeneration`` saves, derived here from the config with plain arithmetic (no transformers).

Initialisation is chosen so that a random model is not degenerate (greedy decoding depends on the context):
matrices ~ N(0, 1/fan_in), token embeddings ~ N(0, 1), norm weights 1 + N(0, 0.1), biases N(0, 0.02). Every tensor
has its own generator seeded from (seed, tensor name), so values do not depend on sharding or write order.
"""

from __future__ import annotations

import argparse
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from llama4serve.actors.model.checkpoint import DTYPES
from llama4serve.actors.model.config import parse_model_config, parse_vision_config
from llama4serve.actors.model.vision_model import vision_weight_shapes
from llama4serve.actors.model.weights import text_weight_shapes
from llama4serve.cluster.checkpoints.presets import PRESETS, get_preset
from llama4serve.cluster.checkpoints.quantize import SCHEMES, quantization_config, quantize_tensors
from llama4serve.cluster.checkpoints.tokenizer_files import write_tokenizer_files

TRANSFORMERS_VERSION = "5.23.0"  # the version whose file layout these files mirror


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: its name, shape and how to draw it (``std`` for "normal")."""

    name: str
    shape: tuple[int, ...]
    init: str  # "normal" | "norm" (1 + noise) | "bias"
    std: float = 0.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _text_specs(config: dict) -> list[TensorSpec]:
    """The text model's tensors: names and shapes from the loader's own table, so maker and loader agree."""
    specs = []
    for name, shape in text_weight_shapes(parse_model_config(config)).items():
        if name.endswith("embed_tokens.weight"):
            specs.append(TensorSpec(name, shape, "normal", 1.0))
        elif len(shape) == 1:
            specs.append(TensorSpec(name, shape, "bias" if name.endswith(".bias") else "norm"))
        else:  # [out, in] linears and [E, in, out] experts: fan-in is shape[1]
            specs.append(TensorSpec(name, shape, "normal", shape[1] ** -0.5))
    return specs


def _vision_specs(config: dict) -> list[TensorSpec]:
    """The vision tower's tensors, names and shapes from the encoder's own table."""
    specs = []
    for name, shape in vision_weight_shapes(parse_vision_config(config), config["text_config"]["hidden_size"]).items():
        if name.endswith(".bias"):
            specs.append(TensorSpec(name, shape, "bias"))
        elif "layernorm" in name:
            specs.append(TensorSpec(name, shape, "norm"))
        elif len(shape) == 1:  # class_embedding
            specs.append(TensorSpec(name, shape, "normal", shape[0] ** -0.5))
        else:  # [out, in] linears and the [positions, hidden] positional embedding
            specs.append(TensorSpec(name, shape, "normal", shape[1] ** -0.5))
    return specs


def tensor_specs(config: dict) -> list[TensorSpec]:
    """Every tensor of the checkpoint for a ``config.json`` dict, sorted by name (transformers' save order)."""
    return sorted(_text_specs(config) + _vision_specs(config), key=lambda s: s.name)


def _make_tensor(spec: TensorSpec, seed: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(spec.name.encode())) % 2**63)
    noise = torch.randn(spec.shape, generator=generator, dtype=torch.float32)
    if spec.init == "normal":
        tensor = noise * spec.std
    elif spec.init == "norm":
        tensor = 1.0 + 0.1 * noise
    elif spec.init == "bias":
        tensor = 0.02 * noise
    else:
        raise ValueError(f"tensor {spec.name} has unknown init {spec.init!r}; expected normal, norm or bias")
    return tensor.to(dtype).contiguous()


def _plan_shards(specs: list[TensorSpec], itemsize: int, max_shard_bytes: int | None) -> list[list[TensorSpec]]:
    total = sum(s.numel for s in specs) * itemsize
    largest = max(s.numel for s in specs) * itemsize
    if max_shard_bytes is None:  # about four shards, so even tiny checkpoints exercise the index
        max_shard_bytes = max(largest, min(5 * 10**9, -(-total // 4)))
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = spec.numel * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def generation_config(config: dict) -> dict:
    """``generation_config.json`` as released (sampling at temperature 0.6, top_p 0.9) for a config dict."""
    tc = config["text_config"]
    return {"bos_token_id": tc["bos_token_id"], "do_sample": True, "eos_token_id": tc["eos_token_id"],
            "pad_token_id": tc["pad_token_id"], "temperature": 0.6, "top_p": 0.9,
            "transformers_version": TRANSFORMERS_VERSION}


def processor_config(config: dict) -> dict:
    """``processor_config.json`` as transformers 5.23's Llama4Processor.save_pretrained writes it (image processor
    settings nested); the tiles are the vision tower's ``image_size``."""
    vc = config["vision_config"]
    image_processor = {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Llama4ImageProcessor", "image_std": [0.5, 0.5, 0.5],
        "max_patches": 16, "resample": 2, "rescale_factor": 1 / 255, "resize_to_max_canvas": False,
        "size": {"height": vc["image_size"], "width": vc["image_size"]},
    }
    return {"fake_image_token": "<|image|>", "image_processor": image_processor, "image_token": "<|image|>",
            "patch_size": vc["patch_size"], "processor_class": "Llama4Processor"}


def write_checkpoint(out_dir: str | Path, preset: str, seed: int = 0, dtype: str = "float32",
                     max_shard_bytes: int | None = None, quantize: str | None = None) -> Path:
    """Write a random checkpoint of ``preset`` into ``out_dir`` (created if needed) and return its path.

    ``dtype`` is the stored weight type (float32, bfloat16, float16); ``max_shard_bytes`` caps a shard's size
    (default: a quarter of the model, so every preset gets several shards). Same seed, same bytes.
    ``quantize`` ("fp8" | "int4"): the same random weights, quantized in the released layout of that scheme
    (cluster/checkpoints/quantize.py).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = get_preset(preset)
    qc = quantization_config(quantize, config) if quantize else None
    torch_dtype = DTYPES[dtype]
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    specs = tensor_specs(config)
    shards = _plan_shards(specs, itemsize, max_shard_bytes)
    for stale in out.glob("model*.safetensors*"):
        stale.unlink()

    weight_map: dict[str, str] = {}
    for index, shard in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {spec.name: _make_tensor(spec, seed, torch_dtype) for spec in shard}
        if qc:
            tensors = quantize_tensors(tensors, qc)
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        (out / filename).chmod(0o644)  # safetensors creates files readable by the owner only
        weight_map.update(dict.fromkeys(tensors, filename))
    total_parameters = sum(s.numel for s in specs)
    total_size = sum((out / f).stat().st_size for f in set(weight_map.values())) if qc else total_parameters * itemsize
    index_json = {"metadata": {"total_parameters": total_parameters, "total_size": total_size},
                  "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")

    config["dtype"] = dtype
    if qc:
        config["quantization_config"] = qc
    config["transformers_version"] = TRANSFORMERS_VERSION
    (out / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2) + "\n")
    write_tokenizer_files(out, model_max_length=config["text_config"]["max_position_embeddings"])
    processor = processor_config(config)
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    # The released checkpoints' layout, read by older transformers: the image processor's settings on their own.
    preprocessor = dict(processor["image_processor"], processor_class="Llama4Processor")
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2, sort_keys=True) + "\n")
    return out


def add_checkpoint_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Register ``checkpoint --preset P --out DIR [--seed N] [--dtype D] [--max-shard-bytes B]``."""
    parser = subparsers.add_parser("checkpoint", help="write a random Llama 4 checkpoint in the Hugging Face layout")
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), help="model shape")
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same weights)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="stored weight dtype")
    parser.add_argument("--max-shard-bytes", type=int, default=None,
                        help="largest safetensors shard in bytes (default: about a quarter of the model)")
    parser.add_argument("--quantize", default=None, choices=SCHEMES,
                        help="the same weights quantized as released: fp8 (Meta's fbgemm_fp8) or int4 "
                             "(compressed-tensors W4A16)")
    parser.set_defaults(func=main_checkpoint)


def main_checkpoint(args: argparse.Namespace) -> int:
    """Run the ``checkpoint`` subcommand; prints where the checkpoint went and its size."""
    out = write_checkpoint(args.out, args.preset, seed=args.seed, dtype=args.dtype,
                           max_shard_bytes=args.max_shard_bytes, quantize=args.quantize)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    meta = index["metadata"]
    shards = len(set(index["weight_map"].values()))
    print(f"wrote {args.preset} ({meta['total_parameters']:,} parameters, {meta['total_size']:,} bytes "
          f"in {shards} shards, {args.dtype}{', ' + args.quantize if args.quantize else ''}) to {out}")
    return 0
