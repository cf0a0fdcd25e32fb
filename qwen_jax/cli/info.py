"""Print the config and parameter count of a checkpoint (HF/GPTQ/AWQ or Orbax directory, GGUF file, or preset).

For a converted (Orbax) directory it also prints the stored dtype and quantization, the parameter
groups and the bytes the parameters take on disk; for GPTQ/AWQ checkpoints their quantization
settings, for GGUF files the tensor types they hold. With --context N it plans inference memory
per device: the parameters, a KV cache of --batch x N tokens and the activations of a chunked
prefill, on the mesh given by --mesh (e.g. `qwen-jax info 7B --context 131072 --rope-scaling yarn:4 --mesh tensor=8`).
"""

from __future__ import annotations

import argparse
import json
import os

import jax.numpy as jnp

from qwen_jax.checkpoints.assemble import abstract_model
from qwen_jax.checkpoints.gguf import GGUFCheckpoint, is_gguf_file
from qwen_jax.checkpoints.gptq_awq import read_prequantized_config
from qwen_jax.checkpoints.orbax import PARAMS_DIR, is_orbax_checkpoint, manifest_quantization, read_manifest
from qwen_jax.checkpoints.outdir import bytes_on_disk
from qwen_jax.checkpoints.params import count_bytes, count_parameters, param_groups
from qwen_jax.config import PRESET_NAMES, Qwen2Config, read_config_json
from qwen_jax.errors import UsageError
from qwen_jax.generation.static import default_prefill_chunk
from qwen_jax.memory import plan_memory
from qwen_jax.sharding import parse_mesh_spec, platform_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path", help="checkpoint directory (HF, GPTQ, AWQ or converted Orbax), GGUF file, or a preset such as 0.5B"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--context", type=int, help="plan inference memory for a KV cache of this many tokens")
    parser.add_argument("--batch", type=int, default=1, help="rows of the planned KV cache (default 1)")
    parser.add_argument("--mesh", help="plan for this mesh, e.g. 'tensor=8' (default: one device)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="bfloat16",
        help="parameter and KV-cache dtype of the plan (default bfloat16)",
    )
    parser.add_argument(
        "--rope-scaling",
        metavar="TYPE:FACTOR",
        help="override the rope scaling, e.g. 'yarn:4' (the context the model supports follows)",
    )
    parser.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        help="plan with int8/int4 decoder projections (default: a converted checkpoint's own)",
    )


def stored_summary(path: str) -> dict | None:
    """What a qwen-jax Orbax directory stores (None for other directories)."""
    if not is_orbax_checkpoint(path):
        return None
    manifest = read_manifest(path)
    scheme = manifest_quantization(manifest)
    groups = param_groups(Qwen2Config.from_hf(path), manifest.get("row_block_elements"), scheme)
    parameters = count_parameters(groups)
    part_dtypes = {
        None: jnp.dtype(manifest.get("dtype")),
        "values": jnp.int8,
        "scale": jnp.float32,
        "zero": jnp.float32,
    }
    summary = {
        "dtype": manifest.get("dtype"),
        "quantization": None if scheme is None else scheme.name,
        "parameters": parameters,
        "groups": len(groups),
        "row_blocks": sum(group.rows is not None for group in groups),
        "bytes": count_bytes(groups, lambda spec: part_dtypes[spec.quant_part]),
        "bytes_on_disk": bytes_on_disk(os.path.join(path, PARAMS_DIR)),
    }
    if manifest.get("parameters") != summary["parameters"]:
        # qwen-jax 0.1.0's converter counted every row block as the whole matrix.
        summary["manifest_parameters"] = manifest.get("parameters")
    return summary


def source_quantization(path: str) -> dict | None:
    """The quantization of a GPTQ/AWQ directory or a GGUF file (None for other checkpoints)."""
    if is_gguf_file(path):
        return {"format": "gguf", "tensor_types": GGUFCheckpoint(path).type_counts()}
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        prequantized = read_prequantized_config(read_config_json(path), path)
        if prequantized is not None:
            return {"format": prequantized.method, **prequantized.to_json()}
    return None


def run(args: argparse.Namespace) -> int:
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
        raise UsageError(f"{args.path}: not a checkpoint directory, GGUF file or preset ({', '.join(PRESET_NAMES)})")
    config = config.with_rope_scaling(args.rope_scaling)
    params = abstract_model(config).num_params()
    quantize = args.quantize or (stored or {}).get("quantization")
    plan = _context_plan(config, args, quantize) if args.context is not None else None
    if args.json:
        print(
            json.dumps(
                {
                    "path": args.path,
                    "parameters": params,
                    "config": config.to_hf(),
                    "context_length": config.context_length,
                    **({"stored": stored} if stored else {}),
                    **({"quantization": source} if source else {}),
                    **({"memory": plan} if plan else {}),
                }
            )
        )
        return 0
    print(f"{args.path}: Qwen2ForCausalLM, {params:,} parameters ({params / 1e9:.2f} B)")
    if stored:
        kind = (
            stored["dtype"]
            if stored["quantization"] is None
            else f"{stored['quantization']} kernels, {stored['dtype']}"
        )
        print(
            f"  stored: {kind}, {stored['parameters']:,} parameters in {stored['groups']} groups "
            f"({stored['row_blocks']} row blocks), {stored['bytes'] / 1e9:.2f} GB "
            f"({stored['bytes_on_disk'] / 1e9:.2f} GB on disk)"
        )
        if "manifest_parameters" in stored:
            print(
                f"  note: the manifest says {stored['manifest_parameters']:,} parameters (over-counted by an "
                "older qwen-jax); the weights themselves are unaffected"
            )
    if source and source["format"] == "gguf":
        types = ", ".join(f"{count} {name}" for name, count in sorted(source["tensor_types"].items()))
        print(f"  quantization: GGUF tensors {types} (dequantized on loading; --quantize re-quantizes)")
    elif source:
        print(
            f"  quantization: {source['format']} {source['bits']}-bit, group size {source['group_size'] or 'none'}, "
            f"{'symmetric' if source['sym'] else 'zero points'}"
            f"{', act-order (loads dequantized)' if source['desc_act'] else ''}"
        )
    print(f"  context: {config.context_length:,} tokens")
    if plan:
        quantized = f", {plan['quantization']} projections" if plan["quantization"] else ""
        print(
            f"  memory at {plan['context']:,} tokens x batch {plan['batch']} ({plan['dtype']}{quantized}, "
            f"mesh {plan['mesh']}), "
            f"per device: {plan['summary']}"
        )
        if plan["context"] > config.context_length:
            print(
                f"  warning: {plan['context']:,} tokens exceed the model's context of {config.context_length:,}"
                f"{'' if config.rope_scaling.rope_type != 'default' else ' (try --rope-scaling yarn:4)'}"
            )
    for key, value in config.to_hf().items():
        print(f"  {key}: {value}")
    return 0


def _context_plan(config: Qwen2Config, args: argparse.Namespace, quantize: str | None) -> dict:
    """Per-device inference memory at `--context` tokens (see `qwen_jax.memory.plan_memory`)."""
    if args.context < 1 or args.batch < 1:
        raise UsageError("--context and --batch must be >= 1")
    mesh = parse_mesh_spec(args.mesh) if args.mesh else {}
    plan = plan_memory(
        config,
        **mesh,
        param_dtype=args.dtype,
        cache_dtype=args.dtype,
        batch=args.batch,
        max_len=args.context,
        prefill_chunk=min(default_prefill_chunk(platform_of(), args.context), args.context),
        quantize=quantize,
    )
    return {
        "context": args.context,
        "batch": args.batch,
        "dtype": args.dtype,
        "quantization": quantize,
        "mesh": ",".join(f"{k}={v}" for k, v in plan.mesh.items()),
        "params": plan.params,
        "kv_cache": plan.kv_cache,
        "prefill_activations": plan.activations,
        "total": plan.total,
        "summary": str(plan).split("] ", 1)[1],
    }
