"""One-call benchmark suite for a GPU or TPU: decode, prefill, training and CLI start-up at real sizes.

    python benchmarks/device_suite.py                    # the accelerator it finds, bf16: ~8 min on one H100
    python benchmarks/device_suite.py --cpu-smoke        # CPU, scaled-down configs, under a minute (CI runs it)
    python benchmarks/device_suite.py --only decode-0.5B train-0.5B --out results/
    python benchmarks/device_suite.py --list             # the steps, and which this version can run

Random weights of the real Qwen2.5 configurations, written once as bfloat16 HF checkpoints under
--workdir and loaded through `qwen_jax.load_model` (nothing is downloaded). Steps:

  decode-0.5B, decode-7B      prefill (1x128) and greedy decode at batch 1 and 8; decode as % of the
                              memory roofline: (weight bytes read per step + KV bytes) / bandwidth
                              measured on the device; HF transformers on the same weights when torch
                              can use the same accelerator (--no-hf-peer to skip)
  prefill-2K-0.5B, -7B        one 2,048-token prompt: tokens/s and MFU
  prefill-32K-0.5B            a 32K-token prompt through the long-context attention
                              (`load_model(..., attention="auto")`)
  decode-int8-7B, -int4-7B    batch-1 and batch-8 decode with weight-only quantization
                              (`load_model(..., quantize=...)`), against the bf16 decode-7B figures
  train-0.5B, train-1.5B      full fine-tuning (bf16 compute, float32 master weights, AdamW): tokens/s, MFU
  startup-0.5B                `qwen-jax generate` time to first token: empty vs filled compilation cache

A step whose feature this version lacks is reported as "skipped: feature not available in this
version"; it runs as soon as `qwen_jax.load_model` accepts its argument. Before any work the suite
checks that an accelerator is there (unless --cpu-smoke), that the packages import, and that each
step fits the device memory and the checkpoints fit the disk; a problem stops it with one line
naming the step (exit status 2). A step that fails at run time stops the suite as well (exit 1;
--keep-going carries on). The results so far are written either way: OUT/device_suite.json and
OUT/device_suite.md (a Markdown table).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import inspect
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

INSTALL_HINT = (
    "install qwen-jax (pip install -e .; offline, with its dependencies already there: "
    "pip install --no-deps --no-build-isolation -e .)"
)
try:
    import cli_startup
    import generate as generate_bench
    import jax
    import numpy as np
    import train as train_bench
except ImportError as missing:  # qwen_jax itself or a dependency: one line, not a traceback
    print(f"device_suite: error: cannot import {missing.name}: {INSTALL_HINT}", file=sys.stderr)
    sys.exit(2)

SKIPPED_FEATURE = "skipped: feature not available in this version"
GiB = 2**30


# ----------------------------------------------------------------------------- sizes
@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one suite run. `models` maps the names the steps use to configurations."""

    models: dict
    dtype: str = "bfloat16"
    prompt_len: int = 128
    new_tokens: int = 128
    batches: tuple[int, ...] = (1, 8)
    prefill_len: int = 2048
    long_prefill_len: int = 32768 - 64  # the context is 32,768: leave room for the new tokens
    train_seq_len: int = 2048
    train_batch: int = 2
    train_steps: int = 5
    startup_new_tokens: int = 16
    bandwidth_mb: int = 2048


def accelerator_plan() -> Plan:
    from qwen_jax import Qwen2Config

    return Plan(models={name: Qwen2Config.preset(name) for name in ("0.5B", "1.5B", "7B")})


def cpu_smoke_plan() -> Plan:
    """Each size scaled down (2 layers, head_dim 8, vocab 1,024), keeping its head counts, grouping
    and tying, so every step runs its real code path in seconds. 7B, which runs the int8/int4
    steps, gets head_dim 32: 28 heads x 32 = 896 inputs, a multiple of int4's default group (128)."""
    from qwen_jax import Qwen2Config

    def small(name: str):
        real = Qwen2Config.preset(name)
        head_dim = 32 if name == "7B" else 8
        return real.replace(
            hidden_size=head_dim * real.num_attention_heads,
            intermediate_size=128,
            num_hidden_layers=2,
            vocab_size=1024,
            max_position_embeddings=1024,
            bos_token_id=None,
            eos_token_id=None,
        )

    return Plan(
        models={name: small(name) for name in ("0.5B", "1.5B", "7B")},
        prompt_len=16,
        new_tokens=8,
        prefill_len=64,
        long_prefill_len=512 - 16,
        train_seq_len=64,
        train_steps=2,
        startup_new_tokens=4,
        bandwidth_mb=256,
    )


# ----------------------------------------------------------------------------- features
def load_model_accepts(argument: str) -> bool:
    """Whether this version's `qwen_jax.load_model` takes `argument` (the feature has landed)."""
    import qwen_jax

    return argument in inspect.signature(qwen_jax.load_model).parameters


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    model: str  # a key of Plan.models
    run: Callable  # (suite, step) -> list of result rows
    needs: str | None = None  # a load_model argument the step needs
    load_options: tuple = ()  # (name, value) pairs passed to load_model


class Suite:
    """What the steps share: the plan, the device's measured limits, checkpoints and one loaded model."""

    def __init__(self, plan: Plan, workdir: str, hf_peer: bool):
        self.plan = plan
        self.workdir = workdir
        self.device = jax.devices()[0]
        self.hf_device = hf_peer_device() if hf_peer else None
        self.bandwidth = generate_bench.device_bandwidth(plan.bandwidth_mb)
        self.peak_flops, self.peak_source = peak_flops(plan.dtype)
        self._loaded: tuple[tuple, object] | None = None
        self.results: dict[str, dict] = {}

    def checkpoint(self, name: str) -> str:
        """Directory of the random bf16 checkpoint of model `name`, written on first use."""
        directory = os.path.join(self.workdir, f"random-{name}")
        done = os.path.join(directory, ".complete")
        if not os.path.exists(done):
            shutil.rmtree(directory, ignore_errors=True)
            self.release()
            cli_startup.write_random_checkpoint(self.plan.models[name], directory, dtype=self.plan.dtype)
            open(done, "w").close()
        return directory

    def model(self, step: Step) -> tuple[object, list[dict]]:
        """`qwen_jax.load_model` of the step's checkpoint with its options, for inference (unrolled
        layers), kept loaded for the next steps that use the same; plus a row with the load time
        when it was loaded for this step."""
        from flax import nnx

        import qwen_jax

        key = (step.model, step.load_options)
        if self._loaded is not None and self._loaded[0] == key:
            return self._loaded[1], []
        path = self.checkpoint(step.model)
        self.release()
        start = time.perf_counter()
        model = qwen_jax.load_model(path, dtype=self.plan.dtype, scan_layers=False, **dict(step.load_options))
        jax.block_until_ready(nnx.state(model))
        seconds = time.perf_counter() - start
        self._loaded = (key, model)
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
        return model, [
            result_row(
                step,
                "load_model s (bf16 safetensors)",
                seconds,
                note=f"{format_bytes(size / seconds)}/s from {format_bytes(size)}",
            )
        ]

    def release(self) -> None:
        self._loaded = None
        gc.collect()


def hf_peer_device() -> str | None:
    """The torch device for the HF transformers peer: the same kind of accelerator as JAX's, or
    the CPU when JAX runs there; None when torch is missing or cannot use that accelerator."""
    try:
        import torch
    except ImportError:
        return None
    backend = jax.default_backend()
    if backend == "cpu":
        return "cpu"
    return "cuda" if backend == "gpu" and torch.cuda.is_available() else None


def peak_flops(dtype: str) -> tuple[float, str]:
    """Dense peak FLOP/s of one device: the published figure where known, else a measured matmul
    (float32 on the CPU, where bfloat16 products are emulated and would take minutes)."""
    from qwen_jax.train.step import peak_flops_per_device

    published = peak_flops_per_device(0.0)
    if published is not None:
        return published, "published dense bf16 peak"
    on_cpu = jax.default_backend() == "cpu"
    compute, size = ("float32", 2048) if on_cpu else (dtype, 8192)
    return train_bench.measured_matmul_flops(compute, size), f"measured {compute} {size}^3 matmul"


# ----------------------------------------------------------------------------- arithmetic
def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every parameter (quantized ones at their stored
    size), except an untied input embedding, of which a step reads one row per sequence."""
    from flax import nnx

    total = sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model)))
    if model.lm_head is not None:
        total -= model.model.embed_tokens.embedding.get_value().nbytes
    return total


def kv_bytes_per_token(config, dtype) -> int:
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * np.dtype(dtype).itemsize


def prefill_flops(config, length: int) -> float:
    """Model FLOPs of one prefill: 2 per weight per token through the layers, the LM head for the
    last position only, and causal attention (QK and PV over half the square)."""
    from qwen_jax.train.step import matmul_params

    head = config.vocab_size * config.hidden_size
    attention = 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * length**2
    return 2 * (matmul_params(config) - head) * length + 2 * head + attention


def estimated_bytes(plan: Plan, step: Step) -> int:
    """Device memory a step needs, roughly (a fail-fast check, not a planner): weights twice for
    inference (loading unstacks the layers into new arrays), plus the KV cache and the largest
    activations; float32 masters, gradients, AdamW moments, logits and attention probabilities
    for training."""
    from qwen_jax.generation.static import cache_bucket, prompt_bucket
    from qwen_jax.memory import plan_memory

    config = plan.models[step.model]
    if step.run is run_train:
        tokens = plan.train_batch * plan.train_seq_len
        state = plan_memory(config, param_dtype=np.float32, training=True).total
        logits = 3 * tokens * config.vocab_size * 4
        probs = config.num_hidden_layers * tokens * config.num_attention_heads * plan.train_seq_len * 4
        activations = config.num_hidden_layers * tokens * (4 * config.hidden_size + 3 * config.intermediate_size) * 2
        return state + logits + probs + activations
    weights = plan_memory(config, param_dtype=plan.dtype).params
    if step.run is run_decode:
        batch, length = max(plan.batches), plan.prompt_len
        scores = 0
    else:
        batch, length = 1, plan.long_prefill_len if step.needs == "attention" else plan.prefill_len
        scores = 0 if step.needs == "attention" else config.num_attention_heads * prompt_bucket(length) ** 2 * 4
    cache = batch * cache_bucket(prompt_bucket(length) + plan.new_tokens) * kv_bytes_per_token(config, plan.dtype)
    return 2 * weights + cache + scores


# ----------------------------------------------------------------------------- steps
def result_row(
    step: Step,
    metric: str,
    value: float,
    *,
    hf: float | None = None,
    percent: float | None = None,
    percent_of: str = "",
    note: str = "",
) -> dict:
    return dict(step=step.name, metric=metric, value=value, hf=hf, percent=percent, percent_of=percent_of, note=note)


def run_decode(suite: Suite, step: Step) -> list[dict]:
    plan = suite.plan
    model, rows = suite.model(step)
    weight_bytes = decode_weight_bytes(model)
    with hf_twin(suite, model, wanted=not step.load_options) as twin:  # a peer for the bf16 steps only
        for batch in plan.batches:
            rows += decode_rows(suite, step, model, twin, batch, weight_bytes)
    return rows


def decode_rows(suite: Suite, step: Step, model, twin, batch: int, weight_bytes: int) -> list[dict]:
    """Prefill and decode at one batch size (and the HF peer when `twin` is given); decode against
    the roofline: every step reads the weights once and each row's KV cache."""
    plan, rows = suite.plan, []
    ids = generate_bench.prompts(batch, plan.prompt_len, model.config.vocab_size, seed=batch)
    ours = generate_bench.bench_ours(model, ids, plan.new_tokens)
    theirs = generate_bench.bench_hf(twin, ids, plan.new_tokens) if twin is not None else None
    if theirs and theirs["decode"] <= 0:  # HF's decode time is a difference of two noisy runs
        theirs["decode"] = None
    context = plan.prompt_len + plan.new_tokens / 2  # the average filled cache while decoding
    kv_bytes = batch * kv_bytes_per_token(model.config, model.dtype) * context
    roofline = batch * suite.bandwidth / (weight_bytes + kv_bytes)
    note = f"{format_bytes(weight_bytes)} of weights read per step"
    bf16 = suite.results.get(f"decode-{step.model}", {}).get(f"decode tok/s, batch {batch}")
    if step.load_options and bf16:
        note += f"; {ours['decode'] / bf16:.2f}x the {plan.dtype} decode"
    if theirs and batch == 1:
        note += f"; greedy tokens identical to HF: {theirs['tokens'][0] == ours['tokens'][0]}"
    if batch == 1:
        label = dict(step.load_options).get("quantize", plan.dtype)
        rows.append(
            result_row(
                step, f"prefill tok/s (1x{plan.prompt_len}), {label}", ours["prefill"], hf=theirs and theirs["prefill"]
            )
        )
        rows.append(result_row(step, "compile s (batch 1)", ours["compile"]))
    rows.append(
        result_row(
            step,
            f"decode tok/s, batch {batch}",
            ours["decode"],
            hf=theirs and theirs["decode"],
            percent=100 * ours["decode"] / roofline,
            percent_of="roofline",
            note=note,
        )
    )
    return rows


@contextlib.contextmanager
def hf_twin(suite: Suite, model, wanted: bool):
    """HF transformers' model holding the same weights on `suite.hf_device` for the body (None when
    not `wanted` or no peer), its memory handed back afterwards."""
    if not wanted or suite.hf_device is None:
        yield None
        return
    import torch

    twin = generate_bench.build_hf_twin(model, suite.plan.dtype, suite.hf_device)
    try:
        yield twin
    finally:
        del twin
        gc.collect()
        if suite.hf_device == "cuda":  # torch's cached blocks: JAX needs them next
            torch.cuda.empty_cache()


def run_prefill(suite: Suite, step: Step) -> list[dict]:
    from qwen_jax.config import GenerationConfig
    from qwen_jax.generation.static import generate_ids

    plan = suite.plan
    model, rows = suite.model(step)
    length = plan.long_prefill_len if step.needs == "attention" else plan.prefill_len
    ids = generate_bench.prompts(1, length, model.config.vocab_size)
    greedy = GenerationConfig(temperature=0.0, eos_token_ids=())
    # prefix_cache=False: the timed call would otherwise reuse the warm-up's cache of the same prompt.
    warm_up = generate_ids(model, ids, max_new_tokens=1, config=greedy, prefix_cache=False)
    timing = generate_ids(model, ids, max_new_tokens=1, config=greedy, prefix_cache=False).timing
    options = ", ".join(f"{k}={v}" for k, v in step.load_options) or "default attention"
    mfu = 100 * prefill_flops(model.config, length) / timing.prefill_s / suite.peak_flops
    return rows + [
        result_row(
            step, f"prefill tok/s (1x{length}), {options}", length / timing.prefill_s, percent=mfu, percent_of="MFU"
        ),
        result_row(step, f"compile s (1x{length})", warm_up.timing.compile_s + timing.compile_s),
    ]


def run_train(suite: Suite, step: Step) -> list[dict]:
    from qwen_jax.train.step import flops_per_token

    plan = suite.plan
    suite.release()
    config = plan.models[step.model]
    tokenizer_dir = os.path.join(suite.workdir, "stand-in-tokenizer")
    os.makedirs(tokenizer_dir, exist_ok=True)
    cli_startup.write_stand_in_tokenizer(tokenizer_dir)
    out = tempfile.mkdtemp(dir=suite.workdir, prefix=f"{step.name}-")
    try:
        result = train_bench.bench_jax(
            config,
            plan.train_seq_len,
            plan.train_batch,
            plan.train_steps,
            0,
            out,
            tokenizer=tokenizer_dir,
            mesh="fsdp=1",
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if not np.isfinite(result["loss"]):
        raise RuntimeError(f"the training loss is {result['loss']} on random weights")
    tokens = plan.train_batch * plan.train_seq_len
    mfu = 100 * flops_per_token(config, plan.train_seq_len, lora=False) * tokens / result["step_s"] / suite.peak_flops
    shape = f"{plan.train_batch}x{plan.train_seq_len}"
    return [
        result_row(
            step,
            f"train tokens/s ({shape}, full fine-tuning)",
            tokens / result["step_s"],
            percent=mfu,
            percent_of="MFU",
            note=f"loss {result['loss']:.3f}",
        ),
        result_row(step, "first step s (compile)", result["first_step_s"]),
    ]


def run_startup(suite: Suite, step: Step) -> list[dict]:
    if jax.default_backend() == "tpu":
        raise StepSkipped("a TPU belongs to one process, and this one holds it: run benchmarks/cli_startup.py alone")
    path = suite.checkpoint(step.model)
    suite.release()
    env = dict(os.environ)
    if jax.default_backend() == "cpu":  # --cpu-smoke on a machine that may have an accelerator
        env["JAX_PLATFORMS"] = "cpu"
    with tempfile.TemporaryDirectory(dir=suite.workdir) as cache:
        result = cli_startup.measure_startup(path, cache, new_tokens=suite.plan.startup_new_tokens, env=env)
    rows = []
    for run, label in (("first_run", "first run, empty cache"), ("second_run", "second run, cache filled")):
        counts = result[run]
        rows.append(
            result_row(
                step,
                f"qwen-jax generate: s to first token, {label}",
                counts["first_token_s"],
                note=f"{counts['compilations']} XLA compilations, {counts['cache_hits']} cache hits",
            )
        )
    return rows


class StepSkipped(Exception):
    """A step that cannot run on this machine for a reason other than a missing feature."""


STEPS = (
    Step("decode-0.5B", "0.5B", run_decode),
    Step("prefill-2K-0.5B", "0.5B", run_prefill),
    Step("startup-0.5B", "0.5B", run_startup),
    Step("prefill-32K-0.5B", "0.5B", run_prefill, needs="attention", load_options=(("attention", "auto"),)),
    Step("decode-7B", "7B", run_decode),
    Step("prefill-2K-7B", "7B", run_prefill),
    Step("decode-int8-7B", "7B", run_decode, needs="quantize", load_options=(("quantize", "int8"),)),
    Step("decode-int4-7B", "7B", run_decode, needs="quantize", load_options=(("quantize", "int4"),)),
    Step("train-0.5B", "0.5B", run_train),
    Step("train-1.5B", "1.5B", run_train),
)


# ----------------------------------------------------------------------------- checks before any work
class PreflightError(Exception):
    """Something that stops the suite before it starts: printed as one line, exit status 2."""


def check_backend(cpu_smoke: bool) -> None:
    backend = jax.default_backend()
    if not cpu_smoke and backend == "cpu":
        raise PreflightError(
            "no accelerator found: JAX runs on the CPU. Install the JAX backend for your machine "
            '(pip install -e ".[cuda12]", ".[cuda13]" or ".[tpu]") or run the CPU smoke test with --cpu-smoke'
        )


def check_imports() -> None:
    missing = []
    for module in ("qwen_jax.train.loop", "qwen_jax.checkpoints.hf", "safetensors.numpy", "ml_dtypes", "tokenizers"):
        try:
            __import__(module)
        except ImportError as e:
            missing.append(f"{module} ({e})")
    if missing:
        raise PreflightError(f"cannot import {', '.join(missing)}: {INSTALL_HINT}")


def check_fits(plan: Plan, steps: list[Step], workdir: str, memory: bool = True) -> None:
    """Each step's memory against the device's (when `memory`), and the checkpoints still to
    write against the disk."""
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if limit and memory:
        for step in steps:
            need = estimated_bytes(plan, step)
            if need > 0.95 * limit:
                raise PreflightError(
                    f"step {step.name} needs about {need / GiB:.1f} GiB of device memory, the "
                    f"device has {limit / GiB:.1f} GiB: leave it out with --skip {step.name} "
                    "(or try it anyway with --no-memory-check)"
                )
    from qwen_jax.memory import plan_memory

    to_write = {
        step.model
        for step in steps
        if step.run is not run_train and not os.path.exists(os.path.join(workdir, f"random-{step.model}", ".complete"))
    }
    need = sum(plan_memory(plan.models[name], param_dtype=plan.dtype).params for name in to_write)
    free = shutil.disk_usage(workdir).free
    if need > 0.9 * free:
        raise PreflightError(
            f"the random checkpoints of {', '.join(sorted(to_write))} need {need / GiB:.1f} GiB of "
            f"disk, {workdir} has {free / GiB:.1f} GiB free: choose another --workdir"
        )


def select_steps(only: list[str] | None, skip: list[str]) -> list[Step]:
    names = [step.name for step in STEPS]
    unknown = sorted((set(only or []) | set(skip)) - set(names))
    if unknown:
        raise PreflightError(f"unknown step(s) {', '.join(unknown)}; the steps are {', '.join(names)}")
    return [step for step in STEPS if (only is None or step.name in only) and step.name not in skip]


# ----------------------------------------------------------------------------- running and reporting
def run_steps(suite: Suite, steps: list[Step], keep_going: bool, report: Callable[[list[dict]], None]) -> int:
    """Run `steps` in order, reporting after each; 1 at the first failure (unless keep_going)."""
    records, status = [], 0
    for step in steps:
        record = {"step": step.name, "model": step.model, "rows": []}
        records.append(record)
        if step.needs and not load_model_accepts(step.needs):
            record["status"] = SKIPPED_FEATURE
            print(f"{step.name}: {SKIPPED_FEATURE} (qwen_jax.load_model has no {step.needs!r} argument)", flush=True)
            report(records)
            continue
        print(f"{step.name}: running", flush=True)
        start = time.perf_counter()
        try:
            record["rows"] = step.run(suite, step)
            record["status"] = "ok"
        except StepSkipped as e:
            record["status"] = f"skipped: {e}"
        except Exception as e:  # noqa: BLE001 -- any failure is reported with the step's name
            traceback.print_exc()
            record["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            status = 1
        record["seconds"] = time.perf_counter() - start
        suite.results[step.name] = {row["metric"]: row["value"] for row in record["rows"]}
        for row in record["rows"]:
            print(
                f"  {row['metric']}: {format_number(row['value'])}"
                + (f" ({row['percent']:.0f}% {row['percent_of']})" if row["percent"] is not None else ""),
                flush=True,
            )
        print(f"{step.name}: {record['status']} after {record['seconds']:.0f} s", flush=True)
        report(records)
        if status and not keep_going:
            print(f"stopping after the failure of {step.name} (--keep-going runs the remaining steps)", file=sys.stderr)
            break
    return status


def format_bytes(count: float) -> str:
    return f"{count / GiB:.2f} GiB" if count >= GiB else f"{count / 2**20:.2f} MiB"


def format_number(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"


def machine_summary(suite: Suite, plan_name: str) -> dict:
    import flax
    import orbax.checkpoint

    import qwen_jax

    device = suite.device
    stats = device.memory_stats() or {}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "plan": plan_name,
        "dtype": suite.plan.dtype,
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "devices": jax.device_count(),
        "device_memory_gib": stats["bytes_limit"] / GiB if "bytes_limit" in stats else None,
        "host": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "load_average": os.getloadavg()[0],
        "bandwidth_gb_s": suite.bandwidth / 1e9,
        "peak_tflops": suite.peak_flops / 1e12,
        "peak_source": suite.peak_source,
        "hf_peer": suite.hf_device,
        "versions": {
            "qwen-jax": qwen_jax.__version__,
            "jax": jax.__version__,
            "flax": flax.__version__,
            "orbax-checkpoint": orbax.checkpoint.__version__,
            "python": platform.python_version(),
        },
    }


def markdown(machine: dict, records: list[dict]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    lines = [
        f"# qwen-jax device suite ({machine['plan']}, {machine['dtype']})",
        "",
        f"{machine['date']}: {machine['device']} ({machine['backend']}, {machine['devices']} device(s)), "
        f"host {machine['host']}, load average {machine['load_average']:.1f}; {versions}.",
        f"Measured memory bandwidth {machine['bandwidth_gb_s']:.1f} GB/s; peak {machine['peak_tflops']:.3g} TFLOP/s "
        f"({machine['peak_source']}); HF transformers peer: {machine['hf_peer'] or 'not run'}.",
        "",
        "| step | metric | qwen-jax | HF transformers | ratio | % of roofline / MFU | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for record in records:
        if not record["rows"]:
            lines.append(f"| {record['step']} | {record['status']} | | | | | |")
        for row in record["rows"]:
            ratio = f"{row['value'] / row['hf']:.2f}x" if row["hf"] else ""
            percent = f"{row['percent']:.0f}% {row['percent_of']}" if row["percent"] is not None else ""
            lines.append(
                f"| {record['step']} | {row['metric']} | {format_number(row['value'])} | "
                f"{format_number(row['hf']) if row['hf'] else ''} | {ratio} | {percent} | {row['note']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="steps: " + ", ".join(step.name for step in STEPS)
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="run on the CPU with scaled-down configurations")
    parser.add_argument("--out", default="device-suite-results", help="directory for device_suite.json and .md")
    parser.add_argument(
        "--workdir",
        default=os.path.join(tempfile.gettempdir(), "qwen-jax-device-suite"),
        help="random checkpoints go here and are reused by later runs",
    )
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps")
    parser.add_argument("--skip", nargs="+", default=[], metavar="STEP", help="leave these steps out")
    parser.add_argument("--keep-going", action="store_true", help="run the remaining steps after a failure")
    parser.add_argument(
        "--no-memory-check", action="store_true", help="run steps whose estimated memory exceeds the device's"
    )
    parser.add_argument("--no-hf-peer", action="store_true", help="do not run HF transformers on the decode steps")
    parser.add_argument(
        "--list", action="store_true", help="list the steps and whether this version has their features"
    )
    args = parser.parse_args(argv)
    if args.list:
        for step in STEPS:
            available = not step.needs or load_model_accepts(step.needs)
            print(
                f"{step.name:18s} "
                + ("ready" if available else f"{SKIPPED_FEATURE} (load_model has no {step.needs!r} argument)")
            )
        return 0
    if args.cpu_smoke:
        jax.config.update("jax_platforms", "cpu")
    # The start-up step runs the CLI in child processes, which need device memory of their own.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    plan = cpu_smoke_plan() if args.cpu_smoke else accelerator_plan()
    try:
        steps = select_steps(args.only, args.skip)
        check_backend(args.cpu_smoke)
        check_imports()
        os.makedirs(args.workdir, exist_ok=True)
        check_fits(plan, steps, args.workdir, memory=not args.no_memory_check)
    except PreflightError as e:
        print(f"device_suite: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    suite = Suite(plan, args.workdir, hf_peer=not args.no_hf_peer)
    machine = machine_summary(suite, "cpu-smoke" if args.cpu_smoke else "accelerator")
    print(json.dumps(machine), flush=True)
    start = time.perf_counter()

    def report(records):
        with open(os.path.join(args.out, "device_suite.json"), "w") as f:
            json.dump({"machine": machine, "steps": records, "total_s": time.perf_counter() - start}, f, indent=1)
        with open(os.path.join(args.out, "device_suite.md"), "w") as f:
            f.write(markdown(machine, records))

    status = run_steps(suite, steps, args.keep_going, report)
    print(f"total {time.perf_counter() - start:.0f} s; results in {args.out}/device_suite.json and device_suite.md")
    return status


if __name__ == "__main__":
    sys.exit(main())
