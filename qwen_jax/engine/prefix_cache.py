"""Automatic prefix caching: the host-side index of the engine's pool of cached KV blocks.

A request's tokens are cut into blocks of `block_tokens`; block j is keyed by a chained hash of
the key of block j-1 and block j's tokens, so a key names the whole prefix up to its block's end.
The KV of a block lives in the engine's block pool on the device (`EnginePrograms.pool`); this
index maps keys to pool blocks, least recently used first. When a request takes a slot, its
longest cached prefix of whole blocks is copied from the pool into its cache row and only the rest
of its prompt is prefilled; when its prompt is in, and again when it ends (prompt + output, so the
next turn of a chat hits), its blocks that are not cached yet are copied out into the pool, free
blocks first, then evicting the least recently used.

A request reads the pool only by the copy into its own row, dispatched before any later copy-out
that could overwrite that block (the device runs the engine's programs in dispatch order), so a
running request never depends on a pool block after its admission and any block may be evicted.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

DEFAULT_BLOCK_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class PrefixCacheStats:
    """Counters of the prefix cache (totals since the engine started)."""

    blocks: int  # capacity
    blocks_used: int
    blocks_evicted: int
    queried_tokens: int  # prompt tokens looked up
    hit_tokens: int  # prompt tokens found cached (not prefilled)


class PrefixIndex:
    """Chained-hash keys of token blocks -> pool block ids, with LRU eviction (engine thread only)."""

    def __init__(self, blocks: int, block_tokens: int = DEFAULT_BLOCK_TOKENS):
        if blocks < 1 or block_tokens < 1:
            raise ValueError(f"a prefix cache needs at least one block of one token, got {blocks} x {block_tokens}")
        self.capacity = int(blocks)
        self.block_tokens = int(block_tokens)
        self._blocks: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # least recently used first
        self._free = list(range(self.capacity - 1, -1, -1))
        self.evicted = 0
        self.queried_tokens = 0
        self.hit_tokens = 0

    def keys(self, tokens: Sequence[int], blocks: int) -> list[bytes]:
        """The chained keys of the first `blocks` whole blocks of `tokens`."""
        keys, parent = [], b""
        size = self.block_tokens
        ids = np.asarray(tokens[: blocks * size], np.int64)
        for j in range(blocks):
            parent = hashlib.blake2b(parent + ids[j * size : (j + 1) * size].tobytes(), digest_size=16).digest()
            keys.append(parent)
        return keys

    def lookup(self, prompt_ids: Sequence[int]) -> list[int]:
        """Pool blocks of the longest cached prefix of `prompt_ids`, leaving at least its last token
        to prefill (its logits give the first token); marks them recently used and counts the query."""
        self.queried_tokens += len(prompt_ids)
        found = []
        for key in self.keys(prompt_ids, (len(prompt_ids) - 1) // self.block_tokens):
            block = self._blocks.get(key)
            if block is None:
                break
            self._blocks.move_to_end(key)
            found.append(block)
        self.hit_tokens += len(found) * self.block_tokens
        return found

    def store(self, tokens: Sequence[int]) -> list[tuple[int, int]]:
        """Make room for the whole blocks of `tokens` (KV already computed in some cache row); returns
        (block index in `tokens`, pool block) for each block to copy out. Blocks already cached are
        marked recently used; at most `capacity` blocks of a sequence are kept (its first ones)."""
        count = min(len(tokens) // self.block_tokens, self.capacity)
        keys = self.keys(tokens, count)
        for key in keys:  # the whole chain is recent: evicting its own blocks for its later ones would orphan them
            if key in self._blocks:
                self._blocks.move_to_end(key)
        copies = []
        for j, key in enumerate(keys):
            if key in self._blocks:
                continue
            if self._free:
                block = self._free.pop()
            else:
                _, block = self._blocks.popitem(last=False)
                self.evicted += 1
            self._blocks[key] = block
            copies.append((j, block))
        return copies

    def clear(self) -> None:
        """Forget every cached block (the pool's contents are then unused): their KV was computed with
        weights the engine no longer runs. The counters keep their totals."""
        self._blocks.clear()
        self._free = list(range(self.capacity - 1, -1, -1))

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self.capacity, len(self._blocks), self.evicted, self.queried_tokens, self.hit_tokens)
