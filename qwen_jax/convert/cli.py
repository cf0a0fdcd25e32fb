"""Convert a checkpoint (HF, GPTQ or AWQ directory, GGUF file; local or Hub id) to a qwen-jax Orbax checkpoint.

The output directory holds the parameters (Orbax), config.json, generation_config.json, the
tokenizer files and qwen_jax_manifest.json; `qwen-jax generate|chat|train` and
`qwen_jax.load_model` read it directly, restoring each parameter into its shards. With
--quantize the decoder projections are stored as int8 (one scale per output channel) or int4
(one scale per 128 inputs) and load quantized, straight into their shards.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from qwen_jax.checkpoints.orbax import PARAMS_DIR
from qwen_jax.checkpoints.outdir import bytes_on_disk, quiet_orbax_logging
from qwen_jax.convert.common import DTYPE_CHOICES
from qwen_jax.convert.to_orbax import hf_to_orbax


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src",
        help="HF/GPTQ/AWQ checkpoint directory, GGUF file, or a Hub id such as "
        "Qwen/Qwen2.5-0.5B-Instruct or org/repo/file.gguf",
    )
    parser.add_argument("out", help="output directory (must not exist unless --force)")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="stored parameter dtype (default: auto, the checkpoint's own)",
    )
    parser.add_argument(
        "--quantize",
        metavar="{int8,int4}",
        help="store the decoder projections quantized (weight-only); GPTQ/AWQ sources keep their "
        "own quantization unless this asks for another",
    )
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="refuse a checkpoint with NaN or infinite weights (default: convert it and warn)",
    )


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    with quiet_orbax_logging():
        summary = hf_to_orbax(
            args.src, args.out, dtype=args.dtype, force=args.force, quantize=args.quantize, strict=args.strict
        )
    if summary.non_finite:
        shown = ", ".join(summary.non_finite[:5]) + (", ..." if len(summary.non_finite) > 5 else "")
        print(
            f"qwen-jax convert: warning: {len(summary.non_finite)} tensor(s) hold NaN or infinite values ({shown}): "
            "the model will produce NaN; --strict refuses such checkpoints",
            file=sys.stderr,
        )
    on_disk = bytes_on_disk(os.path.join(summary.out, PARAMS_DIR))
    stored = summary.dtype if summary.quantization is None else f"{summary.quantization} kernels, {summary.dtype}"
    print(
        f"wrote {summary.out}: {summary.parameters:,} parameters, {stored}, "
        f"{summary.bytes_written / 1e9:.2f} GB ({on_disk / 1e9:.2f} GB on disk) in {time.perf_counter() - start:.1f} s"
    )
    return 0
