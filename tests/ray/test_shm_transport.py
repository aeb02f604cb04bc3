"""The router's shared-memory exchange between real Ray actors (`ExchangeProbe`): blocks arrive intact, larger
blocks take the collective, a SIGKILLed or SIGSTOPped peer makes the survivors raise within the timeout (never a
hang), and the group re-forms with a replacement, as the engine's recovery does."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray

from llama4serve.actors.parallel.exchange_probe import ExchangeProbe
from llama4serve.actors.parallel.shm_transport import POLL_S

H = 64
TIMEOUT_S = 8.0


def _probes(n: int) -> list:
    return [ray.remote(ExchangeProbe).options(num_cpus=1).remote(1) for _ in range(n)]


def _join(probes: list, first_expert_rank: int, transport: str = "shm") -> list[str]:
    master = ray.get(probes[0].master_address.remote(), timeout=60)
    return ray.get([p.join.remote(master, r, len(probes), first_expert_rank, TIMEOUT_S, transport)
                    for r, p in enumerate(probes)], timeout=120)


def _run(probes: list, exchanges: int, block_rows: int, capacity: int) -> list[dict]:
    return ray.get([p.run.remote(exchanges, block_rows, capacity, H) for p in probes], timeout=120)


@pytest.mark.parametrize("attention,experts", [(1, 2), (2, 3)])
def test_blocks_arrive_intact_over_both_paths(ray_session, attention, experts):
    probes = _probes(attention + experts)
    try:
        assert _join(probes, attention) == ["shm"] * len(probes)
        shm = _run(probes, 200, 3, 2)  # each attention rank checks it gets its own rows back
        assert all(r["seconds"] > 0 for r in shm)
        rows = (1 << 20) // (4 * H) + 1  # one row more than a slot holds: the collective carries it
        big = _run(probes, 3, rows, rows - 1)
        assert [r["shm_exchanges"] for r in shm] == [200] * len(probes)
        assert [r["shm_exchanges"] for r in big] == [0] * len(probes)  # the gloo all_to_all carried them
        assert [r["shm_exchanges"] for r in _run(probes, 20, 3, 2)] == [20] * len(probes)  # back, in step
    finally:
        for p in probes:
            ray.kill(p)


def _raises_soon(ref, within_s: float) -> str:
    t0 = time.monotonic()
    with pytest.raises(ray.exceptions.RayTaskError) as info:
        ray.get(ref, timeout=TIMEOUT_S + 30)
    assert time.monotonic() - t0 < within_s
    return str(info.value)


def test_dead_peer_raises_at_once_and_the_group_reforms(ray_session):
    """2x1: attention-1 is SIGKILLed before it dispatches. The expert (waiting for it) and attention-0 (waiting
    for the live expert's reply) both raise within a few polls. Then a replacement joins a new group (a new
    port, a new file) and every rank exchanges again."""
    probes = _probes(3)
    try:
        _join(probes, 2)
        _run(probes, 5, 2, 1)
        waiting_attention = probes[0].dispatch_then_combine.remote(2, 1, H)
        waiting_expert = probes[2].run.remote(1, 2, 1, H)
        time.sleep(0.5)  # both are asleep in futex_wait now
        os.kill(ray.get(probes[1].pid.remote(), timeout=30), signal.SIGKILL)
        assert "died" in _raises_soon(waiting_expert, 10 * POLL_S + 5)
        message = _raises_soon(waiting_attention, 10 * POLL_S + 5)
        assert "rank 1" in message and ("died" in message or "aborted" in message)
        probes[1] = _probes(1)[0]
        assert _join(probes, 2) == ["shm"] * 3
        _run(probes, 20, 2, 1)
    finally:
        for p in probes:
            ray.kill(p)


def test_stopped_peer_raises_within_the_timeout(ray_session):
    """1x2: expert-1 is SIGSTOPped (alive, never answers): attention-0 raises after TIMEOUT_S, not later, and
    aborts the group, so expert-0's next exchange raises at once instead of waiting out its own timeout."""
    probes = _probes(3)
    pid = ray.get(probes[2].pid.remote(), timeout=30)
    try:
        _join(probes, 1)
        os.kill(pid, signal.SIGSTOP)
        expert_0 = probes[1].run.remote(1, 2, 1, H)
        message = _raises_soon(probes[0].dispatch_then_combine.remote(2, 1, H), TIMEOUT_S + 10)
        assert "did not reach MoE exchange" in message and "collective_timeout_s" in message
        assert ray.get(expert_0, timeout=30)["seconds"] > 0  # it was served before the wait for expert-1
        assert "aborted" in _raises_soon(probes[1].run.remote(1, 2, 1, H), 5)
    finally:
        os.kill(pid, signal.SIGCONT)
        for p in probes:
            ray.kill(p)
