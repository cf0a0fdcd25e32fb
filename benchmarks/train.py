"""Training throughput: qwen-jax vs HF transformers/torch, full and LoRA, in the same run.

    python benchmarks/train.py [--preset 0.5B] [--seq-len 512] [--batch-size 1] [--steps 3] [--modes full,lora]
    python benchmarks/train.py --compare-processes --batch-size 8 --seq-len 128 [--devices 8] [--layers 2] \
        [--vocab-size 8192]

Random weights of the chosen preset, one packed batch of `batch_size` x `seq_len` tokens per
step, AdamW. Reports tokens/s and MFU (model FLOPs: 6N per token for full fine-tuning, 4N for
LoRA, plus attention, over the peak). The peak is the known dense bf16 peak on GPU/TPU, and on
CPU the float32 matmul rate measured here (a large matrix product), so CPU MFU reads as
"fraction of what this machine's matmul unit delivers". Both sides compute in float32 on CPU
and bfloat16 (float32 master weights) on GPU/TPU. The first step (compilation for JAX) is
excluded from the timing.

`--compare-processes` measures what running across processes costs: the same full fine-tuning
step on 1 process x 8 fake CPU devices and on 2 processes x 4 (`jax.distributed`, gloo collectives
over loopback TCP), each in fresh processes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.environ.get(
    "QWEN_JAX_TOKENIZER_DIR", os.path.join(REPO, "..", "shared", "reference", "qwen2.5-tokenizer")
)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def measured_matmul_flops(dtype, n: int = 2048) -> float:
    """Achieved FLOP/s of a large square matmul (the machine's practical peak)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    reps = 5
    for _ in range(reps):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def cpu_seconds() -> float:
    """User + system CPU time of this process so far: less disturbed than wall time by other jobs
    on a shared machine (a process waiting for a core spends no CPU time)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def random_batch(config, seq_len: int, rows: int, seed: int = 0):
    from qwen_jax.train.data.packing import PackedBatch

    rng = np.random.default_rng(seed)
    vocab = min(config.vocab_size, 151643) if config is not None else 151643
    ids = rng.integers(0, vocab, (rows, seq_len + 1)).astype(np.int32)
    ones = np.ones((rows, seq_len), np.int32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy()
    return PackedBatch(ids[:, :-1], positions, ones, ids[:, 1:], ones.astype(np.float32))


def write_data_file(workdir: str) -> str:
    """The trainer needs a data file; the benchmark feeds its own batches."""
    data = os.path.join(workdir, "data.jsonl")
    if not os.path.exists(data):
        with open(data, "w") as f:
            f.write(json.dumps({"text": "benchmark " * 8}) + "\n")
    return data


def bench_jax(
    preset,
    seq_len: int,
    rows: int,
    steps: int,
    lora_rank: int,
    workdir: str,
    layers: int | None = None,
    vocab_size: int | None = None,
    tokenizer: str = TOKENIZER,
    mesh: str = "",
) -> dict:
    """Seconds per train step (after the first) of a random model: `preset` is a preset name or a
    Qwen2Config (`layers` / `vocab_size` shrink it), `mesh` a --mesh spec (default: every device
    on fsdp). The tokenizer only reads the one-line data file the trainer insists on."""
    from qwen_jax import Qwen2Config, create_model
    from qwen_jax.model.causal_lm import default_dtype
    from qwen_jax.train.config import TrainConfig
    from qwen_jax.train.loop import Trainer, resolve_mesh

    config = Qwen2Config.preset(preset) if isinstance(preset, str) else preset
    if layers:
        config = config.replace(num_hidden_layers=layers)
    if vocab_size:
        config = config.replace(vocab_size=vocab_size)
    data = write_data_file(workdir)
    train_config = TrainConfig(
        model="random weights",
        tokenizer=tokenizer,
        data=data,
        out=workdir,
        seq_len=seq_len,
        batch_size=rows,
        steps=steps,
        lora_rank=lora_rank,
        lora_alpha=2.0 * max(lora_rank, 1),
        progress=False,
        save_every=0,
        mesh=mesh,
    )
    model = create_model(config, dtype=default_dtype(), param_dtype=jnp.float32, mesh=resolve_mesh(mesh))
    trainer = Trainer(train_config, model=model, log=lambda message: None)
    batch = random_batch(config, seq_len, rows)
    start = time.perf_counter()
    trainer.train_step(batch)
    compile_s = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), cpu_seconds()
    for _ in range(steps):
        metrics = trainer.train_step(batch)
    seconds = (time.perf_counter() - start) / steps
    cpu_s = (cpu_seconds() - cpu_start) / steps
    trainer.checkpoints.close()
    del trainer, model
    gc.collect()
    return {"step_s": seconds, "cpu_s": cpu_s, "first_step_s": compile_s, "loss": metrics["loss"]}


class TorchLoRALinear:
    """y = W x + (alpha / r) B A x around a frozen torch nn.Linear (what peft's LoRA computes)."""

    @staticmethod
    def wrap(linear, rank: int, alpha: float):
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.base = linear
                self.lora_a = torch.nn.Parameter(torch.randn(rank, linear.in_features) / linear.in_features**0.5)
                self.lora_b = torch.nn.Parameter(torch.zeros(linear.out_features, rank))
                self.scale = alpha / rank

            def forward(self, x):
                return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

        return Wrapped()


def bench_torch(preset: str, seq_len: int, rows: int, steps: int, lora_rank: int) -> dict:
    import torch
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM

    from qwen_jax import Qwen2Config

    torch.manual_seed(0)
    hf_config = HFConfig(**Qwen2Config.preset(preset).to_hf())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Qwen2ForCausalLM(hf_config).float().train().to(device)
    if lora_rank:
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.model.layers:
            for parent, names in ((layer.self_attn, LORA_TARGETS[:4]), (layer.mlp, LORA_TARGETS[4:])):
                for name in names:
                    setattr(parent, name, TorchLoRALinear.wrap(getattr(parent, name), lora_rank, 2.0 * lora_rank))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = random_batch(None, seq_len, rows)
    ids = torch.as_tensor(batch.input_ids, dtype=torch.long, device=device)
    # HF shifts labels itself: labels = the input ids (our targets are the same sequence shifted).
    labels = ids
    # float32 master weights; bfloat16 compute on GPU, float32 on CPU (as qwen-jax does).
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        with autocast:
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), cpu_seconds()
    for _ in range(steps):
        loss = step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    cpu_s = (cpu_seconds() - cpu_start) / steps
    model = optimizer = None  # `step` holds them too: release the model before the next run
    gc.collect()
    return {"step_s": seconds, "cpu_s": cpu_s, "first_step_s": first, "loss": loss}


# --------------------------------------------------------------------------- processes
_PROCESS_WORKER = """
import json, sys
process_id, processes, port, preset, layers, vocab, seq_len, rows, steps, workdir = sys.argv[1:11]
from qwen_jax.train import multihost
if int(processes) > 1:
    multihost.initialize(f"localhost:{port}", int(processes), int(process_id))
sys.path.insert(0, {repo!r})
from benchmarks.train import bench_jax
result = bench_jax(preset, int(seq_len), int(rows), int(steps), 0, workdir, int(layers), int(vocab))
if multihost.is_primary():
    print("RESULT " + json.dumps(result), flush=True)
"""


def bench_processes(
    preset: str, layers: int, vocab_size: int, seq_len: int, rows: int, steps: int, processes: int, devices: int
) -> dict:
    """One full fine-tuning run of `processes` x `devices / processes` fake CPU devices (jax.distributed, gloo)."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices // processes}"}
    code = _PROCESS_WORKER.replace("{repo!r}", repr(REPO))
    workdir = tempfile.mkdtemp()  # the run's output directory, shared by the processes
    write_data_file(workdir)
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                code,
                str(i),
                str(processes),
                str(port),
                preset,
                str(layers),
                str(vocab_size),
                str(seq_len),
                str(rows),
                str(steps),
                workdir,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for i in range(processes)
    ]
    outputs = [w.communicate()[0] for w in workers]
    if any(w.returncode for w in workers):
        raise RuntimeError(f"a benchmark process failed: {[w.returncode for w in workers]}")
    (line,) = [line for line in outputs[0].splitlines() if line.startswith("RESULT ")]
    return json.loads(line[len("RESULT ") :])


def compare_processes(args) -> int:
    """Tokens/s of the same training step on 1 process x N devices and on 2 processes x N/2."""
    tokens = args.batch_size * args.seq_len
    print(
        f"# {args.preset} architecture with {args.layers} layer(s) and a {args.vocab_size}-token vocabulary, "
        f"full fine-tuning step, batch {args.batch_size} "
        f"x seq {args.seq_len}, {args.devices} fake CPU devices (fsdp={args.devices})"
    )
    results = {}
    for processes in (1, 2):
        result = bench_processes(
            args.preset,
            args.layers,
            args.vocab_size,
            args.seq_len,
            args.batch_size,
            args.steps,
            processes,
            args.devices,
        )
        results[processes] = result
        print(
            f"{processes} process(es) x {args.devices // processes} devices: {result['step_s']:7.2f} s/step  "
            f"{tokens / result['step_s']:8.1f} tokens/s  (first step {result['first_step_s']:.1f} s, "
            f"loss {result['loss']:.4f})",
            flush=True,
        )
    print(f"2-process / 1-process tokens/s: {results[1]['step_s'] / results[2]['step_s']:.2f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="0.5B")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--modes", default="full,lora", help="comma-separated: full (all weights), lora (adapters)")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--compare-processes",
        action="store_true",
        help="instead: full fine-tuning on 1 process x --devices fake CPU devices vs 2 processes x half",
    )
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices in all, for --compare-processes")
    parser.add_argument(
        "--layers",
        type=int,
        default=2,
        help="decoder layers of the preset's architecture, for --compare-processes (memory)",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=8192,
        help="vocabulary for --compare-processes: FSDP gathers the embedding on every fake device, "
        "so the real 151,936 rows need ~1 GB per device",
    )
    args = parser.parse_args(argv)
    if args.compare_processes:
        return compare_processes(args)

    from qwen_jax import Qwen2Config
    from qwen_jax.model.causal_lm import default_dtype
    from qwen_jax.train.step import flops_per_token, peak_flops_per_device

    config = Qwen2Config.preset(args.preset)
    backend = jax.default_backend()
    peak = peak_flops_per_device(0.0)
    peak_source = "published dense bf16 peak"
    if peak is None:
        peak, peak_source = measured_matmul_flops(default_dtype()), f"measured {np.dtype(default_dtype()).name} matmul"
    devices = jax.device_count()
    tokens = args.batch_size * args.seq_len
    print(
        f"# {args.preset} train step, batch {args.batch_size} x seq {args.seq_len}, backend {backend} "
        f"({jax.devices()[0].device_kind}, {devices} device(s)); peak {peak / 1e12:.2f} TFLOP/s/device ({peak_source})"
    )
    results = []
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if not modes or set(modes) - {"full", "lora"}:
        parser.error(f"--modes {args.modes!r}: choose from full, lora")
    for mode, rank in (("full", 0), ("lora", args.lora_rank)):
        if mode not in modes:
            continue
        flops = flops_per_token(config, args.seq_len, lora=bool(rank)) * tokens
        runs = [
            (
                "qwen-jax",
                lambda rank=rank: bench_jax(
                    args.preset, args.seq_len, args.batch_size, args.steps, rank, tempfile.mkdtemp()
                ),
            )
        ]
        if not args.skip_torch:
            runs.append(
                (
                    "hf-torch",
                    lambda rank=rank: bench_torch(args.preset, args.seq_len, args.batch_size, args.steps, rank),
                )
            )
        for name, fn in runs:
            result = fn()
            result.update(
                impl=name,
                mode=mode,
                tokens_per_s=tokens / result["step_s"],
                mfu=flops / result["step_s"] / (peak * devices),
            )
            results.append(result)
            print(
                f"{name:9s} {mode:4s}: {result['step_s']:7.2f} s/step ({result['cpu_s']:.2f} CPU s)  "
                f"{result['tokens_per_s']:8.1f} tokens/s  "
                f"MFU {100 * result['mfu']:5.1f}%  (first step {result['first_step_s']:.1f} s, "
                f"loss {result['loss']:.3f})",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "preset": args.preset,
                    "seq_len": args.seq_len,
                    "batch_size": args.batch_size,
                    "backend": backend,
                    "peak_flops": peak,
                    "results": results,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
