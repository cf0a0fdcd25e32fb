"""Assembling a model from any checkpoint format, group by group, straight into its shards.

`CheckpointReader` is what a format provides (`qwen_jax.checkpoints.hf.HFReader`,
`qwen_jax.checkpoints.orbax.OrbaxReader`, `qwen_jax.checkpoints.gptq_awq.PrequantizedReader`,
`qwen_jax.checkpoints.gguf.GGUFReader`; `qwen_jax.load.open_checkpoint` picks one):
the arrays of one parameter group (`qwen_jax.checkpoints.params.param_groups`) at a time.
`assemble_model` builds the abstract model (`abstract_model`, quantized where asked), preallocates
each stacked or row-blocked parameter in its shards and fills it group by group, so the host never
holds the model and no device ever holds a second copy. Nothing here imports a reader.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from qwen_jax.checkpoints.params import (
    Key,
    ParamGroup,
    ParamSpec,
    count_bytes,
    param_groups,
)
from qwen_jax.config import Qwen2Config
from qwen_jax.errors import CheckpointError
from qwen_jax.model.causal_lm import Qwen2ForCausalLM, default_dtype
from qwen_jax.model.quantize import with_quantized_structure
from qwen_jax.ops.quant import QuantScheme
from qwen_jax.sharding import DEFAULT_RULES, ShardingRules, state_shardings


# --------------------------------------------------------------------------- placement
def abstract_model(
    config: Qwen2Config,
    *,
    dtype=None,
    param_dtype=None,
    mesh=None,
    rules=DEFAULT_RULES,
    quantization: QuantScheme | None = None,
):
    """The model with ShapeDtypeStruct leaves (nothing allocated); quantized kernels with `quantization`."""
    dtype = jnp.dtype(dtype or default_dtype())
    return nnx.eval_shape(
        lambda: with_quantized_structure(
            Qwen2ForCausalLM(
                config, dtype=dtype, param_dtype=param_dtype or dtype, rngs=nnx.Rngs(0), mesh=mesh, rules=rules
            ),
            quantization,
        )
    )


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


def target_quantization(stored: QuantScheme | None, quantize: str | QuantScheme | None) -> QuantScheme | None:
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
    quantize: str | QuantScheme | None = None,
) -> Qwen2ForCausalLM:
    """A model whose parameters are read group by group from `reader`, straight into their shards.

    Stacked parameters and row-blocked matrices are preallocated in their shards and filled in
    place, so neither the host nor any device ever holds a second copy. `progress`: a tqdm bar
    over bytes (None: only on a terminal). `quantize`: see `target_quantization`; float kernels
    are quantized one tensor at a time on the host, so no float copy of the model is ever placed.
    """
    config = reader.config
    scheme = target_quantization(reader.quantization, quantize)
    model = abstract_model(config, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules, quantization=scheme)
    graphdef, abstract_state = nnx.split(model)
    shardings = leaf_shardings(abstract_state, mesh, rules)
    flat = dict(nnx.to_flat_state(abstract_state))
    groups = param_groups(config, reader.row_block_elements, scheme)
    values: dict[Key, jax.Array] = {}
    total = count_bytes(groups, lambda spec: flat[spec.path].dtype)
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="load",
        disable=None if progress is None else not progress,
        leave=False,
    ) as bar:
        for group in groups:
            targets = {}
            for spec in group.specs:
                variable = flat[spec.path]
                sharding = part_sharding(group, shardings[spec.path], len(variable.shape))
                targets[group.key(spec)] = jax.ShapeDtypeStruct(
                    group.part_shape(spec), variable.dtype, sharding=sharding
                )
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


def _placed(
    array, target: jax.ShapeDtypeStruct, reader: CheckpointReader, group: ParamGroup, spec: ParamSpec
) -> jax.Array:
    if tuple(array.shape) != tuple(target.shape):
        raise CheckpointError(
            f"{reader.source}: {group.name}: parameter {'.'.join(group.key(spec))!r} has shape "
            f"{list(array.shape)}, config.json implies {list(target.shape)}"
        )
    if isinstance(array, jax.Array):
        return array
    return put(np.asarray(array).astype(target.dtype, copy=False), target.sharding)
