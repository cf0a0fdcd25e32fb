"""The `cudnn` attention backend: `jax.nn.dot_product_attention(implementation="cudnn")` on NVIDIA GPUs.

bfloat16/float16 compute, head_dim a multiple of 8. `cudnn_arguments` expresses an `AttentionMask`
in the keyword arguments cuDNN takes.
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
