"""What users get wrong ends as one line `qwen-jax COMMAND: error: MESSAGE` and exit status 2, never a
traceback: bad files and flags of info, convert, export-hf, generate and chat (serve's are in
tests/serve/test_serve.py, train's in tests/train)."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
from serving import byte_checkpoint

from qwen_jax.cli import main


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[str, str]:
    """A tiny checkpoint with a chat template, and a copy of it without one."""
    with_template = byte_checkpoint(tmp_path_factory.mktemp("chat"))
    without = tmp_path_factory.mktemp("base") / "ckpt"
    shutil.copytree(with_template, without)
    config = json.loads((without / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (without / "tokenizer_config.json").write_text(json.dumps(config))
    return with_template, str(without)


def _fails(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"qwen-jax {argv[0]}: error: "), lines
    assert message in lines[0], lines[0]


def test_generate(checkpoints, tmp_path, capsys):
    model, base = checkpoints
    run = ["generate", "--model", model, "--no-compile-cache", "--max-new-tokens", "2"]
    _fails(capsys, run + ["--prompt-file", str(tmp_path)], f"--prompt-file {tmp_path}: Is a directory")
    _fails(capsys, run + ["--prompt-file", str(tmp_path / "nope")], "nope: No such file or directory")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    _fails(capsys, run + ["--prompt-file", str(latin1)], "latin1.txt: not UTF-8 text")
    _fails(capsys, run + ["--prompt", "hi", "--mesh", "tensor=3"], "do not divide the 8 available devices")
    _fails(capsys, run + ["--prompt", "hi", "--mesh", "pipeline=2"], "bad mesh spec 'pipeline=2'")
    _fails(capsys, run + ["--prompt", "hi", "--attention", "cudnn"], "attention='cudnn' needs an NVIDIA GPU")
    _fails(capsys, run + ["--prompt", "hi", "--quantize", "int3"], "unknown quantization 'int3'")
    _fails(capsys, run + ["--prompt", "hi", "--rope-scaling", "wide"], "bad rope scaling 'wide'")
    _fails(capsys, run + ["--prompt", "hi", "--model", str(tmp_path / "nope")], "checkpoint directory not found")
    _fails(capsys, run + ["--prompt", "hi", "--model", base, "--chat"], "the tokenizer has no chat template")
    _fails(capsys, run + ["--prompt", ""], "is empty")


def test_generate_bad_sampling_settings(checkpoints, capsys):
    run = ["generate", "--model", checkpoints[0], "--no-compile-cache", "--prompt", "hi", "--max-new-tokens", "2"]
    _fails(capsys, run + ["--temperature", "-1"], "temperature")
    _fails(capsys, run + ["--top-p", "2"], "top_p")
    _fails(capsys, run + ["--top-k", "-3"], "top_k")
    _fails(capsys, run + ["--prefill-chunk", "0"], "prefill_chunk")


def test_chat(checkpoints, monkeypatch, capsys):
    model, base = checkpoints
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    _fails(capsys, ["chat", "--model", base, "--no-compile-cache"], "the tokenizer has no chat template")
    # The first message cannot be answered with these settings: nothing to go on with.
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    _fails(capsys, ["chat", "--model", model, "--no-compile-cache", "--max-new-tokens", "500"], "overflows the context")


def test_info_convert_export(checkpoints, tmp_path, capsys):
    model, _ = checkpoints
    _fails(capsys, ["info", str(tmp_path / "nope")], "not a checkpoint directory, GGUF file or preset")
    _fails(capsys, ["info", str(tmp_path)], "config.json not found")
    _fails(capsys, ["info", "0.5B", "--context", "100", "--mesh", "bogus"], "bad mesh spec 'bogus'")
    _fails(capsys, ["info", "0.5B", "--context", "0"], "--context and --batch must be >= 1")
    _fails(capsys, ["convert", str(tmp_path / "nope"), str(tmp_path / "out")], "checkpoint directory not found")
    _fails(capsys, ["convert", model, str(tmp_path)], "already exists (pass --force to replace it)")
    _fails(capsys, ["convert", model, str(tmp_path / "out"), "--quantize", "int3"], "unknown quantization 'int3'")
    _fails(capsys, ["export-hf", model, str(tmp_path / "hf")], "not a qwen-jax Orbax checkpoint")
    assert not Path(tmp_path / "out").exists() and not Path(tmp_path / "hf").exists()
