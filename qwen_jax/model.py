"""Qwen2.5 in Flax NNX, mirroring HF transformers' `Qwen2ForCausalLM` module for module.

Layout (einsum letters): B batch, T query length, S key length, D embed, N query heads,
K kv heads, G query heads per kv head, H head_dim, F mlp, V vocab, L layers.

Decoder layers are stored stacked on a leading `layers` axis and run with `jax.lax.scan`, so
compile time does not grow with depth. Every parameter carries `logical_axes` metadata that
`qwen_jax.sharding` maps onto a mesh.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from qwen_jax import attention, quant, rope
from qwen_jax.attention import AttentionMask
from qwen_jax.config import Qwen2Config
from qwen_jax.sharding import DEFAULT_RULES, ShardingRules, constrain, named_sharding, state_shardings

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def default_dtype() -> jnp.dtype:
    """float32 on CPU (XLA's CPU bf16 matmuls are emulated and slow), bfloat16 on GPU/TPU."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def _param(rngs: nnx.Rngs | None, init, shape, axes, dtype, layers: int | None) -> nnx.Param:
    if layers is not None:
        shape, axes = (layers, *shape), ("layers", *axes)
    value = init(rngs.params() if rngs is not None else jax.random.key(0), shape, dtype)
    return nnx.Param(value, logical_axes=axes)


_normal = jax.nn.initializers.normal(0.02)
_zeros = jax.nn.initializers.zeros
_ones = jax.nn.initializers.ones


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated keys/values `[layers, batch, max_len, kv_heads, head_dim]` with a length per row.

    Contract (what the model, generation and a continuous-batching engine rely on):

    - `lengths[b]` is the number of filled slots of row b. Row b's keys always start at slot 0
      (no left padding inside the cache), so a row's layout never depends on its batch-mates.
    - A model call with `T` new tokens, `model(ids[B, T], cache=cache, attention_mask=m[B, T])`,
      writes row b's tokens at slots `lengths[b] .. lengths[b] + T - 1` (writes past `max_len`
      are dropped) and returns the cache with `lengths + m.sum(1)`: `m` marks the real tokens,
      which come first in each row (right padding), default all T. Padding slots written past a
      row's new length are ignored by attention and overwritten by the row's next tokens.
    - Query t of row b sits at slot `lengths[b] + t` and attends to slots `0 .. lengths[b] + t`
      (and, on sliding-window layers, only the last `sliding_window` of them). Its default
      position is its slot.
    - A decode step with ragged lengths is the same call with `T = 1`:
      `logits, cache = model(next_tokens[:, None], cache=cache)`; every row reads its own
      length. Give `attention_mask=active[:, None]` (0 for idle rows) to leave a row's length as is.
    - Serving one request in a slot of a shared cache: prefill it alone in a batch-1 cache, then
      `batch_cache = batch_cache.insert(request_cache, slot)` (see `insert`); to free a slot,
      set its length to 0: `dataclasses.replace(cache, lengths=cache.lengths.at[slot].set(0))`.
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array  # int32 [batch]

    @classmethod
    def init(cls, config: Qwen2Config, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

    @staticmethod
    def logical_axes() -> tuple[str, ...]:
        return ("layers", "batch", "cache_seq", "kv_heads", "head_dim")

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def insert(self, other: "KVCache", slots) -> "KVCache":
        """This cache with every row of `other` copied into rows `slots` (int or int[other.batch]).

        `other` may be shorter (`other.max_len <= self.max_len`): slots past it keep stale values,
        which the copied lengths hide. Jittable; under `jax.jit(..., donate_argnums=0)` the copy is
        in place.
        """
        if other.max_len > self.max_len:
            raise ValueError(f"cannot insert a cache of max_len {other.max_len} into one of max_len {self.max_len}")
        if (self.k.shape[0], *self.k.shape[3:]) != (other.k.shape[0], *other.k.shape[3:]):
            raise ValueError(f"cache shapes {other.k.shape} and {self.k.shape} differ beyond batch and length")
        slots = jnp.broadcast_to(jnp.asarray(slots, jnp.int32), (other.batch,))
        span = slice(0, other.max_len)
        return KVCache(
            self.k.at[:, slots, span].set(other.k.astype(self.k.dtype)),
            self.v.at[:, slots, span].set(other.v.astype(self.v.dtype)),
            self.lengths.at[slots].set(other.lengths),
        )


def write_rows(buffer: jax.Array, layer, new: jax.Array, starts: jax.Array, row_offset=0) -> jax.Array:
    """`buffer[layer, row_offset + b, starts[b] + t] = new[b, t]` for a stacked cache array `[L, B, S, K, H]`.

    Each row is written at its own offset (one scatter); slots past `max_len` are dropped.
    """
    batch, length = new.shape[:2]
    slots = starts[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
    rows = row_offset + jnp.arange(batch, dtype=jnp.int32)[:, None]
    return buffer.at[layer, rows, slots].set(new.astype(buffer.dtype), mode="drop")


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, layers=None, rngs=None):
        self.weight = _param(rngs, _ones, (dim,), ("embed",), param_dtype, layers)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        # HF: normalise in float32, cast back to the input dtype, then scale.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * normed.astype(self.dtype)


class Linear(nnx.Module):
    """A projection in einsum layout (`kernel` axes name every dimension), optional bias."""

    def __init__(self, equation: str, kernel_shape, kernel_axes, bias_shape=None, bias_axes=None, *,
                 dtype, param_dtype, layers=None, rngs=None):
        self.equation = equation
        x_letters, kernel_letters = equation.split("->")[0].split(",")
        self.contracted = sum(c in kernel_letters for c in x_letters)  # x's trailing dims = kernel's leading
        if x_letters[len(x_letters) - self.contracted:] != kernel_letters[: self.contracted]:
            raise ValueError(f"{equation!r}: x must end with the dims the kernel starts with")
        self.kernel = _param(rngs, _normal, kernel_shape, kernel_axes, param_dtype, layers)
        self.bias = _param(rngs, _zeros, bias_shape, bias_axes, param_dtype, layers) if bias_shape else None
        self.dtype = dtype
        # Optional low-rank adapter (`qwen_jax.train.lora`): a module mapping x to a delta of y.
        self.lora = None
        # Weight-only quantization (`qwen_jax.quant`): the kernel then holds integers, out-major and
        # split into groups, with `kernel_scale` (and `kernel_zero`) beside it.
        self.quantization = None
        # A float kernel stored `[*out, *in]` instead of the einsum layout (`set_out_major`; the
        # unrolled inference layers on CPU, see `unstack_layers`).
        self.out_major = False

    def __call__(self, x: jax.Array) -> jax.Array:
        # The einsum contracts x's trailing dims with the kernel's leading ones; run it as one 2-D
        # matmul on flattened views. XLA on CPU otherwise picked a layout for 'BTNH,NHD->BTD' that
        # copied the o_proj kernel transposed on every call (23 % of a 0.5B decode step).
        contracted = self.contracted
        if self.quantization is not None:
            y = self._quantized_product(x)
        elif self.out_major:
            y = _out_major_product(x, self.kernel[...].astype(self.dtype), contracted)
        else:
            kernel = self.kernel[...].astype(self.dtype)
            in_shape, out_shape = kernel.shape[:contracted], kernel.shape[contracted:]
            flat = x.reshape(*x.shape[: x.ndim - contracted], math.prod(in_shape))
            y = (flat @ kernel.reshape(math.prod(in_shape), math.prod(out_shape))).reshape(*flat.shape[:-1], *out_shape)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x)
        return y

    def _quantized_product(self, x: jax.Array) -> jax.Array:
        """The projection with a quantized kernel `[*out, groups, group']` (see `qwen_jax.quant`)."""
        stored = self.kernel[...]
        out_shape = stored.shape[:-2]
        rows = x.shape[: x.ndim - self.contracted]
        out = math.prod(out_shape)
        zero = None if self.kernel_zero is None else self.kernel_zero[...].reshape(out, -1)
        y = quant.matmul(x.reshape(math.prod(rows), -1), stored.reshape(out, *stored.shape[-2:]),
                         self.kernel_scale[...].reshape(out, -1), zero, self.quantization, self.dtype)
        return y.reshape(*rows, *out_shape)


# Row counts for which an out-major product is computed as `(W @ x.T).T` (see `rows_times_out_major`).
OUT_MAJOR_SWAP_ROWS = (2, 64)


def rows_times_out_major(flat: jax.Array, matrix: jax.Array, preferred_element_type=None) -> jax.Array:
    """`flat @ matrix.T` for rows `flat [M, K]` and a kernel stored out-major, `matrix [N, K]`.

    One row is a matrix-vector product. 2-64 rows (decode steps of a batch, small mixed steps) are
    computed as `(matrix @ flat.T).T`, the kernel as the left operand: XLA:CPU's matrix product
    (YNNPACK) then streams the kernel once at close to the one-row speed, where with the kernel on
    the right it runs at under half of it. The barrier keeps XLA from folding the transpose back into
    the other operand order. Measured on the 2-core CPU (24 layers' MLP products, float32): 8 rows
    102-120 ms -> 76-78 ms (1 row 52-55 ms), 2 rows 91 -> 66 ms; the 0.5B tied lm_head with 8 rows
    36.5 -> 30.2 ms. From 128 rows the plain product is faster again (MLP kernels: 141 against 147 ms).
    """
    dims = (((1,), (1,)), ((), ()))
    low, high = OUT_MAJOR_SWAP_ROWS
    if low <= flat.shape[0] <= high:
        y = jax.lax.dot_general(matrix, flat, dims, preferred_element_type=preferred_element_type)
        return jax.lax.optimization_barrier(y).T
    return jax.lax.dot_general(flat, matrix, dims, preferred_element_type=preferred_element_type)


def _out_major_product(x: jax.Array, kernel: jax.Array, contracted: int) -> jax.Array:
    """x @ W for a kernel stored `[*out, *in]` (x's trailing `contracted` dims are the inputs)."""
    n_out = kernel.ndim - contracted
    out_shape, in_shape = kernel.shape[:n_out], kernel.shape[n_out:]
    rows = x.shape[: x.ndim - contracted]
    flat = x.reshape(math.prod(rows), math.prod(in_shape))
    y = rows_times_out_major(flat, kernel.reshape(math.prod(out_shape), math.prod(in_shape)))
    return y.reshape(*rows, *out_shape)


def _kernel_permutation(ndim: int, contracted: int, to_out_major: bool) -> tuple[int, ...]:
    """The transpose between a kernel's einsum layout `[*in, *out]` and `[*out, *in]`."""
    first = contracted if to_out_major else ndim - contracted  # dims that move to the end
    return (*range(first, ndim), *range(first))


def set_out_major(linear: "Linear", out_major: bool) -> None:
    """Store a float `Linear`'s kernel as `[*out, *in]` (True) or in the einsum layout (False), in place.

    Only for unstacked kernels; a quantized one is left as it is (its own layout is out-major).
    Writers read kernels back in the einsum layout (`einsum_kernel`).
    """
    if linear.quantization is not None or linear.out_major == out_major:
        return
    axes = tuple(linear.kernel.get_metadata()["logical_axes"])
    if axes[0] == "layers":
        raise ValueError("set_out_major: a layer-stacked kernel keeps the einsum layout")
    perm = _kernel_permutation(len(axes), linear.contracted, out_major)
    value = jnp.transpose(linear.kernel.get_value(), perm)
    linear.kernel = nnx.Param(value, logical_axes=tuple(axes[i] for i in perm))
    linear.out_major = out_major
    # The replaced kernel is freed now; hand its memory back before the next kernel is transposed
    # (transposing the 0.5B float32 model's kernels one by one otherwise raised peak RSS by 1 GiB).
    release_freed_host_memory()


def default_out_major(model: "Qwen2ForCausalLM") -> bool:
    """Whether inference layers store their kernels out-major by default: a float model on CPU."""
    return quant.model_quantization(model) is None and attention.platform_of(model.mesh) == "cpu"


def set_decoder_out_major(model: "Qwen2ForCausalLM", out_major: bool) -> None:
    """`set_out_major` on every decoder projection of an unrolled model, in place."""
    for _, linear in quant.decoder_linears(model):
        set_out_major(linear, out_major)


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def release_freed_host_memory() -> None:
    """Return freed heap memory to the OS (glibc's `malloc_trim`; a no-op elsewhere).

    Host buffers of XLA:CPU that are freed one by one (e.g. kernels replaced by transposed copies)
    stay in glibc's heap once its mmap threshold has risen past their size, so RSS keeps them
    although nothing uses them. Cheap (0.2 ms with nothing to return, the 0.5B model loaded; 9 ms
    returning memory); call it after freeing large arrays.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def einsum_kernel(linear: "Linear", value: jax.Array) -> jax.Array:
    """A float kernel array of `linear` in the einsum layout `[*in, *out]`, however it is stored."""
    if not linear.out_major:
        return value
    return jnp.transpose(value, _kernel_permutation(value.ndim, linear.contracted, False))


class Attention(nnx.Module):
    def __init__(self, config: Qwen2Config, *, dtype, param_dtype, layers=None, rngs=None):
        D, N, K, H = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, layers=layers, rngs=rngs)
        self.q_proj = Linear("BTD,DNH->BTNH", (D, N, H), ("embed", "q_heads", "head_dim"),
                             (N, H), ("q_heads", "head_dim"), **kw)
        self.k_proj = Linear("BTD,DKH->BTKH", (D, K, H), ("embed", "kv_heads", "head_dim"),
                             (K, H), ("kv_heads", "head_dim"), **kw)
        self.v_proj = Linear("BTD,DKH->BTKH", (D, K, H), ("embed", "kv_heads", "head_dim"),
                             (K, H), ("kv_heads", "head_dim"), **kw)
        self.o_proj = Linear("BTNH,NHD->BTD", (N, H, D), ("q_heads", "head_dim", "embed"), **kw)

    def __call__(self, x, cos, sin, context: "_AttentionContext", kv=None, layer=None, use_window=False):
        """Self-attention of one layer; with `kv` (the stacked cache arrays `[L, B, S, K, H]`),
        this call's keys/values are written into layer `layer` first (each row at its own length)
        and attention reads that layer's filled blocks. Returns the output and the updated `kv`."""
        q = rope.apply_rope(self.q_proj(x), cos, sin)
        k = rope.apply_rope(self.k_proj(x), cos, sin)
        v = self.v_proj(x)
        if isinstance(context, _MixedContext):
            out, kv = context.attend(q, k, v, kv, layer, use_window)
            return self.o_proj(out), kv
        if kv is not None:
            kv = tuple(write_rows(cache, layer, new, context.cache_starts) for cache, new in zip(kv, (k, v)))
            if context.reads_cache:
                k, v = kv
        # An empty cache holds only this call's keys: attend to them directly (plain causal self-attention).
        out = context.attend(q, k, v, layer if context.reads_cache else None, use_window)
        return self.o_proj(out), kv


@dataclasses.dataclass(frozen=True)
class _AttentionContext:
    """What every layer's attention shares in one forward call: the backend and the mask."""

    backend: str
    mask: AttentionMask  # without a window
    window: int  # the config's sliding window, used on layers that ask for it
    cache_starts: jax.Array | None  # cache length of every row before this call
    reads_cache: bool  # False without a cache, or when the caller says the cache is empty
    mesh: Mesh | None
    rules: ShardingRules

    def attend(self, q, k, v, layer, use_window, row_offset=0) -> jax.Array:
        def run(window):
            return attention.attend(q, k, v, self.mask.with_window(window), backend=self.backend, layer=layer,
                                    row_offset=row_offset, mesh=self.mesh, rules=self.rules)

        if isinstance(use_window, (bool, int, np.integer)):
            return run(self.window if use_window else 0)
        # A scanned stack mixing full and sliding layers: the flag is traced, pick per layer.
        return jax.lax.cond(use_window, lambda: run(self.window), lambda: run(0))


@dataclasses.dataclass(frozen=True)
class _MixedContext:
    """Attention of a mixed step (`Qwen2ForCausalLM.mixed_hidden_states`): the call's tokens are
    `width` decode tokens (one per cache row 0..width-1) followed by a prompt chunk of cache row
    `row`; each group writes its keys into its rows and attends to its own rows of the cache."""

    decode: _AttentionContext
    chunk: _AttentionContext
    width: int
    row: jax.Array  # int32 scalar: the chunk's cache row

    def attend(self, q, k, v, kv, layer, use_window):
        W = self.width
        (q_dec, q_chunk), (k_dec, k_chunk), (v_dec, v_chunk) = (
            (x[0, :W, None], x[:, W:]) for x in (q, k, v))  # [W, 1, heads, H] and [1, C, heads, H]
        # Decode rows first: an idle row (the chunk's own row among them) writes a slot the chunk then overwrites.
        kv = tuple(write_rows(cache, layer, new, self.decode.cache_starts) for cache, new in zip(kv, (k_dec, v_dec)))
        kv = tuple(write_rows(cache, layer, new, self.chunk.cache_starts, self.row)
                   for cache, new in zip(kv, (k_chunk, v_chunk)))
        out_dec = self.decode.attend(q_dec, *kv, layer, use_window)
        out_chunk = self.chunk.attend(q_chunk, *kv, layer, use_window, row_offset=self.row)
        return jnp.concatenate([out_dec[:, 0][None], out_chunk], axis=1), kv


class MLP(nnx.Module):
    def __init__(self, config: Qwen2Config, *, dtype, param_dtype, layers=None, rngs=None):
        D, F = config.hidden_size, config.intermediate_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, layers=layers, rngs=rngs)
        self.gate_proj = Linear("BTD,DF->BTF", (D, F), ("embed", "mlp"), **kw)
        self.up_proj = Linear("BTD,DF->BTF", (D, F), ("embed", "mlp"), **kw)
        self.down_proj = Linear("BTF,FD->BTD", (F, D), ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """One decoder layer; constructed with `layers=L` its parameters are stacked L deep."""

    def __init__(self, config: Qwen2Config, *, dtype, param_dtype, layers=None, rngs=None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, layers=layers, rngs=rngs)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.self_attn = Attention(config, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.mlp = MLP(config, **kw)

    def __call__(self, x, cos, sin, context, kv=None, layer=None, use_window=False):
        attn_out, kv = self.self_attn(self.input_layernorm(x), cos, sin, context, kv, layer, use_window)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, dtype, param_dtype, rngs=None):
        self.embedding = _param(rngs, _normal, (vocab, dim), ("vocab", "embed"), param_dtype, None)
        self.dtype = dtype

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class Qwen2Model(nnx.Module):
    def __init__(self, config: Qwen2Config, *, dtype, param_dtype, scan_layers: bool = True, rngs=None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, **kw)
        if scan_layers:  # one module, parameters stacked on a leading `layers` axis
            self.layers = DecoderLayer(config, layers=config.num_hidden_layers, **kw)
        else:  # one module per layer (see `unstack_layers`)
            self.layers = nnx.List([DecoderLayer(config, **kw) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)


class LMHead(nnx.Module):
    """Untied output projection, stored `[vocab, embed]` like the embedding (and HF)."""

    def __init__(self, vocab: int, dim: int, *, param_dtype, rngs=None):
        self.weight = _param(rngs, _normal, (vocab, dim), ("vocab", "embed"), param_dtype, None)


class Qwen2ForCausalLM(nnx.Module):
    """Qwen2.5 causal LM.

    `model(input_ids)` with `int32[B, T]` returns float32 logits `[B, T, vocab_size]`.
    Outside a trace the call runs through a cached `jax.jit` with explicit shardings; inside a
    traced function (a train step, a generation loop) it is inlined.
    """

    def __init__(
        self,
        config: Qwen2Config,
        *,
        dtype=None,
        param_dtype=None,
        rngs: nnx.Rngs | None = None,
        mesh: Mesh | None = None,
        rules: ShardingRules = DEFAULT_RULES,
        remat: str = "none",
        scan_layers: bool = True,
        attention: str = "auto",
    ):
        dtype = jnp.dtype(dtype or default_dtype())
        param_dtype = jnp.dtype(param_dtype or dtype)
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; choose from {list(REMAT_POLICIES)}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.mesh = mesh
        self.rules = rules
        self.remat = remat
        self.attention = attention
        self.model = Qwen2Model(config, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, rngs=rngs)
        self.lm_head = (
            None if config.tie_word_embeddings
            else LMHead(config.vocab_size, config.hidden_size, param_dtype=param_dtype, rngs=rngs)
        )

    # ------------------------------------------------------------------ API
    @property
    def attention(self) -> str:
        """Attention backend: 'auto' (default), 'xla', 'chunked', 'cudnn' or 'splash' (see
        `qwen_jax.attention`). Setting one that cannot run here raises `AttentionBackendError`."""
        return self._attention

    @attention.setter
    def attention(self, name: str) -> None:
        attention.check_backend(name, dtype=self.dtype, head_dim=self.config.head_dim,
                                platform=attention.platform_of(self.mesh))
        self._attention = name

    def __call__(self, input_ids, positions=None, attention_mask=None, *, segment_ids=None, cache=None,
                 logits_to_keep: int = 0):
        """Logits `[B, T, V]` (float32); with `cache`, returns `(logits, new_cache)`.

        logits_to_keep: compute logits for the last n positions only (`[B, n, V]`; 0: all), as in
          HF. Full logits of a long prompt are large (4K tokens x 151,936 x 4 bytes = 2.5 GB).

        attention_mask: `[B, T]`, 1 for real tokens and 0 for padding. Without a cache, padding
          may sit anywhere (left padding for batched prompts); with a cache, real tokens come
          first in each row (right padding) and each row's cache length grows by its count of
          real tokens (see `KVCache`). Default: every token is real.
        positions: `[B, T]`; default: without a cache, the count of real tokens before each one
          (works for left padding); with a cache, each token's slot `cache.lengths[b] + t`.
        segment_ids: `[B, T]` for packed sequences: attention never crosses segments.
        """
        input_ids = jnp.asarray(input_ids, jnp.int32) if not _traced(input_ids) else input_ids
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be int32[batch, seq], got shape {input_ids.shape}")
        positions, attention_mask = self._defaults(input_ids, positions, attention_mask, cache)
        logits_to_keep = int(logits_to_keep)
        if not 0 <= logits_to_keep <= input_ids.shape[1]:
            raise ValueError(f"logits_to_keep must be in [0, {input_ids.shape[1]}], got {logits_to_keep}")
        if _traced(input_ids) or _traced(self.model.embed_tokens.embedding.get_value()):
            return self.forward(input_ids, positions, attention_mask, segment_ids=segment_ids, cache=cache,
                                logits_to_keep=logits_to_keep)
        state = nnx.state(self)
        fn = _jitted_forward(self, state, input_ids, cache is not None, segment_ids is not None, logits_to_keep)
        return fn(state, input_ids, positions, attention_mask, segment_ids, cache)

    def _defaults(self, input_ids, positions, attention_mask, cache):
        B, T = input_ids.shape
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask).astype(jnp.int32)
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {(B, T)}")
        if cache is not None and cache.batch != B:
            raise ValueError(f"cache has {cache.batch} rows, input_ids {B}")
        if positions is None:
            if cache is not None:
                positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
            elif attention_mask is not None:
                positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
            else:
                positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        positions = jnp.asarray(positions).astype(jnp.int32)
        if positions.shape != (B, T):
            raise ValueError(f"positions shape {positions.shape} != input_ids shape {(B, T)}")
        return positions, attention_mask

    def hidden_states(self, input_ids, positions, attention_mask=None, *, segment_ids=None, cache=None,
                      rope_length=None, empty_cache: bool = False):
        """Final-norm hidden states `[B, T, D]` (and the new cache, or None).

        rope_length: the sequence length dynamic-NTK rope scales from (see `rope.rope_tables`).
        empty_cache: the caller guarantees every row of `cache` has length 0 (a first prefill):
          keys are still written to the cache, but attention is plain causal self-attention over
          this call's keys (the fused kernels' fast causal path, no cache read, no slot mask).
          Same result as the cached path; wrong if a row already holds tokens.
        """
        cfg, mesh, rules = self.config, self.mesh, self.rules
        x = self.model.embed_tokens(input_ids)
        x = constrain(x, ("batch", "seq", "act_embed"), mesh, rules)
        cos, sin = rope.rope_tables(cfg, positions, self.dtype, rope_length)
        context = self._attention_context(input_ids.shape, attention_mask, segment_ids, cache, empty_cache)
        x, kv = self._run_layers(x, cos, sin, context, None if cache is None else (cache.k, cache.v))
        new_cache = None
        if cache is not None:
            added = input_ids.shape[1] if attention_mask is None else jnp.sum(attention_mask, axis=1, dtype=jnp.int32)
            new_cache = KVCache(kv[0], kv[1], cache.lengths + added)
        return x, new_cache

    def mixed_hidden_states(self, tokens, active, chunk_ids, chunk_length, row, cache: KVCache):
        """One step of continuous batching that decodes and prefills together (chunked prefill).

        tokens: int32 `[W]`, the next token of cache rows 0..W-1; `active[W]` marks the rows that
          decode (an inactive row keeps its length; what it computes is ignored).
        chunk_ids: int32 `[1, C]`, the next `chunk_length` prompt tokens of cache row `row`
          (right-padded to C), written from that row's length on; `active[row]` must be False.
        Both groups run through every projection and MLP as one `[1, W + C]` batch of tokens
        (the decode rows ride on the chunk's matrix products), and each attends to its own cache
        rows exactly as a separate decode step and prefill chunk would (`KVCache` contract).
        Returns final-norm hidden states `[W, D]` (decode rows) and `[C, D]` (the chunk), and the
        cache with rows 0..W-1 advanced by `active` and row `row` by `chunk_length`.
        """
        cfg, mesh, rules = self.config, self.mesh, self.rules
        W, C = tokens.shape[0], chunk_ids.shape[1]
        decode_starts = cache.lengths[:W]
        row_start = jax.lax.dynamic_index_in_dim(cache.lengths, row, keepdims=True)  # [1]
        chunk_positions = row_start[:, None] + jnp.arange(C, dtype=jnp.int32)[None, :]
        x = self.model.embed_tokens(jnp.concatenate([tokens[None, :], chunk_ids], axis=1))
        x = constrain(x, ("batch", "seq", "act_embed"), mesh, rules)
        tables = [rope.rope_tables(cfg, p, self.dtype) for p in (decode_starts[None, :], chunk_positions)]
        cos, sin = (jnp.concatenate(parts, axis=1) for parts in zip(*tables))
        context = _MixedContext(self._cached_context(decode_starts, 1, cache.max_len),
                                self._cached_context(row_start, C, cache.max_len), W, jnp.asarray(row, jnp.int32))
        x, kv = self._run_layers(x, cos, sin, context, (cache.k, cache.v))
        lengths = cache.lengths.at[:W].add(active.astype(jnp.int32)).at[row].add(chunk_length)
        return x[0, :W], x[0, W:], KVCache(kv[0], kv[1], lengths)

    def _run_layers(self, x, cos, sin, context, kv):
        """Every decoder layer, then the final norm; returns (hidden states, cache arrays or None)."""
        cfg, mesh, rules = self.config, self.mesh, self.rules

        def run_layer(layer_graph, layer_state, h, kv, layer_idx, use_window):
            layer = nnx.merge(layer_graph, layer_state)
            h, kv = layer(h, cos, sin, context, kv, layer_idx, use_window)
            return constrain(h, ("batch", "seq", "act_embed"), mesh, rules), kv

        if self.remat != "none":
            run_layer = jax.checkpoint(run_layer, policy=REMAT_POLICIES[self.remat], prevent_cse=False,
                                       static_argnums=(0,))
        uses_window = tuple(w > 0 for w in cfg.layer_windows)
        if isinstance(self.model.layers, nnx.List):
            # Unrolled: each layer reads its own weight arrays (no per-step slice of a stacked array).
            for i, layer in enumerate(self.model.layers):
                x, kv = run_layer(*nnx.split(layer), x, kv, i, uses_window[i])
        else:
            layers_graph, layers_state = nnx.split(self.model.layers)
            same_window = len(set(uses_window)) == 1  # then the flag stays static inside the scan

            def body(carry, xs):
                use_window = uses_window[0] if same_window else xs[2]
                return run_layer(layers_graph, xs[0], *carry, xs[1], use_window), None

            layer_ids = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
            (x, kv), _ = jax.lax.scan(body, (x, kv), (layers_state, layer_ids, jnp.asarray(uses_window)))
        return self.model.norm(x), kv

    def _window(self) -> int:
        windows = {w for w in self.config.layer_windows if w}
        if len(windows) > 1:
            raise ValueError(f"layers use different sliding windows {sorted(windows)}; qwen-jax supports one")
        return windows.pop() if windows else 0

    def _cached_context(self, starts, q_len: int, max_len: int) -> _AttentionContext:
        """The context of `q_len` new tokens per row read against a cache whose rows start at `starts`."""
        backend = attention.select_backend(
            self.attention, q_len=q_len, kv_len=max_len, cached=True, dtype=self.dtype, head_dim=self.config.head_dim,
            platform=attention.platform_of(self.mesh))
        return _AttentionContext(backend, AttentionMask.cached(starts), self._window(), starts, True, self.mesh,
                                 self.rules)

    def _attention_context(self, shape, attention_mask, segment_ids, cache, empty_cache=False) -> _AttentionContext:
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids are for packed training batches, not cached decoding")
            if not empty_cache:
                return self._cached_context(cache.lengths, shape[1], cache.max_len)
            # Empty cache: real tokens come first in each row and sit at slots 0..T-1, so the plain
            # causal mask is the cache's mask (padding after a row's tokens is never seen by them).
            mask = AttentionMask.causal()
        else:
            if attention_mask is not None:  # padding gets its own segment: real tokens never see it
                segment_ids = attention_mask if segment_ids is None else jnp.where(attention_mask > 0, segment_ids, -1)
            mask = AttentionMask.causal(segment_ids)
        backend = attention.select_backend(
            self.attention, q_len=shape[1], kv_len=shape[1], cached=False, dtype=self.dtype,
            head_dim=self.config.head_dim, platform=attention.platform_of(self.mesh))
        return _AttentionContext(backend, mask, self._window(), None if cache is None else cache.lengths, False,
                                 self.mesh, self.rules)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Full-vocabulary float32 logits from final hidden states."""
        head = self.model.embed_tokens.embedding if self.lm_head is None else self.lm_head.weight
        head = head[...].astype(self.dtype)
        if attention.platform_of(self.mesh) == "cpu":  # the head is stored out-major, [vocab, embed]
            rows = hidden.shape[:-1]
            flat = rows_times_out_major(hidden.reshape(-1, hidden.shape[-1]), head, jnp.float32)
            logits = flat.reshape(*rows, head.shape[0])
        else:
            logits = jnp.einsum("BTD,VD->BTV", hidden, head, preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "seq", "vocab"), self.mesh, self.rules)

    def forward(self, input_ids, positions, attention_mask, *, segment_ids=None, cache=None, logits_to_keep: int = 0,
                empty_cache: bool = False):
        """The traced computation behind `__call__` (explicit positions and mask); `empty_cache` as in
        `hidden_states`."""
        hidden, new_cache = self.hidden_states(input_ids, positions, attention_mask, segment_ids=segment_ids, cache=cache,
                                               empty_cache=empty_cache)
        logits = self.logits(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return logits if cache is None else (logits, new_cache)

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))


def _traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _jitted_forward(model: "Qwen2ForCausalLM", state, input_ids, with_cache: bool, with_segments: bool,
                    logits_to_keep: int):
    """A compiled forward for this model structure and these shardings (explicit on a mesh)."""
    graphdef = nnx.graphdef(model)
    mesh, rules = model.mesh, model.rules
    static = (graphdef, with_cache, with_segments, logits_to_keep)
    if mesh is None:
        return _compile(*static, None)
    leaves, treedef = jax.tree.flatten(state)
    state_sh = tuple(leaf.sharding for leaf in leaves)
    tokens = named_sharding(("batch", "seq"), input_ids.shape, mesh, rules)
    kept = logits_to_keep or input_ids.shape[1]
    logits = named_sharding(("batch", "seq", "vocab"), (input_ids.shape[0], kept, model.config.vocab_size), mesh, rules)
    return _compile(*static, (treedef, state_sh, tokens, logits))


@functools.lru_cache(maxsize=64)
def _compile(graphdef, with_cache: bool, with_segments: bool, logits_to_keep: int, shardings):
    def fn(state, input_ids, positions, attention_mask, segment_ids, cache):
        model = nnx.merge(graphdef, state)
        return model.forward(input_ids, positions, attention_mask, segment_ids=segment_ids, cache=cache,
                             logits_to_keep=logits_to_keep)

    donate = ("cache",) if with_cache else ()
    if shardings is None:
        return jax.jit(fn, donate_argnames=donate)
    treedef, state_sh, tokens, logits = shardings
    state_tree = jax.tree.unflatten(treedef, state_sh)
    # The cache keeps whatever sharding the caller gave it (generation places it by logical axes).
    in_shardings = (state_tree, tokens, tokens, None, tokens if with_segments else None, None)
    out_shardings = (logits, None) if with_cache else logits
    return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnames=donate)


def create_model(
    config: Qwen2Config,
    *,
    dtype=None,
    param_dtype=None,
    mesh: Mesh | None = None,
    rules: ShardingRules = DEFAULT_RULES,
    seed: int = 0,
    remat: str = "none",
    attention: str = "auto",
) -> Qwen2ForCausalLM:
    """A randomly initialised model; on a mesh every parameter is created directly in its shards."""

    def build():
        return Qwen2ForCausalLM(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed),
                                mesh=mesh, rules=rules, remat=remat, attention=attention)

    if mesh is None:
        return build()
    abstract = nnx.eval_shape(build)
    graphdef, abstract_state = nnx.split(abstract)
    state = jax.jit(lambda: nnx.state(build()), out_shardings=state_shardings(abstract_state, mesh, rules))()
    return nnx.merge(graphdef, state)


def unstack_layers(model: Qwen2ForCausalLM, *, out_major: bool | None = None) -> Qwen2ForCausalLM:
    """The same model with one weight array per layer (`scan_layers=False`).

    A scanned step slices (copies) every layer's weights out of the stacked arrays before using
    them; unrolled layers read their own arrays, which matters for memory-bound batch-1 decode
    (see benchmarks/generate.py). Compile time then grows with depth. `model` is consumed: each
    stacked array is deleted once split, so peak memory is the model plus its largest parameter.

    out_major: store the float decoder kernels `[*out, *in]` (`set_out_major`), which XLA:CPU's
    decode products read faster (0.5B float32 decode step measured 19 % faster with 1 row, 25 %
    with 8). None (default): on CPU, for a float model. Writers (`save_model`, HF export) read
    the kernels back in the einsum layout, so checkpoints do not depend on it.
    """
    if isinstance(model.model.layers, nnx.List):
        return model
    out_major = default_out_major(model) if out_major is None else out_major

    def build():
        unrolled = quant.with_quantized_structure(Qwen2ForCausalLM(
            model.config, dtype=model.dtype, param_dtype=model.param_dtype, mesh=model.mesh, rules=model.rules,
            remat=model.remat, scan_layers=False, attention=model.attention), quant.model_quantization(model))
        set_decoder_out_major(unrolled, out_major)
        return unrolled

    abstract = nnx.eval_shape(build)
    graphdef, abstract_state = nnx.split(abstract)
    target = dict(nnx.to_flat_state(abstract_state))
    shardings = (None if model.mesh is None
                 else dict(nnx.to_flat_state(state_shardings(abstract_state, model.mesh, model.rules))))
    # Stacked kernel path (below `model.layers`) -> the permutation its layer slices take.
    perms = {(*path[1:], "kernel"): _kernel_permutation(len(linear.kernel.shape), linear.contracted, True)
             for path, linear in quant.decoder_linears(abstract) if linear.out_major and path[0] == 0}
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        value = variable.get_value()
        if path[:2] != ("model", "layers"):
            target[path].set_value(value)
            continue
        for i in range(model.config.num_hidden_layers):
            layer_path = ("model", "layers", i, *path[2:])
            sharding = None if shardings is None else shardings[layer_path].get_value()
            target[layer_path].set_value(_take_layer(value, i, sharding, perms.get(path[2:])))
        value.delete()
    return nnx.merge(graphdef, nnx.from_flat_state(target))


def _take_layer(stacked: jax.Array, i: int, sharding, perm=None) -> jax.Array:
    if sharding is None:
        return _take_layer_jit(stacked, i, perm)
    return jax.jit(_index_layer, static_argnums=2, out_shardings=sharding)(stacked, i, perm)


def _index_layer(stacked, i, perm=None):
    layer = jax.lax.dynamic_index_in_dim(stacked, i, 0, keepdims=False)
    return layer if perm is None else jnp.transpose(layer, perm)


_take_layer_jit = jax.jit(_index_layer, static_argnums=2)
