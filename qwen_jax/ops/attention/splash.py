"""The `splash` attention backend: TPU splash attention (Pallas), for uncached calls.

One MQA kernel per KV head, vmapped over the batch and the heads, with segment ids and a local mask
for sliding windows; sequences are padded to a multiple of 128. A Pallas kernel is not partitioned
by XLA, so on a mesh it runs per shard (`splash_sharded`). The Pallas TPU modules are imported
when a kernel is first built: they are heavy, and only a TPU runs them (or interpret mode in tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from qwen_jax.ops.attention.mask import AttentionMask
from qwen_jax.sharding import DEFAULT_RULES, logical_to_spec

# ----------------------------------------------------------------------------- splash (TPU)
SPLASH_LANES = 128


@functools.lru_cache(maxsize=32)
def _splash_kernel(length: int, group: int, window: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel_lib,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as mask_lib,
    )

    if window:
        head_mask = mask_lib.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
    else:
        head_mask = mask_lib.CausalMask((length, length))
    sizes = kernel_lib.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    # The kernel holds its block-mask tables as arrays: make them concrete, not tracers of
    # whichever trace first asked for the kernel (it is cached across traces).
    with jax.ensure_compile_time_eval():
        return kernel_lib.make_splash_mqa_single_device(
            mask_lib.MultiHeadMask([head_mask] * group), block_sizes=sizes, interpret=interpret
        )


def splash_sharded(q, k, v, mask: AttentionMask, scale: float, interpret: bool, mesh, rules) -> jax.Array:
    """Splash on a mesh: a Pallas kernel is not partitioned by XLA, so run it on each device's
    shard (batch over the rules' batch axes; heads over `kv_heads`' axis when the KV heads divide,
    which keeps every query head with its KV head)."""
    if mesh is None or mesh.size == 1:
        return _splash_attention(q, k, v, mask, scale, interpret)
    rules = rules or DEFAULT_RULES
    batch_axes, _, kv_axes, _ = logical_to_spec(("batch", None, "kv_heads", None), k.shape, mesh, rules)
    q_spec = PartitionSpec(batch_axes, None, kv_axes, None)
    k_spec = PartitionSpec(batch_axes, None, kv_axes, None)
    segment_ids = mask.q_segment_ids
    in_specs = (q_spec, k_spec, k_spec, None if segment_ids is None else PartitionSpec(batch_axes, None))

    def local(q, k, v, segment_ids):
        local_mask = AttentionMask.causal(segment_ids, window=mask.window)
        return _splash_attention(q, k, v, local_mask, scale, interpret)

    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=q_spec, check_vma=False)(q, k, v, segment_ids)


def _splash_attention(q, k, v, mask: AttentionMask, scale: float, interpret: bool) -> jax.Array:
    """Uncached self-attention with splash: one MQA kernel per KV head, vmapped over batch and heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel_lib,
    )

    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    length = -(-T // SPLASH_LANES) * SPLASH_LANES  # splash blocks are multiples of 128 that divide T
    block = next(b for b in (512, 256, 128) if length % b == 0)
    pad = ((0, 0), (0, length - T), (0, 0), (0, 0))
    # Splash takes no scale: fold it into q. Layout [B, K, G, T, H] and [B, K, T, H].
    qh = jnp.pad(q * jnp.asarray(scale, q.dtype), pad).reshape(B, length, K, G, H).transpose(0, 2, 3, 1, 4)
    kh = jnp.pad(k.astype(q.dtype), pad).transpose(0, 2, 1, 3)
    vh = jnp.pad(v.astype(q.dtype), pad).transpose(0, 2, 1, 3)
    kernel = _splash_kernel(length, G, mask.window, block, interpret)
    if mask.q_segment_ids is None:
        per_head = jax.vmap(kernel, in_axes=(0, 0, 0))
        out = jax.vmap(per_head)(qh, kh, vh)
    else:
        # Padding queries get segment -1 and see only padding keys (every row must see some key).
        segments = jnp.pad(mask.q_segment_ids.astype(jnp.int32), ((0, 0), (0, length - T)), constant_values=-1)

        def one_row(q_row, k_row, v_row, seg):
            ids = kernel_lib.SegmentIds(q=seg, kv=seg)
            return jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=ids))(q_row, k_row, v_row)

        out = jax.vmap(one_row)(qh, kh, vh, segments)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, length, N, H)[:, :T].astype(q.dtype)
