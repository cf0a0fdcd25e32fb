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

import jax.numpy as jnp

from qwen_jax.ops.attention.mask import AttentionMask


# ----------------------------------------------------------------------------- cudnn
def cudnn_arguments(mask: AttentionMask, q_len: int, kv_len: int) -> dict:
    """Keyword arguments of `jax.nn.dot_product_attention` that express `mask` for cuDNN.

    cuDNN's causal mask is aligned top-left (query t sees keys <= t), right only when queries
    and keys start together: uncached self-attention uses `is_causal` (and `local_window_size`,
    cuDNN's window (t - window, t]) so cuDNN skips blocks above the diagonal; segment ids add a
    segment-equality mask. A cached call's queries start at `q_offset[b]`, so it passes the
    explicit slot mask `[B, 1, T, S]` and the keys in use (`key_value_seq_lengths`, which lets
    cuDNN skip the unfilled cache).
    """
    if not mask.is_cached:
        kwargs: dict = {"is_causal": True}
        if mask.window:
            kwargs["local_window_size"] = (mask.window - 1, 0)
        if mask.q_segment_ids is not None:
            same = mask.q_segment_ids[:, :, None] == mask.kv_segment_ids[:, None, :]
            kwargs["mask"] = same[:, None]
        return kwargs
    batch = mask.q_offset.shape[0]
    used = mask.q_offset + q_len  # the last query's slot + 1
    return {
        "mask": mask.dense(batch, q_len, kv_len)[:, None],
        "query_seq_lengths": jnp.full((batch,), q_len, jnp.int32),
        "key_value_seq_lengths": jnp.minimum(used, kv_len).astype(jnp.int32),
    }
