"""The engine interface of the servers (vLLM's `EngineClient` pattern): what the HTTP and gRPC faces call, and
the client that implements it over a DeploymentHandle to the `Engine` deployment.

HTTP (`openai/`) and gRPC (`grpc/`) both depend on this module; it depends on neither, nor on the engine
itself: no torch here (the Ingress runs in a CPU pod). The `Engine` deployment (`engine_deployment.py`) yields
`Rejected` for a request its engine refused before the first output; `EngineClient` raises it as ValueError.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Protocol

from llama4serve.cluster.outputs import RequestOutput
from llama4serve.cluster.sampling_params import SamplingParams
from llama4serve.cluster.serving.policy import DEADLINE, INTERNAL, ServingError
from llama4serve.cluster.serving.stream_wire import Switched, merge

logger = logging.getLogger("ray.serve")
OPEN_TRIES = 8  # channel calls per attempt to reach one Engine replica

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


class _Inbox:
    """A request's deltas as its submit call and the channel deliver them, or the error that ended it. Channel
    deltas wait in `held` until the submit call says `Switched` (or said `Attached` with a channel open)."""

    def __init__(self) -> None:
        self.items: list[RequestOutput] = []
        self.held: list[RequestOutput] = []
        self.switched = False
        self.error: BaseException | None = None
        self.ready = asyncio.Event()
        self.prompt_ids: list[int] | None = None

    def put(self, out: RequestOutput) -> None:
        if self.prompt_ids is None:
            self.prompt_ids = out.prompt_token_ids
        else:
            out.prompt_token_ids = self.prompt_ids  # the wire sends them with the first delta only
        self.items.append(out)
        self.ready.set()

    def from_channel(self, out: RequestOutput) -> None:
        if self.switched:
            self.put(out)
        else:
            self.held.append(out)

    def switch(self) -> None:
        self.switched = True
        held, self.held = self.held, []
        for out in held:
            self.put(out)

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.ready.set()


class EngineClient:
    """EngineProtocol over a handle to the Engine deployment, for the Ingress (batched streaming, see
    `stream_wire.py`): each request is one `submit` call, and one `channel` call per Engine replica carries the
    new tokens of all of this client's requests there, demultiplexed here into the per-request iterators.

    Aborting cancels the request's `submit` call; Serve propagates the cancellation to the replica that runs it,
    which then aborts the request (this works whichever of several Engine replicas has it).
    """

    def __init__(self, handle, request_timeout_s: float | None = None, open_timeout_s: float = 60.0):
        # Over the replicas' gRPC servers rather than Ray object refs (`serve_env.py`): less CPU per message.
        self._handle = handle.options(stream=True, _by_reference=False)
        self.client_id = uuid.uuid4().hex
        self.request_timeout_s = request_timeout_s  # a request still running after this is aborted
        self.open_timeout_s = open_timeout_s  # to open a channel to an Engine replica
        self._running: dict[str, object] = {}  # request id -> its submit call
        self._inboxes: dict[str, _Inbox] = {}
        self._replica_of: dict[str, str] = {}
        self._channels: dict[str, asyncio.Task] = {}  # Engine replica id -> the task reading its channel
        self._opening: dict[str, asyncio.Task] = {}

    async def generate(self, prompt: Prompt, params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        """Raises ValueError for a rejected request, ServingError(DEADLINE) past request_timeout_s."""
        inbox = self._inboxes[request_id] = _Inbox()  # before submitting: no delta may find it missing
        stream = self._handle.submit.remote(prompt, params, request_id, self.client_id)
        self._running[request_id] = stream
        timeout = self.request_timeout_s
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        finished, lifetime = False, None
        try:
            first = await self._timed(anext(stream), deadline)
            if isinstance(first, Rejected):
                finished = True  # nothing to abort
                raise ValueError(first.message)
            self._replica_of[request_id] = first.replica_id
            if first.has_channel:
                inbox.switch()
            if not first.has_channel or first.replica_id not in self._channels:
                self._ensure_channel(first.replica_id)
            lifetime = asyncio.get_running_loop().create_task(self._read_submit(stream, inbox))
            while True:
                if not inbox.items and inbox.error is None:
                    await self._timed(inbox.ready.wait(), deadline)
                    inbox.ready.clear()
                if inbox.items:
                    items, inbox.items = inbox.items, []
                    out = merge(items)
                    finished = out.finished
                    yield out
                    if finished:
                        return
                elif inbox.error is not None:
                    raise inbox.error
        except StopAsyncIteration:  # the submit call ended before Attached
            raise ServingError(INTERNAL, f"engine ended request {request_id} without an answer") from None
        finally:
            self._running.pop(request_id, None)
            self._inboxes.pop(request_id, None)
            self._replica_of.pop(request_id, None)
            if lifetime is not None:
                lifetime.cancel()
            if not finished:
                stream.cancel()

    @staticmethod
    async def _read_submit(stream, inbox: _Inbox) -> None:
        """The rest of a request's submit call: its own deltas until `Switched`, and its failure if any."""
        try:
            async for item in stream:
                if isinstance(item, Switched):
                    inbox.switch()
                else:
                    inbox.put(item)
        except Exception as err:
            inbox.fail(err)

    async def _timed(self, awaitable, deadline: float | None):
        timer = asyncio.timeout_at(deadline)
        try:
            async with timer:
                return await awaitable
        except TimeoutError:
            if not timer.expired():
                raise
            raise ServingError(DEADLINE, f"the request did not finish within {self.request_timeout_s:g} s "
                                         "(request_timeout_s) and was aborted; ask for fewer tokens") from None

    # ---------------------------------------------------------------- channels
    def _ensure_channel(self, replica_id: str) -> None:
        if replica_id not in self._opening:
            task = asyncio.get_running_loop().create_task(self._open(replica_id))
            self._opening[replica_id] = task
            task.add_done_callback(lambda _: self._opening.pop(replica_id, None))

    async def _open(self, replica_id: str) -> None:
        """Opens channels until one reaches `replica_id`. Serve routes each call by load, so this may miss a busy
        replica: its requests then keep streaming through their own calls, and the next one tries again."""
        for _ in range(OPEN_TRIES):
            channel = self._handle.channel.remote(self.client_id)
            try:
                opened = await asyncio.wait_for(anext(channel), timeout=self.open_timeout_s)
            except Exception:
                channel.cancel()
                logger.warning("could not open a channel to the Engine deployment", exc_info=True)
                return
            if not opened.duplicate:
                reader = asyncio.get_running_loop().create_task(self._read(opened.replica_id, channel))
                self._channels[opened.replica_id] = reader
            if opened.replica_id == replica_id:
                return
        logger.info("no channel reached Engine replica %s in %d tries; its requests stream on their own",
                    replica_id, OPEN_TRIES)

    async def _read(self, replica_id: str, channel) -> None:
        try:
            async for batch in channel:
                for out in batch:
                    inbox = self._inboxes.get(out.request_id)
                    if inbox is not None:  # else its caller is gone
                        inbox.from_channel(out)
        except Exception as err:
            self._fail_replica(replica_id, err)
        finally:
            if self._channels.get(replica_id) is asyncio.current_task():
                del self._channels[replica_id]

    def _fail_replica(self, replica_id: str, err: BaseException) -> None:
        for request_id, rid in list(self._replica_of.items()):
            inbox = self._inboxes.get(request_id)
            if rid == replica_id and inbox is not None and inbox.switched:  # the others stream on their own
                inbox.fail(err)

    async def abort(self, request_id: str) -> None:
        stream = self._running.pop(request_id, None)
        if stream is not None:
            stream.cancel()

    def close(self) -> None:
        """Stops reading every channel (the Engine replicas then end them)."""
        for task in list(self._channels.values()) + list(self._opening.values()):
            task.cancel()
