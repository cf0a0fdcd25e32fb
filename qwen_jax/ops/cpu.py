"""Every XLA:CPU specialisation of qwen-jax, behind one switch.

XLA:CPU compiles some formulations of a computation into far slower code than others: its matrix
products prefer particular operand layouts and orders, and a conversion or broadcast it cannot fuse
is written out in full. Where that matters for inference, qwen-jax computes the same result in
another way on CPU. Every such specialisation lives in this module; none changes what is computed
(results agree to float rounding), only how fast and in how much memory.

The switch:

- `applies(mesh)`: the specialisations apply to computations on the mesh's devices (the default
  backend's without a mesh) when those are CPUs and `enabled()`. A model decides once, when it is
  built (`Qwen2ForCausalLM.cpu_kernels`), and hands the decision to its projections and attention,
  so one model's compiled programs never mix the two formulations.
- `enabled()`: False when the environment sets `QWEN_JAX_CPU_KERNELS=0` (also `false`, `off`,
  `no`), which turns every specialisation off for debugging: the CPU then runs the formulations GPU
  and TPU run.

The specialisations (each function says why it is faster):

- Out-major kernels: the float kernels of unrolled inference layers are stored `[*out, *in]`
  (`out_major_permutation`; `qwen_jax.model.unstack_layers` does it) and multiplied by
  `rows_times_out_major`, which also computes the logits from the `[vocab, embed]` head.
- Quantized decode products: `reduce_quantized_rows` for at most `QUANTIZED_REDUCTION_MAX_ROWS`
  rows (`qwen_jax.ops.quant.matmul`).
- Decode attention: `decode_by_sums` with `scores_by_sums` / `values_by_sums`
  (`qwen_jax.ops.attention.scores`).
- Host memory: `release_freed_host_memory` after large host buffers are freed one by one.

benchmarks/generate.py, benchmarks/quantized.py and benchmarks/long_context.py measure them.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from qwen_jax.errors import UsageError
from qwen_jax.sharding import platform_of

ENV_VAR = "QWEN_JAX_CPU_KERNELS"
_OFF = ("0", "false", "off", "no")
_ON = ("", "1", "true", "on", "yes")


# ----------------------------------------------------------------------------- the switch
def enabled() -> bool:
    """Whether the CPU specialisations may apply: False when `QWEN_JAX_CPU_KERNELS` is 0 / false / off / no."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value not in _OFF + _ON:
        raise UsageError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected 1 (the default) or 0 (CPU kernels off)")
    return value not in _OFF


def applies(mesh: Mesh | None = None) -> bool:
    """Whether the CPU specialisations apply to computations on `mesh` (None: the default backend's devices).

    True when those devices are CPUs and `enabled()`; decided from the mesh's devices, never from
    the default backend when a mesh is given.
    """
    return platform_of(mesh) == "cpu" and enabled()


# ----------------------------------------------------------------------------- out-major kernels
# Row counts for which an out-major product is computed as `(W @ x.T).T` (see `rows_times_out_major`).
OUT_MAJOR_SWAP_ROWS = (2, 64)


def out_major_permutation(ndim: int, contracted: int, to_out_major: bool) -> tuple[int, ...]:
    """The transpose between a kernel's einsum layout `[*in, *out]` (`contracted` input dims) and `[*out, *in]`.

    XLA:CPU's decode products read a kernel stored out-major faster than one in the einsum layout,
    which it would otherwise copy transposed on every call (see benchmarks/generate.py).
    """
    first = contracted if to_out_major else ndim - contracted  # dims that move to the end
    return (*range(first, ndim), *range(first))


def rows_times_out_major(flat: jax.Array, matrix: jax.Array, preferred_element_type=None) -> jax.Array:
    """`flat @ matrix.T` for rows `flat [M, K]` and a kernel stored out-major, `matrix [N, K]`.

    One row is a matrix-vector product. 2-64 rows (decode steps of a batch, small mixed steps) are
    computed as `(matrix @ flat.T).T`, the kernel as the left operand: XLA:CPU's matrix product then
    streams the kernel once, at close to the one-row speed, where with the kernel on the right it
    runs at well under half of it. The barrier keeps XLA from folding the transpose back into the
    other operand order. From 128 rows the plain product is the faster one again. Measured by the
    batched decode runs of benchmarks/generate.py.
    """
    dims = (((1,), (1,)), ((), ()))
    low, high = OUT_MAJOR_SWAP_ROWS
    if low <= flat.shape[0] <= high:
        y = jax.lax.dot_general(matrix, flat, dims, preferred_element_type=preferred_element_type)
        return jax.lax.optimization_barrier(y).T
    return jax.lax.dot_general(flat, matrix, dims, preferred_element_type=preferred_element_type)


# ----------------------------------------------------------------------------- quantized rows
# At most this many rows take `reduce_quantized_rows`; more dequantize and run one matrix product,
# which amortises the conversion over the rows (see `qwen_jax.ops.quant.matmul`).
QUANTIZED_REDUCTION_MAX_ROWS = 16


def reduce_quantized_rows(x, stored, scale, zero, *, packed: bool, dtype) -> jax.Array:
    """`x[rows, in] @ W.T` for a quantized `W` stored `[out, groups, group']`, by multiplying and
    reducing along each group's stored row in float32.

    XLA fuses the int -> float conversion (and the int4 nibble unpacking) into the reduction, so each
    weight is read once as one (or half a) byte; `x @ dequantized(W)` would convert the whole
    matrix to float first (see benchmarks/quantized.py). The shapes are chosen for XLA:CPU's
    reduction emitter: one row is computed from a 1-D x (a unit batch dimension got a far slower
    reduction order), and several rows put the batch after the output channel, so each weight row
    is converted once and reused for every x row.
    """
    rows = x.shape[0]
    out, groups, width = stored.shape
    xg = x.astype(jnp.float32).reshape(rows, groups, -1)
    if packed:  # low nibbles meet the first half of each group's inputs, high nibbles the second
        nibbles = ((stored << 4) >> 4, stored >> 4)  # signed: arithmetic shifts keep the sign
        terms = [(part, xg[..., k * width : (k + 1) * width]) for k, part in enumerate(nibbles)]
    else:
        terms = [(stored, xg)]
    if groups == 1:  # one group per channel: 2-D reductions (a unit group axis reduced far slower), scaled after
        terms = [(q[:, 0], xs[:, 0]) for q, xs in terms]
        if rows == 1:
            y = sum(jnp.sum(q.astype(jnp.float32) * xs[0], axis=-1) for q, xs in terms)[None]
        else:
            y = sum(jnp.sum(q.astype(jnp.float32)[:, None, :] * xs[None], axis=-1) for q, xs in terms).T
        y = y * scale[:, 0]
    elif rows == 1:  # one row: the scales inside one reduction over (groups, group) beat scaling the group sums
        y = jnp.sum(sum(q.astype(jnp.float32) * xs[0] for q, xs in terms) * scale[..., None], axis=(-2, -1))[None]
    else:  # several rows: group sums, then scaled (scaling inside the reduction was slower here)
        partial = sum(jnp.sum(q.astype(jnp.float32)[:, None] * xs[None], axis=-1) for q, xs in terms)
        y = jnp.sum(partial * scale[:, None, :], axis=-1).T  # [out, rows, groups] -> [rows, out]
    if zero is not None:
        y = y - jnp.sum(xg, axis=-1) @ (zero * scale).T  # the zero points' share: [rows, groups] x [groups, out]
    return y.astype(dtype)


# ----------------------------------------------------------------------------- decode attention
def decode_by_sums(batch: int, queries: int) -> bool:
    """Whether attention scores and outputs of this shape are summed broadcast products (on CPU).

    For one query per row (decode) and several rows: the batched product over (row, KV head)
    needs each layer's cached keys and values copied head-major first, and those copies cost more
    than the products; summing broadcast products reads the cache in place. One row stays a
    matrix product, which is faster for it. Measured by the batched decode runs of
    benchmarks/generate.py and benchmarks/long_context.py.
    """
    return queries == 1 and batch >= 2


def scores_by_sums(q: jax.Array, k: jax.Array) -> jax.Array:
    """`einsum("BKGQH,BSKH->BKGQS")` in float32 for one query per row (`decode_by_sums`), as summed products."""
    qf = q[:, :, :, 0].astype(jnp.float32)  # [B, K, G, H]
    kf = k.astype(q.dtype).astype(jnp.float32)
    s = jnp.sum(qf[:, None] * kf[:, :, :, None, :], axis=-1)  # [B, S, K, G]
    return jnp.transpose(s, (0, 2, 3, 1))[:, :, :, None, :]


def values_by_sums(p: jax.Array, v: jax.Array, out_dtype) -> jax.Array:
    """`einsum("BKGQS,BSKH->BKGQH")` for one query per row (`decode_by_sums`), as summed products."""
    pf = jnp.transpose(p[:, :, :, 0].astype(jnp.float32), (0, 3, 1, 2))  # [B, S, K, G]
    out = jnp.sum(pf[..., None] * v.astype(jnp.float32)[:, :, :, None, :], axis=1)  # [B, K, G, H]
    return out[:, :, :, None, :].astype(out_dtype)


# ----------------------------------------------------------------------------- host memory
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
    stay in glibc's heap once its mmap threshold has risen past their size, so the process keeps
    their memory although nothing uses it. Cheap next to the copies that free such buffers; call it
    after freeing large arrays.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
