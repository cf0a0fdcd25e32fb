"""Post-training speed: qwen-jax vs TRL on the same machine, same settings, one method at a time.

    python benchmarks/post_training.py --method dpo [--preset 0.5B] [--layers N] [--seq-len 128] \
        [--batch-size 2] [--steps 3] [--lora-rank 16] [--skip-trl] [--json OUT]
    python benchmarks/post_training.py --method grpo [--preset 0.5B] [--layers N] [--prompts 8] \
        [--generations 8] [--new-tokens 128] [--lora-rank 16] [--steps 2] [--skip-trl] [--workdir DIR] \
        [--bound-only] [--json OUT]

DPO: LoRA on random weights of the preset (`--layers` cuts the decoder layers), `--batch-size`
preference pairs per step, each sequence `--seq-len` tokens (half prompt, half completion, no
padding), AdamW, the reference being the model with its adapters off on both sides (TRL: a peft
model without a second copy). qwen-jax runs `Trainer.train_step` of `--method dpo`; TRL runs
`DPOTrainer` (TRL's own tokenization of text records whose words are one token each, its collator,
its loss). Tokens/s counts both sequences of every pair; the first step (compilation for JAX) is
excluded. Both compute in float32 on CPU and bfloat16 on GPU.

GRPO: step time of `train --method grpo` against TRL's GRPOTrainer. Random weights of the preset
(optionally cut to `--layers`), the real Qwen2.5 tokenizer, synthetic arithmetic prompts, LoRA, one
reward (`length_reward` below, the same function for both), sampling at temperature 1 with exactly
`--new-tokens` tokens per completion (no stop token: a random model would stop at random lengths,
and the two sides would then generate different amounts; both report their completion lengths).
qwen-jax rolls out on its engine; TRL generates with transformers (its fastest rollout that runs
without vLLM). Both trainers live in one process and their steps alternate (TRL's step i, then
qwen-jax's step i, run from TRL's step-end callback), so a change in the machine's load hits both.
Reports each step, and seconds per step after the first (compilation for JAX, warm-up for torch),
split into rollout (sampling, rewards, reference log-probabilities) and update for qwen-jax, with
the ratio of each pair of steps. qwen-jax's rows are the longest prompt (rounded up to 16 tokens)
plus `--new-tokens` long; TRL pads to the longest prompt and completion. Each GRPO run (and
`--bound-only` alone) also prints `bound`: the FLOPs of the step's parts, this machine's best product
rates and the least step time they allow any implementation (`grpo_bound`), and with TRL's step
the ratio no implementation could exceed here (`speedup_ceiling`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
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
# Words that the Qwen2.5 tokenizer encodes as one token each after a space, in any order.
WORDS = "the cat sat on a mat and dog ran to park red blue green ball is what color sky sea one two".split()


def model_config(preset: str, layers: int | None):
    from qwen_jax import Qwen2Config

    config = Qwen2Config.preset(preset)
    return config.replace(num_hidden_layers=layers) if layers else config


def text_pairs(pairs: int, seq_len: int, seed: int = 0) -> list[dict[str, str]]:
    """Records whose prompt and completions are `seq_len // 2` one-token words each."""
    rng = np.random.default_rng(seed)
    half = seq_len // 2

    def words(n):
        return "".join(" " + w for w in rng.choice(WORDS, n))

    # The completion is one word shorter: TRL appends the EOS token to it.
    return [{"prompt": words(half), "chosen": words(half - 1), "rejected": words(half - 1)} for _ in range(pairs)]


# --------------------------------------------------------------------------- DPO
def bench_dpo_jax(preset, layers, seq_len, pairs, steps, lora_rank, workdir) -> dict:
    from qwen_jax import create_model
    from qwen_jax.model.causal_lm import default_dtype
    from qwen_jax.tokenizer import Tokenizer
    from qwen_jax.train.config import TrainConfig
    from qwen_jax.train.data.preference import PreferenceColumns, PreferenceTokenization
    from qwen_jax.train.loop import Trainer, resolve_mesh

    config = model_config(preset, layers)
    records = text_pairs(pairs, seq_len)
    data = os.path.join(workdir, "pairs.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    train_config = TrainConfig(
        model="random weights",
        tokenizer=TOKENIZER,
        data=data,
        out=workdir,
        method="dpo",
        seq_len=seq_len,
        batch_size=pairs,
        steps=steps + 1,
        lora_rank=lora_rank,
        lora_alpha=2.0 * lora_rank,
        progress=False,
        save_every=0,
    )
    model = create_model(config, dtype=default_dtype(), param_dtype=jnp.float32, mesh=resolve_mesh(""))
    trainer = Trainer(train_config, model=model, log=lambda message: None)
    tokenization, columns = PreferenceTokenization(Tokenizer.from_dir(TOKENIZER)), PreferenceColumns()
    lengths = [len(e.tokens) for r in records for e in tokenization.examples(columns.canonical(r))]
    batch = trainer.loader.batch(0, 0)
    start = time.perf_counter()
    trainer.train_step(batch)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        metrics = trainer.train_step(batch)
    seconds = (time.perf_counter() - start) / steps
    trainer.checkpoints.close()
    del trainer, model
    gc.collect()
    return {"step_s": seconds, "first_step_s": first, "loss": metrics["loss"], "tokens": sum(lengths)}


def bench_dpo_trl(preset, layers, seq_len, pairs, steps, lora_rank, workdir) -> dict:
    import datasets
    import peft
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM, TrainerCallback
    from transformers import Qwen2Config as HFConfig
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(HFConfig(**model_config(preset, layers).to_hf())).float()
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    lora = peft.LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=list(LORA_TARGETS), lora_dropout=0.0)
    cuda = torch.cuda.is_available()
    args = DPOConfig(
        output_dir=workdir,
        per_device_train_batch_size=pairs,
        max_steps=steps + 1,
        learning_rate=1e-4,
        max_length=seq_len,
        beta=0.1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not cuda,
        bf16=cuda,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    dataset = datasets.Dataset.from_list(text_pairs(pairs, seq_len) * (steps + 1))
    times, tokens = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[Timer()],
    )
    for row in trainer.train_dataset.select(range(pairs)):
        tokens += [len(row["prompt_ids"]) + len(row["chosen_ids"]), len(row["prompt_ids"]) + len(row["rejected_ids"])]
    result = trainer.train()
    seconds = float(np.mean(times[1:]))
    del trainer, model
    gc.collect()
    return {"step_s": seconds, "first_step_s": times[0], "loss": result.training_loss, "tokens": sum(tokens)}


# --------------------------------------------------------------------------- GRPO
def length_reward(prompts, completions, **kwargs):
    """The benchmark's reward (any cheap function does: the rewards are not what is measured)."""
    return [len(c if isinstance(c, str) else c[-1]["content"]) / 100.0 for c in completions]


def write_checkpoint(directory: str, preset: str, layers: int | None) -> str:
    """A random HF checkpoint of the preset (no eos: completions run to the token limit) with the real tokenizer."""
    import torch
    from transformers import Qwen2Config as HFQwen2Config
    from transformers import Qwen2ForCausalLM

    from qwen_jax.config import Qwen2Config

    config = {**Qwen2Config.preset(preset).to_hf(), "eos_token_id": None, "bos_token_id": None}
    if layers:
        config["num_hidden_layers"] = layers
    config.pop("architectures", None)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(HFQwen2Config(**config)).to(torch.float32)
    model.generation_config.eos_token_id = None
    model.save_pretrained(directory, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(TOKENIZER, name), os.path.join(directory, name))
    # The tokenizer's eos would still stop both samplers: name a token a random model practically never draws.
    with open(os.path.join(directory, "tokenizer_config.json")) as f:
        tokenizer_config = json.load(f)
    tokenizer_config["eos_token"] = "<|box_end|>"
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f)
    return directory


def grpo_prompts(count: int) -> list[dict]:
    rng = np.random.default_rng(0)
    pairs = rng.integers(10, 100, (count, 2))
    return [{"prompt": f"What is {a} + {b}? Think step by step.", "answer": str(a + b)} for a, b in pairs]


def grpo_flops(config, prompt_lengths: list[int], generations: int, new_tokens: int) -> dict[str, float]:
    """Lower bounds on the FLOPs of the parts of one GRPO step (2 per multiply-add), for any implementation.

    prefill: each prompt once, with the logits of its first completion token. decode: the
    `generations` × (`new_tokens` - 1) later tokens, each with its `lm_head` product. forward: the
    update's forward over every row (one policy update, `beta` 0, frozen base weights), logits at
    the completion positions only. backward: the gradients of the activations, which repeat every
    product of the forward except the first layer's q/k/v input gradients (nothing trainable lies
    below them). Left out, so that no implementation needs fewer: the last layer's products at
    prompt positions other than k/v (no loss term reads them), LoRA's own products, the softmax
    and everything elementwise."""
    from qwen_jax.train.step import matmul_params

    hidden, layers = config.hidden_size, config.num_hidden_layers
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    head = hidden * config.vocab_size
    linear = (matmul_params(config) - head) // layers  # a decoder layer's matmul weights

    def decoder(before: int, tokens: int) -> float:  # `tokens` tokens after `before` in one row
        context = tokens * before + tokens * (tokens + 1) / 2  # keys each new token attends to, summed
        return 2.0 * layers * (linear * tokens + 2 * q * context)

    rows = generations * len(prompt_lengths)
    prompt_tokens = generations * sum(prompt_lengths)
    # The prefill gives each prompt's first completion token; each of the other tokens but the last is fed back.
    prefill = sum(decoder(0, n) for n in prompt_lengths) + 2.0 * head * len(prompt_lengths)
    decode = generations * sum(decoder(n, new_tokens - 1) for n in prompt_lengths)
    decode += 2.0 * head * rows * (new_tokens - 1)
    forward = generations * sum(decoder(0, n + new_tokens) for n in prompt_lengths) + 2.0 * head * rows * new_tokens
    forward -= 2.0 * (linear - 2 * hidden * kv) * prompt_tokens  # the last layer at prompt positions: k/v only
    backward = forward - 2.0 * hidden * (q + 2 * kv) * (prompt_tokens + rows * new_tokens)
    return {"prefill": prefill, "decode": decode, "forward": forward, "backward": backward}


def matmul_rate(shapes: list[tuple[int, int, int]], repeats: int = 10) -> float:
    """The best float32 rate (FLOP/s) of this machine's matrix products `[m, k] @ [k, n]` of the given
    shapes, JAX's or torch's, whichever is faster."""
    import torch

    def best_rate(run, flops: float) -> float:
        run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return flops / min(times)

    product = jax.jit(jnp.matmul)
    rates = []
    for m, k, n in shapes:
        a, b = np.ones((m, k), np.float32), np.ones((k, n), np.float32)
        x, y = jnp.asarray(a), jnp.asarray(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        rates.append(best_rate(lambda x=x, y=y: product(x, y).block_until_ready(), 2.0 * m * k * n))
        rates.append(best_rate(lambda ta=ta, tb=tb: ta @ tb, 2.0 * m * k * n))
    return max(rates)


def grpo_bound(args, prompt_lengths: list[int]) -> dict[str, float]:
    """The step's FLOPs (`grpo_flops`), this machine's best product rates, and so the least time a step
    of any implementation can take here.

    Every product is credited with the best rate measured for its kind: the model's MLP products
    over 4,096 rows for the prefill and the update, and the decode step's products over the step's
    rows (every completion decoded at once) for the decode. `least_step_seconds` counts the update's
    forward, as both trainers run it; `least_step_seconds_reusing_activations` lets the update reuse
    the rollout's activations in place of its own forward (kept from the decode: the same
    parameters, so the same values), the most generous assumption."""
    config = model_config(args.preset, args.layers)
    flops = grpo_flops(config, prompt_lengths, args.generations, args.new_tokens)
    hidden, inner, rows = config.hidden_size, config.intermediate_size, args.prompts * args.generations
    rate = matmul_rate([(4096, hidden, inner), (4096, inner, hidden)])
    decode_rate = matmul_rate([(rows, hidden, inner), (rows, inner, hidden), (rows, hidden, config.vocab_size)])
    reusing = flops["prefill"] / rate + flops["decode"] / decode_rate + flops["backward"] / rate
    return {
        **{f"{name}_tflop": value / 1e12 for name, value in flops.items()},
        "matmul_gflop_per_s": rate / 1e9,
        "decode_matmul_gflop_per_s": decode_rate / 1e9,
        "least_step_seconds": reusing + flops["forward"] / rate,
        "least_step_seconds_reusing_activations": reusing,
    }


def grpo_jax_trainer(model_dir: str, data: str, args, workdir: str, seq_len: int):
    """qwen-jax's GRPO trainer (`train --method grpo`) at the benchmark's settings; `run_step` runs one step."""
    from qwen_jax.train.config import TrainConfig
    from qwen_jax.train.grpo_trainer import GRPOTrainer

    config = TrainConfig(
        method="grpo",
        model=model_dir,
        data=data,
        out=os.path.join(workdir, "qwen_jax_run"),
        reward=[f"{os.path.abspath(__file__)}:length_reward"],
        batch_size=args.prompts,
        num_generations=args.generations,
        max_new_tokens=args.new_tokens,
        seq_len=seq_len,
        steps=args.steps + 1,
        grad_accum=args.grad_accum,
        lora_rank=args.lora_rank,
        lora_alpha=2.0 * args.lora_rank,
        learning_rate=1e-5,
        save_every=0,
        progress=False,
    )
    return GRPOTrainer(config, log=lambda _: None)


def grpo_trl_trainer(model_dir: str, data_records: list[dict], args, workdir: str, callback):
    """TRL's GRPOTrainer at the same settings, generating with transformers; `callback` times its steps."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    config = GRPOConfig(
        output_dir=os.path.join(workdir, "trl_run"),
        # The same 64 completions per optimizer step, generated at once, updated in grad_accum micro-batches:
        # one batch of 64 x 144 tokens would hold several 64 x 144 x 151,936 float32 logits (5.6 GB each).
        per_device_train_batch_size=args.prompts * args.generations // args.grad_accum,
        gradient_accumulation_steps=args.grad_accum,
        num_generations=args.generations,
        max_completion_length=args.new_tokens,
        max_steps=args.steps + 1,
        learning_rate=1e-5,
        temperature=1.0,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,  # qwen-jax does not rematerialize either (--remat none)
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=list(LORA_TARGETS))
    return GRPOTrainer(
        model=model_dir,
        reward_funcs=length_reward,
        args=config,
        train_dataset=Dataset.from_list(data_records * (args.steps + 1)),
        peft_config=lora,
        callbacks=[callback],
    )


def grpo(args) -> dict:
    """The GRPO comparison (`--method grpo`): both trainers in one process, their steps alternating
    (TRL's step i, then qwen-jax's step i), so that a change in the machine's load hits both; the
    first step of each (compilation for JAX, warm-up for torch) is not timed."""
    from transformers import TrainerCallback

    from qwen_jax.tokenizer import Tokenizer

    records = grpo_prompts(args.prompts)
    tokenizer = Tokenizer.from_dir(TOKENIZER)
    prompt_lengths = [len(tokenizer.encode(r["prompt"])) for r in records]
    bound = grpo_bound(args, prompt_lengths)
    print(f"# bound: {json.dumps(bound)}", flush=True)
    if args.bound_only:
        return {"bound": bound}
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_grpo_")
    model_dir = os.path.join(workdir, f"model_{args.preset}_{args.layers or 'all'}")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        write_checkpoint(model_dir, args.preset, args.layers)
    data = os.path.join(workdir, "prompts.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    # Rows as long as the longest prompt (rounded up to 16) + the completion: TRL pads to the longest too.
    seq_len = args.new_tokens + -(-max(prompt_lengths) // 16) * 16
    jax_trainer = grpo_jax_trainer(model_dir, data, args, workdir, seq_len)
    jax_steps: list[dict] = []
    trl_steps: list[dict] = []

    def jax_step() -> None:
        metrics, _ = jax_trainer.run_step()
        jax_steps.append({k: metrics[k] for k in ("step_time", "rollout_seconds", "update_seconds", "tokens")})
        jax_steps[-1].update(
            rollout_tokens_per_s=metrics["rollout_tokens_per_s"], completion_length=metrics["completion_length"]
        )
        print(f"qwen-jax step {len(jax_steps)}: {json.dumps(jax_steps[-1])}", flush=True)

    class Alternate(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            trl_steps.append({"step_time": time.perf_counter() - self.start})
            jax_step()

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs and trl_steps:
                trl_steps[-1]["completion_length"] = logs["completions/mean_length"]
                print(f"trl step {len(trl_steps)}: {json.dumps(trl_steps[-1])}", flush=True)

    settings = {
        k: getattr(args, k)
        for k in ("preset", "layers", "prompts", "generations", "new_tokens", "lora_rank", "grad_accum")
    }
    print(
        f"# grpo: {json.dumps(settings)}, seq_len {seq_len}, backend {jax.default_backend()}, {os.cpu_count()} CPUs",
        flush=True,
    )
    if args.skip_trl:
        for _ in range(args.steps + 1):
            jax_step()
    else:
        grpo_trl_trainer(model_dir, records, args, workdir, Alternate()).train()
    jax_trainer.rollouts.close()
    jax_trainer.checkpoints.close()
    result = {
        "settings": {**settings, "seq_len": seq_len},
        "bound": bound,
        "qwen_jax_steps": jax_steps,
        "trl_steps": trl_steps,
    }
    timed_jax = jax_steps[1:]
    result["qwen_jax"] = {
        k: float(np.mean([s[k] for s in timed_jax]))
        for k in ("step_time", "rollout_seconds", "update_seconds", "rollout_tokens_per_s", "completion_length")
    }
    if trl_steps:
        timed_trl = trl_steps[1:]
        ratios = [t["step_time"] / j["step_time"] for t, j in zip(timed_trl, timed_jax)]
        result["trl"] = {
            "step_time": float(np.mean([s["step_time"] for s in timed_trl])),
            "completion_length": float(np.mean([s.get("completion_length", np.nan) for s in timed_trl])),
        }
        result["speedup"] = result["trl"]["step_time"] / result["qwen_jax"]["step_time"]
        result["speedup_per_step"] = ratios
        # The most any implementation could reach here (`grpo_bound`), with and without the update's forward.
        result["speedup_ceiling"] = result["trl"]["step_time"] / bound["least_step_seconds"]
        result["speedup_ceiling_reusing_activations"] = (
            result["trl"]["step_time"] / bound["least_step_seconds_reusing_activations"]
        )
    return result


def dpo(args) -> dict:
    """The DPO comparison (`--method dpo`): prints a line per implementation; its results."""
    print(
        f"# dpo: {args.preset}{f' ({args.layers} layers)' if args.layers else ''}, LoRA rank "
        f"{args.lora_rank}, {args.batch_size} pairs x 2 x {args.seq_len} tokens per step, backend "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind})"
    )
    runs = [("qwen-jax", bench_dpo_jax)] + ([] if args.skip_trl else [("trl", bench_dpo_trl)])
    results = []
    for name, bench in runs:
        result = bench(
            args.preset, args.layers, args.seq_len, args.batch_size, args.steps, args.lora_rank, tempfile.mkdtemp()
        )
        result.update(impl=name, tokens_per_s=result["tokens"] / result["step_s"])
        results.append(result)
        print(
            f"{name:9s}: {result['step_s']:7.2f} s/step  {result['tokens_per_s']:8.1f} tokens/s  "
            f"({result['tokens']} tokens/step, first step {result['first_step_s']:.1f} s, loss {result['loss']:.4f})",
            flush=True,
        )
    if len(results) == 2:
        print(f"qwen-jax / trl tokens/s: {results[0]['tokens_per_s'] / results[1]['tokens_per_s']:.2f}x")
    return {"args": vars(args), "results": results}


METHODS = {"dpo": dpo, "grpo": grpo}
DEFAULT_STEPS = {"dpo": 3, "grpo": 2}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=tuple(METHODS), default="dpo")
    parser.add_argument("--preset", default="0.5B")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--steps", type=int, help="timed steps after the first (default: dpo 3, grpo 2)")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    dpo_flags = parser.add_argument_group("dpo")
    dpo_flags.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (prompt + completion)")
    dpo_flags.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    grpo_flags = parser.add_argument_group("grpo")
    grpo_flags.add_argument("--prompts", type=int, default=8, help="prompts per step")
    grpo_flags.add_argument("--generations", type=int, default=8, help="completions per prompt")
    grpo_flags.add_argument("--new-tokens", type=int, default=128, help="tokens per completion")
    grpo_flags.add_argument(
        "--grad-accum", type=int, default=4, help="micro-batches per update on both sides (prompts must be a multiple)"
    )
    grpo_flags.add_argument("--workdir", help="keeps the random checkpoint between runs")
    grpo_flags.add_argument(
        "--bound-only",
        action="store_true",
        help="only print the step's FLOPs, this machine's product rate and the least step time they allow",
    )
    args = parser.parse_args(argv)
    if args.method == "grpo" and args.prompts % args.grad_accum:
        parser.error(f"--prompts {args.prompts} is not a multiple of --grad-accum {args.grad_accum}")
    if args.steps is None:
        args.steps = DEFAULT_STEPS[args.method]
    result = METHODS[args.method](args)
    if args.method == "grpo":
        print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
