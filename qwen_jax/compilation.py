"""Compiled executables: JAX's persistent compilation cache on disk.

Without the persistent cache every `qwen-jax generate` compiles its XLA executables again
(loading, prefill, sampling, decode) before the first token; with it, the second run of the same
command reads them from disk and compiles nothing (`benchmarks/cli_startup.py` measures both).
The command line applies it around every subcommand that compiles (`qwen_jax.cli.compile_cache`).

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

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import jax

from qwen_jax.errors import UsageError

ENV = "QWEN_JAX_COMPILE_CACHE"
OFF_VALUES = frozenset({"", "0", "off", "false", "no", "none"})
# Past this size the least recently used entries of the default directory are evicted.
MAX_BYTES = 4 * 2**30
# The JAX options `persistent_cache_options` sets; `jax_options` restores them afterwards.
_OPTIONS = (
    "jax_enable_compilation_cache",
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_compilation_cache_max_size",
)


def default_dir() -> str:
    """`$XDG_CACHE_HOME/qwen-jax/jax-compile-cache` (`~/.cache/...` when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qwen-jax", "jax-compile-cache")


def persistent_cache_options(directory: str | None, *, named_by: str | None = None) -> dict[str, Any]:
    """The JAX options that put the persistent cache in `directory` (None: no cache).

    A directory that cannot be created or written is a `UsageError` when the user named it
    (`named_by` says how, e.g. "--compile-cache"), and a warning (the run goes on uncached) when
    it is the default.
    """
    if directory is None:
        return {"jax_enable_compilation_cache": False}
    directory = os.path.abspath(os.path.expanduser(directory))
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(f"{directory} is not writable")
    except OSError as e:
        if named_by:
            raise UsageError(f"compilation cache ({named_by}): {e}") from None
        print(f"qwen-jax: warning: running without the compilation cache ({e})", file=sys.stderr)
        return {"jax_enable_compilation_cache": False}
    options: dict[str, Any] = {"jax_enable_compilation_cache": True, "jax_compilation_cache_dir": directory}
    # JAX skips executables that compile in under a second, but most of a generate run's are
    # such, and together they take seconds: cache them all, unless the user set JAX's threshold.
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        options["jax_persistent_cache_min_compile_time_secs"] = 0.0
    # Our own directory stays bounded (LRU eviction). Not one the user chose: JAX's eviction needs
    # an access-time file per entry, which entries written without a bound lack.
    if directory == os.path.abspath(default_dir()) and "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        options["jax_compilation_cache_max_size"] = MAX_BYTES
    return options


@contextlib.contextmanager
def jax_options(options: dict[str, Any]) -> Iterator[None]:
    """Run the body with these JAX options set and restore the cache options afterwards, so an
    in-process call of the command line leaves them as it found them. (JAX opens the cache
    directory at the first compilation of a process and keeps it.)"""
    saved = {name: getattr(jax.config, name) for name in _OPTIONS}
    try:
        for name, value in options.items():
            jax.config.update(name, value)
        yield
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
