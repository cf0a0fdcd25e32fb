"""Rotary position embeddings (rotate-half / NeoX convention), following HF's current formulas.

Angles are computed in float32; cos/sin are cast to the compute dtype where HF casts them.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from qwen_jax.config import Qwen2Config


def _base_exponents(head_dim: int) -> np.ndarray:
    return np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)


def static_inv_freq(config: Qwen2Config) -> tuple[np.ndarray, float]:
    """Inverse frequencies and cos/sin scale for every rope type that does not depend on length."""
    scaling = config.rope_scaling
    dim = config.head_dim
    exponents = _base_exponents(dim)
    base = np.float32(config.rope_theta)
    if scaling.rope_type in ("default", "dynamic"):
        return (1.0 / base**exponents).astype(np.float32), 1.0
    if scaling.rope_type == "linear":
        return (1.0 / base**exponents / np.float32(scaling.factor)).astype(np.float32), 1.0
    if scaling.rope_type == "yarn":
        return _yarn(config)
    raise ValueError(f"unsupported rope type {scaling.rope_type!r}")


def _yarn(config: Qwen2Config) -> tuple[np.ndarray, float]:
    scaling = config.rope_scaling
    dim, base, factor = config.head_dim, config.rope_theta, scaling.factor
    original = scaling.original_max_position_embeddings or config.max_position_embeddings

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = scaling.attention_factor
    if attention_factor is None:
        if scaling.mscale and scaling.mscale_all_dim:
            attention_factor = get_mscale(factor, scaling.mscale) / get_mscale(factor, scaling.mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.beta_fast or 32
    beta_slow = scaling.beta_slow or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    pos_freqs = np.float32(base) ** _base_exponents(dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (np.float32(factor) * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq.astype(np.float32), float(attention_factor)


def dynamic_inv_freq(config: Qwen2Config, seq_len: jnp.ndarray) -> jnp.ndarray:
    """Dynamic NTK: the base grows with the current length once it exceeds max_position_embeddings.

    HF keeps this as mutable module state; here it is a pure function of `seq_len` (the largest
    position in the call + 1), which equals HF's value for a fresh forward pass.
    """
    dim = config.head_dim
    factor = config.rope_scaling.factor
    max_pos = config.max_position_embeddings
    seq_len = jnp.maximum(seq_len.astype(jnp.float32), float(max_pos))
    base = config.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / base ** jnp.asarray(_base_exponents(dim))


def rope_tables(config: Qwen2Config, positions: jnp.ndarray, dtype, seq_len=None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape [batch, seq, head_dim] in `dtype` for int positions [batch, seq].

    seq_len: the sequence length dynamic NTK grows its base from (default: the largest position
    + 1). A prompt prefilled in chunks passes its full length, so every chunk uses the base HF's
    one-shot prefill uses.
    """
    if config.rope_scaling.rope_type == "dynamic":
        seq_len = jnp.max(positions) + 1 if seq_len is None else jnp.asarray(seq_len)
        inv_freq, scale = dynamic_inv_freq(config, seq_len), 1.0
    else:
        inv_freq, scale = static_inv_freq(config)
        inv_freq = jnp.asarray(inv_freq)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x: [batch, seq, heads, head_dim]; cos/sin: [batch, seq, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
