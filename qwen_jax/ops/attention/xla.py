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

from qwen_jax.ops.attention.mask import MASKED, AttentionMask
from qwen_jax.ops.attention.scores import _pv, _qk


def _cache_rows(cache, layer, row_offset, rows: int):
    """Rows `row_offset .. row_offset + rows - 1` of one layer of a stacked cache `[L, B, S, K, H]`."""
    if isinstance(row_offset, int) and row_offset == 0 and rows == cache.shape[1]:
        return cache[layer]
    start = (layer, row_offset, 0, 0, 0)
    return jax.lax.dynamic_slice(cache, start, (1, rows, *cache.shape[2:]))[0]


# ----------------------------------------------------------------------------- xla (reference)
def _xla_attention(q, k, v, mask: AttentionMask, scale: float) -> jax.Array:
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    q = jnp.transpose(q.reshape(B, T, K, N // K, H), (0, 2, 3, 1, 4))  # [B, K, G, T, H]
    scores = _qk(q, k) * scale
    scores = jnp.where(mask.dense(B, T, S)[:, None, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.transpose(_pv(probs, v), (0, 3, 1, 2, 4)).reshape(B, T, N, H)
