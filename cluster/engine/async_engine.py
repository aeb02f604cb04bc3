"""AsyncEngine: the asyncio face of one model instance, for servers.

`generate(prompt, params, request_id)` is an async iterator of `RequestOutput` deltas; a single loop task steps
the data plane while any request has work and sleeps otherwise. Everything that touches the scheduler runs on the
event loop's thread; only the wait for the actors is awaited, so requests arrive and abort between steps (an
abort frees the request's KV blocks at once).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from llama4serve.cluster.config import EngineConfig
from llama4serve.cluster.engine.core import DataPlaneError, EngineCore
from llama4serve.cluster.engine.metrics import EngineMetrics
from llama4serve.cluster.outputs import RequestOutput
from llama4serve.cluster.inputs.prompts import has_images
from llama4serve.cluster.sampling_params import SamplingParams
from llama4serve.cluster.engine.scheduler import Sequence
from llama4serve.cluster.inputs.tokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)

Prompt = str | list[int] | list[dict] | dict  # see cluster/inputs/prompts.py (images: dict prompts, chat image parts)


@dataclass
class _Stream:
    """A request's view of its sequence: what has been handed to the caller so far."""

    seq: Sequence
    request_id: str
    detokenizer: IncrementalDetokenizer | None
    hold_chars: int  # text kept back while it could still be the start of a stop string
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    num_emitted_ids: int = 0
    num_emitted_chars: int = 0
    sent_first: bool = False
    arrival: float = field(default_factory=time.monotonic)
    last_token_time: float = 0.0


class AsyncEngine:
    """One model instance behind an asyncio interface (the Serve `Engine` deployment wraps one of these)."""

    def __init__(self, config: EngineConfig):
        self.core = EngineCore(config)
        self.tokenizer = self.core.tokenizer
        self.max_model_len = self.core.max_model_len
        self._streams: dict[str, _Stream] = {}
        self._work: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self.metrics = EngineMetrics()

    # ---------------------------------------------------------------- requests
    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Token ids of a text prompt, a token-id list, chat messages (through the chat template) or a dict prompt."""
        return self.core.prepare(prompt).token_ids

    async def generate(
        self, prompt: Prompt, params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Streams the request's updates; raises ValueError (naming the field) before the first on bad input,
        DataPlaneError when the instance fails. Closing the iterator early aborts the request."""
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already running")
        try:
            # Decoding and tiling images runs off the event loop; plain prompts are tokenized in place.
            prepare = self.core.prepare
            inputs = await asyncio.to_thread(prepare, prompt) if has_images(prompt) else prepare(prompt)
            seq = self.core.add_request(inputs, params)  # validates
        except ValueError:
            self.metrics.finished("rejected")
            raise
        detok = self.tokenizer.detokenizer() if self.tokenizer else None
        stream = _Stream(seq, request_id, detok, max((len(s) for s in params.stop), default=1) - 1)
        self._streams[request_id] = stream
        self._ensure_loop()
        status = "abort"  # how the request ends when it does not finish
        try:
            while True:
                await stream.wake.wait()
                stream.wake.clear()
                self.core.check_alive()
                out = self._delta(stream)
                if out is not None:
                    yield out
                if out is not None and out.finished:
                    return
        except DataPlaneError:
            status = "error"
            raise
        finally:
            self._streams.pop(request_id, None)
            if seq.finish_reason is None:
                self.core.abort(seq)
                self.metrics.finished(status)

    async def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None and stream.seq.finish_reason is None:
            self.core.abort(stream.seq)
            stream.wake.set()

    def _delta(self, stream: _Stream) -> RequestOutput | None:
        """What is new for the caller since the last update; None when nothing is."""
        seq = stream.seq
        finished = seq.finish_reason is not None
        new_ids = seq.output_ids[stream.num_emitted_ids:]
        if not new_ids and not finished:
            return None  # prompt logprobs arrive with the first token (prefill and sampling share a step)
        if finished and stream.detokenizer is not None:
            stream.detokenizer.add(new_ids)
            stream.detokenizer.flush()
            text = self.core.completion(seq).text  # the final text, cut before any stop string
        elif stream.detokenizer is not None:
            stream.detokenizer.add(new_ids)
            text = stream.detokenizer.text
            text = text[: max(stream.num_emitted_chars, len(text) - stream.hold_chars)]
        else:
            text = ""
        first, start = not stream.sent_first, stream.num_emitted_ids
        end = start + len(new_ids)
        want_logprobs = seq.params.logprobs is not None
        out = RequestOutput(
            request_id=stream.request_id,
            prompt_token_ids=seq.prompt_ids,
            token_ids=new_ids,
            text=text[stream.num_emitted_chars:],
            finished=finished,
            finish_reason=seq.finish_reason,
            logprobs=seq.logprobs[start:end] if want_logprobs else None,
            top_logprobs=seq.top_logprobs[start:end] if want_logprobs and seq.params.logprobs else None,
            prompt_logprobs=list(seq.prompt_logprobs) if first and seq.params.prompt_logprobs else None,
            num_generated_tokens=end,
            prompt_top_logprobs=list(seq.prompt_top_logprobs) if first and seq.params.num_prompt_logprobs else None,
        )
        stream.num_emitted_ids, stream.num_emitted_chars = end, len(text)
        stream.sent_first = True
        self._record(stream, first, len(new_ids), finished)
        return out

    def _record(self, stream: _Stream, first: bool, num_new: int, finished: bool) -> None:
        now = time.monotonic()
        if first:
            self.metrics.first_token(stream.arrival, now, len(stream.seq.prompt_ids))
        if num_new:
            self.metrics.generated(num_new, None if first else now - stream.last_token_time)
            stream.last_token_time = now
        if finished:
            self.metrics.finished(stream.seq.finish_reason)

    # ---------------------------------------------------------------- the loop
    def _ensure_loop(self) -> None:
        """Wakes the loop task, starting it on the running event loop when it is not running there."""
        loop = asyncio.get_running_loop()
        if self._loop_task is None or self._loop_task.done() or self._loop_task.get_loop() is not loop:
            self._work = asyncio.Event()
            self._loop_task = loop.create_task(self._run(self._work))
        self._work.set()

    async def _run(self, work: asyncio.Event) -> None:
        while self.core.failure is None:
            if not self.core.has_work():
                work.clear()
                await self._flush_metrics()  # while idle the gauges show the last flush's figures
                await work.wait()
                continue
            try:
                await self.core.step_async()
            except DataPlaneError:
                logger.exception("model instance failed; failing its %d requests", len(self._streams))
            except Exception as err:  # a bug must not leave callers waiting forever
                logger.exception("engine step failed")
                self.core.fail(DataPlaneError(f"engine step failed: {err!r}"))
            for stream in self._streams.values():
                stream.wake.set()
            if self.metrics.due():
                await self._flush_metrics()
            await asyncio.sleep(0)  # let streams and new requests run between steps

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
            "healthy": self.core.failure is None,
        }

    def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self.core.shutdown()
