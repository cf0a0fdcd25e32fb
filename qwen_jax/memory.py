"""Per-device memory by arithmetic: how a model, its optimizer state and a KV cache land on a mesh.

Uses the same logical-axis rules as real placement (`qwen_jax.sharding`), including the
replication of axes that do not divide, on a mesh described only by its axis sizes: plan a
TPU v5p-64 or an 8xH100 box from a laptop.
"""

from __future__ import annotations

import dataclasses
import math
import types

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_jax.config import Qwen2Config
from qwen_jax.model.causal_lm import Qwen2ForCausalLM
from qwen_jax.model.kv_cache import KVCache
from qwen_jax.model.linear import QuantizedParam
from qwen_jax.model.quantize import with_quantized_structure
from qwen_jax.ops.attention.chunked import BLOCK_KV, BLOCK_Q
from qwen_jax.ops.quant import QuantScheme
from qwen_jax.sharding import DEFAULT_RULES, ShardingRules, logical_to_spec

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device (the most loaded device) for each component."""

    mesh: dict[str, int]
    params: int
    grads: int
    optimizer: int
    kv_cache: int
    activations: int = 0  # estimated peak of one chunked-prefill call (inference), when asked for

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.kv_cache + self.activations

    def __str__(self) -> str:
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items())
        parts = [f"params {self.params / GiB:.2f}"]
        if self.grads:
            parts.append(f"grads {self.grads / GiB:.2f}")
        if self.optimizer:
            parts.append(f"optimizer {self.optimizer / GiB:.2f}")
        if self.kv_cache:
            parts.append(f"kv cache {self.kv_cache / GiB:.2f}")
        if self.activations:
            parts.append(f"prefill activations ~{self.activations / GiB:.2f}")
        return f"[{mesh}] " + " + ".join(parts) + f" = {self.total / GiB:.2f} GiB per device"


def _mesh_of_sizes(data: int, fsdp: int, tensor: int):
    # logical_to_spec only reads `.shape`, so a plain namespace stands in for a Mesh.
    return types.SimpleNamespace(shape={"data": data, "fsdp": fsdp, "tensor": tensor})


def _shard_elements(shape, logical_axes, mesh, rules) -> int:
    spec = logical_to_spec(logical_axes, shape, mesh, rules)
    elements = 1
    for dim, axes in zip(shape, spec):
        names = () if axes is None else ((axes,) if isinstance(axes, str) else axes)
        elements *= dim // math.prod(mesh.shape[a] for a in names)
    return elements


def plan_memory(
    config: Qwen2Config,
    *,
    data: int = 1,
    fsdp: int = 1,
    tensor: int = 1,
    param_dtype=jnp.bfloat16,
    training: bool = False,
    optimizer_dtype=jnp.float32,
    master_weights: bool = False,
    batch: int = 0,
    max_len: int = 0,
    cache_dtype=jnp.bfloat16,
    prefill_chunk: int = 0,
    rules: ShardingRules = DEFAULT_RULES,
    quantize: str | QuantScheme | None = None,
) -> MemoryPlan:
    """Per-device bytes of parameters (+ grads and AdamW state when `training`) and a KV cache.

    training: gradients in `param_dtype` plus two AdamW moments in `optimizer_dtype`, and a
    float32 master copy when `master_weights` (bf16 compute with float32 masters). The KV cache is
    `batch` x `max_len` tokens (the context you plan for), sharded by the cache's logical axes.
    prefill_chunk: also estimate the activations of one prefill call of `batch` x `prefill_chunk`
    tokens with chunked attention (generation's default chunk is 2,048 tokens on CPU, the whole
    prompt on a GPU/TPU); with chunked prefill they do not grow with the prompt. Training
    activations are not counted: they depend on remat policy and sequence length more than on the
    mesh. quantize: 'int8' or 'int4' decoder projections (`qwen_jax.model.quantize`): their integer
    values and float32 scales are counted as stored (int4 two per byte); being frozen
    (`QuantizedParam`), they get no gradients or optimizer state.
    """
    mesh = _mesh_of_sizes(data, fsdp, tensor)
    scheme = None if quantize is None else QuantScheme.parse(quantize)
    abstract = nnx.eval_shape(
        lambda: with_quantized_structure(Qwen2ForCausalLM(config, dtype=param_dtype, param_dtype=param_dtype), scheme)
    )
    params = trained_elements = 0
    for _, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        axes = variable.get_metadata()["logical_axes"]
        elements = _shard_elements(variable.shape, axes, mesh, rules)
        params += elements * jnp.dtype(variable.dtype).itemsize
        if not isinstance(variable, QuantizedParam):
            trained_elements += elements
    o_bytes = jnp.dtype(optimizer_dtype).itemsize
    grads = trained_elements * jnp.dtype(param_dtype).itemsize if training else 0
    optimizer = trained_elements * (2 * o_bytes + (4 if master_weights else 0)) if training else 0
    kv_cache = 0
    if batch and max_len:
        shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
        kv_cache = 2 * _shard_elements(shape, KVCache.logical_axes(), mesh, rules) * jnp.dtype(cache_dtype).itemsize
    activations = 0
    if batch and prefill_chunk:
        activations = prefill_activation_bytes(config, batch, prefill_chunk, param_dtype, mesh, rules)
    return MemoryPlan({"data": data, "fsdp": fsdp, "tensor": tensor}, params, grads, optimizer, kv_cache, activations)


def prefill_activation_bytes(config: Qwen2Config, batch: int, chunk: int, dtype, mesh, rules=DEFAULT_RULES) -> int:
    """Estimated peak activation bytes per device of one prefill call of `batch` x `chunk` tokens.

    Live at once: the residual stream (twice), then the larger of the attention phase (q/k/v, the
    blocked queries, three float32 score blocks of `BLOCK_Q` x `BLOCK_KV` per query head)
    and the MLP phase (gate, up and their product), plus the last position's float32 logits.
    """
    size = jnp.dtype(dtype).itemsize
    D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    N, K, H = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    block_q, block_kv = min(BLOCK_Q, chunk), BLOCK_KV

    def per_device(shape, axes) -> int:
        return _shard_elements(shape, axes, mesh, rules)

    residual = 2 * per_device((batch, chunk, D), ("batch", "seq", "act_embed")) * size
    heads = per_device((batch, chunk, N, H), ("batch", "seq", "q_heads", "head_dim"))
    attention_phase = (
        3 * heads + 2 * per_device((batch, chunk, K, H), ("batch", "seq", "kv_heads", "head_dim"))
    ) * size
    attention_phase += 3 * per_device((batch, N, block_q, block_kv), ("batch", "q_heads", None, None)) * 4
    mlp_phase = 3 * per_device((batch, chunk, F), ("batch", "seq", "mlp")) * size
    logits = per_device((batch, V), ("batch", "vocab")) * 4
    return residual + max(attention_phase, mlp_phase) + logits


def measured_bytes_per_device(tree) -> dict[jax.Device, int]:
    """Actual bytes each device holds for the arrays in `tree` (a model state, a cache...)."""
    out: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
