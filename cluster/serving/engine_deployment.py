"""The `Engine` Serve deployment: one replica = one model instance (an AsyncEngine) with its data-plane actors.

The Ingress reaches it through `engine_client.EngineClient` (torch-free); this module imports the engine.
Streaming is batched (`stream_wire.py`): `submit` is a request's lifetime and `channel` carries the new tokens of
all of one Ingress replica's requests, one message per engine step. `generate` streams one request on its own.

A request the engine refuses (bad input: a ValueError before the first output) comes back as a `Rejected` item
rather than an exception, so that Serve does not log an ordinary client mistake as a failed request with its
traceback; the Engine logs it in one INFO line and the client raises the ValueError on the ingress side.
"""

from __future__ import annotations

import logging
from typing import AsyncIterator

from ray import serve

from llama4serve.cluster.engine.async_engine import AsyncEngine
from llama4serve.cluster.inputs.prompts import Prompt
from llama4serve.cluster.outputs import RequestOutput
from llama4serve.cluster.sampling_params import SamplingParams
from llama4serve.cluster.serving.engine_client import EngineClient, Rejected
from llama4serve.cluster.serving.engine_streams import StreamHub
from llama4serve.cluster.serving.policy import one_line
from llama4serve.cluster.serving.serve_config import ServeConfig

__all__ = ["Engine", "EngineClient", "Rejected"]  # EngineClient and Rejected live in engine_client.py

logger = logging.getLogger("ray.serve")  # in a replica: its Serve log file, with the request id


@serve.deployment(
    ray_actor_options={"num_cpus": 0},  # the data-plane actors hold the reserved CPUs/GPUs
    health_check_period_s=10,
    health_check_timeout_s=60,
)
class Engine:
    """Owns an AsyncEngine; Serve replaces the replica when `check_health` raises (a data-plane actor died)."""

    def __init__(self, config: ServeConfig):
        config.check_checkpoint()
        self.engine = AsyncEngine(config.engine_config())
        self.hub = StreamHub(self.engine, stream_interval=config.stream_interval)

    async def submit(self, prompt: Prompt, params: SamplingParams, request_id: str, ingress_id: str):
        """A request whose outputs go through `ingress_id`'s channel: yields `Attached` (or `Rejected`)."""
        try:
            lifetime = self.hub.submit(prompt, params, request_id, ingress_id)
            first = await anext(lifetime)
        except ValueError as err:
            yield self._rejected(request_id, err)
            return
        try:  # closed here, not when collected: cancelling the call aborts the request at once
            yield first
            async for item in lifetime:
                yield item
        finally:
            await lifetime.aclose()

    async def channel(self, ingress_id: str):
        """The deltas of all of `ingress_id`'s requests in this replica, one list per engine step."""
        channel = self.hub.channel(ingress_id)
        try:
            async for item in channel:
                yield item
        finally:
            await channel.aclose()

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
            yield self._rejected(request_id, err)

    @staticmethod
    def _rejected(request_id: str, err: ValueError) -> Rejected:
        message = one_line(str(err))
        logger.info("request %s rejected: %s", request_id, message)
        return Rejected(message)

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def stats(self) -> dict:
        return self.engine.stats()

    def stream_stats(self) -> dict:
        """Open channels, channel messages sent and the request deltas they carried (since the replica started)."""
        return self.hub.stats()

    def check_health(self) -> None:
        if self.engine.core.failure is not None:
            raise RuntimeError(f"model instance is down: {self.engine.core.failure}")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
