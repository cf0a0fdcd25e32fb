"""Print the config and parameter count of a checkpoint (HF/GPTQ/AWQ or Orbax directory, GGUF file, or preset).

For a converted (Orbax) directory it also prints the stored dtype and quantization, the parameter
groups and the bytes the parameters take on disk; for GPTQ/AWQ checkpoints their quantization
settings, for GGUF files the tensor types they hold.
"""

from __future__ import annotations

import json
import os


def add_arguments(parser) -> None:
    parser.add_argument("path", help="checkpoint directory (HF, GPTQ, AWQ or converted Orbax), GGUF file, or a preset "
                                     "such as 0.5B")
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
    scheme = layout.manifest_quantization(manifest)
    groups = layout.param_groups(Qwen2Config.from_hf(path), manifest.get("row_block_elements"), scheme)
    parameters = layout.count_parameters(groups)
    part_dtypes = {None: jnp.dtype(manifest.get("dtype")), "values": jnp.int8, "scale": jnp.float32,
                   "zero": jnp.float32}
    summary = {
        "dtype": manifest.get("dtype"),
        "quantization": None if scheme is None else scheme.name,
        "parameters": parameters,
        "groups": len(groups),
        "row_blocks": sum(group.rows is not None for group in groups),
        "bytes": layout.count_bytes(groups, lambda spec: part_dtypes[spec.quant_part]),
        "bytes_on_disk": bytes_on_disk(os.path.join(path, layout.PARAMS_DIR)),
    }
    if manifest.get("parameters") != summary["parameters"]:
        # qwen-jax 0.1.0's converter counted every row block as the whole matrix.
        summary["manifest_parameters"] = manifest.get("parameters")
    return summary


def source_quantization(path: str) -> dict | None:
    """The quantization of a GPTQ/AWQ directory or a GGUF file (None for other checkpoints)."""
    from qwen_jax.config import read_config_json
    from qwen_jax.gguf_file import GGUFCheckpoint, is_gguf_file
    from qwen_jax.quantized_hf import read_prequantized_config

    if is_gguf_file(path):
        return {"format": "gguf", "tensor_types": GGUFCheckpoint(path).type_counts()}
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        prequantized = read_prequantized_config(read_config_json(path), path)
        if prequantized is not None:
            return {"format": prequantized.method, **prequantized.to_json()}
    return None


def run(args) -> int:
    from qwen_jax.cli import UserError
    from qwen_jax.config import PRESET_NAMES, Qwen2Config
    from qwen_jax.gguf_file import GGUFCheckpoint, is_gguf_file
    from qwen_jax.layout import abstract_model

    stored = source = None
    if is_gguf_file(args.path):
        config = Qwen2Config.from_hf(GGUFCheckpoint(args.path).config_json())
        source = source_quantization(args.path)
    elif os.path.isdir(args.path):
        config = Qwen2Config.from_hf(args.path)
        stored = stored_summary(args.path)
        source = source_quantization(args.path)
    elif args.path.upper() in PRESET_NAMES:
        config = Qwen2Config.preset(args.path)
    else:
        raise UserError(f"{args.path}: not a checkpoint directory, GGUF file or preset ({', '.join(PRESET_NAMES)})")
    params = abstract_model(config).num_params()
    if args.json:
        print(json.dumps({"path": args.path, "parameters": params, "config": config.to_hf(),
                          **({"stored": stored} if stored else {}), **({"quantization": source} if source else {})}))
        return 0
    print(f"{args.path}: Qwen2ForCausalLM, {params:,} parameters ({params / 1e9:.2f} B)")
    if stored:
        kind = stored["dtype"] if stored["quantization"] is None else f"{stored['quantization']} kernels, {stored['dtype']}"
        print(f"  stored: {kind}, {stored['parameters']:,} parameters in {stored['groups']} groups "
              f"({stored['row_blocks']} row blocks), {stored['bytes'] / 1e9:.2f} GB "
              f"({stored['bytes_on_disk'] / 1e9:.2f} GB on disk)")
        if "manifest_parameters" in stored:
            print(f"  note: the manifest says {stored['manifest_parameters']:,} parameters (over-counted by an "
                  "older qwen-jax); the weights themselves are unaffected")
    if source and source["format"] == "gguf":
        types = ", ".join(f"{count} {name}" for name, count in sorted(source["tensor_types"].items()))
        print(f"  quantization: GGUF tensors {types} (dequantized on loading; --quantize re-quantizes)")
    elif source:
        print(f"  quantization: {source['format']} {source['bits']}-bit, group size {source['group_size'] or 'none'}, "
              f"{'symmetric' if source['sym'] else 'zero points'}"
              f"{', act-order (loads dequantized)' if source['desc_act'] else ''}")
    for key, value in config.to_hf().items():
        print(f"  {key}: {value}")
    return 0
