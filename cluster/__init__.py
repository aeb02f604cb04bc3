"""Control plane: deployment config, engine, public API.

`LLM`, `SamplingParams` and `Completion` are loaded on first use (PEP 562), so that torch-free parts of the
control plane (the Serve Ingress, the request policy, the configuration) import without the engine and torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llama4serve.cluster.engine.llm import LLM
    from llama4serve.cluster.outputs import Completion
    from llama4serve.cluster.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "Completion"]

_LAZY = {
    "LLM": "llama4serve.cluster.engine.llm",
    "Completion": "llama4serve.cluster.outputs",
    "SamplingParams": "llama4serve.cluster.sampling_params",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
