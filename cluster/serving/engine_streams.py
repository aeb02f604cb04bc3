"""The Engine replica's side of batched streaming (the wire is `stream_wire.py`): per Ingress replica, an outbox
of the requests that have something new, and the channel that empties it once per engine step.

The AsyncEngine's loop calls each stream's `notify` after a step (on the event loop); that marks the request
dirty in its Ingress's outbox and wakes the channel, which takes every dirty request's delta (`AsyncEngine.take`
coalesces whatever is ready) and yields them as one message. A request's lifetime call (`submit`) waits until
the channel has handed out its final delta, raising the engine's failure if the instance goes down first. A
request that arrives before its Ingress has a channel here streams through its own call until one opens (Serve
routes each call by load, so a channel may take a while to land on a busy replica). With `stream_interval` k > 1
a request's delta waits until it holds k new tokens (its first and its last go at once): k times fewer messages
for the Ingress, the proxy and the client to handle per token (vLLM's `--stream-interval`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from llama4serve.cluster.engine.async_engine import AsyncEngine
from llama4serve.cluster.errors import DataPlaneError
from llama4serve.cluster.outputs import RequestOutput
from llama4serve.cluster.serving.stream_wire import CHANNEL_LINGER_S, Attached, ChannelOpened, Switched, for_wire


def replica_id() -> str:
    """This Serve replica's id (a random one outside Serve, e.g. in unit tests)."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return uuid.uuid4().hex[:8]


@dataclass
class Outbox:
    """One Ingress replica's requests in this Engine replica."""

    requests: dict[str, object] = field(default_factory=dict)  # request id -> AsyncEngine stream
    dirty: dict[str, object] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    open: bool = False  # a channel is streaming it

    def mark(self, request_id: str, stream) -> None:
        self.dirty[request_id] = stream
        self.ready.set()


class StreamHub:
    def __init__(self, engine: AsyncEngine, linger_s: float = CHANNEL_LINGER_S, stream_interval: int = 1):
        self.engine = engine
        self.linger_s = linger_s
        self.stream_interval = stream_interval
        self.replica_id = replica_id()
        self.outboxes: dict[str, Outbox] = {}
        self.num_messages = 0  # channel messages sent
        self.num_deltas = 0  # request deltas they carried
        self.take_s = 0.0  # making the deltas (AsyncEngine.take)
        self.first_s = 0.0  # summed over requests: from arrival in this replica to its first delta's message
        self.num_first = 0

    def _box(self, ingress_id: str) -> Outbox:
        box = self.outboxes.get(ingress_id)
        if box is None:
            box = self.outboxes[ingress_id] = Outbox()
        return box

    def _drop_if_unused(self, ingress_id: str, box: Outbox) -> None:
        if not box.open and not box.requests and self.outboxes.get(ingress_id) is box:
            del self.outboxes[ingress_id]

    async def submit(self, prompt, params, request_id: str, ingress_id: str) -> AsyncIterator[object]:
        """A request's lifetime (ValueError before `Attached` on bad input); closing it early aborts it. Until
        a channel to its Ingress is open here it carries the request's own deltas, then yields `Switched`."""
        box = self._box(ingress_id)
        done = asyncio.Event()  # the channel handed out the final delta, or the instance failed
        holder: list = []
        via_channel = [box.open]

        def notify() -> None:
            if via_channel[0]:
                box.mark(request_id, holder[0])
            if self.engine.core.failure is not None:
                done.set()

        stream = await self.engine.add(prompt, params, request_id, notify)
        holder.append(stream)
        stream.done = done
        box.requests[request_id] = stream
        status = "abort"
        try:
            yield Attached(self.replica_id, box.open)
            while not via_channel[0]:
                await stream.wake.wait()
                stream.wake.clear()
                self.engine.core.check_alive()
                if box.open:  # a channel has opened: it takes over this request's deltas
                    via_channel[0] = True
                    box.mark(request_id, stream)
                    yield Switched()
                    break
                out = self._wire(stream)
                if out is not None:
                    yield out
                    if out.finished:
                        return
            await done.wait()
            self.engine.core.check_alive()
        except DataPlaneError:
            status = "error"
            raise
        finally:
            box.requests.pop(request_id, None)
            box.dirty.pop(request_id, None)
            self.engine.release(stream, status)
            self._drop_if_unused(ingress_id, box)

    def _wire(self, stream) -> RequestOutput | None:
        """The stream's next delta as sent (AsyncEngine.take, prompt ids only in the first), or None while it
        is not due: a delta goes out with the first token, the last, or `stream_interval` new tokens."""
        first = not stream.started
        if not (self.stream_interval == 1 or first or stream.finished or stream.num_unsent >= self.stream_interval):
            return None
        out = self.engine.take(stream)
        if out is None:
            return None
        if first:
            self.first_s += time.monotonic() - stream.arrival
            self.num_first += 1
        return for_wire(out, first)

    async def channel(self, ingress_id: str) -> AsyncIterator[ChannelOpened | list[RequestOutput]]:
        """Streams every step's deltas of `ingress_id`'s requests here; ends `linger_s` after its last request."""
        box = self._box(ingress_id)
        if box.open:
            yield ChannelOpened(self.replica_id, duplicate=True)
            return
        box.open = True
        try:
            yield ChannelOpened(self.replica_id)
            while True:
                if not box.dirty:
                    try:
                        await asyncio.wait_for(box.ready.wait(), timeout=self.linger_s)
                    except TimeoutError:
                        if not box.requests and not box.dirty:
                            return
                        continue
                box.ready.clear()
                t0 = time.perf_counter()
                batch = self._take(box)
                self.take_s += time.perf_counter() - t0
                if batch:
                    self.num_messages += 1
                    self.num_deltas += len(batch)
                    yield batch
        finally:
            box.open = False
            self._drop_if_unused(ingress_id, box)

    def stats(self) -> dict:
        loop = self.engine.loop_times
        return {"channels": sum(b.open for b in self.outboxes.values()), "messages": self.num_messages,
                "deltas": self.num_deltas, "take_s": self.take_s, "steps": loop.steps, "wait_s": loop.wait_s,
                "launch_s": loop.launch_s, "outputs_s": loop.outputs_s,
                "first_s": self.first_s, "num_first": self.num_first}

    def _take(self, box: Outbox) -> list[RequestOutput]:
        dirty, box.dirty = box.dirty, {}
        batch = []
        for stream in dirty.values():
            out = self._wire(stream)  # one not due is marked again when its next token comes
            if out is None:
                continue
            batch.append(out)
            if out.finished:
                stream.done.set()
        return batch
