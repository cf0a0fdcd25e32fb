"""Print the config and parameter count of a checkpoint (HF directory, Orbax directory, or preset name)."""

from __future__ import annotations

import json
import os


def add_arguments(parser) -> None:
    parser.add_argument("path", help="checkpoint directory (HF or converted Orbax), or a preset such as 0.5B")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args) -> int:
    from qwen_jax.cli import UserError
    from qwen_jax.config import PRESET_NAMES, Qwen2Config
    from qwen_jax.hf import abstract_model

    if os.path.isdir(args.path):
        config = Qwen2Config.from_hf(args.path)
    elif args.path.upper() in PRESET_NAMES:
        config = Qwen2Config.preset(args.path)
    else:
        raise UserError(f"{args.path}: not a checkpoint directory or a preset ({', '.join(PRESET_NAMES)})")
    params = abstract_model(config).num_params()
    if args.json:
        print(json.dumps({"path": args.path, "parameters": params, "config": config.to_hf()}))
        return 0
    print(f"{args.path}: Qwen2ForCausalLM, {params:,} parameters ({params / 1e9:.2f} B)")
    for key, value in config.to_hf().items():
        print(f"  {key}: {value}")
    return 0
