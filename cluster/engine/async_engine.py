"""AsyncEngine: the asyncio face of one model instance, for servers.

`generate(prompt, params, request_id)` is an async iterator of `RequestOutput` deltas; a single loop task steps
the data plane while any request has work and sleeps otherwise. Everything that touches the scheduler runs on the
event loop's thread; only the wait for the actors is awaited, so requests arrive and abort between steps (an
abort frees the request's KV blocks at once).

Steps overlap with output processing: as soon as step N's results are recorded (the scheduler's postprocess,
which the next schedule needs), step N+1 is launched, and N's tokens are detokenized, checked for stop strings
and handed out while the actors compute N+1 (a stop string found then drops the tokens N+1 samples for it).
Servers that stream many requests through one channel use `add` / `take` / `release` with a `notify` callback
instead of `generate` (the Serve `Engine` deployment does, see `serving/engine_deployment.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from llama4serve.cluster.config import EngineConfig
from llama4serve.cluster.engine.core import EngineCore
from llama4serve.cluster.engine.metrics import EngineMetrics
from llama4serve.cluster.engine.output_processor import OutputProcessor, RequestState
from llama4serve.cluster.errors import DataPlaneError
from llama4serve.cluster.inputs import Prompt
from llama4serve.cluster.inputs.prompts import has_images
from llama4serve.cluster.outputs import RequestOutput
from llama4serve.cluster.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    """A request being streamed: its text state and when its caller should look again."""

    state: RequestState
    notify: Callable[[], None] | None = None  # called (on the loop) when the stream may have something new
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    arrival: float = field(default_factory=time.monotonic)
    last_token_time: float = 0.0
    started: bool = False  # the first update has been handed out
    done: asyncio.Event | None = None  # for a server's own use (see serving/engine_streams.py)

    @property
    def seq(self):
        return self.state.seq

    @property
    def finished(self) -> bool:
        return self.state.seq.finish_reason is not None

    @property
    def num_unsent(self) -> int:
        """Generated tokens `AsyncEngine.take` has not handed out yet."""
        return len(self.state.seq.output_ids) - self.state.num_emitted_ids

    def poke(self) -> None:
        self.wake.set()
        if self.notify is not None:
            self.notify()


@dataclass
class LoopTimes:
    """Where the loop's time went, summed over steps (for `bench --suite serve` and docs/benchmarks.md)."""

    steps: int = 0
    wait_s: float = 0.0  # awaiting the actors' results, and recording them (the scheduler's postprocess)
    launch_s: float = 0.0  # scheduling and sending the next step
    outputs_s: float = 0.0  # detokenizing and stop strings, while the next step runs

    def add(self, wait: float, launch: float, outputs: float, stepped: bool) -> None:
        self.steps += stepped
        self.wait_s += wait
        self.launch_s += launch
        self.outputs_s += outputs


class AsyncEngine:
    """One model instance behind an asyncio interface (the Serve `Engine` deployment wraps one of these)."""

    def __init__(self, config: EngineConfig):
        self.core = EngineCore(config)
        self.tokenizer = self.core.tokenizer
        self.max_model_len = self.core.max_model_len
        self.output = OutputProcessor(self.tokenizer)
        self._streams: dict[str, _Stream] = {}
        self._by_seq: dict[int, _Stream] = {}
        self._work: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self.metrics = EngineMetrics()
        self.loop_times = LoopTimes()

    # ---------------------------------------------------------------- requests
    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Token ids of a text prompt, a token-id list, chat messages (through the chat template) or a dict prompt."""
        return self.core.prepare(prompt).token_ids

    async def generate(
        self, prompt: Prompt, params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Streams the request's updates; raises ValueError (naming the field) before the first on bad input,
        DataPlaneError when the instance fails. Closing the iterator early aborts the request."""
        stream = await self.add(prompt, params, request_id or uuid.uuid4().hex)
        status = "abort"  # how the request ends when it does not finish
        try:
            while True:
                await stream.wake.wait()
                stream.wake.clear()
                self.core.check_alive()
                out = self.take(stream)
                if out is not None:
                    yield out
                if out is not None and out.finished:
                    return
        except DataPlaneError:
            status = "error"
            raise
        finally:
            self.release(stream, status)

    async def add(self, prompt: Prompt, params: SamplingParams, request_id: str,
                  notify: Callable[[], None] | None = None) -> _Stream:
        """Queues a request; `notify()` is called on the event loop whenever `take(stream)` may return an update
        (and when the instance fails: then `core.check_alive()` raises). Raises ValueError on bad input."""
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already running")
        try:
            # Decoding and tiling images runs off the event loop; plain prompts are tokenized in place.
            prepare = self.core.prepare
            inputs = await asyncio.to_thread(prepare, prompt) if has_images(prompt) else prepare(prompt)
            await self.core.grammar_ref_async(params)  # a structured-output grammar compiles off the loop, once
            seq = self.core.add_request(inputs, params)  # validates
        except ValueError:
            self.metrics.finished("rejected")
            raise
        stream = _Stream(self.output.add(seq, request_id), notify)
        self._streams[request_id] = self._by_seq[seq.seq_id] = stream
        self._ensure_loop()
        return stream

    def take(self, stream: _Stream) -> RequestOutput | None:
        """Everything new for the stream since its last update, in one delta (coalesced); None when nothing is."""
        out = self.output.delta(stream.state)
        if out is not None:
            self._record(stream, out)
        return out

    def release(self, stream: _Stream, status: str = "abort") -> None:
        """Forgets a stream; a request that has not finished is aborted (its KV blocks freed) with `status`."""
        if self._streams.get(stream.state.request_id) is stream:
            del self._streams[stream.state.request_id]
        self._by_seq.pop(stream.seq.seq_id, None)
        if stream.seq.finish_reason is None:
            self.core.abort(stream.seq)
            self.metrics.finished(status)

    async def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None and stream.seq.finish_reason is None:
            self.core.abort(stream.seq)
            stream.poke()

    def _record(self, stream: _Stream, out: RequestOutput) -> None:
        now, first = time.monotonic(), not stream.started
        stream.started = True
        if first:
            self.metrics.first_token(stream.arrival, now, len(out.prompt_token_ids))
        if out.token_ids:
            self.metrics.generated(len(out.token_ids), None if first else now - stream.last_token_time)
            stream.last_token_time = now
        if out.finished:
            self.metrics.finished(out.finish_reason)

    # ---------------------------------------------------------------- the loop
    def _ensure_loop(self) -> None:
        """Wakes the loop task, starting it on the running event loop when it is not running there."""
        loop = asyncio.get_running_loop()
        if self._loop_task is None or self._loop_task.done() or self._loop_task.get_loop() is not loop:
            self._work = asyncio.Event()
            self._loop_task = loop.create_task(self._run(self._work))
        self._work.set()

    async def _run(self, work: asyncio.Event) -> None:
        pending = None  # the launched step: (plan, refs)
        while self.core.failure is None:
            try:
                if pending is None:
                    if not self.core.has_work():
                        work.clear()
                        await self._flush_metrics()  # while idle the gauges show the last flush's figures
                        await work.wait()
                        continue
                    pending = self.core.launch()
                plan, refs = pending
                pending = None
                t0 = time.perf_counter()
                updated = await self.core.collect_async(plan, refs) if refs else []
                t1 = time.perf_counter()
                if self.core.has_work():
                    pending = self.core.launch()  # step N+1 runs while step N's outputs are processed
                t2 = time.perf_counter()
                self._process(updated)
                self.loop_times.add(t1 - t0, t2 - t1, time.perf_counter() - t2, bool(refs))
            except DataPlaneError:
                logger.exception("model instance failed; failing its %d requests", len(self._streams))
                updated = list(self._streams.values())
            except Exception as err:  # a bug must not leave callers waiting forever
                logger.exception("engine step failed")
                self.core.fail(DataPlaneError(f"engine step failed: {err!r}"))
                updated = list(self._streams.values())
            for item in updated:
                stream = item if isinstance(item, _Stream) else self._by_seq.get(item.seq_id)
                if stream is not None:
                    stream.poke()
            if self.metrics.due():
                await self._flush_metrics()
            await asyncio.sleep(0)  # let streams and new requests run between steps
        for stream in list(self._streams.values()):
            stream.poke()

    def _process(self, updated: list) -> None:
        """Detokenizes what the step produced (the output processor also ends requests at stop strings)."""
        for seq in updated:
            stream = self._by_seq.get(seq.seq_id)
            if stream is None:
                continue
            keep = self.output.update(stream.state)
            if keep is not None:
                self.core.abort(seq, "stop", keep)

    async def _flush_metrics(self) -> None:
        """Exports the gauges and token counts, and collects the attention actors' counts (between steps)."""
        if self.core.failure is not None:
            return
        gathered = asyncio.gather(*(r.actor.take_metrics.remote() for r in self.core.replicas))
        gathered.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even when cancelled
        try:
            taken = await asyncio.wait_for(gathered, timeout=self.core.config.collective_timeout_s)
        except Exception:  # a dead actor fails the next step; metrics must not fail first
            logger.warning("could not collect the data-plane metrics", exc_info=True)
            taken = []
        self.metrics.flush(self.stats(), taken, self.core.model_cfg.moe_layers)

    # ---------------------------------------------------------------- info
    def stats(self) -> dict:
        """Queue and KV-cache figures for metrics and health."""
        running = sum(len(r.scheduler.running) for r in self.core.replicas)
        waiting = sum(len(r.scheduler.waiting) for r in self.core.replicas)
        usage = [r.blocks.usage() for r in self.core.replicas]
        return {
            "num_requests_running": running,
            "num_requests_waiting": waiting,
            "kv_cache_usage": {pool: max(u[pool] for u in usage) for pool in usage[0]},
            "prefix_cache_queries": sum(r.scheduler.prefix_cache_queries for r in self.core.replicas),  # tokens
            "prefix_cache_hits": sum(r.scheduler.prefix_cache_hits for r in self.core.replicas),
            "healthy": self.core.failure is None,
        }

    def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self.core.shutdown()
