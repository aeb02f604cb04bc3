"""Runtime tokenizer of the engine: Hugging Face ``tokenizer.json`` + chat template, without transformers.

``encode(text)`` adds ``<|begin_of_text|>`` by default because the Llama 4 ``tokenizer.json`` has a
``TemplateProcessing`` post-processor that does (as transformers does). A prompt rendered by
``apply_chat_template`` already starts with ``bos_token``: encode it with ``add_special_tokens=False``.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

END_TOKENS = ("<|end_of_text|>", "<|eom|>", "<|eot|>")
_REPLACEMENT_CHAR = "\ufffd"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _compile_chat_template(source: str):
    """Compile like transformers: sandboxed, trim_blocks/lstrip_blocks, its ``tojson`` and globals."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """Encode, decode and chat-format text for one model directory (see ``from_dir``)."""

    def __init__(self, backend, tokenizer_config: dict, chat_template: str | None,
                 config_eos_ids: Sequence[int] = ()) -> None:
        self._backend = backend  # tokenizers.Tokenizer
        self._config = tokenizer_config
        self._chat_template_source = chat_template
        self._compiled_template = None
        self.special_tokens_map: dict[str, str] = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            content = _token_content(tokenizer_config.get(key))
            if content is not None:
                self.special_tokens_map[key] = content
        end_ids = {backend.token_to_id(t) for t in END_TOKENS} - {None}
        eos_token = self.special_tokens_map.get("eos_token")
        if eos_token is not None and backend.token_to_id(eos_token) is not None:
            end_ids.add(backend.token_to_id(eos_token))
        self._eos_token_ids = sorted(end_ids | set(config_eos_ids))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer | None":
        """Load ``tokenizer.json`` and friends from a model directory; ``None`` when it has no ``tokenizer.json``.

        The chat template is read from ``chat_template.jinja`` (transformers 5 layout) or else from the
        ``chat_template`` entry of ``tokenizer_config.json`` (released layout). End-of-sequence ids are the union of
        ``<|end_of_text|>``/``<|eom|>``/``<|eot|>``, the tokenizer's ``eos_token`` and the ``eos_token_id`` of
        ``generation_config.json`` and ``config.json``.
        """
        from tokenizers import Tokenizer as BackendTokenizer

        root = Path(model_dir)
        if not (root / "tokenizer.json").is_file():
            return None
        backend = BackendTokenizer.from_file(str(root / "tokenizer.json"))
        tok_config = _read_json(root / "tokenizer_config.json")
        template = None
        if (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text(encoding="utf-8")
        elif isinstance(tok_config.get("chat_template"), str):
            template = tok_config["chat_template"]
        elif isinstance(tok_config.get("chat_template"), list):  # [{"name": ..., "template": ...}]
            named = {t["name"]: t["template"] for t in tok_config["chat_template"]}
            template = named.get("default")
        model_config = _read_json(root / "config.json")
        eos_ids = _as_id_list(_read_json(root / "generation_config.json").get("eos_token_id"))
        eos_ids += _as_id_list(model_config.get("eos_token_id"))
        eos_ids += _as_id_list(model_config.get("text_config", {}).get("eos_token_id"))
        return cls(backend, tok_config, template, eos_ids)

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end a generation (sorted, no duplicates)."""
        return list(self._eos_token_ids)

    @property
    def bos_token_id(self) -> int | None:
        """Id of ``bos_token`` (``<|begin_of_text|>``), or ``None`` when the tokenizer has none."""
        bos = self.special_tokens_map.get("bos_token", "<|begin_of_text|>")
        return self._backend.token_to_id(bos)

    @property
    def pad_token_id(self) -> int | None:
        """Id of ``pad_token`` (``<|finetune_right_pad|>``), or ``None``."""
        pad = self.special_tokens_map.get("pad_token")
        return None if pad is None else self._backend.token_to_id(pad)

    @property
    def vocab_size(self) -> int:
        """Number of tokens the tokenizer knows, special tokens included (may be below the model's vocab_size)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def model_max_length(self) -> int | None:
        """``model_max_length`` from tokenizer_config.json, if present."""
        value = self._config.get("model_max_length")
        return int(value) if value is not None else None

    def token_to_id(self, token: str) -> int | None:
        """Id of one token string (e.g. ``"<|patch|>"``), ``None`` if unknown."""
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the post-processor prepends ``<|begin_of_text|>``."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; bytes that do not form complete UTF-8 characters come out as U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def chat_template(self) -> str | None:
        """The chat template's source (None when the model directory has none)."""
        return self._chat_template_source

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render ``messages`` with the model's chat template, as transformers' ``apply_chat_template`` does.

        ``messages`` are ``{"role": ..., "content": str | list of parts}``; extra keyword arguments reach the
        template as variables. Returns the prompt text (it already holds ``bos_token``).
        """
        if self._chat_template_source is None:
            raise ValueError(
                "this model directory has no chat template (neither chat_template.jinja nor a chat_template entry in "
                "tokenizer_config.json); send a plain prompt instead of chat messages"
            )
        if self._compiled_template is None:
            self._compiled_template = _compile_chat_template(self._chat_template_source)
        variables = {**self.special_tokens_map, "tools": None, "documents": None, **kwargs}
        return self._compiled_template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )

    def detokenizer(self, skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        """A fresh ``IncrementalDetokenizer`` for one request's generated tokens."""
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Turns a request's generated ids into text deltas, holding back incomplete UTF-8 characters.

    ``add(new_ids)`` returns the text that became final; ``flush()`` returns what is still held back (call it when
    the request finishes). The concatenation of all deltas and the flush equals ``tokenizer.decode(all_ids)``.
    Only text after ``prefix_offset`` is decoded each step (the vLLM scheme), so a step costs O(new tokens).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # start of the decode window; text before it is final
        self.read_offset = 0  # ids before it are in `text`

    def add(self, new_ids: Sequence[int]) -> str:
        """Append generated ids; return the newly completed text ("" while a character is incomplete)."""
        self.token_ids.extend(int(i) for i in new_ids)
        decode = self.tokenizer.decode
        prefix_text = decode(self.token_ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        window_text = decode(self.token_ids[self.prefix_offset:], self.skip_special_tokens)
        if len(window_text) <= len(prefix_text) or window_text.endswith(_REPLACEMENT_CHAR):
            return ""
        delta = window_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return delta

    def flush(self) -> str:
        """Return the held-back tail (incomplete characters decode to U+FFFD) and mark everything as read."""
        decode = self.tokenizer.decode
        prefix_text = decode(self.token_ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        window_text = decode(self.token_ids[self.prefix_offset:], self.skip_special_tokens)
        delta = window_text[len(prefix_text):]
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return delta
