"""Serving throughput and latency: `qwen-jax serve` against sequential generate, static batches and transformers serve.

One workload (prompt and output lengths drawn at random, Poisson arrivals at each rate; `inf` sends
everything at once) goes through four systems in the same run, on the same random weights:
  * qwen-jax serve (continuous batching, `--slots` decode slots), over HTTP;
  * sequential: `qwen_jax.generation.stream_ids`, one request at a time in arrival order (in process);
  * static batches: `qwen_jax.generation.generate_ids` on groups of `--slots` requests in arrival order, each group
    waiting for its last member and decoding until its longest request is done (in process, no streaming);
    both in-process baselines are timed without their compile time (warmed up, or subtracted);
  * HF transformers' own OpenAI server, `transformers serve --continuous-batching`, over HTTP.
The HTTP systems get the same streaming `/v1/completions` requests (greedy, `max_tokens` per request,
usage counted by the server). The HTTP servers and the static batches are timed after an untimed pass
of the whole workload (`--warm-pass`, the default), the sequential run after one prefill and decode of
each shape: on CPU a program's first run is much slower than its later ones. qwen-jax serve also starts
with `--prime` (every compiled program run once), because its schedule differs from pass to pass.
Reported per system and rate: requests/s and output tokens/s over the makespan (first arrival to last
token), time to first token (TTFT) and inter-token latency (ITL: (last token - first token) /
(tokens - 1) per request), p50 and p99 over requests. `--repeat N` times each system N times per
rate and reports its fastest pass (all passes' tokens/s in the last column): on a shared machine
noise only slows a pass down.

    python benchmarks/serve.py                          # 0.5B, float32, 3 rates: ~30-40 min on 2 CPU cores
    python benchmarks/serve.py --requests 8 --rates inf --systems qwen-jax sequential   # a quick look
    python benchmarks/serve.py --requests 16 --rates inf          # on a GPU: bfloat16, transformers on cuda
    python benchmarks/serve.py --requests 16 --rates inf --output-tokens 32,256 --repeat 2   # longer outputs
    python benchmarks/serve.py --requests 64 --rates inf --repeat 2   # RESULTS.md's 64-request figures
    python benchmarks/serve.py --burst --systems qwen-jax transformers --repeat 3   # 8 streamed chats x 64 tokens

`--burst` is the burst of short prompts: 8 concurrent streamed greedy chat requests (`/v1/chat/completions`,
one user message of 16-32 tokens) x 64 new tokens, all at once, on a warm server; each timed pass sends new
prompts (no pass hits a prefix cache with an earlier pass's prompt) and then one request alone (its latency:
what a lone user waits). The HTTP servers can run side by side and their passes alternate, so that both see the
same drift of a shared machine's load, with `--side-by-side` (memory for both servers at once).

Needs the Qwen2.5 tokenizer files (`QWEN_JAX_TOKENIZER_DIR`); builds a random checkpoint of the chosen
size once (`--checkpoint-dir` keeps it between runs).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

SYSTEMS = ("qwen-jax", "sequential", "static", "transformers")


@dataclasses.dataclass
class Job:
    arrival: float  # seconds after the start of the run
    prompt: str
    prompt_tokens: int
    max_tokens: int


@dataclasses.dataclass
class Result:
    arrival: float  # absolute perf_counter times
    first_token: float | None
    last_token: float | None
    tokens: int
    error: str | None = None


# ----------------------------------------------------------------------------- workload
def build_checkpoint(directory: str, size: str, tokenizer_dir: str) -> str:
    """A random HF checkpoint of a Qwen2.5 configuration (float32) with the real tokenizer files."""
    if os.path.isfile(os.path.join(directory, "config.json")):
        return directory
    import torch
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM

    from qwen_jax import Qwen2Config

    print(f"building a random {size} checkpoint in {directory} ...", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    config = HFConfig(**{**Qwen2Config.preset(size).to_hf(), "torch_dtype": "float32"})
    model = Qwen2ForCausalLM(config).eval()
    tmp = directory + ".partial"
    model.save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if os.path.isfile(os.path.join(tokenizer_dir, name)):
            shutil.copy(os.path.join(tokenizer_dir, name), tmp)
    os.replace(tmp, directory)
    return directory


def make_jobs(tokenizer, count: int, rate: float, prompt_range, output_range, seed: int) -> list[Job]:
    rng = np.random.default_rng(seed)
    gaps = np.zeros(count) if math.isinf(rate) else rng.exponential(1.0 / rate, count)
    gaps[0] = 0.0
    arrivals = np.cumsum(gaps)
    jobs = []
    for arrival in arrivals:
        length = int(rng.integers(prompt_range[0], prompt_range[1] + 1))
        text = tokenizer.decode(rng.integers(1000, 30000, length).tolist())
        jobs.append(
            Job(
                float(arrival),
                text,
                len(tokenizer.encode(text)),
                int(rng.integers(output_range[0], output_range[1] + 1)),
            )
        )
    return jobs


def summarize(name: str, jobs: list[Job], results: list[Result], start: float) -> dict:
    failed = [r for r in results if r.error]
    results = [r for r in results if not r.error]
    if not results:
        nan = float("nan")
        return dict(
            system=name,
            requests=0,
            failed=len(failed),
            errors=sorted({r.error for r in failed}),
            output_tokens=0,
            makespan_s=nan,
            requests_per_s=nan,
            output_tokens_per_s=nan,
            ttft_p50_s=nan,
            ttft_p99_s=nan,
            itl_p50_s=nan,
            itl_p99_s=nan,
            load_average=os.getloadavg()[0],
        )
    end = max(r.last_token or r.arrival for r in results)
    makespan = end - start
    tokens = sum(r.tokens for r in results)
    ttft = [r.first_token - r.arrival for r in results if r.first_token is not None]
    itl = [
        (r.last_token - r.first_token) / (r.tokens - 1)
        for r in results
        if r.first_token is not None and r.tokens > 1 and r.last_token > r.first_token
    ]

    def pct(values, q):
        return float(np.percentile(values, q)) if values else float("nan")

    return dict(
        system=name,
        requests=len(results),
        failed=len(failed),
        errors=sorted({r.error for r in failed}),
        output_tokens=tokens,
        makespan_s=makespan,
        requests_per_s=len(results) / makespan,
        output_tokens_per_s=tokens / makespan,
        ttft_p50_s=pct(ttft, 50),
        ttft_p99_s=pct(ttft, 99),
        itl_p50_s=pct(itl, 50),
        itl_p99_s=pct(itl, 99),
        load_average=os.getloadavg()[0],
    )


def best_pass(rows: list[dict]) -> dict:
    """The pass with the most output tokens/s, with every pass's tokens/s under `passes`. On a shared
    machine noise only ever slows a pass down, so the fastest of a few is the steadiest figure; every
    system gets the same number of passes. Failed requests of every pass are counted (`failed`,
    `errors`), so a failure in a slower pass is not hidden behind the fastest one."""
    best = max(rows, key=lambda row: -1.0 if math.isnan(row["output_tokens_per_s"]) else row["output_tokens_per_s"])
    spread = {f"{key}_passes": [row.get(key) for row in rows] for key in ("ttft_p50_s", "makespan_s", "lone_latency_s")}
    return dict(
        best,
        **{key: values for key, values in spread.items() if all(v is not None for v in values)},
        passes=[row["output_tokens_per_s"] for row in rows],
        failed=sum(row["failed"] for row in rows),
        errors=sorted({error for row in rows for error in row["errors"]}),
    )


# ----------------------------------------------------------------------------- HTTP systems
async def run_http(base_url: str, model_name: str, jobs: list[Job], chat: bool = False) -> tuple[list[Result], float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=7200)
    start = time.perf_counter()

    async def one(job: Job) -> Result:
        await asyncio.sleep(max(0.0, start + job.arrival - time.perf_counter()))
        arrival = time.perf_counter()
        first = last = None
        tokens = 0
        try:
            options = dict(
                model=model_name,
                max_tokens=job.max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            if chat:
                messages = [{"role": "user", "content": job.prompt}]
                stream = await client.chat.completions.create(messages=messages, **options)
            else:
                stream = await client.completions.create(prompt=job.prompt, **options)
            async for chunk in stream:
                if chunk.choices and (chunk.choices[0].delta.content if chat else chunk.choices[0].text):
                    last = time.perf_counter()
                    first = first or last
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
        except Exception as e:  # a failed request is counted and reported, not fatal to the run
            return Result(arrival, first, last, tokens, error=f"{type(e).__name__}: {e}")
        return Result(arrival, first, last, tokens)

    results = await asyncio.gather(*(one(job) for job in jobs))
    await client.close()
    return list(results), start


def all_at_once(jobs: list[Job]) -> list[Job]:
    """The same requests, every one arriving at the start (for untimed warm passes)."""
    return [dataclasses.replace(job, arrival=0.0) for job in jobs]


def warm_pass(url: str, model_name: str, jobs: list[Job], whole: bool, chat: bool = False) -> None:
    """An untimed pass before the timed ones: the whole workload sent at once (`whole`), so each
    server has run every program the workload needs once (on CPU a compiled XLA program's first run
    is much slower than later ones, and torch warms up too), or only two requests (first contact)."""
    asyncio.run(run_http(url, model_name, all_at_once(jobs) if whole else jobs[:2], chat))


def wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not become healthy in {timeout} s")


def start_qwen_jax(
    checkpoint: str,
    slots: int,
    max_len: int,
    port: int,
    prefill_chunk: int | None = None,
    dtype: str = "float32",
    prime: bool = True,
) -> tuple[subprocess.Popen, str]:
    command = [
        sys.executable,
        "-m",
        "qwen_jax.cli",
        "serve",
        "--model",
        checkpoint,
        "--slots",
        str(slots),
        "--max-len",
        str(max_len),
        "--port",
        str(port),
        "--max-queue",
        "100000",
        "--dtype",
        dtype,
        "--prime" if prime else "--no-prime",
    ]
    if prefill_chunk is not None:
        command += ["--prefill-chunk", str(prefill_chunk)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        print("  " + line.rstrip(), file=sys.stderr, flush=True)
        if "listening on" in line:
            url = line.split("listening on ")[1].split()[0]
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
            return process, url
    raise RuntimeError(f"qwen-jax serve exited with status {process.wait()}")


def transformers_executable() -> str:
    """The `transformers` console script beside this interpreter (a venv's bin/ need not be on
    PATH), else on PATH; a clear error before any measurement when it is missing."""
    search = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    executable = shutil.which("transformers", path=search)
    if executable is None:
        sys.exit(
            "serve.py: error: the `transformers` command is not installed (pip install -e '.[test]'); "
            "leave it out with --systems qwen-jax sequential static"
        )
    return executable


TRANSFORMERS_BLOCK_TOKENS = 32  # transformers serve's default KV block size, given explicitly


def start_transformers(
    checkpoint: str, port: int, log_path: str, device: str = "cpu", dtype: str = "float32", kv_tokens: int = 4096
) -> tuple[subprocess.Popen, str]:
    """transformers serve with a KV cache of `kv_tokens` (qwen-jax's slots x max-len): left to itself it
    sizes its cache to a fraction of the free memory, which on a shared machine took 12 GB and was killed."""
    command = [
        transformers_executable(),
        "serve",
        checkpoint,
        "--continuous-batching",
        "--cb-block-size",
        str(TRANSFORMERS_BLOCK_TOKENS),
        "--cb-num-blocks",
        str(-(-kv_tokens // TRANSFORMERS_BLOCK_TOKENS)),
        "--device",
        device,
        "--dtype",
        dtype,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, process, timeout=600)
    return process, url


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ----------------------------------------------------------------------------- in-process baselines
class _Clock:
    """perf_counter minus the compile time spent so far: baselines are timed as if already compiled."""

    def __init__(self):
        self.compile_s = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.compile_s

    def wait_until(self, moment: float) -> None:
        time.sleep(max(0.0, moment - self.now()))


def run_sequential(model, tokenizer, jobs: list[Job]) -> tuple[list[Result], float]:
    from qwen_jax.generation.static import stream_ids

    results, clock = [], _Clock()
    start = clock.now()
    for job in jobs:
        clock.wait_until(start + job.arrival)
        times = []
        # prefix_cache=False: the baseline prefills every prompt (its warm-up ran the same prompts).
        stream = stream_ids(
            model, tokenizer.encode(job.prompt), max_new_tokens=job.max_tokens, temperature=0, prefix_cache=False
        )
        for _ in stream:
            times.append(clock.now())
        compiled = stream.result.timing.compile_s  # zero after warm_up_sequential; subtracted if not
        clock.compile_s += compiled
        times = [t - compiled for t in times]
        results.append(Result(start + job.arrival, times[0], times[-1], len(times)))
    return results, start


def run_static(model, tokenizer, jobs: list[Job], batch: int) -> tuple[list[Result], float]:
    from qwen_jax.generation.static import generate_ids

    results, clock = [], _Clock()
    start = clock.now()
    for i in range(0, len(jobs), batch):
        group = jobs[i : i + batch]
        clock.wait_until(start + group[-1].arrival)
        out = generate_ids(
            model,
            [tokenizer.encode(j.prompt) for j in group],
            max_new_tokens=max(j.max_tokens for j in group),
            temperature=0,
        )
        clock.compile_s += out.timing.compile_s
        done = clock.now()
        for job, ids in zip(group, out.token_ids):  # no streaming: every token arrives with the batch
            results.append(Result(start + job.arrival, done, done, min(len(ids), job.max_tokens)))
    return results, start


def warm_up_sequential(model, tokenizer, jobs: list[Job]) -> None:
    """Compile the prefill and decode step of every prompt shape the sequential run will see."""
    from qwen_jax.generation.static import prompt_bucket, stream_ids

    shapes = {}
    for job in jobs:  # one job per (prompt bucket, max_tokens): what the compiled shapes derive from
        shapes.setdefault((prompt_bucket(job.prompt_tokens), job.max_tokens), job)
    for job in shapes.values():
        stream = stream_ids(
            model, tokenizer.encode(job.prompt), max_new_tokens=job.max_tokens, temperature=0, prefix_cache=False
        )
        for _, _ in zip(range(2), stream):
            pass
        stream.close()


# ----------------------------------------------------------------------------- report
def report_pass(name: str, rate: float, row: dict) -> None:
    lone = f", lone request {row['lone_latency_s']:.2f} s" if "lone_latency_s" in row else ""
    print(
        f"  {name} @ {rate:g}/s: {row['output_tokens_per_s']:.1f} tok/s, makespan {row['makespan_s']:.1f} s, "
        f"TTFT p50 {row['ttft_p50_s']:.2f} s{lone} (load {row['load_average']:.1f})",
        file=sys.stderr,
        flush=True,
    )


def print_table(rate: float, rows: list[dict], reference: str = "sequential") -> None:
    base = {r["system"]: r for r in rows}
    print(f"\n### arrival rate: {'all at once' if math.isinf(rate) else f'{rate:g} requests/s'}\n")
    print(
        "| system | requests/s | output tokens/s | vs sequential | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) "
        "| output tokens | failed (all passes) | load avg | tokens/s of each pass |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ratio = (
            row["output_tokens_per_s"] / base[reference]["output_tokens_per_s"] if reference in base else float("nan")
        )
        itl = "–" if math.isnan(row["itl_p50_s"]) else f"{row['itl_p50_s'] * 1e3:.0f} / {row['itl_p99_s'] * 1e3:.0f}"
        print(
            f"| {row['system']} | {row['requests_per_s']:.3f} | {row['output_tokens_per_s']:.1f} | {ratio:.2f}× | "
            f"{row['ttft_p50_s']:.1f} / {row['ttft_p99_s']:.1f} | {itl} | {row['output_tokens']} | "
            f"{row['failed']} | {row['load_average']:.1f} | "
            f"{' / '.join(f'{v:.1f}' for v in row['passes'])} |"
        )
    for row in rows:
        if "ttft_p50_s_passes" in row and len(row["passes"]) > 1:
            each = {
                key: " / ".join(f"{v:.2f}" for v in values) for key, values in row.items() if key.endswith("_passes")
            }
            lone = (
                f"; lone request latency (s) {each['lone_latency_s_passes']}" if "lone_latency_s_passes" in each else ""
            )
            print(
                f"\n{row['system']}, each pass: makespan (s) {each['makespan_s_passes']}; TTFT p50 (s) "
                f"{each['ttft_p50_s_passes']}{lone}"
            )


def main(argv=None) -> None:
    # A terminated benchmark stops the servers it started (the `finally` blocks below run): without
    # this, SIGTERM left a `qwen-jax serve` holding 4 GB running after the benchmark was gone.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="0.5B")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--rates", default="0.1,0.25,inf", help="arrival rates (requests/s), comma-separated")
    parser.add_argument("--prompt-tokens", default="32,256", help="min,max prompt length")
    parser.add_argument("--output-tokens", default="16,96", help="min,max max_tokens")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--prefill-chunk", type=int, help="qwen-jax serve --prefill-chunk (default: its own)")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--checkpoint-dir", help="where the random checkpoint is built (kept); default: a temp dir")
    parser.add_argument("--port", type=int, default=8471)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--warm-pass",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the first rate's whole workload once, untimed, through the HTTP servers and the "
        "static batches before timing them (default; --no-warm-pass: two requests only, so "
        "the first timed pass pays the programs' first runs)",
    )
    parser.add_argument(
        "--prime",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start qwen-jax serve with --prime (default): every compiled program run once before "
        "it listens. A warm pass alone does not reach every program: requests arrive over "
        "HTTP in a different order each pass, so the engine's schedule (which step widths "
        "and chunk lengths run) differs, and a program first run in the timed pass costs "
        "seconds on CPU",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="timed passes of each rate's workload per system (after the warm pass); the table "
        "reports each system's fastest pass and lists all of them",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="compute dtype of every system (default: float32 on CPU, bfloat16 on a GPU/TPU)",
    )
    parser.add_argument(
        "--hf-device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where transformers serve runs: auto = cuda when JAX runs on a GPU and torch sees one",
    )
    parser.add_argument(
        "--burst",
        action="store_true",
        help="the burst workload: 8 streamed greedy chat requests x 64 new tokens, all at once "
        "(sets --requests 8 --rates inf --prompt-tokens 16,32 --output-tokens 64,64 and uses the chat endpoint)",
    )
    parser.add_argument(
        "--side-by-side",
        action="store_true",
        help="run the HTTP servers at once and alternate their timed passes (needs memory for both; "
        "default: one server after the other)",
    )
    parser.add_argument("--json-out", help="write all measurements to this JSON file")
    args = parser.parse_args(argv)
    if args.burst:
        args.requests, args.rates, args.prompt_tokens, args.output_tokens = 8, "inf", "16,32", "64,64"
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    # This process keeps a JAX client open while the servers run: on a GPU it must not take the
    # memory they need (the children inherit the setting; the engine sizes its cache itself).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    accelerator = jax.default_backend() != "cpu"
    dtype = args.dtype or ("bfloat16" if accelerator else "float32")
    hf_device = args.hf_device
    if hf_device == "auto":
        import torch

        hf_device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"

    tokenizer_dir = os.environ.get("QWEN_JAX_TOKENIZER_DIR")
    if not tokenizer_dir:
        sys.exit("set QWEN_JAX_TOKENIZER_DIR to a directory with the Qwen2.5 tokenizer files")
    workdir = args.checkpoint_dir or os.path.join(tempfile.mkdtemp(prefix="qwen_jax_serve_bench_"), "ckpt")
    checkpoint = build_checkpoint(workdir, args.size, tokenizer_dir)
    from qwen_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(checkpoint)
    rates = [float(r) for r in args.rates.split(",")]
    prompt_range = tuple(int(x) for x in args.prompt_tokens.split(","))
    output_range = tuple(int(x) for x in args.output_tokens.split(","))
    workloads = {
        rate: make_jobs(tokenizer, args.requests, rate, prompt_range, output_range, args.seed) for rate in rates
    }

    def fresh_jobs(count: int, offset: int) -> list[Job]:
        return make_jobs(tokenizer, count, math.inf, prompt_range, output_range, args.seed + offset)

    device = f"; {jax.devices()[0].device_kind}, transformers on {hf_device}" if accelerator else ""
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs{device}; {args.size} "
        f"random weights, {dtype}; {args.requests} requests per rate, prompts {prompt_range} tokens, outputs "
        f"{output_range} tokens, {args.slots} slots; {time.strftime('%Y-%m-%d %H:%M')}",
        flush=True,
    )
    measurements: dict[float, list[dict]] = {rate: [] for rate in rates}

    def record(rate, name, run_once):
        """Time `run_once()` (-> results, start) `--repeat` times; keep the fastest pass, list them all."""
        rows = []
        for _ in range(args.repeat):
            results, start = run_once()
            rows.append(summarize(name, workloads[rate], results, start))
            report_pass(name, rate, rows[-1])
        measurements[rate].append(best_pass(rows))

    if "transformers" in args.systems:
        transformers_executable()  # fail now, not after the other systems' measurements
    http = [name for name in ("qwen-jax", "transformers") if name in args.systems]
    # --side-by-side: both HTTP servers run at once and their timed passes alternate (qwen-jax,
    # transformers, qwen-jax, ...), so that both see the same drift of a shared machine's load;
    # otherwise (when both do not fit in memory) one server after the other.
    for group in [http] if args.side_by_side else [[name] for name in http]:
        servers: list[tuple[str, str]] = []  # (system name, url)
        processes: list[subprocess.Popen] = []
        try:
            if "qwen-jax" in group:
                process, url = start_qwen_jax(
                    checkpoint, args.slots, args.max_len, args.port, args.prefill_chunk, dtype, args.prime
                )
                processes.append(process)
                servers.append(("qwen-jax serve", url))
            if "transformers" in group:
                log_path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "transformers_serve.log")
                process, url = start_transformers(
                    checkpoint, args.port + 1, log_path, hf_device, dtype, args.slots * args.max_len
                )
                processes.append(process)
                servers.append(("transformers serve --continuous-batching", url))
                print(f"  transformers serve log: {log_path}", file=sys.stderr, flush=True)
            for _, url in servers:  # qwen-jax: every program's first run; transformers: loads the model, starts CB
                warm_pass(url, checkpoint, workloads[rates[0]], args.warm_pass, args.burst)
            for rate in rates:
                rows: dict[str, list[dict]] = {name: [] for name, _ in servers}
                for index in range(args.repeat):
                    # The burst: new prompts each pass (the same for every system), so that no pass hits
                    # qwen-jax's prefix cache with a prompt an earlier pass sent (the chat template's system
                    # prompt still does, as on any server).
                    jobs = fresh_jobs(args.requests, 1 + index) if args.burst else workloads[rate]
                    for name, url in servers:
                        results, start = asyncio.run(run_http(url, checkpoint, jobs, args.burst))
                        rows[name].append(summarize(name, jobs, results, start))
                        if args.burst:  # then one request alone: the latency a lone user sees
                            lone = asyncio.run(run_http(url, checkpoint, fresh_jobs(1, 10_000 + index), True))[0][0]
                            rows[name][-1]["lone_latency_s"] = (
                                float("nan")
                                if lone.error or lone.last_token is None
                                else lone.last_token - lone.arrival
                            )
                        report_pass(name, rate, rows[name][-1])
                for name, _ in servers:
                    measurements[rate].append(best_pass(rows[name]))
        finally:
            for process in processes:
                stop(process)
    if "sequential" in args.systems or "static" in args.systems:
        import qwen_jax

        model, _ = qwen_jax.load(checkpoint, dtype=dtype)
        if "sequential" in args.systems:
            warm_up_sequential(model, tokenizer, [job for rate in rates for job in workloads[rate]])
        if "static" in args.systems and args.warm_pass:  # untimed: every batch shape compiled and run once
            run_static(model, tokenizer, all_at_once(workloads[rates[0]]), args.slots)
        for rate in rates:
            if "sequential" in args.systems:
                jobs = workloads[rate]
                record(rate, "sequential qwen_jax.stream", lambda jobs=jobs: run_sequential(model, tokenizer, jobs))
            if "static" in args.systems:
                record(
                    rate,
                    f"static batches of {args.slots} (qwen_jax.generate)",
                    lambda jobs=workloads[rate]: run_static(model, tokenizer, jobs, args.slots),
                )
    for rate in rates:
        print_table(rate, measurements[rate], reference="sequential qwen_jax.stream")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({str(rate): rows for rate, rows in measurements.items()}, f, indent=2)


if __name__ == "__main__":
    main()
