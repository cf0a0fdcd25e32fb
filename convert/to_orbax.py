"""HF safetensors checkpoint (local directory or Hub id) -> qwen-jax Orbax checkpoint, streaming."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from tqdm import tqdm

from qwen_jax import checkpoint
from qwen_jax.config import Qwen2Config, read_config_json
from qwen_jax.hf import HFCheckpoint, validate_checkpoint
from qwen_jax.hub import resolve_source

from qwen_jax.convert.common import (
    ConversionError, atomic_output_dir, copy_side_files, dtype_name, resolve_dtype, with_dtype,
    write_error, write_json,
)


@dataclasses.dataclass(frozen=True)
class ConversionSummary:
    """What a conversion wrote."""

    out: str
    source: str
    dtype: str
    parameters: int
    bytes_written: int


def hf_to_orbax(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "auto",
    force: bool = False,
    progress: bool = True,
) -> ConversionSummary:
    """Convert an HF checkpoint to a qwen-jax Orbax checkpoint in `out`.

    src: local HF directory or Hub id (`Qwen/Qwen2.5-0.5B-Instruct`). dtype: 'bfloat16', 'float32',
    'float16', or 'auto' (the checkpoint's own dtype). The whole input is validated (config,
    every tensor's presence and shape) before anything is written; tensors are then read, cast
    and written one decoder layer at a time, so host memory stays near the largest tensor.
    `out` appears complete or not at all; an existing `out` is replaced only with `force`.
    Raises CheckpointError/ConfigError (ConversionError for output problems) with a one-line message.
    """
    source_label = os.fspath(src)
    src_dir = resolve_source(src)
    config_json = read_config_json(src_dir)
    config = Qwen2Config.from_hf(config_json)
    ckpt = HFCheckpoint(src_dir)
    validate_checkpoint(ckpt, config)
    row_block_elements = checkpoint.ROW_BLOCK_ELEMENTS
    groups = checkpoint.param_groups(config, row_block_elements)
    out_dtype = resolve_dtype(dtype, ckpt.dtypes())
    names = [group.hf_name(spec) for group in groups for spec in group.specs]
    parameters = sum(int(np.prod(ckpt.shape(name))) for name in names)
    total_bytes = parameters * out_dtype.itemsize
    if os.path.isdir(source_label):
        source_label = os.path.abspath(source_label)

    with atomic_output_dir(out, force=force, protect=(src_dir,)) as staging:
        try:
            with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="convert",
                      disable=None if progress else True) as bar:
                for group in groups:
                    arrays = {}
                    for spec in group.specs:
                        host = spec.from_hf(ckpt.get(group.hf_name(spec)))
                        if group.rows is not None:
                            host = host[group.rows[0]:group.rows[1]]  # a memmap view: only these rows are read
                        arrays[group.key(spec)] = np.ascontiguousarray(host.astype(out_dtype, copy=False))
                    _save_group(staging, group, arrays, out)
                    bar.update(sum(a.nbytes for a in arrays.values()))
                    del arrays  # release this group before reading the next one
            write_json(os.path.join(staging, "config.json"), with_dtype(config_json, out_dtype))
            copy_side_files(src_dir, staging)
            if not os.path.exists(os.path.join(staging, "generation_config.json")):
                write_json(os.path.join(staging, "generation_config.json"), _generation_config(config))
            write_json(os.path.join(staging, checkpoint.MANIFEST), {
                "format": checkpoint.FORMAT,
                "format_version": checkpoint.FORMAT_VERSION,
                "source": source_label,
                "dtype": dtype_name(out_dtype),
                "parameters": parameters,
                "qwen_jax_version": _version(),
                "row_block_elements": row_block_elements,
                "groups": [group.name for group in groups],
            })
        except OSError as e:
            raise write_error(os.fspath(out), e) from None
    return ConversionSummary(os.path.abspath(os.fspath(out)), source_label, dtype_name(out_dtype), parameters,
                             total_bytes)


def _save_group(staging: str, group: checkpoint.ParamGroup, arrays: dict, out) -> None:
    try:
        checkpoint.save_group(staging, group, arrays)
    except ValueError as e:  # how tensorstore (under Orbax) reports I/O failures
        raise write_error(os.fspath(out), e) from None


def _generation_config(config: Qwen2Config) -> dict:
    """The minimal generation config transformers derives from config.json when a checkpoint has none."""
    eos = list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id
    return {"bos_token_id": config.bos_token_id, "eos_token_id": eos}


def _version() -> str:
    from qwen_jax import __version__

    return __version__

