"""EngineCore: one model instance. Validates requests, schedules steps, drives the attention actor(s) through
Ray (one call per step with a small payload), and applies stop conditions."""

from __future__ import annotations

import itertools
import os
import random
import uuid

import ray

from ..actors.attention import AttentionActor
from ..actors.batch import StepBatch
from ..actors.checkpoint import CheckpointReader
from ..actors.config import load_model_config
from ..actors.weights import check_checkpoint
from .block_manager import BlockManager
from .config import EngineConfig
from .outputs import Completion
from .sampling_params import SamplingParams
from .scheduler import Scheduler, Sequence
from .tokenizer import Tokenizer

STEP_TIMEOUT_S = 600.0


class EngineCore:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_cfg = cfg = load_model_config(config.model)
        reader = CheckpointReader(config.model)
        check_checkpoint(cfg, reader)
        reader.close()
        self.tokenizer = Tokenizer.from_dir(config.model)
        self.dtype = cfg.torch_dtype if config.dtype == "auto" else config.dtype
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"config.json: torch_dtype is {self.dtype!r}; pass dtype='float32' or 'bfloat16'")
        bs = config.block_size
        chunk = cfg.attention_chunk_size if cfg.chunked_layers else None
        if chunk is not None and chunk % bs:
            raise ValueError(f"block_size is {bs}; it must divide attention_chunk_size ({chunk})")
        self.max_model_len = config.max_model_len or min(cfg.max_position_embeddings, config.kv_cache_tokens)
        num_full = config.num_full_blocks or -(-config.kv_cache_tokens // bs)
        per_seq_chunk = -(-min(chunk or bs, self.max_model_len) // bs) + 1
        num_chunk = config.num_chunk_blocks or per_seq_chunk * config.max_num_seqs
        self.blocks = BlockManager(num_full, num_chunk, bs, chunk, bool(cfg.full_layers), bool(cfg.chunked_layers))
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.eos_ids = set(cfg.eos_token_ids) | set(self.tokenizer.eos_token_ids if self.tokenizer else [])
        self._ids = itertools.count()
        self._rng = random.Random(config.seed)

        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
        self.namespace = f"llama4serve-{uuid.uuid4().hex[:8]}"
        threads = config.torch_threads or max(1, (os.cpu_count() or 1) // config.attention_actors)
        actor_cls = ray.remote(AttentionActor).options(
            name="attention-0", namespace=self.namespace, num_cpus=1, max_concurrency=1
        )
        self.actor = actor_cls.remote(config.model, self.dtype, num_full, num_chunk, bs, threads)
        try:
            ray.get(self.actor.ready.remote(), timeout=STEP_TIMEOUT_S)
        except Exception:
            self.shutdown()
            raise

    # ---------------------------------------------------------------- requests
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    f"prompt is text but {self.config.model} has no tokenizer.json; pass token ids instead"
                )
            return self.tokenizer.encode(prompt)
        return list(prompt)

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

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        self.validate(prompt_ids, params)
        seed = params.seed if params.seed is not None else self._rng.randrange(2**31)
        seq = Sequence(seq_id=next(self._ids), prompt_ids=prompt_ids, params=params, seed=seed)
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        self.scheduler.abort(seq.seq_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---------------------------------------------------------------- stepping
    def step(self) -> list[Sequence]:
        """Runs one step; returns the sequences that finished in it."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        outputs = ray.get(self.actor.step.remote(StepBatch([s for _, s in scheduled])), timeout=STEP_TIMEOUT_S)
        finished = []
        for (seq, step), out in zip(scheduled, outputs):
            seq.num_computed = step.end_pos
            self.blocks.finish_step(seq.seq_id)
            seq.prompt_logprobs.extend(out.prompt_logprobs)
            if out.token_id is not None and self._append(seq, out):
                finished.append(seq)
        return finished

    def _append(self, seq: Sequence, out) -> bool:
        """Adds a sampled token; finishes the sequence when a stop condition holds. True if it finished."""
        p = seq.params
        if len(seq.output_ids) >= p.max_tokens:  # max_tokens=0: prompt scoring only
            self.scheduler.finish(seq, "length")
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
            self.scheduler.finish(seq, reason)
        return reason is not None

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
        )

    def shutdown(self) -> None:
        actor, self.actor = getattr(self, "actor", None), None
        if actor is not None:
            ray.kill(actor)
