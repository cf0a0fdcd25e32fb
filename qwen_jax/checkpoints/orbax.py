"""The qwen-jax Orbax layout: its manifest, its single writer and its reader.

Layout of a directory (written by `qwen-jax convert` and the trainer's final model)::

    qwen_jax_manifest.json     format, source, dtype, parameter count, row block size, groups,
                               quantization (format version 2 when quantized)
    config.json                HF config (what `Qwen2Config.from_hf` reads)
    generation_config.json, tokenizer files
    params/<group>/            one standard Orbax PyTree checkpoint per parameter group
                               (`qwen_jax.checkpoints.params.param_groups`)

Each group directory is a plain Orbax checkpoint (`orbax.checkpoint.StandardCheckpointer().restore(path)`
reads it). Restoring with targets reads every group straight into the target shardings, so each
device reads only its own slice.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

from qwen_jax.checkpoints import params
from qwen_jax.checkpoints.outdir import copy_side_files, write_error, write_json
from qwen_jax.checkpoints.params import (
    Key,
    ParamGroup,
    ParamSpec,
    count_bytes,
    count_parameters,
    hf_tensors,
    param_groups,
)
from qwen_jax.config import Qwen2Config
from qwen_jax.errors import CheckpointError
from qwen_jax.model.causal_lm import Qwen2ForCausalLM, decoder_linears
from qwen_jax.ops.quant import QuantScheme
from qwen_jax.version import __version__

MANIFEST = "qwen_jax_manifest.json"


FORMAT = "qwen-jax-orbax"


FORMAT_VERSION = 1


# Quantized checkpoints (integer kernels with scales, see `qwen_jax.ops.quant`) are version 2, so a
# qwen-jax that predates them refuses them instead of misreading them.
QUANTIZED_FORMAT_VERSION = 2


PARAMS_DIR = "params"


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
        raise CheckpointError(
            f"{manifest_path}: format version {manifest.get('format_version')!r}, this qwen-jax "
            f"reads {FORMAT_VERSION} and {QUANTIZED_FORMAT_VERSION}"
        )
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
    `finish` with the same arguments, on one shared directory). The caller owns the directory (e.g.
    `qwen_jax.checkpoints.outdir.atomic_output_dir`).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        config: Qwen2Config,
        *,
        row_block_elements: int | None = None,
        quantization: QuantScheme | None = None,
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        self.config = config
        self.row_block_elements = row_block_elements or params.ROW_BLOCK_ELEMENTS
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
                raise ValueError(
                    f"{group.name}: {'.'.join(key)} has shape {list(array.shape)}, this group holds "
                    f"{list(expected[key])}"
                )
        for spec in group.specs:
            dtype = np.dtype(arrays[group.key(spec)].dtype)
            wanted = {"values": np.int8, "scale": np.float32, "zero": np.float32}
            if spec.quant_part is not None and dtype != np.dtype(wanted[spec.quant_part]):
                raise ValueError(
                    f"{group.name}: {'.'.join(group.key(spec))} is {dtype}, the quantization stores "
                    f"{np.dtype(wanted[spec.quant_part])}"
                )
        os.makedirs(os.path.join(self.directory, PARAMS_DIR), exist_ok=True)
        try:
            self._checkpointer.save(group_dir(self.directory, group), args=ocp.args.StandardSave(nest(arrays)))
        except ValueError as e:  # how tensorstore (under Orbax) reports I/O failures
            raise write_error(self.directory, e) from None
        nbytes = sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in arrays.values())
        self.written.append(group.name)
        self.bytes_written += nbytes
        # The checkpoint's dtype is that of its float parameters (quantized parts have their own).
        self.dtypes.update(
            np.dtype(arrays[group.key(spec)].dtype).name for spec in group.specs if spec.quant_part is None
        )
        return nbytes

    def finish(
        self,
        *,
        source: str,
        config_json: dict[str, Any] | None = None,
        side_files_from: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write config.json, the side files and the manifest once every group is written; returns the manifest."""
        missing = [group.name for group in self.groups if group.name not in self.written]
        if missing:
            raise ValueError(
                f"{self.directory}: groups not written: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
            )
        if len(self.dtypes) != 1:
            raise ValueError(f"{self.directory}: parameters stored in several dtypes {sorted(self.dtypes)}")
        (dtype,) = self.dtypes
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


def model_groups(
    model: Qwen2ForCausalLM, row_block_elements: int | None = None
) -> Iterator[tuple[ParamGroup, dict[Key, jax.Array]]]:
    """(group, its arrays) of a model's parameters, as device arrays (scanned or unrolled layers)."""
    flat = {path: variable.get_value() for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    # Unrolled kernels stored [*out, *in] (`unstack_layers` on CPU) are written in the einsum layout.
    out_major = {
        ("model", "layers", *path, "kernel"): linear for path, linear in decoder_linears(model) if linear.out_major
    }
    for group in param_groups(model.config, row_block_elements, model.quantization):
        arrays = {}
        for spec in group.specs:
            if spec.path in flat:
                arrays[group.key(spec)] = group.take(spec, flat[spec.path])
            else:  # unrolled layers (scan_layers=False): each layer has its own arrays
                path = _layer_path(spec, group.layer)
                value = flat[path]
                arrays[group.key(spec)] = out_major[path].einsum_kernel(value) if path in out_major else value
        yield group, arrays


def _layer_path(spec: ParamSpec, layer: int) -> Key:
    """The model path of one layer's array of a stacked parameter in an unrolled model."""
    return (*spec.path[:2], layer, *spec.path[2:])


def save_model(
    model: Qwen2ForCausalLM,
    directory: str | os.PathLike,
    *,
    source: str,
    side_files_from: str | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Write a model's parameters in the qwen-jax Orbax layout into `directory`; returns the manifest.

    One group at a time goes through Orbax, shard by shard from the devices. The caller owns the
    directory (wrap it in `atomic_output_dir` for an all-or-nothing output).
    """
    writer = OrbaxWriter(directory, model.config, quantization=model.quantization)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))

    def dtype(spec: ParamSpec):
        variable = flat[spec.path] if spec.path in flat else flat[_layer_path(spec, 0)]
        return variable.get_value().dtype

    total = count_bytes(writer.groups, dtype)
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="save",
        leave=False,
        disable=None if progress is None else not progress,
    ) as bar:
        for group, arrays in model_groups(model, writer.row_block_elements):
            bar.update(writer.write_group(group, arrays))
    return writer.finish(source=source, side_files_from=side_files_from)


def restore_group(
    checkpoint_dir: str | os.PathLike, group: ParamGroup, targets: dict[Key, jax.ShapeDtypeStruct] | None = None
) -> dict[Key, Any]:
    """Read one group: into the targets' shapes, dtypes and shardings, or as host numpy arrays without targets."""
    directory = group_dir(checkpoint_dir, group)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{checkpoint_dir}: missing parameter group {PARAMS_DIR}/{group.name}")
    # Host reads involve no other process (in a multi-process run, e.g. process 0 exporting OUT/model).
    checkpointer = orbax_checkpointer(this_process_only=targets is None)
    try:
        if targets is None:  # numpy templates (zero-stride views: no memory), whatever devices wrote the group
            stored = checkpointer.metadata(directory).item_metadata.tree
            template = jax.tree.map(lambda meta: np.broadcast_to(np.zeros((), meta.dtype), meta.shape), stored)
        else:
            template = nest(targets)
        tree = checkpointer.restore(directory, args=ocp.args.StandardRestore(template))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{directory}: unreadable Orbax group ({type(e).__name__}: {_first_line(e)})") from None
    restored = {}
    for spec in group.specs:
        key = group.key(spec)
        try:
            value = tree
            for part in key:
                value = value[part]
        except (KeyError, TypeError):
            raise CheckpointError(f"{directory}: parameter {'.'.join(key)!r} missing") from None
        restored[key] = value
    return restored


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


class OrbaxReader:
    """Reads a qwen-jax Orbax directory group by group (see `qwen_jax.checkpoints.assemble.CheckpointReader`)."""

    def __init__(self, directory: str | os.PathLike):
        self.source = os.fspath(directory)
        self.manifest = read_manifest(self.source)
        self.config = Qwen2Config.from_hf(self.source)
        self.row_block_elements = self.manifest.get("row_block_elements")
        self.quantization = manifest_quantization(self.manifest)
        self.dtypes = {np.dtype(self.manifest["dtype"])} if self.manifest.get("dtype") else set()

    def read_group(self, group: ParamGroup, targets: dict[Key, jax.ShapeDtypeStruct]) -> dict[Key, Any]:
        if group.quantization == self.quantization or group.layer is None:
            # Stored arrays are cast to the target dtype and sharding while they are read.
            return restore_group(self.source, group, targets)
        # The kernels are wanted quantized differently (or at all): read this layer as stored,
        # then convert through the HF layout, one layer on the host at a time.
        stored = next(
            g for g in param_groups(self.config, self.row_block_elements, self.quantization) if g.name == group.name
        )
        tensors = dict(hf_tensors(stored, restore_group(self.source, stored)))
        return group.read_hf_arrays(tensors.__getitem__)
