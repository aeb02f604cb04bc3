"""EngineCore: one model instance. It adds, aborts and steps requests; the data plane runs the actors, the
schedulers (one per attention actor) plan each step and record its outputs, and text is made by the output
processor of whichever face (`LLM`, `AsyncEngine`) drives it."""

from __future__ import annotations

import asyncio
import itertools
import random
from dataclasses import dataclass

import ray

from llama4serve.actors.step_io import PING_PONG_MIN_ROWS, GrammarRef, StepBatch
from llama4serve.cluster.config import EngineConfig
from llama4serve.cluster.engine.block_manager import BlockManager
from llama4serve.cluster.engine.data_plane import DataPlane
from llama4serve.cluster.engine.instance import InstanceSpec
from llama4serve.cluster.engine.prefix_cache import tile_hashes
from llama4serve.cluster.engine.metrics import RecoveryMetrics
from llama4serve.cluster.engine.recovery import Recovery, dead_actors
from llama4serve.cluster.engine.scheduler import Scheduler, SeqImages, Sequence
from llama4serve.cluster.errors import DataPlaneError
from llama4serve.cluster.inputs import Prompt
from llama4serve.cluster.inputs.grammar_store import GrammarStore
from llama4serve.cluster.inputs.prompts import PromptInputs
from llama4serve.cluster.sampling_params import SamplingParams


@dataclass
class AttentionReplica:
    """One attention actor with the KV bookkeeping and scheduler of the sequences it owns."""

    name: str
    actor: object
    blocks: BlockManager
    scheduler: Scheduler
    num_assigned: int = 0  # requests ever given to this actor

    def load(self) -> int:
        return len(self.scheduler.running) + len(self.scheduler.waiting)


class EngineCore:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.spec = spec = InstanceSpec.load(config)
        self.model_cfg, self.tokenizer, self.prompts = spec.model_cfg, spec.tokenizer, spec.prompts
        self.max_model_len, self.block_size = spec.max_model_len, spec.block_size
        self._ids = itertools.count()
        self._rng = random.Random(config.seed)
        self._owner: dict[int, AttentionReplica] = {}
        self.failure: str | None = None
        self._grammars: GrammarStore | None = None  # made on the first structured-output request
        # dtype "auto" reaches the actors as is: bfloat16 on a GPU, the checkpoint's dtype on CPU
        self.data_plane = DataPlane(config, config.dtype, spec.block_size, spec.num_full_blocks,
                                    spec.num_chunk_blocks, self.model_cfg.num_experts)
        self.recovery = Recovery(self.data_plane, config.max_actor_restarts, config.actor_restart_window_s,
                                 RecoveryMetrics())
        self.replicas = [
            AttentionReplica(name, actor, blocks := spec.block_manager(),
                             Scheduler(blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                       spec.eos_ids, spec.max_model_len))
            for name, actor in zip(self.data_plane.names(), self.data_plane.attention)
        ]

    @property
    def blocks(self) -> BlockManager:
        """The first attention actor's block manager (admission limits are the same for all)."""
        return self.replicas[0].blocks

    # ---------------------------------------------------------------- requests
    def prepare(self, prompt: Prompt) -> PromptInputs:
        """Token ids (and image tiles) of any accepted prompt form (see `inputs/prompts.py`); ValueError if bad."""
        return self.prompts.prepare(prompt)

    def add_request(self, prompt: list[int] | PromptInputs, params: SamplingParams) -> Sequence:
        """Queues a prompt given as token ids or as prepared inputs (`prepare`, for prompts with images)."""
        inputs = prompt if isinstance(prompt, PromptInputs) else PromptInputs(list(prompt))
        self.spec.validate(inputs.token_ids, params)
        seed = params.seed if params.seed is not None else self._rng.randrange(2**31)
        self.check_alive()
        images = None
        if inputs.pixel_values is not None:  # to the actor once per prefill, through the object store
            hashes = tile_hashes(inputs.pixel_values) if self.spec.enable_prefix_caching else []
            images = SeqImages(ray.put(inputs.pixel_values), inputs.patch_positions, tile_hashes=hashes)
        seq = Sequence(seq_id=next(self._ids), prompt_ids=inputs.token_ids, params=params, seed=seed, images=images)
        if params.structured_outputs is not None:  # compiled already when the caller awaited grammar_ref
            seq.grammar = self.grammar_ref(params)
        replica = self._route(seq)
        replica.scheduler.add(seq)
        replica.num_assigned += 1
        self._owner[seq.seq_id] = replica
        return seq

    def _route(self, seq: Sequence) -> AttentionReplica:
        """Data parallel: the attention actor caching the longest prefix of the prompt; ties, the least loaded."""
        if len(self.replicas) == 1:
            return self.replicas[0]
        return max(self.replicas, key=lambda r: (r.scheduler.cached_prefix(seq), -r.load()))

    def grammar_ref(self, params: SamplingParams) -> GrammarRef | None:
        """The compiled grammar of `params.structured_outputs` (blocks while it compiles, once per distinct spec:
        asyncio callers use `grammar_ref_async` first); ValueError naming the field when it does not compile."""
        spec = params.structured_outputs
        if spec is None:
            return None
        if self._grammars is None:
            if self.tokenizer is None:
                raise ValueError(f"{spec.field} needs the checkpoint's tokenizer.json; {self.config.model} has none")
            self._grammars = GrammarStore(f"{self.config.model}/tokenizer.json", self.model_cfg.vocab_size,
                                          sorted(self.spec.eos_ids), ray.put)
        return self._grammars.ref(spec)

    async def grammar_ref_async(self, params: SamplingParams) -> GrammarRef | None:
        """`grammar_ref` off the event loop."""
        if params.structured_outputs is None:
            return None
        return await asyncio.to_thread(self.grammar_ref, params)

    def abort(self, seq: Sequence, reason: str = "abort", num_output_tokens: int | None = None) -> None:
        """Ends a request now (an abort, or a stop string the output processor found after
        `num_output_tokens` generated tokens) and frees its KV blocks."""
        replica = self._owner.pop(seq.seq_id, None)
        if replica is not None and seq.finish_reason is None:
            replica.scheduler.finish(seq, reason, num_output_tokens)

    def has_work(self) -> bool:
        return any(r.scheduler.has_work() for r in self.replicas)

    def check_alive(self) -> None:
        if self.failure:
            raise DataPlaneError(f"this model instance is down: {self.failure}")

    # ---------------------------------------------------------------- stepping
    def step(self) -> list[Sequence]:
        """Runs one step; returns the sequences that gained tokens or finished in it."""
        plan, refs = self.launch()
        while refs:  # more than once only when a dead actor was replaced and the step is redone
            outcomes = self.data_plane.collect(refs)
            dead = self._failing(dead_actors, self.data_plane.inflight.names, outcomes)
            if not dead:
                return self._apply(plan, outcomes)
            plan, refs = self._redo(plan, self._failing(self.recovery.replace, dead))
        return []

    async def step_async(self) -> list[Sequence]:
        """`step` for an asyncio caller: awaits the actors instead of blocking the event loop."""
        plan, refs = self.launch()
        return await self.collect_async(plan, refs)

    async def collect_async(self, plan: list, refs: list) -> list[Sequence]:
        """The second half of `step_async`: awaits a launched step and records its outputs (the scheduler's
        postprocess, which must happen before the next `launch`); returns the sequences it updated."""
        while refs:  # as in `step`; the replacement starts off the event loop, requests still arrive
            outcomes = await self.data_plane.collect_async(refs)
            dead = self._failing(dead_actors, self.data_plane.inflight.names, outcomes)
            if not dead:
                return self._apply(plan, outcomes)
            plan, refs = self._redo(plan, await asyncio.to_thread(self._failing, self.recovery.replace, dead))
        return []

    def launch(self) -> tuple[list, list]:
        """Schedules a step on every attention actor and starts it: (plan, refs), plan [(replica, scheduled,
        steps)], no refs when nothing runs. The first half of `step_async`; a caller that overlaps steps
        (AsyncEngine) launches the next step right after `collect_async`."""
        self.check_alive()
        plans = [(i, r, r.scheduler.schedule()) for i, r in enumerate(self.replicas)]
        if not any(scheduled for _, _, scheduled in plans):
            return [], []
        experts = bool(self.data_plane.experts)
        # With expert actors every rank joins every step's collectives, idle attention actors included.
        stepping = [(i, r, sch) for i, r, sch in plans if sch or experts]
        rows = max(sum(len(s.token_ids) for _, s in sch) for _, _, sch in plans)
        capacity = rows * self.model_cfg.num_experts_per_tok
        steps = [r.scheduler.decode_steps_limit(sch, self.config.num_scheduler_steps) for _, r, sch in stepping]
        if experts:  # every rank runs the same number of steps
            steps = [min(steps)] * len(steps)
        # Ping-pong micro-batches where the expert actors serve in a standing loop: a decode step with enough rows
        decoding = all(len(s.token_ids) == 1 for _, _, sch in plans for _, s in sch)
        micro = 2 if self.config.ping_pong and self.data_plane.loops and decoding and rows >= PING_PONG_MIN_ROWS else 1
        batches = {}
        for (i, r, sch), k in zip(stepping, steps):
            r.scheduler.extend_decode(sch, k)
            batches[i] = StepBatch([s for _, s in sch], capacity, r.scheduler.take_released(), k, micro)
        refs = self.data_plane.launch(batches, capacity, min(steps))
        return [(r, sch, k) for (_, r, sch), k in zip(stepping, steps)], refs

    def _apply(self, stepping: list, results: list) -> list[Sequence]:
        updated = []
        for (replica, scheduled, num_steps), result in zip(stepping, results):
            updated += replica.scheduler.postprocess(scheduled, result, num_steps)
        for seq in updated:
            if seq.finish_reason is not None:
                self._owner.pop(seq.seq_id, None)
        return updated

    def _failing(self, call, *args):
        """call(*args); a DataPlaneError from it takes the instance down first."""
        try:
            return call(*args)
        except DataPlaneError as err:
            self.fail(err)
            raise

    def _redo(self, plan: list, replaced: set[int]) -> tuple[list, list]:
        """After a recovery: the replaced attention actors' sequences start over from their tokens, and the
        interrupted step runs again (`DataPlane.relaunch`); the new (plan, refs)."""
        for i in replaced:
            replica = self.replicas[i]
            replica.actor, replica.blocks = self.data_plane.attention[i], self.spec.block_manager()
            replica.scheduler.recompute_all(replica.blocks)
        fresh = {id(self.replicas[i]) for i in replaced}
        plan = [(r, [] if id(r) in fresh else sch, k) for r, sch, k in plan]
        return plan, self.data_plane.relaunch(replaced)

    def fail(self, err: DataPlaneError) -> None:
        """Marks the instance down (every later call raises) and releases its actors."""
        self.failure = str(err)
        self.shutdown()

    def shutdown(self) -> None:
        """Kills the data-plane actors and releases their placement group (idempotent)."""
        self.data_plane.shutdown()
