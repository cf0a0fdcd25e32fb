"""`KVCache`: the preallocated key/value cache and the contract every caller of the model relies on
(see its docstring); `write_rows` writes each row's new keys at that row's own length."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qwen_jax.config import Qwen2Config


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated keys/values `[layers, batch, max_len, kv_heads, head_dim]` with a length per row.

    Contract (what the model, generation and a continuous-batching engine rely on):

    - `lengths[b]` is the number of filled slots of row b. Row b's keys always start at slot 0
      (no left padding inside the cache), so a row's layout never depends on its batch-mates.
    - A model call with `T` new tokens, `model(ids[B, T], cache=cache, attention_mask=m[B, T])`,
      writes row b's tokens at slots `lengths[b] .. lengths[b] + T - 1` (writes past `max_len`
      are dropped) and returns the cache with `lengths + m.sum(1)`: `m` marks the real tokens,
      which come first in each row (right padding), default all T. Padding slots written past a
      row's new length are ignored by attention and overwritten by the row's next tokens.
    - Query t of row b sits at slot `lengths[b] + t` and attends to slots `0 .. lengths[b] + t`
      (and, on sliding-window layers, only the last `sliding_window` of them). Its default
      position is its slot.
    - A decode step with ragged lengths is the same call with `T = 1`:
      `logits, cache = model(next_tokens[:, None], cache=cache)`; every row reads its own
      length. Give `attention_mask=active[:, None]` (0 for idle rows) to leave a row's length as is.
    - Serving one request in a slot of a shared cache: prefill it alone in a batch-1 cache, then
      `batch_cache = batch_cache.insert(request_cache, slot)` (see `insert`); to free a slot,
      set its length to 0: `dataclasses.replace(cache, lengths=cache.lengths.at[slot].set(0))`.
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array  # int32 [batch]

    @classmethod
    def init(cls, config: Qwen2Config, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

    @staticmethod
    def logical_axes() -> tuple[str, ...]:
        return ("layers", "batch", "cache_seq", "kv_heads", "head_dim")

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def insert(self, other: KVCache, slots) -> KVCache:
        """This cache with every row of `other` copied into rows `slots` (int or int[other.batch]).

        `other` may be shorter (`other.max_len <= self.max_len`): slots past it keep stale values,
        which the copied lengths hide. Jittable; under `jax.jit(..., donate_argnums=0)` the copy is
        in place.
        """
        if other.max_len > self.max_len:
            raise ValueError(f"cannot insert a cache of max_len {other.max_len} into one of max_len {self.max_len}")
        if (self.k.shape[0], *self.k.shape[3:]) != (other.k.shape[0], *other.k.shape[3:]):
            raise ValueError(f"cache shapes {other.k.shape} and {self.k.shape} differ beyond batch and length")
        slots = jnp.broadcast_to(jnp.asarray(slots, jnp.int32), (other.batch,))
        span = slice(0, other.max_len)
        return KVCache(
            self.k.at[:, slots, span].set(other.k.astype(self.k.dtype)),
            self.v.at[:, slots, span].set(other.v.astype(self.v.dtype)),
            self.lengths.at[slots].set(other.lengths),
        )


def write_rows(buffer: jax.Array, layer, new: jax.Array, starts: jax.Array, row_offset=0) -> jax.Array:
    """`buffer[layer, row_offset + b, starts[b] + t] = new[b, t]` for a stacked cache array `[L, B, S, K, H]`.

    Each row is written at its own offset (one scatter); slots past `max_len` are dropped.
    """
    batch, length = new.shape[:2]
    slots = starts[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
    rows = row_offset + jnp.arange(batch, dtype=jnp.int32)[:, None]
    return buffer.at[layer, rows, slots].set(new.astype(buffer.dtype), mode="drop")
