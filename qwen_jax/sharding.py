"""Logical axis names -> mesh axes.

Every parameter and the main activations carry logical axis names (`vocab`, `embed`, `q_heads`,
`kv_heads`, `head_dim`, `mlp`, `layers`, `batch`, `seq`, ...). One small rules table maps them to
the mesh axes `data`, `fsdp`, `tensor`. Which parallelism you get is decided by the mesh shape:
a mesh with all devices on `tensor` is tensor parallel (the inference default), all devices on
`fsdp` shards weights along `embed` and the batch over the same devices (the training default).

A logical axis whose size is not divisible by its mesh axes is replicated instead of failing
(e.g. 2 kv heads over tensor=4).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen_jax.errors import MeshError

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis (or axes, or None for replicated)."""

    batch: MeshAxes = ("data", "fsdp")
    seq: MeshAxes = None
    cache_seq: MeshAxes = None
    vocab: MeshAxes = "tensor"
    embed: MeshAxes = "fsdp"
    q_heads: MeshAxes = "tensor"
    kv_heads: MeshAxes = "tensor"
    head_dim: MeshAxes = None
    mlp: MeshAxes = "tensor"
    layers: MeshAxes = None
    # Activations: the residual stream is not split along embed (it is all-gathered for matmuls).
    act_embed: MeshAxes = None

    def mesh_axes(self, logical: str | None) -> MeshAxes:
        if logical is None:
            return None
        try:
            return getattr(self, logical)
        except AttributeError:
            raise ValueError(f"no sharding rule for logical axis {logical!r}") from None


DEFAULT_RULES = ShardingRules()


def make_mesh(
    data: int | None = None,
    fsdp: int | None = None,
    tensor: int | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh with axes (data, fsdp, tensor).

    Unspecified sizes fill the remaining devices: with nothing given every device goes to
    `tensor` (inference default); `make_mesh(fsdp=None, data=1, tensor=1)` puts them all on fsdp.
    Exactly one unspecified axis absorbs the rest; others default to 1. Sizes the devices cannot
    hold raise `MeshError` (a `ValueError`).
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    known = math.prod(v for v in sizes.values() if v is not None)
    unknown = [k for k, v in sizes.items() if v is None]
    if len(devices) % known:
        raise MeshError(f"mesh sizes {sizes} do not divide the {len(devices)} available devices")
    fill = unknown[-1] if unknown else None  # tensor absorbs the rest by default
    for name in unknown:
        sizes[name] = len(devices) // known if name == fill else 1
    total = math.prod(sizes.values())
    if total > len(devices):
        raise MeshError(f"mesh {sizes} needs {total} devices, only {len(devices)} available")
    grid = np.asarray(devices[:total], dtype=object).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def platform_of(mesh: Mesh | None = None) -> str:
    """'cpu', 'gpu' or 'tpu': the platform of the mesh's devices, else (no mesh) of the default backend."""
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'data=2,fsdp=4,tensor=1' -> {'data': 2, 'fsdp': 4, 'tensor': 1} (for CLIs); `MeshError` if malformed."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in MESH_AXES or not value.isdigit() or int(value) < 1:
            raise MeshError(f"bad mesh spec {spec!r}: expected e.g. 'data=1,fsdp=4,tensor=2'")
        out[name] = int(value)
    return out


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in names if a in mesh.shape)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: ShardingRules = DEFAULT_RULES,
) -> PartitionSpec:
    """PartitionSpec for an array; non-dividing or repeated mesh axes are replicated."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        axes = rules.mesh_axes(name)
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        names = tuple(a for a in names if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        if not names or dim % _axis_size(mesh, names):
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*spec)


def named_sharding(
    logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: ShardingRules = DEFAULT_RULES
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], mesh: Mesh | None, rules: ShardingRules):
    """with_sharding_constraint on logical names; a no-op without a mesh."""
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(logical_axes, x.shape, mesh, rules))


def place_variables(variables: Iterable[nnx.Variable], mesh: Mesh | None, rules: ShardingRules = DEFAULT_RULES) -> None:
    """Put each variable's value into its shards on `mesh` by its `logical_axes` (nothing without a mesh)."""
    if mesh is None:
        return
    for variable in variables:
        axes = variable.get_metadata()["logical_axes"]
        variable.set_value(jax.device_put(variable.get_value(), named_sharding(axes, variable.shape, mesh, rules)))


def state_shardings(state, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES):
    """NamedSharding for every Variable in an nnx State (from its `logical_axes` metadata)."""

    def one(variable):
        axes = variable.get_metadata().get("logical_axes")
        if axes is None:
            axes = (None,) * len(variable.shape)
        return variable.replace(named_sharding(axes, variable.shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
