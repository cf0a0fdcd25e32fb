"""Attention backends: one entry point, `attend`, for every way the model attends.

Shapes (einsum letters as in `qwen_jax.model`): queries `q[B, T, N, H]`; keys and values
`k, v[B, S, K, H]`, or the stacked KV cache `[L, B, S, K, H]` together with `layer` (a cached
call reads its layer's blocks straight from the cache, never copying the whole layer). Query head
n reads key/value head `n // (N // K)` (GQA; MQA and MHA are the cases K = 1 and K = N).

Which keys a query sees is described by an `AttentionMask` of slots, never by a `[T, S]` array
(see its docstring): causal, per-row lengths of a KV cache, a sliding window, segment ids of
packed sequences or padding.

Backends (`BACKENDS`):

- `xla`: the reference: one float32 score tensor `[B, K, G, T, S]` and a dense mask. Memory and
  time grow with T * S; a cached call reads every slot of the cache. Short sequences only.
- `chunked`: pure JAX flash attention, runs everywhere. Query blocks x key blocks with an online
  softmax (float32 running max, sum and accumulator); each KV head's G query heads are folded into
  the query rows (one matrix product per KV head); only blocks on the causal diagonal, the window
  edge or with segment ids are masked, blocks above the diagonal, past a row's length or outside
  the window are never visited. A decode step therefore reads only the filled part of the cache.
  Memory O(T * block); gradients by a custom VJP that recomputes each block (FlashAttention-2).
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` (NVIDIA GPU, bfloat16/float16,
  head_dim a multiple of 8). Uncached calls use cuDNN's causal mask and window; segment ids and
  cached calls (whose causal diagonal is bottom-right, not cuDNN's top-left) pass an explicit
  mask plus `key_value_seq_lengths`. See `cudnn_arguments`.
- `splash`: TPU splash attention (Pallas), one MQA kernel per KV head, vmapped over the batch,
  with segment ids and a local mask for sliding windows; sequences are padded to a multiple of 128.
  It serves uncached calls (training, full forward passes); cached calls (prefill chunks and
  decode steps) run the `chunked` kernel, which reads only the filled cache.
- `auto`: `select_backend`: splash on TPU, cudnn on GPU for bfloat16/float16, otherwise chunked,
  except xla for short sequences on CPU (below `CPU_CHUNKED_MIN_SCORES` scores, and for cached
  calls a cache of at most `BLOCK_KV` slots), where one einsum is faster than a loop.

Asking for `cudnn` or `splash` where it cannot run raises `AttentionBackendError`; nothing falls
back silently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _decode_by_sums(batch: int, queries: int) -> bool:
    """Whether `_qk` / `_pv` multiply and sum instead of calling a batched matrix product.

    For one query per row (decode) and several rows on CPU: the batched product over (row, KV head)
    needs each layer's cached keys and values copied head-major first, and those copies cost more
    than the products. Summing broadcast products reads the cache in place. Measured on 2 cores,
    24 layers of the 0.5B's attention (2 KV heads x 7 queries, head_dim 64), float32: 8 rows x 512
    cached slots 54 -> 22.5 ms, 8 x 2,048 153 -> 71 ms, 4 x 8,192 (8 layers) 121 -> 48 ms, 2 x 512
    4.6 -> 3.5 ms; one row is faster as a product (3.4 against 6.3 ms), so it stays one.
    """
    return queries == 1 and batch >= 2 and jax.default_backend() == "cpu"


def _qk(q, k) -> jax.Array:
    """Float32 scores `[B, K, G, Q, S]` (unscaled) of queries `[B, K, G, Q, H]` against keys `[B, S, K, H]`.

    Products of the operands' own precision, summed in float32 (what a float32-accumulating matrix
    product of the same operands computes).
    """
    B, K, G, Q, H = q.shape
    if not _decode_by_sums(B, Q):
        return jnp.einsum("BKGQH,BSKH->BKGQS", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
    qf = q[:, :, :, 0].astype(jnp.float32)  # [B, K, G, H]
    kf = k.astype(q.dtype).astype(jnp.float32)
    s = jnp.sum(qf[:, None] * kf[:, :, :, None, :], axis=-1)  # [B, S, K, G]
    return jnp.transpose(s, (0, 2, 3, 1))[:, :, :, None, :]


def _pv(p, v, preferred_element_type=None) -> jax.Array:
    """`[B, K, G, Q, H]`: probabilities `[B, K, G, Q, S]` times values `[B, S, K, H]` (as
    `einsum("BKGQS,BSKH->BKGQH")`: v in p's dtype, the result in `preferred_element_type` or p's)."""
    B, K, G, Q, S = p.shape
    v = v.astype(p.dtype)
    if not _decode_by_sums(B, Q):
        return jnp.einsum("BKGQS,BSKH->BKGQH", p, v, preferred_element_type=preferred_element_type)
    pf = jnp.transpose(p[:, :, :, 0].astype(jnp.float32), (0, 3, 1, 2))  # [B, S, K, G]
    out = jnp.sum(pf[..., None] * v.astype(jnp.float32)[:, :, :, None, :], axis=1)  # [B, K, G, H]
    return out[:, :, :, None, :].astype(preferred_element_type or p.dtype)
