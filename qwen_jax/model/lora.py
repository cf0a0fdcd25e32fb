"""LoRA adapters for the model's einsum `Linear` projections.

`apply_lora(model, LoRAConfig(...))` attaches a `LoRA` module (declared with `Linear` in
`qwen_jax.model.linear`) to each target projection (`q_proj`, `k_proj`, `v_proj`, `o_proj`,
`gate_proj`, `up_proj`, `down_proj`); `Linear` adds its output `(alpha / rank) * B(A(dropout(x)))`
to the frozen projection's. The adapter weights are `LoRAParam`s (a subclass of `nnx.Param`, so an
optimizer can be restricted to them), stacked on the leading `layers` axis like the kernels they
adapt and carrying `logical_axes` so they shard on the same mesh rules. `merge_lora(model)` folds
the adapters into the kernels for export.

An adapted model is an ordinary model: it runs forward, generates and unrolls
(`qwen_jax.model.unstack_layers`) with its adapters unmerged, on float or quantized (QLoRA) bases.
Every function here works on stacked and unrolled layers alike.

A is initialised from N(0, 1/fan_in) and B with zeros, so an adapted model starts out computing
exactly what the base model computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax.model.causal_lm import Qwen2ForCausalLM
from qwen_jax.model.linear import Linear, LoRA, LoRADropoutKey, LoRAParam
from qwen_jax.model.quantize import dequantize_model
from qwen_jax.sharding import place_variables

__all__ = [
    "TARGET_PATHS",
    "LoRA",
    "LoRAConfig",
    "LoRADropoutKey",
    "LoRAParam",
    "adapters_disabled",
    "apply_lora",
    "lora_modules",
    "merge_lora",
    "set_lora_deterministic",
    "set_lora_dropout_keys",
    "target_linears",
]

# Target name -> path from a decoder layer to the projection.
TARGET_PATHS = {
    "q_proj": ("self_attn", "q_proj"),
    "k_proj": ("self_attn", "k_proj"),
    "v_proj": ("self_attn", "v_proj"),
    "o_proj": ("self_attn", "o_proj"),
    "gate_proj": ("mlp", "gate_proj"),
    "up_proj": ("mlp", "up_proj"),
    "down_proj": ("mlp", "down_proj"),
}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Adapters of `rank` on the `targets` projections, output scaled by `alpha / rank`, `dropout` on their inputs."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(TARGET_PATHS)

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(TARGET_PATHS))
        if unknown or not self.targets:
            raise ValueError(f"unknown LoRA targets {unknown or '(none given)'}; choose from {', '.join(TARGET_PATHS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _layers(model: Qwen2ForCausalLM) -> list[nnx.Module]:
    """The decoder layer modules: the one stacked module, or each unrolled layer."""
    layers = model.model.layers
    return list(layers) if isinstance(layers, nnx.List) else [layers]


def _linear_at(layer: nnx.Module, name: str) -> Linear:
    module = layer
    for attr in TARGET_PATHS[name]:
        module = getattr(module, attr)
    return module


def target_linears(model: Qwen2ForCausalLM, targets=tuple(TARGET_PATHS)) -> Iterator[tuple[str, Linear]]:
    """(target name, Linear) for each target projection of the decoder layers: one stacked Linear
    per target, or, for unrolled layers, one per target and layer (layer by layer)."""
    for layer in _layers(model):
        for name in targets:
            yield name, _linear_at(layer, name)


def apply_lora(model: Qwen2ForCausalLM, config: LoRAConfig, *, seed: int = 0) -> Qwen2ForCausalLM:
    """Attach fresh adapters to the target projections (in place); returns the model.

    Each target's A is drawn for all layers at once, so stacked and unrolled models get the same
    adapters for the same seed. On a mesh, each adapter weight is placed by its logical axes (A
    shards like the kernel's input axes, B like its output axes).
    """
    layers = _layers(model)
    for index, name in enumerate(config.targets):
        linears = [_linear_at(layer, name) for layer in layers]
        layouts = [linear.layout for linear in linears]  # float or quantized (QLoRA) kernels
        if any(linear.lora is not None for linear in linears):
            raise ValueError(f"{name} already has a LoRA adapter")
        depth = layouts[0].layers if len(linears) == 1 else (len(linears),)
        shape = (*depth, *layouts[0].in_shape, config.rank)
        # Drawn on the host: an eager jax.random call would compile once per adapter shape.
        rng = np.random.default_rng([seed, index])
        a = rng.standard_normal(shape, dtype=np.float32) / math.sqrt(layouts[0].in_features)
        for i, (linear, layout) in enumerate(zip(linears, layouts)):
            lora = LoRA(
                linear.equation,
                layout,
                rank=config.rank,
                scale=config.scale,
                dropout=config.dropout,
                dtype=linear.dtype,
                param_dtype=model.param_dtype,
                a=a if len(linears) == 1 else a[i],
            )
            place_variables((lora.lora_a, lora.lora_b), model.mesh, model.rules)
            linear.lora = lora
    return model


def lora_modules(model: Qwen2ForCausalLM) -> list[LoRA]:
    """Every adapter of the model (stacked: one per target; unrolled: one per target and layer)."""
    return [linear.lora for _, linear in target_linears(model) if linear.lora is not None]


def set_lora_dropout_keys(model: Qwen2ForCausalLM, key: jax.Array) -> None:
    """Give every adapter (and every layer of it) its own dropout key derived from `key`."""
    for index, lora in enumerate(lora_modules(model)):
        if lora.dropout > 0:
            shape = lora.dropout_key.shape
            layer_key = jax.random.fold_in(key, index)
            keys = jax.random.split(layer_key, shape[0]) if len(shape) == 2 else layer_key
            lora.dropout_key.set_value(jax.random.key_data(keys))


def set_lora_deterministic(model: Qwen2ForCausalLM, deterministic: bool) -> None:
    """Turn adapter dropout off (evaluation) or on (training)."""
    for lora in lora_modules(model):
        lora.deterministic = deterministic


@contextlib.contextmanager
def adapters_disabled(model: Qwen2ForCausalLM) -> Iterator[Qwen2ForCausalLM]:
    """Within the block the model computes what its base model computes (every adapter switched off,
    nothing copied): the reference policy of preference and RL training with LoRA. Works inside a
    traced function too (the switch is a static attribute read when the forward is traced)."""
    adapters = lora_modules(model)
    saved = [lora.enabled for lora in adapters]
    for lora in adapters:
        lora.enabled = False
    try:
        yield model
    finally:
        for lora, enabled in zip(adapters, saved):
            lora.enabled = enabled


def merge_lora(model: Qwen2ForCausalLM) -> Qwen2ForCausalLM:
    """Fold every adapter into its kernel (kernel += scale * A B) and remove it; in place.

    A quantized (QLoRA) kernel is dequantized first: the merged model is a float model in the
    model's parameter dtype (quantize it again on loading or converting if wanted).
    """
    adapted = [linear for _, linear in target_linears(model) if linear.lora is not None]
    if any(linear.quantization is not None for linear in adapted):
        dequantize_model(model)  # every projection, so the model has one kind of kernel
    for linear in adapted:
        kernel = linear.kernel[...]
        merged = linear.einsum_kernel(kernel).astype(jnp.float32) + linear.lora.delta_kernel()
        linear.kernel.set_value(linear.stored_kernel(merged.astype(kernel.dtype)))
        linear.lora = None
    return model
