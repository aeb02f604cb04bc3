"""The `Engine` Serve deployment (one replica = one model instance with its data-plane actors) and the
ingress-side client that talks to it through a DeploymentHandle with the AsyncEngine interface."""

from __future__ import annotations

import logging
from typing import AsyncIterator

from ray import serve

from .async_engine import AsyncEngine, Prompt
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .serve_config import ServeConfig

logger = logging.getLogger(__name__)


@serve.deployment(
    ray_actor_options={"num_cpus": 0},  # the data-plane actors hold the reserved CPUs/GPUs
    health_check_period_s=10,
    health_check_timeout_s=60,
)
class Engine:
    """Owns an AsyncEngine; Serve replaces the replica when `check_health` raises (a data-plane actor died)."""

    def __init__(self, config: ServeConfig):
        self.engine = AsyncEngine(config.engine_config())

    async def generate(self, prompt: Prompt, params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        async for out in self.engine.generate(prompt, params, request_id):
            yield out

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

    def __init__(self, handle):
        self._handle = handle.options(stream=True)
        self._running: dict[str, object] = {}

    async def generate(self, prompt: Prompt, params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        stream = self._handle.generate.remote(prompt, params, request_id)
        self._running[request_id] = stream
        finished = False
        try:
            async for out in stream:
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
