"""The engine interface of the servers (vLLM's `EngineClient` pattern): what the HTTP and gRPC faces call, and
the client that implements it over a DeploymentHandle to the `Engine` deployment.

HTTP (`openai/`) and gRPC (`grpc/`) both depend on this module; it depends on neither, nor on the engine
itself: no torch here (the Ingress runs in a CPU pod). The `Engine` deployment (`engine_deployment.py`) yields
`Rejected` for a request its engine refused before the first output; `EngineClient` raises it as ValueError.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Protocol

from llama4serve.cluster.outputs import RequestOutput
from llama4serve.cluster.sampling_params import SamplingParams
from llama4serve.cluster.serving.policy import DEADLINE, ServingError

if TYPE_CHECKING:  # the one Prompt type; that module imports torch, so only for type checkers
    from llama4serve.cluster.inputs.prompts import Prompt


class EngineProtocol(Protocol):
    """What a server needs from the engine: the AsyncEngine interface."""

    def generate(self, prompt: Prompt, params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        """Streams RequestOutput deltas. Raises ValueError (naming the field) before the first one for bad
        input; anything else on failure (mapped through `policy.classify`). Closing the iterator early
        aborts the request. Chat messages may hold image parts {"type": "image", "image": bytes}."""

    async def abort(self, request_id: str) -> None:
        """Stops a request that has not finished; a no-op for unknown or finished ids."""


@dataclass(frozen=True)
class Rejected:
    """The engine refused the request before its first output (what its ValueError said)."""

    message: str


class EngineClient:
    """EngineProtocol over a handle to the Engine deployment, for the Ingress.

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
