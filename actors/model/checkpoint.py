"""Reads tensors from a Hugging Face safetensors checkpoint (sharded with an index, or a single file).

Slices are read with `safe_open(...).get_slice`, so a caller can take experts [e0, e1) of a fused expert tensor
without reading the other experts' bytes. `bytes_read` counts what was materialised (for shard-loading tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # by config name

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TEXT_PREFIX = "language_model.model."
LM_HEAD = "language_model.lm_head.weight"


class CheckpointReader:
    """Tensor lookup over the shards of one checkpoint directory."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        index_path = self.model_dir / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index_path}: not a safetensors index with a weight_map ({e})") from None
        elif (self.model_dir / SINGLE_FILE).is_file():
            with safe_open(self.model_dir / SINGLE_FILE, "pt") as f:
                weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise ValueError(
                f"{self.model_dir}: no weights found; expected {INDEX_FILE} with its shards, or {SINGLE_FILE}"
            )
        missing = sorted({s for s in weight_map.values() if not (self.model_dir / s).is_file()})
        if missing:
            raise ValueError(f"{self.model_dir}: shard files named in {INDEX_FILE} are missing: {missing}")
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}
        self.bytes_read = 0

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise ValueError(f"{self.model_dir}: tensor {name!r} is missing from the checkpoint")
        shard = self.weight_map[name]
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.model_dir / shard, "pt")
        return self._handles[shard]

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        """The stored dtype as safetensors names it ("F32", "BF16", "F8_E4M3", "I32", ...), from the header."""
        return self._handle(name).get_slice(name).get_dtype()

    def get(self, name: str, dtype: torch.dtype | None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The whole tensor `name`, cast to `dtype` (None: as stored); checks `shape` when given."""
        tensor = self._handle(name).get_tensor(name)
        return self._finish(name, tensor, dtype, shape)

    def get_rows(
        self, name: str, start: int, stop: int, dtype: torch.dtype | None, shape: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """Rows [start, stop) of the first axis of `name` (e.g. experts [e0, e1)), read without the other rows."""
        tensor = self._handle(name).get_slice(name)[start:stop]
        return self._finish(name, tensor, dtype, shape)

    def _finish(self, name, tensor: torch.Tensor, dtype, shape) -> torch.Tensor:
        self.bytes_read += tensor.numel() * tensor.element_size()
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"{self.model_dir}: tensor {name!r} has shape {tuple(tensor.shape)}; config.json implies {tuple(shape)}"
            )
        return (tensor if dtype is None else tensor.to(dtype)).contiguous()

    def close(self) -> None:
        self._handles.clear()
