"""Speculative decoding vs plain decoding: batch-1 greedy decode tokens/s with identical output.

On a Qwen2.5 configuration with random weights (default 0.5B, float32):

  * `ngram` K on an input-grounded task (rewrite a given 60-line function with one change). Random
    weights do not copy their input, so this shows the cost of speculation when little is accepted;
  * tokens/s against the acceptance rate, with the very verification program `ngram` runs, fed by
    an oracle proposer that knows plain decoding's output and proposes c of its next tokens
    correctly, then a wrong one (acceptance c/(c+1), c = K-1 .. 0), or all K correctly;
  * a draft model: the same weights (everything accepted) and the target's first layers;
  * with --draft-size, a draft of a smaller configuration (its own random weights, so it agrees with
    the target by chance only): its step time is measured, and its speed at each oracle acceptance
    rate derived from it (a step's programs have fixed shapes, whatever is accepted).
  * `--engine`: the continuous-batching `Engine` (what `qwen-jax serve` runs) with `ngram` K,
    one request alone and 8 at once, against the same engine without speculation; at 8 rows
    both with speculation forced at any load (`speculative_max_rows=8`) and with the default
    back-off (at most 4 rows), and at batch 1 with proposals that are never right, with and
    without the acceptance floor; and a draft model run by the engine (the same weights, and the
    target's first --draft-layers layers), speculating at any load. The engine's draft catches up
    on the prompt (in 256-token steps on CPU) at its first speculative step: that is in the decode time.

Every speculative run's tokens are compared with plain decoding's (greedy).

    QWEN_JAX_TOKENIZER_DIR=... python benchmarks/speculative.py                 # 0.5B, CPU
    python benchmarks/speculative.py --size 1.5B --draft-size 0.5B --draft-layers   # 1.5B target, 0.5B draft
    QWEN_JAX_TOKENIZER_DIR=... python benchmarks/speculative.py --engine                # the engine cases only
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform

import jax
from flax import nnx

import qwen_jax.engine.core as engine_core
import qwen_jax.generation.speculative as speculative
from qwen_jax import Qwen2Config, create_model
from qwen_jax.config import GenerationConfig
from qwen_jax.engine.core import Engine
from qwen_jax.generation.options import resolve_batch
from qwen_jax.generation.speculative import SpeculativeOptions
from qwen_jax.generation.static import generate_batch
from qwen_jax.model.causal_lm import unstack_layers
from qwen_jax.tokenizer import Tokenizer

SIZES = {
    "0.5B": Qwen2Config(),
    "1.5B": Qwen2Config(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2
    ),
}

FUNCTION = "\n".join(
    ["def summarize(records, threshold=0.5):", '    """Aggregate per-user statistics from a list of records."""']
    + [
        line
        for i in range(14)
        for line in (
            f"    value_{i} = [r['field_{i}'] for r in records if r.get('field_{i}') is not None]",
            f"    mean_{i} = sum(value_{i}) / len(value_{i}) if value_{i} else 0.0",
            f"    above_{i} = [v for v in value_{i} if v > threshold * mean_{i}]",
            f"    result['field_{i}'] = (mean_{i}, len(above_{i}))",
        )
    ]
    + ["    return result", ""]
)
TASK = "Rewrite this function so that `threshold` defaults to 0.75; change nothing else.\n\n```python\n"


def first_layers(model, layers: int):
    """A model of the target's first `layers` decoder layers (same embeddings, norm and head)."""
    config = dataclasses.replace(model.config, num_hidden_layers=layers, layer_types=model.config.layer_types[:layers])
    draft = create_model(config, dtype=model.dtype, seed=1)
    state = jax.tree.map(
        lambda mine, target: target[:layers] if mine.shape != target.shape else target,
        nnx.state(draft),
        nnx.state(model),
    )
    nnx.update(draft, state)
    return draft


def run(model, prompt, new_tokens, spec=None):
    options, seeds = resolve_batch(
        GenerationConfig(), 1, vocab_size=model.config.vocab_size, max_new_tokens=new_tokens, temperature=0
    )
    if spec is None:
        return generate_batch(model, [prompt], options, seeds)
    return speculative.generate_batch(model, [prompt], options, seeds, spec)


def best_of(repeats, fn):
    """The run with the highest decode tokens/s of `repeats` (after a first, compiling run)."""
    fn()
    return max((fn() for _ in range(repeats)), key=lambda r: r.timing.decode_tokens_per_s)


def engine_decode(engine: Engine, prompt, new_tokens: int, rows: int):
    """`rows` copies of `prompt` submitted at once: (decode tokens/s over all rows, token ids of row 0, stats).

    Decode time runs from the last row's first token to the last row's end (prompts are prefilled
    whole, before decoding starts)."""
    handles = [engine.submit(prompt, max_new_tokens=new_tokens, temperature=0) for _ in range(rows)]
    completions = [h.result() for h in handles]
    decode_s = max(c.latency_s for c in completions) - max(c.time_to_first_token_s for c in completions)
    tokens = sum(c.completion_tokens - 1 for c in completions)
    return tokens / decode_s, completions[0].token_ids, engine.stats()


def engine_cases(model, tokenizer, prompt, args, drafts) -> None:
    """Plain vs speculative `Engine` decoding at batch 1 and 8 (see the module docstring)."""
    slots = 8
    common = dict(
        slots=slots,
        max_len=len(prompt) + args.new_tokens + args.k + 2,
        prefill_chunk=0,  # prompts prefilled whole: fewer programs to compile, decoding timed alone
        config=GenerationConfig(),
    )
    spec = SpeculativeOptions(num_speculative_tokens=args.k)
    print(
        "\n| engine setting | rows | speculative steps | acceptance | tokens per step | decode tok/s | vs plain "
        "| same tokens |\n|---|---|---|---|---|---|---|---|",
        flush=True,
    )
    lookup = engine_core.ngram_proposals

    def never_right(tokens, k, ngram_min, ngram_max):
        return [(tokens[-1] + 1 + i) % model.config.vocab_size for i in range(k)]

    def plain_speed(rows):
        with Engine(model, tokenizer, **common) as plain:
            engine_decode(plain, prompt, args.new_tokens, rows)  # compiles
            return max(
                (engine_decode(plain, prompt, args.new_tokens, rows) for _ in range(args.repeats)), key=lambda r: r[0]
            )

    for rows in args.engine_rows:
        base, reference, _ = plain_speed(rows)
        print(f"| plain engine | {rows} | - | - | 1.00 | {base:.2f} | 1.00x | - |", flush=True)
        any_load = dict(speculative_max_rows=slots)
        settings = [(f"ngram K={args.k}, speculating at any load", any_load, lookup, spec)]
        if args.engine_draft_only:
            settings = []
        elif rows > 1:
            settings.append((f"ngram K={args.k}, default back-off (at most 4 rows)", {}, lookup, spec))
        else:
            settings.append(
                ("never-right proposals, no acceptance floor", dict(speculative_min_acceptance=0), never_right, spec)
            )
            settings.append(("never-right proposals, default acceptance floor", {}, never_right, spec))
        for name, draft in drafts.items():
            draft_spec = SpeculativeOptions("draft", num_speculative_tokens=args.k, draft_model=draft)
            settings.append((f"draft = {name}, K={args.k}, speculating at any load", any_load, lookup, draft_spec))
        for label, options, proposer, setting_spec in settings:
            engine_core.ngram_proposals = proposer
            try:
                with Engine(model, tokenizer, speculative=setting_spec, **common, **options) as engine:
                    engine_decode(engine, prompt, args.new_tokens, rows)  # compiles
                    before = engine.stats()
                    speed, tokens, after = max(
                        (engine_decode(engine, prompt, args.new_tokens, rows) for _ in range(args.repeats)),
                        key=lambda r: r[0],
                    )
            finally:
                engine_core.ngram_proposals = lookup
            steps = after.speculative_steps - before.speculative_steps
            proposed = after.speculative_proposed_tokens - before.speculative_proposed_tokens
            accepted = after.speculative_accepted_tokens - before.speculative_accepted_tokens
            row_steps = after.speculative_row_steps - before.speculative_row_steps
            per_step = (row_steps + accepted) / row_steps if row_steps else 1.0
            acceptance = f"{accepted / proposed:.2f}" if proposed else "-"
            same = "yes" if tokens == reference else "NO"
            print(
                f"| {label} | {rows} | {steps} | {acceptance} | {per_step:.2f} | {speed:.2f} | {speed / base:.2f}x "
                f"| {same} |",
                flush=True,
            )
        # Plain again: on a shared machine the load moves during the run.
        again = plain_speed(rows)[0]
        print(f"| plain engine, again | {rows} | - | - | 1.00 | {again:.2f} | {again / base:.2f}x | - |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5B")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("-k", type=int, default=4, help="proposed tokens per step")
    parser.add_argument("--draft-layers", type=int, nargs="*", default=[6], help="draft = the target's first N layers")
    parser.add_argument(
        "--draft-size",
        choices=sorted(SIZES),
        help="also a draft model of this configuration with its own random weights (e.g. 0.5B for a 1.5B target): "
        "its step is measured, and its speedup at each oracle acceptance rate is derived from that step time",
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per setting (best kept)")
    parser.add_argument("--engine", action="store_true", help="run the Engine cases only")
    parser.add_argument("--engine-rows", type=int, nargs="+", default=[1, 8], help="requests at once (--engine)")
    parser.add_argument(
        "--engine-draft-layers",
        type=int,
        nargs="*",
        default=[6],
        help="--engine: draft models of the target's first N layers (besides the same-weights draft)",
    )
    parser.add_argument("--engine-draft-only", action="store_true", help="--engine: the draft cases only")
    args = parser.parse_args()

    device = jax.devices()[0]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} "
        f"on {device.device_kind}; load average {os.getloadavg()[0]:.1f}; {args.size} {args.dtype}, random weights",
        flush=True,
    )
    tokenizer = Tokenizer.from_dir(os.environ["QWEN_JAX_TOKENIZER_DIR"])
    conversation = [{"role": "user", "content": TASK + FUNCTION + "```"}]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(conversation, add_generation_prompt=True))
    config = SIZES[args.size]
    target = create_model(config, dtype=args.dtype, seed=0)
    if args.engine:
        print(f"prompt {len(prompt)} tokens, {args.new_tokens} new tokens, K={args.k}", flush=True)
        engine_drafts = {
            f"first {layers} of {config.num_hidden_layers} layers": unstack_layers(first_layers(target, layers))
            for layers in args.engine_draft_layers
        }
        target = unstack_layers(target)
        engine_cases(target, tokenizer, prompt, args, {"same weights": target, **engine_drafts})
        return
    drafts = {layers: unstack_layers(first_layers(target, layers)) for layers in args.draft_layers}
    target = unstack_layers(target)
    print(f"prompt {len(prompt)} tokens, {args.new_tokens} new tokens, K={args.k}", flush=True)

    plain = best_of(args.repeats, lambda: run(target, prompt, args.new_tokens))
    base = plain.timing.decode_tokens_per_s
    reference = plain.token_ids[0]
    print(f"| plain decoding | - | 1.00 | {base:.2f} | 1.00x | - |", flush=True)

    def report(label, result):
        stats = result.speculation
        same = "yes" if result.token_ids[0] == reference else "NO"
        speed = result.timing.decode_tokens_per_s
        print(
            f"| {label} | {stats.acceptance_rate:.2f} | {stats.tokens_per_step:.2f} | {speed:.2f} | "
            f"{speed / base:.2f}x | {same} |",
            flush=True,
        )

    ngram = SpeculativeOptions(num_speculative_tokens=args.k)
    report(f"ngram K={args.k} (task)", best_of(args.repeats, lambda: run(target, prompt, args.new_tokens, ngram)))

    lookup = speculative.ngram_proposals
    oracle_runs = []
    for correct in range(args.k, -1, -1):

        def oracle(tokens, k, ngram_min, ngram_max, correct=correct):
            done = len(tokens) - len(prompt)
            upcoming = reference[done : done + k]
            wrong = [(t + 1) % config.vocab_size for t in upcoming[correct : correct + 1]]
            return upcoming[:correct] + wrong

        speculative.ngram_proposals = oracle
        try:
            result = best_of(args.repeats, lambda: run(target, prompt, args.new_tokens, ngram))
        finally:
            speculative.ngram_proposals = lookup
        label = f"{args.k} right" if correct == args.k else f"{correct} right, then a wrong one"
        report(f"oracle proposals: {label}", result)
        oracle_runs.append((label, result.speculation))

    same = SpeculativeOptions("draft", num_speculative_tokens=args.k, draft_model=target)
    report(
        f"draft = same weights, K={args.k}", best_of(args.repeats, lambda: run(target, prompt, args.new_tokens, same))
    )
    for layers, draft in drafts.items():
        spec = SpeculativeOptions("draft", num_speculative_tokens=args.k, draft_model=draft)
        result = best_of(args.repeats, lambda spec=spec: run(target, prompt, args.new_tokens, spec))
        report(f"draft = first {layers} of {config.num_hidden_layers} layers, K={args.k}", result)
    if args.draft_size is not None:
        draft = unstack_layers(create_model(SIZES[args.draft_size], dtype=args.dtype, seed=2))
        spec = SpeculativeOptions("draft", num_speculative_tokens=args.k, draft_model=draft)
        result = best_of(args.repeats, lambda: run(target, prompt, args.new_tokens, spec))
        report(f"draft = a {args.draft_size} configuration (random weights), K={args.k}", result)
        # A step's programs have fixed shapes, so its time does not depend on how many proposals are
        # accepted: the measured step time times the oracle runs' tokens per step is that draft's speed
        # at their acceptance rates (random weights cannot make the two models agree for real).
        steps_per_s = result.timing.decode_tokens_per_s / result.speculation.tokens_per_step
        for label, stats in oracle_runs:
            speed = steps_per_s * stats.tokens_per_step
            print(
                f"| draft = a {args.draft_size} configuration, derived for oracle proposals: {label} | "
                f"{stats.acceptance_rate:.2f} | {stats.tokens_per_step:.2f} | {speed:.2f} | {speed / base:.2f}x | - |",
                flush=True,
            )
    # Plain decoding again: on a shared machine the load moves during the run.
    again = best_of(args.repeats, lambda: run(target, prompt, args.new_tokens)).timing.decode_tokens_per_s
    print(f"| plain decoding, again at the end | - | 1.00 | {again:.2f} | {again / base:.2f}x | - |", flush=True)


if __name__ == "__main__":
    main()
