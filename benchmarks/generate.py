"""Generation speed of qwen-jax vs HF transformers on the same machine, same weights, same run.

Measures, for a Qwen2.5 config with random weights:
  * prefill tokens/s (batch 1),
  * batch-1 decode tokens/s, and as a percentage of the memory-bandwidth roofline
    (weight bytes + KV-cache bytes read per token) / (bandwidth measured with a large array copy),
  * batch-N decode throughput (tokens/s over all rows).
HF transformers runs `generate` (greedy, KV cache) on a torch model holding the very same weights.

    python benchmarks/generate.py                       # 0.5B, float32, ~3-5 min on 2 CPU cores
    python benchmarks/generate.py --dtype float32 bfloat16 --size 7B --new-tokens 128   # on a GPU

CPU bfloat16 matmuls are emulated by XLA (very slow); prefer float32 there.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np

from qwen_jax import Qwen2Config, create_model
from qwen_jax.config import GenerationConfig
from qwen_jax.generation.static import generate_ids
from qwen_jax.model.causal_lm import unstack_layers


def measure_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """Host memory bandwidth in bytes/s: best of `repeats` copies of a large array (read + write)."""
    src = np.ones(megabytes * 2**20 // 8, np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def device_bandwidth(megabytes: int = 2048, repeats: int = 5) -> float:
    """Accelerator memory bandwidth (bytes/s) from a jitted array copy; host copy on CPU."""
    if jax.default_backend() == "cpu":
        return measure_bandwidth(megabytes // 2, repeats)
    x = jax.numpy.ones((megabytes * 2**20 // 4,), jax.numpy.float32)
    copy = jax.jit(lambda a: a + 1)
    copy(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        copy(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * x.nbytes / best


def roofline_tokens_per_s(
    config: Qwen2Config, params: int, dtype_bytes: int, context: float, bandwidth: float
) -> float:
    """Batch-1 decode limit: every weight and the KV cache of `context` tokens read once per token."""
    kv_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype_bytes * context
    return bandwidth / (params * dtype_bytes + kv_bytes)


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, min(vocab, 151643), size=(batch, length)).tolist()


def bench_ours(model, prompt_ids, new_tokens: int) -> dict:
    config = GenerationConfig(temperature=0.0, eos_token_ids=())  # never stop early: fixed work
    # Compile + warm up; compile time is reported apart anyway, so a short run is enough.
    # prefix_cache=False: a batch-1 timed call would otherwise reuse the warm-up's cache of the same prompt.
    warm_up = generate_ids(model, prompt_ids, max_new_tokens=2, config=config, prefix_cache=False)
    result = generate_ids(model, prompt_ids, max_new_tokens=new_tokens, config=config, prefix_cache=False)
    timing = result.timing
    return dict(
        prefill=timing.prefill_tokens_per_s,
        decode=timing.decode_tokens_per_s,
        compile=warm_up.timing.compile_s + timing.compile_s,
        tokens=result.token_ids,
    )


def build_hf_twin(model, dtype: str, device: str = "cpu"):
    """An HF transformers Qwen2ForCausalLM on torch `device` holding exactly `model`'s weights."""
    import torch
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM

    from qwen_jax.checkpoints.hf import iter_hf_tensors

    hf_config = HFConfig(**model.config.to_hf())
    # Built in `dtype` (buffers such as the rotary frequencies stay float32, as from_pretrained
    # leaves them) and where it runs: a 7B initialised on the host takes minutes.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            twin = Qwen2ForCausalLM(hf_config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    parameters = dict(twin.named_parameters())
    with torch.no_grad():
        for name, array in iter_hf_tensors(model):
            if name in parameters:  # a tied checkpoint's lm_head is the embedding
                parameters[name].copy_(torch.from_numpy(np.array(array, np.float32)))
    return twin


def bench_hf(twin, prompt_ids, new_tokens: int) -> dict:
    import torch

    ids = torch.tensor(prompt_ids, device=twin.device)
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids))

    def run(n):
        start = time.perf_counter()
        with torch.no_grad():
            out = twin.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        if ids.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    run(2)  # warm up
    prefill_s, _ = run(1)
    total_s, out = run(new_tokens)
    batch, length = ids.shape
    return dict(
        prefill=batch * length / prefill_s,
        decode=batch * (new_tokens - 1) / (total_s - prefill_s),
        tokens=out[:, length:].tolist(),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="0.5B", help="config preset (random weights)")
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="batch size of the throughput run")
    parser.add_argument("--skip-hf", action="store_true", help="measure qwen-jax only")
    parser.add_argument(
        "--layers",
        choices=["scan", "unrolled", "both"],
        default="both",
        help="stacked layers run with a scan, one array per layer (scan_layers=False), or both",
    )
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    config = Qwen2Config.preset(args.size)
    device = jax.devices()[0]
    bandwidth = device_bandwidth()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__} on {device.device_kind}; torch {torch.__version__}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"measured memory bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)
    one = prompts(1, args.prompt_len, config.vocab_size)
    many = prompts(args.batch, args.prompt_len, config.vocab_size, seed=1)
    rows = []
    for dtype in args.dtype:
        model = create_model(config, dtype=dtype, seed=0)
        params = model.num_params()
        dtype_bytes = np.dtype(dtype).itemsize if dtype != "bfloat16" else 2
        roof = roofline_tokens_per_s(config, params, dtype_bytes, args.prompt_len + args.new_tokens / 2, bandwidth)
        layouts = ["scan", "unrolled"] if args.layers == "both" else [args.layers]
        ours = {}
        for layout in layouts:
            if layout == "unrolled":
                model = unstack_layers(model)
            ours[layout] = bench_ours(model, one, args.new_tokens), bench_ours(model, many, args.new_tokens)
            print(
                f"{dtype} ({layout} layers): qwen-jax prefill {ours[layout][0]['prefill']:.1f} tok/s, decode "
                f"{ours[layout][0]['decode']:.2f} tok/s (batch 1), {ours[layout][1]['decode']:.2f} tok/s "
                f"(batch {args.batch}); compile {ours[layout][0]['compile']:.1f} s",
                flush=True,
            )
        ours_1, ours_n = ours[layouts[0]]
        theirs_1 = theirs_n = None
        if not args.skip_hf:
            twin = build_hf_twin(model, dtype)
            theirs_1, theirs_n = bench_hf(twin, one, args.new_tokens), bench_hf(twin, many, args.new_tokens)
            same = theirs_1["tokens"][0] == ours_1["tokens"][0]
            print(
                f"{dtype}: HF prefill {theirs_1['prefill']:.1f} tok/s, decode {theirs_1['decode']:.2f} tok/s "
                f"(batch 1), {theirs_n['decode']:.2f} tok/s (batch {args.batch}); "
                f"batch-1 greedy tokens identical: {same}",
                flush=True,
            )
            del twin
        del model

        def row(metric, ours, theirs, roofline=None, dtype=dtype):
            ratio = f"{ours / theirs:.2f}x" if theirs else "-"
            cells = [f"{args.size} {dtype}", metric, f"{ours:.1f}", f"{theirs:.1f}" if theirs else "-", ratio]
            cells.append(
                f"{100 * ours / roofline:.0f}% / {100 * theirs / roofline:.0f}%"
                if roofline and theirs
                else (f"{100 * ours / roofline:.0f}%" if roofline else "")
            )
            rows.append(cells)

        get = lambda result, key: result[key] if result else None  # noqa: E731
        for layout, (ours_1, ours_n) in ours.items():
            suffix = f" ({layout} layers)"
            row(f"prefill tok/s (1x{args.prompt_len}){suffix}", ours_1["prefill"], get(theirs_1, "prefill"))
            row(f"decode tok/s, batch 1{suffix}", ours_1["decode"], get(theirs_1, "decode"), roof)
            row(f"decode tok/s, batch {args.batch}{suffix}", ours_n["decode"], get(theirs_n, "decode"))
            row(f"compile s (batch 1){suffix}", ours_1["compile"], None)
        print(f"{dtype}: batch-1 roofline {roof:.1f} tok/s")

    print()
    print("| model | metric | qwen-jax | HF transformers | ratio | % of roofline (ours / HF) |")
    print("|---|---|---|---|---|---|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
