"""Time and peak host memory of `hf_to_orbax` / `orbax_to_hf` on the Qwen2.5-0.5B architecture.

Random weights (no download): the model is created with `qwen_jax.create_model`, written as an HF
checkpoint with `iter_hf_tensors` + `write_safetensors`, then each conversion runs in a fresh
process that reports its wall time and peak RSS (VmHWM; the imports' share is reported apart).

    python benchmarks/convert.py [--dtypes bfloat16 float32] [--workdir /tmp/qwen-jax-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

_CHILD = textwrap.dedent("""
    import json, sys, time

    def status_mib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024

    from qwen_jax.convert import hf_to_orbax, orbax_to_hf
    imports_mib = status_mib("VmHWM")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak from here on: the conversion itself
    baseline_mib = status_mib("VmRSS")
    start = time.perf_counter()
    if sys.argv[1] == "convert":
        hf_to_orbax(sys.argv[2], sys.argv[3], progress=False)
    else:
        orbax_to_hf(sys.argv[2], sys.argv[3], progress=False)
    print(json.dumps({"seconds": time.perf_counter() - start, "imports_mib": imports_mib,
                      "peak_mib": status_mib("VmHWM"), "growth_mib": status_mib("VmHWM") - baseline_mib}))
""")


def write_source(directory: str, dtype: str) -> int:
    """A random-weight 0.5B HF checkpoint in `directory`; returns its tensor bytes."""
    import jax.numpy as jnp

    from qwen_jax import Qwen2Config, create_model
    from qwen_jax.checkpoints.hf import iter_hf_tensors
    from qwen_jax.checkpoints.safetensors import write_safetensors

    config = Qwen2Config.preset("0.5B").replace(torch_dtype=dtype)
    model = create_model(config, dtype=jnp.dtype(dtype), seed=0)
    tensors = list(iter_hf_tensors(model))
    del model
    os.makedirs(directory, exist_ok=True)
    write_safetensors(os.path.join(directory, "model.safetensors"), tensors)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config.to_hf(), f)
    return sum(array.nbytes for _, array in tensors)


def measure(step: str, src: str, out: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", _CHILD, step, src, out], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{step} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="qwen-jax-bench-")
    rows = []
    try:
        for dtype in args.dtypes:
            src, orbax_dir, hf_dir = (os.path.join(workdir, f"{dtype}-{n}") for n in ("hf", "orbax", "export"))
            for path in (src, orbax_dir, hf_dir):
                shutil.rmtree(path, ignore_errors=True)
            size = write_source(src, dtype)
            for step, a, b in (("convert", src, orbax_dir), ("export-hf", orbax_dir, hf_dir)):
                result = measure(step, a, b)
                rows.append((step, dtype, size, result))
                print(f"{step} {dtype}: {result}", file=sys.stderr)
            for path in (src, orbax_dir, hf_dir):
                shutil.rmtree(path, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print("| step | dtype | checkpoint | time | throughput | peak RSS (process) | RSS growth while converting |")
    print("|---|---|---|---|---|---|---|")
    for step, dtype, size, r in rows:
        peak = max(r["peak_mib"], r["imports_mib"])
        print(
            f"| {step} | {dtype} | {size / 1e9:.2f} GB | {r['seconds']:.1f} s | {size / 1e6 / r['seconds']:.0f} MB/s "
            f"| {peak:.0f} MiB | {r['growth_mib']:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
