"""Waiting for one step's data-plane calls under one deadline, and what each call's outcome is: its result, its
exception, `StepLate` for one still running when the step is given up, or None for an expert actor's standing
loop (`ExpertShardActor.serve`) still serving after a good step. `recovery.dead_actors` sorts them."""

from __future__ import annotations

import asyncio
import time

import ray

HUNG_GRACE_S = 10.0  # a call still running this long after another rank's collective failed is hung


class StepLate(Exception):
    """A data-plane call still running when the step was given up (see `DataPlane.collect`)."""

    def __init__(self, deadline_s: float):
        super().__init__(f"hung: still running {HUNG_GRACE_S:g} s after another rank's collective failed, or "
                         f"{deadline_s:.0f} s (collective_timeout_s + 30) after the step began")


def _outcome(ref):
    try:
        return ray.get(ref)
    except Exception as err:  # noqa: BLE001 - the recovery sorts deaths from bugs
        return err


class _Settling:
    """`collect`'s bookkeeping: which calls of a step to wait for next, until when, and what came back."""

    def __init__(self, refs: list, loops: list, deadline_s: float):
        self.refs, self.loops, self.pending, self.deadline_s = refs, set(loops), list(refs), deadline_s
        self.deadline, self.failed, self.results = time.monotonic() + deadline_s, False, {}

    def waiting(self) -> tuple[list, float] | None:
        """(the calls to wait for, seconds left), or None when nothing is left to wait for."""
        refs = self.pending if self.failed else [r for r in self.pending if r not in self.loops]
        left = self.deadline - time.monotonic()
        return (refs, left) if refs and left > 0 else None

    def record(self, ref, outcome) -> None:
        self.pending.remove(ref)
        self.results[ref] = outcome
        self.failed = self.failed or isinstance(outcome, Exception) or ref in self.loops  # a loop ends on errors
        if isinstance(outcome, ray.exceptions.RayTaskError):
            self.deadline = min(self.deadline, time.monotonic() + HUNG_GRACE_S)

    def outcomes(self) -> list:
        """In call order: StepLate for a call still running, None for a loop still serving after a good step."""
        return [self.results[r] if r in self.results else None if r in self.loops and not self.failed
                else StepLate(self.deadline_s) for r in self.refs]


def collect(refs: list, loops: list, deadline_s: float) -> list:
    """Every call's outcome; a call is late after `deadline_s`, or `HUNG_GRACE_S` after another rank's
    collective failed (that rank waited collective_timeout_s for it). A standing loop's ref (in `loops`) runs on
    after a good step: it is waited for only once a call failed (every rank's loop then ends, so one still
    running is hung), and counts as None otherwise."""
    step = _Settling(refs, loops, deadline_s)
    while waiting := step.waiting():
        ready, _ = ray.wait(waiting[0], num_returns=1, timeout=waiting[1])
        for ref in ready:
            step.record(ref, _outcome(ref))
    return step.outcomes()


async def collect_async(refs: list, loops: list, deadline_s: float) -> list:
    """`collect` for asyncio."""
    step, futures = _Settling(refs, loops, deadline_s), {r: asyncio.wrap_future(r.future()) for r in refs}
    while waiting := step.waiting():
        done, _ = await asyncio.wait([futures[r] for r in waiting[0]], timeout=waiting[1],
                                     return_when=asyncio.FIRST_COMPLETED)
        for ref in [r for r in waiting[0] if futures[r] in done]:
            step.record(ref, futures[ref].exception() or futures[ref].result())
    return step.outcomes()
