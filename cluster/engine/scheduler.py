"""Continuous-batching scheduler (plain Python, no torch): which sequences run this step, with how many tokens.

A step runs prompts or decodes, not both: prompts that can run without preempting anyone (a running one's next
piece, then waiting ones within the token budget, `max_num_seqs` and both KV pools, each from its longest cached
prefix) go first, as a mixed batch leaves the decode kernels and pads every row's attention to the longest prompt
(2.6x slower). Else all running sequences run; when blocks run out the newest is preempted (recomputed later).

Image prompts: the first step of a (re)prefill (at position 0, or after a cached prefix that ends before the
last image row) carries the pixel values (an ObjectRef) so the actor encodes them once per (re)prefill; sequences that end or are preempted while the actor may hold their features are listed in
`take_released()` for the next step of that actor.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field

from llama4serve.actors.step_io import GrammarRef, SamplingSpec, SeqOutput, SeqStep
from llama4serve.cluster.engine.block_manager import BlockManager
from llama4serve.cluster.engine.prefix_cache import BlockHasher, block_hashes
from llama4serve.cluster.sampling_params import SamplingParams


@dataclass
class SeqImages:
    """A prompt's images as the scheduler sees them: opaque pixels (an ObjectRef) and where their rows go."""

    pixels: object
    patch_positions: list[int]  # prompt positions of the <|patch|> tokens, ascending; one feature row each
    sent: bool = False  # the actor may hold this sequence's features
    tile_hashes: list[bytes] = field(default_factory=list)  # content hash of each tile (prefix cache)

    @property
    def end(self) -> int:
        """First position after the last image row: prefill past it needs no features."""
        return self.patch_positions[-1] + 1


@dataclass
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose k/v are in the cache
    prompt_logprobs: list[float | None] = field(default_factory=lambda: [None])
    prompt_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=lambda: [None])
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    num_preemptions: int = 0
    images: SeqImages | None = None
    hasher: BlockHasher | None = None  # the prefix cache's hashes of this sequence's full blocks
    grammar: GrammarRef | None = None  # structured outputs: the compiled grammar the actor masks with
    grammar_sent: bool = False  # the actor holds this sequence's matcher

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def sampling_spec(self) -> SamplingSpec:
        p = self.params
        return SamplingSpec(p.temperature, p.top_p, p.top_k, self.seed, p.logprobs, p.presence_penalty,
                            p.frequency_penalty, p.repetition_penalty)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 eos_ids: frozenset[int] = frozenset(), max_model_len: int = 2**31):
        self.blocks = blocks
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.released: list[int] = []  # image sequences whose cached features the actor must drop
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache at admission
        self.prefix_cache_hits = 0  # of those, tokens served from the cache

    def take_released(self) -> list[int]:
        released, self.released = self.released, []
        return released

    def _release(self, seq: Sequence) -> None:
        if (seq.images is not None and seq.images.sent) or seq.grammar_sent:
            self.released.append(seq.seq_id)
            seq.grammar_sent = False
            if seq.images is not None:
                seq.images.sent = False

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq_id: int) -> Sequence | None:
        for seq in list(self.running) + list(self.waiting):
            if seq.seq_id == seq_id:
                self.finish(seq, "abort")
                return seq
        return None

    def finish(self, seq: Sequence, reason: str, num_output_tokens: int | None = None) -> None:
        """Ends a sequence and frees its blocks; `num_output_tokens` keeps only that many generated tokens
        (a stop string ended it there)."""
        if num_output_tokens is not None:
            del seq.output_ids[num_output_tokens:], seq.logprobs[num_output_tokens:]
            del seq.top_logprobs[num_output_tokens:]
        seq.finish_reason = reason
        self.blocks.free(seq.seq_id)
        self._release(seq)
        if seq.images is not None:
            seq.images.pixels = None  # lets Ray free the pixels
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.seq_id)
        self._release(seq)  # the KV is dropped: features are recomputed with the prefill
        self.running.remove(seq)
        seq.num_computed = 0
        seq.prompt_logprobs = [None]  # recollected, identical, during recompute
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def recompute_all(self, blocks: BlockManager) -> None:
        """The actor holding this KV was replaced: the running sequences are preempted, in order, to start over
        from their tokens (prompt + tokens so far) on `blocks`, a fresh block manager for its empty cache."""
        for seq in reversed(list(self.running)):
            self.preempt(seq)
        self.released, self.blocks = [], blocks

    def _step_for(self, seq: Sequence, n: int) -> SeqStep:
        start, end = seq.num_computed, seq.num_computed + n
        full, read, write = self.blocks.append(seq.seq_id, start, end)
        targets: list[int] = []
        if seq.params.prompt_logprobs:
            # next-token targets for positions [start, end) that lie inside the prompt
            targets = seq.prompt_ids[start + 1 : min(end, len(seq.prompt_ids) - 1) + 1]
        samples = end == seq.num_tokens
        penalized = samples and seq.params.has_penalties
        pixels, image_offset = None, 0
        if seq.images is not None and start < seq.images.end:
            image_offset = bisect_left(seq.images.patch_positions, start)
            if not seq.images.sent:  # the first step of a (re)prefill: at 0, or after a cached prefix
                pixels, seq.images.sent = seq.images.pixels, True
        return SeqStep(
            seq_id=seq.seq_id,
            token_ids=seq.all_ids[start:end],
            start_pos=start,
            full_blocks=full,
            chunk_read_blocks=read,
            chunk_write_blocks=write,
            sampling=seq.sampling_spec() if samples else None,
            num_generated=len(seq.output_ids),
            logprob_targets=targets,
            num_prompt_top=seq.params.num_prompt_logprobs or 0,
            penalty_prompt_ids=seq.prompt_ids if penalized and seq.params.repetition_penalty != 1 else [],
            penalty_output_ids=seq.output_ids if penalized else [],
            image_pixels=pixels,
            image_offset=image_offset,
            **self._grammar_fields(seq),
        )

    @staticmethod
    def _grammar_fields(seq: Sequence) -> dict:
        """The grammar and the tokens to replay into it, on a constrained sequence's first step since admission."""
        if seq.grammar is None or seq.grammar_sent:
            return {}
        seq.grammar_sent = True
        return {"grammar": seq.grammar, "grammar_replay": list(seq.output_ids)}

    def decode_steps_limit(self, scheduled: list[tuple[Sequence, SeqStep]], max_steps: int) -> int:
        """How many decode steps the scheduled batch may run in one actor call (multi-step scheduling), >= 1.

        More than one only when nobody waits for admission and every scheduled sequence decodes one token
        without penalties (the actor feeds each sampled token back itself); the steps stay within every
        sequence's max_tokens, max_model_len and current attention chunk, and the free blocks cover them all.
        """
        if max_steps <= 1 or self.waiting:
            return 1
        k = max_steps
        for seq, step in scheduled:
            if len(step.token_ids) != 1 or step.sampling is None or seq.params.has_penalties:
                return 1
            k = min(k, seq.params.max_tokens - len(seq.output_ids), self.max_model_len - step.end_pos,
                    self.blocks.steps_left_in_chunk(step.start_pos))
        k = max(k, 1)
        return k if not scheduled or self.blocks.can_extend([step.start_pos for _, step in scheduled],
                                           [seq.seq_id for seq, _ in scheduled], k) else 1

    def extend_decode(self, scheduled: list[tuple[Sequence, SeqStep]], num_steps: int) -> None:
        """Grows the block tables of the scheduled decode steps to cover `num_steps` positions each."""
        for seq, step in scheduled:
            if num_steps > 1:
                step.full_blocks, _, step.chunk_write_blocks = self.blocks.append(
                    seq.seq_id, step.end_pos, step.start_pos + num_steps
                )

    def schedule(self) -> list[tuple[Sequence, SeqStep]]:
        """The next step's work (see the module docstring); empty when nothing can run."""
        return self._schedule(prompts_only=True) or self._schedule(prompts_only=False)  # an empty pass changes nothing

    def _schedule(self, prompts_only: bool) -> list[tuple[Sequence, SeqStep]]:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, SeqStep]] = []
        preempted = False
        for seq in list(self.running):
            n = min(seq.num_tokens - seq.num_computed, budget)
            if seq not in self.running or budget == 0 or (prompts_only and (
                    n == 1 or not self.blocks.can_append(seq.seq_id, seq.num_computed + n))):
                continue
            while not self.blocks.can_append(seq.seq_id, seq.num_computed + n):
                self.preempt(victim := self.running[-1])
                preempted = True
                if victim is seq:
                    break
            if seq in self.running:
                scheduled.append((seq, self._step_for(seq, n)))
                budget -= n
        while not preempted and (admit := self._admissible(budget)):
            seq, cached, hashes, n = admit
            self.running.append(self.waiting.popleft())
            self.blocks.take_prefix(seq.seq_id, hashes, cached)
            seq.num_computed = cached
            if self._uses_cache(seq):
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += cached
            scheduled.append((seq, self._step_for(seq, n)))
            budget -= n
        return scheduled

    def _admissible(self, budget: int) -> tuple[Sequence, int, list, int] | None:
        """(first waiting sequence, cached prefix tokens, their block hashes, tokens to run) if it can start now."""
        if not self.waiting or budget <= 0 or len(self.running) >= self.max_num_seqs:
            return None
        seq = self.waiting[0]
        hashes = seq.hasher.hashes if (cached := self.cached_prefix(seq)) else []
        n = min(seq.num_tokens - cached, budget)
        return (seq, cached, hashes, n) if self.blocks.can_admit(hashes, cached, cached + n) else None

    def _uses_cache(self, seq: Sequence) -> bool:  # prompt logprobs need every position's logits: no reuse
        return self.blocks.enable_caching and not seq.params.prompt_logprobs

    def cached_prefix(self, seq: Sequence) -> int:
        """Tokens of the sequence's longest prefix this actor's cache holds (0 when it may not use the cache)."""
        if not self._uses_cache(seq):
            return 0
        return self.blocks.cached_prefix(block_hashes(seq, self.blocks.block_size, seq.num_tokens), seq.num_tokens)

    # ---------------------------------------------------------------- after a step
    def postprocess(self, scheduled: list[tuple[Sequence, SeqStep]], result: list, num_steps: int) -> list[Sequence]:
        """Records a finished step's outputs (every decode step's, in order, after a multi-step call) and applies
        the token-level stop conditions (stop tokens, EOS, max_tokens, max_model_len); stop strings are the
        output processor's. Returns the sequences that gained a token or finished. Tokens a sequence sampled
        after finishing are dropped."""
        updated: dict[int, Sequence] = {}
        for j, outputs in enumerate([result] if num_steps == 1 else result):
            for (seq, step), out in zip(scheduled, outputs):
                if seq.finish_reason is not None:  # aborted while the step ran, or finished at an earlier step
                    continue
                seq.num_computed = step.end_pos + j
                if self.blocks.enable_caching:
                    hashes = block_hashes(seq, self.blocks.block_size, seq.num_computed)
                    self.blocks.cache_computed(seq.seq_id, hashes, seq.num_computed)
                self.blocks.finish_step(seq.seq_id)
                if out.prompt_logprobs:  # prompt positions start_pos + 1.., each written once (recompute too)
                    del seq.prompt_logprobs[step.start_pos + 1:], seq.prompt_top_logprobs[step.start_pos + 1:]
                    seq.prompt_logprobs.extend(out.prompt_logprobs)
                    seq.prompt_top_logprobs.extend(out.prompt_top_logprobs)
                if out.token_id is not None:
                    self._append(seq, out)
                    updated[seq.seq_id] = seq
        return list(updated.values())

    def _append(self, seq: Sequence, out: SeqOutput) -> None:
        """Adds a sampled token; finishes the sequence when a token-level stop condition holds."""
        p = seq.params
        if len(seq.output_ids) >= p.max_tokens:  # max_tokens=0: prompt scoring only
            self.finish(seq, "length")
            return
        seq.output_ids.append(out.token_id)
        if out.logprob is not None:
            seq.logprobs.append(out.logprob)
            seq.top_logprobs.append(out.top_logprobs or [])
        if out.token_id in p.stop_token_ids or (not p.ignore_eos and out.token_id in self.eos_ids) \
                or out.grammar_terminated:
            self.finish(seq, "stop")
        elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            self.finish(seq, "length")
