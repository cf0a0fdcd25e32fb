"""qwen-jax Orbax checkpoint -> HF safetensors directory (sharded past a size), streaming."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct

import numpy as np
from tqdm import tqdm

from qwen_jax.checkpoints.hf import INDEX_FILE, SINGLE_FILE
from qwen_jax.checkpoints.orbax import (
    config_with_dtype,
    manifest_quantization,
    read_manifest,
    restore_group,
)
from qwen_jax.checkpoints.outdir import (
    atomic_output_dir,
    copy_side_files,
    write_error,
    write_json,
)
from qwen_jax.checkpoints.params import ParamGroup, ParamSpec, hf_tensors, param_groups
from qwen_jax.checkpoints.safetensors import DTYPE_NAMES
from qwen_jax.config import Qwen2Config, read_config_json
from qwen_jax.convert.common import dtype_name, resolve_dtype
from qwen_jax.errors import CheckpointError, ConversionError

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: str | int) -> int:
    """Bytes in '5GB' (10**9, as HF counts), '500MiB', '1000000' or an int."""
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.fullmatch(size)
        if not match:
            raise ConversionError(f"bad size {size!r}: expected e.g. 5GB, 500MB, 2GiB")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if value <= 0:
        raise ConversionError(f"bad size {size!r}: must be positive")
    return value


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def plan_shards(entries: list[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Consecutive tensors per shard, each shard at most `max_shard_bytes` unless one tensor exceeds it (as HF)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardedSafetensorsWriter:
    """Writes planned safetensors shards tensor by tensor, in plan order; headers come from the plan."""

    def __init__(self, directory: str, shards: list[list[TensorEntry]]):
        self.directory = directory
        self.shards = shards
        self.files = shard_file_names(len(shards))
        self._order = [(shard_index, entry) for shard_index, shard in enumerate(shards) for entry in shard]
        self._next = 0
        self._written = 0  # bytes of the current tensor written so far
        self._open_index = -1
        self._handle = None

    def write(self, name: str, array: np.ndarray) -> None:
        """Append a tensor, or the next block of its rows (a tensor may arrive in several consecutive blocks)."""
        shard_index, entry = self._order[self._next]
        if name != entry.name or np.dtype(array.dtype) != entry.dtype or tuple(array.shape[1:]) != entry.shape[1:]:
            raise AssertionError(f"tensor {name} {array.shape} {array.dtype} does not match the plan {entry}")
        if shard_index != self._open_index:
            self._start_shard(shard_index)
        self._handle.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        self._written += array.nbytes
        if self._written > entry.nbytes:
            raise AssertionError(f"tensor {name}: more rows than its shape {entry.shape}")
        if self._written == entry.nbytes:
            self._next += 1
            self._written = 0

    def _start_shard(self, shard_index: int) -> None:
        self.close()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for entry in self.shards[shard_index]:
            header[entry.name] = {
                "dtype": DTYPE_NAMES[entry.dtype],
                "shape": list(entry.shape),
                "data_offsets": [offset, offset + entry.nbytes],
            }
            offset += entry.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._handle = open(os.path.join(self.directory, self.files[shard_index]), "wb")
        self._handle.write(struct.pack("<Q", len(raw)) + raw)
        self._open_index = shard_index

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def write_index(self) -> None:
        """`model.safetensors.index.json`, written only when there is more than one shard."""
        if len(self.shards) == 1:
            return
        weight_map = {entry.name: self.files[i] for i, shard in enumerate(self.shards) for entry in shard}
        total = sum(entry.nbytes for shard in self.shards for entry in shard)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_json(os.path.join(self.directory, INDEX_FILE), index)


def _check_shape(src: str, group: ParamGroup, spec: ParamSpec, stored: np.ndarray) -> None:
    """A stored array (or row block) must have the shape the config implies."""
    if stored.shape != group.part_shape(spec):
        raise CheckpointError(
            f"{src}: {group.name}: parameter {'.'.join(group.key(spec))!r} has shape "
            f"{list(stored.shape)}, which does not fit config.json"
        )


@dataclasses.dataclass(frozen=True)
class ExportSummary:
    """What an export wrote."""

    out: str
    dtype: str
    parameters: int
    files: tuple[str, ...]


def orbax_to_hf(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    force: bool = False,
    progress: bool = True,
) -> ExportSummary:
    """Export a qwen-jax Orbax checkpoint (from `hf_to_orbax`) to an HF safetensors directory.

    dtype: 'bfloat16', 'float32', 'float16' or 'auto' (the stored dtype). Shards are cut at
    `max_shard_size` ('5GB' = 5*10**9 bytes, as HF counts) with `model.safetensors.index.json`.
    One parameter group (a decoder layer) is held in host memory at a time. `out` appears
    complete or not at all; an existing `out` is replaced only with `force`.
    """
    src = os.fspath(src)
    if not os.path.isdir(src):
        raise CheckpointError(f"{src}: checkpoint directory not found")
    manifest = read_manifest(src)
    config_json = read_config_json(src)
    config = Qwen2Config.from_hf(config_json)
    out_dtype = resolve_dtype(dtype, {np.dtype(manifest["dtype"])} if manifest.get("dtype") else set())
    groups = param_groups(config, manifest.get("row_block_elements"), manifest_quantization(manifest))
    # In the order the groups deliver them; a row-blocked tensor arrives in several groups. A
    # quantized kernel is one float HF tensor (dequantized), its scales are no tensor of their own.
    names = dict.fromkeys(
        (group.hf_name(spec), spec.hf_shape) for group in groups for spec in group.specs if spec.is_weight
    )
    entries = [TensorEntry(name, shape, out_dtype) for name, shape in names]
    shards = plan_shards(entries, parse_size(max_shard_size))

    with atomic_output_dir(out, force=force, protect=(src,)) as staging:
        writer = ShardedSafetensorsWriter(staging, shards)
        try:
            with tqdm(
                total=sum(e.nbytes for e in entries),
                unit="B",
                unit_scale=True,
                desc="export-hf",
                disable=None if progress else True,
            ) as bar:
                for group in groups:
                    host = restore_group(src, group)
                    for spec in group.specs:
                        _check_shape(src, group, spec, host[group.key(spec)])
                    for name, array in hf_tensors(group, host):
                        array = array.astype(out_dtype, copy=False)
                        writer.write(name, array)
                        bar.update(array.nbytes)
            writer.close()
            writer.write_index()
            write_json(os.path.join(staging, "config.json"), config_with_dtype(config_json, out_dtype))
            copy_side_files(src, staging)
        except OSError as e:
            raise write_error(os.fspath(out), e) from None
        finally:
            writer.close()
    parameters = sum(int(np.prod(e.shape)) for e in entries)
    files = tuple(writer.files) + ((INDEX_FILE,) if len(shards) > 1 else ())
    return ExportSummary(os.path.abspath(os.fspath(out)), dtype_name(out_dtype), parameters, files)
