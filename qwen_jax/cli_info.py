"""Print the config and parameter count of a checkpoint (HF directory, Orbax directory, or preset name).

For a converted (Orbax) directory it also prints the stored dtype, the parameter groups and the
bytes the parameters take on disk.
"""

from __future__ import annotations

import json
import os


def add_arguments(parser) -> None:
    parser.add_argument("path", help="checkpoint directory (HF or converted Orbax), or a preset such as 0.5B")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def stored_summary(path: str) -> dict | None:
    """What a qwen-jax Orbax directory stores (None for other directories)."""
    import jax.numpy as jnp

    from qwen_jax import layout
    from qwen_jax.config import Qwen2Config
    from qwen_jax.outdir import bytes_on_disk

    if not layout.is_orbax_checkpoint(path):
        return None
    manifest = layout.read_manifest(path)
    groups = layout.param_groups(Qwen2Config.from_hf(path), manifest.get("row_block_elements"))
    parameters = layout.count_parameters(groups)
    summary = {
        "dtype": manifest.get("dtype"),
        "parameters": parameters,
        "groups": len(groups),
        "row_blocks": sum(group.rows is not None for group in groups),
        "bytes": parameters * jnp.dtype(manifest.get("dtype")).itemsize,
        "bytes_on_disk": bytes_on_disk(os.path.join(path, layout.PARAMS_DIR)),
    }
    if manifest.get("parameters") != summary["parameters"]:
        # qwen-jax 0.1.0's converter counted every row block as the whole matrix.
        summary["manifest_parameters"] = manifest.get("parameters")
    return summary


def run(args) -> int:
    from qwen_jax.cli import UserError
    from qwen_jax.config import PRESET_NAMES, Qwen2Config
    from qwen_jax.layout import abstract_model

    if os.path.isdir(args.path):
        config = Qwen2Config.from_hf(args.path)
        stored = stored_summary(args.path)
    elif args.path.upper() in PRESET_NAMES:
        config, stored = Qwen2Config.preset(args.path), None
    else:
        raise UserError(f"{args.path}: not a checkpoint directory or a preset ({', '.join(PRESET_NAMES)})")
    params = abstract_model(config).num_params()
    if args.json:
        print(json.dumps({"path": args.path, "parameters": params, "config": config.to_hf(),
                          **({"stored": stored} if stored else {})}))
        return 0
    print(f"{args.path}: Qwen2ForCausalLM, {params:,} parameters ({params / 1e9:.2f} B)")
    if stored:
        print(f"  stored: {stored['dtype']}, {stored['parameters']:,} parameters in {stored['groups']} groups "
              f"({stored['row_blocks']} row blocks), {stored['bytes'] / 1e9:.2f} GB "
              f"({stored['bytes_on_disk'] / 1e9:.2f} GB on disk)")
        if "manifest_parameters" in stored:
            print(f"  note: the manifest says {stored['manifest_parameters']:,} parameters (over-counted by an "
                  "older qwen-jax); the weights themselves are unaffected")
    for key, value in config.to_hf().items():
        print(f"  {key}: {value}")
    return 0
