"""The parameter layout every reader and writer shares: specs, groups, placement, and the Orbax writer.

One floor under all checkpoint formats:

- `param_specs(config, quantization)`: every parameter of ours, its logical shape (per layer for
  stacked parameters) and how it maps to HF tensor(s). With a `quantization` (`qwen_jax.quant`),
  each decoder kernel is three specs, its stored integers, scales (and zero points), which
  readers fill from a `QuantizedMatrix` or by quantizing a float tensor (`ParamGroup.read_hf_arrays`).
- `param_groups(config)`: the units checkpoints are read and written in. A group is one decoder
  layer (`model.layers.3`: that layer's slice of every stacked parameter), one small unstacked
  parameter (`model.norm`), or a block of rows of a large one (`model.embed_tokens.rows0`,
  `lm_head.rows18724`, at most `ROW_BLOCK_ELEMENTS` elements). `ParamGroup.part_shape` and
  `ParamGroup.take` are the one definition of "the part of a parameter this group holds", used by
  every reader, writer and counter (`count_parameters`).
- `assemble_model(reader, ...)`: builds a model from any reader (HF safetensors, Orbax, ...) by
  placing each group's arrays straight into their shards; the host never holds the model.
- `OrbaxWriter`: the single writer of the qwen-jax Orbax layout (`qwen-jax convert`, the trainer's
  final model). Layout of such a directory::

      qwen_jax_manifest.json     format, source, dtype, parameter count, row block size, groups,
                                 quantization (format version 2 when quantized)
      config.json                HF config (what `Qwen2Config.from_hf` reads)
      generation_config.json, tokenizer files
      params/<group>/            one standard Orbax PyTree checkpoint per parameter group

Readers (`qwen_jax.hf.HFReader`, `qwen_jax.checkpoint.OrbaxReader`, `qwen_jax.quantized_hf.PrequantizedReader`
for GPTQ/AWQ, `qwen_jax.gguf_file.GGUFReader`) sit above this module and `qwen_jax.load.load_model`
picks one; nothing here imports them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen_jax.config import Qwen2Config
from qwen_jax.model import Qwen2ForCausalLM, default_dtype
from qwen_jax import quant
from qwen_jax.quant import QuantizedMatrix, QuantScheme
from qwen_jax.outdir import copy_side_files, write_error, write_json
from qwen_jax.safetensors_io import CheckpointError
from qwen_jax.sharding import DEFAULT_RULES, ShardingRules, state_shardings

MANIFEST = "qwen_jax_manifest.json"
FORMAT = "qwen-jax-orbax"
FORMAT_VERSION = 1
# Quantized checkpoints (integer kernels with scales, see `qwen_jax.quant`) are version 2, so a
# qwen-jax that predates them refuses them instead of misreading them.
QUANTIZED_FORMAT_VERSION = 2
PARAMS_DIR = "params"

# Unstacked matrices (embedding, lm_head: 272 MB each for 0.5B in bfloat16) are stored in row
# blocks of at most this many elements, so no group is much larger than a decoder layer. Writers
# read it when they start and record it in the manifest; readers use the manifest's value.
ROW_BLOCK_ELEMENTS = 2**24

Key = tuple[str, ...]


# --------------------------------------------------------------------------- parameters
@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter of ours and how it maps to HF tensor(s).

    `shape` is our shape of one layer's slice for stacked parameters (the model adds a leading
    `layers` axis), of the whole parameter otherwise. `hf_name` contains `{i}` for stacked layer
    parameters (one HF tensor per layer). `from_hf`/`to_hf` convert one (per-layer) tensor between
    HF layout `hf_shape` and ours; unstacked parameters keep the HF layout (identity), so a row
    block of ours is a row block of the HF tensor.
    """

    path: Key
    hf_name: str
    shape: tuple[int, ...]
    hf_shape: tuple[int, ...]
    from_hf: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    # A part of a quantized kernel (see `qwen_jax.quant`): "values" (the integers, out-major; its
    # HF tensor is the float weight `hf_name`), "scale" or "zero" (which belong to that same HF
    # tensor and are read and written with it). None for a float parameter.
    quant_part: str | None = None
    scheme: QuantScheme | None = None

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
        specs.append(ParamSpec((*attn, sub, "bias"), f"{layer}self_attn.{sub}.bias", (heads, H), (heads * H,),
                               *bias(heads)))
    specs += kernel((*attn, "o_proj"), f"{layer}self_attn.o_proj.weight", (N, H), (D,), o_proj)
    specs += kernel((*mlp, "gate_proj"), f"{layer}mlp.gate_proj.weight", (D,), (F,), transpose)
    specs += kernel((*mlp, "up_proj"), f"{layer}mlp.up_proj.weight", (D,), (F,), transpose)
    specs += kernel((*mlp, "down_proj"), f"{layer}mlp.down_proj.weight", (F,), (D,), transpose)
    specs += [
        ParamSpec(("model", "layers", "input_layernorm", "weight"), f"{layer}input_layernorm.weight", (D,), (D,),
                  *same),
        ParamSpec(("model", "layers", "post_attention_layernorm", "weight"),
                  f"{layer}post_attention_layernorm.weight", (D,), (D,), *same),
        ParamSpec(("model", "norm", "weight"), "model.norm.weight", (D,), (D,), *same),
    ]
    if not config.tie_word_embeddings:
        specs.append(ParamSpec(("lm_head", "weight"), "lm_head.weight", (V, D), (V, D), *same))
    return specs


def quantized_kernel_specs(path: Key, hf_name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                           scheme: QuantScheme) -> list[ParamSpec]:
    """The specs of a quantized kernel: stored values `[*out, groups, group']`, scales (and zero points).

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
    values = (lambda v: quant.pack(v.reshape(out, inputs), scheme).reshape(values_shape),
              lambda s: quant.unpack(s.reshape(out, *values_shape[-2:]), scheme).reshape(out, inputs))
    specs = [ParamSpec(path, hf_name, values_shape, (out, inputs), *values, quant_part="values", scheme=scheme)]
    for part, name in (("scale", "kernel_scale"), ("zero", "kernel_zero")):
        if part == "scale" or scheme.zero_point:
            specs.append(ParamSpec((*path[:-1], name), hf_name, (*out_shape, groups), (out, groups),
                                   *reshaping((*out_shape, groups), (out, groups)), quant_part=part, scheme=scheme))
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
        """Where a parameter sits inside the group's tree (its model path minus the group prefix)."""
        return spec.path[2:] if self.layer is not None else spec.path[-1:]

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
            return value[self.rows[0]:self.rows[1]]
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
            tensor = tensor[self.rows[0]:self.rows[1]]
        return spec.from_hf(tensor)

    def read_hf_arrays(self, read: Callable[[str], "np.ndarray | QuantizedMatrix"]) -> dict[Key, np.ndarray]:
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


def quantized_for(scheme: QuantScheme, tensor: "np.ndarray | QuantizedMatrix", name: str) -> QuantizedMatrix:
    """`tensor` (float `[out, in]` or quantized) as a QuantizedMatrix of `scheme`."""
    if isinstance(tensor, QuantizedMatrix):
        same_grid = (tensor.scheme.bits, tensor.scheme.group_size) == (scheme.bits, scheme.group_size)
        if same_grid and (tensor.zero is None or scheme.zero_point):
            if scheme.zero_point and tensor.zero is None:  # a symmetric tensor in an asymmetric model
                return dataclasses.replace(tensor, zero=np.zeros_like(tensor.scale), scheme=scheme)
            return tensor
        tensor = tensor.dequantize()
    return quant.quantize_host(np.asarray(tensor, np.float32), scheme, name)


def hf_tensors(group: ParamGroup, arrays: dict[Key, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float host array in HF layout) for a group's arrays; quantized kernels are dequantized."""
    for spec in group.specs:
        if spec.quant_part is None:
            yield group.hf_name(spec), np.asarray(spec.to_hf(np.asarray(jax.device_get(arrays[group.key(spec)]))))
        elif spec.quant_part == "values":
            parts = {part.quant_part: np.asarray(part.to_hf(np.asarray(jax.device_get(arrays[group.key(part)]))))
                     for part in group.specs if part.hf_name == spec.hf_name and part.quant_part is not None}
            matrix = QuantizedMatrix(parts["values"], parts["scale"], parts.get("zero"), spec.scheme)
            yield group.hf_name(spec), matrix.dequantize()


def row_block_rows(spec: ParamSpec, row_block_elements: int | None = None) -> int:
    """Rows per block of an unstacked parameter (all of them when it is small or 1-D)."""
    rows, row_size = spec.shape[0], math.prod(spec.shape[1:])
    if len(spec.shape) < 2:
        return rows
    return max(1, (row_block_elements or ROW_BLOCK_ELEMENTS) // max(1, row_size))


def param_groups(config: Qwen2Config, row_block_elements: int | None = None,
                 quantization: QuantScheme | None = None) -> list[ParamGroup]:
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
        return [ParamGroup(f"{prefix}.rows{start}", (spec,), rows=(start, min(start + block, rows)))
                for start in range(0, rows, block)]

    layers = [ParamGroup(f"model.layers.{i}", stacked, layer=i) for i in range(config.num_hidden_layers)]
    return [g for s in before for g in unstacked(s)] + layers + [g for s in after for g in unstacked(s)]


def count_parameters(groups: list[ParamGroup]) -> int:
    """Parameters held by these groups (each row block counted for its own rows only; a quantized
    kernel counts its weights, not its stored bytes; scales and zero points are not parameters)."""
    return sum(math.prod(spec.hf_shape if spec.quant_part else group.part_shape(spec))
               for group in groups for spec in group.specs if spec.is_weight)


def count_bytes(groups: list[ParamGroup], dtypes: Callable[[ParamSpec], Any]) -> int:
    """Bytes of the arrays these groups hold, `dtypes(spec)` giving each one's dtype."""
    return sum(math.prod(group.part_shape(spec)) * np.dtype(dtypes(spec)).itemsize
               for group in groups for spec in group.specs)


# --------------------------------------------------------------------------- placement
def abstract_model(config: Qwen2Config, *, dtype=None, param_dtype=None, mesh=None, rules=DEFAULT_RULES,
                   quantization: QuantScheme | None = None):
    """The model with ShapeDtypeStruct leaves (nothing allocated); quantized kernels with `quantization`."""
    dtype = jnp.dtype(dtype or default_dtype())
    return nnx.eval_shape(lambda: quant.with_quantized_structure(Qwen2ForCausalLM(
        config, dtype=dtype, param_dtype=param_dtype or dtype, rngs=nnx.Rngs(0), mesh=mesh, rules=rules),
        quantization))


def leaf_shardings(abstract_state, mesh, rules) -> dict[Key, jax.sharding.Sharding]:
    """Target sharding of every parameter path (the first device when there is no mesh)."""
    if mesh is None:
        device = jax.devices()[0]
        return {path: jax.sharding.SingleDeviceSharding(device) for path, _ in nnx.to_flat_state(abstract_state)}
    return {path: v.get_value() for path, v in nnx.to_flat_state(state_shardings(abstract_state, mesh, rules))}


def put(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """Place a host array into its shards, each device receiving only its slice."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def part_sharding(group: ParamGroup, sharding: jax.sharding.Sharding, ndim: int) -> jax.sharding.Sharding:
    """The sharding of a group's part of a parameter whose sharding is `sharding` (rank `ndim`).

    A layer slice drops the leading `layers` axis; a row block keeps the parameter's sharding
    except along rows (blocks need not divide the devices).
    """
    if not isinstance(sharding, NamedSharding) or (group.layer is None and group.rows is None):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    if group.layer is not None:
        return NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))
    return NamedSharding(sharding.mesh, PartitionSpec(None, *spec[1:]))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def sharded_zeros(shape, dtype, sharding):
    """A zero buffer created directly in its shards (filled part by part while loading)."""
    return jax.lax.with_sharding_constraint(jnp.zeros(shape, dtype), sharding)


@functools.partial(jax.jit, donate_argnums=0, static_argnums=3)
def set_slice(buffer: jax.Array, part: jax.Array, start, squeezed: bool) -> jax.Array:
    """Write a layer slice (`squeezed`: index `start` of the leading axis) or a block of rows
    (from row `start`) into a preallocated sharded `buffer`, in place."""
    part = part.astype(buffer.dtype)
    if squeezed:
        return jax.lax.dynamic_update_index_in_dim(buffer, part, start, 0)
    return jax.lax.dynamic_update_slice_in_dim(buffer, part, start, 0)


class CheckpointReader(Protocol):
    """What `assemble_model` needs from a checkpoint format."""

    source: str  # for messages
    config: Qwen2Config
    row_block_elements: int | None  # the groups the checkpoint is stored in (None: the default)
    quantization: QuantScheme | None  # how the checkpoint's kernels are quantized (None: float)

    def read_group(self, group: ParamGroup, targets: dict[Key, jax.ShapeDtypeStruct]) -> dict[Key, Any]:
        """The group's arrays keyed by `group.key(spec)`, each of its target's shape (`part_shape`).

        The group's specs say whether its kernels are quantized and how (`ParamGroup.read_hf_arrays`
        converts HF-named tensors). Host arrays are placed by the caller; a reader that can
        restore straight into the target dtype and sharding (Orbax) returns jax arrays.
        """
        ...


def target_quantization(stored: QuantScheme | None, quantize: "str | QuantScheme | None") -> QuantScheme | None:
    """The quantization a loaded model gets: the checkpoint's own unless `quantize` asks for another.

    A requested scheme with the checkpoint's bits and groups keeps the checkpoint's (zero points
    included), so e.g. `quantize="int4"` on a GPTQ-Int4 checkpoint reads it as it is.
    """
    if quantize is None:
        return stored
    requested = QuantScheme.parse(quantize)
    if stored is not None and (stored.bits, stored.group_size) == (requested.bits, requested.group_size):
        return stored
    return requested


def assemble_model(
    reader: CheckpointReader,
    *,
    dtype=None,
    param_dtype=None,
    mesh: Mesh | None = None,
    rules: ShardingRules = DEFAULT_RULES,
    progress: bool | None = None,
    quantize: "str | QuantScheme | None" = None,
) -> Qwen2ForCausalLM:
    """A model whose parameters are read group by group from `reader`, straight into their shards.

    Stacked parameters and row-blocked matrices are preallocated in their shards and filled in
    place, so neither the host nor any device ever holds a second copy. `progress`: a tqdm bar
    over bytes (None: only on a terminal). `quantize`: see `target_quantization`; float kernels
    are quantized one tensor at a time on the host, so no float copy of the model is ever placed.
    """
    from tqdm import tqdm

    config = reader.config
    scheme = target_quantization(reader.quantization, quantize)
    model = abstract_model(config, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules, quantization=scheme)
    graphdef, abstract_state = nnx.split(model)
    shardings = leaf_shardings(abstract_state, mesh, rules)
    flat = dict(nnx.to_flat_state(abstract_state))
    groups = param_groups(config, reader.row_block_elements, scheme)
    values: dict[Key, jax.Array] = {}
    total = count_bytes(groups, lambda spec: flat[spec.path].dtype)
    with tqdm(total=total, unit="B", unit_scale=True, desc="load",
              disable=None if progress is None else not progress, leave=False) as bar:
        for group in groups:
            targets = {}
            for spec in group.specs:
                variable = flat[spec.path]
                sharding = part_sharding(group, shardings[spec.path], len(variable.shape))
                targets[group.key(spec)] = jax.ShapeDtypeStruct(group.part_shape(spec), variable.dtype,
                                                                sharding=sharding)
            arrays = reader.read_group(group, targets)
            for spec in group.specs:
                target = targets[group.key(spec)]
                value = _placed(arrays.pop(group.key(spec)), target, reader, group, spec)
                bar.update(math.prod(target.shape) * np.dtype(target.dtype).itemsize)
                if group.layer is None and group.rows is None:
                    values[spec.path] = value
                    continue
                if spec.path not in values:  # a stacked parameter or a row-blocked matrix: fill it in place
                    variable = flat[spec.path]
                    values[spec.path] = sharded_zeros(tuple(variable.shape), variable.dtype, shardings[spec.path])
                start = group.layer if group.layer is not None else group.rows[0]
                values[spec.path] = set_slice(values[spec.path], value, start, group.layer is not None)
    for param_path, value in values.items():
        flat[param_path].set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _placed(array, target: jax.ShapeDtypeStruct, reader: CheckpointReader, group: ParamGroup,
            spec: ParamSpec) -> jax.Array:
    if tuple(array.shape) != tuple(target.shape):
        raise CheckpointError(f"{reader.source}: {group.name}: parameter {'.'.join(group.key(spec))!r} has shape "
                              f"{list(array.shape)}, config.json implies {list(target.shape)}")
    if isinstance(array, jax.Array):
        return array
    return put(np.asarray(array).astype(target.dtype, copy=False), target.sharding)


# --------------------------------------------------------------------------- the Orbax layout
def group_dir(checkpoint_dir: str | os.PathLike, group: ParamGroup) -> str:
    # Orbax insists on absolute paths.
    return os.path.join(os.path.abspath(os.fspath(checkpoint_dir)), PARAMS_DIR, group.name)


def nest(flat: dict[Key, Any]) -> dict[str, Any]:
    """{('a', 'b'): x} -> {'a': {'b': x}} (the trees Orbax stores)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    return tree


def orbax_checkpointer(*, this_process_only: bool = False) -> ocp.Checkpointer:
    """A synchronous Checkpointer (a converter holds one group in memory, never two).

    `this_process_only`: for reads into host memory that one process of a multi-process run does
    alone; Orbax's default would wait for the other processes at its barriers."""
    if not this_process_only or jax.process_count() == 1:
        return ocp.Checkpointer(ocp.StandardCheckpointHandler())
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
    return ocp.Checkpointer(ocp.StandardCheckpointHandler(multiprocessing_options=alone), multiprocessing_options=alone)


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    """A directory in the qwen-jax Orbax layout (it carries our manifest)."""
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a qwen-jax Orbax directory, checked for format and version."""
    manifest_path = os.path.join(os.fspath(path), MANIFEST)
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a qwen-jax Orbax checkpoint (no {MANIFEST})") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: not a {FORMAT} manifest")
    if manifest.get("format_version") not in (FORMAT_VERSION, QUANTIZED_FORMAT_VERSION):
        raise CheckpointError(f"{manifest_path}: format version {manifest.get('format_version')!r}, this qwen-jax "
                              f"reads {FORMAT_VERSION} and {QUANTIZED_FORMAT_VERSION}")
    return manifest


def manifest_quantization(manifest: dict[str, Any]) -> QuantScheme | None:
    """How a qwen-jax Orbax checkpoint's kernels are quantized (None: float)."""
    record = manifest.get("quantization")
    return None if record is None else QuantScheme.from_json(record)


class OrbaxWriter:
    """The single writer of the qwen-jax Orbax layout, one group at a time.

    `write_group` takes host (numpy) or device (jax) arrays holding exactly the group's part of
    each parameter (`ParamGroup.take`/`read_hf` give it) and checks every shape against the
    config, so a writer cannot store a whole parameter where a row block belongs. Device arrays
    are written by Orbax shard by shard (in a multi-process run every process writes its own).
    `finish` writes config.json, the side files and the manifest, which makes the directory
    loadable (on process 0 only: in a multi-process run every process calls `write_group` and
    `finish` with the same arguments, on one shared directory). The caller owns the directory (e.g. `qwen_jax.outdir.atomic_output_dir`).
    """

    def __init__(self, directory: str | os.PathLike, config: Qwen2Config, *,
                 row_block_elements: int | None = None, quantization: QuantScheme | None = None):
        self.directory = os.path.abspath(os.fspath(directory))
        self.config = config
        self.row_block_elements = row_block_elements or ROW_BLOCK_ELEMENTS
        self.quantization = quantization
        self.groups = param_groups(config, self.row_block_elements, quantization)
        self.parameters = count_parameters(self.groups)
        self.written: list[str] = []
        self.bytes_written = 0
        self.dtypes: set[str] = set()
        self._checkpointer = orbax_checkpointer()

    def write_group(self, group: ParamGroup, arrays: dict[Key, Any]) -> int:
        """Write one group's arrays (keyed by `group.key(spec)`); returns the bytes written."""
        expected = {group.key(spec): group.part_shape(spec) for spec in group.specs}
        if set(arrays) != set(expected):
            raise ValueError(f"{group.name}: arrays for {sorted(arrays)}, the group holds {sorted(expected)}")
        for key, array in arrays.items():
            if tuple(array.shape) != expected[key]:
                raise ValueError(f"{group.name}: {'.'.join(key)} has shape {list(array.shape)}, this group holds "
                                 f"{list(expected[key])}")
        for spec in group.specs:
            dtype = np.dtype(arrays[group.key(spec)].dtype)
            wanted = {"values": np.int8, "scale": np.float32, "zero": np.float32}
            if spec.quant_part is not None and dtype != np.dtype(wanted[spec.quant_part]):
                raise ValueError(f"{group.name}: {'.'.join(group.key(spec))} is {dtype}, the quantization stores "
                                 f"{np.dtype(wanted[spec.quant_part])}")
        os.makedirs(os.path.join(self.directory, PARAMS_DIR), exist_ok=True)
        try:
            self._checkpointer.save(group_dir(self.directory, group), args=ocp.args.StandardSave(nest(arrays)))
        except ValueError as e:  # how tensorstore (under Orbax) reports I/O failures
            raise write_error(self.directory, e) from None
        nbytes = sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in arrays.values())
        self.written.append(group.name)
        self.bytes_written += nbytes
        # The checkpoint's dtype is that of its float parameters (quantized parts have their own).
        self.dtypes.update(np.dtype(arrays[group.key(spec)].dtype).name for spec in group.specs
                           if spec.quant_part is None)
        return nbytes

    def finish(self, *, source: str, config_json: dict[str, Any] | None = None, side_files_from: str | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write config.json, the side files and the manifest once every group is written; returns the manifest."""
        missing = [group.name for group in self.groups if group.name not in self.written]
        if missing:
            raise ValueError(f"{self.directory}: groups not written: {', '.join(missing[:3])}"
                             f"{' ...' if len(missing) > 3 else ''}")
        if len(self.dtypes) != 1:
            raise ValueError(f"{self.directory}: parameters stored in several dtypes {sorted(self.dtypes)}")
        (dtype,) = self.dtypes
        from qwen_jax import __version__

        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION if self.quantization is None else QUANTIZED_FORMAT_VERSION,
            "source": source,
            "dtype": dtype,
            "parameters": self.parameters,
            "bytes": self.bytes_written,
            "qwen_jax_version": __version__,
            "row_block_elements": self.row_block_elements,
            "groups": [group.name for group in self.groups],
            **({} if self.quantization is None else {"quantization": self.quantization.to_json()}),
            **(extra or {}),
        }
        if jax.process_index() != 0:  # in a multi-process run the groups are written together, these files once
            return manifest
        config_json = config_with_dtype(config_json if config_json is not None else self.config.to_hf(), dtype)
        write_json(os.path.join(self.directory, "config.json"), config_json)
        if side_files_from and os.path.isdir(side_files_from):
            copy_side_files(side_files_from, self.directory)
        if not os.path.exists(os.path.join(self.directory, "generation_config.json")):
            write_json(os.path.join(self.directory, "generation_config.json"), _generation_config(self.config))
        write_json(os.path.join(self.directory, MANIFEST), manifest)
        return manifest


def config_with_dtype(config_json: dict[str, Any], dtype) -> dict[str, Any]:
    """config.json contents announcing the stored dtype (transformers 4 writes `torch_dtype`, 5 writes `dtype`)."""
    out = dict(config_json)
    for key in [k for k in ("torch_dtype", "dtype") if k in out] or ["torch_dtype"]:
        out[key] = jnp.dtype(dtype).name
    return out


def _generation_config(config: Qwen2Config) -> dict:
    """The minimal generation config transformers derives from config.json when a checkpoint has none."""
    eos = list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id
    return {"bos_token_id": config.bos_token_id, "eos_token_id": eos}


def model_groups(model: Qwen2ForCausalLM, row_block_elements: int | None = None
                 ) -> Iterator[tuple[ParamGroup, dict[Key, jax.Array]]]:
    """(group, its arrays) of a model's parameters, as device arrays (scanned or unrolled layers)."""
    from qwen_jax.model import einsum_kernel

    flat = {path: variable.get_value() for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    # Unrolled kernels stored [*out, *in] (`unstack_layers` on CPU) are written in the einsum layout.
    out_major = {("model", "layers", *path, "kernel"): linear for path, linear in quant.decoder_linears(model)
                 if linear.out_major}
    for group in param_groups(model.config, row_block_elements, quant.model_quantization(model)):
        arrays = {}
        for spec in group.specs:
            if spec.path in flat:
                arrays[group.key(spec)] = group.take(spec, flat[spec.path])
            else:  # unrolled layers (scan_layers=False): each layer has its own arrays
                path = (*spec.path[:2], group.layer, *spec.path[2:])
                value = flat[path]
                arrays[group.key(spec)] = einsum_kernel(out_major[path], value) if path in out_major else value
        yield group, arrays


def save_model(model: Qwen2ForCausalLM, directory: str | os.PathLike, *, source: str,
               side_files_from: str | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Write a model's parameters in the qwen-jax Orbax layout into `directory`; returns the manifest.

    One group at a time goes through Orbax, shard by shard from the devices. The caller owns the
    directory (wrap it in `atomic_output_dir` for an all-or-nothing output).
    """
    from tqdm import tqdm

    writer = OrbaxWriter(directory, model.config, quantization=quant.model_quantization(model))
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    total = count_bytes(writer.groups, lambda spec: flat[spec.path].get_value().dtype if spec.path in flat
                        else model.param_dtype)
    with tqdm(total=total, unit="B", unit_scale=True, desc="save", leave=False,
              disable=None if progress is None else not progress) as bar:
        for group, arrays in model_groups(model, writer.row_block_elements):
            bar.update(writer.write_group(group, arrays))
    return writer.finish(source=source, side_files_from=side_files_from)
