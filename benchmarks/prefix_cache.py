"""Prefix caching: multi-turn chat TTFT and a shared system prompt, with and without the cache.

Three workloads on the same random weights. Two run through an `Engine` with the prefix cache on
and one with it off (in process; the two engines share their compiled programs):
  * multi-turn chat: a `--system-tokens` system prompt and `--turns` user turns; each turn sends
    the whole conversation so far (the assistant's earlier answers included) and waits for its
    answer. Reported: time to first token (TTFT) of every turn.
  * shared prefix: `--requests` requests at once, each the same `--shared-tokens` system prompt and
    its own short question, on `--slots` slots. Reported: makespan, output tokens/s, TTFT p50.
Both engines compile every program first (`Engine.warmup`; they share them; `--no-warmup` leaves
the compiling to the untimed passes), and each workload runs once untimed on the first engine
(with another system prompt, so the timed passes hit nothing from it) so that the programs it
needs have run once: a program compiled or first run inside a timed pass would dominate it. Also reported: the time of
the copy a hit costs (a `--shared-tokens` prefix copied from the pool into a slot) next to a
prefill of the same tokens.

The third, `static-chat`, is `qwen-jax chat`'s path: the same multi-turn chat through
`qwen_jax.generation.stream_ids` (the ids `qwen_jax.stream` decodes) with `prefix_cache=True`
(each turn reuses the previous turn's cache) and `prefix_cache=False`, after one untimed pass with
the cache (another system prompt), which compiles every program both timed passes run (the full
prefill of turn 1 is the one a pass without the cache runs every turn).

    python benchmarks/prefix_cache.py                    # 0.5B, float32
    python benchmarks/prefix_cache.py --checkpoint-dir /tmp/q05   # keep the random checkpoint
    python benchmarks/prefix_cache.py --workloads static-chat      # the chat command's path only

Needs the Qwen2.5 tokenizer files (`QWEN_JAX_TOKENIZER_DIR`).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import jax
import numpy as np
from serve import build_checkpoint

import qwen_jax


def random_text(tokenizer, rng, tokens: int) -> str:
    return tokenizer.decode(rng.integers(1000, 30000, tokens).tolist())


def multi_turn(engine, tokenizer, rng, system_tokens: int, turns: int, answer_tokens: int) -> list[dict]:
    messages = [{"role": "system", "content": random_text(tokenizer, rng, system_tokens)}]
    rows = []
    for _ in range(turns):
        messages.append({"role": "user", "content": random_text(tokenizer, rng, 24)})
        completion = engine.generate([messages], max_new_tokens=answer_tokens, temperature=0, progress=False)[0]
        rows.append(
            dict(
                ttft=completion.time_to_first_token_s, prompt=completion.prompt_tokens, cached=completion.cached_tokens
            )
        )
        messages.append({"role": "assistant", "content": completion.text})
    return rows


def static_chat(model, tokenizer, rng, system_tokens: int, turns: int, answer_tokens: int, prefix_cache: bool):
    """`multi_turn` through `stream_ids`, as `qwen-jax chat` runs it: TTFT is the wall time to the first id."""
    qwen_jax.generation.conversation_cache.clear(model)
    messages = [{"role": "system", "content": random_text(tokenizer, rng, system_tokens)}]
    rows = []
    for _ in range(turns):
        messages.append({"role": "user", "content": random_text(tokenizer, rng, 24)})
        prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        start = time.perf_counter()
        tokens = qwen_jax.generation.stream_ids(
            model,
            prompt,
            max_new_tokens=answer_tokens,
            temperature=0,
            stop_token_ids=[tokenizer.eos_token_id],
            prefix_cache=prefix_cache,
        )
        ids = [next(tokens)]
        ttft = time.perf_counter() - start
        ids += list(tokens)
        timing = tokens.result.timing
        rows.append(dict(ttft=ttft, prompt=len(prompt), cached=timing.cached_tokens, compile=timing.compile_s))
        messages.append({"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)})
    return rows


def print_turns(title: str, turns: dict) -> None:
    print(f"\n{title}")
    print("| turn | prompt tokens | cached tokens | TTFT cache off (s) | TTFT cache on (s) | on / off |")
    print("|---|---|---|---|---|---|")
    for i, (on, off) in enumerate(zip(turns.get(True, []), turns.get(False, []))):
        print(
            f"| {i + 1} | {on['prompt']} | {on['cached']} | {off['ttft']:.2f} | {on['ttft']:.2f} | "
            f"{on['ttft'] / off['ttft']:.2f} |"
        )


def shared_prefix(engine, tokenizer, rng, shared_tokens: int, requests: int, answer_tokens: int) -> dict:
    system = random_text(tokenizer, rng, shared_tokens)
    prompts = [
        [{"role": "system", "content": system}, {"role": "user", "content": random_text(tokenizer, rng, 16)}]
        for _ in range(requests)
    ]
    start = time.perf_counter()
    results = engine.generate(prompts, max_new_tokens=answer_tokens, temperature=0, progress=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in results)
    return dict(
        seconds=seconds,
        tokens_per_s=tokens / seconds,
        ttft_p50=float(np.median([c.time_to_first_token_s for c in results])),
        cached=sum(c.cached_tokens for c in results),
        prompt=sum(c.prompt_tokens for c in results),
    )


def copy_seconds(engine, tokens: int, repeats: int = 5) -> float:
    """Seconds one hit's copy of `tokens` (whole blocks) from the pool into slot 0 takes (idle engine)."""
    programs = engine.programs
    blocks = list(range(min(tokens // programs.block_tokens, programs.prefix_blocks)))
    options = qwen_jax.generation.options.resolve(engine.config, vocab_size=engine.model.config.vocab_size)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run is not timed
        start = time.perf_counter()
        programs.copy_in(0, blocks, options, [])
        jax.block_until_ready(programs.cache)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="0.5B")
    parser.add_argument("--system-tokens", type=int, default=1500)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--shared-tokens", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--checkpoint-dir", help="where the random checkpoint is built (kept); default: a temp dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--workloads",
        nargs="+",
        default=["multi-turn", "shared", "static-chat"],
        choices=["multi-turn", "shared", "static-chat"],
    )
    args = parser.parse_args(argv)
    tokenizer_dir = os.environ.get("QWEN_JAX_TOKENIZER_DIR")
    if not tokenizer_dir:
        sys.exit("set QWEN_JAX_TOKENIZER_DIR to a directory with the Qwen2.5 tokenizer files")
    workdir = args.checkpoint_dir or os.path.join(tempfile.mkdtemp(prefix="qwen_jax_prefix_bench_"), "ckpt")
    checkpoint = build_checkpoint(workdir, args.size, tokenizer_dir)
    model, tokenizer = qwen_jax.load(checkpoint)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {jax.devices()[0].device_kind}; {args.size} random "
        f"weights, {model.dtype.__name__ if hasattr(model.dtype, '__name__') else model.dtype}; jax {jax.__version__}, "
        f"qwen_jax {qwen_jax.__version__}; {time.strftime('%Y-%m-%d %H:%M')}; load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    if "static-chat" in args.workloads:
        chat_turns = {}
        warm = np.random.default_rng(args.seed + 100)
        static_chat(model, tokenizer, warm, args.system_tokens, args.turns, args.answer_tokens, True)
        for cache in (True, False):
            rng = np.random.default_rng(args.seed)
            chat_turns[cache] = static_chat(
                model, tokenizer, rng, args.system_tokens, args.turns, args.answer_tokens, cache
            )
            label = "cache on " if cache else "cache off"
            print(f"  static chat, {label}: {chat_turns[cache]}", file=sys.stderr, flush=True)
        print_turns(
            f"static chat (stream_ids, as qwen-jax chat): {args.system_tokens}-token system prompt, "
            f"{args.turns} turns, greedy answers of {args.answer_tokens} tokens",
            chat_turns,
        )
    if not {"multi-turn", "shared"} & set(args.workloads):
        return
    engines = {
        cache: qwen_jax.Engine(model, tokenizer, slots=args.slots, max_len=args.max_len, prefix_cache=cache)
        for cache in (True, False)
    }
    try:
        if args.warmup:
            print(f"  compiled in {engines[True].warmup():.0f} s", file=sys.stderr, flush=True)
        turns = {}
        shared = {}
        warm = np.random.default_rng(args.seed + 100)
        if "multi-turn" in args.workloads:
            multi_turn(engines[True], tokenizer, warm, args.system_tokens, args.turns, args.answer_tokens)
        if "shared" in args.workloads:
            shared_prefix(engines[True], tokenizer, warm, args.shared_tokens, args.requests, args.answer_tokens)
        for cache, engine in engines.items():
            label = "cache on " if cache else "cache off"
            if "multi-turn" in args.workloads:
                turns[cache] = multi_turn(
                    engine,
                    tokenizer,
                    np.random.default_rng(args.seed),
                    args.system_tokens,
                    args.turns,
                    args.answer_tokens,
                )
                print(f"  multi-turn, {label}: {turns[cache]}", file=sys.stderr, flush=True)
            if "shared" not in args.workloads:
                continue
            shared[cache] = shared_prefix(
                engine,
                tokenizer,
                np.random.default_rng(args.seed),
                args.shared_tokens,
                args.requests,
                args.answer_tokens,
            )
            print(f"  shared prefix, {label}: {shared[cache]}", file=sys.stderr, flush=True)
        if turns:
            print_turns(
                f"multi-turn chat (Engine): {args.system_tokens}-token system prompt, {args.turns} turns, "
                "greedy answers",
                turns,
            )
        print(
            f"\nshared prefix: {args.requests} requests, a {args.shared_tokens}-token system prompt, "
            f"{args.slots} slots, "
            f"{args.answer_tokens} new tokens each"
        )
        print("| prefix cache | makespan (s) | output tok/s | TTFT p50 (s) | cached / prompt tokens |")
        print("|---|---|---|---|---|")
        for cache in shared:
            row = shared[cache]
            print(
                f"| {'on' if cache else 'off'} | {row['seconds']:.1f} | {row['tokens_per_s']:.1f} | "
                f"{row['ttft_p50']:.2f} | {row['cached']} / {row['prompt']} |"
            )
        if shared:
            print(f"\nthroughput on / off: {shared[True]['tokens_per_s'] / shared[False]['tokens_per_s']:.2f}x")
        print(
            f"copy of a {args.shared_tokens // 16 * 16}-token hit into a slot: "
            f"{copy_seconds(engines[True], args.shared_tokens) * 1000:.1f} ms"
        )
    finally:
        for engine in engines.values():
            engine.shutdown()


if __name__ == "__main__":
    main()
