"""Weight-only quantization of the decoder projections: int8 per output channel, int4 in groups.

A quantized `Linear` keeps its parameter name `kernel`, now holding integers, plus a float32
`kernel_scale` (and, for asymmetric imports such as GPTQ-asym and AWQ, a `kernel_zero`)::

    W[o, i] = kernel_scale[o, g] * (q[o, i] - kernel_zero[o, g]),   g = i // group_size

Storage is **out-major and split into groups**: `kernel[*out, groups, group]` (`[*out, 1, in]`
per output channel), the transpose of the float einsum layout and, flattened, HF's own
`[out_features, in_features]`. Groups run along the flattened input, as in GPTQ and AWQ. Every
dimension keeps a logical axis name (the output axes', and the leading input axis' on the
group axis, or on the input axis per channel), so the sharding rules place a quantized kernel the
way they place the float one, each shard holding whole groups when the groups divide. int4
values are packed two per int8 byte: in each group the low nibble holds input k and the high
nibble input k + group/2 (signed, [-8, 7]). `jnp.int4` arrays would pack too, but XLA:CPU gives
them a layout that ahead-of-time compiled executables reject, and converting them was slower.

How the product runs depends on the backend (`matmul`), as measured on our 2-core CPU box
(benchmarks/quantized.py):
- CPU, few rows (decode): an elementwise multiply-and-reduce over each group's row. XLA fuses
  the int -> float conversion (and the nibble unpacking) into one reduction, so each weight is
  read once as one (or half a) byte: int8 runs at float32's speed. `x @ dequantized(w)` converts
  the whole matrix to float first and ran ~5x slower than float32; a group split made in the
  graph instead of stored ran ~6x slower.
- CPU with many rows (prefill, training) and GPU/TPU: dequantize, then one matmul. The conversion
  is amortised over the rows on CPU; GPU and TPU compilers fuse it into the matmul.
The product is wrapped in `jax.checkpoint`, so a backward pass (QLoRA) recomputes the dequantized
weight instead of keeping a float copy of every kernel as a residual.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_jax.errors import QuantizationError
from qwen_jax.model.linear import (
    KernelLayout,
    from_out_major,
    kernel_layout,
    set_out_major,
    set_quantized,
    to_out_major,
)
from qwen_jax.ops.attention.selection import platform_of
from qwen_jax.ops.quant import QuantScheme, dequantize_matrix, pack, quantize_matrix, unpack


def quantize_linear(linear, scheme: QuantScheme) -> None:
    """Quantize a float `Linear` in place (its kernel array is replaced)."""
    if linear.quantization is not None:
        raise QuantizationError(f"kernel is already quantized ({linear.quantization.name})")
    if linear.out_major:
        from qwen_jax.model.linear import set_out_major

        set_out_major(linear, False)  # quantization starts from the einsum layout
    layout = kernel_layout(linear)
    scheme.groups(layout.in_features, f"{linear.equation} kernel")
    sharding = getattr(linear.kernel.get_value(), "sharding", None)
    stored, scale = _quantize_kernel(linear.kernel.get_value(), layout, scheme)
    set_quantized(linear, scheme, stored, scale)
    if isinstance(sharding, jax.sharding.NamedSharding):
        _reshard((linear.kernel, linear.kernel_scale), sharding.mesh)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_kernel(kernel, layout: KernelLayout, scheme: QuantScheme):
    values, scale = quantize_matrix(to_out_major(kernel, layout), scheme)
    return pack(values, scheme).reshape(layout.values_shape(scheme)), scale.reshape(layout.scale_shape(scheme))


def _reshard(variables, mesh) -> None:
    from qwen_jax.sharding import named_sharding

    for variable in variables:
        axes = variable.get_metadata()["logical_axes"]
        variable.set_value(jax.device_put(variable.get_value(), named_sharding(axes, variable.shape, mesh)))


def dequantize_linear(linear, dtype) -> None:
    """Turn a quantized `Linear` back into a float one (einsum layout) in place."""
    scheme = linear.quantization
    if scheme is None:
        return
    layout = kernel_layout(linear)
    zero = None if linear.kernel_zero is None else linear.kernel_zero.get_value()
    sharding = getattr(linear.kernel.get_value(), "sharding", None)
    kernel = _dequantize_kernel(
        linear.kernel.get_value(), linear.kernel_scale.get_value(), zero, layout, scheme, jnp.dtype(dtype)
    )
    linear.kernel = nnx.Param(kernel, logical_axes=layout.float_axes())
    linear.kernel_scale = linear.kernel_zero = linear.kernel_layout = None
    linear.quantization = None
    if isinstance(sharding, jax.sharding.NamedSharding):
        _reshard((linear.kernel,), sharding.mesh)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _dequantize_kernel(stored, scale, zero, layout: KernelLayout, scheme: QuantScheme, dtype):
    rows = (*layout.layers, layout.out_features, -1)
    values = unpack(stored.reshape(*layout.layers, layout.out_features, *stored.shape[-2:]), scheme)
    zero = None if zero is None else zero.reshape(rows)
    return from_out_major(dequantize_matrix(values, scale.reshape(rows), zero, scheme, dtype), layout)


def decoder_linears(model) -> Iterator[tuple[tuple, Any]]:
    """(path, Linear) for every projection of the decoder layers (stacked or unrolled)."""
    from qwen_jax.model.linear import Linear

    for path, module in nnx.iter_modules(model.model.layers):
        if isinstance(module, Linear):
            yield path, module


def quantize_model(model, quantize: str | QuantScheme):
    """Quantize every decoder projection of `model` in place and return it.

    The embedding, the norms and the output head stay in the model's dtype. On a mesh, each
    quantized array is placed by its logical axes.
    """
    scheme = QuantScheme.parse(quantize)
    for _, linear in decoder_linears(model):
        quantize_linear(linear, scheme)
    model.quantization = scheme
    return model


def dequantize_model(model, dtype=None):
    """Turn every quantized decoder projection of `model` back into a float kernel (in place) and return it.

    dtype: of the float kernels (default: the model's parameter dtype).
    """
    for _, linear in decoder_linears(model):
        dequantize_linear(linear, dtype or model.param_dtype)
    model.quantization = None
    return model


def with_quantized_structure(model, scheme: QuantScheme | None):
    """`model` with every decoder kernel replaced by a zero-filled quantized one of `scheme` (in place).

    For building abstract models (`nnx.eval_shape`) whose parameters a loader then fills.
    """
    if scheme is None:
        return model
    for path, linear in decoder_linears(model):
        layout = kernel_layout(linear)
        scheme.groups(layout.in_features, ".".join(map(str, path)))
        scale = jnp.zeros(layout.scale_shape(scheme), jnp.float32)
        set_quantized(
            linear,
            scheme,
            jnp.zeros(layout.values_shape(scheme), jnp.int8),
            scale,
            jnp.zeros_like(scale) if scheme.zero_point else None,
        )
    model.quantization = scheme
    return model


def model_quantization(model) -> QuantScheme | None:
    """The quantization of a model's decoder projections (None: float)."""
    return getattr(model, "quantization", None)


def default_out_major(model: nnx.Module) -> bool:
    """Whether inference layers store their kernels out-major by default: a float model on CPU."""
    return model_quantization(model) is None and platform_of(model.mesh) == "cpu"


def set_decoder_out_major(model: nnx.Module, out_major: bool) -> None:
    """`set_out_major` on every decoder projection of an unrolled model, in place."""
    for _, linear in decoder_linears(model):
        set_out_major(linear, out_major)
