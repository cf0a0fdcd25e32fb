"""`qwen-jax train` runs that cannot write or whose data is bad: one line, exit status 2, nothing
already saved lost, no partial token cache left behind."""

import errno
import os

import orbax.checkpoint as ocp
from train_fixtures import compilation_cache, tiny_model_dir, train_file  # noqa: F401 (fixtures)

from qwen_jax.cli import main


def _argv(model: str, data: str, out, *more: str) -> list[str]:
    return [
        "train",
        "--model",
        model,
        "--data",
        data,
        "--out",
        str(out),
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--mesh",
        "fsdp=1",
        "--no-progress",
        *more,
    ]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "ERROR:absl" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("qwen-jax train: error: "), err[-3000:]
    return last


def test_read_only_output(tiny_model_dir, train_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "readonly" / "run"
    makedirs = os.makedirs

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(out.parent)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", read_only)
    assert main(_argv(tiny_model_dir, train_file, out, "--steps", "1")) == 2
    line = _error_line(capsys)
    assert f"{out}: Read-only file system (choose a location on a writable file system)" in line


def test_disk_full_while_checkpointing_keeps_the_last_checkpoint(
    tiny_model_dir, train_file, tmp_path, monkeypatch, capsys
):
    """The write of checkpoint 4 fails as tensorstore reports a full disk; checkpoint 2 stays, and
    --resume goes on from it once there is room."""
    out = tmp_path / "run"
    argv = _argv(tiny_model_dir, train_file, out, "--steps", "4", "--save-every", "2")
    save = ocp.CheckpointManager.save

    def disk_full_at_4(self, step, *args, **kwargs):
        if step == 4:
            raise ValueError(
                'RESOURCE_EXHAUSTED: Error writing "opt_state" in OCDBT database: Failed to write 297422 bytes '
                "to file 6: No space left on device [os_error_code='28']"
            )
        return save(self, step, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(ocp.CheckpointManager, "save", disk_full_at_4)
        assert main(argv) == 2
    line = _error_line(capsys)
    assert "(No space left on device)" in line and f"{out}/checkpoints/2" in line and "--resume" in line
    assert sorted(n for n in os.listdir(out / "checkpoints") if n.isdigit()) == ["2"]
    assert main([*argv, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().err and (out / "model").is_dir()


def test_bad_record_leaves_no_partial_cache(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    out = tmp_path / "run"
    for lines, message in (
        ('{"text": "the cat"}\n{"text": "the \\ud800 dog"}\n', f"{data}:2: text is not valid Unicode"),
        ('{"text": "the cat"}\n{"text": "the', f"{data}:2: invalid JSON"),
        (
            '{"messages": [{"role": "user", "content": "hi \\udfff"}, {"role": "assistant", "content": "a"}]}\n',
            f"{data}:1: messages[0].content is not valid Unicode",
        ),
    ):
        data.write_text(lines)
        assert main(_argv(tiny_model_dir, str(data), out, "--steps", "1")) == 2
        assert message in _error_line(capsys)
        cache = out / "data_cache"
        assert not cache.exists() or not os.listdir(cache), list(cache.rglob("*"))
