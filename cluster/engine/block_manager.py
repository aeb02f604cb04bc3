"""KV block bookkeeping for the two pools of DESIGN.md §3 (plain Python, no torch), with the prefix cache of §9.

- full pool: blocks for every position [0, n) of a sequence (NoPE / full-attention layers).
- chunk pool: blocks for the current attention chunk only, [chunk_start(n), n); a finished chunk's blocks are
  released once the step that moved past it is done, so a sequence never holds more than one chunk (+ one block
  while a step crosses a chunk boundary).

Prefix cache: computed full blocks get their hash (`prefix_cache.BlockHasher`) and stay cached after release. A
new sequence reuses the longest prefix both pools can serve: the full pool any cached prefix, the chunk pool the
cached blocks from the start of the chunk the prefix ends in (none when it ends on a chunk boundary).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llama4serve.cluster.engine.prefix_cache import CachingBlockPool, OutOfBlocks

__all__ = ["BlockManager", "OutOfBlocks", "SeqBlocks", "blocks_for_length", "default_block_size"]


@dataclass
class SeqBlocks:
    full: list[int] = field(default_factory=list)
    chunk: list[int] = field(default_factory=list)
    chunk_base: int = 0  # first position covered by `chunk`
    retired_chunk: list[int] = field(default_factory=list)  # read during the current step, freed after it
    num_hashed_full: int = 0  # leading full-pool blocks that have their hash
    num_hashed_chunk: int = 0  # leading `chunk` blocks that have their hash


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def blocks_for_length(length: int, block_size: int, chunk_size: int | None, uses_full: bool,
                      uses_chunk: bool) -> tuple[int, int]:
    """(full, chunk) blocks a sequence of `length` tokens holds at most in the two pools (admission bound)."""
    full = _ceil_div(length, block_size) if uses_full else 0
    chunk = _ceil_div(min(length, chunk_size), block_size) + 1 if uses_chunk and chunk_size is not None else 0
    return full, chunk


def default_block_size(chunk_size: int | None) -> int:
    """The largest of 16, 8, 4, 2, 1 that divides `chunk_size` (16 when no layer is chunked)."""
    return next(bs for bs in (16, 8, 4, 2, 1) if chunk_size is None or chunk_size % bs == 0)


class BlockManager:
    def __init__(
        self,
        num_full_blocks: int,
        num_chunk_blocks: int,
        block_size: int,
        chunk_size: int | None,
        uses_full_pool: bool = True,
        uses_chunk_pool: bool = True,
        enable_caching: bool = True,
    ):
        if chunk_size is not None and chunk_size % block_size:
            raise ValueError(
                f"block_size is {block_size}; it must divide attention_chunk_size ({chunk_size})"
            )
        self.block_size = block_size
        self.chunk_size = chunk_size
        self.uses_full = uses_full_pool
        self.uses_chunk = uses_chunk_pool and chunk_size is not None
        self.enable_caching = enable_caching
        self.full_pool = CachingBlockPool(num_full_blocks if self.uses_full else 0, enable_caching)
        self.chunk_pool = CachingBlockPool(num_chunk_blocks if self.uses_chunk else 0, enable_caching)
        self.seqs: dict[int, SeqBlocks] = {}

    def chunk_start(self, pos: int) -> int:
        return pos // self.chunk_size * self.chunk_size if self.chunk_size else 0

    def _needs(self, seq: SeqBlocks, end: int) -> tuple[int, int]:
        """Extra (full, chunk) blocks to hold positions up to `end`."""
        full = _ceil_div(end, self.block_size) - len(seq.full) if self.uses_full else 0
        chunk = 0
        if self.uses_chunk:
            base = self.chunk_start(end)
            have = len(seq.chunk) if base == seq.chunk_base else 0
            chunk = _ceil_div(end - base, self.block_size) - have
        return max(full, 0), max(chunk, 0)

    def can_append(self, seq_id: int, end: int) -> bool:
        full, chunk = self._needs(self.seqs.get(seq_id, SeqBlocks()), end)
        return full <= self.full_pool.num_free and chunk <= self.chunk_pool.num_free

    def steps_left_in_chunk(self, pos: int) -> int:
        """Decode steps from position `pos` whose block tables stay in pos's attention chunk: positions
        pos .. pos + n - 1 with pos + n still inside it (a table ending on a chunk boundary retires the chunk).
        Unbounded without a chunk pool."""
        return self.chunk_size - 1 - pos % self.chunk_size if self.uses_chunk else 1 << 30

    def can_extend(self, starts: list[int], seq_ids: list[int], num_steps: int) -> bool:
        """Whether the free blocks cover positions [start, start + num_steps) of all these sequences at once."""
        needs = [self._needs(self.seqs.get(i, SeqBlocks()), start + num_steps) for i, start in zip(seq_ids, starts)]
        return (sum(f for f, _ in needs) <= self.full_pool.num_free
                and sum(c for _, c in needs) <= self.chunk_pool.num_free)

    def blocks_for_length(self, length: int) -> tuple[int, int]:
        """(full, chunk) blocks a sequence of `length` tokens holds at most (admission bound)."""
        return blocks_for_length(length, self.block_size, self.chunk_size, self.uses_full, self.uses_chunk)

    # ---------------------------------------------------------------- prefix cache
    def cached_prefix(self, hashes: list[bytes], num_tokens: int) -> int:
        """Tokens of the longest prefix of a `num_tokens`-token sequence (block hashes `hashes`) that both pools
        can serve from the cache: whole blocks, at most num_tokens - 1 (the last token is always computed)."""
        if not self.enable_caching:
            return 0
        bs = self.block_size
        limit = min(len(hashes), (num_tokens - 1) // bs)
        if self.uses_full:
            limit = next((i for i in range(limit) if self.full_pool.lookup(hashes[i]) is None), limit)
        if not self.uses_chunk:
            return limit * bs
        per_chunk, best, run = self.chunk_size // bs, 0, False
        for i in range(limit):
            if i % per_chunk == 0:  # a prefix ending on a chunk boundary needs no chunk-pool blocks
                best, run = i, True
            run = run and self.chunk_pool.lookup(hashes[i]) is not None
            if run:
                best = i + 1
        if limit % per_chunk == 0:
            best = limit
        return best * bs

    def _prefix_blocks(self, hashes: list[bytes], num_cached: int) -> tuple[list[int], list[int]]:
        """The cached (full, chunk) blocks serving positions [0, num_cached) (`cached_prefix` found them)."""
        bs, n = self.block_size, num_cached // self.block_size
        full = [self.full_pool.lookup(h) for h in hashes[:n]] if self.uses_full else []
        chunk = [self.chunk_pool.lookup(h) for h in hashes[self.chunk_start(num_cached) // bs : n]] \
            if self.uses_chunk else []
        return full, chunk

    def can_admit(self, hashes: list[bytes], num_cached: int, end: int) -> bool:
        """Whether a new sequence fits for its first step up to `end`, reusing its first `num_cached` tokens."""
        full, chunk = self._prefix_blocks(hashes, num_cached)
        seq = SeqBlocks(full=full, chunk=chunk, chunk_base=self.chunk_start(num_cached))
        need_full, need_chunk = self._needs(seq, end)
        return (need_full + self.full_pool.num_unheld(full) <= self.full_pool.num_free
                and need_chunk + self.chunk_pool.num_unheld(chunk) <= self.chunk_pool.num_free)

    def take_prefix(self, seq_id: int, hashes: list[bytes], num_cached: int) -> None:
        """Starts a sequence's tables with the cached blocks of its first `num_cached` tokens (may be 0)."""
        full, chunk = self._prefix_blocks(hashes, num_cached)
        self.full_pool.touch(full)
        self.chunk_pool.touch(chunk)
        self.seqs[seq_id] = SeqBlocks(full=full, chunk=chunk, chunk_base=self.chunk_start(num_cached),
                                      num_hashed_full=len(full), num_hashed_chunk=len(chunk))

    def cache_computed(self, seq_id: int, hashes: list[bytes], num_computed: int) -> None:
        """Gives the sequence's full blocks among its first `num_computed` positions (k/v written) their hashes,
        in both pools, so that later sequences find them. `hashes` covers at least num_computed // block_size.
        A finished chunk's blocks are not hashed after the step that left it: that step wrote its own positions
        before the boundary only to the full pool (the chunked layers read them as the step's own keys)."""
        seq = self.seqs.get(seq_id)
        if seq is None or not self.enable_caching:
            return
        bs, done = self.block_size, num_computed // self.block_size
        for i in range(seq.num_hashed_full, min(done, len(seq.full))):
            self.full_pool.set_hash(seq.full[i], hashes[i])
        seq.num_hashed_full = max(seq.num_hashed_full, min(done, len(seq.full)))
        if self.uses_chunk:  # the current chunk's blocks; a step ending past a chunk writes only the next one
            first = seq.chunk_base // bs
            upto = min(done - first, len(seq.chunk))
            for j in range(seq.num_hashed_chunk, upto):
                self.chunk_pool.set_hash(seq.chunk[j], hashes[first + j])
            seq.num_hashed_chunk = max(seq.num_hashed_chunk, upto)

    # ---------------------------------------------------------------- a step's tables
    def append(self, seq_id: int, start: int, end: int) -> tuple[list[int], list[int], list[int]]:
        """Allocates for a step over positions [start, end). Returns (full, chunk_read, chunk_write) tables."""
        seq = self.seqs.setdefault(seq_id, SeqBlocks(chunk_base=self.chunk_start(start)))
        full, chunk = self._needs(seq, end)
        if full > self.full_pool.num_free or chunk > self.chunk_pool.num_free:
            raise OutOfBlocks(f"sequence {seq_id} needs {full} full and {chunk} chunk blocks")
        seq.full += self.full_pool.allocate(full)
        read = list(seq.chunk)
        if self.uses_chunk:
            base = self.chunk_start(end)
            if base != seq.chunk_base:
                seq.retired_chunk, seq.chunk, seq.chunk_base = seq.chunk, [], base
                seq.num_hashed_chunk = 0
            seq.chunk += self.chunk_pool.allocate(chunk)
        return list(seq.full), read, list(seq.chunk)

    def finish_step(self, seq_id: int) -> None:
        """Releases the chunk blocks a step moved past (they stay cached when they have a hash)."""
        seq = self.seqs.get(seq_id)
        if seq is not None and seq.retired_chunk:
            self.chunk_pool.release(seq.retired_chunk)
            seq.retired_chunk = []

    def free(self, seq_id: int) -> None:
        seq = self.seqs.pop(seq_id, None)
        if seq is not None:
            self.full_pool.release(seq.full)
            self.chunk_pool.release(seq.retired_chunk + seq.chunk)

    def held(self, seq_id: int) -> tuple[int, int]:
        seq = self.seqs.get(seq_id, SeqBlocks())
        return len(seq.full), len(seq.chunk) + len(seq.retired_chunk)

    def usage(self) -> dict[str, float]:
        """Fraction of each pool in use (for metrics); cached blocks nobody holds count as free."""
        return {
            name: 1.0 - pool.num_free / pool.num_blocks if pool.num_blocks else 0.0
            for name, pool in (("full", self.full_pool), ("chunk", self.chunk_pool))
        }
