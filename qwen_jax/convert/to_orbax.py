"""Any checkpoint qwen-jax reads (HF, GPTQ, AWQ, GGUF, Orbax; local or Hub id) -> qwen-jax Orbax checkpoint,
streaming."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from tqdm import tqdm

from qwen_jax.checkpoints.assemble import target_quantization
from qwen_jax.checkpoints.gguf import GGUFCheckpoint, is_gguf_file
from qwen_jax.checkpoints.hub import resolve_source
from qwen_jax.checkpoints.orbax import OrbaxWriter
from qwen_jax.checkpoints.outdir import atomic_output_dir, write_error
from qwen_jax.checkpoints.params import count_bytes
from qwen_jax.config import read_config_json
from qwen_jax.convert.common import resolve_dtype
from qwen_jax.errors import ConversionError
from qwen_jax.load import open_checkpoint
from qwen_jax.ops.quant import QuantScheme


@dataclasses.dataclass(frozen=True)
class ConversionSummary:
    """What a conversion wrote."""

    out: str
    source: str
    dtype: str
    parameters: int
    bytes_written: int
    quantization: str | None = None
    non_finite: tuple[str, ...] = ()  # tensors holding NaN or infinite values (HF names), as written


def hf_to_orbax(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "auto",
    force: bool = False,
    progress: bool = True,
    quantize: str | QuantScheme | None = None,
    strict: bool = False,
) -> ConversionSummary:
    """Convert a checkpoint to a qwen-jax Orbax checkpoint in `out`.

    src: local HF, GPTQ or AWQ directory, GGUF file, qwen-jax Orbax directory, or Hub id
    (`Qwen/Qwen2.5-0.5B-Instruct`, `org/repo/file.gguf`). dtype: 'bfloat16', 'float32',
    'float16', or 'auto' (the checkpoint's own dtype) for the float parameters. quantize: 'int8'
    or 'int4' stores the decoder projections quantized (`qwen_jax.ops.quant`); GPTQ/AWQ checkpoints
    keep their own quantization by default. The whole input is validated (config, every tensor's
    presence and shape) before anything is written; tensors are then read, converted and written
    one decoder layer at a time, so host memory stays near one layer. `out` appears complete or
    not at all; an existing `out` is replaced only with `force`.
    Float tensors holding NaN or infinite values (in the checkpoint, or after the cast to `dtype`)
    are listed in the summary's `non_finite`; with `strict` the first one is a ConversionError and
    nothing is written.
    Raises CheckpointError/ConfigError (ConversionError for output problems) with a one-line message.
    """
    source_label = os.fspath(src)
    src_path = resolve_source(src)
    reader = open_checkpoint(src_path)  # validates config and every tensor before anything is written
    gguf = is_gguf_file(src_path)
    config_json = reader.config_json if gguf else read_config_json(src_path)
    config_json = {k: v for k, v in config_json.items() if k != "quantization_config"}  # the manifest says it
    scheme = target_quantization(reader.quantization, quantize)
    out_dtype = resolve_dtype(dtype, reader.dtypes)
    if os.path.exists(source_label):
        source_label = os.path.abspath(source_label)

    with atomic_output_dir(out, force=force, protect=(src_path,)) as staging:
        writer = OrbaxWriter(staging, reader.config, quantization=scheme)
        total = count_bytes(
            writer.groups,
            lambda spec: (
                out_dtype if spec.quant_part is None else (np.int8 if spec.quant_part == "values" else np.float32)
            ),
        )
        non_finite: list[str] = []
        try:
            with tqdm(
                total=total, unit="B", unit_scale=True, desc="convert", disable=None if progress else True
            ) as bar:
                for group in writer.groups:
                    arrays = reader.read_group(group, None)
                    with np.errstate(over="ignore"):  # a value the cast overflows is reported below, by name
                        arrays = {
                            group.key(spec): np.ascontiguousarray(
                                np.asarray(arrays[group.key(spec)]).astype(
                                    out_dtype if spec.quant_part is None else arrays[group.key(spec)].dtype,
                                    copy=False,
                                )
                            )
                            for spec in group.specs
                        }
                    for spec in group.specs:
                        if not _all_finite(arrays[group.key(spec)]):
                            name = spec.hf_name.format(i=group.layer) if spec.stacked else spec.hf_name
                            if strict:
                                raise ConversionError(
                                    f"{name} holds NaN or infinite values (in {source_label}, or after the "
                                    f"cast to {np.dtype(out_dtype).name}); nothing was written"
                                )
                            non_finite.append(name)
                    bar.update(writer.write_group(group, arrays))
                    del arrays  # release this group before reading the next one
            if gguf:
                GGUFCheckpoint(src_path).write_side_files(staging)
            manifest = writer.finish(
                source=source_label, config_json=config_json, side_files_from=None if gguf else src_path
            )
        except OSError as e:
            raise write_error(os.fspath(out), e) from None
    return ConversionSummary(
        os.path.abspath(os.fspath(out)),
        source_label,
        manifest["dtype"],
        manifest["parameters"],
        manifest["bytes"],
        None if scheme is None else scheme.name,
        tuple(dict.fromkeys(non_finite)),
    )


def _all_finite(array: np.ndarray) -> bool:
    """No NaN or infinity in a float array (bfloat16 included); integer arrays are always finite."""
    if array.dtype.kind in "iub":
        return True
    return bool(np.isfinite(array).all())
