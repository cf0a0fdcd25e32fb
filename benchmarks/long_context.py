"""Long-context prefill and decode of qwen-jax vs HF transformers (sdpa), same machine, same run.

For a Qwen2.5 config with random weights (float32 by default):
  * prefill tokens/s and peak RSS of one prompt of each length (qwen-jax: `generate_ids` with
    chunked prefill; HF: `generate(max_new_tokens=1)`), each in a fresh process so peak RSS is
    that run's own;
  * decode tokens/s with N tokens already in a cache of `--max-len` slots (qwen-jax: a jitted
    loop of cached model calls on a `KVCache` of max_len slots; HF: steps on its DynamicCache),
    next to the same qwen-jax program on a cache just big enough for those tokens (timed in
    alternation in one process, so "long / short cache" is what `--max-len` costs) and
    qwen-jax's short-context decode (64-token prompt, 32 new tokens: the generation benchmark's
    batch-1 figure).

    python benchmarks/long_context.py                                   # 2K..32K, ~1-2 h on 2 cores
    python benchmarks/long_context.py --lengths 2048 4096 --decode-contexts 128 --skip-hf
    python benchmarks/long_context.py --dtype bfloat16 --attention cudnn     # on a GPU

Each run prints the load average before it: timings on a busy machine are not comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

PROMPT_SEED = 0
# Alternating timed runs of the long- and short-cache decode programs (best of each).
DECODE_ROUNDS = 4


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _peak_device_bytes(spec: dict) -> int | None:
    """Peak accelerator memory of this process (JAX's allocator, or torch's on CUDA); None on CPU."""
    if spec.get("hf_device", "cpu") == "cpu":
        return None
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        return int(sys.modules["torch"].cuda.max_memory_allocated())
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _repeats(spec: dict) -> int:
    """Timed runs per measurement (best of): accelerator runs are short, CPU runs at 8K+ are not."""
    if spec.get("hf_device", "cpu") != "cpu":
        return 3
    return 2 if spec["length"] <= 4096 else 1


def _sync(spec: dict) -> None:
    if spec.get("hf_device", "cpu") != "cpu":
        import torch

        torch.cuda.synchronize()


def _prompt(length: int, vocab: int, seed: int = PROMPT_SEED) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(0, min(vocab, 151643), size=length).tolist()


# ----------------------------------------------------------------------------- children
def _config(spec: dict):
    from qwen_jax import Qwen2Config

    config = Qwen2Config.preset(spec["size"])
    return config.with_rope_scaling(spec.get("rope_scaling"))  # e.g. 'yarn:4': 128K for the 0.5B config


def _our_model(spec: dict):
    """Random weights in the layout `qwen_jax.load` gives for inference (one array per layer),
    built directly in it (converting a stacked model would add a transient copy to peak RSS)."""
    import jax.numpy as jnp
    from flax import nnx

    from qwen_jax import Qwen2ForCausalLM

    config = _config(spec)
    extra = {} if spec.get("baseline") else {"attention": spec["attention"]}  # an older qwen-jax has no backends
    model = Qwen2ForCausalLM(config, dtype=jnp.dtype(spec["dtype"]), scan_layers=False, rngs=nnx.Rngs(0), **extra)
    if not spec.get("baseline"):  # the kernels as `unstack_layers` stores them (one transposed at a time)
        from qwen_jax.model.causal_lm import default_out_major, set_decoder_out_major

        set_decoder_out_major(model, default_out_major(model))
    return model


def ours_prefill(spec: dict) -> dict:
    from qwen_jax.config import GenerationConfig
    from qwen_jax.generation.static import generate_ids

    model = _our_model(spec)
    prompt = _prompt(spec["length"], model.config.vocab_size)
    config = GenerationConfig(temperature=0.0, eos_token_ids=())
    # prefix_cache=False: each repeat prefills the whole prompt (not the previous repeat's cache).
    chunk = spec.get("chunk")
    result = generate_ids(model, [prompt], max_new_tokens=1, config=config, prefill_chunk=chunk, prefix_cache=False)
    best = result.timing.prefill_s
    for _ in range(_repeats(spec) - 1):
        best = min(
            best,
            generate_ids(
                model, [prompt], max_new_tokens=1, config=config, prefill_chunk=chunk, prefix_cache=False
            ).timing.prefill_s,
        )
    return dict(tokens_per_s=spec["length"] / best, compile_s=result.timing.compile_s, first_token=result.token_ids[0])


def ours_decode(spec: dict) -> dict:
    """Decode `steps` tokens after `context` prompt tokens in a cache of `max_len` slots, and the same
    program on a cache just big enough for them (`short_max_len`), timed in alternation (best of
    `DECODE_ROUNDS` each) so the ratio says what the long cache costs, free of the run-to-run noise
    between processes."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qwen_jax.model.kv_cache import KVCache

    model = _our_model(spec)
    context, steps, max_len = spec["context"], spec["steps"], spec["max_len"]
    short_len = -(-(context + steps) // 64) * 64
    graphdef, state = nnx.split(model)
    chunk = min(2048, context)

    @jax.jit
    def prefill(state, cache, ids):
        return nnx.merge(graphdef, state)(ids, cache=cache, logits_to_keep=1)

    def decode(state, cache, token):
        model = nnx.merge(graphdef, state)

        def body(_, carry):
            cache, token = carry
            logits, cache = model.forward(token, cache.lengths[:, None], None, cache=cache)
            return cache, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]

        return jax.lax.fori_loop(0, steps, body, (cache, token))

    prompt = jnp.asarray([_prompt(context, model.config.vocab_size)], jnp.int32)
    runs = {}
    for name, slots in (("long", max_len), ("short", short_len)):
        cache = KVCache.init(model.config, 1, slots, model.dtype)
        for offset in range(0, context, chunk):  # whole chunks; the last may be shorter
            logits, cache = prefill(state, cache, prompt[:, offset : offset + chunk])
        token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
        start = time.perf_counter()
        compiled = jax.jit(decode, donate_argnums=1).lower(state, cache, token).compile()
        runs[name] = dict(
            cache=cache, token=token, compiled=compiled, compile_s=time.perf_counter() - start, best=float("inf")
        )
    tokens = {}
    for _ in range(DECODE_ROUNDS):
        for name, run in runs.items():
            fresh = jax.tree.map(jnp.copy, run["cache"])
            start = time.perf_counter()
            out_cache, out_token = run["compiled"](state, fresh, run["token"])
            out_cache.lengths.block_until_ready()
            run["best"] = min(run["best"], time.perf_counter() - start)
            assert int(out_cache.lengths[0]) == context + steps
            tokens.setdefault(name, int(out_token[0, 0]))
    assert tokens["long"] == tokens["short"], tokens  # the cache's size must not change the tokens
    return dict(
        tokens_per_s=steps / runs["long"]["best"],
        compile_s=runs["long"]["compile_s"],
        short_tokens_per_s=steps / runs["short"]["best"],
        short_max_len=short_len,
    )


def ours_short_decode(spec: dict) -> dict:
    """The generation benchmark's batch-1 figure: 64-token prompt, 32 new tokens."""
    from qwen_jax.config import GenerationConfig
    from qwen_jax.generation.static import generate_ids

    model = _our_model(spec)
    config = GenerationConfig(temperature=0.0, eos_token_ids=())
    prompt = [_prompt(64, model.config.vocab_size)]
    generate_ids(model, prompt, max_new_tokens=2, config=config, prefix_cache=False)
    best = max(
        generate_ids(model, prompt, max_new_tokens=32, config=config, prefix_cache=False).timing.decode_tokens_per_s
        for _ in range(2)
    )
    return dict(tokens_per_s=best)


def _hf_model(spec: dict):
    import torch
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    config = HFConfig(**_config(spec).to_hf(), attn_implementation="sdpa")
    return Qwen2ForCausalLM(config).to(getattr(torch, spec["dtype"])).to(spec.get("hf_device", "cpu")).eval()


def hf_prefill(spec: dict) -> dict:
    import torch

    model = _hf_model(spec)
    ids = torch.tensor([_prompt(spec["length"], model.config.vocab_size)], device=model.device)
    kwargs = dict(
        do_sample=False, max_new_tokens=1, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids)
    )
    if spec.get("hf_device", "cpu") != "cpu":  # warm-up: cuBLAS/cuDNN initialisation is not prefill
        with torch.no_grad():
            model.generate(ids, **kwargs)
    times = []
    for _ in range(_repeats(spec)):
        _sync(spec)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, **kwargs)
        _sync(spec)
        times.append(time.perf_counter() - start)
    return dict(tokens_per_s=spec["length"] / min(times), first_token=int(out[0, -1]))


def hf_decode(spec: dict) -> dict:
    import torch

    model = _hf_model(spec)
    context, steps = spec["context"], spec["steps"]
    ids = torch.tensor([_prompt(context, model.config.vocab_size)], device=model.device)
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(4 if spec.get("hf_device", "cpu") != "cpu" else 0):  # warm-up on an accelerator
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(spec)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(spec)
        elapsed = time.perf_counter() - start
    return dict(tokens_per_s=steps / elapsed)


CHILDREN = {
    "ours_prefill": ours_prefill,
    "ours_decode": ours_decode,
    "ours_short_decode": ours_short_decode,
    "hf_prefill": hf_prefill,
    "hf_decode": hf_decode,
}


# ----------------------------------------------------------------------------- parent
def run_child(kind: str, spec: dict, timeout: float, code: str | None = None) -> dict:
    """Run one measurement in a fresh process; its result plus load average and peak RSS.

    code: import qwen_jax from this source tree instead (a baseline checkout)."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=code) if code else None
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", kind, json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout:.0f} s", load=load)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return dict(error=f"exit {proc.returncode}: {tail}", load=load)
    result = json.loads(lines[-1])
    result.update(load=load, wall_s=time.perf_counter() - start)
    return result


def _fmt(result: dict | None, key: str, scale: float = 1.0, digits: int = 1) -> str:
    if not result:
        return "-"
    if "error" in result:
        return f"({result['error']})"
    return f"{result[key] / scale:.{digits}f}"


def _ratio(ours: dict | None, theirs: dict | None) -> str:
    if not ours or not theirs or "error" in ours or "error" in theirs:
        return "-"
    return f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="0.5B", help="config preset (random weights)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--attention", default="auto", help="qwen-jax attention backend")
    parser.add_argument("--lengths", type=int, nargs="*", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--decode-contexts", type=int, nargs="*", default=[128, 8192])
    parser.add_argument("--max-len", type=int, default=32768, help="cache slots of the decode runs")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--chunk", type=int, help="qwen-jax prefill chunk (default: generation.PREFILL_CHUNK)")
    parser.add_argument("--skip-hf", action="store_true", help="measure qwen-jax only")
    parser.add_argument(
        "--baseline",
        metavar="SRC",
        help="also measure the short-context decode of the qwen-jax source tree SRC (e.g. the code "
        "before long-context support: git archive a7fc5e1 | tar -x -C SRC)",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per measurement")
    parser.add_argument("--rope-scaling", help="override the config's rope scaling, e.g. yarn:4 (128K context)")
    parser.add_argument(
        "--hf-device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where HF runs: auto = cuda when JAX runs on a GPU and torch sees one, else cpu",
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, spec = args.child
        result = CHILDREN[kind](json.loads(spec))
        result["peak_rss"] = _peak_rss_bytes()
        result["peak_device"] = _peak_device_bytes(json.loads(spec))
        print(json.dumps(result), flush=True)
        return

    # The parent only looks at the platform: it must not take the GPU's memory from the children.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import torch
    import transformers

    hf_device = args.hf_device
    if hf_device == "auto":
        hf_device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    base = dict(
        size=args.size, dtype=args.dtype, attention=args.attention, rope_scaling=args.rope_scaling, hf_device=hf_device
    )
    device_note = f"; {jax.devices()[0].device_kind}, HF on {hf_device}" if jax.default_backend() != "cpu" else ""
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{args.size} {args.dtype}, attention={args.attention}, rope_scaling={args.rope_scaling}{device_note}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}",
        flush=True,
    )
    results: dict = {"prefill": {}, "decode": {}}
    from qwen_jax import Qwen2Config

    context = Qwen2Config.preset(args.size).with_rope_scaling(args.rope_scaling).context_length
    for length in args.lengths:
        length = min(length, context - 1)  # prompt + one new token must fit the context (32,768 -> 32,767)
        spec = dict(base, length=length, chunk=args.chunk)
        ours = run_child("ours_prefill", spec, args.timeout)
        theirs = None if args.skip_hf else run_child("hf_prefill", spec, args.timeout)
        results["prefill"][length] = dict(ours=ours, hf=theirs)
        print(
            f"prefill {length}: qwen-jax {_fmt(ours, 'tokens_per_s')} tok/s, {_fmt(ours, 'peak_rss', 2**30, 2)} GiB "
            f"(load {ours['load']:.1f}); HF {_fmt(theirs, 'tokens_per_s')} tok/s, "
            f"{_fmt(theirs, 'peak_rss', 2**30, 2)} GiB (load {theirs['load'] if theirs else 0:.1f})"
            + (
                f"; peak GPU memory qwen-jax {_fmt(ours, 'peak_device', 2**30, 2)} GiB, HF "
                f"{_fmt(theirs, 'peak_device', 2**30, 2)} GiB"
                if hf_device != "cpu"
                else ""
            ),
            flush=True,
        )
    if args.decode_contexts:
        short = run_child("ours_short_decode", base, args.timeout)
        results["decode"]["short"] = dict(ours=short)
        print(
            f"decode, 64-token prompt (generate_ids): qwen-jax {_fmt(short, 'tokens_per_s', digits=2)} tok/s "
            f"(load {short['load']:.1f})",
            flush=True,
        )
        if args.baseline:
            before = run_child("ours_short_decode", dict(base, baseline=True), args.timeout, code=args.baseline)
            results["decode"]["baseline"] = dict(ours=before)
            print(
                f"decode, 64-token prompt, baseline {args.baseline}: {_fmt(before, 'tokens_per_s', digits=2)} tok/s "
                f"(load {before['load']:.1f})",
                flush=True,
            )
    for context in args.decode_contexts:
        spec = dict(base, context=context, steps=args.decode_steps, max_len=args.max_len)
        ours = run_child("ours_decode", spec, args.timeout)
        theirs = None if args.skip_hf else run_child("hf_decode", spec, args.timeout)
        results["decode"][context] = dict(ours=ours, hf=theirs)
        print(
            f"decode with {context} tokens in a {args.max_len}-slot cache: qwen-jax "
            f"{_fmt(ours, 'tokens_per_s', digits=2)} tok/s, the same in a {_fmt(ours, 'short_max_len', digits=0)}"
            f"-slot cache {_fmt(ours, 'short_tokens_per_s', digits=2)} tok/s (load {ours['load']:.1f}); HF "
            f"{_fmt(theirs, 'tokens_per_s', digits=2)} tok/s",
            flush=True,
        )

    print()
    accel = hf_device != "cpu"
    print(
        "| prompt tokens | qwen-jax prefill tok/s | HF prefill tok/s | ratio "
        "| qwen-jax peak RSS GiB | HF peak RSS GiB |"
        + (" qwen-jax peak GPU memory GiB | HF peak GPU memory GiB |" if accel else "")
    )
    print("|---|---|---|---|---|---|" + ("---|---|" if accel else ""))
    for length, pair in results["prefill"].items():
        print(
            f"| {length:,} | {_fmt(pair['ours'], 'tokens_per_s')} | {_fmt(pair['hf'], 'tokens_per_s')} | "
            f"{_ratio(pair['ours'], pair['hf'])} | {_fmt(pair['ours'], 'peak_rss', 2**30, 2)} | "
            f"{_fmt(pair['hf'], 'peak_rss', 2**30, 2)} |"
            + (
                f" {_fmt(pair['ours'], 'peak_device', 2**30, 2)} | {_fmt(pair['hf'], 'peak_device', 2**30, 2)} |"
                if accel
                else ""
            )
        )
    if args.decode_contexts:
        print()
        print(
            f"| tokens in cache | qwen-jax decode tok/s (cache of {args.max_len:,}) | HF decode tok/s | ratio | "
            "qwen-jax, same program, cache just big enough | long / short cache |"
        )
        print("|---|---|---|---|---|---|")
        short = results["decode"]["short"]["ours"]
        print(f"| 64-token prompt, `generate_ids` | {_fmt(short, 'tokens_per_s', digits=2)} | - | - | - | - |")
        if "baseline" in results["decode"]:
            before = results["decode"]["baseline"]["ours"]
            print(
                f"| 64-token prompt, `generate_ids`, baseline source | {_fmt(before, 'tokens_per_s', digits=2)} "
                "| - | - | - | - |"
            )
        for context in args.decode_contexts:
            pair = results["decode"][context]
            ours = pair["ours"]
            within = (
                f"{ours['tokens_per_s'] / ours['short_tokens_per_s']:.2f}×"
                if ours and ours.get("short_tokens_per_s")
                else "-"
            )
            print(
                f"| {context:,} | {_fmt(ours, 'tokens_per_s', digits=2)} | "
                f"{_fmt(pair['hf'], 'tokens_per_s', digits=2)} | {_ratio(ours, pair['hf'])} | "
                f"{_fmt(ours, 'short_tokens_per_s', digits=2)} ({_fmt(ours, 'short_max_len', digits=0)} slots) | "
                f"{within} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
