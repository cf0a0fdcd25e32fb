"""`AttentionMask`: which keys each query sees, as slot arithmetic (never a `[T, S]` array).

Causal attention, the per-row lengths of a KV cache, a sliding window and the segment ids of packed
sequences (or padding) are all described by a few small arrays; each backend turns them into its
own form (a dense mask, per-block masks, cuDNN arguments, splash segment ids).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

MASKED = -1e30  # finite: a row that sees no key gets a uniform softmax, never NaN


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("q_offset", "q_segment_ids", "kv_segment_ids"),
    meta_fields=("window",),
)
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys each query sees, as slot arithmetic.

    Query t of row b sits at slot `q_offset[b] + t`, key s at slot s. The query sees the key iff
      s <= q_offset[b] + t                                  (causal: a cache row's filled slots and
                                                             this call's tokens up to the query)
      window == 0 or s > q_offset[b] + t - window           (sliding window, HF's rule)
      q_segment_ids[b, t] == kv_segment_ids[b, s]           (packed sequences / padding)
    `q_offset=None` means 0: self-attention without a cache, where queries and keys start
    together (backends use that static knowledge for their fast paths).
    """

    q_offset: jax.Array | None = None  # int32 [B]
    q_segment_ids: jax.Array | None = None  # int32 [B, T]
    kv_segment_ids: jax.Array | None = None  # int32 [B, S]
    window: int = 0

    @classmethod
    def causal(cls, segment_ids: jax.Array | None = None, window: int = 0) -> AttentionMask:
        """Self-attention over one sequence per row; `segment_ids[B, T]` isolates packed segments
        (and padding, given its own id)."""
        return cls(q_segment_ids=segment_ids, kv_segment_ids=segment_ids, window=window)

    @classmethod
    def cached(cls, lengths: jax.Array, window: int = 0) -> AttentionMask:
        """New tokens of a KV cache call: row b's queries start at slot `lengths[b]` (its length
        before the call)."""
        return cls(q_offset=lengths, window=window)

    @property
    def is_cached(self) -> bool:
        return self.q_offset is not None

    def with_window(self, window: int) -> AttentionMask:
        return dataclasses.replace(self, window=int(window))

    def visible(self, q_slots: jax.Array, k_slots: jax.Array, q_segments=None, kv_segments=None) -> jax.Array:
        """bool `[B, Tq, Sk]` for query slots `[B, Tq]`, key slots `[Sk]` and the segment ids of
        those queries/keys (`[B, Tq]`, `[B, Sk]`) -- used densely (xla) and per block (chunked)."""
        seen = k_slots[None, None, :] <= q_slots[:, :, None]
        if self.window:
            seen = seen & (k_slots[None, None, :] > q_slots[:, :, None] - self.window)
        if q_segments is not None:
            seen = seen & (q_segments[:, :, None] == kv_segments[:, None, :])
        return seen

    def q_slots(self, batch: int, q_len: int, start=0) -> jax.Array:
        """int32 `[B, q_len]`: slots of queries `start .. start + q_len - 1`."""
        t = start + jnp.arange(q_len, dtype=jnp.int32)[None, :]
        return t if self.q_offset is None else self.q_offset[:, None] + t

    def dense(self, batch: int, q_len: int, kv_len: int) -> jax.Array:
        """The full bool mask `[B, T, S]` (reference and cuDNN paths only)."""
        q_slots = jnp.broadcast_to(self.q_slots(batch, q_len), (batch, q_len))
        return self.visible(q_slots, jnp.arange(kv_len, dtype=jnp.int32), self.q_segment_ids, self.kv_segment_ids)
