"""Control plane: deployment config, engine, public API."""

from llama4serve.cluster.engine.llm import LLM
from llama4serve.cluster.outputs import Completion
from llama4serve.cluster.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "Completion"]
