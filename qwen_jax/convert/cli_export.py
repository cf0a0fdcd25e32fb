"""Export a qwen-jax Orbax checkpoint (from `qwen-jax convert`) to an HF safetensors directory.

Writes model.safetensors (or model-0000N-of-0000M.safetensors shards with
model.safetensors.index.json past --max-shard-size), config.json and the tokenizer files;
`transformers.AutoModelForCausalLM.from_pretrained(OUT)` loads the result.
"""

from __future__ import annotations

import argparse
import time

from qwen_jax.checkpoints.outdir import quiet_orbax_logging
from qwen_jax.convert.common import DTYPE_CHOICES
from qwen_jax.convert.to_hf import orbax_to_hf


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="directory written by `qwen-jax convert`")
    parser.add_argument("out", help="output directory (must not exist unless --force)")
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto", help="safetensors dtype (default: auto, the stored dtype)"
    )
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors file, e.g. 5GB (10**9 bytes, as HF) or 2GiB (default: 5GB)",
    )
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    with quiet_orbax_logging():
        summary = orbax_to_hf(
            args.src, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size, force=args.force
        )
    print(
        f"wrote {summary.out}: {summary.parameters:,} parameters, {summary.dtype}, "
        f"{len(summary.files)} file(s) in {time.perf_counter() - start:.1f} s"
    )
    return 0
