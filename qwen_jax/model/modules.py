"""The layers of Qwen2.5, mirroring HF transformers' `Qwen2Model` module for module.

`RMSNorm`, `Attention` (q/k/v/o `Linear`s, rope, and the call into `qwen_jax.ops.attention`
through an `AttentionContext`), `MLP` (SwiGLU), `DecoderLayer`, `Embedding`, `Qwen2Model` (the
embedding, the decoder layers stacked on a leading `layers` axis or one module per layer, the final
norm) and the untied `LMHead`. Einsum letters as in `qwen_jax.model.causal_lm`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qwen_jax.config import Qwen2Config
from qwen_jax.model.kv_cache import write_rows
from qwen_jax.model.linear import Linear, new_param, normal_init, ones_init
from qwen_jax.model.rope import apply_rope
from qwen_jax.ops.attention import attend
from qwen_jax.ops.attention.mask import AttentionMask
from qwen_jax.sharding import ShardingRules


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, layers=None, rngs=None):
        self.weight = new_param(rngs, ones_init, (dim,), ("embed",), param_dtype, layers)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        # HF: normalise in float32, cast back to the input dtype, then scale.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * normed.astype(self.dtype)


class Attention(nnx.Module):
    def __init__(self, config: Qwen2Config, *, dtype, param_dtype, layers=None, cpu_kernels=False, rngs=None):
        D, N, K, H = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, layers=layers, cpu_kernels=cpu_kernels, rngs=rngs)
        self.q_proj = Linear(
            "BTD,DNH->BTNH", (D, N, H), ("embed", "q_heads", "head_dim"), (N, H), ("q_heads", "head_dim"), **kw
        )
        self.k_proj = Linear(
            "BTD,DKH->BTKH", (D, K, H), ("embed", "kv_heads", "head_dim"), (K, H), ("kv_heads", "head_dim"), **kw
        )
        self.v_proj = Linear(
            "BTD,DKH->BTKH", (D, K, H), ("embed", "kv_heads", "head_dim"), (K, H), ("kv_heads", "head_dim"), **kw
        )
        self.o_proj = Linear("BTNH,NHD->BTD", (N, H, D), ("q_heads", "head_dim", "embed"), **kw)

    def __call__(self, x, cos, sin, context: AttentionContext, kv=None, layer=None, use_window=False):
        """Self-attention of one layer; with `kv` (the stacked cache arrays `[L, B, S, K, H]`),
        this call's keys/values are written into layer `layer` first (each row at its own length)
        and attention reads that layer's filled blocks. Returns the output and the updated `kv`."""
        q = apply_rope(self.q_proj(x), cos, sin)
        k = apply_rope(self.k_proj(x), cos, sin)
        v = self.v_proj(x)
        out, kv = context.write_and_attend(q, k, v, kv, layer, use_window)
        return self.o_proj(out), kv


@dataclasses.dataclass(frozen=True)
class AttentionContext:
    """What every layer's attention shares in one forward call: the backend and the mask."""

    backend: str
    mask: AttentionMask  # without a window
    window: int  # the config's sliding window, used on layers that ask for it
    cache_starts: jax.Array | None  # cache length of every row before this call
    reads_cache: bool  # False without a cache, or when the caller says the cache is empty
    mesh: Mesh | None
    rules: ShardingRules
    cpu_kernels: bool  # the model's `qwen_jax.ops.cpu.applies` decision

    def write_and_attend(self, q, k, v, kv, layer, use_window):
        """Write this call's keys and values into layer `layer` of the cache arrays `kv` (each row
        at its own length; None: no cache), then attend; returns (output, kv)."""
        if kv is not None:
            kv = tuple(write_rows(cache, layer, new, self.cache_starts) for cache, new in zip(kv, (k, v)))
            if self.reads_cache:
                k, v = kv
        # An empty cache holds only this call's keys: attend to them directly (plain causal self-attention).
        return self.attend(q, k, v, layer if self.reads_cache else None, use_window), kv

    def attend(self, q, k, v, layer, use_window, row_offset=0) -> jax.Array:
        def run(window):
            return attend(
                q,
                k,
                v,
                self.mask.with_window(window),
                backend=self.backend,
                layer=layer,
                row_offset=row_offset,
                mesh=self.mesh,
                rules=self.rules,
                cpu_kernels=self.cpu_kernels,
            )

        if isinstance(use_window, (bool, int, np.integer)):
            return run(self.window if use_window else 0)
        # A scanned stack mixing full and sliding layers: the flag is traced, pick per layer.
        return jax.lax.cond(use_window, lambda: run(self.window), lambda: run(0))


class MLP(nnx.Module):
    def __init__(self, config: Qwen2Config, *, dtype, param_dtype, layers=None, cpu_kernels=False, rngs=None):
        D, F = config.hidden_size, config.intermediate_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, layers=layers, cpu_kernels=cpu_kernels, rngs=rngs)
        self.gate_proj = Linear("BTD,DF->BTF", (D, F), ("embed", "mlp"), **kw)
        self.up_proj = Linear("BTD,DF->BTF", (D, F), ("embed", "mlp"), **kw)
        self.down_proj = Linear("BTF,FD->BTD", (F, D), ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """One decoder layer; constructed with `layers=L` its parameters are stacked L deep."""

    def __init__(self, config: Qwen2Config, *, dtype, param_dtype, layers=None, cpu_kernels=False, rngs=None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, layers=layers, rngs=rngs)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.self_attn = Attention(config, cpu_kernels=cpu_kernels, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.mlp = MLP(config, cpu_kernels=cpu_kernels, **kw)

    def __call__(self, x, cos, sin, context, kv=None, layer=None, use_window=False):
        attn_out, kv = self.self_attn(self.input_layernorm(x), cos, sin, context, kv, layer, use_window)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, dtype, param_dtype, rngs=None):
        self.embedding = new_param(rngs, normal_init, (vocab, dim), ("vocab", "embed"), param_dtype, None)
        self.dtype = dtype

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class Qwen2Model(nnx.Module):
    def __init__(
        self, config: Qwen2Config, *, dtype, param_dtype, scan_layers: bool = True, cpu_kernels=False, rngs=None
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, **kw)
        if scan_layers:  # one module, parameters stacked on a leading `layers` axis
            self.layers = DecoderLayer(config, layers=config.num_hidden_layers, cpu_kernels=cpu_kernels, **kw)
        else:  # one module per layer (see `unstack_layers`)
            self.layers = nnx.List(
                [DecoderLayer(config, cpu_kernels=cpu_kernels, **kw) for _ in range(config.num_hidden_layers)]
            )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)


class LMHead(nnx.Module):
    """Untied output projection, stored `[vocab, embed]` like the embedding (and HF)."""

    def __init__(self, vocab: int, dim: int, *, param_dtype, rngs=None):
        self.weight = new_param(rngs, normal_init, (vocab, dim), ("vocab", "embed"), param_dtype, None)
