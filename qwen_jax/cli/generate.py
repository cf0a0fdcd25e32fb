"""Generate text from a prompt, streaming it to stdout (speed summary on stderr), or as one JSON object."""

from __future__ import annotations

import argparse
import json
import sys

from qwen_jax.cli.arguments import (
    add_model_arguments,
    add_sampling_arguments,
    add_speculative_arguments,
    load_for_cli,
    sampling_overrides,
    speculative_for_cli,
)
from qwen_jax.errors import UsageError
from qwen_jax.generation.api import generate, stream


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-file", help="file with the prompt text ('-' for stdin)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user message with the chat template")
    add_sampling_arguments(parser)
    add_speculative_arguments(parser)
    parser.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object {"text", "token_ids", "prompt_tokens", ...} instead of streaming',
    )


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    try:
        if args.prompt_file == "-":
            return sys.stdin.read()
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UsageError(f"--prompt-file {args.prompt_file}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"--prompt-file {args.prompt_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def run(args: argparse.Namespace) -> int:
    prompt = _read_prompt(args)
    if args.chat or args.system is not None:
        messages = [{"role": "system", "content": args.system}] if args.system is not None else []
        prompt = messages + [{"role": "user", "content": prompt}]
    model, tokenizer = load_for_cli(args)
    options = sampling_overrides(args)
    options["speculative"] = speculative_for_cli(args, model)
    if args.json:
        result = generate(model, tokenizer, [prompt], **options)
        timing = result.timing
        report = {
            "text": result.texts[0],
            "token_ids": result.token_ids[0],
            "prompt_tokens": result.prompt_lengths[0],
            "finish_reason": result.finish_reasons[0],
            "prefill_tokens_per_s": timing.prefill_tokens_per_s,
            "decode_tokens_per_s": timing.decode_tokens_per_s,
        }
        if result.speculation is not None:
            stats = result.speculation
            report["speculation"] = {
                "steps": stats.steps,
                "proposed_tokens": stats.proposed_tokens,
                "accepted_tokens": stats.accepted_tokens,
                "acceptance_rate": stats.acceptance_rate,
                "tokens_per_step": stats.tokens_per_step,
            }
        print(json.dumps(report, ensure_ascii=False))
        return 0
    pieces = stream(model, tokenizer, prompt, **options)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(pieces.result.timing.summary(), file=sys.stderr)
    if pieces.result.speculation is not None:
        print(pieces.result.speculation.summary(), file=sys.stderr)
    return 0
