"""Orbax checkpoints of qwen-jax parameters, as written by `qwen-jax convert`.

Layout of a converted directory::

    qwen_jax_manifest.json     format, source, dtype, parameter count, qwen-jax version, groups
    config.json                HF config (what `Qwen2Config.from_hf` reads)
    generation_config.json, tokenizer files
    params/<group>/            one standard Orbax PyTree checkpoint per parameter group

A group is one decoder layer (`model.layers.3`: that layer's slice of every stacked parameter,
in our einsum layout), one small unstacked parameter (`model.norm`), or a block of rows of a
large one (`model.embed_tokens.rows0`, `lm_head.rows18724`, at most 2**24 elements each).
Groups bound host memory on both sides of a conversion: the converter holds one group at a time
(writing one through Orbax costs about twice its size again in tensorstore buffers). Each group
directory is a plain Orbax checkpoint (`orbax.checkpoint.StandardCheckpointer().restore(path)`
reads it).

Loading restores every group with target shardings derived from the model's logical axes
(`qwen_jax.sharding.state_shardings`), so each device reads only its own slice, and writes layer
slices and row blocks into preallocated sharded arrays: the host never holds the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen_jax.config import Qwen2Config
from qwen_jax.hf import (
    ParamSpec, abstract_model, drop_leading_axis, leaf_shardings, param_specs, set_slice, sharded_zeros,
)
from qwen_jax.model import Qwen2ForCausalLM
from qwen_jax.safetensors_io import CheckpointError
from qwen_jax.sharding import DEFAULT_RULES, ShardingRules

MANIFEST = "qwen_jax_manifest.json"
FORMAT = "qwen-jax-orbax"
FORMAT_VERSION = 1
PARAMS_DIR = "params"


# Unstacked matrices (embedding, lm_head: 272 MB each for 0.5B in bfloat16) are stored in row
# blocks of at most this many elements, so no group is much larger than a decoder layer.
ROW_BLOCK_ELEMENTS = 2**24


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """Parameters saved together as one Orbax checkpoint under `params/<name>`.

    `layer`: the decoder layer whose slices of the stacked parameters this group holds.
    `rows`: the (start, stop) rows of an unstacked matrix this group holds (a row block).
    """

    name: str
    specs: tuple[ParamSpec, ...]
    layer: int | None = None
    rows: tuple[int, int] | None = None

    def key(self, spec: ParamSpec) -> tuple[str, ...]:
        """Where a parameter sits inside the group's tree (its model path minus the group prefix)."""
        return spec.path[2:] if self.layer is not None else spec.path[-1:]

    def stored_shape(self, model_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the group's array for a parameter of shape `model_shape` in the model."""
        if self.layer is not None:
            return tuple(model_shape[1:])
        if self.rows is not None:
            return (self.rows[1] - self.rows[0], *model_shape[1:])
        return tuple(model_shape)

    def hf_name(self, spec: ParamSpec) -> str:
        return spec.hf_name.format(i=self.layer) if self.layer is not None else spec.hf_name


def param_groups(config: Qwen2Config, row_block_elements: int | None = None) -> list[ParamGroup]:
    """The groups of a config in HF checkpoint order: embedding, layers 0..L-1, final norm, lm_head.

    `row_block_elements` (default ROW_BLOCK_ELEMENTS; a checkpoint records its own in the manifest)
    bounds the row blocks of unstacked matrices.

    Unstacked parameters keep the HF layout (their from_hf/to_hf are the identity), so a row
    block of ours is a row block of the HF tensor.
    """
    specs = param_specs(config)
    stacked = tuple(s for s in specs if s.stacked)
    before = [s for s in specs if not s.stacked and s.path[:2] == ("model", "embed_tokens")]
    after = [s for s in specs if not s.stacked and s not in before]

    def unstacked(spec: ParamSpec) -> list[ParamGroup]:
        prefix = ".".join(spec.path[:-1])
        rows, row_size = spec.hf_shape[0], int(np.prod(spec.hf_shape[1:], dtype=np.int64))
        block = max(1, (row_block_elements or ROW_BLOCK_ELEMENTS) // max(1, row_size))
        if len(spec.hf_shape) < 2 or rows <= block:
            return [ParamGroup(prefix, (spec,))]
        return [ParamGroup(f"{prefix}.rows{start}", (spec,), rows=(start, min(start + block, rows)))
                for start in range(0, rows, block)]

    layers = [ParamGroup(f"model.layers.{i}", stacked, layer=i) for i in range(config.num_hidden_layers)]
    return [g for s in before for g in unstacked(s)] + layers + [g for s in after for g in unstacked(s)]


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    """A directory written by `qwen-jax convert` (it carries our manifest)."""
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a converted directory, checked for format and version."""
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
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{manifest_path}: format version {manifest.get('format_version')!r}, this qwen-jax reads {FORMAT_VERSION}"
        )
    return manifest


def _checkpointer() -> ocp.Checkpointer:
    # Synchronous on purpose: a converter holds one group in memory, never two.
    return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def _nest(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    return tree


def _get(tree: dict[str, Any], key: tuple[str, ...]) -> Any:
    for part in key:
        tree = tree[part]
    return tree


def group_dir(checkpoint_dir: str | os.PathLike, group: ParamGroup) -> str:
    # Orbax insists on absolute paths.
    return os.path.join(os.path.abspath(os.fspath(checkpoint_dir)), PARAMS_DIR, group.name)


def save_group(checkpoint_dir: str | os.PathLike, group: ParamGroup, arrays: dict[tuple[str, ...], np.ndarray]) -> None:
    """Write one group (arrays keyed by `group.key(spec)`) as an Orbax checkpoint."""
    os.makedirs(os.path.join(os.fspath(checkpoint_dir), PARAMS_DIR), exist_ok=True)
    _checkpointer().save(group_dir(checkpoint_dir, group), args=ocp.args.StandardSave(_nest(arrays)))


def restore_group(checkpoint_dir: str | os.PathLike, group: ParamGroup,
                  targets: dict[tuple[str, ...], jax.ShapeDtypeStruct] | None = None) -> dict[tuple[str, ...], Any]:
    """Read one group: into the targets' shapes, dtypes and shardings, or as host numpy arrays without targets."""
    directory = group_dir(checkpoint_dir, group)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{checkpoint_dir}: missing parameter group {PARAMS_DIR}/{group.name}")
    args = ocp.args.StandardRestore(_nest(targets) if targets is not None else None)
    try:
        tree = _checkpointer().restore(directory, args=args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{directory}: unreadable Orbax group ({type(e).__name__}: {_first_line(e)})") from None
    restored = {}
    for spec in group.specs:
        key = group.key(spec)
        try:
            restored[key] = _get(tree, key)
        except (KeyError, TypeError):
            raise CheckpointError(f"{directory}: parameter {'.'.join(key)!r} missing") from None
    return restored


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def load_orbax_model(
    path: str | os.PathLike,
    *,
    dtype=None,
    param_dtype=None,
    mesh: Mesh | None = None,
    rules: ShardingRules = DEFAULT_RULES,
) -> Qwen2ForCausalLM:
    """Restore a converted directory into a model, each parameter straight into its shards.

    dtype/param_dtype/mesh/rules mean what they mean for `qwen_jax.hf.load_model`; stored
    parameters are cast to `param_dtype` while they are read.
    """
    path = os.fspath(path)
    manifest = read_manifest(path)
    config = Qwen2Config.from_hf(path)
    model = abstract_model(config, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)
    graphdef, abstract_state = nnx.split(model)
    shardings = leaf_shardings(abstract_state, mesh, rules)
    flat = dict(nnx.to_flat_state(abstract_state))
    values: dict[tuple[str, ...], jax.Array] = {}
    for group in param_groups(config, manifest.get("row_block_elements")):
        targets = {}
        for spec in group.specs:
            variable, sharding = flat[spec.path], shardings[spec.path]
            if group.layer is not None:
                sharding = drop_leading_axis(sharding)
            elif group.rows is not None:
                sharding = _replicate_leading_axis(sharding, len(variable.shape))
            shape = group.stored_shape(tuple(variable.shape))
            targets[group.key(spec)] = jax.ShapeDtypeStruct(shape, variable.dtype, sharding=sharding)
        restored = restore_group(path, group, targets)
        for spec in group.specs:
            value = restored[group.key(spec)]
            if group.layer is None and group.rows is None:
                values[spec.path] = value
                continue
            if spec.path not in values:  # a stacked parameter or a row-blocked matrix: fill it in place
                variable = flat[spec.path]
                values[spec.path] = sharded_zeros(tuple(variable.shape), variable.dtype, shardings[spec.path])
            start = group.layer if group.layer is not None else group.rows[0]
            values[spec.path] = set_slice(values[spec.path], value, start, group.layer is not None)
    for param_path, value in values.items():
        variable = flat[param_path]
        variable.set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _replicate_leading_axis(sharding: jax.sharding.Sharding, ndim: int) -> jax.sharding.Sharding:
    """The sharding of a row block: the full parameter's, except along rows (blocks need not divide)."""
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        return NamedSharding(sharding.mesh, PartitionSpec(None, *spec[1:]))
    return sharding


