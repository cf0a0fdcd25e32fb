"""The CLI's persistent compilation cache: where it lives, how it is switched off, and that a second
`qwen-jax generate` compiles nothing (counted with JAX's monitoring events, not timed)."""

import argparse
import json
import os
import subprocess
import sys

import jax
import pytest
from conftest import build_hf_model, save_hf_checkpoint

from qwen_jax.cli import main
from qwen_jax.cli.compile_cache import chosen_dir, configured, settings
from qwen_jax.compilation import _OPTIONS, ENV, MAX_BYTES, default_dir
from qwen_jax.errors import UsageError

# Runs the real CLI entry point in a fresh process and prints, as its last stderr line, how many
# executables it asked XLA for ("backend compile" events, which span the persistent-cache lookup),
# how many came from the cache, and how many it wrote there.
COUNTING_CLI = """
import json, sys
import jax.monitoring
counts = {"requests": 0, "hits": 0, "writes": 0}
def on_duration(event, duration, **kwargs):
    counts["requests"] += event == "/jax/core/compile/backend_compile_duration"
def on_event(event, **kwargs):
    counts["hits"] += event == "/jax/compilation_cache/cache_hits"
    counts["writes"] += event == "/jax/compilation_cache/cache_misses"  # recorded when an entry is written
jax.monitoring.register_event_duration_secs_listener(on_duration)
jax.monitoring.register_event_listener(on_event)
from qwen_jax.cli import main
status = main(sys.argv[1:])
sys.stdout.flush()
print("COUNTS " + json.dumps(counts), file=sys.stderr)
sys.exit(status)
"""

WORDS = ["hello", "world", "the", "cat", "sat", "on", "a", "mat"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """Tiny random HF checkpoint with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    directory = tmp_path_factory.mktemp("cache_model")
    save_hf_checkpoint(build_hf_model(seed=0, eos_token_id=None), directory)
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *WORDS])}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({}))
    return str(directory)


def _run_cli(*argv: str, env: dict) -> tuple[str, dict]:
    child = subprocess.run(
        [sys.executable, "-c", COUNTING_CLI, *argv], capture_output=True, text=True, timeout=300, env=env
    )
    assert child.returncode == 0, child.stderr[-3000:]
    counts_line = [line for line in child.stderr.splitlines() if line.startswith("COUNTS ")][-1]
    return child.stdout, json.loads(counts_line.split(" ", 1)[1])


def _entries(directory) -> set[str]:
    return {name for name in os.listdir(directory) if name.endswith("-cache")} if os.path.isdir(directory) else set()


def test_second_generate_run_compiles_nothing(model_dir, tmp_path):
    cache = tmp_path / "jax-cache"
    argv = ["generate", "--model", model_dir, "--prompt", "the cat sat", "--greedy", "--max-new-tokens", "6"]
    unset = (
        ENV,
        "JAX_COMPILATION_CACHE_DIR",
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
        "JAX_COMPILATION_CACHE_MAX_SIZE",
    )  # the test suite's "off", and any JAX settings
    env = {k: v for k, v in os.environ.items() if k not in unset}

    first_text, first = _run_cli(*argv, "--compile-cache", str(cache), env=env)
    assert first["requests"] > 0 and first["hits"] == 0
    assert first["writes"] == first["requests"]  # every executable is cached, however quick to compile
    assert len(_entries(cache)) == first["writes"]

    # The same directory named by the environment variable: every executable comes from the cache.
    env[ENV] = str(cache)
    second_text, second = _run_cli(*argv, env=env)
    assert second_text == first_text
    assert second["requests"] == first["requests"]
    assert second["hits"] == second["requests"] and second["writes"] == 0  # no XLA compilation at all

    # --no-compile-cache (over the variable) neither reads nor writes the cache.
    off_text, off = _run_cli(*argv, "--no-compile-cache", env=env)
    assert off_text == first_text and off["requests"] == first["requests"] and off["hits"] == off["writes"] == 0
    assert len(_entries(cache)) == first["writes"]


def _args(**overrides) -> argparse.Namespace:
    return argparse.Namespace(**{"compile_cache": None, "no_compile_cache": False, **overrides})


def test_cache_directory_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    saved = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert chosen_dir(_args()) == str(tmp_path / "xdg" / "qwen-jax" / "jax-compile-cache")
        jax.config.update("jax_compilation_cache_dir", "/from/jax/env")  # what $JAX_COMPILATION_CACHE_DIR sets
        assert chosen_dir(_args()) == "/from/jax/env"
        monkeypatch.setenv(ENV, "/from/qwen/env")
        assert chosen_dir(_args()) == "/from/qwen/env"
        assert chosen_dir(_args(compile_cache="/from/flag")) == "/from/flag"
        assert chosen_dir(_args(no_compile_cache=True)) is None
        for off in ("off", "0", "", "false"):
            monkeypatch.setenv(ENV, off)
            assert chosen_dir(_args()) is None
            assert settings(_args()) == {"jax_enable_compilation_cache": False}
    finally:
        jax.config.update("jax_compilation_cache_dir", saved)


def test_settings_bound_only_the_default_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    default = settings(_args())
    assert default["jax_compilation_cache_dir"] == default_dir()
    assert default["jax_compilation_cache_max_size"] == MAX_BYTES
    assert default["jax_persistent_cache_min_compile_time_secs"] == 0.0
    assert os.stat(default_dir()).st_mode & 0o777 == 0o700
    chosen = settings(_args(compile_cache=str(tmp_path / "mine")))
    assert chosen["jax_compilation_cache_dir"] == str(tmp_path / "mine")
    assert "jax_compilation_cache_max_size" not in chosen
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")  # the user's JAX setting stays
    assert "jax_persistent_cache_min_compile_time_secs" not in settings(_args())


def test_unusable_directory(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UsageError, match="compilation cache"):  # named by the user: an error
        settings(_args(compile_cache=str(blocker / "cache")))
    monkeypatch.setenv(ENV, str(blocker / "cache"))
    with pytest.raises(UsageError, match=r"\$QWEN_JAX_COMPILE_CACHE"):
        settings(_args())
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the default: a warning, and no cache
    assert settings(_args()) == {"jax_enable_compilation_cache": False}
    assert "running without the compilation cache" in capsys.readouterr().err
    # Through the CLI: exit status 2 and one line, before anything is loaded.
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x", "--compile-cache", str(blocker / "c")]) == 2
    assert "error: compilation cache (--compile-cache):" in capsys.readouterr().err


def test_configured_restores_jax_options(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    before = {name: getattr(jax.config, name) for name in _OPTIONS}
    with configured(_args(compile_cache=str(tmp_path / "c"))):
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
        assert jax.config.jax_enable_compilation_cache is True
    assert {name: getattr(jax.config, name) for name in _OPTIONS} == before


def test_only_compiling_subcommands_take_cache_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "0.5B", "--no-compile-cache"])
    assert exit_info.value.code == 2
    for command in ("generate", "chat", "train"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--no-compile-cache" in capsys.readouterr().out
