"""One error hierarchy: every class of qwen_jax.errors derives from QwenJaxError as the module's
docstring draws it, keeps the built-in base classes it promises, and reaches the user of
`qwen-jax` as one line `qwen-jax COMMAND: error: MESSAGE` with exit status 2."""

from __future__ import annotations

import inspect
import re

import pytest

from qwen_jax import errors
from qwen_jax.cli import main
from qwen_jax.cli.main import COMMANDS
from qwen_jax.errors import QwenJaxError

CLASSES = [
    value
    for _, value in inspect.getmembers(errors, inspect.isclass)
    if issubclass(value, BaseException) and value.__module__ == errors.__name__
]

# The built-in exception each class also is, so that code written against the built-ins keeps working.
VALUE_ERRORS = {
    "ConfigError",
    "CheckpointError",
    "OutputError",
    "ConversionError",
    "QuantizationError",
    "GenerationError",
    "EngineError",
    "QueueFullError",
    "EngineClosedError",
    "DataError",
    "AttentionBackendError",
    "MeshError",
}
RUNTIME_ERRORS = {"QueueFullError", "EngineClosedError"}  # the engine cannot take the request now
IMPORT_ERRORS = {"MissingExtraError"}

# Arguments each subcommand needs to reach run().
ARGV = {
    "info": ["info", "0.5B"],
    "convert": ["convert", "src", "out"],
    "export-hf": ["export-hf", "src", "out"],
    "generate": ["generate", "--prompt", "hi", "--no-compile-cache"],
    "chat": ["chat", "--no-compile-cache"],
    "train": ["train", "--no-compile-cache"],
    "serve": ["serve", "--no-compile-cache"],
}


def _documented_tree() -> dict[str, str | None]:
    """class -> parent, as the tree in the module docstring draws it."""
    lines = errors.__doc__.splitlines()
    root = next(line for line in lines if line.strip() == "QwenJaxError")
    indent = len(root) - len(root.lstrip())
    parents: dict[str, str | None] = {"QwenJaxError": None}
    ancestors = ["QwenJaxError"]  # ancestors[d]: the open class at depth d
    for line in lines:
        match = re.match(r"(?P<rails>(?:[│ ]   )*)[├└]── (?P<name>\w+)", line[indent:])
        if match:
            depth = len(match.group("rails")) // 4 + 1
            del ancestors[depth:]
            parents[match.group("name")] = ancestors[depth - 1]
            ancestors.append(match.group("name"))
    return parents


def test_every_class_is_in_the_documented_tree_under_its_documented_parent():
    tree = _documented_tree()
    assert tree["QwenJaxError"] is None and tree["ConversionError"] == "OutputError"  # the parser reads the tree
    assert set(tree) == {cls.__name__ for cls in CLASSES}, "the docstring's tree and the classes differ"
    for cls in CLASSES:
        assert issubclass(cls, QwenJaxError)
        if cls is QwenJaxError:
            continue
        [parent] = [base for base in cls.__bases__ if issubclass(base, QwenJaxError)]
        assert parent.__name__ == tree[cls.__name__], f"{cls.__name__} derives from {parent.__name__}"


def test_built_in_compatibility():
    named = {cls.__name__ for cls in CLASSES}
    assert VALUE_ERRORS | RUNTIME_ERRORS | IMPORT_ERRORS <= named
    for cls in CLASSES:
        assert issubclass(cls, ValueError) == (cls.__name__ in VALUE_ERRORS), cls
        assert issubclass(cls, RuntimeError) == (cls.__name__ in RUNTIME_ERRORS), cls
        assert issubclass(cls, ImportError) == (cls.__name__ in IMPORT_ERRORS), cls
    engine_error = errors.EngineError("top_p must be in (0, 1]", param="top_p")
    assert engine_error.param == "top_p" and str(engine_error) == "top_p must be in (0, 1]"


def _fail_with(monkeypatch, command: str, error: BaseException) -> None:
    def run(args):
        raise error

    monkeypatch.setattr(COMMANDS[command][0], "run", run)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_cli_prints_each_error_as_one_line_with_exit_2(cls, monkeypatch, capsys):
    _fail_with(monkeypatch, "info", cls("the checkpoint is bad"))
    assert main(ARGV["info"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "qwen-jax info: error: the checkpoint is bad\n" and captured.out == ""


def test_every_subcommand_maps_errors_to_one_line(monkeypatch, capsys):
    assert set(ARGV) == set(COMMANDS), "a new subcommand: add its arguments to ARGV"
    for command, argv in ARGV.items():
        _fail_with(monkeypatch, command, errors.UsageError("cannot do that\n  here"))
        assert main(argv) == 2, command
        assert capsys.readouterr().err == f"qwen-jax {command}: error: cannot do that here\n"
        _fail_with(monkeypatch, command, FileNotFoundError(2, "No such file or directory", "x.json"))
        assert main(argv) == 2, command
        assert capsys.readouterr().err == f"qwen-jax {command}: error: [Errno 2] No such file or directory: 'x.json'\n"


def test_other_exceptions_are_bugs_and_keep_their_traceback(monkeypatch):
    _fail_with(monkeypatch, "info", KeyError("internal"))
    with pytest.raises(KeyError):
        main(ARGV["info"])
