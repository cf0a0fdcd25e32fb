"""The two products of attention, shared by the `xla` and `chunked` backends.

`qk` (scores of queries against keys) and `pv` (probabilities times values), in the grouped
layout `[B, K, G, Q, ...]` (einsum letters as in `qwen_jax.ops.attention`). With `cpu_kernels`
(`qwen_jax.ops.cpu.applies`), a decode step of several rows computes both as summed broadcast
products (`qwen_jax.ops.cpu.decode_by_sums`); otherwise they are einsums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_jax.ops import cpu


def qk(q: jax.Array, k: jax.Array, *, cpu_kernels: bool) -> jax.Array:
    """Float32 scores `[B, K, G, Q, S]` (unscaled) of queries `[B, K, G, Q, H]` against keys `[B, S, K, H]`.

    Products of the operands' own precision, summed in float32 (what a float32-accumulating matrix
    product of the same operands computes).
    """
    B, K, G, Q, H = q.shape
    if cpu_kernels and cpu.decode_by_sums(B, Q):
        return cpu.scores_by_sums(q, k)
    return jnp.einsum("BKGQH,BSKH->BKGQS", q, k.astype(q.dtype), preferred_element_type=jnp.float32)


def pv(p: jax.Array, v: jax.Array, preferred_element_type=None, *, cpu_kernels: bool) -> jax.Array:
    """`[B, K, G, Q, H]`: probabilities `[B, K, G, Q, S]` times values `[B, S, K, H]` (as
    `einsum("BKGQS,BSKH->BKGQH")`: v in p's dtype, the result in `preferred_element_type` or p's)."""
    B, K, G, Q, S = p.shape
    v = v.astype(p.dtype)
    if cpu_kernels and cpu.decode_by_sums(B, Q):
        return cpu.values_by_sums(p, v, preferred_element_type or p.dtype)
    return jnp.einsum("BKGQS,BSKH->BKGQH", p, v, preferred_element_type=preferred_element_type)
