"""Post-training step time: qwen-jax `train --method grpo` vs TRL's GRPOTrainer, same settings, same machine.

    python benchmarks/post_training.py grpo [--preset 0.5B] [--layers N] [--prompts 8] [--generations 8] \
        [--new-tokens 128] [--lora-rank 16] [--steps 2] [--skip-trl] [--json OUT]

Random weights of the preset (optionally cut to `--layers`), the real Qwen2.5 tokenizer, synthetic
arithmetic prompts, LoRA, one reward (`length_reward` below, the same function for both), sampling
at temperature 1 with exactly `--new-tokens` tokens per completion (no stop token: a random model
would stop at random lengths, and the two sides would then generate different amounts). qwen-jax
rolls out on its engine; TRL generates with transformers (its fastest rollout that runs without
vLLM). Reports seconds per step after the first (compilation for JAX, warm-up for torch), split
into rollout and update for qwen-jax.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.environ.get(
    "QWEN_JAX_TOKENIZER_DIR", os.path.join(REPO, "..", "shared", "reference", "qwen2.5-tokenizer")
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


def prompts(count: int) -> list[dict]:
    rng = np.random.default_rng(0)
    pairs = rng.integers(10, 100, (count, 2))
    return [{"prompt": f"What is {a} + {b}? Think step by step.", "answer": str(a + b)} for a, b in pairs]


def bench_qwen_jax(model_dir: str, data: str, args, workdir: str) -> dict:
    from qwen_jax.train.config import TrainConfig
    from qwen_jax.train.grpo_trainer import GRPOTrainer

    out = os.path.join(workdir, "qwen_jax_run")
    config = TrainConfig(
        method="grpo",
        model=model_dir,
        data=data,
        out=out,
        reward=[f"{os.path.abspath(__file__)}:length_reward"],
        batch_size=args.prompts,
        num_generations=args.generations,
        max_new_tokens=args.new_tokens,
        seq_len=args.new_tokens + 64,
        steps=args.steps + 1,
        lora_rank=args.lora_rank,
        lora_alpha=2.0 * args.lora_rank,
        learning_rate=1e-5,
        save_every=0,
        progress=False,
    )
    GRPOTrainer(config, log=lambda _: None).run()
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f][1:]  # the first step compiles
    return {
        "step_s": float(np.mean([r["step_time"] for r in records])),
        "rollout_s": float(np.mean([r["rollout_seconds"] for r in records])),
        "update_s": float(np.mean([r["update_seconds"] for r in records])),
        "rollout_tokens_per_s": float(np.mean([r["rollout_tokens_per_s"] for r in records])),
        "completion_length": float(np.mean([r["completion_length"] for r in records])),
    }


def bench_trl(model_dir: str, data_records: list[dict], args, workdir: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            step_times.append(time.perf_counter() - self.start)

    torch.manual_seed(0)
    config = GRPOConfig(
        output_dir=os.path.join(workdir, "trl_run"),
        per_device_train_batch_size=args.prompts * args.generations,
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
    lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=LORA_TARGETS)
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=length_reward,
        args=config,
        train_dataset=Dataset.from_list(data_records),
        peft_config=lora,
        callbacks=[StepTimer()],
    )
    trainer.train()
    timed = step_times[1:]
    return {"step_s": float(np.mean(timed))}


def grpo(args) -> dict:
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_grpo_")
    model_dir = os.path.join(workdir, f"model_{args.preset}_{args.layers or 'all'}")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        write_checkpoint(model_dir, args.preset, args.layers)
    records = prompts(args.prompts)
    data = os.path.join(workdir, "prompts.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    settings = {k: getattr(args, k) for k in ("preset", "layers", "prompts", "generations", "new_tokens", "lora_rank")}
    result = {"settings": settings, "qwen_jax": bench_qwen_jax(model_dir, data, args, workdir)}
    if not args.skip_trl:
        result["trl"] = bench_trl(model_dir, records, args, workdir)
        result["speedup"] = result["trl"]["step_s"] / result["qwen_jax"]["step_s"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    methods = parser.add_subparsers(dest="method", required=True)
    grpo_parser = methods.add_parser("grpo", help="GRPO step time against TRL's GRPOTrainer")
    grpo_parser.add_argument("--preset", default="0.5B")
    grpo_parser.add_argument("--layers", type=int, default=None, help="cut the preset to this many layers")
    grpo_parser.add_argument("--prompts", type=int, default=8)
    grpo_parser.add_argument("--generations", type=int, default=8)
    grpo_parser.add_argument("--new-tokens", type=int, default=128)
    grpo_parser.add_argument("--lora-rank", type=int, default=16)
    grpo_parser.add_argument("--steps", type=int, default=2, help="timed steps after the first")
    grpo_parser.add_argument("--skip-trl", action="store_true")
    grpo_parser.add_argument("--workdir", help="keeps the random checkpoint between runs")
    grpo_parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    result = grpo(args)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
