"""Compiled executables: one bounded in-process cache, and JAX's persistent compilation cache on disk.

In process: `EXECUTABLES`, the one cache of compiled executables that the model's auto-jit path
(`Qwen2ForCausalLM.__call__`), static-batch generation (`qwen_jax.generation.static`) and the
engine (`qwen_jax.engine.programs`) compile through. It is thread-safe and LRU-bounded
(`DEFAULT_MAX_EXECUTABLES`, settable with `EXECUTABLES.max_entries`), compiles a key once even
when threads ask for it at once, and keeps the accounting that `Timing.compile_s`, the engine's
`compile_seconds` and the compile counters (`compile_counts`) report.

On disk: without the persistent cache every `qwen-jax generate` compiles its XLA executables again
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

import collections
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Any, TypeVar

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


# ----------------------------------------------------------------------------- in-process executables
# Enough for an engine's whole program set (prefill buckets, decode and mixed widths, samplers: about
# 70 programs for 8 slots and a 4,096-token context) beside the executables of static-batch
# generation and of the model's forward; each entry holds compiled device code, so the bound keeps
# a long-lived process that sees many shapes from growing without end.
DEFAULT_MAX_EXECUTABLES = 256

_Value = TypeVar("_Value")


class ExecutableCache:
    """A thread-safe, LRU-bounded cache of compiled executables, keyed by anything hashable.

    `get(name, key, build)` returns the entry for `key`, calling `build()` (a compilation) when
    there is none; threads asking for the same key at once wait for one build (a lock per key),
    while different keys compile in parallel (XLA releases the GIL). Past `max_entries` the least
    recently used entries are dropped: whoever still holds one keeps using it, and a later `get`
    of its key compiles again. `name` says what kind of program the key is ("generation.prefill",
    "engine.decode", "model.forward", ...) for the per-name counters.
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_EXECUTABLES):
        self._lock = threading.Lock()  # guards every attribute below
        self._entries: collections.OrderedDict[Hashable, tuple[str, Any]] = collections.OrderedDict()
        self._building: dict[Hashable, threading.Lock] = {}  # key -> the lock its one build holds
        self._compiles: collections.Counter[str] = collections.Counter()
        self._seconds: collections.Counter[str] = collections.Counter()
        self._max_entries = 1
        self.max_entries = max_entries

    @property
    def max_entries(self) -> int:
        """How many executables are kept; setting it lower evicts the least recently used at once."""
        return self._max_entries

    @max_entries.setter
    def max_entries(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"max_entries must be a positive integer, got {value!r}")
        with self._lock:
            self._max_entries = value
            self._evict()

    def get(self, name: str, key: Hashable, build: Callable[[], _Value]) -> tuple[_Value, float]:
        """(the entry for `key`, seconds spent building it in this call: 0.0 when it was cached)."""
        with self._lock:
            found = self._lookup(key)
            if found is not None:
                return found[1], 0.0
            lock = self._building.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                found = self._lookup(key)  # built by another thread while this one waited
            if found is not None:
                return found[1], 0.0
            start = time.perf_counter()
            try:
                value = build()
            except BaseException:
                with self._lock:
                    self._building.pop(key, None)  # a failed build is not cached: the next get tries again
                raise
            seconds = time.perf_counter() - start
            with self._lock:  # entry in and build lock out at once: no thread can start a second build
                self._building.pop(key, None)
                self._entries[key] = (name, value)
                self._compiles[name] += 1
                self._seconds[name] += seconds
                self._evict()
        return value, seconds

    def _lookup(self, key: Hashable) -> tuple[str, Any] | None:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def _evict(self) -> None:
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def compile_counts(self) -> dict[str, int]:
        """How many executables of each name were built since the process started (evictions do not
        lower it): a compilation a caller expected to be cached shows here."""
        with self._lock:
            return dict(self._compiles)

    def compile_seconds(self) -> dict[str, float]:
        """Seconds spent building executables of each name since the process started."""
        with self._lock:
            return dict(self._seconds)

    def executables(self, name: str) -> list[Any]:
        """The cached executables of `name`, least recently used first (for tests and tools)."""
        with self._lock:
            return [value for entry_name, value in self._entries.values() if entry_name == name]

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries


EXECUTABLES = ExecutableCache()


def compile_counts() -> dict[str, int]:
    """`EXECUTABLES.compile_counts()`: executables built per name since the process started."""
    return EXECUTABLES.compile_counts()


def argument_signature(args: Any) -> Hashable:
    """What an ahead-of-time executable is specialised on besides its static settings: the
    arguments' tree structure and each leaf's shape, dtype, weak type and sharding."""
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((leaf.shape, leaf.dtype, leaf.weak_type, leaf.sharding) for leaf in leaves)
