"""Which attention backend runs a call: `check_backend` refuses one that cannot run here,
`select_backend` resolves `auto` from the platform, dtype, head size and sequence lengths."""

from __future__ import annotations

import jax.numpy as jnp

from qwen_jax.config import ATTENTION_BACKENDS as BACKENDS
from qwen_jax.errors import AttentionBackendError
from qwen_jax.ops.attention.chunked import BLOCK_KV

__all__ = ["CPU_CHUNKED_MIN_SCORES", "check_backend", "select_backend"]

# On CPU an uncached call with fewer scores per (batch row, head) than this runs the xla einsum:
# below it the einsum costs about what the chunked loop costs (see benchmarks/long_context.py) and
# rounds bfloat16 probabilities exactly where HF does.
CPU_CHUNKED_MIN_SCORES = 256 * 256


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
