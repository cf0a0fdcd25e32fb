"""`qwen-jax` command line: one entry point, one subcommand per module.

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`. Every
`qwen_jax.errors.QwenJaxError` (and `FileNotFoundError`) a subcommand raises is reported as one
line, `qwen-jax COMMAND: error: MESSAGE`, with exit status 2, and so is an OSError saying a path
cannot be written (read-only file system, permission denied, disk full), with what to do. Every
subcommand that compiles (all but those in `WITHOUT_COMPILATION`) takes `--compile-cache DIR` /
`--no-compile-cache` and runs with JAX's persistent compilation cache (`qwen_jax.cli.compile_cache`),
so a second run skips XLA compilation. The subcommand modules import no optional package at their top, so `--help` works
with the core install; `serve` and `train` load their implementation in `run()`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import sys
from types import ModuleType

from qwen_jax.cli import chat, compile_cache, generate, info
from qwen_jax.convert import cli as convert_cli
from qwen_jax.convert import cli_export as convert_cli_export
from qwen_jax.errors import QwenJaxError
from qwen_jax.serve import cli as serve_cli
from qwen_jax.train import cli as train_cli
from qwen_jax.version import __version__

# name -> (module, one-line help). Order is the order `--help` shows.
COMMANDS: dict[str, tuple[ModuleType, str]] = {
    "info": (info, "print the config and parameter count of a checkpoint"),
    "convert": (convert_cli, "convert an HF checkpoint to an Orbax checkpoint"),
    "export-hf": (convert_cli_export, "export an Orbax checkpoint to HF safetensors"),
    "generate": (generate, "generate text from a prompt"),
    "chat": (chat, "interactive multi-turn chat"),
    "train": (train_cli, "fine-tune (full or LoRA) on JSONL data"),
    "serve": (serve_cli, "serve a model over an OpenAI-compatible HTTP API"),
}

# What to do about an OSError that stops an output from being written, by errno.
_WRITE_FAILURES = {
    errno.ENOSPC: "free some space there, or choose another location",
    errno.EDQUOT: "free some space there (disk quota), or choose another location",
    errno.EROFS: "choose a location on a writable file system",
    errno.EACCES: "check the permissions of this path, or choose another location",
    errno.EPERM: "check the permissions of this path, or choose another location",
}

# Subcommands that run no XLA compilation worth caching; every other one (new ones too) gets the cache.
WITHOUT_COMPILATION = frozenset({"info", "convert", "export-hf"})


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    """The `qwen-jax` parser and the module of each subcommand."""
    parser = argparse.ArgumentParser(
        prog="qwen-jax", description="Qwen2.5 in JAX: convert, generate, chat, train, serve."
    )
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (module, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(sub)
        if name not in WITHOUT_COMPILATION:
            compile_cache.add_arguments(sub)
        modules[name] = module
    return parser, modules


def _version() -> str:
    return f"qwen-jax {__version__}"


def one_line(error: BaseException) -> str:
    """The error's message on one line (a message is one line by design; a line break must not split the report)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def describe_write_failure(error: OSError) -> str:
    """`PATH: REASON (what to do)` for an OSError whose errno is a known write failure."""
    where = error.filename if error.filename is not None else "an output"
    return f"{where}: {error.strerror or error} ({_WRITE_FAILURES[error.errno]})"


def main(argv: list[str] | None = None) -> int:
    """Run `qwen-jax ARGV` (default: the process's arguments); the exit status."""
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
        print(f"qwen-jax {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _WRITE_FAILURES:
            raise
        print(f"qwen-jax {args.command}: error: {describe_write_failure(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and friends
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"qwen-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
