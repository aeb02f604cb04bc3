"""Control plane: deployment config, engine, public API."""

from .llm import LLM
from .outputs import Completion
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "Completion"]
