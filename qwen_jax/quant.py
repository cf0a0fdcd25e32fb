"""Weight-only quantization of the decoder projections: int8 per output channel, int4 in groups.

A quantized `Linear` keeps its parameter name `kernel`, now holding integer values, plus a float32
`kernel_scale` (and, for asymmetric imports such as AWQ, a `kernel_zero`)::

    W[o, i] = kernel_scale[o, g(i)] * (kernel[o, i] - kernel_zero[o, g(i)])

The kernel is stored **out-major** (`[*out, *in]`, the transpose of the float einsum layout, and
the layout of HF's own `[out_features, in_features]`), with every dimension keeping its logical
axis name, so the sharding rules place it exactly as they place the float kernel. Groups run
along the flattened input (`g(i) = i // group_size`, as in GPTQ and AWQ); without groups there is
one scale per output channel. int4 values use `jnp.int4`, which XLA stores two per byte.

How the product runs depends on the backend (`matmul`):
- CPU, few rows (decode): an elementwise multiply-and-reduce over the out-major rows. XLA fuses
  the int -> float conversion into the reduction, so each weight is read once as one (or half a)
  byte. The obvious `x @ dequantized(w)` converts the whole matrix to float first and ran ~5x
  slower than float32 on our 2-core box.
- CPU with many rows (prefill, training) and GPU/TPU: dequantize, then one matmul. The conversion
  is amortised over the rows on CPU; GPU and TPU compilers fuse it into the matmul.
The product is wrapped in `jax.checkpoint`, so a backward pass (QLoRA) recomputes the dequantized
weight instead of keeping a float copy of every kernel as a residual.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Above this many rows the CPU path dequantizes and runs one matmul (see the module docstring).
# Measured on the 2-core CPU box (benchmarks/quantized.py): the reduction wins up to batch 8.
CPU_REDUCTION_MAX_ROWS = 16
DEFAULT_GROUP_SIZE = 128
QUANTIZE_CHOICES = ("int8", "int4")
_SCHEME_NAME = re.compile(r"int(4|8)(?:-g(\d+))?")


class QuantizationError(ValueError):
    """A quantization scheme or quantized tensor that cannot be used (one-line message)."""


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """How a kernel is quantized.

    bits: 8 (values in [-128, 127]) or 4 ([-8, 7]). group_size: inputs sharing one scale along
    the flattened input dimension; None for one scale per output channel. zero_point: an
    asymmetric zero per (output, group) as GPTQ-asym and AWQ store; symmetric otherwise.
    """

    bits: int
    group_size: int | None = None
    zero_point: bool = False

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise QuantizationError(f"unsupported quantization: {self.bits} bits (qwen-jax supports 4 and 8)")
        if self.group_size is not None and self.group_size < 1:
            raise QuantizationError(f"bad quantization group size {self.group_size}")

    @classmethod
    def parse(cls, spec: "str | QuantScheme") -> "QuantScheme":
        """'int8' (per output channel), 'int4' (groups of 128), 'int4-g32', 'int8-g128'; or a scheme."""
        if isinstance(spec, QuantScheme):
            return spec
        match = _SCHEME_NAME.fullmatch(str(spec).strip().lower())
        if not match:
            raise QuantizationError(f"unknown quantization {spec!r}; choose from {', '.join(QUANTIZE_CHOICES)} "
                                    "(or int4-gN / int8-gN for groups of N inputs)")
        bits = int(match.group(1))
        group = int(match.group(2)) if match.group(2) else (DEFAULT_GROUP_SIZE if bits == 4 else None)
        return cls(bits, group)

    @property
    def name(self) -> str:
        default_group = DEFAULT_GROUP_SIZE if self.bits == 4 else None
        name = f"int{self.bits}"
        if self.group_size != default_group:
            name += f"-g{self.group_size}" if self.group_size else "-channel"
        return name + ("-asym" if self.zero_point else "")

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(jnp.int8 if self.bits == 8 else jnp.int4)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def groups(self, in_features: int, what: str = "kernel") -> int:
        """Scales per output channel for `in_features` inputs; the group size must divide them."""
        if self.group_size is None:
            return 1
        if in_features % self.group_size:
            raise QuantizationError(f"{what}: {in_features} inputs are not a multiple of the quantization group "
                                    f"size {self.group_size}; choose a group size that divides it (e.g. int4-g32)")
        return in_features // self.group_size

    def to_json(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "zero_point": self.zero_point}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "QuantScheme":
        try:
            return cls(int(data["bits"]), data.get("group_size"), bool(data.get("zero_point", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise QuantizationError(f"unreadable quantization record {data!r} ({e})") from None

    def bits_per_weight(self, scale_bytes: int = 4) -> float:
        """Stored bits per weight including scales (and zeros), for memory planning."""
        per_group = scale_bytes * 8 * (2 if self.zero_point else 1)
        return self.bits + (per_group / self.group_size if self.group_size else 0.0)


class QuantizedKernel(nnx.Param):
    """Integer values of a quantized kernel (out-major; see the module docstring). Never trained."""


# --------------------------------------------------------------------------- arrays
def quantize_matrix(w: jax.Array, scheme: QuantScheme) -> tuple[jax.Array, jax.Array]:
    """Symmetric absmax quantization of `w[..., out, in]` (float) along `in`.

    Returns (values `[..., out, in]` in `scheme.dtype`, float32 scales `[..., out]` or
    `[..., out, groups]`). Each scale is max|w| / qmax over its channel or group, so the error of
    every weight is at most half a step; an all-zero group gets scale 0.
    """
    if scheme.zero_point:
        raise QuantizationError("qwen-jax quantizes symmetrically; zero points come only from imported checkpoints")
    w = jnp.asarray(w, jnp.float32)
    *lead, out, inputs = w.shape
    groups = scheme.groups(inputs)
    grouped = w.reshape(*lead, out, groups, inputs // groups)
    scale = jnp.max(jnp.abs(grouped), axis=-1) / scheme.qmax
    safe = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(grouped / safe[..., None]), -scheme.qmax, scheme.qmax)
    values = q.astype(jnp.int8).astype(scheme.dtype).reshape(*lead, out, inputs)
    return values, (scale if scheme.group_size else scale[..., 0])


def dequantize_matrix(values: jax.Array, scale: jax.Array, zero: jax.Array | None, scheme: QuantScheme,
                      dtype=jnp.float32) -> jax.Array:
    """The float matrix `[..., out, in]` that quantized `values` stand for."""
    q = jnp.asarray(values).astype(jnp.float32)
    *lead, out, inputs = q.shape
    groups = scheme.groups(inputs)
    scale = jnp.asarray(scale, jnp.float32).reshape(*lead, out, groups, 1)
    q = q.reshape(*lead, out, groups, inputs // groups)
    if zero is not None:
        q = q - jnp.asarray(zero, jnp.float32).reshape(*lead, out, groups, 1)
    return (q * scale).reshape(*lead, out, inputs).astype(dtype)


def matmul(x: jax.Array, values: jax.Array, scale: jax.Array, zero: jax.Array | None, scheme: QuantScheme,
           dtype) -> jax.Array:
    """`x[rows, in] @ W.T` for quantized `W[out, in]`; returns `[rows, out]` in `dtype`.

    scale (and zero): `[out, groups]`, one group per channel for a scheme without groups.
    """
    dtype = jnp.dtype(dtype)
    dot = functools.partial(_dequantize_dot, scheme=scheme, dtype=dtype)
    if x.shape[0] > CPU_REDUCTION_MAX_ROWS:
        fn = dot
    else:
        reduce = functools.partial(_reduce_rows, scheme=scheme, dtype=dtype)
        fn = lambda *args: jax.lax.platform_dependent(*args, cpu=reduce, default=dot)  # noqa: E731
    # Recompute the dequantized weight in a backward pass instead of saving it (QLoRA memory).
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)(x, values, scale, zero)


def _dequantize_dot(x, values, scale, zero, *, scheme, dtype):
    w = dequantize_matrix(values, scale, zero, scheme, dtype)
    return jax.lax.dot_general(x.astype(dtype), w, (((1,), (1,)), ((), ())))


def _reduce_rows(x, values, scale, zero, *, scheme, dtype):
    """Multiply-and-reduce along the out-major rows, in float32 (CPU decode; see the module docstring).

    One row is computed from a 1-D x: with a unit batch dimension XLA:CPU picked a reduction
    order that ran 40x slower. Several rows put the batch after the output channel, so each
    weight row is converted once and reused for every x row.
    """
    x = x.astype(jnp.float32)
    q = values.astype(jnp.float32)
    rows, (out, inputs) = x.shape[0], values.shape
    groups = scale.shape[-1]
    if scheme.group_size is None:
        if rows == 1:
            acc = jnp.sum(q * x[0], axis=-1)[None]
        else:
            acc = jnp.sum(q[:, None, :] * x[None], axis=-1).T
        if zero is not None:
            acc = acc - jnp.sum(x, axis=-1, keepdims=True) * zero[:, 0]
        return (acc * scale[:, 0]).astype(dtype)
    qg = q.reshape(out, groups, inputs // groups)
    xg = x.reshape(rows, groups, inputs // groups)
    if rows == 1:
        partial = jnp.sum(qg * xg[0], axis=-1)[None]  # [1, out, groups]
    else:
        partial = jnp.transpose(jnp.sum(qg[:, None] * xg[None], axis=-1), (1, 0, 2))
    if zero is not None:
        partial = partial - jnp.sum(xg, axis=-1)[:, None, :] * zero
    return jnp.sum(partial * scale, axis=-1).astype(dtype)


@dataclasses.dataclass(frozen=True)
class QuantizedMatrix:
    """One projection's quantized weight in HF orientation `[out, in]` (how readers hand it over).

    W[o, i] = scale[o, g] * (values[o, i] - zero[o, g]), g = i // (in / groups); values are signed
    (int8, or ml_dtypes.int4 for 4 bits), scale and zero float32 `[out, groups]`, zero None when
    symmetric.
    """

    values: np.ndarray
    scale: np.ndarray
    zero: np.ndarray | None
    scheme: QuantScheme

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    def dequantize(self) -> np.ndarray:
        """The float32 matrix `[out, in]`."""
        zero = None if self.zero is None else self.zero
        return np.asarray(_dequantize_on_cpu(self.values, self.scale, zero, self.scheme))


def quantize_host(matrix: np.ndarray, scheme: QuantScheme, what: str = "kernel") -> QuantizedMatrix:
    """Quantize a float matrix `[out, in]` on the host (XLA on the CPU: fused and multi-threaded)."""
    scheme.groups(matrix.shape[1], what)
    values, scale = _quantize_on_cpu(np.asarray(matrix), scheme)
    scale = np.asarray(scale).reshape(matrix.shape[0], -1)
    return QuantizedMatrix(np.asarray(values), scale, None, scheme)


_quantize_jit = jax.jit(quantize_matrix, static_argnums=1)
_dequantize_jit = jax.jit(dequantize_matrix, static_argnums=(3, 4))


def _quantize_on_cpu(matrix, scheme):
    return _quantize_jit(jax.device_put(matrix, jax.devices("cpu")[0]), scheme)


def _dequantize_on_cpu(values, scale, zero, scheme):
    cpu = jax.devices("cpu")[0]
    zero = None if zero is None else jax.device_put(zero, cpu)
    return _dequantize_jit(jax.device_put(values, cpu), jax.device_put(scale, cpu), zero, scheme, jnp.float32)


# --------------------------------------------------------------------------- modules
@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """Shapes and logical axes of a `Linear` kernel, split into the parts quantization needs."""

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

    def values_shape(self) -> tuple[int, ...]:
        return (*self.layers, *self.out_shape, *self.in_shape)

    def values_axes(self) -> tuple[str | None, ...]:
        return (*(("layers",) if self.layers else ()), *self.out_axes, *self.in_axes)

    def scale_shape(self, scheme: QuantScheme) -> tuple[int, ...]:
        groups = (scheme.groups(self.in_features),) if scheme.group_size else ()
        return (*self.layers, *self.out_shape, *groups)

    def scale_axes(self, scheme: QuantScheme) -> tuple[str | None, ...]:
        # The group axis takes the name of the leading input axis: it then shards exactly like the
        # values' input axis whenever the groups divide (each shard holds whole groups).
        groups = (self.in_axes[0],) if scheme.group_size else ()
        return (*(("layers",) if self.layers else ()), *self.out_axes, *groups)


def kernel_layout(linear) -> KernelLayout:
    """The layout of a `Linear`'s kernel (float or quantized)."""
    kernel = linear.kernel
    axes = tuple(kernel.get_metadata()["logical_axes"])
    stacked = axes[0] == "layers"
    lead = 1 if stacked else 0
    shape = tuple(kernel.shape)
    n_in = linear.contracted
    if linear.quantization is None:  # einsum layout [*in, *out]
        in_shape, out_shape = shape[lead:lead + n_in], shape[lead + n_in:]
        in_axes, out_axes = axes[lead:lead + n_in], axes[lead + n_in:]
    else:  # out-major [*out, *in]
        split = len(shape) - n_in
        in_shape, out_shape = shape[split:], shape[lead:split]
        in_axes, out_axes = axes[split:], axes[lead:split]
    return KernelLayout(shape[:lead], in_shape, out_shape, in_axes, out_axes)


def to_out_major(kernel: jax.Array, layout: KernelLayout) -> jax.Array:
    """A float einsum-layout kernel `[L?, *in, *out]` as the matrix `[L?, out, in]`."""
    lead = len(layout.layers)
    matrix = kernel.reshape(*layout.layers, layout.in_features, layout.out_features)
    return jnp.swapaxes(matrix, lead, lead + 1)


def from_out_major(matrix: jax.Array, layout: KernelLayout) -> jax.Array:
    """The inverse of `to_out_major`: `[L?, out, in]` -> einsum layout `[L?, *in, *out]`."""
    lead = len(layout.layers)
    return jnp.swapaxes(matrix, lead, lead + 1).reshape(*layout.layers, *layout.in_shape, *layout.out_shape)


def set_quantized(linear, scheme: QuantScheme, values, scale, zero=None) -> None:
    """Make `linear` quantized with these arrays (out-major values; shapes from its current kernel)."""
    layout = kernel_layout(linear)
    expected = {"values": layout.values_shape(), "scale": layout.scale_shape(scheme)}
    if zero is not None:
        expected["zero"] = expected["scale"]
    for name, array in (("values", values), ("scale", scale), ("zero", zero)):
        if name in expected and tuple(array.shape) != expected[name]:
            raise QuantizationError(f"quantized {name} shape {tuple(array.shape)} != expected {expected[name]}")
    if (zero is not None) != scheme.zero_point:
        raise QuantizationError(f"scheme {scheme.name} and the zero points given disagree")
    linear.kernel = QuantizedKernel(values, logical_axes=layout.values_axes())
    linear.kernel_scale = nnx.Param(scale, logical_axes=layout.scale_axes(scheme))
    linear.kernel_zero = None if zero is None else nnx.Param(zero, logical_axes=layout.scale_axes(scheme))
    linear.quantization = scheme


def quantize_linear(linear, scheme: QuantScheme) -> None:
    """Quantize a float `Linear` in place (its kernel array is replaced)."""
    if linear.quantization is not None:
        raise QuantizationError(f"kernel is already quantized ({linear.quantization.name})")
    layout = kernel_layout(linear)
    scheme.groups(layout.in_features, f"{linear.equation} kernel")
    sharding = getattr(linear.kernel.get_value(), "sharding", None)
    values, scale = _quantize_kernel(linear.kernel.get_value(), layout, scheme)
    set_quantized(linear, scheme, values, scale)
    if isinstance(sharding, jax.sharding.NamedSharding):
        _reshard(linear, sharding.mesh)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_kernel(kernel, layout: KernelLayout, scheme: QuantScheme):
    values, scale = quantize_matrix(to_out_major(kernel, layout), scheme)
    return values.reshape(layout.values_shape()), scale.reshape(layout.scale_shape(scheme))


def _reshard(linear, mesh) -> None:
    from qwen_jax.sharding import named_sharding

    for variable in (linear.kernel, linear.kernel_scale):
        axes = variable.get_metadata()["logical_axes"]
        variable.set_value(jax.device_put(variable.get_value(), named_sharding(axes, variable.shape, mesh)))


def dequantize_linear(linear, dtype) -> None:
    """Turn a quantized `Linear` back into a float one (einsum layout) in place."""
    if linear.quantization is None:
        return
    layout = kernel_layout(linear)
    zero = None if linear.kernel_zero is None else linear.kernel_zero.get_value()
    matrix = dequantize_matrix(linear.kernel.get_value(), linear.kernel_scale.get_value(), zero,
                               linear.quantization, dtype)
    sharding = getattr(linear.kernel.get_value(), "sharding", None)
    kernel = from_out_major(matrix.reshape(*layout.layers, layout.out_features, layout.in_features), layout)
    axes = (*(("layers",) if layout.layers else ()), *layout.in_axes, *layout.out_axes)
    linear.kernel = nnx.Param(kernel, logical_axes=axes)
    linear.kernel_scale = None
    linear.kernel_zero = None
    linear.quantization = None
    if isinstance(sharding, jax.sharding.NamedSharding):
        from qwen_jax.sharding import named_sharding

        linear.kernel.set_value(jax.device_put(kernel, named_sharding(axes, kernel.shape, sharding.mesh)))


def decoder_linears(model) -> Iterator[tuple[tuple, Any]]:
    """(path, Linear) for every projection of the decoder layers (stacked or unrolled)."""
    from qwen_jax.model import Linear

    for path, module in nnx.iter_modules(model.model.layers):
        if isinstance(module, Linear):
            yield path, module


def quantize_model(model, quantize: "str | QuantScheme"):
    """Quantize every decoder projection of `model` in place and return it.

    The embedding, the norms and the output head stay in the model's dtype. On a mesh, each
    quantized array is placed by its logical axes.
    """
    scheme = QuantScheme.parse(quantize)
    for _, linear in decoder_linears(model):
        quantize_linear(linear, scheme)
    model.quantization = scheme
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
        set_quantized(linear, scheme, jnp.zeros(layout.values_shape(), scheme.dtype), scale,
                      jnp.zeros_like(scale) if scheme.zero_point else None)
    model.quantization = scheme
    return model


def model_quantization(model) -> QuantScheme | None:
    return getattr(model, "quantization", None)


# --------------------------------------------------------------------------- accounting
def stored_bits(dtype) -> int:
    """Bits one element of `dtype` occupies on a device (int4 is packed two per byte)."""
    dtype = jnp.dtype(dtype)
    return 4 if dtype in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)) else dtype.itemsize * 8


def array_bytes(shape, dtype) -> int:
    return (math.prod(shape) * stored_bits(dtype) + 7) // 8


def host_array(values: jax.Array) -> np.ndarray:
    """A device array on the host (int4 as ml_dtypes.int4)."""
    return np.asarray(jax.device_get(values))
