"""KV block bookkeeping for the two pools of DESIGN.md §3 (plain Python, no torch).

- full pool: blocks for every position [0, n) of a sequence (NoPE / full-attention layers).
- chunk pool: blocks for the current attention chunk only, [chunk_start(n), n); a finished chunk's blocks are
  released once the step that moved past it is done, so a sequence never holds more than one chunk (+ one block
  while a step crosses a chunk boundary).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class OutOfBlocks(Exception):
    """Raised when a pool cannot supply the blocks a step needs."""


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


@dataclass
class SeqBlocks:
    full: list[int] = field(default_factory=list)
    chunk: list[int] = field(default_factory=list)
    chunk_base: int = 0  # first position covered by `chunk`
    retired_chunk: list[int] = field(default_factory=list)  # read during the current step, freed after it


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
    ):
        if chunk_size is not None and chunk_size % block_size:
            raise ValueError(
                f"block_size is {block_size}; it must divide attention_chunk_size ({chunk_size})"
            )
        self.block_size = block_size
        self.chunk_size = chunk_size
        self.uses_full = uses_full_pool
        self.uses_chunk = uses_chunk_pool and chunk_size is not None
        self.full_pool = BlockPool(num_full_blocks if self.uses_full else 0)
        self.chunk_pool = BlockPool(num_chunk_blocks if self.uses_chunk else 0)
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
            seq.chunk += self.chunk_pool.allocate(chunk)
        return list(seq.full), read, list(seq.chunk)

    def finish_step(self, seq_id: int) -> None:
        """Releases the chunk blocks a step moved past."""
        seq = self.seqs.get(seq_id)
        if seq is not None and seq.retired_chunk:
            self.chunk_pool.release(seq.retired_chunk)
            seq.retired_chunk = []

    def free(self, seq_id: int) -> None:
        seq = self.seqs.pop(seq_id, None)
        if seq is not None:
            self.full_pool.release(seq.full)
            self.chunk_pool.release(seq.chunk + seq.retired_chunk)

    def held(self, seq_id: int) -> tuple[int, int]:
        seq = self.seqs.get(seq_id, SeqBlocks())
        return len(seq.full), len(seq.chunk) + len(seq.retired_chunk)

    def usage(self) -> dict[str, float]:
        """Fraction of each pool in use (for metrics)."""
        return {
            name: 1.0 - pool.num_free / pool.num_blocks if pool.num_blocks else 0.0
            for name, pool in (("full", self.full_pool), ("chunk", self.chunk_pool))
        }
