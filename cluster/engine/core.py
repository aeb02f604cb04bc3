"""EngineCore: one model instance. Validates requests, schedules steps, drives the attention actor(s) through
Ray (one call per step with a small payload), and applies stop conditions."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
import uuid

from dataclasses import dataclass

import ray

from llama4serve.actors.attention_actor import AttentionActor
from llama4serve.actors.step_io import StepBatch
from llama4serve.actors.expert_actor import ExpertShardActor
from llama4serve.actors.model.experts import expert_split
from llama4serve.actors.model.checkpoint import CheckpointReader
from llama4serve.actors.model.config import load_model_config
from llama4serve.actors.runner.image_features import vision_unsupported
from llama4serve.actors.model.weights import check_checkpoint
from llama4serve.cluster.engine.block_manager import BlockManager, default_block_size
from llama4serve.cluster.config import EngineConfig
from llama4serve.cluster.outputs import Completion
from llama4serve.cluster.engine.data_plane import place, release_ray, start_ray
from llama4serve.cluster.inputs.prompts import Prompt, PromptInputs, PromptPreparer
from llama4serve.cluster.sampling_params import SamplingParams
from llama4serve.cluster.engine.scheduler import Scheduler, SeqImages, Sequence
from llama4serve.cluster.inputs.tokenizer import Tokenizer



def resolve_max_model_len(config: EngineConfig, cfg) -> int:
    """The longest prompt + output one instance accepts: max_model_len, else what the model and cache allow."""
    return config.max_model_len or min(cfg.max_position_embeddings, config.kv_cache_tokens)


class DataPlaneError(RuntimeError):
    """A data-plane actor died or a step outlived the collective timeout; the instance must be restarted."""


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
        self.model_cfg = cfg = load_model_config(config.model)
        reader = CheckpointReader(config.model)
        check_checkpoint(cfg, reader)
        vision_problem = vision_unsupported(cfg, reader)
        reader.close()
        self.tokenizer = Tokenizer.from_dir(config.model)
        self.prompts = PromptPreparer(
            config.model, self.tokenizer, cfg.image_token_index, vision_problem, config.max_images_per_request,
            config.max_image_bytes, config.max_image_pixels,
        )
        self.dtype = cfg.torch_dtype if config.dtype == "auto" else config.dtype
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"config.json: torch_dtype is {self.dtype!r}; pass dtype='float32' or 'bfloat16'")
        chunk = cfg.attention_chunk_size if cfg.chunked_layers else None
        self.block_size = bs = config.block_size or default_block_size(chunk)
        if chunk is not None and chunk % bs:
            raise ValueError(f"block_size is {bs}; it must divide attention_chunk_size ({chunk})")
        self.max_model_len = resolve_max_model_len(config, cfg)
        num_full = config.num_full_blocks or -(-config.kv_cache_tokens // bs)
        per_seq_chunk = -(-min(chunk or bs, self.max_model_len) // bs) + 1
        num_chunk = config.num_chunk_blocks or per_seq_chunk * config.max_num_seqs
        self.eos_ids = set(cfg.eos_token_ids) | set(self.tokenizer.eos_token_ids if self.tokenizer else [])
        self._ids = itertools.count()
        self._rng = random.Random(config.seed)
        self._owner: dict[int, AttentionReplica] = {}
        self.failure: str | None = None
        self.replicas: list[AttentionReplica] = []
        self.experts: list = []
        self.placement = None

        self._uses_local_ray = start_ray(config)
        try:
            self._start_actors(num_full, num_chunk, chunk)
        except BaseException:
            self.shutdown()
            raise

    def _start_actors(self, num_full: int, num_chunk: int, chunk: int | None) -> None:
        config, cfg, bs = self.config, self.model_cfg, self.block_size
        a, e = config.attention_actors, config.expert_actors
        bounds = expert_split(cfg.num_experts, e) if e else None
        self.placement = placement = place(config, config.placement_timeout_s)
        self.namespace = f"llama4serve-{uuid.uuid4().hex[:8]}"
        # Attention and expert phases alternate within a step, so each role gets the cores to itself.
        cores = os.cpu_count() or 1
        attention_threads = config.torch_threads or max(1, cores // a)
        expert_threads = config.torch_threads or max(1, cores // max(e, 1))

        def options(cls, name: str, bundle: int):
            return ray.remote(cls).options(
                name=name, namespace=self.namespace, num_cpus=config.num_cpus_per_actor, num_gpus=placement.num_gpus,
                max_concurrency=1, scheduling_strategy=placement.strategy(bundle),
            )

        for i, bundle in enumerate(placement.attention_bundles):
            actor = options(AttentionActor, f"attention-{i}", bundle).remote(
                config.model, self.dtype, num_full, num_chunk, bs, attention_threads, bounds, a
            )
            blocks = BlockManager(num_full, num_chunk, bs, chunk, bool(cfg.full_layers), bool(cfg.chunked_layers))
            scheduler = Scheduler(blocks, config.max_num_seqs, config.max_num_batched_tokens)
            self.replicas.append(AttentionReplica(f"attention-{i}", actor, blocks, scheduler))
        for j, bundle in enumerate(placement.expert_bundles):
            self.experts.append(
                options(ExpertShardActor, f"expert-{j}", bundle).remote(
                    config.model, self.dtype, bounds, j, expert_threads
                )
            )
        named = [(r.name, r.actor) for r in self.replicas] + [(f"expert-{j}", x) for j, x in enumerate(self.experts)]
        self.actor_info = dict(zip([n for n, _ in named], self._gather([x.ready.remote() for _, x in named])))
        if e:
            master = ray.get(self.replicas[0].actor.master_address.remote(), timeout=config.collective_timeout_s)
            world, timeout = a + e, config.collective_timeout_s
            joins = [r.actor.join_group.remote(master, i, world, timeout) for i, r in enumerate(self.replicas)]
            joins += [x.join_group.remote(master, a + j, world, a, timeout) for j, x in enumerate(self.experts)]
            self.backend = self._gather(joins)[0]

    @property
    def blocks(self) -> BlockManager:
        """The first attention actor's block manager (admission limits are the same for all)."""
        return self.replicas[0].blocks

    def _gather(self, refs: list) -> list:
        """ray.get with the collective timeout, failing at the first error instead of waiting for the rest."""
        limit = self.config.collective_timeout_s + 30.0  # the actors' own collectives time out first
        pending, deadline = list(refs), time.monotonic() + limit
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise DataPlaneError(f"a data-plane call did not finish within {limit:.0f} s (collective_timeout_s + 30)")
            try:
                ray.get(ready[0])
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
                raise DataPlaneError(f"data-plane actor failed: {err}") from err
        return ray.get(refs)

    async def _gather_async(self, refs: list) -> list:
        """`_gather` for asyncio: the same deadline, failing at the first error."""
        limit = self.config.collective_timeout_s + 30.0
        try:
            return await asyncio.wait_for(asyncio.gather(*refs), timeout=limit)
        except asyncio.TimeoutError:
            raise DataPlaneError(f"a data-plane call did not finish within {limit:.0f} s (collective_timeout_s + 30)") from None
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
            raise DataPlaneError(f"data-plane actor failed: {err}") from err

    # ---------------------------------------------------------------- requests
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return self.prompts.prepare(prompt).token_ids

    def prepare(self, prompt: Prompt) -> PromptInputs:
        """Token ids (and image tiles) of any accepted prompt form (see `cluster/inputs/prompts.py`); ValueError if bad."""
        return self.prompts.prepare(prompt)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        vocab = self.model_cfg.vocab_size
        if not prompt_ids:
            raise ValueError("prompt is empty; it needs at least 1 token")
        for i, t in enumerate(prompt_ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"prompt token id {t!r} at index {i} is outside the vocabulary; allowed 0..{vocab - 1}")
        for t in params.stop_token_ids:
            if t >= vocab:
                raise ValueError(f"stop_token_ids has {t}; allowed 0..{vocab - 1}")
        if len(prompt_ids) > self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens; this deployment accepts at most {self.max_model_len} "
                "(max_model_len)"
            )
        length = min(len(prompt_ids) + params.max_tokens, self.max_model_len)
        full, chunk = self.blocks.blocks_for_length(length)
        if full > self.blocks.full_pool.num_blocks or chunk > self.blocks.chunk_pool.num_blocks:
            raise ValueError(
                f"a sequence of {length} tokens needs {full} full and {chunk} chunk KV blocks; the cache holds "
                f"{self.blocks.full_pool.num_blocks} and {self.blocks.chunk_pool.num_blocks} "
                "(num_full_blocks, num_chunk_blocks); lower max_tokens or grow the cache"
            )

    def add_request(self, prompt: list[int] | PromptInputs, params: SamplingParams) -> Sequence:
        """Queues a prompt given as token ids or as prepared inputs (`prepare`, for prompts with images)."""
        inputs = prompt if isinstance(prompt, PromptInputs) else PromptInputs(list(prompt))
        prompt_ids = inputs.token_ids
        self.validate(prompt_ids, params)
        seed = params.seed if params.seed is not None else self._rng.randrange(2**31)
        self.check_alive()
        images = None
        if inputs.pixel_values is not None:  # to the actor once per prefill, through the object store
            images = SeqImages(ray.put(inputs.pixel_values), inputs.patch_positions)
        seq = Sequence(seq_id=next(self._ids), prompt_ids=prompt_ids, params=params, seed=seed, images=images)
        replica = min(self.replicas, key=AttentionReplica.load)  # data parallel: the least loaded actor
        replica.scheduler.add(seq)
        replica.num_assigned += 1
        self._owner[seq.seq_id] = replica
        return seq

    def abort(self, seq: Sequence) -> None:
        replica = self._owner.pop(seq.seq_id, None)
        if replica is not None:
            replica.scheduler.abort(seq.seq_id)

    def has_work(self) -> bool:
        return any(r.scheduler.has_work() for r in self.replicas)

    def check_alive(self) -> None:
        if self.failure:
            raise DataPlaneError(f"this model instance is down: {self.failure}")

    # ---------------------------------------------------------------- stepping
    def step(self) -> list[Sequence]:
        """Runs one step; returns the sequences that finished in it."""
        plan, refs = self.launch_step()
        if not refs:
            return []
        try:
            results = self._gather(refs)
        except DataPlaneError as err:
            self.fail(err)
            raise
        return self.apply_step(plan, results)

    async def step_async(self) -> list[Sequence]:
        """`step` for an asyncio caller: awaits the actors instead of blocking the event loop."""
        plan, refs = self.launch_step()
        if not refs:
            return []
        try:
            results = await self._gather_async(refs)
        except DataPlaneError as err:
            self.fail(err)
            raise
        return self.apply_step(plan, results)

    def launch_step(self) -> tuple[list, list]:
        """Schedules a step on every attention actor and starts it; ([(replica, scheduled)], refs)."""
        self.check_alive()
        plans = [(r, r.scheduler.schedule()) for r in self.replicas]
        if not any(scheduled for _, scheduled in plans):
            return [], []
        # With expert actors every rank joins every step's collectives, idle attention actors included.
        stepping = [(r, sch) for r, sch in plans if sch or self.experts]
        capacity = max(sum(len(s.token_ids) for _, s in sch) for _, sch in plans) * self.model_cfg.num_experts_per_tok
        steps = [r.scheduler.decode_steps_limit(sch, self.config.num_scheduler_steps, self.max_model_len)
                 for r, sch in stepping]
        if self.experts:  # every rank runs the same number of steps
            steps = [min(steps)] * len(steps)
        refs = []
        for (r, sch), k in zip(stepping, steps):
            r.scheduler.extend_decode(sch, k)
            refs.append(r.actor.step.remote(StepBatch([s for _, s in sch], capacity, r.scheduler.take_released(), k)))
        refs += [x.run_step.remote(capacity, min(steps)) for x in self.experts]
        return [(r, sch, k) for (r, sch), k in zip(stepping, steps)], refs

    def apply_step(self, stepping: list, results: list) -> list[Sequence]:
        """Records a finished step's tokens (every decode step's, in order, after a multi-step call); returns
        the sequences that finished in it. Tokens a sequence sampled after finishing are dropped."""
        finished = []
        for (replica, scheduled, num_steps), result in zip(stepping, results):
            for j, outputs in enumerate([result] if num_steps == 1 else result):
                for (seq, step), out in zip(scheduled, outputs):
                    if seq.finish_reason is not None:  # aborted while the step ran, or finished at an earlier step
                        continue
                    seq.num_computed = step.end_pos + j
                    replica.blocks.finish_step(seq.seq_id)
                    if out.prompt_logprobs:  # prompt positions start_pos + 1.., each written once (recompute too)
                        del seq.prompt_logprobs[step.start_pos + 1 :], seq.prompt_top_logprobs[step.start_pos + 1 :]
                        seq.prompt_logprobs.extend(out.prompt_logprobs)
                        seq.prompt_top_logprobs.extend(out.prompt_top_logprobs)
                    if out.token_id is not None and self._append(replica, seq, out):
                        finished.append(seq)
        return finished

    def fail(self, err: DataPlaneError) -> None:
        """Marks the instance down (every later call raises) and releases its actors."""
        self.failure = str(err)
        self.shutdown()

    def _append(self, replica: AttentionReplica, seq: Sequence, out) -> bool:
        """Adds a sampled token; finishes the sequence when a stop condition holds. True if it finished."""
        p = seq.params
        if len(seq.output_ids) >= p.max_tokens:  # max_tokens=0: prompt scoring only
            self._finish(replica, seq, "length")
            return True
        seq.output_ids.append(out.token_id)
        if out.logprob is not None:
            seq.logprobs.append(out.logprob)
            seq.top_logprobs.append(out.top_logprobs or [])
        reason = None
        if out.token_id in p.stop_token_ids or (not p.ignore_eos and out.token_id in self.eos_ids):
            reason = "stop"
        elif p.stop and self._stop_string_at(seq) is not None:
            reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason:
            self._finish(replica, seq, reason)
        return reason is not None

    def _finish(self, replica: AttentionReplica, seq: Sequence, reason: str) -> None:
        replica.scheduler.finish(seq, reason)
        self._owner.pop(seq.seq_id, None)

    def _stop_string_at(self, seq: Sequence) -> int | None:
        text = self.tokenizer.decode(seq.output_ids) if self.tokenizer else ""
        hits = [text.find(s) for s in seq.params.stop if s in text]
        return min(hits) if hits else None

    def completion(self, seq: Sequence) -> Completion:
        text = self.tokenizer.decode(seq.output_ids) if self.tokenizer else ""
        if seq.params.stop:
            cut = self._stop_string_at(seq)
            text = text if cut is None else text[:cut]
        return Completion(
            request_id=seq.seq_id,
            prompt_token_ids=seq.prompt_ids,
            token_ids=list(seq.output_ids),
            text=text,
            finish_reason=seq.finish_reason or "abort",
            logprobs=seq.logprobs if seq.params.logprobs is not None else None,
            top_logprobs=seq.top_logprobs if seq.params.logprobs else None,
            prompt_logprobs=seq.prompt_logprobs if seq.params.prompt_logprobs else None,
            prompt_top_logprobs=seq.prompt_top_logprobs if seq.params.num_prompt_logprobs else None,
        )

    def shutdown(self) -> None:
        """Kills the data-plane actors and releases their placement group (idempotent)."""
        for actor in [r.actor for r in getattr(self, "replicas", [])] + list(getattr(self, "experts", [])):
            ray.kill(actor)
        self.experts = []
        if getattr(self, "placement", None) is not None:
            self.placement.remove()
            self.placement = None
        if getattr(self, "_uses_local_ray", False):
            self._uses_local_ray = False
            release_ray()
