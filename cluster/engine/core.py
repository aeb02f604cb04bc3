"""EngineCore: one model instance. It adds, aborts and steps requests; the data plane runs the actors, the
schedulers (one per attention actor) plan each step and record its outputs, and text is made by the output
processor of whichever face (`LLM`, `AsyncEngine`) drives it."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import ray

from llama4serve.actors.step_io import StepBatch
from llama4serve.cluster.config import EngineConfig
from llama4serve.cluster.engine.block_manager import BlockManager
from llama4serve.cluster.engine.data_plane import DataPlane
from llama4serve.cluster.engine.instance import InstanceSpec
from llama4serve.cluster.engine.scheduler import Scheduler, SeqImages, Sequence
from llama4serve.cluster.errors import DataPlaneError
from llama4serve.cluster.inputs import Prompt
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
        # dtype "auto" reaches the actors as is: bfloat16 on a GPU, the checkpoint's dtype on CPU
        self.data_plane = DataPlane(config, config.dtype, spec.block_size, spec.num_full_blocks,
                                    spec.num_chunk_blocks, self.model_cfg.num_experts)
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
            images = SeqImages(ray.put(inputs.pixel_values), inputs.patch_positions)
        seq = Sequence(seq_id=next(self._ids), prompt_ids=inputs.token_ids, params=params, seed=seed, images=images)
        replica = min(self.replicas, key=AttentionReplica.load)  # data parallel: the least loaded actor
        replica.scheduler.add(seq)
        replica.num_assigned += 1
        self._owner[seq.seq_id] = replica
        return seq

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
        plan, refs = self._launch()
        if not refs:
            return []
        try:
            results = self.data_plane.gather(refs)
        except DataPlaneError as err:
            self.fail(err)
            raise
        return self._apply(plan, results)

    async def step_async(self) -> list[Sequence]:
        """`step` for an asyncio caller: awaits the actors instead of blocking the event loop."""
        plan, refs = self._launch()
        if not refs:
            return []
        try:
            results = await self.data_plane.gather_async(refs)
        except DataPlaneError as err:
            self.fail(err)
            raise
        return self._apply(plan, results)

    def _launch(self) -> tuple[list, list]:
        """Schedules a step on every attention actor and starts it; ([(replica, scheduled, steps)], refs)."""
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
        batches = {}
        for (i, r, sch), k in zip(stepping, steps):
            r.scheduler.extend_decode(sch, k)
            batches[i] = StepBatch([s for _, s in sch], capacity, r.scheduler.take_released(), k)
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

    def fail(self, err: DataPlaneError) -> None:
        """Marks the instance down (every later call raises) and releases its actors."""
        self.failure = str(err)
        self.shutdown()

    def shutdown(self) -> None:
        """Kills the data-plane actors and releases their placement group (idempotent)."""
        self.data_plane.shutdown()
