"""Weight-only quantization: speed, memory and accuracy of int8/int4 vs float32 and HF transformers.

Two parts, both on the Qwen2.5-0.5B configuration with random weights:

  kernels  the decode-sized product of the 0.5B MLP matrices (24 layers of gate 896->4864 and
           down 4864->896, 1 and 8 rows): float32, qwen-jax int8/int4 (`qwen_jax.ops.quant.matmul`)
           and qwix int8/int4 (`qwix.quantize` + `qwix.dot_general`, what a qwix PTQ rule runs for
           a weight-only quantized dot), interleaved and repeated in one process.
  model    one child process per variant (float32, int8, int4, HF transformers float32) on the same
           0.5B checkpoint written once to a temporary directory (int8/int4: converted once with
           `qwen-jax convert --quantize`, as one would deploy them, then loaded): bytes per
           parameter of the weights, peak RSS, prefill tokens/s (1x64), decode tokens/s (batch 1
           and 8, 32 new tokens), and against float32: relative logit error and top-1 agreement on
           a fixed prompt batch, greedy agreement over 32 generated tokens.

    python benchmarks/quantized.py                  # both parts, ~10 min on 2 CPU cores
    python benchmarks/quantized.py --part kernels

Random weights give nearly flat logits, so greedy agreement understates what real checkpoints keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VARIANTS = ("float32", "int8", "int4", "hf")
PROMPT_LEN, NEW_TOKENS, BATCH = 64, 32, 8


# --------------------------------------------------------------------------- kernels
def kernels(layers: int = 24, repeats: int = 5) -> list[list[str]]:
    import jax
    import jax.numpy as jnp
    import qwix

    from qwen_jax.ops.quant import QuantScheme, matmul, pack, quantize_matrix

    rng = np.random.default_rng(0)
    shapes = [(896, 4864), (4864, 896)]  # (in, out) of gate and down
    floats = [[jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.03) for s in shapes] for _ in range(layers)]

    def ours(spec):
        scheme = QuantScheme.parse(spec)
        weights = []
        for layer in floats:
            parts = []
            for w in layer:
                values, scale = quantize_matrix(w.T, scheme)
                parts.append((pack(values, scheme), scale))
            weights.append(parts)
        return weights, lambda x, part: matmul(x, part[0], part[1], None, scheme, jnp.float32)

    def qwix_weights(qtype, tile):
        # What a weight-only qwix rule (QuantizationRule(weight_qtype=..., tile_size=...)) stores for
        # a [in, out] kernel: a scale per output channel, and per `tile` inputs when tiled.
        weights = [
            [qwix.quantize(w, qtype, channelwise_axes=[1], tiled_axes={0: tile} if tile else None) for w in layer]
            for layer in floats
        ]
        return weights, lambda x, w: qwix.dot_general(x, w, (((1,), (0,)), ((), ())))

    variants = {
        "float32": (floats, lambda x, w: x @ w),
        "qwen-jax int8": ours("int8"),
        "qwen-jax int4": ours("int4"),
        "qwix int8": qwix_weights(jnp.int8, None),
        "qwix int4 (tile 128)": qwix_weights(jnp.int4, 128),
    }

    def chain(product):
        def run(x, weights):
            for gate, down in weights:
                x = product(jax.nn.silu(product(x, gate)), down)
            return x

        return jax.jit(run)

    results = {(name, rows): [] for name in variants for rows in (1, 8)}
    for rows in (1, 8):
        x = jnp.asarray(rng.standard_normal((rows, 896), dtype=np.float32))
        compiled = {name: chain(product) for name, (_, product) in variants.items()}
        for name, (weights, _) in variants.items():
            compiled[name](x, weights).block_until_ready()
        for _ in range(repeats):  # interleaved, so load changes on a shared box hit every variant alike
            for name, (weights, _) in variants.items():
                start = time.perf_counter()
                compiled[name](x, weights).block_until_ready()
                results[(name, rows)].append(time.perf_counter() - start)
    table = []
    for rows in (1, 8):
        base = np.median(results[("float32", rows)])
        for name in variants:
            ms = 1e3 * np.median(results[(name, rows)])
            table.append([name, str(rows), f"{ms:.1f}", f"{ms / 1e3 / base:.2f}x"])
    return table


# --------------------------------------------------------------------------- model
def write_checkpoint(directory: str) -> None:
    """The 0.5B configuration with random weights (seed 0) as an HF safetensors checkpoint."""
    from qwen_jax import Qwen2Config, create_model
    from qwen_jax.checkpoints.hf import iter_hf_tensors
    from qwen_jax.checkpoints.safetensors import write_safetensors

    config = Qwen2Config.preset("0.5B")
    model = create_model(config, dtype="float32", seed=0)
    write_safetensors(os.path.join(directory, "model.safetensors"), list(iter_hf_tensors(model)))
    json_config = {**config.to_hf(), "torch_dtype": "float32"}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(json_config, f)


def fixed_prompts(vocab: int) -> tuple[list[list[int]], list[list[int]], np.ndarray]:
    rng = np.random.default_rng(0)
    one = rng.integers(0, min(vocab, 151643), (1, PROMPT_LEN)).tolist()
    many = rng.integers(0, min(vocab, 151643), (BATCH, PROMPT_LEN)).tolist()
    accuracy = rng.integers(0, min(vocab, 151643), (4, 32)).astype(np.int32)
    return one, many, accuracy


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(variant: str, checkpoint: str, out: str) -> None:
    """Measure one variant in this (fresh) process and write its results to `out` (.npz)."""
    import jax

    from qwen_jax import Qwen2Config

    config = Qwen2Config.from_hf(checkpoint)
    one, many, accuracy = fixed_prompts(config.vocab_size)
    result: dict = {}
    start = time.perf_counter()
    if variant == "hf":
        import torch
        from generate import bench_hf
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(os.cpu_count() or 1)
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        result["load_s"] = time.perf_counter() - start
        result["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        with torch.no_grad():
            logits = model(torch.from_numpy(accuracy).long()).logits.float().numpy()
        first, batch = bench_hf(model, one, NEW_TOKENS), bench_hf(model, many, NEW_TOKENS)
        greedy = bench_hf(model, accuracy.tolist(), NEW_TOKENS)["tokens"]
    else:
        from flax import nnx
        from generate import bench_ours

        from qwen_jax.load import load_model

        if variant != "float32":  # the quantized checkpoint `model_table` converted
            checkpoint = os.path.join(os.path.dirname(checkpoint), variant)
        model = load_model(checkpoint, dtype="float32", scan_layers=False, progress=False)
        result["load_s"] = time.perf_counter() - start
        result["weight_bytes"] = sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
        logits = np.asarray(model(accuracy))
        first, batch = bench_ours(model, one, NEW_TOKENS), bench_ours(model, many, NEW_TOKENS)
        greedy = bench_ours(model, accuracy.tolist(), NEW_TOKENS)["tokens"]
        result["compile_s"] = first["compile"]
    result.update(prefill=first["prefill"], decode_1=first["decode"], decode_n=batch["decode"], peak_rss=peak_rss())
    np.savez(out, logits=logits, greedy=np.asarray(greedy), **{k: np.asarray(v) for k, v in result.items()})


def model_table(variants: tuple[str, ...]) -> list[list[str]]:
    from qwen_jax import Qwen2Config
    from qwen_jax.checkpoints.assemble import abstract_model

    weights = abstract_model(Qwen2Config.preset("0.5B")).num_params()
    results = {}
    with tempfile.TemporaryDirectory(prefix="qwen-jax-quant-bench-") as directory:
        checkpoint = os.path.join(directory, "ckpt")
        os.makedirs(checkpoint)
        write_checkpoint(checkpoint)
        for variant in variants:
            if variant in ("int8", "int4"):
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "qwen_jax.cli",
                        "convert",
                        checkpoint,
                        os.path.join(directory, variant),
                        "--quantize",
                        variant,
                    ],
                    check=True,
                )
            out = os.path.join(directory, f"{variant}.npz")
            subprocess.run(
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--child",
                    variant,
                    "--checkpoint",
                    checkpoint,
                    "--out",
                    out,
                ],
                check=True,
            )
            results[variant] = dict(np.load(out))
            r = results[variant]
            print(
                f"{variant}: decode {float(r['decode_1']):.2f} tok/s (batch 1), {float(r['decode_n']):.2f} "
                f"(batch {BATCH}), prefill {float(r['prefill']):.1f} tok/s, peak RSS "
                f"{float(r['peak_rss']) / 2**30:.2f} GiB (load average {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    reference = results["float32"]
    hf = results.get("hf")
    table = []
    for variant, r in results.items():
        error = np.linalg.norm(r["logits"] - reference["logits"]) / np.linalg.norm(reference["logits"])
        top1 = np.mean(r["logits"].argmax(-1) == reference["logits"].argmax(-1))
        greedy = np.mean(r["greedy"] == reference["greedy"])
        compare = hf is not None and variant != "hf"
        ratio = lambda key, r=r, compare=compare: f" ({float(r[key]) / float(hf[key]):.2f}x HF)" if compare else ""
        table.append(
            [
                "HF transformers float32" if variant == "hf" else f"qwen-jax {variant}",
                f"{float(r['weight_bytes']) / weights:.2f}",
                f"{float(r['peak_rss']) / 2**30:.2f}",
                f"{float(r['prefill']):.1f}{ratio('prefill')}",
                f"{float(r['decode_1']):.2f}{ratio('decode_1')}",
                f"{float(r['decode_n']):.2f}{ratio('decode_n')}",
                f"{error:.4f}",
                f"{100 * top1:.1f} %",
                f"{100 * greedy:.1f} %",
            ]
        )
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["kernels", "model", "both"], default="both")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=5, help="kernel timings per variant (median reported)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.checkpoint, args.out)
        return
    import jax

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} "
        f"on {jax.devices()[0].device_kind}; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    if args.part in ("kernels", "both"):
        print("\n| kernel (24 layers of 0.5B gate+down) | rows | ms | vs float32 |\n|---|---|---|---|")
        for cells in kernels(repeats=args.repeats):
            print("| " + " | ".join(cells) + " |")
        print(f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    if args.part in ("model", "both"):
        if "float32" not in args.variants:
            args.variants.insert(0, "float32")  # the accuracy reference
        table = model_table(tuple(dict.fromkeys(args.variants)))
        print(
            "\n| 0.5B, random weights | weight bytes / parameter | peak RSS GiB | prefill tok/s (1x64) | "
            f"decode tok/s, batch 1 | decode tok/s, batch {BATCH} | logit error vs float32 | top-1 agreement | "
            "greedy agreement (32 tokens) |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for cells in table:
            print("| " + " | ".join(cells) + " |")
        print(f"(load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
