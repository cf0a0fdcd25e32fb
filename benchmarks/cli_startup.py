"""Start-up of `qwen-jax generate`: first run (empty compilation cache) vs second run (cache filled).

Writes an HF checkpoint with random weights of a real configuration (default 0.5B, bfloat16
safetensors, as published) plus the Qwen2.5 tokenizer files, then runs the real command twice
against one fresh persistent compilation cache. For each run it reports the time from launch to
the first generated text on stdout (time to first token: Python start-up, imports, weight loading
and compilation included) and to exit, and how many XLA compilations the run did.

    python benchmarks/cli_startup.py [--size 0.5B] [--dtype float32] [--new-tokens 16]

Uses the tokenizer files (tokenizer.json, tokenizer_config.json) in $QWEN_JAX_TOKENIZER_DIR
(default ../shared/reference/qwen2.5-tokenizer), or a stand-in tokenizer without them. Nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.environ.get(
    "QWEN_JAX_TOKENIZER_DIR", os.path.join(REPO, "..", "shared", "reference", "qwen2.5-tokenizer")
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# Runs the real CLI entry point and reports on stderr, from JAX's monitoring events (not timing),
# how many executables it asked XLA for, how many of those came from the persistent cache, and
# how many it wrote there. Each request ("backend compile" event, which spans the cache lookup)
# that is not a cache hit is an XLA compilation.
COUNTING_CLI = """
import json, sys
import jax.monitoring
counts = {"compile_requests": 0, "cache_hits": 0, "cache_writes": 0}
def on_duration(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        counts["compile_requests"] += 1
def on_event(event, **kwargs):
    if event == "/jax/compilation_cache/cache_hits":
        counts["cache_hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":  # recorded when an entry is written
        counts["cache_writes"] += 1
jax.monitoring.register_event_duration_secs_listener(on_duration)
jax.monitoring.register_event_listener(on_event)
from qwen_jax.cli import main
status = main(sys.argv[1:])
sys.stdout.flush()
counts["compilations"] = counts["compile_requests"] - counts["cache_hits"]
print("COMPILE_COUNTS " + json.dumps(counts), file=sys.stderr)
sys.exit(status)
"""


def write_stand_in_tokenizer(directory: str) -> None:
    """A small word-level tokenizer with Qwen's two stop tokens, for machines without the Qwen2.5
    tokenizer files: enough for the CLI and the trainer to run on random weights."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    words = ["<unk>", *"the a of to and in is it that was capital France Paris once upon time".split()]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken("<|endoftext|>", special=True), AddedToken("<|im_end|>", special=True)])
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, f)


def write_random_checkpoint(
    config,
    directory: str,
    *,
    dtype: str = "bfloat16",
    seed: int = 0,
    tokenizer_dir: str | None = None,
    shard_bytes: int = 4 * 2**30,
) -> str:
    """An HF checkpoint directory with random weights of `config` (a Qwen2Config): config.json,
    safetensors files of at most `shard_bytes` (with an index when there are several) and the
    tokenizer files of `tokenizer_dir` (a stand-in tokenizer when None)."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    from qwen_jax import create_model
    from qwen_jax.checkpoints.hf import iter_hf_tensors

    store = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    model = create_model(config, dtype=dtype, param_dtype=dtype, seed=seed)
    os.makedirs(directory, exist_ok=True)
    shards: list[dict] = [{}]
    for name, array in iter_hf_tensors(model):
        if shards[-1] and sum(a.nbytes for a in shards[-1].values()) + array.nbytes > shard_bytes:
            shards.append({})
        shards[-1][name] = np.ascontiguousarray(array).astype(store)
    del model
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for file_name, tensors in zip(names, shards):
        save_file(tensors, os.path.join(directory, file_name), metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {tensor: file_name for file_name, tensors in zip(names, shards) for tensor in tensors}
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(
            {**config.to_hf(), "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "torch_dtype": dtype},
            f,
            indent=1,
        )
    if tokenizer_dir is None:
        write_stand_in_tokenizer(directory)
    else:
        for name in TOKENIZER_FILES:
            shutil.copy(os.path.join(tokenizer_dir, name), directory)
    return directory


def time_cli_run(argv: list[str], env: dict[str, str]) -> dict:
    """Run `qwen-jax ARGV` in a fresh process; seconds to the first stdout byte and to exit, and
    the compilation counts the process reported."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-c", COUNTING_CLI, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    stderr_chunks: list[bytes] = []  # drained on a thread: a full stderr pipe would stall the child
    drain = threading.Thread(target=lambda: stderr_chunks.append(process.stderr.read()), daemon=True)
    drain.start()
    first = process.stdout.read(1)
    first_output_s = time.perf_counter() - start
    rest = process.stdout.read()
    process.wait()
    total_s = time.perf_counter() - start
    drain.join()
    stderr = b"".join(stderr_chunks).decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"qwen-jax {' '.join(argv)} exited {process.returncode}: {stderr[-2000:]}")
    counts_line = [line for line in stderr.splitlines() if line.startswith("COMPILE_COUNTS ")][-1]
    return dict(
        first_token_s=first_output_s if first else None,
        total_s=total_s,
        output=(first + rest).decode(errors="replace"),
        **json.loads(counts_line.split(" ", 1)[1]),
    )


def measure_startup(
    model_dir: str, cache_dir: str, *, new_tokens: int = 16, dtype: str | None = None, env: dict[str, str] | None = None
) -> dict:
    """Two identical `qwen-jax generate` runs sharing `cache_dir` (which should start empty), in
    the environment `env` (default: this process's)."""
    argv = [
        "generate",
        "--model",
        model_dir,
        "--prompt",
        "The capital of France is",
        "--greedy",
        "--max-new-tokens",
        str(new_tokens),
        "--compile-cache",
        cache_dir,
    ]
    if dtype:
        argv += ["--dtype", dtype]
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    first = time_cli_run(argv, env)
    second = time_cli_run(argv, env)
    entries = [os.path.join(cache_dir, name) for name in os.listdir(cache_dir) if name.endswith("-cache")]
    return {
        "first_run": first,
        "second_run": second,
        "cache_entries": len(entries),
        "cache_bytes": sum(os.path.getsize(path) for path in entries),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="0.5B", help="config preset (random weights)")
    parser.add_argument("--dtype", help="compute dtype passed to qwen-jax generate (default: the CLI's)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    import jax

    from qwen_jax import Qwen2Config

    tokenizer_dir = TOKENIZER_DIR if os.path.isfile(os.path.join(TOKENIZER_DIR, "tokenizer.json")) else None
    print(f"tokenizer: {tokenizer_dir or 'stand-in (Qwen2.5 tokenizer files not found)'}")
    with tempfile.TemporaryDirectory() as work:
        model_dir = write_random_checkpoint(
            Qwen2Config.preset(args.size), os.path.join(work, "model"), tokenizer_dir=tokenizer_dir
        )
        result = measure_startup(model_dir, os.path.join(work, "cache"), new_tokens=args.new_tokens, dtype=args.dtype)
    result.update(
        size=args.size,
        backend=jax.default_backend(),
        device=jax.devices()[0].device_kind,
        jax=jax.__version__,
        load_average=os.getloadavg()[0],
    )
    print(
        f"qwen-jax generate, {args.size} random weights, {result['device']}, jax {jax.__version__}, "
        f"load average {result['load_average']:.1f}"
    )
    for name in ("first_run", "second_run"):
        run = result[name]
        print(
            f"{name.replace('_', ' ')}: first token after {run['first_token_s']:.1f} s, exit after "
            f"{run['total_s']:.1f} s; {run['compilations']} XLA compilations, {run['cache_hits']} cache hits"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
