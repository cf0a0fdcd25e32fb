"""LoRA adapters for the model's einsum `Linear` projections.

`apply_lora(model, LoRAConfig(...))` attaches a `LoRA` module to each target projection
(`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`); `Linear` adds its
output `(alpha / rank) * B(A(dropout(x)))` to the frozen projection. The adapter weights are
`LoRAParam`s (a subclass of `nnx.Param`, so an optimizer can be restricted to them), stacked on
the leading `layers` axis like the kernels they adapt and carrying `logical_axes` so they shard on
the same mesh rules. `merge_lora(model)` folds the adapters into the kernels for export.

A is initialised from N(0, 1/fan_in) and B with zeros, so an adapted model starts out computing
exactly what the base model computes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax.model.causal_lm import Qwen2ForCausalLM
from qwen_jax.model.linear import Linear, kernel_layout
from qwen_jax.model.quantize import dequantize_model
from qwen_jax.sharding import named_sharding

# Target name -> path from the stacked decoder layer to the projection.
TARGET_PATHS = {
    "q_proj": ("self_attn", "q_proj"),
    "k_proj": ("self_attn", "k_proj"),
    "v_proj": ("self_attn", "v_proj"),
    "o_proj": ("self_attn", "o_proj"),
    "gate_proj": ("mlp", "gate_proj"),
    "up_proj": ("mlp", "up_proj"),
    "down_proj": ("mlp", "down_proj"),
}
_RANK_LETTER = "R"  # einsum letter of the adapter rank; unused by the model's equations


class LoRAParam(nnx.Param):
    """A trainable adapter weight (the only parameters that train in LoRA mode)."""


class LoRADropoutKey(nnx.Variable):
    """Raw PRNG key data `[layers, 2]` for adapter dropout, rewritten every train step."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
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


def _split_equation(equation: str) -> tuple[str, str, str, str]:
    """'BTD,DNH->BTNH' -> (x letters, contracted letters, kept x letters, kernel output letters)."""
    lhs, out = equation.split("->")
    x_letters, kernel_letters = lhs.split(",")
    contracted = "".join(c for c in kernel_letters if c in x_letters)
    produced = "".join(c for c in kernel_letters if c not in x_letters)
    if kernel_letters != contracted + produced or _RANK_LETTER in equation:
        raise ValueError(f"cannot attach LoRA to einsum {equation!r}")
    kept = "".join(c for c in x_letters if c not in contracted)
    return x_letters, contracted, kept, produced


class LoRA(nnx.Module):
    """The low-rank update of one (layer-stacked) `Linear`: x -> scale * (x A) B."""

    def __init__(self, linear: Linear, config: LoRAConfig, rng: np.random.Generator, *, param_dtype):
        x_letters, contracted, kept, produced = _split_equation(linear.equation)
        layout = kernel_layout(linear)  # float or quantized (QLoRA) kernel
        stacked = bool(layout.layers)
        in_shape, out_shape = layout.in_shape, layout.out_shape
        layer_shape, layer_axes = (layout.layers, ("layers",)) if stacked else ((), ())
        rank = config.rank
        # Drawn on the host: an eager jax.random call would compile once per adapter shape.
        a = rng.standard_normal((*layer_shape, *in_shape, rank), dtype=np.float32) / math.sqrt(math.prod(in_shape))
        a = jnp.asarray(a, param_dtype)
        b = jnp.zeros((*layer_shape, rank, *out_shape), param_dtype)
        self.lora_a = LoRAParam(a, logical_axes=(*layer_axes, *layout.in_axes, None))
        self.lora_b = LoRAParam(b, logical_axes=(*layer_axes, None, *layout.out_axes))
        self.down_equation = f"{x_letters},{contracted}{_RANK_LETTER}->{kept}{_RANK_LETTER}"
        self.up_equation = f"{kept}{_RANK_LETTER},{_RANK_LETTER}{produced}->{linear.equation.split('->')[1]}"
        layer_letter = "L" if stacked else ""
        self.merge_equation = (
            f"{layer_letter}{contracted}{_RANK_LETTER},{layer_letter}{_RANK_LETTER}{produced}"
            f"->{layer_letter}{contracted}{produced}"
        )
        self.scale = config.scale
        self.dropout = config.dropout
        self.deterministic = False  # True turns dropout off (evaluation)
        self.dtype = linear.dtype
        if config.dropout > 0:
            self.dropout_key = LoRADropoutKey(
                jnp.zeros((*layer_shape, 2), jnp.uint32), logical_axes=(*layer_axes, None)
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.dropout > 0 and not self.deterministic:
            key = jax.random.wrap_key_data(self.dropout_key[...])
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        h = jnp.einsum(self.down_equation, x, self.lora_a[...].astype(self.dtype))
        y = jnp.einsum(self.up_equation, h, self.lora_b[...].astype(self.dtype))
        return (y * self.scale).astype(self.dtype)

    def delta_kernel(self) -> jax.Array:
        """scale * A B in the kernel's layout, float32."""
        a, b = self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32)
        return self.scale * jnp.einsum(self.merge_equation, a, b)


def target_linears(model: Qwen2ForCausalLM, targets=tuple(TARGET_PATHS)) -> Iterator[tuple[str, Linear]]:
    """(target name, stacked Linear) for each target projection of the decoder layers."""
    for name in targets:
        module = model.model.layers
        for attr in TARGET_PATHS[name]:
            module = getattr(module, attr)
        yield name, module


def apply_lora(model: Qwen2ForCausalLM, config: LoRAConfig, *, seed: int = 0) -> Qwen2ForCausalLM:
    """Attach fresh adapters to the target projections (in place); returns the model.

    On a mesh, each adapter weight is placed by its logical axes (A shards like the kernel's
    input axes, B like its output axes).
    """
    for index, (name, linear) in enumerate(target_linears(model, config.targets)):
        if linear.lora is not None:
            raise ValueError(f"{name} already has a LoRA adapter")
        lora = LoRA(linear, config, np.random.default_rng([seed, index]), param_dtype=model.param_dtype)
        if model.mesh is not None:
            for variable in (lora.lora_a, lora.lora_b):
                axes = variable.get_metadata()["logical_axes"]
                variable.set_value(
                    jax.device_put(variable[...], named_sharding(axes, variable.shape, model.mesh, model.rules))
                )
        linear.lora = nnx.data(lora)  # `lora` starts as static None in Linear
    return model


def lora_modules(model: Qwen2ForCausalLM) -> list[LoRA]:
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
        merged = kernel.astype(jnp.float32) + linear.lora.delta_kernel()
        linear.kernel.set_value(merged.astype(kernel.dtype))
        linear.lora = None
    return model
