"""Placement of one model instance: a placement group with a bundle per data-plane actor, and the actors
themselves, named by role (`attention-0`, `expert-2`) so the Ray dashboard shows them."""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .config import EngineConfig


@dataclass
class Placement:
    group: PlacementGroup
    attention_bundles: list[int]
    expert_bundles: list[int]
    num_gpus: float  # per actor

    def strategy(self, bundle: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=bundle)

    def remove(self) -> None:
        remove_placement_group(self.group)


def _bundle(cpus: float, gpus: float, extra: dict[str, float]) -> dict[str, float]:
    bundle = {"CPU": cpus, **extra}
    if gpus:
        bundle["GPU"] = gpus
    return bundle


def place(config: EngineConfig, timeout_s: float) -> Placement:
    """Reserves the bundles (blocks until Ray can place them, up to `timeout_s`)."""
    gpus = config.num_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    bundles = [_bundle(config.num_cpus_per_actor, gpus, config.attention_resources)] * config.attention_actors
    bundles += [_bundle(config.num_cpus_per_actor, gpus, config.expert_resources)] * config.expert_actors
    group = placement_group(bundles, strategy=config.placement_strategy)
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise RuntimeError(
            f"Ray could not place {len(bundles)} actors ({bundles[0]} each, strategy {config.placement_strategy}) "
            f"within {timeout_s:.0f} s; cluster resources: {ray.cluster_resources()}"
        ) from None
    a = config.attention_actors
    return Placement(group, list(range(a)), list(range(a, len(bundles))), gpus)
