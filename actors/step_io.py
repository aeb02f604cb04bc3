"""Per-step batch data sent from the engine to an attention actor, and what comes back. Small payloads only:
token ids, positions and block tables; never tensors (an image prompt's pixels travel as an ObjectRef)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingSpec:
    """What the actor needs to pick a sequence's next token."""

    temperature: float = 0.0  # <= 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # <= 0: off
    seed: int = 0  # with the number of tokens generated so far, seeds this row's generator
    logprobs: int | None = None  # None: no logprobs; n >= 0: chosen token's logprob plus n alternatives
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1: off


@dataclass(frozen=True)
class GrammarRef:
    """A compiled grammar (xgrammar ``CompiledGrammar.serialize_json``) and its tokenizer info
    (``TokenizerInfo.serialize_json``), each JSON text or a Ray ObjectRef holding it; the actor deserializes
    each key once and caches it."""

    key: str
    grammar_json: object
    tokenizer_key: str
    tokenizer_json: object


@dataclass
class SeqStep:
    """One sequence's share of a step: tokens at positions [start_pos, start_pos + len(token_ids)).

    Block tables: `full_blocks` covers positions [0, end) of the full-attention (NoPE) pool;
    `chunk_read_blocks` covers [chunk_start(start_pos), start_pos) of the chunked-layer pool (read this step);
    `chunk_write_blocks` covers [chunk_start(end), end) (written this step; the same list when the step stays in
    one chunk). chunk_start(p) = floor(p / attention_chunk_size) * attention_chunk_size.
    """

    seq_id: int
    token_ids: list[int]
    start_pos: int
    full_blocks: list[int]
    chunk_read_blocks: list[int]
    chunk_write_blocks: list[int]
    sampling: SamplingSpec | None = None  # None: a prompt chunk that ends before the prompt does
    num_generated: int = 0
    logprob_targets: list[int] = field(default_factory=list)  # tokens after positions start_pos.. (prompt logprobs)
    num_prompt_top: int = 0  # with logprob_targets: also this many most likely tokens at each of those positions
    # Only when the sequence samples with penalties: the ids they look at (prompt ids only for repetition).
    penalty_prompt_ids: list[int] = field(default_factory=list)
    penalty_output_ids: list[int] = field(default_factory=list)
    # Image prompts: the pixel values of all the request's images ([N, 3, S, S] tiles in prompt order, usually a
    # Ray ObjectRef), sent only with the step at start_pos 0; the actor encodes them once and caches the
    # features. image_offset: feature rows used by earlier steps (<|patch|> prompt tokens before start_pos).
    image_pixels: object | None = None
    image_offset: int = 0
    # Structured outputs: the sequence's grammar, sent with its first step after (re)admission, with the tokens it
    # generated before (a recompute): the actor rebuilds its matcher from them and masks every sampling row after.
    grammar: GrammarRef | None = None
    grammar_replay: list[int] = field(default_factory=list)

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass
class StepBatch:
    seqs: list[SeqStep]
    moe_capacity: int = 0  # most routed rows any attention rank sends this step (same on every rank)
    released_seq_ids: list[int] = field(default_factory=list)  # finished/aborted/preempted: drop features, matchers
    # Multi-step decode: > 1 when every sequence decodes one token and its block tables cover num_steps
    # positions (all in its current chunk); the actor feeds each sampled token back and returns one list of
    # outputs per step.
    num_steps: int = 1
    # Ping-pong (expert actors on a standing exchange, decode steps of >= PING_PONG_MIN_ROWS rows): 2 when each
    # MoE layer exchanges its rows as two micro-batches, one's attention computing while the other's experts do;
    # the same on every rank of the step.
    micro_batches: int = 1


PING_PONG_MIN_ROWS = 8  # decode rows on the busiest attention rank from which a step runs two micro-batches


@dataclass
class SeqOutput:
    seq_id: int
    token_id: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    prompt_logprobs: list[float] = field(default_factory=list)  # one per logprob_targets entry
    prompt_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # likewise, if num_prompt_top
    grammar_terminated: bool = False  # the sequence's grammar accepted its stop token with this one
