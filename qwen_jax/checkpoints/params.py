"""The parameter layout every checkpoint reader and writer shares: parameter specs and groups.

- `param_specs(config, quantization)`: every parameter of ours, its logical shape (per layer for
  stacked parameters), how it maps to HF tensor(s), where it sits in the model (`ParamSpec.path`)
  and what checkpoints call it (`ParamSpec.stored_path`). With a `quantization`
  (`qwen_jax.ops.quant`), each decoder kernel is the specs of its stored parts (integers, scales
  and zero points), which readers fill from a `QuantizedMatrix` or by quantizing a float tensor
  (`ParamGroup.read_hf_arrays`).
- `param_groups(config)`: the units checkpoints are read and written in. A group is one decoder
  layer (`model.layers.3`: that layer's slice of every stacked parameter), one small unstacked
  parameter (`model.norm`), or a block of rows of a large one (`model.embed_tokens.rows0`,
  `lm_head.rows18724`, at most `ROW_BLOCK_ELEMENTS` elements). `ParamGroup.part_shape` and
  `ParamGroup.take` are the one definition of "the part of a parameter this group holds", used by
  every reader, writer and counter (`count_parameters`).

`qwen_jax.checkpoints.assemble` places groups into a model's shards, `qwen_jax.checkpoints.orbax`
writes and reads the qwen-jax Orbax layout; the format readers (`hf`, `gptq_awq`, `gguf`, `orbax`)
sit above this module, which imports none of them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from qwen_jax.config import Qwen2Config
from qwen_jax.ops.quant import QuantizedMatrix, QuantScheme, pack, quantize_host, unpack

# Unstacked matrices (embedding, lm_head: 272 MB each for 0.5B in bfloat16) are stored in row
# blocks of at most this many elements, so no group is much larger than a decoder layer. Writers
# read it when they start and record it in the manifest; readers use the manifest's value.
ROW_BLOCK_ELEMENTS = 2**24

Key = tuple[str, ...]


# --------------------------------------------------------------------------- parameters
@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter of ours and how it maps to HF tensor(s).

    `path` is where the parameter sits in the model's state (stacked layers); `stored_path`, where
    it differs, is its key in qwen-jax Orbax checkpoints, which keep the names the parts of a
    quantized kernel had before the kernel was one value (`.../kernel`, `.../kernel_scale`,
    `.../kernel_zero` for the model's `.../kernel/values`, `/scale`, `/zero`), so checkpoints
    written by any qwen-jax version stay readable. `shape` is our shape of one layer's slice for
    stacked parameters (the model adds a leading `layers` axis), of the whole parameter otherwise.
    `hf_name` contains `{i}` for stacked layer parameters (one HF tensor per layer).
    `from_hf`/`to_hf` convert one (per-layer) tensor between HF layout `hf_shape` and ours;
    unstacked parameters keep the HF layout (identity), so a row block of ours is a row block of
    the HF tensor.
    """

    path: Key
    hf_name: str
    shape: tuple[int, ...]
    hf_shape: tuple[int, ...]
    from_hf: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    # A part of a quantized kernel (`qwen_jax.model.linear.QuantizedKernel`): "values" (the integers, out-major; its
    # HF tensor is the float weight `hf_name`), "scale" or "zero" (which belong to that same HF
    # tensor and are read and written with it). None for a float parameter.
    quant_part: str | None = None
    scheme: QuantScheme | None = None
    stored_path: Key | None = None  # None: the same as `path`

    def __post_init__(self):
        if self.stored_path is None:
            object.__setattr__(self, "stored_path", self.path)

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_name

    @property
    def is_weight(self) -> bool:
        """A model weight (counted as a parameter), not a quantization scale or zero point."""
        return self.quant_part in (None, "values")

    def hf_names(self, num_layers: int) -> list[str]:
        return [self.hf_name.format(i=i) for i in range(num_layers)] if self.stacked else [self.hf_name]


def _same(x):
    return x


def param_specs(config: Qwen2Config, quantization: QuantScheme | None = None) -> list[ParamSpec]:
    """The complete key map for a config, in HF checkpoint order.

    With `quantization`, each decoder projection's kernel becomes the specs of its quantized parts
    (`quantized_kernel_specs`).
    """
    D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    N, K, H = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    layer = "model.layers.{i}."

    def proj_in(heads):  # HF [heads*H, D] <-> ours [D, heads, H]
        return (lambda w: w.T.reshape(D, heads, H), lambda k: k.reshape(D, heads * H).T)

    def bias(heads):  # HF [heads*H] <-> ours [heads, H]
        return (lambda b: b.reshape(heads, H), lambda b: b.reshape(heads * H))

    transpose = (lambda w: w.T, lambda k: k.T)
    o_proj = (lambda w: w.T.reshape(N, H, D), lambda k: k.reshape(N * H, D).T)
    same = (_same, _same)
    attn, mlp = ("model", "layers", "self_attn"), ("model", "layers", "mlp")

    def kernel(sub: Key, name: str, in_shape, out_shape, convert) -> list[ParamSpec]:
        """A projection kernel: ours is [*in, *out], HF's [out, in]."""
        path, hf_shape = (*sub, "kernel"), (math.prod(out_shape), math.prod(in_shape))
        if quantization is not None:
            return quantized_kernel_specs(path, name, in_shape, out_shape, quantization)
        return [ParamSpec(path, name, (*in_shape, *out_shape), hf_shape, *convert)]

    specs = [ParamSpec(("model", "embed_tokens", "embedding"), "model.embed_tokens.weight", (V, D), (V, D), *same)]
    for sub, heads in (("q_proj", N), ("k_proj", K), ("v_proj", K)):
        specs += kernel((*attn, sub), f"{layer}self_attn.{sub}.weight", (D,), (heads, H), proj_in(heads))
        specs.append(
            ParamSpec((*attn, sub, "bias"), f"{layer}self_attn.{sub}.bias", (heads, H), (heads * H,), *bias(heads))
        )
    specs += kernel((*attn, "o_proj"), f"{layer}self_attn.o_proj.weight", (N, H), (D,), o_proj)
    specs += kernel((*mlp, "gate_proj"), f"{layer}mlp.gate_proj.weight", (D,), (F,), transpose)
    specs += kernel((*mlp, "up_proj"), f"{layer}mlp.up_proj.weight", (D,), (F,), transpose)
    specs += kernel((*mlp, "down_proj"), f"{layer}mlp.down_proj.weight", (F,), (D,), transpose)
    specs += [
        ParamSpec(
            ("model", "layers", "input_layernorm", "weight"), f"{layer}input_layernorm.weight", (D,), (D,), *same
        ),
        ParamSpec(
            ("model", "layers", "post_attention_layernorm", "weight"),
            f"{layer}post_attention_layernorm.weight",
            (D,),
            (D,),
            *same,
        ),
        ParamSpec(("model", "norm", "weight"), "model.norm.weight", (D,), (D,), *same),
    ]
    if not config.tie_word_embeddings:
        specs.append(ParamSpec(("lm_head", "weight"), "lm_head.weight", (V, D), (V, D), *same))
    return specs


# Where the parts of a quantized kernel sit in the model (`QuantizedKernel` attributes, below the
# kernel's path) and in checkpoints (beside the kernel, named as before the kernel was one value).
QUANTIZED_PARTS = {"values": ("values", "kernel"), "scale": ("scale", "kernel_scale"), "zero": ("zero", "kernel_zero")}


def quantized_kernel_specs(
    path: Key, hf_name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...], scheme: QuantScheme
) -> list[ParamSpec]:
    """The specs of a quantized kernel at model path `path`: stored values `[*out, groups, group']`,
    scales (and zero points) (`QUANTIZED_PARTS`).

    Their HF-side form is a `QuantizedMatrix`'s (`[out, in]` int8 values, `[out, groups]` scales):
    HF's weight `[out, in]` is the out-major matrix flattened, so converting is reshaping (and
    packing int4).
    """
    out, inputs = math.prod(out_shape), math.prod(in_shape)
    groups = scheme.groups(inputs, hf_name.replace("{i}", "N"))
    values_shape = (*out_shape, *scheme.stored_shape(inputs))

    def reshaping(ours, hf):
        return (lambda a: a.reshape(ours), lambda a: a.reshape(hf))

    # HF orientation: int8 values [out, in] (4-bit ones unpacked), which `pack` stores.
    values = (
        lambda v: pack(v.reshape(out, inputs), scheme).reshape(values_shape),
        lambda s: unpack(s.reshape(out, *values_shape[-2:]), scheme).reshape(out, inputs),
    )

    def where(part: str) -> dict[str, Key]:
        attribute, stored_name = QUANTIZED_PARTS[part]
        return {"path": (*path, attribute), "stored_path": (*path[:-1], stored_name)}

    specs = [
        ParamSpec(
            hf_name=hf_name,
            shape=values_shape,
            hf_shape=(out, inputs),
            from_hf=values[0],
            to_hf=values[1],
            quant_part="values",
            scheme=scheme,
            **where("values"),
        )
    ]
    for part in ("scale", "zero"):
        if part == "scale" or scheme.zero_point:
            from_hf, to_hf = reshaping((*out_shape, groups), (out, groups))
            specs.append(
                ParamSpec(
                    hf_name=hf_name,
                    shape=(*out_shape, groups),
                    hf_shape=(out, groups),
                    from_hf=from_hf,
                    to_hf=to_hf,
                    quant_part=part,
                    scheme=scheme,
                    **where(part),
                )
            )
    return specs


# --------------------------------------------------------------------------- groups
@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """Parameters read and written together (one Orbax checkpoint under `params/<name>`).

    `layer`: the decoder layer whose slices of the stacked parameters this group holds.
    `rows`: the (start, stop) rows of an unstacked matrix this group holds (a row block).
    Neither: the whole of each (unstacked) parameter.
    """

    name: str
    specs: tuple[ParamSpec, ...]
    layer: int | None = None
    rows: tuple[int, int] | None = None

    def key(self, spec: ParamSpec) -> Key:
        """Where a parameter sits inside the group's tree (its stored path minus the group prefix)."""
        return spec.stored_path[2:] if self.layer is not None else spec.stored_path[-1:]

    def part_shape(self, spec: ParamSpec) -> tuple[int, ...]:
        """Shape of the part of `spec` this group holds, in our layout."""
        if self.rows is not None:
            return (self.rows[1] - self.rows[0], *spec.shape[1:])
        return spec.shape

    def take(self, spec: ParamSpec, value):
        """This group's part of the whole parameter `value` (stacked on layers for layer groups)."""
        if self.layer is not None:
            return value[self.layer]
        if self.rows is not None:
            return value[self.rows[0] : self.rows[1]]
        return value

    def hf_name(self, spec: ParamSpec) -> str:
        return spec.hf_name.format(i=self.layer) if self.layer is not None else spec.hf_name

    @property
    def quantization(self) -> QuantScheme | None:
        """The scheme of the quantized kernels in this group (None: all float)."""
        return next((spec.scheme for spec in self.specs if spec.scheme is not None), None)

    def read_hf(self, spec: ParamSpec, read: Callable[[str], np.ndarray]) -> np.ndarray:
        """This group's part of a float `spec`, in our layout, from an HF tensor reader (`read(name)`).

        Row blocks slice the HF tensor before converting: on a memory-mapped tensor only these
        rows are read. A reader may hand over a quantized tensor (`QuantizedMatrix`); a float
        parameter gets it dequantized.
        """
        tensor = read(self.hf_name(spec))
        if isinstance(tensor, QuantizedMatrix):
            tensor = tensor.dequantize()
        if self.rows is not None:
            tensor = tensor[self.rows[0] : self.rows[1]]
        return spec.from_hf(tensor)

    def read_hf_arrays(self, read: Callable[[str], np.ndarray | QuantizedMatrix]) -> dict[Key, np.ndarray]:
        """Every array of this group, in our layout, from HF-named tensors (each read once).

        `read(name)` returns a float array or a `QuantizedMatrix`. A quantized kernel takes a
        `QuantizedMatrix` of its own scheme as it is; anything else is (de)quantized to its scheme.
        """
        arrays = {}
        for spec in self.specs:
            if spec.quant_part is None:
                arrays[self.key(spec)] = self.read_hf(spec, read)
            elif spec.quant_part == "values":
                matrix = quantized_for(spec.scheme, read(self.hf_name(spec)), self.hf_name(spec))
                parts = {"values": matrix.values, "scale": matrix.scale, "zero": matrix.zero}
                for part in self.specs:
                    if part.hf_name == spec.hf_name and part.quant_part is not None:
                        arrays[self.key(part)] = part.from_hf(parts[part.quant_part])
        return arrays


def quantized_for(scheme: QuantScheme, tensor: np.ndarray | QuantizedMatrix, name: str) -> QuantizedMatrix:
    """`tensor` (float `[out, in]` or quantized) as a QuantizedMatrix of `scheme`."""
    if isinstance(tensor, QuantizedMatrix):
        same_grid = (tensor.scheme.bits, tensor.scheme.group_size) == (scheme.bits, scheme.group_size)
        if same_grid and (tensor.zero is None or scheme.zero_point):
            if scheme.zero_point and tensor.zero is None:  # a symmetric tensor in an asymmetric model
                return dataclasses.replace(tensor, zero=np.zeros_like(tensor.scale), scheme=scheme)
            return tensor
        tensor = tensor.dequantize()
    return quantize_host(np.asarray(tensor, np.float32), scheme, name)


def hf_tensors(group: ParamGroup, arrays: dict[Key, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float host array in HF layout) for a group's arrays; quantized kernels are dequantized."""
    for spec in group.specs:
        if spec.quant_part is None:
            yield group.hf_name(spec), np.asarray(spec.to_hf(np.asarray(jax.device_get(arrays[group.key(spec)]))))
        elif spec.quant_part == "values":
            parts = {
                part.quant_part: np.asarray(part.to_hf(np.asarray(jax.device_get(arrays[group.key(part)]))))
                for part in group.specs
                if part.hf_name == spec.hf_name and part.quant_part is not None
            }
            matrix = QuantizedMatrix(parts["values"], parts["scale"], parts.get("zero"), spec.scheme)
            yield group.hf_name(spec), matrix.dequantize()


def row_block_rows(spec: ParamSpec, row_block_elements: int | None = None) -> int:
    """Rows per block of an unstacked parameter (all of them when it is small or 1-D)."""
    rows, row_size = spec.shape[0], math.prod(spec.shape[1:])
    if len(spec.shape) < 2:
        return rows
    return max(1, (row_block_elements or ROW_BLOCK_ELEMENTS) // max(1, row_size))


def param_groups(
    config: Qwen2Config, row_block_elements: int | None = None, quantization: QuantScheme | None = None
) -> list[ParamGroup]:
    """The groups of a config in HF checkpoint order: embedding, layers 0..L-1, final norm, lm_head.

    `row_block_elements` (default `ROW_BLOCK_ELEMENTS`; a checkpoint records its own in the
    manifest) bounds the row blocks of unstacked matrices. `quantization`: the decoder kernels are
    quantized (their parts are in the layer groups).
    """
    specs = param_specs(config, quantization)
    stacked = tuple(s for s in specs if s.stacked)
    before = [s for s in specs if not s.stacked and s.path[:2] == ("model", "embed_tokens")]
    after = [s for s in specs if not s.stacked and s not in before]

    def unstacked(spec: ParamSpec) -> list[ParamGroup]:
        prefix = ".".join(spec.path[:-1])
        rows, block = spec.shape[0], row_block_rows(spec, row_block_elements)
        if rows <= block:
            return [ParamGroup(prefix, (spec,))]
        return [
            ParamGroup(f"{prefix}.rows{start}", (spec,), rows=(start, min(start + block, rows)))
            for start in range(0, rows, block)
        ]

    layers = [ParamGroup(f"model.layers.{i}", stacked, layer=i) for i in range(config.num_hidden_layers)]
    return [g for s in before for g in unstacked(s)] + layers + [g for s in after for g in unstacked(s)]


def count_parameters(groups: list[ParamGroup]) -> int:
    """Parameters held by these groups (each row block counted for its own rows only; a quantized
    kernel counts its weights, not its stored bytes; scales and zero points are not parameters)."""
    return sum(
        math.prod(spec.hf_shape if spec.quant_part else group.part_shape(spec))
        for group in groups
        for spec in group.specs
        if spec.is_weight
    )


def count_bytes(groups: list[ParamGroup], dtypes: Callable[[ParamSpec], Any]) -> int:
    """Bytes of the arrays these groups hold, `dtypes(spec)` giving each one's dtype."""
    return sum(
        math.prod(group.part_shape(spec)) * np.dtype(dtypes(spec)).itemsize for group in groups for spec in group.specs
    )
