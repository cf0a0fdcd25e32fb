"""Install what you use: the core install (pyproject's `dependencies`) is enough for `import qwen_jax`
and every `qwen-jax ... --help`; serve, train and GGUF files without their extra fail with one line
naming the pip command and exit status 2.

The core install is simulated in child processes: a `sitecustomize.py` on PYTHONPATH hides every
installed package that the core dependencies do not bring (computed from the installed packages'
metadata), so the child sees what `pip install qwen-jax` alone would give it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

import pytest
from conftest import build_hf_model, save_hf_checkpoint
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from quant_fixtures import write_tiny_gguf
from serving import write_byte_tokenizer

from qwen_jax.errors import MissingExtraError
from qwen_jax.extras import EXTRAS, require, require_extra

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Installer tooling that any environment has; nothing in qwen_jax uses it.
ALWAYS_PRESENT = {"pip", "setuptools", "pkg_resources", "_distutils_hack", "wheel"}


def _closure(requirements: list[str]) -> set[str]:
    """The installed distributions (canonical names) that `requirements` bring, recursively."""
    found: set[str] = set()
    pending = [(Requirement(line), ("",)) for line in requirements]
    while pending:
        requirement, extras = pending.pop()
        if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in extras):
            continue
        name = canonicalize_name(requirement.name)
        key = f"{name}[{','.join(sorted(requirement.extras))}]"
        if key in found:
            continue
        found.add(key)
        try:
            lines = requires(requirement.name) or []
        except PackageNotFoundError:  # a platform's dependency that is not installed here
            continue
        pending += [(Requirement(line), ("", *requirement.extras)) for line in lines]
    return {key.partition("[")[0] for key in found}


CORE = _closure(PYPROJECT["dependencies"])
PROVIDERS = packages_distributions()  # top-level module -> the distributions that install it
HIDDEN = sorted(
    module
    for module, distributions in PROVIDERS.items()
    if module not in ALWAYS_PRESENT
    and module not in sys.stdlib_module_names
    and not any(canonicalize_name(d) in CORE | {"qwen-jax"} for d in distributions)
)

SITECUSTOMIZE = """
import importlib.machinery
import sys

HIDDEN = frozenset({hidden!r})


class CoreInstallFinder(importlib.machinery.PathFinder):
    \"\"\"Finds what the path finder finds, except the packages a core install does not have.\"\"\"

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [CoreInstallFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
"""


@pytest.fixture(scope="module")
def core_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a child process that sees the core install only."""
    directory = tmp_path_factory.mktemp("core_install")
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE.format(hidden=HIDDEN))
    path = [str(directory), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwen_jax.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )


def _assert_missing_extra(result: subprocess.CompletedProcess, command: str, extra: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"qwen-jax {command}: error: ") and f"pip install 'qwen-jax[{extra}]'" in lines[0]


def test_the_simulation_hides_every_extra_the_core_does_not_bring():
    # optax, yaml (flax needs them) and prometheus_client (orbax-checkpoint) come with the core install.
    for extra, modules in EXTRAS.items():
        for module in modules:
            provided = any(canonicalize_name(d) in CORE for d in PROVIDERS.get(module, []))
            assert provided or module in HIDDEN, f"{module} ([{extra}]) is neither core nor hidden"
    assert {"fastapi", "uvicorn", "gguf", "tensorboardX", "matplotlib", "datasets", "pyarrow"} <= set(HIDDEN)
    assert {"torch", "transformers", "pytest"} <= set(HIDDEN)  # test dependencies are no core dependency


def test_pyproject_extras_name_the_packages_of_extras_py():
    declared = PYPROJECT["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        distributions = _closure(declared[extra])
        for module in modules:
            providers = {canonicalize_name(d) for d in PROVIDERS.get(module, [])}
            assert providers & distributions, f"[{extra}] in pyproject.toml installs no provider of {module}"
        for line in declared[extra]:  # and each package of the extra is one qwen_jax imports
            name = canonicalize_name(Requirement(line).name)
            provided = {m for m, ds in PROVIDERS.items() if name in map(canonicalize_name, ds)}
            assert provided & set(modules), f"{line} of [{extra}] provides none of {modules}"
    assert set(Requirement(line).name for line in declared["all"]) == {"qwen-jax"}
    assert Requirement(declared["all"][0]).extras == set(EXTRAS)


def test_import_and_every_help_with_the_core_install(core_env):
    child = textwrap.dedent(
        """
        import contextlib, io, json, sys
        import qwen_jax
        from qwen_jax.cli import main
        from qwen_jax.cli.main import COMMANDS

        results = {}
        for argv in [["--help"]] + [[command, "--help"] for command in COMMANDS]:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    status = main(argv)
                except SystemExit as e:
                    status = e.code
            results[" ".join(argv)] = [status, out.getvalue()]
        try:
            import fastapi
        except ModuleNotFoundError:
            results["fastapi hidden"] = True
        print(json.dumps(results))
        """
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=core_env, timeout=600)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert results.pop("fastapi hidden") is True
    assert len(results) == 8
    for argv, (status, text) in results.items():
        assert status == 0 and text.startswith("usage: qwen-jax"), (argv, status, text)
    assert "--slots" in results["serve --help"][1] and "--lora-rank" in results["train --help"][1]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny")
    save_hf_checkpoint(build_hf_model(vocab_size=259, eos_token_id=None, bos_token_id=None), directory)
    write_byte_tokenizer(directory)
    (directory / "train.jsonl").write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(4)))
    return directory


def test_serve_without_its_extra(core_env, tiny_checkpoint):
    result = _cli(core_env, "serve", "--model", str(tiny_checkpoint), "--port", "0", "--no-compile-cache")
    _assert_missing_extra(result, "serve", "serve")


def test_train_without_its_extra(core_env, tiny_checkpoint, tmp_path):
    result = _cli(
        core_env,
        "train",
        "--model",
        str(tiny_checkpoint),
        "--data",
        str(tiny_checkpoint / "train.jsonl"),
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "1",
        "--seq-len",
        "16",
        "--batch-size",
        "1",
        "--no-progress",
        "--no-compile-cache",
    )
    _assert_missing_extra(result, "train", "train")


def test_gguf_files_without_their_extra(core_env, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(str(path))
    _assert_missing_extra(_cli(core_env, "info", str(path)), "info", "gguf")
    result = _cli(core_env, "generate", "--model", str(path), "--prompt", "hi", "--no-compile-cache")
    _assert_missing_extra(result, "generate", "gguf")


def test_require(monkeypatch):
    assert require("json", extra="serve") is json
    monkeypatch.setitem(sys.modules, "fastapi", None)  # what an environment without fastapi gives
    with pytest.raises(MissingExtraError) as raised:
        require("fastapi", extra="serve", feature="the HTTP server")
    assert str(raised.value) == (
        "the HTTP server needs the optional package 'fastapi', which is not installed: pip install 'qwen-jax[serve]'"
    )
    assert isinstance(raised.value, ImportError)
    with pytest.raises(MissingExtraError, match=r"^serve needs the optional package 'fastapi'"):
        require_extra("serve")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.delitem(sys.modules, "pyarrow.parquet", raising=False)  # imported by an earlier test
    with pytest.raises(MissingExtraError, match=r"'pyarrow'.*qwen-jax\[train\]"):
        require("pyarrow.parquet", extra="train")
    # A module of qwen_jax that does not exist is a bug, not a missing extra.
    with pytest.raises(ModuleNotFoundError) as raised:
        require("qwen_jax.no_such_module", extra="serve")
    assert not isinstance(raised.value, MissingExtraError)
    with pytest.raises(ValueError, match="unknown extra 'gpu'"):
        require("json", extra="gpu")
