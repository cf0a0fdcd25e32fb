"""Qwen2.5 in Flax NNX, mirroring HF transformers' `Qwen2ForCausalLM` module for module.

Layout (einsum letters): B batch, T query length, S key length, D embed, N query heads,
K kv heads, G query heads per kv head, H head_dim, F mlp, V vocab, L layers.

Decoder layers are stored stacked on a leading `layers` axis and run with `jax.lax.scan`, so
compile time does not grow with depth. Every parameter carries `logical_axes` metadata that
`qwen_jax.sharding` maps onto a mesh.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import jax
import jax.numpy as jnp

# Row counts for which an out-major product is computed as `(W @ x.T).T` (see `rows_times_out_major`).
OUT_MAJOR_SWAP_ROWS = (2, 64)


def rows_times_out_major(flat: jax.Array, matrix: jax.Array, preferred_element_type=None) -> jax.Array:
    """`flat @ matrix.T` for rows `flat [M, K]` and a kernel stored out-major, `matrix [N, K]`.

    One row is a matrix-vector product. 2-64 rows (decode steps of a batch, small mixed steps) are
    computed as `(matrix @ flat.T).T`, the kernel as the left operand: XLA:CPU's matrix product
    (YNNPACK) then streams the kernel once at close to the one-row speed, where with the kernel on
    the right it runs at under half of it. The barrier keeps XLA from folding the transpose back into
    the other operand order. Measured on the 2-core CPU (24 layers' MLP products, float32): 8 rows
    102-120 ms -> 76-78 ms (1 row 52-55 ms), 2 rows 91 -> 66 ms; the 0.5B tied lm_head with 8 rows
    36.5 -> 30.2 ms. From 128 rows the plain product is faster again (MLP kernels: 141 against 147 ms).
    """
    dims = (((1,), (1,)), ((), ()))
    low, high = OUT_MAJOR_SWAP_ROWS
    if low <= flat.shape[0] <= high:
        y = jax.lax.dot_general(matrix, flat, dims, preferred_element_type=preferred_element_type)
        return jax.lax.optimization_barrier(y).T
    return jax.lax.dot_general(flat, matrix, dims, preferred_element_type=preferred_element_type)


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def release_freed_host_memory() -> None:
    """Return freed heap memory to the OS (glibc's `malloc_trim`; a no-op elsewhere).

    Host buffers of XLA:CPU that are freed one by one (e.g. kernels replaced by transposed copies)
    stay in glibc's heap once its mmap threshold has risen past their size, so RSS keeps them
    although nothing uses them. Cheap (0.2 ms with nothing to return, the 0.5B model loaded; 9 ms
    returning memory); call it after freeing large arrays.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# Above this many rows the CPU path dequantizes and runs one matmul (see the module docstring).
CPU_REDUCTION_MAX_ROWS = 16


def _reduce_rows(x, stored, scale, zero, *, packed: bool, dtype):
    """Multiply-and-reduce along each group's stored row, in float32 (CPU decode; see the module docstring).

    One row is computed from a 1-D x: with a unit batch dimension XLA:CPU picked a reduction
    order that ran 40x slower. Several rows put the batch after the output channel, so each
    weight row is converted once and reused for every x row.
    """
    rows = x.shape[0]
    out, groups, width = stored.shape
    xg = x.astype(jnp.float32).reshape(rows, groups, -1)
    if packed:  # low nibbles meet the first half of each group's inputs, high nibbles the second
        nibbles = ((stored << 4) >> 4, stored >> 4)  # signed: arithmetic shifts keep the sign
        terms = [(part, xg[..., k * width : (k + 1) * width]) for k, part in enumerate(nibbles)]
    else:
        terms = [(stored, xg)]
    if groups == 1:  # one group per channel: 2-D reductions (a unit group axis ran ~20x slower), scaled after
        terms = [(q[:, 0], xs[:, 0]) for q, xs in terms]
        if rows == 1:
            y = sum(jnp.sum(q.astype(jnp.float32) * xs[0], axis=-1) for q, xs in terms)[None]
        else:
            y = sum(jnp.sum(q.astype(jnp.float32)[:, None, :] * xs[None], axis=-1) for q, xs in terms).T
        y = y * scale[:, 0]
    elif rows == 1:  # scales applied inside one reduction over (groups, group): 1.5x faster than scaling sums
        y = jnp.sum(sum(q.astype(jnp.float32) * xs[0] for q, xs in terms) * scale[..., None], axis=(-2, -1))[None]
    else:  # group sums, then scaled (scaling inside measured 2.3x slower for 8 rows)
        partial = sum(jnp.sum(q.astype(jnp.float32)[:, None] * xs[None], axis=-1) for q, xs in terms)
        y = jnp.sum(partial * scale[:, None, :], axis=-1).T  # [out, rows, groups] -> [rows, out]
    if zero is not None:
        y = y - jnp.sum(xg, axis=-1) @ (zero * scale).T  # the zero points' share: [rows, groups] x [groups, out]
    return y.astype(dtype)
