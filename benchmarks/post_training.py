"""Post-training throughput: qwen-jax vs TRL on the same machine, one method at a time.

    python benchmarks/post_training.py --method dpo [--preset 0.5B] [--layers N] [--seq-len 128] \
        [--batch-size 2] [--steps 3] [--lora-rank 16] [--skip-trl]

DPO: LoRA on random weights of the preset (`--layers` cuts the decoder layers), `--batch-size`
preference pairs per step, each sequence `--seq-len` tokens (half prompt, half completion, no
padding), AdamW, the reference being the model with its adapters off on both sides (TRL: a peft
model without a second copy). qwen-jax runs `Trainer.train_step` of `--method dpo`; TRL runs
`DPOTrainer` (TRL's own tokenization of text records whose words are one token each, its collator,
its loss). Tokens/s counts both sequences of every pair; the first step (compilation for JAX) is
excluded. Both compute in float32 on CPU and bfloat16 on GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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


# --------------------------------------------------------------------------- qwen-jax
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


# --------------------------------------------------------------------------- TRL
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


METHODS = {"dpo": (bench_dpo_jax, bench_dpo_trl)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=tuple(METHODS), default="dpo")
    parser.add_argument("--preset", default="0.5B")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (prompt + completion)")
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    ours, theirs = METHODS[args.method]
    print(
        f"# {args.method}: {args.preset}{f' ({args.layers} layers)' if args.layers else ''}, LoRA rank "
        f"{args.lora_rank}, {args.batch_size} pairs x 2 x {args.seq_len} tokens per step, backend "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind})"
    )
    runs = [("qwen-jax", ours)] + ([] if args.skip_trl else [("trl", theirs)])
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
