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

from qwen_jax.config import ATTENTION_BACKENDS as BACKENDS
from qwen_jax.errors import AttentionBackendError
from qwen_jax.ops.attention.chunked import BLOCK_KV

# On CPU an uncached call with fewer scores per (batch row, head) than this runs the xla einsum:
# there it costs about what chunked costs (measured on 2 cores: chunked is faster from ~64 tokens
# up, 6x at 1,024) and rounds bfloat16 probabilities exactly where HF does.
CPU_CHUNKED_MIN_SCORES = 256 * 256


# ----------------------------------------------------------------------------- selection
def platform_of(mesh=None) -> str:
    """'cpu', 'gpu' or 'tpu': the platform of the mesh's devices, else of the default backend."""
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def check_backend(name: str, *, dtype, head_dim: int | None, platform: str, interpret: bool = False) -> None:
    """Raise `AttentionBackendError` (one line, naming the problem) if `name` cannot run here.

    head_dim None skips the head-size check (loaders check before the config is read).
    """
    if name not in BACKENDS:
        raise AttentionBackendError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name == "cudnn":
        if platform != "gpu":
            raise AttentionBackendError(f"attention='cudnn' needs an NVIDIA GPU; this runs on {platform}")
        if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            raise AttentionBackendError(
                f"attention='cudnn' needs bfloat16 or float16 compute, not {jnp.dtype(dtype).name} "
                "(load with dtype='bfloat16', or use attention='chunked')"
            )
        if head_dim is not None and (head_dim % 8 or head_dim > 256):
            raise AttentionBackendError(f"attention='cudnn' needs head_dim a multiple of 8 and <= 256, not {head_dim}")
    if name == "splash" and platform != "tpu" and not interpret:
        raise AttentionBackendError(f"attention='splash' needs a TPU; this runs on {platform}")


def select_backend(
    name: str, *, q_len: int, kv_len: int, cached: bool, dtype, head_dim: int, platform: str, interpret: bool = False
) -> str:
    """The backend that runs one call: `name` itself (checked), or what `auto` picks.

    auto: cached calls -> chunked (it reads only the filled cache) except on GPU with cuDNN;
    TPU -> splash; GPU with bfloat16/float16 and head_dim a multiple of 8 up to 128 -> cudnn;
    CPU -> xla when `q_len * kv_len < CPU_CHUNKED_MIN_SCORES` and, for a cached call, the cache
    has at most `BLOCK_KV` slots (xla reads every slot; chunked would read that one block anyway),
    else chunked; otherwise chunked.
    """
    check_backend(name, dtype=dtype, head_dim=head_dim, platform=platform, interpret=interpret)
    if name == "splash" and cached:
        return "chunked"  # documented: splash serves uncached calls only
    if name != "auto":
        return name
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    if platform == "tpu" and not cached:
        return "splash"
    if platform == "cpu" and q_len * kv_len < CPU_CHUNKED_MIN_SCORES and (not cached or kv_len <= BLOCK_KV):
        return "xla"  # small: the einsum is faster and compiles faster; a cache of one block costs xla no more
    return "chunked"
