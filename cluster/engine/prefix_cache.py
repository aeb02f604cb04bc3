"""Automatic prefix caching (DESIGN.md §9), plain Python: block hashes and a block pool that keeps freed blocks.

A full block's hash covers (its parent block's hash, its token ids, the content hashes of the image tiles whose
feature rows it holds): equal hashes mean equal KV in every layer, since a token's k/v depend on every token
before it. Both pools use the same hash for the block covering the same positions.

`CachingBlockPool` counts references: a block shared by several sequences stays until the last one lets go. A
released block that has a hash stays cached (and findable) until an allocation evicts it, least recently
released first; blocks without a hash are handed out before any cached block is evicted.
"""

from __future__ import annotations

import hashlib
from array import array
from bisect import bisect_left, bisect_right
from collections import OrderedDict


class OutOfBlocks(Exception):
    """Raised when a pool cannot supply the blocks a step needs."""


def tile_hashes(pixel_values) -> list[bytes]:
    """Content hash of each image tile of pixel_values [N, 3, S, S] (a torch tensor, any float dtype)."""
    return [hashlib.sha256(tile.float().contiguous().numpy().tobytes()).digest() for tile in pixel_values]


class BlockHasher:
    """The hash chain of one sequence's full blocks, extended as its tokens become known."""

    def __init__(self, block_size: int, patch_positions: list[int] | None = None,
                 tile_hashes: list[bytes] | None = None):
        self.block_size = block_size
        self.patch_positions = patch_positions or []
        self.tile_hashes = tile_hashes or []
        # feature rows per tile: every tile gives the same number of <|patch|> rows (0: a block holding any image
        # row takes every tile's hash)
        rows, tiles = len(self.patch_positions), len(self.tile_hashes)
        self.rows_per_tile = rows // tiles if tiles and rows % tiles == 0 else 0
        self.hashes: list[bytes] = []

    def extend(self, token_ids: list[int], num_tokens: int) -> list[bytes]:
        """The hashes of every full block among the first `num_tokens` of `token_ids`."""
        bs = self.block_size
        for i in range(len(self.hashes), num_tokens // bs):
            start = i * bs
            h = hashlib.sha256(self.hashes[-1] if self.hashes else b"")
            h.update(array("q", token_ids[start : start + bs]).tobytes())
            if self.tile_hashes:
                first = bisect_left(self.patch_positions, start)
                last = bisect_right(self.patch_positions, start + bs - 1)
                if first < last:
                    tiles = (range(first // self.rows_per_tile, (last - 1) // self.rows_per_tile + 1)
                             if self.rows_per_tile else range(len(self.tile_hashes)))
                    for tile in tiles:
                        h.update(self.tile_hashes[tile])
            self.hashes.append(h.digest())
        return self.hashes


def block_hashes(seq, block_size: int, num_tokens: int) -> list[bytes]:
    """The hashes of the full blocks among a scheduler `Sequence`'s first `num_tokens` tokens (its images'
    tiles included), kept on `seq.hasher` and extended only when a block was completed."""
    if seq.hasher is None:
        images = seq.images
        seq.hasher = BlockHasher(block_size, images and images.patch_positions, images and images.tile_hashes)
    if num_tokens // block_size > len(seq.hasher.hashes):
        seq.hasher.extend(seq.all_ids, num_tokens)
    return seq.hasher.hashes


class CachingBlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._free = list(range(num_blocks - 1, -1, -1))  # free blocks without a hash (a stack)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free blocks with a hash, least recent first
        self.ref_count = [0] * num_blocks
        self.hash_of: dict[int, bytes] = {}
        self.cached: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: never cached ones plus cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocks(f"need {n} blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:  # evict the least recently released cached block
                block, _ = self._evictable.popitem(last=False)
                del self.cached[self.hash_of.pop(block)]
            self.ref_count[block] = 1
            out.append(block)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drops one reference to each block; the last block of a table is the first to be evicted later."""
        for block in reversed(blocks):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                if block in self.hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def lookup(self, block_hash: bytes) -> int | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    def touch(self, blocks: list[int]) -> None:
        """Takes a reference to cached blocks (a prefix hit); a free one leaves the eviction queue."""
        for block in blocks:
            if self.ref_count[block] == 0:
                del self._evictable[block]
            self.ref_count[block] += 1

    def num_unheld(self, blocks: list[int]) -> int:
        """How many of these cached blocks nobody holds (taking them lowers num_free)."""
        return sum(1 for b in blocks if self.ref_count[b] == 0)

    def set_hash(self, block: int, block_hash: bytes) -> None:
        """Makes a computed full block findable; a hash some other block already has keeps that block."""
        if self.enable_caching and block not in self.hash_of and block_hash not in self.cached:
            self.hash_of[block] = block_hash
            self.cached[block_hash] = block
