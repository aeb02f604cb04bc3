"""The data plane of one model instance, as the engine sees it: Ray start-up, the placement group (a bundle per
actor), the attention and expert actors (named by role, `attention-0`, `expert-2`, so the Ray dashboard shows
them), their process group, and every wait on them under one deadline: start-up raises `DataPlaneError`, a
step's calls end in results or errors (`collect`) that `recovery.py` sorts into dead actors and bugs; never hangs.
"""

from __future__ import annotations

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
from llama4serve.cluster.engine import step_calls
from llama4serve.cluster.errors import DataPlaneError


@dataclass
class InFlight:
    """The step last launched: what each attention actor got (by index), and each call's actor and ref."""

    batches: dict[int, StepBatch]
    capacity: int
    num_steps: int
    names: list[str]
    refs: list


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
        self.bounds: list[tuple[int, int]] | None = None
        self.inflight: InFlight | None = None
        self.loops: list = []  # the expert actors' standing loops (`ExpertShardActor.serve`), over shared memory
        self._uses_local_ray = start_ray(config)
        try:
            self._start(dtype, block_size, num_full, num_chunk, num_experts)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, dtype: str, block_size: int, num_full: int, num_chunk: int, num_experts: int) -> None:
        config = self.config
        a, e = config.attention_actors, config.expert_actors
        self.bounds = expert_split(num_experts, e) if e else None
        self.placement = place(config)
        self.namespace = f"llama4serve-{uuid.uuid4().hex[:8]}"
        self._kv_args = (dtype, num_full, num_chunk, block_size)
        self.attention = [self.spawn(f"attention-{i}") for i in range(a)]
        self.experts = [self.spawn(f"expert-{j}") for j in range(e)]
        names = self.names()
        self.actor_info = dict(zip(names, self.gather([x.ready.remote() for x in self.attention + self.experts])))
        if e:
            self.backend = self.start_group()

    def spawn(self, name: str):
        """Starts the actor `name` (`attention-i` or `expert-j`) in its own bundle of the placement group; the
        recovery starts a replacement the same way, under the same name."""
        config, placement = self.config, self.placement
        a, e = config.attention_actors, config.expert_actors
        role, index = name.rsplit("-", 1)
        index = int(index)
        # Attention and expert phases alternate within a step, so each role gets the cores to itself.
        cores = os.cpu_count() or 1
        threads = config.torch_threads or max(1, cores // (a if role == "attention" else max(e, 1)))
        cls = AttentionActor if role == "attention" else ExpertShardActor
        # With expert actors the roles take turns on the cores: an OpenMP thread that spins after its work would
        # hold the core the peer's phase needs (measured: 3-4x the in-step exchange cost on 2 cores), so they sleep.
        env = {"env_vars": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}} if e else None
        options = ray.remote(cls).options(
            name=name, namespace=self.namespace, num_cpus=config.num_cpus_per_actor, num_gpus=placement.num_gpus,
            max_concurrency=1 if role == "attention" else 2,  # an expert's standing loop leaves room for calls
            scheduling_strategy=placement.strategy(index if role == "attention" else a + index),
            runtime_env=env)
        dtype, num_full, num_chunk, block_size = self._kv_args
        if role == "attention":
            return options.remote(config.model, dtype, num_full, num_chunk, block_size, threads, self.bounds, a,
                                  device=config.device, cuda_graph_batch_sizes=config.cuda_graph_batch_sizes)
        return options.remote(config.model, dtype, self.bounds, index, threads, device=config.device)

    def form_group(self) -> list:
        """Every rank joins a new process group (a new port on attention-0's node; each rank leaves its old group
        first): the refs of the joins, which return the backend."""
        a, e, timeout = len(self.attention), len(self.experts), self.config.collective_timeout_s
        master = ray.get(self.attention[0].master_address.remote(), timeout=timeout)
        transport = self.config.expert_transport
        joins = [x.join_group.remote(master, i, a + e, timeout, transport) for i, x in enumerate(self.attention)]
        return joins + [x.join_group.remote(master, a + j, a + e, a, timeout, transport)
                        for j, x in enumerate(self.experts)]

    def start_group(self) -> str:
        """Forms a new process group (`form_group`) and, when its transport needs no call per step (shared
        memory), starts the expert actors' standing loops; the backend."""
        backend = self.gather(self.form_group())[0]
        standing = self.gather([self.experts[0].standing.remote()])[0]
        self.loops = [x.serve.remote() for x in self.experts] if standing else []
        return backend

    def _expert_refs(self, capacity: int, num_steps: int) -> list:
        return self.loops or [x.run_step.remote(capacity, num_steps) for x in self.experts]

    def names(self) -> list[str]:
        return ([f"attention-{i}" for i in range(len(self.attention))]
                + [f"expert-{j}" for j in range(len(self.experts))])

    def launch(self, batches: dict[int, StepBatch], capacity: int, num_steps: int) -> list:
        """Starts one step: `batches` by attention actor; with expert actors every rank takes part."""
        refs = [self.attention[i].step.remote(batch) for i, batch in batches.items()]
        refs += self._expert_refs(capacity, num_steps)
        names = [f"attention-{i}" for i in batches] + [f"expert-{j}" for j in range(len(self.experts))]
        self.inflight = InFlight(batches, capacity, num_steps, names, refs)
        return refs

    def relaunch(self, replaced: set[int]) -> list:
        """Redoes the step in flight after a recovery: with expert actors every rank runs it again (the attention
        KV it wrote is rewritten with the same values), the replaced attention actors `replaced` with no
        sequences; without, only the replaced ones run, empty, and the others' results stand."""
        step, batches, refs = self.inflight, {}, []
        for (i, batch), ref in zip(step.batches.items(), step.refs):
            idle = StepBatch([], step.capacity, [], step.num_steps, batch.micro_batches)
            batches[i] = idle if i in replaced else batch
            refs.append(self.attention[i].step.remote(batches[i]) if i in replaced or self.experts else ref)
        refs += self._expert_refs(step.capacity, step.num_steps)
        self.inflight = InFlight(batches, step.capacity, step.num_steps, step.names, refs)
        return refs

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

    def collect(self, refs: list) -> list:
        """Every call's result or its exception (`step_calls.collect`; the standing loops' refs are `loops`)."""
        return step_calls.collect(refs, self.loops, self.deadline_s)

    async def collect_async(self, refs: list) -> list:
        """`collect` for asyncio."""
        return await step_calls.collect_async(refs, self.loops, self.deadline_s)

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
