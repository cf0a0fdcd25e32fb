"""Interactive multi-turn chat with streaming answers.

Type a message and press Enter. `/reset` starts a new conversation, `/exit` (or Ctrl-D) quits,
Ctrl-C while an answer is streaming stops that answer only. Each turn reuses the keys and values of
the previous one (`prefix_cache=` of `qwen_jax.stream`), so only the new message is prefilled;
`--stats` shows how many prompt tokens were cached.
"""

from __future__ import annotations

import argparse
import sys

from qwen_jax.cli.arguments import (
    add_model_arguments,
    add_sampling_arguments,
    add_speculative_arguments,
    load_for_cli,
    sampling_overrides,
    speculative_for_cli,
)
from qwen_jax.errors import GenerationError
from qwen_jax.generation.api import stream

HELP = "commands: /reset (new conversation), /exit (quit); Ctrl-C stops the current answer"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    add_speculative_arguments(parser)
    parser.add_argument(
        "--stats", action="store_true", help="print the speed and the cached prompt tokens of each answer to stderr"
    )
    parser.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="prefill the whole conversation every turn instead of reusing the previous turn's keys and values",
    )


def _read_message(interactive: bool) -> str | None:
    """The next user line; None at end of input."""
    if interactive:
        try:
            return input(">>> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return None if not line else line.rstrip("\n")


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load_for_cli(args)
    options = sampling_overrides(args)
    options["speculative"] = speculative_for_cli(args, model)
    options["prefix_cache"] = args.prefix_cache
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print(HELP, file=sys.stderr)
    while True:
        try:
            message = _read_message(interactive)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: forget the line, ask again
            print(file=sys.stderr)
            continue
        if message is None or message.strip() == "/exit":
            return 0
        if message.strip() == "/reset":
            history = []
            print("(conversation reset)", file=sys.stderr)
            continue
        if not message.strip():
            continue
        history.append({"role": "user", "content": message})
        try:
            answer = stream(model, tokenizer, system + history, **options)
        except GenerationError as e:
            history.pop()
            if not history:  # even a fresh conversation cannot be answered: the settings are at fault
                raise
            print(f"error: {e} (use /reset to start over)", file=sys.stderr)
            continue
        try:
            for piece in answer:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            answer.close()
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        # What the user saw (possibly cut short) is what the model is told it said.
        said = answer.result.texts[0] if answer.result is not None else ""
        history.append({"role": "assistant", "content": said})
        if args.stats and answer.result is not None:
            print(answer.result.timing.summary(), file=sys.stderr)
            if answer.result.speculation is not None:
                print(answer.result.speculation.summary(), file=sys.stderr)
