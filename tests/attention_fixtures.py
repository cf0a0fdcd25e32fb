"""Random attention inputs shared by the attention tests (CPU and GPU)."""

import jax
import jax.numpy as jnp
import numpy as np


def _qkv(batch, q_len, kv_len, heads, kv_heads, head_dim, dtype=jnp.float32, layers=None):
    keys = jax.random.split(jax.random.key(0), 3)
    kv_shape = (batch, kv_len, kv_heads, head_dim) if layers is None else (layers, batch, kv_len, kv_heads, head_dim)
    return (
        jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype),
        jax.random.normal(keys[1], kv_shape, dtype),
        jax.random.normal(keys[2], kv_shape, dtype),
    )


def _segments(batch, length, seed=0):
    """Sorted segment ids 1..3 with a padding tail of 0 in row 0 (packed training rows)."""
    ids = np.sort(np.random.RandomState(seed).randint(1, 4, (batch, length)), axis=1)
    ids[0, -5:] = 0
    return jnp.asarray(ids, jnp.int32)
