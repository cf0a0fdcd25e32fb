"""`qwen-jax train` without the `train` extra: `--help` works, a run is one line naming the pip command."""

import json
import subprocess
import sys

# The train extra's packages that a core install lacks (optax and pyyaml come with flax, so every
# install has them). A finder that refuses to import them stands in for their absence.
_WITHOUT_TRAIN_EXTRA = """
import contextlib, io, json, sys
from importlib.abc import MetaPathFinder

ABSENT = {"tensorboardX", "matplotlib", "datasets", "pyarrow"}

class Absent(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Absent())
from qwen_jax.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as e:  # --help
            status = e.code
    loaded = sorted(m for m in sys.modules if m.startswith("qwen_jax.train."))
    results.append({"status": status, "out": out.getvalue(), "err": err.getvalue(), "loaded": loaded})
print(json.dumps(results))
"""


def test_help_works_and_a_run_names_the_extra_without_it(tmp_path):
    argvs = [
        ["--help"],
        ["train", "--help"],
        ["train", "--model", str(tmp_path), "--data", "train.jsonl", "--out", str(tmp_path / "out")],
    ]
    child = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TRAIN_EXTRA, json.dumps(argvs)], capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, child.stderr[-3000:]
    top, train_help, run = json.loads(child.stdout.strip().splitlines()[-1])
    assert top["status"] == 0 and "train" in top["out"]
    assert train_help["status"] == 0 and "--lora-rank" in train_help["out"] and "--coordinator" in train_help["out"]
    for result in (top, train_help):  # --help reaches none of the modules that need the extra
        assert not {"qwen_jax.train.loop", "qwen_jax.train.step", "qwen_jax.train.outputs"} & set(result["loaded"])
    assert run["status"] == 2 and run["out"] == ""
    [line] = run["err"].strip().splitlines()
    assert line.startswith("qwen-jax train: error: ") and line.endswith("pip install 'qwen-jax[train]'"), line
    assert "'tensorboardX'" in line
    assert not (tmp_path / "out").exists()  # refused before anything was written
