"""Weight-only quantization arithmetic: schemes, (de)quantizing and packing arrays, the quantized product.

`QuantScheme`: int8 per output channel (or in groups), int4 in groups (of 128 by default),
symmetric, or with zero points (GPTQ-asym and AWQ imports). A weight is

    W[o, i] = scale[o, g] * (q[o, i] - zero[o, g]),   g = i // group_size

with groups along the (flattened) input, as in GPTQ and AWQ. Stored values are split into groups,
`[..., out, groups, group']` (`pack`): int8 one per byte, int4 two per int8 byte (in each group the
low nibble holds input k and the high nibble input k + group/2, signed, [-8, 7]). `jnp.int4`
arrays would pack too, but XLA:CPU gives them a layout that ahead-of-time compiled executables
reject, and converting them was slower. How a model holds such a kernel (its axes and sharding) is
`qwen_jax.model.linear.QuantizedKernel`.

`matmul` multiplies rows by a quantized matrix: on CPU, for a few rows (decode), by the fused
multiply-and-reduce of `qwen_jax.ops.cpu.reduce_quantized_rows`; otherwise (prefill, training,
GPU and TPU) by dequantizing and running one matrix product, whose conversion GPU and TPU compilers
fuse and CPU amortises over the rows (see benchmarks/quantized.py). The product is wrapped in
`jax.checkpoint`, so a backward pass (QLoRA) recomputes the dequantized weight instead of keeping a
float copy of every kernel as a residual. `QuantizedMatrix` is how checkpoint readers hand over one
projection's quantized weight.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.errors import QuantizationError
from qwen_jax.ops import cpu

DEFAULT_GROUP_SIZE = 128
QUANTIZE_CHOICES = ("int8", "int4")
_SCHEME_NAME = re.compile(r"int(4|8)(?:-g(\d+))?")


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
    def parse(cls, spec: str | QuantScheme) -> QuantScheme:
        """'int8' (per output channel), 'int4' (groups of 128), 'int4-g32', 'int8-g128'; or a scheme."""
        if isinstance(spec, QuantScheme):
            return spec
        match = _SCHEME_NAME.fullmatch(str(spec).strip().lower())
        if not match:
            raise QuantizationError(
                f"unknown quantization {spec!r}; choose from {', '.join(QUANTIZE_CHOICES)} "
                "(or int4-gN / int8-gN for groups of N inputs)"
            )
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
            raise QuantizationError(
                f"{what}: {in_features} inputs are not a multiple of the quantization group "
                f"size {group}{' (an even number for int4)' if self.packed else ''}; choose a "
                "group size that divides it (e.g. int4-g32)"
            )
        return in_features // group

    def stored_shape(self, in_features: int) -> tuple[int, int]:
        """(groups, stored values per group) of one output channel's `in_features` inputs."""
        groups = self.groups(in_features)
        return groups, in_features // groups // (2 if self.packed else 1)

    def to_json(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "zero_point": self.zero_point}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QuantScheme:
        try:
            return cls(int(data["bits"]), data.get("group_size"), bool(data.get("zero_point", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise QuantizationError(f"unreadable quantization record {data!r} ({e})") from None


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


def matmul(
    x: jax.Array,
    stored: jax.Array,
    scale: jax.Array,
    zero: jax.Array | None,
    scheme: QuantScheme,
    dtype,
    *,
    cpu_kernels: bool | None = None,
) -> jax.Array:
    """`x[rows, in] @ W.T` for a quantized `W` stored `[out, groups, group']`; returns `[rows, out]` in `dtype`.

    scale (and zero): `[out, groups]`. cpu_kernels: whether the XLA:CPU specialisations apply
    (`qwen_jax.ops.cpu`; a model passes its own decision); None: `qwen_jax.ops.cpu.applies()`.
    """
    dtype = jnp.dtype(dtype)
    cpu_kernels = cpu.applies() if cpu_kernels is None else cpu_kernels
    # Tie x and the kernel together, on every backend: inside a decode loop XLA otherwise hoists the
    # loop-invariant int -> float conversion of every kernel out of the loop, which leaves a float
    # copy of the weights alive and read every step (tests/ops/test_quant.py checks the loop's
    # memory). On CPU it also keeps projections that share an input (gate/up, k/v) from sharing its
    # broadcast in `reduce_quantized_rows`, which XLA would write out in full instead of fusing.
    x, stored = jax.lax.optimization_barrier((x, stored))
    if cpu_kernels and x.shape[0] <= cpu.QUANTIZED_REDUCTION_MAX_ROWS:
        fn = functools.partial(cpu.reduce_quantized_rows, packed=scheme.packed, dtype=dtype)
    else:
        fn = functools.partial(dequantize_dot, scheme=scheme, dtype=dtype)
    # Recompute the dequantized weight in a backward pass instead of saving it (QLoRA memory).
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)(x, stored, scale, zero)


def dequantize_dot(x, stored, scale, zero, *, scheme: QuantScheme, dtype) -> jax.Array:
    """`x[rows, in] @ W.T` by dequantizing `W` (stored `[out, groups, group']`) and one matrix product."""
    w = dequantize_matrix(unpack(stored, scheme), scale, zero, scheme, dtype)
    return jax.lax.dot_general(x.astype(dtype), w, (((1,), (1,)), ((), ())))


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
