"""The data plane of one model instance, as the engine sees it: Ray start-up, the placement group (a bundle per
actor), the attention and expert actors (named by role, `attention-0`, `expert-2`, so the Ray dashboard shows
them), their process group, and every wait on them under one deadline. A dead actor or a step that outlives
the deadline raises `DataPlaneError`, never hangs.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
import uuid
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from llama4serve.actors.attention_actor import AttentionActor
from llama4serve.actors.expert_actor import ExpertShardActor
from llama4serve.actors.model.experts import expert_split
from llama4serve.actors.step_io import StepBatch
from llama4serve.cluster.config import EngineConfig
from llama4serve.cluster.errors import DataPlaneError


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


@dataclass
class Placement:
    group: PlacementGroup
    num_gpus: float  # per actor

    def strategy(self, bundle: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=bundle)


def place(config: EngineConfig) -> Placement:
    """Reserves a bundle per actor, attention actors first (waits up to `placement_timeout_s` for Ray)."""
    gpus = config.num_gpus_per_actor
    if gpus is None:  # a GPU per actor when the cluster has them, unless it is asked to compute on CPU
        gpus = 1.0 if config.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    if config.device == "cuda" and not gpus:
        raise RuntimeError(
            "device is 'cuda', but this Ray cluster has no GPUs for the actors (no CUDA device in "
            f"{ray.cluster_resources()}); run on GPU nodes, set num_gpus_per_actor, or pass device='cpu'"
        )

    def bundle(extra: dict[str, float]) -> dict[str, float]:
        return {"CPU": config.num_cpus_per_actor, **({"GPU": gpus} if gpus else {}), **extra}

    bundles = [bundle(config.attention_resources)] * config.attention_actors
    bundles += [bundle(config.expert_resources)] * config.expert_actors
    check_fits(bundles, ray.cluster_resources(), _LocalRay.started and _LocalRay.users > 1)
    group = placement_group(bundles, strategy=config.placement_strategy)
    timeout = config.placement_timeout_s
    try:
        ray.get(group.ready(), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise RuntimeError(
            f"Ray could not place {len(bundles)} actors ({bundles[0]} each, strategy {config.placement_strategy}) "
            f"within {timeout:.0f} s; cluster resources: {ray.cluster_resources()}"
        ) from None
    return Placement(group, gpus)


class DataPlane:
    """The actors of one model instance: `attention[i]` serve data-parallel slices of the requests; `experts`
    hold the routed experts when `expert_actors > 0` (every rank then joins every step's collectives)."""

    def __init__(self, config: EngineConfig, dtype: str, block_size: int, num_full: int, num_chunk: int,
                 num_experts: int):
        self.config = config
        self.attention: list = []
        self.experts: list = []
        self.placement: Placement | None = None
        self.backend: str | None = None
        self._uses_local_ray = start_ray(config)
        try:
            self._start(dtype, block_size, num_full, num_chunk, num_experts)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, dtype: str, block_size: int, num_full: int, num_chunk: int, num_experts: int) -> None:
        config = self.config
        a, e = config.attention_actors, config.expert_actors
        bounds = expert_split(num_experts, e) if e else None
        self.placement = placement = place(config)
        namespace = f"llama4serve-{uuid.uuid4().hex[:8]}"
        # Attention and expert phases alternate within a step, so each role gets the cores to itself.
        cores = os.cpu_count() or 1
        attention_threads = config.torch_threads or max(1, cores // a)
        expert_threads = config.torch_threads or max(1, cores // max(e, 1))

        def options(cls, name: str, bundle: int):
            return ray.remote(cls).options(
                name=name, namespace=namespace, num_cpus=config.num_cpus_per_actor, num_gpus=placement.num_gpus,
                max_concurrency=1, scheduling_strategy=placement.strategy(bundle),
            )

        for i in range(a):
            self.attention.append(options(AttentionActor, f"attention-{i}", i).remote(
                config.model, dtype, num_full, num_chunk, block_size, attention_threads, bounds, a,
                device=config.device, cuda_graph_batch_sizes=config.cuda_graph_batch_sizes))
        for j in range(e):
            self.experts.append(options(ExpertShardActor, f"expert-{j}", a + j).remote(
                config.model, dtype, bounds, j, expert_threads, device=config.device))
        names = self.names()
        self.actor_info = dict(zip(names, self.gather([x.ready.remote() for x in self.attention + self.experts])))
        if e:
            timeout = config.collective_timeout_s
            master = ray.get(self.attention[0].master_address.remote(), timeout=timeout)
            joins = [x.join_group.remote(master, i, a + e, timeout) for i, x in enumerate(self.attention)]
            joins += [x.join_group.remote(master, a + j, a + e, a, timeout) for j, x in enumerate(self.experts)]
            self.backend = self.gather(joins)[0]

    def names(self) -> list[str]:
        return ([f"attention-{i}" for i in range(len(self.attention))]
                + [f"expert-{j}" for j in range(len(self.experts))])

    def launch(self, batches: dict[int, StepBatch], capacity: int, num_steps: int) -> list:
        """Starts one step: `batches` by attention actor; with expert actors every rank takes part."""
        refs = [self.attention[i].step.remote(batch) for i, batch in batches.items()]
        return refs + [x.run_step.remote(capacity, num_steps) for x in self.experts]

    @property
    def deadline_s(self) -> float:
        return self.config.collective_timeout_s + 30.0  # the actors' own collectives time out first

    def _late(self) -> DataPlaneError:
        return DataPlaneError(
            f"a data-plane call did not finish within {self.deadline_s:.0f} s (collective_timeout_s + 30)")

    def gather(self, refs: list) -> list:
        """ray.get under the deadline, failing at the first error instead of waiting for the rest."""
        pending, deadline = list(refs), time.monotonic() + self.deadline_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise self._late()
            try:
                ray.get(ready[0])
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
                raise DataPlaneError(f"data-plane actor failed: {err}") from err
        return ray.get(refs)

    async def gather_async(self, refs: list) -> list:
        """`gather` for asyncio: the same deadline, failing at the first error."""
        try:
            return await asyncio.wait_for(asyncio.gather(*refs), timeout=self.deadline_s)
        except asyncio.TimeoutError:
            raise self._late() from None
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
            raise DataPlaneError(f"data-plane actor failed: {err}") from err

    def shutdown(self) -> None:
        """Kills the actors and releases their placement group (idempotent)."""
        for actor in self.attention + self.experts:
            ray.kill(actor)
        self.experts = []
        if self.placement is not None:
            remove_placement_group(self.placement.group)
            self.placement = None
        if self._uses_local_ray:
            self._uses_local_ray = False
            release_ray()
