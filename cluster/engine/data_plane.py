"""Placement of one model instance: a placement group with a bundle per data-plane actor, and the actors
themselves, named by role (`attention-0`, `expert-2`) so the Ray dashboard shows them."""

from __future__ import annotations

import math
import os

from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from llama4serve.cluster.config import EngineConfig


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


class _LocalRay:
    """The local Ray cluster this process started itself (if any) and how many live instances use it."""

    started = False
    users = 0


def start_ray(config: EngineConfig) -> bool:
    """Connects to Ray for one model instance; True if it uses a local cluster this process started.

    With RAY_ADDRESS set it joins that cluster. Otherwise it starts a local one with a logical CPU per actor
    (they mostly wait on I/O), or restarts the one this process started earlier when that is too small for this
    instance and no other instance of this process uses it.
    """
    needed = math.ceil(_num_actors(config) * config.num_cpus_per_actor)
    if ray.is_initialized() and _LocalRay.started and not _LocalRay.users:
        if ray.cluster_resources().get("CPU", 0) < needed:
            ray.shutdown()
    if not ray.is_initialized():
        _LocalRay.started, _LocalRay.users = False, 0
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        else:
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, needed + 1), include_dashboard=False,
                     log_to_driver=False)
            _LocalRay.started = True
    if _LocalRay.started:
        _LocalRay.users += 1
    return _LocalRay.started


def release_ray() -> None:
    """The instance that `start_ray` counted as a user of this process's local Ray has shut down."""
    _LocalRay.users = max(0, _LocalRay.users - 1)


def _num_actors(config: EngineConfig) -> int:
    return config.attention_actors + config.expert_actors


def check_fits(bundles: list[dict[str, float]], total: dict[str, float], shared_local: bool) -> None:
    """Raises at once, naming the shortfall and the fix, when the bundles can never fit the cluster's total."""
    for key in sorted({k for b in bundles for k in b}):
        need, have = sum(b.get(key, 0) for b in bundles), total.get(key, 0)
        if need <= have + 1e-9:
            continue
        hint = {
            "CPU": "start Ray with more logical CPUs (ray.init(num_cpus=...)) or lower num_cpus_per_actor",
            "GPU": "add GPU nodes or lower num_gpus_per_actor (0 runs on CPU)",
        }.get(key, f"add nodes with the custom resource {key!r} or change attention_resources / expert_resources")
        if shared_local and key == "CPU":
            hint = ("this process started that local Ray cluster for an earlier instance that is still running: "
                    "shut that one down first (llm.shutdown()) so that a larger one is started, or call "
                    "ray.init(num_cpus=...) yourself before the first instance")
        raise RuntimeError(
            f"{len(bundles)} actors need {need:g} {key}; this Ray cluster has {have:g} in total: {hint}"
        )


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
    check_fits(bundles, ray.cluster_resources(), _LocalRay.started and _LocalRay.users > 1)
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
