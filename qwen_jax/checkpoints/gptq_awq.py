"""HF checkpoints quantized with GPTQ (AutoGPTQ / GPTQModel) or AWQ (AutoAWQ, GEMM layout).

Qwen publishes every Qwen2.5 size as GPTQ-Int4, GPTQ-Int8 and AWQ. Each quantized projection
`<module>` is stored as integer tensors beside its float bias:

GPTQ (v1, what Qwen's repos and AutoGPTQ write)::

    <module>.qweight  int32 [in * bits / 32, out]   packed along the input, low bits first
    <module>.qzeros   int32 [groups, out * bits / 32]  packed along the output, stored minus 1
    <module>.scales   fp16  [groups, out]
    <module>.g_idx    int32 [in]                    the group of each input row
    W[o, i] = scales[g_idx[i], o] * (q[i, o] - (qzeros[g_idx[i], o] + 1))

`checkpoint_format: gptq_v2` (GPTQModel) stores the zeros without the minus 1. The v1 offset is
applied modulo 2**bits, as GPTQModel's v1 -> v2 conversion does: a zero of 0 stored as -1 wraps to
the top code and back to 0.

AWQ GEMM::

    <module>.qweight  int32 [in, out / 8]   packed along the output in nibble order 0 2 4 6 1 3 5 7
    <module>.qzeros   int32 [groups, out / 8]   same packing, no offset
    <module>.scales   fp16  [groups, out]
    W[o, i] = scales[i // group, o] * (q[i, o] - z[i // group, o])

`unpack_gptq` / `unpack_awq` turn one projection into a `QuantizedMatrix` (our layout: signed
values `[out, in]`, float32 scales and zeros `[out, groups]`), or, when the groups are not
contiguous runs of inputs (GPTQ act-order, `desc_act: true`), into the dequantized float matrix.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from qwen_jax.checkpoints.hf import HFCheckpoint, validate_checkpoint
from qwen_jax.checkpoints.params import param_specs
from qwen_jax.config import Qwen2Config, read_config_json
from qwen_jax.errors import CheckpointError
from qwen_jax.ops.quant import QuantizedMatrix, QuantScheme

QUANTIZED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # AutoAWQ's column order inside one int32
AWQ_REVERSE_ORDER = np.argsort(AWQ_ORDER)  # [0, 4, 1, 5, 2, 6, 3, 7]


@dataclasses.dataclass(frozen=True)
class PrequantizedConfig:
    """The `quantization_config` of a GPTQ or AWQ checkpoint."""

    method: str  # "gptq" or "awq"
    bits: int
    group_size: int | None  # None: one group over all inputs (GPTQ group_size -1)
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"  # gptq (v1) or gptq_v2; "gemm" for AWQ
    modules_to_not_convert: tuple[str, ...] = ()

    @property
    def scheme(self) -> QuantScheme:
        """The scheme of the natively mapped kernels."""
        zero_point = self.method == "awq" or not self.sym
        return QuantScheme(self.bits, self.group_size, zero_point)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_prequantized_config(config_json: dict[str, Any], directory: str | None = None) -> PrequantizedConfig | None:
    """The GPTQ/AWQ settings from config.json's `quantization_config` (or quantize_config.json); None if absent.

    Raises CheckpointError for a quantization this reader does not support.
    """
    data = config_json.get("quantization_config")
    where = "config.json quantization_config"
    if data is None and directory is not None:
        path = os.path.join(directory, "quantize_config.json")
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: unreadable ({e})") from None
            data.setdefault("quant_method", "gptq")
            where = path
    if data is None:
        return None
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: expected an object")
    method = str(data.get("quant_method", "")).lower()
    if method not in ("gptq", "awq"):
        raise CheckpointError(
            f"{where}: quant_method {data.get('quant_method')!r} is not supported "
            "(qwen-jax reads gptq and awq; convert other formats to safetensors floats)"
        )
    try:
        bits = int(data.get("bits", data.get("w_bit", 0)))
        group = int(data.get("group_size", data.get("q_group_size", 128)))
    except (TypeError, ValueError):
        raise CheckpointError(f"{where}: bits and group_size must be integers") from None
    if bits not in (4, 8) or (method == "awq" and bits != 4):
        raise CheckpointError(f"{where}: {bits}-bit {method} is not supported (GPTQ: 4 or 8 bits; AWQ: 4 bits)")
    if group == 0 or group < -1:
        raise CheckpointError(f"{where}: bad group_size {group}")
    modules = tuple(data.get("modules_to_not_convert") or ())
    if method == "awq":
        version = str(data.get("version", "gemm")).lower()
        if version != "gemm":
            raise CheckpointError(f"{where}: AWQ version {version!r} is not supported (qwen-jax reads the GEMM layout)")
        if not data.get("zero_point", True):
            raise CheckpointError(f"{where}: AWQ without zero points is not supported")
        return PrequantizedConfig(
            "awq",
            4,
            None if group == -1 else group,
            sym=False,
            checkpoint_format="gemm",
            modules_to_not_convert=modules,
        )
    fmt = str(data.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported (gptq or gptq_v2)")
    return PrequantizedConfig(
        "gptq",
        bits,
        None if group == -1 else group,
        bool(data.get("desc_act", False)),
        bool(data.get("sym", True)),
        fmt,
        modules,
    )


# --------------------------------------------------------------------------- unpacking
def _as_uint32(packed: np.ndarray, what: str) -> np.ndarray:
    if packed.dtype != np.int32 and packed.dtype != np.uint32:
        raise CheckpointError(f"{what}: packed tensor has dtype {packed.dtype}, expected int32")
    return np.ascontiguousarray(packed).view(np.uint32)


def unpack_along_rows(packed: np.ndarray, bits: int, what: str = "tensor") -> np.ndarray:
    """int32 `[rows, cols]` holding 32/bits values per element along rows -> uint8 `[rows * 32/bits, cols]`."""
    words = _as_uint32(packed, what)
    per_word = 32 // bits
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)[None, :, None]
    values = (words[:, None, :] >> shifts) & np.uint32(2**bits - 1)
    return values.reshape(words.shape[0] * per_word, words.shape[1]).astype(np.uint8)


def unpack_along_cols(packed: np.ndarray, bits: int, what: str = "tensor") -> np.ndarray:
    """int32 `[rows, cols]` holding 32/bits values per element along columns -> uint8 `[rows, cols * 32/bits]`."""
    words = _as_uint32(packed, what)
    per_word = 32 // bits
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)[None, None, :]
    values = (words[:, :, None] >> shifts) & np.uint32(2**bits - 1)
    return values.reshape(words.shape[0], words.shape[1] * per_word).astype(np.uint8)


def _signed(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes [0, 2**bits) -> signed int8 values (minus 2**(bits-1))."""
    signed = values.astype(np.int16) - 2 ** (bits - 1)
    return signed.astype(np.int8)


def _expect_shape(array: np.ndarray, shape: tuple[int, ...], what: str) -> None:
    if tuple(array.shape) != shape:
        raise CheckpointError(
            f"{what}: shape {list(array.shape)}, expected {list(shape)} for this config and "
            "quantization (wrong packing or group size?)"
        )


def unpack_gptq(
    qweight: np.ndarray,
    qzeros: np.ndarray,
    scales: np.ndarray,
    g_idx: np.ndarray | None,
    *,
    in_features: int,
    out_features: int,
    config: PrequantizedConfig,
    name: str = "module",
) -> QuantizedMatrix | np.ndarray:
    """One GPTQ projection -> QuantizedMatrix (contiguous groups) or dequantized float32 `[out, in]` (act-order)."""
    bits = config.bits
    group = config.group_size or in_features
    if in_features % group:
        raise CheckpointError(f"{name}: group size {group} does not divide {in_features} inputs")
    groups = in_features // group
    per_word = 32 // bits
    _expect_shape(qweight, (in_features // per_word, out_features), f"{name}.qweight")
    _expect_shape(qzeros, (groups, out_features // per_word), f"{name}.qzeros")
    _expect_shape(scales, (groups, out_features), f"{name}.scales")
    q = unpack_along_rows(qweight, bits, f"{name}.qweight").T  # [out, in]
    zeros = unpack_along_cols(qzeros, bits, f"{name}.qzeros").astype(np.int32)
    if config.checkpoint_format == "gptq":  # v1 stores zero - 1
        zeros = (zeros + 1) % (2**bits)
    zeros = zeros.T  # [out, groups]
    scale = np.asarray(scales, np.float32).T
    sequential = np.arange(in_features, dtype=np.int64) // group
    if g_idx is not None:
        _expect_shape(g_idx, (in_features,), f"{name}.g_idx")
        g_idx = np.asarray(g_idx).astype(np.int64)
        if g_idx.min(initial=0) < 0 or g_idx.max(initial=0) >= groups:
            raise CheckpointError(f"{name}.g_idx: group indices outside [0, {groups})")
    if g_idx is not None and not np.array_equal(g_idx, sequential):
        # Act-order: input i belongs to group g_idx[i]; groups are not runs of inputs, so no
        # per-group scale layout fits: dequantize.
        return scale[:, g_idx] * (q.astype(np.float32) - zeros[:, g_idx])
    return _to_matrix(q, zeros, scale, config, name)


def unpack_awq(
    qweight: np.ndarray,
    qzeros: np.ndarray,
    scales: np.ndarray,
    *,
    in_features: int,
    out_features: int,
    config: PrequantizedConfig,
    name: str = "module",
) -> QuantizedMatrix:
    """One AWQ GEMM projection -> QuantizedMatrix."""
    group = config.group_size or in_features
    if in_features % group or out_features % 8:
        raise CheckpointError(f"{name}: AWQ needs outputs divisible by 8 and group size {group} dividing {in_features}")
    groups = in_features // group
    _expect_shape(qweight, (in_features, out_features // 8), f"{name}.qweight")
    _expect_shape(qzeros, (groups, out_features // 8), f"{name}.qzeros")
    _expect_shape(scales, (groups, out_features), f"{name}.scales")
    q = _awq_columns(unpack_along_cols(qweight, 4, f"{name}.qweight")).T  # [out, in]
    zeros = _awq_columns(unpack_along_cols(qzeros, 4, f"{name}.qzeros")).T.astype(np.int32)
    return _to_matrix(q, zeros, np.asarray(scales, np.float32).T, config, name)


def _awq_columns(unpacked: np.ndarray) -> np.ndarray:
    """Undo AutoAWQ's interleaving: within each block of 8 columns, nibble k holds column AWQ_ORDER[k]."""
    rows, cols = unpacked.shape
    return unpacked.reshape(rows, cols // 8, 8)[:, :, AWQ_REVERSE_ORDER].reshape(rows, cols)


def _to_matrix(
    q: np.ndarray, zeros: np.ndarray, scale: np.ndarray, config: PrequantizedConfig, name: str
) -> QuantizedMatrix:
    scheme = config.scheme
    midpoint = 2 ** (config.bits - 1)
    if scheme.zero_point:
        zero = (zeros - midpoint).astype(np.float32)
    else:
        if not np.all(zeros == midpoint):
            raise CheckpointError(
                f"{name}.qzeros: zero points differ from {midpoint} although quantization_config says sym: true"
            )
        zero = None
    return QuantizedMatrix(_signed(q, config.bits), scale, zero, scheme)


# --------------------------------------------------------------------------- the reader
def _quantized_modules(config, num_layers: int) -> dict[str, tuple[int, int]]:
    """HF module name -> (in_features, out_features) of every decoder projection."""
    modules = {}
    for spec in param_specs(config):
        if spec.path[-1] == "kernel":
            for name in spec.hf_names(num_layers):
                out, inputs = spec.hf_shape
                modules[name.removesuffix(".weight")] = (inputs, out)
    return modules


class PrequantizedReader:
    """Reads a GPTQ or AWQ checkpoint directory (see `qwen_jax.checkpoints.assemble.CheckpointReader`).

    Kernels come as `QuantizedMatrix` (our layout, no dequantization) where the groups are runs of
    inputs, else dequantized (GPTQ act-order): `quantization` says which. Everything else (the
    embedding, norms, biases, lm_head) is an ordinary float tensor. The whole checkpoint is
    validated (every tensor's presence, dtype and packed shape) on opening.
    """

    row_block_elements = None

    def __init__(self, directory: str | os.PathLike):
        self.source = os.fspath(directory)
        config_json = read_config_json(self.source)
        self.prequantized = read_prequantized_config(config_json, self.source)
        if self.prequantized is None:
            raise CheckpointError(f"{self.source}: not a GPTQ/AWQ checkpoint (no quantization_config)")
        self.config = Qwen2Config.from_hf(config_json)
        self.checkpoint = HFCheckpoint(self.source)
        self.modules = _quantized_modules(self.config, self.config.num_hidden_layers)
        unconverted = sorted(
            m
            for m in self.modules
            if m.rpartition(".")[2] in self.prequantized.modules_to_not_convert
            or m in self.prequantized.modules_to_not_convert
        )
        if unconverted:
            raise CheckpointError(
                f"{self.source}: modules_to_not_convert leaves {unconverted[0]} in float; checkpoints "
                "mixing float and quantized decoder projections are not supported"
            )
        self._validate()
        act_order = self.prequantized.method == "gptq" and self.prequantized.desc_act
        # Act-order groups are not runs of inputs: those kernels are dequantized (see `unpack_gptq`).
        self.quantization = None if act_order else self.prequantized.scheme

    @property
    def dtypes(self) -> set[np.dtype]:
        """Dtypes of the float tensors (embedding, norms, biases, scales)."""
        return {
            self.checkpoint.files[p].dtype(n)
            for n, p in self.checkpoint.where.items()
            if not n.endswith((".qweight", ".qzeros", ".g_idx"))
        }

    def _validate(self) -> None:
        ckpt, pq = self.checkpoint, self.prequantized
        per_word = 32 // pq.bits
        expected_packed = {}
        for module, (inputs, out) in self.modules.items():
            group = pq.group_size or inputs
            if inputs % group:
                raise CheckpointError(
                    f"{self.source}: group size {group} does not divide the {inputs} inputs of {module}"
                )
            groups = inputs // group
            if pq.method == "gptq":
                expected_packed.update(
                    {
                        f"{module}.qweight": (inputs // per_word, out),
                        f"{module}.qzeros": (groups, out // per_word),
                        f"{module}.scales": (groups, out),
                    }
                )
            else:
                expected_packed.update(
                    {
                        f"{module}.qweight": (inputs, out // 8),
                        f"{module}.qzeros": (groups, out // 8),
                        f"{module}.scales": (groups, out),
                    }
                )
        for name, shape in expected_packed.items():
            if name not in ckpt.where:
                raise CheckpointError(f"{self.source}: missing tensor {name!r} ({pq.method} checkpoint)")
            if ckpt.shape(name) != shape:
                raise CheckpointError(
                    f"{ckpt.file_of(name)}: tensor {name!r} has shape {list(ckpt.shape(name))}, "
                    f"{pq.bits}-bit {pq.method} with group size {pq.group_size or -1} and this "
                    f"config expects {list(shape)}"
                )
            if name.endswith((".qweight", ".qzeros")) and ckpt.files[ckpt.file_of(name)].dtype(name) != np.int32:
                raise CheckpointError(
                    f"{ckpt.file_of(name)}: tensor {name!r} is "
                    f"{ckpt.files[ckpt.file_of(name)].dtype(name)}, packed tensors are int32"
                )
        extra = set()
        for module, (inputs, _) in self.modules.items():
            if f"{module}.g_idx" in ckpt.where:
                if ckpt.shape(f"{module}.g_idx") != (inputs,):
                    raise CheckpointError(
                        f"{self.source}: tensor '{module}.g_idx' has shape "
                        f"{list(ckpt.shape(f'{module}.g_idx'))}, expected [{inputs}]"
                    )
                extra.add(f"{module}.g_idx")
            bias = f"{module}.bias"
            if bias in ckpt.where and not module.endswith(("q_proj", "k_proj", "v_proj")):
                if np.any(ckpt.get(bias)):  # quantizers write zero biases for bias-free projections
                    raise CheckpointError(f"{self.source}: {module} has a non-zero bias; Qwen2 has none there")
                extra.add(bias)
        # Everything that is not a packed projection is an ordinary HF tensor.
        float_view = _FloatView(ckpt, set(expected_packed) | extra, self.modules)
        validate_checkpoint(float_view, self.config)

    def get(self, name: str) -> QuantizedMatrix | np.ndarray:
        """An HF tensor by name: projections as QuantizedMatrix (or float for act-order), the rest as stored."""
        module = name.removesuffix(".weight")
        if module not in self.modules:
            return self.checkpoint.get(name)
        inputs, out = self.modules[module]
        tensors = {suffix: self.checkpoint.get(f"{module}.{suffix}") for suffix in ("qweight", "qzeros", "scales")}
        where = f"{self.source}: {module}"
        if self.prequantized.method == "awq":
            return unpack_awq(**tensors, in_features=inputs, out_features=out, config=self.prequantized, name=where)
        g_idx = self.checkpoint.get(f"{module}.g_idx") if f"{module}.g_idx" in self.checkpoint.where else None
        return unpack_gptq(
            **tensors, g_idx=g_idx, in_features=inputs, out_features=out, config=self.prequantized, name=where
        )

    def read_group(self, group, targets) -> dict[tuple[str, ...], np.ndarray]:
        arrays = group.read_hf_arrays(self.get)
        if targets is None:
            return arrays
        return {key: np.asarray(array).astype(targets[key].dtype, copy=False) for key, array in arrays.items()}


class _FloatView:
    """The float tensors of a quantized checkpoint, with each projection's `.weight` standing in
    for its packed tensors, so the float checkpoint validation applies to the rest."""

    def __init__(self, ckpt, packed: set[str], modules: dict[str, tuple[int, int]]):
        self.directory = ckpt.directory
        self._ckpt = ckpt
        self.where = {n: p for n, p in ckpt.where.items() if n not in packed}
        self._shapes = {}
        for module, (inputs, out) in modules.items():
            self.where[f"{module}.weight"] = ckpt.where[f"{module}.qweight"]
            self._shapes[f"{module}.weight"] = (out, inputs)

    def names(self) -> set[str]:
        return set(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes.get(name) or self._ckpt.shape(name)

    def file_of(self, name: str) -> str:
        return self.where[name]
