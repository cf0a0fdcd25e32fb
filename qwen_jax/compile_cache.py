"""JAX's persistent compilation cache for the command line.

Without it every `qwen-jax generate` compiles its ~35 XLA executables again (loading, prefill,
sampling, decode) before the first token. With it, the second run of the same command reads them
from disk and compiles nothing (README: "Start-up of qwen-jax generate"). `qwen_jax.cli` applies `configured(args)` around every subcommand that compiles.

Where the cache lives, first match wins:
  --no-compile-cache (or QWEN_JAX_COMPILE_CACHE=off)  no cache
  --compile-cache DIR
  $QWEN_JAX_COMPILE_CACHE
  $JAX_COMPILATION_CACHE_DIR (JAX's own setting)
  $XDG_CACHE_HOME/qwen-jax/jax-compile-cache, by default ~/.cache/qwen-jax/jax-compile-cache

JAX runs what it finds in the cache directory: keep it private to your user (the default
directory is created with mode 0700), never a directory others can write to.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, Iterator

ENV = "QWEN_JAX_COMPILE_CACHE"
_OFF = frozenset({"", "0", "off", "false", "no", "none"})
# Past this size the least recently used entries of the default directory are evicted.
MAX_BYTES = 4 * 2**30
# The JAX options this module sets; `configured` restores them afterwards.
_OPTIONS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
            "jax_persistent_cache_min_compile_time_secs", "jax_compilation_cache_max_size")


def default_dir() -> str:
    """`$XDG_CACHE_HOME/qwen-jax/jax-compile-cache` (`~/.cache/...` when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qwen-jax", "jax-compile-cache")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--compile-cache DIR / --no-compile-cache."""
    group = parser.add_argument_group("compilation cache")
    choice = group.add_mutually_exclusive_group()
    choice.add_argument("--compile-cache", metavar="DIR",
                        help=f"JAX persistent compilation cache directory (default: ${ENV}, else "
                             f"$JAX_COMPILATION_CACHE_DIR, else {default_dir()})")
    choice.add_argument("--no-compile-cache", action="store_true",
                        help=f"compile from scratch, without reading or writing the cache (or {ENV}=off)")


def chosen_dir(args: argparse.Namespace) -> str | None:
    """The cache directory for this run (see the module docstring), None for no cache."""
    import jax

    if args.no_compile_cache:
        return None
    if args.compile_cache:
        return args.compile_cache
    from_env = os.environ.get(ENV)
    if from_env is not None:
        return None if from_env.strip().lower() in _OFF else from_env
    return jax.config.jax_compilation_cache_dir or default_dir()


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The JAX options for this run. A directory that cannot be created or written is a UserError
    when the user named it, and a warning (the run goes on uncached) when it is the default."""
    from qwen_jax.cli import UserError

    directory = chosen_dir(args)
    if directory is None:
        return {"jax_enable_compilation_cache": False}
    directory = os.path.abspath(os.path.expanduser(directory))
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(f"{directory} is not writable")
    except OSError as e:
        named_by = "--compile-cache" if args.compile_cache else (f"${ENV}" if os.environ.get(ENV) else None)
        if named_by:
            raise UserError(f"compilation cache ({named_by}): {e}") from None
        print(f"qwen-jax: warning: running without the compilation cache ({e})", file=sys.stderr)
        return {"jax_enable_compilation_cache": False}
    options: dict[str, Any] = {"jax_enable_compilation_cache": True, "jax_compilation_cache_dir": directory}
    # JAX skips executables that compile in under a second, but most of a generate run's ~35 are
    # such, and together they take seconds: cache them all, unless the user set JAX's threshold.
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        options["jax_persistent_cache_min_compile_time_secs"] = 0.0
    # Our own directory stays bounded (LRU eviction). Not one the user chose: JAX's eviction needs
    # an access-time file per entry, which entries written without a bound lack.
    if directory == os.path.abspath(default_dir()) and "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        options["jax_compilation_cache_max_size"] = MAX_BYTES
    return options


@contextlib.contextmanager
def configured(args: argparse.Namespace) -> Iterator[None]:
    """Run the body with the cache set up as `settings(args)` says, and restore JAX's options
    afterwards, so an in-process call of `qwen_jax.cli.main` leaves them as it found them. (JAX
    opens the cache directory at the first compilation of a process and keeps it.)"""
    import jax

    saved = {name: getattr(jax.config, name) for name in _OPTIONS}
    try:
        for name, value in settings(args).items():
            jax.config.update(name, value)
        yield
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
