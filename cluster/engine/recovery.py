"""Surviving a failed data-plane actor: tell a dead actor from a bug, replace the dead one in its own
placement-group bundle under the same name, and re-form the process group, within a restart budget.

What the engine does around it (`EngineCore.step`): a step whose calls fail because an actor died is redone
once the replacement is up. An expert actor's replacement loads only its shard and the attention KV is still
valid, so every rank simply runs the interrupted step again. An attention actor's KV died with it, so its
sequences start over from their tokens (prompt + tokens so far) on the replacement while the other attention
actors redo their part of the step. Sampling draws from (request seed, tokens generated so far) only, so the
redone and recomputed tokens are the ones a failure-free run samples.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque

import ray

from llama4serve.cluster.errors import DataPlaneError
from llama4serve.cluster.engine.data_plane import DataPlane
from llama4serve.cluster.engine.step_calls import StepLate

logger = logging.getLogger("llama4serve.recovery")


class RestartBudget:
    """At most `max_restarts` replacements per actor within any `window_s` seconds."""

    def __init__(self, max_restarts: int, window_s: float):
        self.max_restarts = max_restarts
        self.window_s = window_s
        self._times: dict[str, deque[float]] = {}

    def charge(self, name: str, cause: str) -> int:
        """Counts one restart of `name`; returns its restarts in the window, or raises when the budget is spent."""
        now = time.monotonic()
        times = self._times.setdefault(name, deque())
        while times and now - times[0] > self.window_s:
            times.popleft()
        if not self.max_restarts:
            raise DataPlaneError(f"{name} failed ({cause}); recovery is off (max_actor_restarts is 0)")
        if len(times) >= self.max_restarts:
            raise DataPlaneError(
                f"{name} failed ({cause}) and is not restarted again: it was restarted {len(times)} times in the "
                f"last {self.window_s:g} s, and max_actor_restarts is {self.max_restarts} per "
                f"actor_restart_window_s")
        times.append(now)
        return len(times)


def _first_line(err: BaseException) -> str:
    """One line for a log or an error: the exception a remote traceback ends in, else the error's first line."""
    lines = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines() if line.strip()]
    if len(lines) > 1 and any(line.lstrip().startswith('File "') for line in lines):
        return lines[-1].strip()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def dead_actors(names: list[str], outcomes: list) -> dict[str, str]:
    """The actors whose calls show they died (or hang past the deadline): {name: cause}, empty when the step
    succeeded. Raises DataPlaneError for failures that no dead actor explains (a bug, or everything late)."""
    errors = {n: o for n, o in zip(names, outcomes) if isinstance(o, BaseException)}
    if not errors:
        return {}
    dead = {n: _first_line(o) for n, o in errors.items() if isinstance(o, (ray.exceptions.RayActorError, StepLate))}
    if not dead or len(errors) == len(dead) == len(names) and all(isinstance(o, StepLate) for o in errors.values()):
        name, err = next(iter(errors.items()))
        raise DataPlaneError(f"data-plane actor {name} failed: {err}") from err
    return dead


class Recovery:
    """Replaces the dead actors of one `DataPlane` (see the module docstring)."""

    def __init__(self, data_plane: DataPlane, max_restarts: int, window_s: float, metrics=None):
        self.data_plane = data_plane
        self.budget = RestartBudget(max_restarts, window_s)
        self.metrics = metrics
        self.num_recoveries = 0

    def replace(self, dead: dict[str, str]) -> set[int]:
        """Replaces every actor in `dead` ({name: cause}) and re-forms the process group; returns the indices
        of the replaced attention actors. Raises DataPlaneError (with the cause) past the restart budget or when
        a replacement cannot start."""
        dp, t0 = self.data_plane, time.monotonic()
        counts = {name: self.budget.charge(name, cause) for name, cause in dead.items()}
        old_pids = {name: dp.actor_info.get(name, {}).get("pid") for name in dead}
        replacements = {}
        for name in dead:
            role, index = name.rsplit("-", 1)
            group = dp.attention if role == "attention" else dp.experts
            ray.kill(group[int(index)], no_restart=True)  # a hung one too; frees its name and bundle
            replacements[name] = group[int(index)] = self._spawn(name)
        load_timeout = dp.config.placement_timeout_s + dp.config.collective_timeout_s
        for name, actor in replacements.items():
            try:
                dp.actor_info[name] = ray.get(actor.ready.remote(), timeout=load_timeout)
            except Exception as err:  # noqa: BLE001 - any failure to start ends the instance, with its cause
                raise DataPlaneError(f"{name} failed ({dead[name]}) and its replacement could not start: "
                                     f"{_first_line(err)}") from err
        if dp.experts:
            try:
                dp.start_group()
            except (DataPlaneError, ray.exceptions.GetTimeoutError) as err:
                raise DataPlaneError(f"could not re-form the process group after replacing {', '.join(dead)}: "
                                     f"{err}") from err
        seconds = time.monotonic() - t0
        self.num_recoveries += 1
        if self.metrics is not None:
            self.metrics.recovered([name.rsplit("-", 1)[0] for name in dead], seconds)
        for name in dead:
            logger.warning(
                "replaced %s (pid %s, %s) with pid %s in its placement-group bundle in %.1f s; restart %d of %d "
                "allowed per %g s", name, old_pids[name], dead[name], dp.actor_info[name]["pid"], seconds,
                counts[name], self.budget.max_restarts, self.budget.window_s)
        return {int(n.rsplit("-", 1)[1]) for n in dead if n.startswith("attention-")}

    def _spawn(self, name: str):
        """A new actor under `name`; Ray frees a dead actor's name a moment after its death is known."""
        deadline = time.monotonic() + 30
        while True:
            try:
                return self.data_plane.spawn(name)
            except ValueError:  # "The name ... is already taken"
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
