"""Attention backends: one entry point, `attend`, for every way the model attends.

Shapes (einsum letters as in `qwen_jax.model.causal_lm`): queries `q[B, T, N, H]`; keys and values
`k, v[B, S, K, H]`, or the stacked KV cache `[L, B, S, K, H]` together with `layer` (a cached
call reads its layer's blocks straight from the cache, never copying the whole layer). Query head
n reads key/value head `n // (N // K)` (GQA; MQA and MHA are the cases K = 1 and K = N).

Which keys a query sees is described by an `AttentionMask` of slots, never by a `[T, S]` array
(see its docstring): causal, per-row lengths of a KV cache, a sliding window, segment ids of
packed sequences or padding.

Backends (`BACKENDS`):

- `xla` (`xla.py`): the reference: one float32 score tensor `[B, K, G, T, S]` and a dense mask.
  Memory and time grow with T * S; a cached call reads every slot of the cache. Short sequences only.
- `chunked` (`chunked.py`): pure JAX flash attention, runs everywhere. Query blocks x key blocks with an online
  softmax (float32 running max, sum and accumulator); each KV head's G query heads are folded into
  the query rows (one matrix product per KV head); only blocks on the causal diagonal, the window
  edge or with segment ids are masked, blocks above the diagonal, past a row's length or outside
  the window are never visited. A decode step therefore reads only the filled part of the cache.
  Memory O(T * block); gradients by a custom VJP that recomputes each block (FlashAttention-2).
- `cudnn` (`cudnn.py`): `jax.nn.dot_product_attention(implementation="cudnn")` (NVIDIA GPU, bfloat16/float16,
  head_dim a multiple of 8). Uncached calls use cuDNN's causal mask and window; segment ids and
  cached calls (whose causal diagonal is bottom-right, not cuDNN's top-left) pass an explicit
  mask plus `key_value_seq_lengths`. See `cudnn_arguments`.
- `splash` (`splash.py`): TPU splash attention (Pallas), one MQA kernel per KV head, vmapped over the batch,
  with segment ids and a local mask for sliding windows; sequences are padded to a multiple of 128.
  It serves uncached calls (training, full forward passes); cached calls (prefill chunks and
  decode steps) run the `chunked` kernel, which reads only the filled cache.
- `auto` (`selection.py`): `select_backend`: splash on TPU, cudnn on GPU for bfloat16/float16, otherwise chunked,
  except xla for short sequences on CPU (below `CPU_CHUNKED_MIN_SCORES` scores, and for cached
  calls a cache of at most `BLOCK_KV` slots), where one einsum is faster than a loop.

Asking for `cudnn` or `splash` where it cannot run raises `AttentionBackendError`; nothing falls
back silently. The xla and chunked backends share their score and value products (`scores.py`),
which take the XLA:CPU decode formulation when `cpu_kernels` says so (`qwen_jax.ops.cpu`).
"""

from __future__ import annotations

import jax

from qwen_jax.config import ATTENTION_BACKENDS as BACKENDS
from qwen_jax.ops import cpu
from qwen_jax.ops.attention.chunked import BLOCK_KV, BLOCK_Q, flash, flash_forward
from qwen_jax.ops.attention.cudnn import cudnn_arguments
from qwen_jax.ops.attention.mask import AttentionMask
from qwen_jax.ops.attention.selection import check_backend, select_backend
from qwen_jax.ops.attention.splash import splash_sharded
from qwen_jax.ops.attention.xla import cache_rows, xla_attention


# ----------------------------------------------------------------------------- entry point
def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: AttentionMask,
    *,
    backend: str = "xla",
    scale: float | None = None,
    layer=None,
    row_offset=0,
    block_q: int | None = None,
    block_kv: int | None = None,
    interpret: bool = False,
    mesh=None,
    rules=None,
    cpu_kernels: bool | None = None,
) -> jax.Array:
    """Attention output `[B, T, N, H]` in q's dtype.

    backend: a concrete backend ('xla', 'chunked', 'cudnn', 'splash'); resolve 'auto' with
      `select_backend` first. `splash` with a cached mask runs `chunked` (see the module doc).
    layer: with k/v the stacked cache `[L, B, S, K, H]`, the layer to read (may be traced).
    row_offset: with `layer`, query row b reads cache row `row_offset + b` (may be traced); the
      cache may then have more rows than q (a slice of a batch cache, read in place).
    block_q, block_kv: chunked kernel block sizes (default `BLOCK_Q`, `BLOCK_KV`).
    scale: score scale (default `head_dim ** -0.5`).
    interpret: run Pallas kernels (splash) in interpret mode, for testing on CPU.
    mesh, rules: the model's mesh and sharding rules; splash runs per shard (`shard_map` over the
      batch and, when the KV heads divide, the heads). The other backends are partitioned by XLA.
    cpu_kernels: whether the XLA:CPU specialisations apply (`qwen_jax.ops.cpu`; the model passes its
      own decision); None: `qwen_jax.ops.cpu.applies(mesh)`.
    Scores and softmax are float32; probabilities are rounded to q's dtype before the product
    with v, as HF does.
    """
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if scale is None else float(scale)
    if q.shape[2] % k.shape[-2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[-2]} key/value heads")
    if layer is None and (not isinstance(row_offset, int) or row_offset or k.shape[0] != q.shape[0]):
        raise ValueError("row_offset and a cache with more rows than q need the stacked cache and `layer`")
    cpu_kernels = cpu.applies(mesh) if cpu_kernels is None else cpu_kernels
    if backend in ("xla", "cudnn") and layer is not None:
        k, v = (cache_rows(k, layer, row_offset, q.shape[0]), cache_rows(v, layer, row_offset, q.shape[0]))
    if backend == "xla":
        return xla_attention(q, k, v, mask, scale, cpu_kernels=cpu_kernels)
    if backend == "cudnn":
        return jax.nn.dot_product_attention(
            q,
            k.astype(q.dtype),
            v.astype(q.dtype),
            scale=scale,
            implementation="cudnn",
            **cudnn_arguments(mask, q.shape[1], k.shape[1]),
        )
    if backend == "splash" and not mask.is_cached:
        return splash_sharded(q, k, v, mask, scale, interpret, mesh, rules)
    if backend not in ("chunked", "splash"):
        raise ValueError(f"attend() takes a concrete backend, got {backend!r} (resolve 'auto' with select_backend)")
    blocks = (min(block_q or BLOCK_Q, q.shape[1]), min(block_kv or BLOCK_KV, k.shape[-3]))
    if layer is None:
        return flash(q, k, v, mask, scale, blocks, cpu_kernels)
    out, _ = flash_forward(q, k, v, layer, mask, scale, blocks, row_offset, cpu_kernels=cpu_kernels)
    return out


__all__ = ["BACKENDS", "AttentionMask", "attend", "check_backend", "select_backend"]
