"""Constrained decoding in the attention actor: one request's grammar matcher (fill its bitmask row, accept
each sampled token, roll back), the logits mask applied to constrained rows just before sampling, and
``RowGrammars``, the actor's matchers (one per constrained sequence) built from the compiled grammars the engine
ships (``step_io.GrammarRef``).

Imports only torch and xgrammar, both lazily (``cluster/inputs/grammar_matcher`` re-exports this module for the
engine side, which must import without torch); ``apply_token_bitmask``'s torch path is pure tensor math.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

# xgrammar 0.2.9's byte automaton takes any continuation byte after these lead bytes, so a grammar admits
# overlong forms (E0 80-9F, F0 80-8F), surrogates (ED A0-BF) and code points past U+10FFFF (F4 90-BF). They
# decode to several U+FFFD, which breaks maxLength and patterns; Utf8Guard removes those tokens from the mask.
_BAD_SECOND_BYTES = {0xE0: (0x80, 0x9F), 0xED: (0xA0, 0xBF), 0xF0: (0x80, 0x8F), 0xF4: (0x90, 0xBF)}
_NEVER_IN_UTF8 = bytes([0xC0, 0xC1, *range(0xF5, 0x100)])
_MAYBE_IN_UTF8 = bytes(b for b in range(256) if b not in _NEVER_IN_UTF8)


def _pack(allowed):
    """bool [V] -> int32 [ceil(V / 32)]: bit j % 32 of word j // 32 is allowed[j]."""
    import torch

    words = (allowed.numel() + 31) // 32
    bits = torch.zeros(words * 32, dtype=torch.int64)
    bits[:allowed.numel()] = allowed.to(torch.int64)
    packed = (bits.view(words, 32) << torch.arange(32)).sum(1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


class Utf8Guard:
    """Per-vocabulary masks that keep a grammar's output valid UTF-8 (see ``_BAD_SECOND_BYTES``); build once
    per tokenizer and share it between matchers."""

    def __init__(self, tokenizer_info) -> None:
        import torch

        self.token_bytes: list[bytes] = [bytes(b) for b in tokenizer_info.decoded_vocab]
        first = torch.tensor([b[0] if b else -1 for b in self.token_bytes])
        never = torch.tensor([bool(b.translate(None, _MAYBE_IN_UTF8)) for b in self.token_bytes])
        self.default_keep = _pack(~never)
        self.keep_after_lead = {lead: _pack(~never & ~((first >= low) & (first <= high)))
                                for lead, (low, high) in _BAD_SECOND_BYTES.items()}

    def restrict(self, bitmask, row: int, pending: bytes) -> None:
        """Clear, in ``bitmask[row]``, the tokens that cannot follow ``pending`` (an incomplete character)."""
        keep = self.keep_after_lead.get(pending[0]) if len(pending) == 1 else None
        restricted = bitmask[row] & (self.default_keep if keep is None else keep)
        if bool(restricted.any()):  # never leave a row with nothing allowed
            bitmask[row] = restricted

    def restrict_rows(self, bitmask, pendings: Sequence[bytes]) -> None:
        """``restrict`` for rows 0..len(pendings)-1 of ``bitmask`` at once (row k after ``pendings[k]``)."""
        import torch

        keep = self.default_keep.expand(len(pendings), -1).clone()  # [R, W]
        for k, pending in enumerate(pendings):
            lead = self.keep_after_lead.get(pending[0]) if len(pending) == 1 else None
            if lead is not None:
                keep[k] = lead
        rows = bitmask[:len(pendings)]
        restricted = rows & keep
        rows.copy_(torch.where(restricted.any(1, keepdim=True), restricted, rows))  # never leave a row empty

    def pending_after(self, pending: bytes, token_id: int) -> bytes:
        """The incomplete UTF-8 sequence at the end of the output once ``token_id`` follows ``pending``."""
        tail = (pending + self.token_bytes[token_id])[-4:]
        for back in range(1, len(tail) + 1):
            byte = tail[-back]
            if byte < 0x80:
                return b""
            if byte >= 0xC0:  # a lead byte: complete after 2, 3 or 4 bytes
                return tail[-back:] if back < (2 if byte < 0xE0 else 3 if byte < 0xF0 else 4) else b""
        return b""


class StructuredMatcher:
    """One request's position in its grammar: fill its bitmask row, accept each sampled token."""

    def __init__(self, compiled_grammar, utf8_guard: Utf8Guard | None = None) -> None:
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled_grammar)
        self._guard = utf8_guard
        self._pending = [b""]  # incomplete UTF-8 at the end of the output, after each accepted token

    def fill_bitmask(self, bitmask, row: int = 0) -> None:
        """Write the tokens allowed next into ``bitmask[row]`` (``bitmask``: int32 [R, ceil(V/32)], on CPU)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)
        if self._guard is not None:
            self._guard.restrict(bitmask, row, self._pending[-1])

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False (state unchanged) when the grammar does not allow it."""
        if not self._matcher.accept_token(int(token_id)):
            return False
        guard = self._guard
        self._pending.append(b"" if guard is None else guard.pending_after(self._pending[-1], int(token_id)))
        return True

    def rollback(self, num_tokens: int = 1) -> None:
        """Undo the last ``num_tokens`` accepted tokens (for preemption or speculative decoding)."""
        if num_tokens > 0:
            self._matcher.rollback(num_tokens)
            del self._pending[-num_tokens:]

    def is_terminated(self) -> bool:
        """True once the grammar is complete and a stop token has been accepted."""
        return bool(self._matcher.is_terminated())

    def is_completed(self) -> bool:
        """True when the text so far is a complete match (a stop token may follow)."""
        return bool(self._matcher.is_completed())

    def reset(self) -> None:
        """Back to the start of the grammar (a request recomputed from scratch)."""
        self._matcher.reset()
        self._pending = [b""]


def allocate_bitmask(num_rows: int, vocab_size: int):
    """An int32 [num_rows, ceil(vocab_size / 32)] bitmask with every token allowed (all bits set)."""
    import torch

    return torch.full((num_rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def apply_token_bitmask(logits, bitmask, rows: Sequence[int], backend: str = "auto"):
    """Set the logits of disallowed tokens to -inf in the constrained rows only; returns ``logits`` (in place).

    logits: [B, V] float; bitmask: int32 [len(rows), W], bit j % 32 of word j // 32 of row k allows token j in
    ``logits[rows[k]]``; ids at or beyond 32 * W are disallowed. Rows not in ``rows`` are never written, so they
    stay bit-identical. backend "auto": xgrammar's CPU kernel for CPU logits (about 4x faster than torch
    there), plain torch on any other device (no xgrammar, no Triton needed); "torch" / "xgrammar" force one.
    """
    if len(rows) == 0:
        return logits
    import torch

    cpu_kernel = logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if backend == "xgrammar" or (backend == "auto" and cpu_kernel):
        return _apply_xgrammar(logits, bitmask, rows)
    return _apply_torch(logits, bitmask, rows)


def _apply_torch(logits, bitmask, rows: Sequence[int]):
    import torch

    vocab_size = logits.shape[-1]
    index = torch.as_tensor(rows, dtype=torch.long, device=logits.device)
    words = bitmask.to(device=logits.device, dtype=torch.int32)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).flatten(1).bool()  # [R, 32 * W]
    if allowed.shape[1] < vocab_size:
        allowed = torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[1]), value=False)
    logits[index] = logits[index].masked_fill(~allowed[:, :vocab_size], float("-inf"))
    return logits


def _apply_xgrammar(logits, bitmask, rows: Sequence[int]):
    import torch
    import xgrammar as xgr

    rows = [int(r) for r in rows]
    covered = min(logits.shape[-1], 32 * bitmask.shape[-1])
    full = torch.empty((logits.shape[0], bitmask.shape[-1]), dtype=torch.int32)  # [B, W]: the kernel's layout
    full[rows] = bitmask.to(torch.int32)
    xgr.apply_token_bitmask_inplace(logits, full, vocab_size=covered, indices=rows, backend="cpu")
    if covered < logits.shape[-1]:
        logits[rows, covered:] = float("-inf")
    return logits


def allowed_token_ids(bitmask_row) -> list[int]:
    """The token ids a bitmask row allows (for tests and debugging)."""
    words = bitmask_row.tolist()
    return [32 * w + b for w, word in enumerate(words) for b in range(32) if (word >> b) & 1]


def _resolve(value):
    """A GrammarRef part: JSON text, or a Ray ObjectRef holding it (fetched only on a cache miss)."""
    if isinstance(value, str):
        return value
    import ray

    return ray.get(value)


class RowGrammars:
    """One attention actor's matchers, one per constrained sequence, and the grammars they run.

    A sequence's first step after (re)admission carries its ``GrammarRef`` and the tokens it generated before
    (``grammar_replay``, after a preemption): the matcher is rebuilt from them. Released sequences drop theirs.
    A step that is redone (a peer died mid-call) starts from fewer generated tokens than the matcher accepted:
    the matcher rolls back to ``num_generated`` first. Compiled grammars are cached by key (deserialized once per
    actor, least recently used dropped).
    """

    def __init__(self, max_grammars: int = 256) -> None:
        self.tokenizers: dict[str, tuple[object, Utf8Guard]] = {}
        self.grammars: OrderedDict[str, object] = OrderedDict()
        self.matchers: dict[int, StructuredMatcher] = {}
        self.accepted: dict[int, int] = {}  # tokens each matcher has accepted (replay included)
        self.max_grammars = max_grammars
        self._batch = None  # an xgrammar BatchGrammarMatcher (its thread pool), made on first use

    def begin_step(self, batch) -> None:
        """Drops released sequences' matchers and builds those of sequences whose step carries a grammar."""
        for seq_id in batch.released_seq_ids:
            self.matchers.pop(seq_id, None)
            self.accepted.pop(seq_id, None)
        for s in batch.seqs:
            if s.grammar is not None:
                compiled, guard = self._compiled(s.grammar)
                matcher = self.matchers[s.seq_id] = StructuredMatcher(compiled, guard)
                for token_id in s.grammar_replay:
                    if not matcher.accept(token_id):
                        raise ValueError(f"sequence {s.seq_id}: generated token {token_id} does not match its grammar")
                self.accepted[s.seq_id] = len(s.grammar_replay)

    def _compiled(self, ref):
        import xgrammar as xgr

        if ref.tokenizer_key not in self.tokenizers:
            info = xgr.TokenizerInfo.deserialize_json(_resolve(ref.tokenizer_json))
            self.tokenizers[ref.tokenizer_key] = (info, Utf8Guard(info))
        info, guard = self.tokenizers[ref.tokenizer_key]
        if ref.key not in self.grammars:
            self.grammars[ref.key] = xgr.CompiledGrammar.deserialize_json(_resolve(ref.grammar_json), info)
            while len(self.grammars) > self.max_grammars:
                self.grammars.popitem(last=False)
        self.grammars.move_to_end(ref.key)
        return self.grammars[ref.key], guard

    def mask(self, seqs, logits):
        """``logits`` [N, V] of ``seqs`` (the sampling rows, in order) with each constrained row's disallowed tokens
        at -inf: a masked copy when some row is constrained, else ``logits`` itself (other rows bit-identical)."""
        for s in seqs:
            extra = self.accepted.get(s.seq_id, 0) - s.num_generated
            if extra > 0:  # a redone step: back to the tokens the engine has recorded
                self.matchers[s.seq_id].rollback(extra)
                self.accepted[s.seq_id] -= extra
        rows = [j for j, s in enumerate(seqs)
                if (m := self.matchers.get(s.seq_id)) is not None and not m.is_terminated()]
        if not rows:
            return logits
        if self._batch is None:
            import xgrammar as xgr

            self._batch = xgr.BatchGrammarMatcher()
        matchers = [self.matchers[seqs[j].seq_id] for j in rows]
        bitmask = allocate_bitmask(len(rows), logits.shape[-1])
        self._batch.batch_fill_next_token_bitmask([m._matcher for m in matchers], bitmask)
        guard = matchers[0]._guard
        if guard is not None:
            guard.restrict_rows(bitmask, [m._pending[-1] for m in matchers])
        return apply_token_bitmask(logits.clone(), bitmask, rows)

    def accept(self, seqs, token_ids: Sequence[int], outputs) -> None:
        """Advances each constrained sequence's matcher by its sampled token; marks outputs whose grammar ended."""
        for s, token_id, out in zip(seqs, token_ids, outputs):
            matcher = self.matchers.get(s.seq_id)
            if matcher is not None and not matcher.is_terminated() and matcher.accept(token_id):
                self.accepted[s.seq_id] += 1
                out.grammar_terminated = matcher.is_terminated()
