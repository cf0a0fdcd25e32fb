"""Qwen2.5 in Flax NNX, mirroring HF transformers' `Qwen2ForCausalLM` module for module.

Layout (einsum letters): B batch, T query length, S key length, D embed, N query heads,
K kv heads, G query heads per kv head, H head_dim, F mlp, V vocab, L layers.

Decoder layers are stored stacked on a leading `layers` axis and run with `jax.lax.scan`, so
compile time does not grow with depth. Every parameter carries `logical_axes` metadata that
`qwen_jax.sharding` maps onto a mesh.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_jax.errors import QuantizationError
from qwen_jax.ops.cpu import release_freed_host_memory, rows_times_out_major
from qwen_jax.ops.quant import QuantScheme, matmul


def _param(rngs: nnx.Rngs | None, init, shape, axes, dtype, layers: int | None) -> nnx.Param:
    if layers is not None:
        shape, axes = (layers, *shape), ("layers", *axes)
    value = init(rngs.params() if rngs is not None else jax.random.key(0), shape, dtype)
    return nnx.Param(value, logical_axes=axes)


_normal = jax.nn.initializers.normal(0.02)


_zeros = jax.nn.initializers.zeros


_ones = jax.nn.initializers.ones


class Linear(nnx.Module):
    """A projection in einsum layout (`kernel` axes name every dimension), optional bias."""

    def __init__(
        self,
        equation: str,
        kernel_shape,
        kernel_axes,
        bias_shape=None,
        bias_axes=None,
        *,
        dtype,
        param_dtype,
        layers=None,
        rngs=None,
    ):
        self.equation = equation
        x_letters, kernel_letters = equation.split("->")[0].split(",")
        self.contracted = sum(c in kernel_letters for c in x_letters)  # x's trailing dims = kernel's leading
        if x_letters[len(x_letters) - self.contracted :] != kernel_letters[: self.contracted]:
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
        y = matmul(
            x.reshape(math.prod(rows), -1),
            stored.reshape(out, *stored.shape[-2:]),
            self.kernel_scale[...].reshape(out, -1),
            zero,
            self.quantization,
            self.dtype,
        )
        return y.reshape(*rows, *out_shape)


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


def set_out_major(linear: Linear, out_major: bool) -> None:
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


def einsum_kernel(linear: Linear, value: jax.Array) -> jax.Array:
    """A float kernel array of `linear` in the einsum layout `[*in, *out]`, however it is stored."""
    if not linear.out_major:
        return value
    return jnp.transpose(value, _kernel_permutation(value.ndim, linear.contracted, False))


class QuantizedKernel(nnx.Param):
    """Stored integer values of a quantized kernel (see the module docstring). Never trained."""


# --------------------------------------------------------------------------- modules
@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """A `Linear` kernel's float (einsum-layout) shape and axis names, split into the parts quantization needs."""

    layers: tuple[int, ...]  # (L,) for a layer-stacked kernel, else ()
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_axes: tuple[str | None, ...]
    out_axes: tuple[str | None, ...]

    @property
    def in_features(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_shape)

    @property
    def layer_axes(self) -> tuple[str, ...]:
        return ("layers",) if self.layers else ()

    def values_shape(self, scheme: QuantScheme) -> tuple[int, ...]:
        return (*self.layers, *self.out_shape, *scheme.stored_shape(self.in_features))

    def values_axes(self, scheme: QuantScheme) -> tuple[str | None, ...]:
        # The input's leading axis name goes to the group axis (whole groups per shard), or, per
        # output channel, to the input axis itself.
        groups, _ = scheme.stored_shape(self.in_features)
        inputs = (self.in_axes[0], None) if groups > 1 else (None, self.in_axes[0])
        return (*self.layer_axes, *self.out_axes, *inputs)

    def scale_shape(self, scheme: QuantScheme) -> tuple[int, ...]:
        return (*self.layers, *self.out_shape, scheme.groups(self.in_features))

    def scale_axes(self, scheme: QuantScheme) -> tuple[str | None, ...]:
        return self.values_axes(scheme)[:-1]

    def float_axes(self) -> tuple[str | None, ...]:
        return (*self.layer_axes, *self.in_axes, *self.out_axes)


def kernel_layout(linear) -> KernelLayout:
    """The float layout of a `Linear`'s kernel (recorded when the kernel was quantized)."""
    if linear.quantization is not None:
        return linear.kernel_layout
    kernel = linear.kernel
    axes = tuple(kernel.get_metadata()["logical_axes"])
    lead = 1 if axes[0] == "layers" else 0
    shape, n_in = tuple(kernel.shape), linear.contracted
    if linear.out_major:  # stored [*out, *in] (`qwen_jax.model.set_out_major`)
        n_out = len(shape) - lead - n_in
        ins, outs = slice(lead + n_out, None), slice(lead, lead + n_out)
    else:
        ins, outs = slice(lead, lead + n_in), slice(lead + n_in, None)
    return KernelLayout(shape[:lead], shape[ins], shape[outs], axes[ins], axes[outs])


def to_out_major(kernel, layout: KernelLayout):
    """A float einsum-layout kernel `[L?, *in, *out]` as the matrix `[L?, out, in]`."""
    lead = len(layout.layers)
    matrix = kernel.reshape(*layout.layers, layout.in_features, layout.out_features)
    return jnp.swapaxes(matrix, lead, lead + 1)


def from_out_major(matrix, layout: KernelLayout):
    """The inverse of `to_out_major`: `[L?, out, in]` -> einsum layout `[L?, *in, *out]`."""
    lead = len(layout.layers)
    return jnp.swapaxes(matrix, lead, lead + 1).reshape(*layout.layers, *layout.in_shape, *layout.out_shape)


def set_quantized(linear, scheme: QuantScheme, stored, scale, zero=None) -> None:
    """Make float `linear` quantized with these arrays (`stored`: `KernelLayout.values_shape`)."""
    layout = kernel_layout(linear)
    expected = {"values": layout.values_shape(scheme), "scale": layout.scale_shape(scheme)}
    expected["zero"] = expected["scale"]
    for name, array in (("values", stored), ("scale", scale), ("zero", zero)):
        if array is not None and tuple(array.shape) != expected[name]:
            raise QuantizationError(f"quantized {name} shape {tuple(array.shape)} != expected {expected[name]}")
    if (zero is not None) != scheme.zero_point:
        raise QuantizationError(f"scheme {scheme.name} and the zero points given disagree")
    linear.kernel = QuantizedKernel(stored, logical_axes=layout.values_axes(scheme))
    linear.kernel_scale = nnx.Param(scale, logical_axes=layout.scale_axes(scheme))
    linear.kernel_zero = None if zero is None else nnx.Param(zero, logical_axes=layout.scale_axes(scheme))
    linear.kernel_layout = layout
    linear.quantization = scheme
