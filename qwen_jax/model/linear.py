"""`Linear`: one projection in einsum layout, over a float kernel or a `QuantizedKernel`, with an optional `LoRA`.

Every decoder projection is a `Linear` (`'BTD,DNH->BTNH'` for q_proj ...); its input's trailing
dims are the kernel's leading ones. What it holds, all declared in `Linear.__init__`:

- `kernel`: a float `nnx.Param` in the einsum layout `[*in, *out]`, or a `QuantizedKernel`;
  `Linear.__call__` dispatches on which. Stacked layers put a leading `layers` axis on both.
- `bias`: a float `[*out]` parameter, or None.
- `lora`: a `LoRA` adapter, whose output is added to the projection's, or None
  (`qwen_jax.model.lora.apply_lora` attaches them).
- `out_major`: True when a float kernel is stored `[*out, *in]` instead, the layout XLA:CPU's
  decode products read fastest (unrolled inference layers on CPU; `qwen_jax.ops.cpu`).
- `cpu_kernels`: whether the XLA:CPU specialisations apply (the model's decision,
  `qwen_jax.ops.cpu.applies`).

A `QuantizedKernel` is one value (a pytree) holding a weight-only quantized kernel
(`qwen_jax.ops.quant`)::

    W[o, i] = scale[o, g] * (q[o, i] - zero[o, g]),   g = i // group_size

`values` (`QuantizedValues`, int8, int4 packed two per byte) are stored **out-major and split into
groups**, `[L?, *out, groups, group']` (`[L?, *out, 1, in]` per output channel): the transpose of
the float einsum layout and, flattened, HF's own `[out_features, in_features]`. `scale` (and, for
asymmetric imports such as GPTQ-asym and AWQ, `zero`) are float32 `[L?, *out, groups]`. Every
dimension keeps a logical axis name (the output axes', and the leading input axis' on the group
axis, or on the input axis with one group), so the sharding rules place a quantized kernel the way
they place the float one, each shard holding whole groups when the groups divide. The scheme and
the float layout (`KernelLayout`) are static. None of its parts ever trains (`QuantizedParam`).

Checkpoints name these parts as they were named before they were one value: `.../kernel`,
`.../kernel_scale`, `.../kernel_zero` (`qwen_jax.checkpoints.params.ParamSpec.stored_path`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qwen_jax.errors import QuantizationError
from qwen_jax.ops import cpu
from qwen_jax.ops.quant import QuantScheme, dequantize_matrix, matmul, pack, quantize_matrix, unpack
from qwen_jax.sharding import DEFAULT_RULES, ShardingRules, place_variables

normal_init = jax.nn.initializers.normal(0.02)


zeros_init = jax.nn.initializers.zeros


ones_init = jax.nn.initializers.ones


def new_param(rngs: nnx.Rngs | None, init, shape, axes, dtype, layers: int | None) -> nnx.Param:
    """A parameter drawn by `init` with logical axes `axes`, stacked `layers` deep (axis `layers` first) if given."""
    if layers is not None:
        shape, axes = (layers, *shape), ("layers", *axes)
    value = init(rngs.params() if rngs is not None else jax.random.key(0), shape, dtype)
    return nnx.Param(value, logical_axes=axes)


# --------------------------------------------------------------------------- layouts
@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """A `Linear` kernel's float (einsum-layout) shape and axis names, split into the parts quantization needs."""

    layers: tuple[int, ...]  # (L,) for a layer-stacked kernel, else ()
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_axes: tuple[str | None, ...]
    out_axes: tuple[str | None, ...]

    @classmethod
    def of_float(cls, shape, axes, contracted: int, out_major: bool) -> KernelLayout:
        """The layout of a float kernel of this shape and these axes (stored `[*out, *in]` if `out_major`)."""
        shape, axes = tuple(shape), tuple(axes)
        lead = 1 if axes[0] == "layers" else 0
        if out_major:
            n_out = len(shape) - lead - contracted
            ins, outs = slice(lead + n_out, None), slice(lead, lead + n_out)
        else:
            ins, outs = slice(lead, lead + contracted), slice(lead + contracted, None)
        return cls(shape[:lead], shape[ins], shape[outs], axes[ins], axes[outs])

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

    def float_shape(self) -> tuple[int, ...]:
        return (*self.layers, *self.in_shape, *self.out_shape)

    def float_axes(self) -> tuple[str | None, ...]:
        return (*self.layer_axes, *self.in_axes, *self.out_axes)


def to_out_major(kernel, layout: KernelLayout):
    """A float einsum-layout kernel `[L?, *in, *out]` as the matrix `[L?, out, in]`."""
    lead = len(layout.layers)
    matrix = kernel.reshape(*layout.layers, layout.in_features, layout.out_features)
    return jnp.swapaxes(matrix, lead, lead + 1)


def from_out_major(matrix, layout: KernelLayout):
    """The inverse of `to_out_major`: `[L?, out, in]` -> einsum layout `[L?, *in, *out]`."""
    lead = len(layout.layers)
    return jnp.swapaxes(matrix, lead, lead + 1).reshape(*layout.layers, *layout.in_shape, *layout.out_shape)


# --------------------------------------------------------------------------- quantized kernels
class QuantizedParam(nnx.Param):
    """A stored part of a `QuantizedKernel` (its integers, scales or zero points): frozen, never trained."""


class QuantizedValues(QuantizedParam):
    """The stored integers of a quantized kernel (int8; int4 packed two per byte)."""


class QuantizedKernel(nnx.Pytree):
    """A weight-only quantized kernel as one value: stored integers, scales, optional zero points
    (see the module docstring), with its scheme and float layout as static data."""

    zero: QuantizedParam | None = nnx.data()

    def __init__(self, values, scale, zero, scheme: QuantScheme, layout: KernelLayout):
        expected = {"values": layout.values_shape(scheme), "scale": layout.scale_shape(scheme)}
        expected["zero"] = expected["scale"]
        for name, array in (("values", values), ("scale", scale), ("zero", zero)):
            if array is not None and tuple(array.shape) != expected[name]:
                raise QuantizationError(f"quantized {name} shape {tuple(array.shape)} != expected {expected[name]}")
        if (zero is not None) != scheme.zero_point:
            raise QuantizationError(f"scheme {scheme.name} and the zero points given disagree")
        self.values = QuantizedValues(values, logical_axes=layout.values_axes(scheme))
        self.scale = QuantizedParam(scale, logical_axes=layout.scale_axes(scheme))
        self.zero = None if zero is None else QuantizedParam(zero, logical_axes=layout.scale_axes(scheme))
        self.scheme = scheme
        self.layout = layout

    @classmethod
    def quantize(cls, kernel: jax.Array, layout: KernelLayout, scheme: QuantScheme) -> QuantizedKernel:
        """Symmetric absmax quantization of a float einsum-layout kernel (`qwen_jax.ops.quant.quantize_matrix`)."""
        values, scale = _quantize_kernel(kernel, layout, scheme)
        return cls(values, scale, None, scheme, layout)

    @classmethod
    def zeros(cls, layout: KernelLayout, scheme: QuantScheme) -> QuantizedKernel:
        """A zero-filled kernel: the structure of abstract models (`nnx.eval_shape`) whose parts a loader fills."""
        scale = jnp.zeros(layout.scale_shape(scheme), jnp.float32)
        zero = jnp.zeros_like(scale) if scheme.zero_point else None
        return cls(jnp.zeros(layout.values_shape(scheme), jnp.int8), scale, zero, scheme, layout)

    def parts(self) -> tuple[QuantizedParam, ...]:
        return (self.values, self.scale) + (() if self.zero is None else (self.zero,))

    def dequantize(self, dtype) -> jax.Array:
        """The float kernel in the einsum layout `[L?, *in, *out]`."""
        zero = None if self.zero is None else self.zero.get_value()
        return _dequantize_kernel(
            self.values.get_value(), self.scale.get_value(), zero, self.layout, self.scheme, jnp.dtype(dtype)
        )

    def project(self, x: jax.Array, contracted: int, dtype, *, cpu_kernels: bool) -> jax.Array:
        """x's trailing `contracted` dims (the inputs) times the kernel (unstacked): `[..., *out]` in `dtype`."""
        stored = self.values[...]
        out_shape = self.layout.out_shape
        rows = x.shape[: x.ndim - contracted]
        out = math.prod(out_shape)
        zero = None if self.zero is None else self.zero[...].reshape(out, -1)
        y = matmul(
            x.reshape(math.prod(rows), -1),
            stored.reshape(out, *stored.shape[-2:]),
            self.scale[...].reshape(out, -1),
            zero,
            self.scheme,
            dtype,
            cpu_kernels=cpu_kernels,
        )
        return y.reshape(*rows, *out_shape)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_kernel(kernel, layout: KernelLayout, scheme: QuantScheme):
    values, scale = quantize_matrix(to_out_major(kernel, layout), scheme)
    return pack(values, scheme).reshape(layout.values_shape(scheme)), scale.reshape(layout.scale_shape(scheme))


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _dequantize_kernel(stored, scale, zero, layout: KernelLayout, scheme: QuantScheme, dtype):
    rows = (*layout.layers, layout.out_features, -1)
    values = unpack(stored.reshape(*layout.layers, layout.out_features, *stored.shape[-2:]), scheme)
    zero = None if zero is None else zero.reshape(rows)
    return from_out_major(dequantize_matrix(values, scale.reshape(rows), zero, scheme, dtype), layout)


# --------------------------------------------------------------------------- LoRA
_RANK_LETTER = "R"  # einsum letter of the adapter rank; unused by the model's equations


class LoRAParam(nnx.Param):
    """A trainable adapter weight (the only parameters that train in LoRA mode)."""


class LoRADropoutKey(nnx.Variable):
    """Raw PRNG key data `[L?, 2]` for adapter dropout, rewritten every train step."""


def _split_equation(equation: str) -> tuple[str, str, str, str]:
    """'BTD,DNH->BTNH' -> (x letters, contracted letters, kept x letters, kernel output letters)."""
    lhs, _ = equation.split("->")
    x_letters, kernel_letters = lhs.split(",")
    contracted = "".join(c for c in kernel_letters if c in x_letters)
    produced = "".join(c for c in kernel_letters if c not in x_letters)
    if kernel_letters != contracted + produced or _RANK_LETTER in equation:
        raise ValueError(f"cannot attach LoRA to einsum {equation!r}")
    kept = "".join(c for c in x_letters if c not in contracted)
    return x_letters, contracted, kept, produced


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _low_rank_product(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """`scale * (x @ a) @ b` for rows `x [M, in]`, `a [in, R]`, `b [R, out]`: a LoRA adapter's output.

    Its gradient is written out (`_low_rank_backward`) instead of derived from the two products:
    every product of the backward then multiplies a large `[M, in]` / `[M, out]` operand in its
    stored row-major layout by a small rank-`R` one. From the derived gradient, XLA:CPU computed
    `B`'s gradient with the large output cotangent transposed, a copy it fused with that
    cotangent's elementwise producer (the SwiGLU derivative for `gate_proj` / `up_proj`) and wrote
    out in transposed order, on every layer of every train step (benchmarks/train.py). The values
    are the same products either way.
    """
    return ((x @ a) @ b) * scale


def _low_rank_forward(x, a, b, scale):
    h = x @ a
    return (h @ b) * scale, (x, a, b, h)


def _low_rank_backward(scale, residuals, g):
    x, a, b, h = residuals
    dh = (g @ b.T) * scale  # [M, R]
    dx = dh @ a.T
    da = (dh.T @ x).T  # [R, M] @ [M, in]: the large operand as stored
    db = (h.T @ g) * scale
    return dx, da, db


_low_rank_product.defvjp(_low_rank_forward, _low_rank_backward)


class LoRA(nnx.Module):
    """The low-rank update of one (layer-stacked) `Linear`: x -> scale * (dropout(x) A) B.

    A `[L?, *in, rank]` and B `[L?, rank, *out]` are `LoRAParam`s with the logical axes of the
    kernel's inputs and outputs, so they shard on the same rules (see `qwen_jax.model.lora`).
    """

    dropout_key: LoRADropoutKey | None = nnx.data()

    def __init__(
        self,
        equation: str,
        layout: KernelLayout,
        *,
        rank: int,
        scale: float,
        dropout: float,
        dtype,
        param_dtype,
        a: np.ndarray | None = None,
    ):
        """equation, layout: of the `Linear` adapted. a: A's initial value (None: zeros); B starts at zero."""
        _, contracted, _, produced = _split_equation(equation)
        stacked = bool(layout.layers)
        layer_axes = layout.layer_axes
        a_shape = (*layout.layers, *layout.in_shape, rank)
        a = jnp.zeros(a_shape, param_dtype) if a is None else jnp.asarray(a, param_dtype)
        if a.shape != a_shape:
            raise ValueError(f"LoRA A has shape {a.shape}, the kernel needs {a_shape}")
        b = jnp.zeros((*layout.layers, rank, *layout.out_shape), param_dtype)
        self.lora_a = LoRAParam(a, logical_axes=(*layer_axes, *layout.in_axes, None))
        self.lora_b = LoRAParam(b, logical_axes=(*layer_axes, None, *layout.out_axes))
        layer_letter = "L" if stacked else ""
        self.merge_equation = (
            f"{layer_letter}{contracted}{_RANK_LETTER},{layer_letter}{_RANK_LETTER}{produced}"
            f"->{layer_letter}{contracted}{produced}"
        )
        self.scale = scale
        self.dropout = dropout
        self.deterministic = False  # True turns dropout off (evaluation)
        self.enabled = True  # False: the projection computes the base model's output (a DPO/GRPO reference)
        self.dtype = dtype
        self.dropout_key = (
            LoRADropoutKey(jnp.zeros((*layout.layers, 2), jnp.uint32), logical_axes=(*layer_axes, None))
            if dropout > 0
            else None
        )

    @property
    def rank(self) -> int:
        return self.lora_a.shape[-1]

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.dropout > 0 and not self.deterministic:
            key = jax.random.wrap_key_data(self.dropout_key[...])
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        a, b = self.lora_a[...].astype(self.dtype), self.lora_b[...].astype(self.dtype)
        rows = x.shape[: x.ndim - (a.ndim - 1)]  # x's trailing dims are A's leading (input) ones
        flat = x.reshape(math.prod(rows), math.prod(a.shape[:-1]))
        y = _low_rank_product(flat, a.reshape(-1, a.shape[-1]), b.reshape(b.shape[0], -1), self.scale)
        return y.reshape(*rows, *b.shape[1:]).astype(self.dtype)

    def delta_kernel(self) -> jax.Array:
        """scale * A B in the kernel's einsum layout, float32."""
        a, b = self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32)
        return self.scale * jnp.einsum(self.merge_equation, a, b)


# --------------------------------------------------------------------------- Linear
class Linear(nnx.Module):
    """A projection in einsum layout (`kernel` axes name every dimension), optional bias and adapter."""

    kernel: nnx.Param | QuantizedKernel = nnx.data()
    lora: LoRA | None = nnx.data()

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
        layers: int | None = None,
        cpu_kernels: bool = False,
        rngs: nnx.Rngs | None = None,
    ):
        self.equation = equation
        x_letters, kernel_letters = equation.split("->")[0].split(",")
        self.contracted = sum(c in kernel_letters for c in x_letters)  # x's trailing dims = kernel's leading
        if x_letters[len(x_letters) - self.contracted :] != kernel_letters[: self.contracted]:
            raise ValueError(f"{equation!r}: x must end with the dims the kernel starts with")
        self.kernel = new_param(rngs, normal_init, kernel_shape, kernel_axes, param_dtype, layers)
        self.bias = new_param(rngs, zeros_init, bias_shape, bias_axes, param_dtype, layers) if bias_shape else None
        self.dtype = dtype
        self.lora = None
        self.out_major = False
        self.cpu_kernels = cpu_kernels

    @property
    def quantization(self) -> QuantScheme | None:
        """The kernel's quantization scheme (None: a float kernel)."""
        return self.kernel.scheme if isinstance(self.kernel, QuantizedKernel) else None

    @property
    def layout(self) -> KernelLayout:
        """The kernel's float layout (for a quantized kernel, the one it was quantized from)."""
        if isinstance(self.kernel, QuantizedKernel):
            return self.kernel.layout
        axes = self.kernel.get_metadata()["logical_axes"]
        return KernelLayout.of_float(self.kernel.shape, axes, self.contracted, self.out_major)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, contracted = self.kernel, self.contracted
        if isinstance(kernel, QuantizedKernel):
            y = kernel.project(x, contracted, self.dtype, cpu_kernels=self.cpu_kernels)
        elif self.out_major:
            y = self._out_major_product(x, kernel[...].astype(self.dtype))
        else:
            # The einsum contracts x's trailing dims with the kernel's leading ones; run it as one 2-D
            # matmul on flattened views, which XLA lays out well on every backend (an einsum such as
            # 'BTNH,NHD->BTD' got a layout on CPU that copied the o_proj kernel on every call).
            kernel = kernel[...].astype(self.dtype)
            in_shape, out_shape = kernel.shape[:contracted], kernel.shape[contracted:]
            flat = x.reshape(*x.shape[: x.ndim - contracted], math.prod(in_shape))
            y = (flat @ kernel.reshape(math.prod(in_shape), math.prod(out_shape))).reshape(*flat.shape[:-1], *out_shape)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None and self.lora.enabled:
            y = y + self.lora(x)
        return y

    def _out_major_product(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """x @ W for a kernel stored `[*out, *in]` (x's trailing `contracted` dims are the inputs)."""
        n_out = kernel.ndim - self.contracted
        out_shape, in_shape = kernel.shape[:n_out], kernel.shape[n_out:]
        rows = x.shape[: x.ndim - self.contracted]
        flat = x.reshape(math.prod(rows), math.prod(in_shape))
        matrix = kernel.reshape(math.prod(out_shape), math.prod(in_shape))
        if self.cpu_kernels:
            y = cpu.rows_times_out_major(flat, matrix)
        else:
            y = jax.lax.dot_general(flat, matrix, (((1,), (1,)), ((), ())))
        return y.reshape(*rows, *out_shape)

    # ------------------------------------------------------------------ kernel transforms (in place)
    def quantize(self, scheme: QuantScheme, *, mesh: Mesh | None = None, rules: ShardingRules = DEFAULT_RULES):
        """Replace the float kernel by its quantization; on `mesh`, each part is placed by its logical axes."""
        if self.quantization is not None:
            raise QuantizationError(f"kernel is already quantized ({self.quantization.name})")
        self.set_out_major(False)  # quantization starts from the einsum layout
        layout = self.layout
        scheme.groups(layout.in_features, f"{self.equation} kernel")
        self.kernel = QuantizedKernel.quantize(self.kernel.get_value(), layout, scheme)
        place_variables(self.kernel.parts(), mesh, rules)

    def dequantize(self, dtype, *, mesh: Mesh | None = None, rules: ShardingRules = DEFAULT_RULES) -> None:
        """Replace a quantized kernel by the float one it stands for (einsum layout, `dtype`); a float one stays."""
        if not isinstance(self.kernel, QuantizedKernel):
            return
        layout = self.kernel.layout
        self.kernel = nnx.Param(self.kernel.dequantize(dtype), logical_axes=layout.float_axes())
        place_variables((self.kernel,), mesh, rules)

    def set_out_major(self, out_major: bool) -> None:
        """Store a float kernel `[*out, *in]` (True) or in the einsum layout (False).

        Only for unstacked kernels; a quantized one is left as it is (its own layout is out-major).
        Writers read kernels back in the einsum layout (`einsum_kernel`).
        """
        if self.quantization is not None or self.out_major == out_major:
            return
        axes = tuple(self.kernel.get_metadata()["logical_axes"])
        if axes[0] == "layers":
            raise ValueError("set_out_major: a layer-stacked kernel keeps the einsum layout")
        perm = cpu.out_major_permutation(len(axes), self.contracted, out_major)
        value = jnp.transpose(self.kernel.get_value(), perm)
        self.kernel = nnx.Param(value, logical_axes=tuple(axes[i] for i in perm))
        self.out_major = out_major
        if self.cpu_kernels:
            # The replaced kernel is freed now; hand its memory back before the next one is transposed,
            # so converting a model kernel by kernel does not grow the process by a copy of the model.
            cpu.release_freed_host_memory()

    def einsum_kernel(self, value: jax.Array) -> jax.Array:
        """`value`, a float kernel array as this Linear stores it, in the einsum layout `[*in, *out]`."""
        if not self.out_major:
            return value
        return jnp.transpose(value, cpu.out_major_permutation(value.ndim, self.contracted, False))

    def stored_kernel(self, value: jax.Array) -> jax.Array:
        """`value`, a float kernel array in the einsum layout, as this Linear stores it (inverse of `einsum_kernel`)."""
        if not self.out_major:
            return value
        return jnp.transpose(value, cpu.out_major_permutation(value.ndim, self.contracted, True))

    def take_structure(self, stacked: Linear) -> None:
        """Give this unstacked Linear the kind of kernel and adapter one layer of `stacked` has,
        zero-filled: for building an unrolled model (`qwen_jax.model.unstack_layers`) to fill."""
        if stacked.quantization is not None:
            self.kernel = QuantizedKernel.zeros(self.layout, stacked.quantization)
        lora = stacked.lora
        if lora is not None:
            self.lora = LoRA(
                self.equation,
                self.layout,
                rank=lora.rank,
                scale=lora.scale,
                dropout=lora.dropout,
                dtype=lora.dtype,
                param_dtype=lora.lora_a.dtype,
            )
            self.lora.deterministic = lora.deterministic
