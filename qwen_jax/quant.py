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
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def packed(self) -> bool:
        """int4: two values per stored int8."""
        return self.bits == 4

    def groups(self, in_features: int, what: str = "kernel") -> int:
        """Scales per output channel for `in_features` inputs; the group size must divide them."""
        group = self.group_size or in_features
        if in_features % group or (self.packed and group % 2):
            raise QuantizationError(f"{what}: {in_features} inputs are not a multiple of the quantization group "
                                    f"size {group}{' (an even number for int4)' if self.packed else ''}; choose a "
                                    "group size that divides it (e.g. int4-g32)")
        return in_features // group

    def stored_shape(self, in_features: int) -> tuple[int, int]:
        """(groups, stored values per group) of one output channel's `in_features` inputs."""
        groups = self.groups(in_features)
        return groups, in_features // groups // (2 if self.packed else 1)

    def to_json(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "zero_point": self.zero_point}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "QuantScheme":
        try:
            return cls(int(data["bits"]), data.get("group_size"), bool(data.get("zero_point", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise QuantizationError(f"unreadable quantization record {data!r} ({e})") from None


class QuantizedKernel(nnx.Param):
    """Stored integer values of a quantized kernel (see the module docstring). Never trained."""


# --------------------------------------------------------------------------- arrays
# These work on numpy and jax arrays alike. `values` are signed integers, one per weight
# (int8; 4-bit ones in [-8, 7]); `stored` is what a kernel holds (int4 packed).
def quantize_matrix(w, scheme: QuantScheme):
    """Symmetric absmax quantization of float `w[..., out, in]` along `in`.

    Returns (int8 values `[..., out, in]`, float32 scales `[..., out, groups]`). Each scale is
    max|w| / qmax over its channel or group, so every weight is within half a step of its
    dequantized value; an all-zero group gets scale 0.
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
    return q.astype(jnp.int8).reshape(*lead, out, inputs), scale


def dequantize_matrix(values, scale, zero, scheme: QuantScheme, dtype=jnp.float32):
    """The float matrix `[..., out, in]` that int8 `values` stand for (scale, zero: `[..., out, groups]`)."""
    q = jnp.asarray(values).astype(jnp.float32)
    *lead, out, inputs = q.shape
    groups = scale.shape[-1]
    q = q.reshape(*lead, out, groups, inputs // groups)
    if zero is not None:
        q = q - jnp.asarray(zero, jnp.float32)[..., None]
    return (q * jnp.asarray(scale, jnp.float32)[..., None]).reshape(*lead, out, inputs).astype(dtype)


def pack(values, scheme: QuantScheme):
    """int8 values `[..., out, in]` -> stored `[..., out, groups, group (or group/2 for int4)]`."""
    *lead, out, inputs = values.shape
    groups, stored = scheme.stored_shape(inputs)
    grouped = values.reshape(*lead, out, groups, inputs // groups)
    if not scheme.packed:
        return grouped
    low, high = grouped[..., :stored], grouped[..., stored:]
    return (low & 15) | (high << 4)  # int8 arithmetic: the high nibble wraps into the sign bit


def unpack(stored, scheme: QuantScheme):
    """Stored `[..., out, groups, group']` -> int8 values `[..., out, in]` (the inverse of `pack`)."""
    *lead, out, groups, _ = stored.shape
    if scheme.packed:
        low, high = _nibbles(stored)
        stored = (jnp if isinstance(stored, jax.Array) else np).concatenate([low, high], axis=-1)
    return stored.reshape(*lead, out, -1)


def _nibbles(stored):
    """(low, high) signed nibbles of packed int8 values (arithmetic shifts keep the sign)."""
    return (stored << 4) >> 4, stored >> 4


def matmul(x: jax.Array, stored: jax.Array, scale: jax.Array, zero: jax.Array | None, scheme: QuantScheme,
           dtype) -> jax.Array:
    """`x[rows, in] @ W.T` for a quantized `W` stored `[out, groups, group']`; returns `[rows, out]` in `dtype`.

    scale (and zero): `[out, groups]`.
    """
    dtype = jnp.dtype(dtype)
    # Tie x and the kernel together. Inside a decode loop XLA otherwise hoists the loop-invariant
    # int -> float conversion of every kernel out of the loop: a float copy of the weights, read
    # every step (measured: int8 decode no faster than float32). And on CPU, projections sharing
    # an input (gate/up, k/v) would share its broadcast, which XLA then writes out in full
    # ([out, rows, in] floats) instead of fusing it: batch-8 decode ran 7x slower than float32.
    x, stored = jax.lax.optimization_barrier((x, stored))
    dot = functools.partial(_dequantize_dot, scheme=scheme, dtype=dtype)
    if x.shape[0] > CPU_REDUCTION_MAX_ROWS:
        fn = dot
    else:
        reduce = functools.partial(_reduce_rows, scheme=scheme, dtype=dtype)
        fn = lambda *args: jax.lax.platform_dependent(*args, cpu=reduce, default=dot)  # noqa: E731
    # Recompute the dequantized weight in a backward pass instead of saving it (QLoRA memory).
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)(x, stored, scale, zero)


def _dequantize_dot(x, stored, scale, zero, *, scheme, dtype):
    w = dequantize_matrix(unpack(stored, scheme), scale, zero, scheme, dtype)
    return jax.lax.dot_general(x.astype(dtype), w, (((1,), (1,)), ((), ())))


def _reduce_rows(x, stored, scale, zero, *, scheme, dtype):
    """Multiply-and-reduce along each group's stored row, in float32 (CPU decode; see the module docstring).

    One row is computed from a 1-D x: with a unit batch dimension XLA:CPU picked a reduction
    order that ran 40x slower. Several rows put the batch after the output channel, so each
    weight row is converted once and reused for every x row.
    """
    rows = x.shape[0]
    out, groups, width = stored.shape
    xg = x.astype(jnp.float32).reshape(rows, groups, -1)
    if scheme.packed:  # low nibbles meet the first half of each group's inputs, high nibbles the second
        terms = [(part, xg[..., k * width:(k + 1) * width]) for k, part in enumerate(_nibbles(stored))]
    else:
        terms = [(stored, xg)]
    if groups == 1:  # one group per channel: 2-D reductions (a unit group axis ran ~20x slower), scaled after
        terms = [(q[:, 0], xs[:, 0]) for q, xs in terms]
        if rows == 1:
            y = sum(jnp.sum(q.astype(jnp.float32) * xs[0], axis=-1) for q, xs in terms)[None]
        else:
            y = sum(jnp.sum(q.astype(jnp.float32)[:, None, :] * xs[None], axis=-1) for q, xs in terms).T
        y = y * scale[:, 0]
    elif rows == 1:  # scales applied inside one reduction over (groups, group): 1.5x faster than scaling sums
        y = jnp.sum(sum(q.astype(jnp.float32) * xs[0] for q, xs in terms) * scale[..., None], axis=(-2, -1))[None]
    else:  # group sums, then scaled (scaling inside measured 2.3x slower for 8 rows)
        partial = sum(jnp.sum(q.astype(jnp.float32)[:, None] * xs[None], axis=-1) for q, xs in terms)
        y = jnp.sum(partial * scale[:, None, :], axis=-1).T  # [out, rows, groups] -> [rows, out]
    if zero is not None:
        y = y - jnp.sum(xg, axis=-1) @ (zero * scale).T  # the zero points' share: [rows, groups] x [groups, out]
    return y.astype(dtype)


@dataclasses.dataclass(frozen=True)
class QuantizedMatrix:
    """One projection's quantized weight in HF orientation `[out, in]` (how readers hand it over).

    W[o, i] = scale[o, g] * (values[o, i] - zero[o, g]), g = i // (in / groups); int8 values (4-bit
    ones in [-8, 7]), float32 scale and zero `[out, groups]`, zero None when symmetric.
    """

    values: np.ndarray
    scale: np.ndarray
    zero: np.ndarray | None
    scheme: QuantScheme

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    def dequantize(self) -> np.ndarray:
        """The float32 matrix `[out, in]` (computed by XLA on the CPU)."""
        cpu = jax.devices("cpu")[0]
        arrays = [None if a is None else jax.device_put(a, cpu) for a in (self.values, self.scale, self.zero)]
        return np.asarray(_dequantize_jit(*arrays, self.scheme))


def quantize_host(matrix: np.ndarray, scheme: QuantScheme, what: str = "kernel") -> QuantizedMatrix:
    """Quantize a float matrix `[out, in]` on the host (XLA on the CPU: fused and multi-threaded)."""
    scheme.groups(matrix.shape[1], what)
    values, scale = _quantize_jit(jax.device_put(np.asarray(matrix), jax.devices("cpu")[0]), scheme)
    return QuantizedMatrix(np.asarray(values), np.asarray(scale), None, scheme)


_quantize_jit = jax.jit(quantize_matrix, static_argnums=1)
_dequantize_jit = jax.jit(dequantize_matrix, static_argnums=3)


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


def quantize_linear(linear, scheme: QuantScheme) -> None:
    """Quantize a float `Linear` in place (its kernel array is replaced)."""
    if linear.quantization is not None:
        raise QuantizationError(f"kernel is already quantized ({linear.quantization.name})")
    if linear.out_major:
        from qwen_jax.model import set_out_major

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
    kernel = _dequantize_kernel(linear.kernel.get_value(), linear.kernel_scale.get_value(), zero, layout, scheme,
                                jnp.dtype(dtype))
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
        set_quantized(linear, scheme, jnp.zeros(layout.values_shape(scheme), jnp.int8), scale,
                      jnp.zeros_like(scale) if scheme.zero_point else None)
    model.quantization = scheme
    return model


def model_quantization(model) -> QuantScheme | None:
    """The quantization of a model's decoder projections (None: float)."""
    return getattr(model, "quantization", None)
