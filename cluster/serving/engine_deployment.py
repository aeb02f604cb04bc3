"""The `Engine` Serve deployment (one replica = one model instance with its data-plane actors) and the
ingress-side client that talks to it through a DeploymentHandle with the AsyncEngine interface.

A request the engine refuses (bad input: a ValueError before the first output) comes back as a `Rejected` item
rather than an exception, so that Serve does not log an ordinary client mistake as a failed request with its
traceback; the Engine logs it in one INFO line and the client raises the ValueError on the ingress side.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import AsyncIterator

from ray import serve

from llama4serve.cluster.engine.async_engine import AsyncEngine, Prompt
from llama4serve.cluster.outputs import RequestOutput
from llama4serve.cluster.serving.policy import DEADLINE, ServingError, one_line
from llama4serve.cluster.sampling_params import SamplingParams
from llama4serve.cluster.serving.serve_config import ServeConfig

logger = logging.getLogger("ray.serve")  # in a replica: its Serve log file, with the request id


@dataclass(frozen=True)
class Rejected:
    """The engine refused the request before its first output (what its ValueError said)."""

    message: str


@serve.deployment(
    ray_actor_options={"num_cpus": 0},  # the data-plane actors hold the reserved CPUs/GPUs
    health_check_period_s=10,
    health_check_timeout_s=60,
)
class Engine:
    """Owns an AsyncEngine; Serve replaces the replica when `check_health` raises (a data-plane actor died)."""

    def __init__(self, config: ServeConfig):
        self.engine = AsyncEngine(config.engine_config())

    async def generate(self, prompt: Prompt, params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput | Rejected]:
        started = False
        try:
            async for out in self.engine.generate(prompt, params, request_id):
                started = True
                yield out
        except ValueError as err:
            if started:
                raise
            message = one_line(str(err))
            logger.info("request %s rejected: %s", request_id, message)
            yield Rejected(message)

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def stats(self) -> dict:
        return self.engine.stats()

    def check_health(self) -> None:
        if self.engine.core.failure is not None:
            raise RuntimeError(f"model instance is down: {self.engine.core.failure}")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


class EngineClient:
    """The AsyncEngine interface over a handle to the Engine deployment, for the ingress.

    Aborting cancels the request's stream; Serve propagates the cancellation to the replica that runs it, whose
    generator then aborts the request (this works whichever of several Engine replicas has it).
    """

    def __init__(self, handle, request_timeout_s: float | None = None):
        self._handle = handle.options(stream=True)
        self._running: dict[str, object] = {}
        self.request_timeout_s = request_timeout_s  # a request still running after this is aborted

    async def generate(self, prompt: Prompt, params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        """Raises ValueError for a rejected request, ServingError(DEADLINE) past request_timeout_s."""
        stream = self._handle.generate.remote(prompt, params, request_id)
        self._running[request_id] = stream
        timeout = self.request_timeout_s
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        finished = False
        try:
            while True:
                timer = asyncio.timeout_at(deadline)
                try:
                    async with timer:  # no yield inside: only this await is timed
                        out = await anext(stream)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    if not timer.expired():
                        raise
                    raise ServingError(DEADLINE, f"the request did not finish within {timeout:g} s "
                                                 "(request_timeout_s) and was aborted; ask for fewer tokens") from None
                if isinstance(out, Rejected):
                    finished = True  # nothing to abort
                    raise ValueError(out.message)
                finished = out.finished
                yield out
        finally:
            self._running.pop(request_id, None)
            if not finished:
                stream.cancel()

    async def abort(self, request_id: str) -> None:
        stream = self._running.pop(request_id, None)
        if stream is not None:
            stream.cancel()
