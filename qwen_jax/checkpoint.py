"""The reader of the qwen-jax Orbax layout (directories written by `qwen-jax convert` and the trainer).

The layout itself and its single writer live in `qwen_jax.layout`. Each group directory is a plain
Orbax checkpoint (`orbax.checkpoint.StandardCheckpointer().restore(path)` reads it). Restoring with
targets reads every group straight into the target shardings, so each device reads only its own
slice.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from qwen_jax.config import Qwen2Config
from qwen_jax.layout import (
    Key, ParamGroup, PARAMS_DIR, group_dir, hf_tensors, manifest_quantization, nest, orbax_checkpointer, param_groups,
    read_manifest,
)
from qwen_jax.safetensors_io import CheckpointError


def restore_group(checkpoint_dir: str | os.PathLike, group: ParamGroup,
                  targets: dict[Key, jax.ShapeDtypeStruct] | None = None) -> dict[Key, Any]:
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
    """Reads a qwen-jax Orbax directory group by group (see `qwen_jax.layout.CheckpointReader`)."""

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
        stored = next(g for g in param_groups(self.config, self.row_block_elements, self.quantization)
                      if g.name == group.name)
        tensors = dict(hf_tensors(stored, restore_group(self.source, stored)))
        return group.read_hf_arrays(tensors.__getitem__)
