"""The recovery's restart budget and how it tells dead actors from bugs (no Ray cluster needed)."""

from __future__ import annotations

import time

import pytest
import ray

from llama4serve.cluster.config import EngineOptions
from llama4serve.cluster.engine.step_calls import StepLate, _Settling
from llama4serve.cluster.engine.recovery import RestartBudget, dead_actors
from llama4serve.cluster.errors import DataPlaneError

NAMES = ["attention-0", "expert-0", "expert-1"]


def _task_error(message: str) -> ray.exceptions.RayTaskError:
    return ray.exceptions.RayTaskError("step", f"Traceback\n  File \"x.py\"\nRuntimeError: {message}",
                                       RuntimeError(message))


def test_budget_per_actor_within_the_window():
    budget = RestartBudget(max_restarts=2, window_s=0.3)
    assert budget.charge("expert-0", "died") == 1 and budget.charge("expert-0", "died") == 2
    assert budget.charge("expert-1", "died") == 1  # per actor
    with pytest.raises(DataPlaneError, match=r"expert-0 failed \(died\) and is not restarted again: it was "
                                             r"restarted 2 times in the last 0.3 s, and max_actor_restarts is 2"):
        budget.charge("expert-0", "died")
    time.sleep(0.35)  # the window has passed
    assert budget.charge("expert-0", "died") == 1


def test_zero_restarts_is_fail_stop():
    with pytest.raises(DataPlaneError, match=r"recovery is off \(max_actor_restarts is 0\)"):
        RestartBudget(0, 600).charge("attention-0", "died")


def test_dead_actors_sorts_deaths_from_bugs():
    ok = [[], [], []]
    assert dead_actors(NAMES, ok) == {}
    died = [_task_error("Connection closed by peer"), ray.exceptions.ActorDiedError(), 3]
    assert list(dead_actors(NAMES, died)) == ["expert-0"]  # the others' errors follow from its death
    hung = [_task_error("timed out"), StepLate(34), 3]
    assert "hung" in dead_actors(NAMES, hung)["expert-0"]
    with pytest.raises(DataPlaneError, match="(?s)data-plane actor attention-0 failed: .*bad index"):
        dead_actors(NAMES, [_task_error("bad index"), 1, 2])  # no dead actor explains it: a bug
    with pytest.raises(DataPlaneError, match="attention-0 failed: hung"):
        dead_actors(NAMES, [StepLate(34)] * 3)  # nobody answered: nothing to blame on one actor


def test_budget_options_are_validated():
    assert EngineOptions().max_actor_restarts == 3 and EngineOptions().actor_restart_window_s == 600
    with pytest.raises(ValueError, match="max_actor_restarts"):
        EngineOptions(max_actor_restarts=-1)
    with pytest.raises(ValueError, match="actor_restart_window_s"):
        EngineOptions(actor_restart_window_s=0)


def test_a_standing_loop_is_waited_for_only_after_a_failure():
    """The expert actors' loops (`ExpertShardActor.serve`) run on after a good step: they are not waited for and
    count as None. Once a call fails every loop ends, so one still running at the deadline is hung."""
    calls, loops = ["attention-0", "attention-1"], ["loop-0", "loop-1"]
    good = _Settling(calls + loops, loops, 30)
    assert good.waiting()[0] == calls
    for call in calls:
        good.record(call, [])
    assert good.waiting() is None and good.outcomes() == [[], [], None, None]
    failed = _Settling(calls + loops, loops, 30)
    failed.record("attention-0", _task_error("PeerFailed: rank 3 died"))
    assert failed.waiting()[0] == ["attention-1", "loop-0", "loop-1"]
    assert failed.deadline - time.monotonic() <= 10  # HUNG_GRACE_S after a task error
    failed.record("loop-0", ray.exceptions.ActorDiedError())
    failed.deadline = time.monotonic()  # the grace period is over
    outcomes = failed.outcomes()
    assert isinstance(outcomes[2], ray.exceptions.ActorDiedError)
    assert isinstance(outcomes[1], StepLate) and isinstance(outcomes[3], StepLate)
    assert list(dead_actors(["attention-0", "attention-1", "expert-0", "expert-1"], outcomes)) == [
        "attention-1", "expert-0", "expert-1"]
