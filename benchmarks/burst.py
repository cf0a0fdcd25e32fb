"""The burst of short prompts, taken apart: the engine's token budget, and the server's own cost per token.

Two measurements behind `benchmarks/serve.py --burst` (RESULTS.md, "The burst of short prompts"):

  * `engine`: in process, one `Engine` per token budget (`--budgets`, the engine's `prefill_chunk`) on
    the same weights, their passes interleaved so that both see the same drift of a shared machine's
    load. Each pass: the burst (8 chat prompts of 16-32 user tokens, new ones each pass, x 64 new
    greedy tokens, submitted at once), then one request alone (32 new tokens), then one long prompt
    (`--long-prompt` tokens) arriving while a request decodes: the longest gap it causes in that
    request's tokens is what a wider mixed step costs the rows already decoding. Times are taken
    where the engine delivers each delta (`on_delta`), so they hold no HTTP. Before the passes, the
    mixed-step shapes `--step-shapes` are timed one by one.
  * `sse`: `qwen-jax serve`'s app in this process (uvicorn, as the CLI runs it), a client in another
    process streaming rounds of 1 and 8 concurrent chats (the first two rounds untimed); for every
    delta, the time from the engine handing it over (`on_delta`, engine thread) to the event loop
    taking it from the request's queue ("handoff"), and from there to its server-sent event's bytes
    being written to the connection ("format + send"); the inter-token latency inside the engine
    and at the client; and the event loop thread's CPU time per streamed token.

    python benchmarks/burst.py engine --checkpoint-dir /tmp/prefix_q05 --budgets 256 512 --repeat 3
    python benchmarks/burst.py sse --checkpoint-dir /tmp/prefix_q05

Needs the Qwen2.5 tokenizer files (`QWEN_JAX_TOKENIZER_DIR`); builds the random checkpoint as serve.py does.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve as serve_bench  # noqa: E402  (benchmarks/serve.py: the workload, the HTTP client)

from qwen_jax import compilation  # noqa: E402

BURST_SEED = 0  # serve.py --burst's default seed: the same prompts as its passes


def burst_prompts(tokenizer, count: int, offset: int) -> list[list[dict]]:
    """`count` chats as serve.py --burst builds them (pass `offset`: the same prompts as its pass)."""
    jobs = serve_bench.make_jobs(tokenizer, count, math.inf, (16, 32), (64, 64), BURST_SEED + offset)
    return [[{"role": "user", "content": job.prompt}] for job in jobs]


def pct(values, q) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# ----------------------------------------------------------------------------- engine
class _Timed:
    """Per request: submit time and the time of each delta's tokens."""

    def __init__(self):
        self.submitted: dict[str, float] = {}
        self.times: dict[str, list[tuple[float, int]]] = {}
        self.done = threading.Event()
        self.remaining = 0
        self.lock = threading.Lock()

    def submit(self, engine, prompt, max_tokens: int) -> str:
        def on_delta(delta):
            now = time.perf_counter()
            if delta.token_ids:
                self.times.setdefault(delta.request_id, []).append((now, len(delta.token_ids)))
            if delta.finish_reason is not None:
                with self.lock:
                    self.remaining -= 1
                    if not self.remaining:
                        self.done.set()

        with self.lock:
            self.remaining += 1
            self.done.clear()
        start = time.perf_counter()
        handle = engine.submit(prompt, max_new_tokens=max_tokens, temperature=0.0, on_delta=on_delta)
        self.submitted[handle.request_id] = start
        return handle.request_id

    def ttft(self, rid: str) -> float:
        return self.times[rid][0][0] - self.submitted[rid]

    def itl(self, rid: str) -> float:
        times = self.times[rid]
        tokens = sum(n for _, n in times)
        return (times[-1][0] - times[0][0]) / max(1, tokens - 1)


def engine_pass(engine, tokenizer, index: int, long_prompt: int) -> dict:
    stats0 = engine.stats()
    timed = _Timed()
    start = time.perf_counter()
    ids = [timed.submit(engine, chat, 64) for chat in burst_prompts(tokenizer, 8, 1 + index)]
    timed.done.wait()
    end = max(timed.times[rid][-1][0] for rid in ids)
    stats1 = engine.stats()
    ttfts = sorted(timed.ttft(rid) for rid in ids)
    row = dict(
        burst_makespan_s=end - start,
        burst_tokens_per_s=sum(sum(n for _, n in timed.times[rid]) for rid in ids) / (end - start),
        ttft_p50_s=pct(ttfts, 50),
        ttft_each_s=[round(t, 3) for t in ttfts],
        itl_p50_s=pct([timed.itl(rid) for rid in ids], 50),
        mixed_steps=stats1.prefill_chunks - stats0.prefill_chunks,  # chunks, summed over steps
        steps=stats1.decode_steps - stats0.decode_steps,
    )
    # One request alone: its time to first token and decode step.
    lone = _Timed()
    rid = lone.submit(engine, burst_prompts(tokenizer, 1, 10_000 + index)[0], 32)
    lone.done.wait()
    row.update(
        lone_ttft_s=lone.ttft(rid),
        lone_itl_s=lone.itl(rid),
        lone_latency_s=lone.times[rid][-1][0] - lone.submitted[rid],
    )
    # A long prompt arriving while one request decodes: the longest gap in that request's tokens.
    if long_prompt:
        rng = np.random.default_rng(20_000 + index)
        running = _Timed()
        rid = running.submit(engine, burst_prompts(tokenizer, 1, 30_000 + index)[0], 24)
        while len(running.times.get(rid, [])) < 8:
            time.sleep(0.01)
        gaps_before = np.diff([t for t, _ in running.times[rid]])
        arrival = running.submit(engine, rng.integers(1000, 30000, long_prompt).tolist(), 8)
        running.done.wait()
        times = [t for t, _ in running.times[rid]]
        submitted = running.submitted[arrival]
        after = [b - a for a, b in zip(times, times[1:]) if b > submitted]
        row.update(
            decode_gap_before_s=float(np.median(gaps_before)),
            decode_gap_max_after_long_s=max(after[:4]) if after else float("nan"),
            long_ttft_s=running.ttft(arrival),
        )
    row["load_average"] = os.getloadavg()[0]
    return row


def step_costs(engine, shapes: list[tuple[int, int]], repeat: int) -> dict[str, float]:
    """Seconds of each mixed-step shape `(count, chunk)` (every slot not taking a chunk decoding, every chunk full)
    and of a full-width decode step, each run `repeat` times after one untimed run, best time:
    what a wider mixed step costs. Runs the engine's programs directly (the engine is idle); the
    cache is restored before each run, so every chunk starts at the same length."""
    import jax
    import jax.numpy as jnp

    programs = engine.programs
    slots = programs.slots
    saved = jax.tree.map(jnp.copy, programs.cache)
    out = {}

    def run(key, call):
        times = []
        for _ in range(1 + repeat):
            programs.cache = jax.tree.map(jnp.copy, saved)
            jax.block_until_ready(programs.cache)
            start = time.perf_counter()
            jax.block_until_ready(call())
            times.append(time.perf_counter() - start)
        out[key] = min(times[1:])

    for count, chunk in shapes:
        executable = programs._mixed_executable(slots, count, chunk)
        active = np.arange(slots) >= count
        args = programs._put(
            (
                active,
                np.ones((count, chunk), np.int32),
                np.full(count, chunk, np.int32),
                np.arange(count, dtype=np.int32),
            )
        )

        def mixed(executable=executable, args=args):
            logits, programs.cache, programs.slot_state = executable(
                programs.state, programs.cache, programs.slot_state, *args
            )
            return logits

        run(f"mixed {count}x{chunk}", mixed)
    decode = programs._decode_executable(slots)
    active = programs._put(np.ones(slots, bool))

    def decode_step():
        logits, programs.cache = decode(programs.state, programs.cache, programs.slot_state.tokens, active)
        return logits

    run(f"decode {slots} rows", decode_step)
    programs.cache = saved
    return out


def run_engine(args, checkpoint: str) -> dict:
    import qwen_jax
    from qwen_jax.engine.core import Engine

    model, tokenizer = qwen_jax.load(checkpoint, dtype=args.dtype)
    engines = {
        str(budget): Engine(model, tokenizer, slots=8, max_len=args.max_len, prefill_chunk=budget)
        for budget in args.budgets
    }
    return compare_engines(args, engines, tokenizer)


def compare_engines(args, engines: dict, tokenizer) -> dict:
    """Interleaved passes of `engines` (label -> Engine on the same model); prints the table."""
    for label, engine in engines.items():
        print(f"{label}: chunk shapes {engine.programs.chunk_shapes}", file=sys.stderr, flush=True)
    out: dict = {label: [] for label in engines}
    try:
        if args.step_repeat:
            shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.step_shapes.split(",")]
            widest = max(
                engines.values(),
                key=lambda engine: engine.programs.chunk_shapes[-1][0] * engine.programs.chunk_shapes[-1][1],
            )
            costs = step_costs(widest, shapes, args.step_repeat)
            out["step_costs_s"] = costs
            print(f"\n| step | seconds (best of {args.step_repeat}) |\n|---|---|")
            for key, seconds in costs.items():
                print(f"| {key} | {seconds:.3f} |", flush=True)
        # Untimed: every program these passes run, compiled and run once (a program's first run on
        # CPU is much slower than later ones).
        for label, engine in engines.items():
            start = time.perf_counter()
            for _ in range(args.warm_passes):
                engine_pass(engine, tokenizer, -1, args.long_prompt)
            print(f"{label}: warm passes {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        for index in range(args.repeat):
            for label, engine in engines.items():
                row = engine_pass(engine, tokenizer, index, args.long_prompt)
                out[label].append(row)
                print(f"{label} pass {index}: {json.dumps(row)}", file=sys.stderr, flush=True)
    finally:
        for engine in engines.values():
            engine.shutdown()
    print(
        "\n| engine | burst tokens/s (each pass) | makespan (s) | TTFT p50 (s) | ITL p50 (ms) | "
        "lone TTFT (s) | lone ITL (ms) | decode gap before / after a long prompt (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label in engines:
        rows = out[label]

        def each(key, scale=1.0, fmt="{:.2f}", rows=rows):
            return " / ".join(fmt.format(r[key] * scale) for r in rows)

        gaps = (
            " / ".join(
                f"{r['decode_gap_before_s'] * 1e3:.0f}→{r['decode_gap_max_after_long_s'] * 1e3:.0f}" for r in rows
            )
            if args.long_prompt
            else "–"
        )
        print(
            f"| {label} | {each('burst_tokens_per_s', fmt='{:.1f}')} | {each('burst_makespan_s', fmt='{:.1f}')} | "
            f"{each('ttft_p50_s')} | {each('itl_p50_s', 1e3, '{:.0f}')} | {each('lone_ttft_s')} | "
            f"{each('lone_itl_s', 1e3, '{:.0f}')} | {gaps} |"
        )
    return out


# ----------------------------------------------------------------------------- sse
_DELTA_TAKEN = contextvars.ContextVar("delta_taken", default=None)  # (produced, taken) of the delta being sent

CLIENT = """
import asyncio, json, sys
sys.path.insert(0, {bench!r})
import serve
from qwen_jax.tokenizer import Tokenizer
tokenizer = Tokenizer.from_dir({checkpoint!r})
out = []
for index, rows in enumerate({rounds!r}):
    jobs = serve.make_jobs(tokenizer, rows, float("inf"), (16, 32), (64, 64), 40_000 + index)
    results, start = asyncio.run(serve.run_http({url!r}, "model", jobs, chat=True))
    out.append(serve.summarize("qwen-jax", jobs, results, start))
print(json.dumps(out))
"""
ROUNDS = (1, 8, 1, 8, 1, 8)  # requests at once per round; the first two rounds are untimed (compilation)


def run_sse(args, checkpoint: str) -> dict:
    import socket

    import qwen_jax
    from qwen_jax.engine.core import Engine
    from qwen_jax.serve import app as app_module
    from qwen_jax.serve.server import run_server

    model, tokenizer = qwen_jax.load(checkpoint, dtype=args.dtype)
    engine = Engine(model, tokenizer, slots=8, max_len=args.max_len, prefill_chunk=args.budgets[0])
    produced: dict[int, tuple[float, int]] = {}  # id(delta) -> (when the engine handed it over, request index)
    delivered: list[list[tuple[float, int]]] = []  # per request, in submission order: (time, tokens) per delta
    samples: list[tuple[int, float, float]] = []  # (request index, handoff s, format + send s)

    submit = engine.submit

    def timed_submit(*a, on_delta=None, **kw):
        index = len(delivered)
        delivered.append([])

        def timed(delta):
            now = time.perf_counter()
            if delta.token_ids:
                produced[id(delta)] = (now, index)
                delivered[index].append((now, len(delta.token_ids)))
            on_delta(delta)

        return submit(*a, on_delta=timed, **kw)

    engine.submit = timed_submit
    deltas = app_module._Server._deltas

    async def timed_deltas(self, request, choices, queue):
        async for choice, delta in deltas(self, request, choices, queue):
            if id(delta) in produced:
                _DELTA_TAKEN.set((*produced.pop(id(delta)), time.perf_counter()))
            yield choice, delta

    app_module._Server._deltas = timed_deltas
    app = app_module.create_app(engine, model_name="model")

    async def timed_app(scope, receive, send):
        async def timed_send(message):
            await send(message)
            taken = _DELTA_TAKEN.get()
            if message["type"] == "http.response.body" and taken is not None:
                produced_at, index, taken_at = taken
                samples.append((index, taken_at - produced_at, time.perf_counter() - taken_at))
                _DELTA_TAKEN.set(None)

        await app(scope, receive, timed_send)

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    client_out = []

    def client():
        code = CLIENT.format(
            bench=os.path.dirname(os.path.abspath(__file__)), checkpoint=checkpoint, url=url, rounds=ROUNDS
        )
        time.sleep(2)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if done.returncode:
            print(done.stderr, file=sys.stderr)
        else:
            client_out.extend(json.loads(done.stdout.strip().splitlines()[-1]))
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=client, daemon=True).start()
    loop_cpu = time.thread_time()  # this thread runs the event loop: its CPU time is the HTTP side's
    run_server(timed_app, listener, engine, shutdown_timeout=0, log_level="warning")
    loop_cpu = time.thread_time() - loop_cpu
    tokens = sum(row["output_tokens"] for row in client_out)

    def engine_itl(times):
        count = sum(n for _, n in times)
        return (times[-1][0] - times[0][0]) / max(1, count - 1)

    first = list(np.cumsum((0, *ROUNDS)))  # each round's first request index
    out = {"client": client_out, "rounds": [], "event_loop_cpu_s": loop_cpu, "tokens": tokens}
    print(
        "\n| round | rows | deltas | handoff p50 / p99 (ms) | format + send p50 / p99 (ms) | "
        "ITL p50 in the engine / at the client (ms) |"
    )
    print("|---|---|---|---|---|---|")
    for number, rows in enumerate(ROUNDS):
        if number < 2 or number >= len(client_out):
            continue
        indices = range(first[number], first[number + 1])
        mine = [s for s in samples if s[0] in indices]
        handoff = [s[1] * 1e3 for s in mine]
        send = [s[2] * 1e3 for s in mine]
        inside = pct([engine_itl(delivered[i]) * 1e3 for i in indices if len(delivered[i]) > 1], 50)
        client_itl = client_out[number]["itl_p50_s"] * 1e3
        out["rounds"].append(
            dict(rows=rows, handoff_ms=handoff, send_ms=send, engine_itl_ms=inside, client_itl_ms=client_itl)
        )
        print(
            f"| {number - 1} | {rows} | {len(mine)} | {pct(handoff, 50):.2f} / {pct(handoff, 99):.2f} | "
            f"{pct(send, 50):.2f} / {pct(send, 99):.2f} | {inside:.0f} / {client_itl:.0f} |"
        )
    print(
        f"\nevent loop thread: {loop_cpu:.2f} s of CPU for {tokens} streamed tokens "
        f"({loop_cpu / max(1, tokens) * 1e3:.2f} ms a token, server start and untimed rounds included)"
    )
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["engine", "sse"])
    parser.add_argument("--size", default="0.5B")
    parser.add_argument("--checkpoint-dir", help="where the random checkpoint is built (kept)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 512], help="engine prefill_chunk values")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warm-passes", type=int, default=1, help="engine: untimed passes per engine first")
    parser.add_argument("--long-prompt", type=int, default=480, help="tokens of the long prompt (0: none)")
    parser.add_argument("--step-repeat", type=int, default=3, help="engine: timed runs of each step shape (0: none)")
    parser.add_argument(
        "--step-shapes", default="8x32,4x64,8x64,1x256,1x511", help="engine: mixed-step shapes (count x chunk) to time"
    )
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    tokenizer_dir = os.environ.get("QWEN_JAX_TOKENIZER_DIR")
    if not tokenizer_dir:
        sys.exit("set QWEN_JAX_TOKENIZER_DIR to a directory with the Qwen2.5 tokenizer files")
    directory = args.checkpoint_dir or os.path.join("/tmp", f"qwen_jax_burst_{args.size}")
    checkpoint = serve_bench.build_checkpoint(directory, args.size, tokenizer_dir)
    print(f"{time.strftime('%Y-%m-%d %H:%M')} UTC, load {os.getloadavg()[0]:.1f}", flush=True)
    # The programs compiled by earlier runs (and by `qwen-jax serve`) are read from the persistent cache.
    with compilation.jax_options(compilation.persistent_cache_options(compilation.default_dir())):
        out = run_engine(args, checkpoint) if args.what == "engine" else run_sse(args, checkpoint)
    print(f"{time.strftime('%Y-%m-%d %H:%M')} UTC, load {os.getloadavg()[0]:.1f}", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
