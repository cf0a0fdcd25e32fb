"""`--compile-cache DIR` / `--no-compile-cache`: the persistent compilation cache of a subcommand
(`qwen_jax.compilation` says where it lives and why)."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from typing import Any

import jax

from qwen_jax.compilation import (
    ENV,
    OFF_VALUES,
    default_dir,
    jax_options,
    persistent_cache_options,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--compile-cache DIR / --no-compile-cache."""
    group = parser.add_argument_group("compilation cache")
    choice = group.add_mutually_exclusive_group()
    choice.add_argument(
        "--compile-cache",
        metavar="DIR",
        help=f"JAX persistent compilation cache directory (default: ${ENV}, else "
        f"$JAX_COMPILATION_CACHE_DIR, else {default_dir()})",
    )
    choice.add_argument(
        "--no-compile-cache",
        action="store_true",
        help=f"compile from scratch, without reading or writing the cache (or {ENV}=off)",
    )


def chosen_dir(args: argparse.Namespace) -> str | None:
    """The cache directory for this run (see `qwen_jax.compilation`), None for no cache."""
    if args.no_compile_cache:
        return None
    if args.compile_cache:
        return args.compile_cache
    from_env = os.environ.get(ENV)
    if from_env is not None:
        return None if from_env.strip().lower() in OFF_VALUES else from_env
    return jax.config.jax_compilation_cache_dir or default_dir()


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The JAX options for this run (`qwen_jax.compilation.persistent_cache_options`)."""
    named_by = "--compile-cache" if args.compile_cache else (f"${ENV}" if os.environ.get(ENV) else None)
    return persistent_cache_options(chosen_dir(args), named_by=named_by)


@contextlib.contextmanager
def configured(args: argparse.Namespace) -> Iterator[None]:
    """Run the body with the cache set up as `settings(args)` says; JAX's options are restored afterwards."""
    with jax_options(settings(args)):
        yield
