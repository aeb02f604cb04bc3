"""The per-step half of structured outputs (a request's matcher, the logits mask): they run in the attention
actor, so they live in ``actors/runner/grammar.py``; re-exported here for the engine side and its tests."""

from llama4serve.actors.runner.grammar import (
    StructuredMatcher, Utf8Guard, allocate_bitmask, allowed_token_ids, apply_token_bitmask,
)

__all__ = ["StructuredMatcher", "Utf8Guard", "allocate_bitmask", "allowed_token_ids", "apply_token_bitmask"]
