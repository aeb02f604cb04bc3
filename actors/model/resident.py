"""What an actor holds in memory: the bytes of every tensor storage reachable from an object, each counted once.

Walks attributes, dicts, lists and tuples from a root (an actor, a model, `LocalExperts`) and sums the
storages of the tensors found there, by storage: views that share one (a [:0] slice, a transpose, the per-layer
views of a KV pool) count it whole, once. That is how much memory the tensors pin, whatever their shapes say,
so a float copy kept anywhere under the root (a dequantized expert, a stale checkpoint tensor) shows up.
"""

from __future__ import annotations

import ctypes
import types

import torch

_LEAVES = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device, torch.Generator,
           types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, type, ctypes._SimpleCData,
           ctypes.Structure, ctypes.Array, ctypes.CDLL)


def _storage(t: torch.Tensor) -> tuple[tuple, int]:
    """(a key naming t's storage, its bytes)."""
    if t.is_mkldnn:  # oneDNN-blocked weights have no untyped storage
        return ("mkldnn", id(t)), t.numel() * t.element_size()
    storage = t.untyped_storage()
    return (storage.device.type, storage.data_ptr(), storage.nbytes()), storage.nbytes()


def tensor_bytes(*roots) -> int:
    """Bytes of the distinct tensor storages reachable from `roots`."""
    seen_objects: set[int] = set()
    storages: dict[tuple, int] = {}
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if isinstance(obj, _LEAVES) or id(obj) in seen_objects:
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            key, nbytes = _storage(obj)
            storages[key] = nbytes
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        else:
            stack.extend(getattr(obj, "__dict__", {}).values())
            stack.extend(getattr(obj, slot) for slot in getattr(type(obj), "__slots__", ()) if hasattr(obj, slot))
    return sum(storages.values())
