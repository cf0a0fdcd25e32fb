"""HF safetensors checkpoint (local directory or Hub id) -> qwen-jax Orbax checkpoint, streaming."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from tqdm import tqdm

from qwen_jax import layout
from qwen_jax.config import read_config_json
from qwen_jax.hf import HFReader
from qwen_jax.hub import resolve_source
from qwen_jax.outdir import atomic_output_dir, write_error

from qwen_jax.convert.common import resolve_dtype


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
    reader = HFReader(src_dir)  # validates config and every tensor before anything is written
    out_dtype = resolve_dtype(dtype, reader.checkpoint.dtypes())
    if os.path.isdir(source_label):
        source_label = os.path.abspath(source_label)

    with atomic_output_dir(out, force=force, protect=(src_dir,)) as staging:
        writer = layout.OrbaxWriter(staging, reader.config)
        try:
            with tqdm(total=writer.parameters * out_dtype.itemsize, unit="B", unit_scale=True, desc="convert",
                      disable=None if progress else True) as bar:
                for group in writer.groups:
                    arrays = {group.key(spec): np.ascontiguousarray(group.read_hf(spec, reader.checkpoint.get)
                                                                    .astype(out_dtype, copy=False))
                              for spec in group.specs}
                    bar.update(writer.write_group(group, arrays))
                    del arrays  # release this group before reading the next one
            manifest = writer.finish(source=source_label, config_json=config_json, side_files_from=src_dir)
        except OSError as e:
            raise write_error(os.fspath(out), e) from None
    return ConversionSummary(os.path.abspath(os.fspath(out)), source_label, manifest["dtype"], manifest["parameters"],
                             manifest["bytes"])
