"""The `chunked` attention backend: pure-JAX flash attention, for every platform.

Query blocks x key blocks with an online softmax (float32 running max, sum and accumulator); each
KV head's G query heads are folded into the query rows (one matrix product per KV head); only
blocks on the causal diagonal, the window edge or with segment ids are masked, and blocks above the
diagonal, past a row's length or outside the window are never visited, so a decode step reads only
the filled part of the cache. Memory O(T * block); gradients (uncached calls, `flash`) by a custom
VJP that recomputes each block (FlashAttention-2). Cached calls run `flash_forward` directly on the
stacked cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.ops.attention.mask import MASKED, AttentionMask
from qwen_jax.ops.attention.scores import pv, qk

# float32 chunked attention keeps a row's softmax reference (`row_max`) while a key block's
# probabilities, taken against it, sum to less than this per row (no overflow is near: float32
# reaches 3.4e38); a block that exceeds it is redone against its true maximum.
LAZY_SUM_LIMIT = 1e20


# Query blocks of fewer rows (decode steps, short chunks) take the plain float32 path: for them the
# shortcuts below cost more than they save (see benchmarks/long_context.py).
LEAN_MIN_QUERIES = 64


# Query blocks of this many rows or more that divide BLOCK_KV mask their causal diagonal in blocks of
# their own width (see `_flash_forward`).
DIAGONAL_MIN_QUERIES = 128


# Block sizes of the chunked kernel: 256 x 512 was the best of 128-1,024 on CPU, forward and backward
# (see benchmarks/long_context.py).
BLOCK_Q = 256


BLOCK_KV = 512


# ----------------------------------------------------------------------------- chunked (flash)
def _ceil_div(a, b):
    return -(-a // b)


def _block_ranges(mask: AttentionMask, first_q, last_q, bk: int, num_kv_blocks: int, kv_len: int):
    """Key blocks to visit for one query block, in block units: masked [lo, clean_lo),
    clean [clean_lo, clean_hi) (every query of every row sees every key: no mask), masked
    [clean_hi, hi). first_q/last_q: int32 [B] slots of the block's first and last real query;
    blocks past the last one's slot (a cache row's unfilled part) are never visited."""
    hi = jnp.clip(_ceil_div(jnp.max(jnp.minimum(last_q, kv_len - 1)) + 1, bk), 0, num_kv_blocks)
    lo = jnp.zeros((), jnp.int32)
    clean_lo = jnp.zeros((), jnp.int32)
    if mask.window:
        lo = jnp.maximum(jnp.min(first_q) - mask.window + 1, 0) // bk
        clean_lo = _ceil_div(jnp.maximum(jnp.max(last_q) - mask.window + 1, 0), bk)
    # Keys up to every row's first query are seen by all; a clamped tail block never is clean.
    clean_hi = jnp.minimum((jnp.min(first_q) + 1) // bk, kv_len // bk)
    if mask.q_segment_ids is not None:
        clean_hi = clean_lo
    clean_lo = jnp.clip(clean_lo, lo, hi)
    clean_hi = jnp.clip(clean_hi, clean_lo, hi)
    return lo.astype(jnp.int32), clean_lo.astype(jnp.int32), clean_hi.astype(jnp.int32), hi.astype(jnp.int32)


def _masked_width(bq: int, bk: int) -> int:
    """Width of the masked key blocks: bq when query blocks of `DIAGONAL_MIN_QUERIES` rows or more
    divide bk (a query block's causal diagonal is then bq keys wide), else bk."""
    return bq if DIAGONAL_MIN_QUERIES <= bq < bk and bk % bq == 0 else bk


def _clean_blocks(mask: AttentionMask, clean_lo, clean_hi, bm: int, bk: int, clean_block, carry):
    """Run `clean_block(start, size, carry)` over the clean range [clean_lo * bm, clean_hi * bm):
    whole bk blocks, then bm blocks for the rest.

    With segment ids no block is clean (`_block_ranges`), so no loop is emitted. The whole-block
    loop runs under a `cond`: when the keys are one bk block its slice does not depend on the loop
    index, and XLA hoists the block's products out of the loop, which would compute them (for every
    query block, all keys, in the forward and the backward) even when the loop runs zero times.
    """
    if mask.q_segment_ids is not None:
        return carry
    whole = (clean_hi - clean_lo) * bm // bk

    def whole_blocks(carry):
        return jax.lax.fori_loop(0, whole, lambda t, c: clean_block(clean_lo * bm + t * bk, bk, c), carry)

    carry = jax.lax.cond(whole > 0, whole_blocks, lambda c: c, carry)
    if bm != bk:
        carry = jax.lax.fori_loop(
            clean_lo + whole * (bk // bm), clean_hi, lambda i, c: clean_block(i * bm, bm, c), carry
        )
    return carry


def _kv_block(k, v, layer, i, bk: int, row_offset=0, rows=None):
    """Keys/values of block i `[rows, bk, K, H]` (cache rows from `row_offset`) and their slots; the
    start is clamped so the last block of a length no block size divides re-reads some keys
    (masked by `_fresh`)."""
    start = jnp.minimum(i * bk, k.shape[2] - bk)
    kb, vb = _kv_slice(k, v, layer, start, bk, row_offset, rows)
    return kb, vb, start + jnp.arange(bk, dtype=jnp.int32)


def _kv_slice(k, v, layer, start, size: int, row_offset=0, rows=None):
    """Keys/values of slots `start .. start + size - 1` `[rows, size, K, H]`, cache rows from `row_offset`."""
    index = (layer, row_offset, start, 0, 0)
    shape = (1, k.shape[1] if rows is None else rows, size, k.shape[3], k.shape[4])
    return jax.lax.dynamic_slice(k, index, shape)[0], jax.lax.dynamic_slice(v, index, shape)[0]


def _block_visible(mask: AttentionMask, q_slots, q_segments, k_slots, i, bk: int):
    kv_segments = None
    if mask.kv_segment_ids is not None:
        kv_segments = jax.lax.dynamic_slice_in_dim(mask.kv_segment_ids, k_slots[0], k_slots.shape[0], axis=1)
    fresh = k_slots >= i * bk  # keys a clamped tail block re-reads were counted by the block before
    return mask.visible(q_slots, k_slots, q_segments, kv_segments) & fresh[None, None, :]


def _scores(qb, kb, scale, cpu_kernels: bool):
    return qk(qb, kb, cpu_kernels=cpu_kernels) * scale


def flash_forward(
    q,
    k,
    v,
    layer,
    mask: AttentionMask,
    scale: float,
    blocks: tuple[int, int],
    row_offset=0,
    *,
    cpu_kernels: bool,
):
    """Forward of the chunked kernel: (out `[B, T, N, H]`, lse `[nq, B, K, G, bq]` float32).

    k/v: `[L, B', S, K, H]` (a plain `[B, S, K, H]` is passed as `k[None]` with layer 0); query row
    b reads row `row_offset + b`. cpu_kernels: `qwen_jax.ops.cpu.applies` for this computation.
    """
    if k.ndim == 4:
        k, v, layer = k[None], v[None], 0
    B, T, N, H = q.shape
    S, K = k.shape[2], k.shape[3]
    G = N // K
    bq, bk = blocks
    # Masked blocks (the causal diagonal, window edges, ragged rows) are `bm` keys wide, clean ones
    # `bk`: with query blocks of `DIAGONAL_MIN_QUERIES` rows or more that divide bk, a query block's
    # diagonal is bq keys wide, not bk, so less of the block above the diagonal is computed and
    # thrown away (see benchmarks/long_context.py).
    bm = _masked_width(bq, bk)
    nq, nm = _ceil_div(T, bq), _ceil_div(S, bm)
    q_blocks, segment_blocks = _query_blocks(q, mask, nq * bq, bq, K)

    # float32 (the CPU default) query blocks of `LEAN_MIN_QUERIES` rows or more take two shortcuts,
    # each a pass over the scores saved (see benchmarks/long_context.py):
    # - the scale is folded into each query block (one pass over it, not one over every score block);
    # - lazy rescaling: after a row's first block, probabilities are taken against the row's
    #   reference maximum without computing the block's maximum (a pass over the scores); a block
    #   whose probabilities sum past `LAZY_SUM_LIMIT` in some row (a score far above the reference,
    #   or an overflow) is redone against its true maximum. The softmax is the same for any
    #   reference (it cancels); only overflow matters, and that is what the check catches.
    # Lower precisions keep HF's order: scores scaled in float32, probabilities rounded to q's
    # dtype before the product, sums of the unrounded probabilities, a maximum per block.
    lean = q.dtype == jnp.float32 and bq >= LEAN_MIN_QUERIES

    def one_query_block(args):
        j, qb, q_segments = args
        q_slots = mask.q_slots(B, bq, j * bq)
        first_q = q_slots[:, 0]
        last_q = q_slots[:, 0] + jnp.minimum(bq, T - j * bq) - 1
        lo, clean_lo, clean_hi, hi = _block_ranges(mask, first_q, last_q, bm, nm, S)
        q_scaled = qb * scale if lean else None

        def exact(s, vb, acc, row_max, row_sum):
            new_max = jnp.maximum(row_max, jnp.max(s, axis=-1))
            correction = jnp.exp(row_max - new_max)
            p = jnp.exp(s - new_max[..., None])
            row_sum = row_sum * correction + jnp.sum(p, axis=-1)
            values = pv(p.astype(qb.dtype), vb, preferred_element_type=jnp.float32, cpu_kernels=cpu_kernels)
            return acc * correction[..., None] + values, new_max, row_sum

        def update(s, vb, carry):
            acc, row_max, row_sum = carry
            if not lean:
                return exact(s, vb, acc, row_max, row_sum)

            def lazy():
                p = jnp.exp(s - row_max[..., None])
                p_sum = jnp.sum(p, axis=-1)
                safe = jnp.all(p_sum < LAZY_SUM_LIMIT)  # False for inf and NaN too
                return jax.lax.cond(
                    safe,
                    lambda: (
                        acc + jnp.einsum("BKGQS,BSKH->BKGQH", p, vb.astype(jnp.float32)),
                        row_max,
                        row_sum + p_sum,
                    ),
                    lambda: exact(s, vb, acc, row_max, row_sum),
                )

            started = jnp.all(row_max > MASKED / 2)  # every row has a reference from a visible key
            return jax.lax.cond(started, lazy, lambda: exact(s, vb, acc, row_max, row_sum))

        def scores(kb):
            if lean:
                return jnp.einsum("BKGQH,BSKH->BKGQS", q_scaled, kb.astype(jnp.float32))
            return _scores(qb, kb, scale, cpu_kernels)

        def masked_step(i, carry):  # block i of bm keys, masked
            kb, vb, k_slots = _kv_block(k, v, layer, i, bm, row_offset, B)
            seen = _block_visible(mask, jnp.broadcast_to(q_slots, (B, bq)), q_segments, k_slots, i, bm)
            return update(jnp.where(seen[:, None, None], scores(kb), MASKED), vb, carry)

        def clean_block(start, size, carry):  # `size` keys from slot `start`, all visible to every query
            kb, vb = _kv_slice(k, v, layer, start, size, row_offset, B)
            return update(scores(kb), vb, carry)

        carry = (
            jnp.zeros((B, K, G, bq, H), jnp.float32),
            jnp.full((B, K, G, bq), MASKED, jnp.float32),
            jnp.zeros((B, K, G, bq), jnp.float32),
        )
        carry = jax.lax.fori_loop(lo, clean_lo, masked_step, carry)
        carry = _clean_blocks(mask, clean_lo, clean_hi, bm, bk, clean_block, carry)
        acc, row_max, row_sum = jax.lax.fori_loop(clean_hi, hi, masked_step, carry)
        row_sum = jnp.maximum(row_sum, jnp.finfo(jnp.float32).tiny)
        return (acc / row_sum[..., None]).astype(q.dtype), row_max + jnp.log(row_sum)

    xs = (jnp.arange(nq, dtype=jnp.int32), q_blocks, segment_blocks)
    if nq == 1:
        out, lse = jax.tree.map(lambda a: a[None], one_query_block(jax.tree.map(lambda a: a[0], xs)))
    else:
        out, lse = jax.lax.map(one_query_block, xs)
    # [nq, B, K, G, bq, H] -> [B, T, N, H]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * bq, N, H)[:, :T]
    return out, lse


def _query_blocks(x, mask: AttentionMask, padded: int, bq: int, K: int):
    """x `[B, T, N, H]` -> `[nq, B, K, G, bq, H]`, and the query segment ids as `[nq, B, bq]` (or None)."""
    B, T, N, H = x.shape
    nq = padded // bq
    x = jnp.pad(x, ((0, 0), (0, padded - T), (0, 0), (0, 0)))
    blocks = x.reshape(B, nq, bq, K, N // K, H).transpose(1, 0, 3, 4, 2, 5)
    segments = None
    if mask.q_segment_ids is not None:
        seg = jnp.pad(mask.q_segment_ids, ((0, 0), (0, padded - T)), constant_values=-1)
        segments = seg.reshape(B, nq, bq).transpose(1, 0, 2)
    return blocks, segments


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def flash(q, k, v, mask: AttentionMask, scale: float, blocks: tuple[int, int], cpu_kernels: bool):
    """Uncached chunked attention with a memory-lean gradient (k, v: `[B, S, K, H]`)."""
    return flash_forward(q, k, v, 0, mask, scale, blocks, cpu_kernels=cpu_kernels)[0]


def _flash_fwd(q, k, v, mask, scale, blocks, cpu_kernels):
    out, lse = flash_forward(q, k, v, 0, mask, scale, blocks, cpu_kernels=cpu_kernels)
    return out, (q, k, v, mask, out, lse)


def _flash_bwd(scale, blocks, cpu_kernels, residuals, d_out):
    """FlashAttention-2 backward: per query block, recompute each visited block's probabilities
    from the saved log-sum-exp; dq accumulates per query block, dk/dv in float32 `[B, S, K, H]`.
    The key blocks visited are the forward's: masked ones `bm` keys wide (a query block's causal
    diagonal is bq keys wide when bq divides bk), clean ones bk wide, none above the diagonal."""
    q, k, v, mask, out, lse = residuals
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    bq, bk = blocks
    bm = _masked_width(bq, bk)
    nq, nm = _ceil_div(T, bq), _ceil_div(S, bm)
    q_blocks, segment_blocks = _query_blocks(q, mask, nq * bq, bq, K)
    dout_blocks, _ = _query_blocks(d_out, mask, nq * bq, bq, K)
    out_blocks, _ = _query_blocks(out, mask, nq * bq, bq, K)
    # D = rowsum(dO * O): the softmax-gradient correction of every query row.
    delta = jnp.sum(dout_blocks.astype(jnp.float32) * out_blocks.astype(jnp.float32), axis=-1)
    k5, v5 = k[None], v[None]

    def one_query_block(dkv, xs):
        j, qb, dob, lse_j, delta_j, q_segments = xs
        q_slots = jnp.broadcast_to(mask.q_slots(B, bq, j * bq), (B, bq))
        lo, clean_lo, clean_hi, hi = _block_ranges(
            mask, q_slots[:, 0], q_slots[:, 0] + jnp.minimum(bq, T - j * bq) - 1, bm, nm, S
        )

        def accumulate(kb, vb, start, size, seen, carry):
            """Add the gradients of `size` keys from slot `start` (seen: their mask, or None: all visible)."""
            dq, dk, dv = carry
            s = _scores(qb, kb, scale, cpu_kernels)
            if seen is not None:
                s = jnp.where(seen[:, None, None], s, MASKED)
            p = jnp.exp(s - lse_j[..., None])
            dp = jnp.einsum("BKGQH,BSKH->BKGQS", dob, vb.astype(dob.dtype), preferred_element_type=jnp.float32)
            ds = p * (dp - delta_j[..., None]) * scale
            dq = dq + jnp.einsum("BKGQS,BSKH->BKGQH", ds, kb.astype(jnp.float32))
            dv_block = jnp.einsum("BKGQS,BKGQH->BSKH", p, dob.astype(jnp.float32))
            dk_block = jnp.einsum("BKGQS,BKGQH->BSKH", ds, qb.astype(jnp.float32))
            dk = jax.lax.dynamic_update_slice_in_dim(
                dk, jax.lax.dynamic_slice_in_dim(dk, start, size, axis=1) + dk_block, start, axis=1
            )
            dv = jax.lax.dynamic_update_slice_in_dim(
                dv, jax.lax.dynamic_slice_in_dim(dv, start, size, axis=1) + dv_block, start, axis=1
            )
            return dq, dk, dv

        def masked_step(i, carry):  # block i of bm keys, masked
            kb, vb, k_slots = _kv_block(k5, v5, 0, i, bm)
            seen = _block_visible(mask, q_slots, q_segments, k_slots, i, bm)
            return accumulate(kb, vb, k_slots[0], bm, seen, carry)

        def clean_block(start, size, carry):  # `size` keys from slot `start`, all visible to every query
            kb, vb = _kv_slice(k5, v5, 0, start, size)
            return accumulate(kb, vb, start, size, None, carry)

        carry = (jnp.zeros(qb.shape, jnp.float32), *dkv)
        carry = jax.lax.fori_loop(lo, clean_lo, masked_step, carry)
        carry = _clean_blocks(mask, clean_lo, clean_hi, bm, bk, clean_block, carry)
        dq, dk, dv = jax.lax.fori_loop(clean_hi, hi, masked_step, carry)
        return (dk, dv), dq

    dkv = (jnp.zeros((B, S, K, H), jnp.float32), jnp.zeros((B, S, K, H), jnp.float32))
    xs = (jnp.arange(nq, dtype=jnp.int32), q_blocks, dout_blocks, lse, delta, segment_blocks)
    (dk, dv), dq = jax.lax.scan(one_query_block, dkv, xs)
    dq = dq.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * bq, N, H)[:, :T]
    mask_cotangent = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), mask)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), mask_cotangent


flash.defvjp(_flash_fwd, _flash_bwd)
