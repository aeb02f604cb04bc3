"""The engine's compiled grammars, ready to ship to the attention actors: each distinct ``StructuredOutputSpec``
compiles once (``GrammarCache``, off the step loop), is serialized once, and is put into the object store once;
what a step carries is a small ``GrammarRef`` of keys and ObjectRefs."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import OrderedDict
from typing import Callable, Sequence

from llama4serve.actors.step_io import GrammarRef
from llama4serve.cluster.inputs.structured import GrammarCache, StructuredOutputSpec


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class GrammarStore:
    """Compile, serialize and publish grammars for one model (thread-safe).

    ``put`` publishes JSON text (``ray.put`` in the engine; the identity in tests, then the text travels inline).
    ``ref`` blocks while a grammar compiles: call it from a worker thread (``ref_async``) or offline code.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int],
                 put: Callable[[str], object] = lambda text: text, max_entries: int = 512) -> None:
        self.cache = GrammarCache.from_tokenizer(tokenizer, vocab_size, stop_token_ids, max_entries=max_entries)
        tokenizer_json = self.cache.tokenizer_info.serialize_json()
        self._tokenizer_key = _digest(tokenizer_json)
        self._put = put
        self._tokenizer_ref = put(tokenizer_json)
        self._refs: OrderedDict[StructuredOutputSpec, GrammarRef] = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries

    def ref(self, spec: StructuredOutputSpec) -> GrammarRef:
        """The shippable grammar of ``spec``; ``ValueError`` naming ``spec.field`` when it does not compile."""
        with self._lock:
            ref = self._refs.get(spec)
            if ref is not None:
                self._refs.move_to_end(spec)
                return ref
        grammar_json = self.cache.compile(spec).serialize_json()
        ref = GrammarRef(_digest(grammar_json), self._put(grammar_json), self._tokenizer_key, self._tokenizer_ref)
        with self._lock:
            ref = self._refs.setdefault(spec, ref)
            while len(self._refs) > self.max_entries:
                self._refs.popitem(last=False)
        return ref

    async def ref_async(self, spec: StructuredOutputSpec) -> GrammarRef:
        """``ref`` in a worker thread, for asyncio callers (the step loop keeps running while it compiles)."""
        return await asyncio.to_thread(self.ref, spec)
