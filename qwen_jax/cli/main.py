"""`qwen-jax` command line: one entry point, one subcommand per module.

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`. User errors are
reported as one line with exit status 2. Every subcommand that compiles (all but those in
`WITHOUT_COMPILATION`) takes `--compile-cache DIR` / `--no-compile-cache` and runs with JAX's
persistent compilation cache (`qwen_jax.cli.compile_cache`), so a second run skips XLA compilation.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

from qwen_jax.cli import compile_cache
from qwen_jax.errors import QwenJaxError
from qwen_jax.version import __version__

# name -> (module, one-line help). Order is the order `--help` shows.
COMMANDS = {
    "info": ("qwen_jax.cli.info", "print the config and parameter count of a checkpoint"),
    "convert": ("qwen_jax.convert.cli", "convert an HF checkpoint to an Orbax checkpoint"),
    "export-hf": ("qwen_jax.convert.cli_export", "export an Orbax checkpoint to HF safetensors"),
    "generate": ("qwen_jax.cli.generate", "generate text from a prompt"),
    "chat": ("qwen_jax.cli.chat", "interactive multi-turn chat"),
    "train": ("qwen_jax.train.cli", "fine-tune (full or LoRA) on JSONL data"),
    "serve": ("qwen_jax.serve.cli", "serve a model over an OpenAI-compatible HTTP API"),
}

# Subcommands that run no XLA compilation worth caching; every other one (new ones too) gets the cache.
WITHOUT_COMPILATION = frozenset({"info", "convert", "export-hf"})


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(
        prog="qwen-jax", description="Qwen2.5 in JAX: convert, generate, chat, train, serve."
    )
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(sub)
        if name not in WITHOUT_COMPILATION:
            compile_cache.add_arguments(sub)
        modules[name] = module
    return parser, modules


def _version() -> str:
    return f"qwen-jax {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    cache = compile_cache.configured(args) if args.command not in WITHOUT_COMPILATION else contextlib.nullcontext()
    try:
        with cache:
            return int(modules[args.command].run(args) or 0)
    except (QwenJaxError, FileNotFoundError) as e:
        print(f"qwen-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and friends
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"qwen-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
