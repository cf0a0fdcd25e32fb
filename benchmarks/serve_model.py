"""A step-by-step model of the serving engine's schedule, for reading `benchmarks/serve.py` results.

Replays the all-at-once workload of `benchmarks/serve.py` (same generator and seed) through the
engine's policy (lowest free slot, compaction, a decode step width covering the occupied slots, whole-prompt
prefill when nothing decodes, otherwise mixed steps of all the slots' decode rows + one prompt chunk) with step
costs measured on the machine, and prints the predicted makespan and output tokens/s per
`--prefill-chunk`, with the bound of a perfect packing. Costs are in milliseconds; the defaults are
the 0.5B float32 figures measured on the 2-core CPU (benchmarks/RESULTS.md, "Serving").

    QWEN_JAX_TOKENIZER_DIR=... python benchmarks/serve_model.py --checkpoint /path/with/tokenizer
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Measured (ms): a decode step by width, a whole-prompt prefill by bucket, and what a prompt chunk
# adds to a decode step (mixed step minus decode step) by chunk length.
DECODE = {1: 100, 2: 140, 4: 200, 8: 218}
PREFILL = {16: 190, 32: 230, 64: 290, 128: 500, 256: 800, 511: 1700}
CHUNK_EXTRA = {16: 58, 32: 110, 64: 159, 128: 333, 256: 689}
TEMPLATE_TOKENS = 20  # the chat template around each prompt


def simulate(prompts, outputs, slots: int, chunk: int, costs) -> float:
    decode, prefill, extra = costs
    widths = sorted(decode)

    def width(n):
        return next(w for w in widths if w >= n)

    def bucket(table, n):
        return next(b for b in sorted(table) if b >= n)

    t, waiting, owner = 0.0, list(range(len(prompts))), [None] * slots
    while waiting or any(owner):
        for i in range(slots):
            if owner[i] is None and waiting:
                j = waiting.pop(0)
                owner[i] = [prompts[j] + TEMPLATE_TOKENS, outputs[j]]  # prompt left to prefill, tokens left
        decoding = [r for r in owner if r and r[0] == 0]
        filling = [r for r in owner if r and r[0] > 0]
        if filling and (chunk == 0 or not decoding):
            for r in filling if chunk == 0 else filling[:1]:
                t += prefill[bucket(prefill, r[0])]
                r[0], r[1] = 0, r[1] - 1
            decoding = [r for r in owner if r and r[0] == 0]
            filling = [r for r in owner if r and r[0] > 0]
        used = max((i + 1 for i, r in enumerate(owner) if r), default=0)
        if filling and chunk:
            r = filling[0]
            piece = min(r[0], chunk)
            t += decode[width(slots)] + extra[bucket(extra, piece)]  # a mixed step runs every slot
            r[0] -= piece
            if r[0] == 0:
                r[1] -= 1
        elif decoding:
            t += decode[width(used)]
        for r in decoding:
            r[1] -= 1
        owner = [r for r in owner if r and r[1] > 0]
        owner += [None] * (slots - len(owner))
    return t / 1000


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a directory with the tokenizer the workload is built with")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", default="32,256")
    parser.add_argument("--output-tokens", default="16,64")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--chunks", default="0,16,32,64,128,256", help="--prefill-chunk values to model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--costs", help="JSON {decode: {width: ms}, prefill: {bucket: ms}, chunk_extra: {chunk: ms}}")
    args = parser.parse_args(argv)

    from serve import make_jobs

    from qwen_jax.tokenizer import Tokenizer

    costs = (DECODE, PREFILL, CHUNK_EXTRA)
    if args.costs:
        given = json.loads(args.costs)
        costs = tuple(
            {int(k): float(v) for k, v in given[name].items()} for name in ("decode", "prefill", "chunk_extra")
        )
    jobs = make_jobs(
        Tokenizer.from_dir(args.checkpoint),
        args.requests,
        math.inf,
        tuple(int(x) for x in args.prompt_tokens.split(",")),
        tuple(int(x) for x in args.output_tokens.split(",")),
        args.seed,
    )
    prompts, outputs = [j.prompt_tokens for j in jobs], [j.max_tokens for j in jobs]
    total = sum(outputs)
    print(f"{len(jobs)} requests, {sum(prompts)} prompt tokens, {total} output tokens, {args.slots} slots")
    for chunk in (int(c) for c in args.chunks.split(",")):
        seconds = simulate(prompts, outputs, args.slots, chunk, costs)
        print(f"  --prefill-chunk {chunk:>4}: {seconds:5.1f} s, {total / seconds:5.1f} output tokens/s")
    best_token = min(extra / c for c, extra in costs[2].items()) / 1000
    bound = (
        total / args.slots * costs[0][max(costs[0])] / 1000 + (sum(prompts) + TEMPLATE_TOKENS * len(jobs)) * best_token
    )
    print(
        f"  perfect packing (every step {args.slots} rows, prompt tokens at {best_token * 1000:.1f} ms): "
        f"{bound:5.1f} s, {total / bound:5.1f} output tokens/s"
    )


if __name__ == "__main__":
    main()
