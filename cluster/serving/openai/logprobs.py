"""Per-token strings and log-probabilities of the OpenAI responses: the exact bytes and display string of each
token (`TokenText`), `text_offset`s (`TextOffsets`), and the completions and chat `logprobs` objects.
"""

from __future__ import annotations

import math


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character a byte-level BPE vocabulary uses per byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_DECODER = _gpt2_byte_decoder()


def finite(logprob: float | None) -> float | None:
    """JSON has no -inf: such log-probabilities are sent as -9999.0 (vLLM does the same)."""
    if logprob is None:
        return None
    return logprob if math.isfinite(logprob) else -9999.0


class TokenText:
    """Per-token strings for logprobs: the exact bytes of a token, its display string and what it adds to the text.

    A token that is not whole UTF-8 (half of a multi-byte character) is shown as `bytes:\\xe4\\xbd` (OpenAI's
    convention); special tokens show their name but add nothing to the text (the engine skips them). Without a
    tokenizer tokens show as `token_id:123`.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._backend = getattr(tokenizer, "_backend", None)  # tokenizers.Tokenizer, for id_to_token
        self._cache: dict[int, tuple[str, bytes, bytes]] = {}

    def _info(self, token_id: int) -> tuple[str, bytes, bytes]:
        info = self._cache.get(token_id)
        if info is not None:
            return info
        if self.tokenizer is None:
            info = (f"token_id:{token_id}", b"", b"")
        else:
            piece = self._backend.id_to_token(token_id) if self._backend is not None else None
            if piece and all(c in _BYTE_DECODER for c in piece):
                data = bytes(_BYTE_DECODER[c] for c in piece)
            else:
                data = self.tokenizer.decode([token_id], skip_special_tokens=False).encode()
            special = bool(data) and self.tokenizer.decode([token_id], skip_special_tokens=True) == ""
            try:
                shown = data.decode("utf-8")
            except UnicodeDecodeError:
                shown = "bytes:" + "".join(f"\\x{b:02x}" for b in data)
            info = (shown, data, b"" if special else data)
        self._cache[token_id] = info
        return info

    def token(self, token_id: int) -> str:
        return self._info(token_id)[0]

    def token_bytes(self, token_id: int) -> list[int]:
        return list(self._info(token_id)[1])

    def text_bytes(self, token_id: int) -> bytes:
        return self._info(token_id)[2]


class TextOffsets:
    """`text_offset` of successive tokens: the character index where each token's text starts.

    Counts UTF-8 lead bytes, so a token that continues a character started by the previous token points at
    that character.
    """

    def __init__(self, start: int = 0):
        self.chars = start  # characters started so far
        self.pending = 0  # continuation bytes still expected

    def take(self, data: bytes) -> int:
        offset = self.chars - (1 if self.pending else 0)
        for b in data:
            if b & 0xC0 == 0x80:
                self.pending = max(self.pending - 1, 0)
            else:
                self.chars += 1
                self.pending = 3 if b >= 0xF0 else 2 if b >= 0xE0 else 1 if b >= 0xC0 else 0
        return offset


def completion_logprobs(tt: TokenText, offsets: TextOffsets, ids: list[int], logprobs: list[float | None],
                        top: list[list[tuple[int, float]] | None] | None) -> dict:
    """The /v1/completions `logprobs` object of some tokens (top: alternatives per token, or None). A
    `top_logprobs` entry lists the token itself, then its alternatives; None for the first prompt token."""
    tokens = [tt.token(i) for i in ids]
    top_dicts = []
    for k, lp in enumerate(logprobs):
        if lp is None:
            top_dicts.append(None)
            continue
        entry = {tokens[k]: finite(lp)}
        for t, v in (top[k] if top else None) or []:
            entry.setdefault(tt.token(t), finite(v))
        top_dicts.append(entry)
    return {
        "tokens": tokens,
        "token_logprobs": [finite(lp) for lp in logprobs],
        "top_logprobs": top_dicts,
        "text_offset": [offsets.take(tt.text_bytes(i)) for i in ids],
    }


def chat_logprobs(tt: TokenText, ids: list[int], logprobs: list[float],
                  top: list[list[tuple[int, float]]] | None) -> list[dict]:
    """The /v1/chat/completions `logprobs.content` entries of some tokens."""
    def entry(token_id: int, lp: float) -> dict:
        return {"token": tt.token(token_id), "logprob": finite(lp), "bytes": tt.token_bytes(token_id)}

    return [
        {**entry(i, lp), "top_logprobs": [entry(t, v) for t, v in (top[k] if top else [])]}
        for k, (i, lp) in enumerate(zip(ids, logprobs))
    ]
