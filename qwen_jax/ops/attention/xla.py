"""The `xla` attention backend: the reference formulation, one float32 score tensor and a dense mask.

Memory and time grow with T * S, and a cached call reads every slot of the cache: for short
sequences (where `select_backend` picks it on CPU) and as the reference the other backends are
tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_jax.ops.attention.mask import MASKED, AttentionMask
from qwen_jax.ops.attention.scores import pv, qk


def cache_rows(cache: jax.Array, layer, row_offset, rows: int) -> jax.Array:
    """Rows `row_offset .. row_offset + rows - 1` of one layer of a stacked cache `[L, B, S, K, H]`."""
    if isinstance(row_offset, int) and row_offset == 0 and rows == cache.shape[1]:
        return cache[layer]
    start = (layer, row_offset, 0, 0, 0)
    return jax.lax.dynamic_slice(cache, start, (1, rows, *cache.shape[2:]))[0]


def xla_attention(q, k, v, mask: AttentionMask, scale: float, *, cpu_kernels: bool) -> jax.Array:
    """Attention output `[B, T, N, H]` of q `[B, T, N, H]` against k, v `[B, S, K, H]`."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    q = jnp.transpose(q.reshape(B, T, K, N // K, H), (0, 2, 3, 1, 4))  # [B, K, G, T, H]
    scores = qk(q, k, cpu_kernels=cpu_kernels) * scale
    scores = jnp.where(mask.dense(B, T, S)[:, None, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.transpose(pv(probs, v, cpu_kernels=cpu_kernels), (0, 3, 1, 2, 4)).reshape(B, T, N, H)
