"""Every notebook in notebooks/ runs headless, top to bottom, against a tiny local checkpoint.

Parameters are injected papermill-style: each notebook has one code cell tagged `parameters`
(its Colab defaults); the test inserts a cell right after it that reassigns the CI values
listed in `CI_PARAMETERS`. A cell error fails the test with the notebook, the cell source and
the traceback. Committed notebooks carry no outputs, which is checked too.

The tiny checkpoint is a random transformers Qwen2 model with the real Qwen2.5 vocabulary size,
so the real Qwen2.5 tokenizer (from QWEN_JAX_TOKENIZER_DIR, or ../shared/reference/qwen2.5-tokenizer
next to the repository) and its chat template work with it.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import build_hf_model, save_hf_checkpoint

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
CELL_TIMEOUT_S = 300
KERNEL_DEVICES = 8

# The Qwen2.5 special ids the Instruct checkpoints use, on a model small enough for CI:
# hidden 32 and 2 layers, but all 151,936 vocabulary rows so every tokenizer id is valid.
TINY_QWEN = dict(
    vocab_size=151936,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    bos_token_id=151643,
    eos_token_id=151645,
)
# The sampling defaults the Instruct checkpoints ship (shared/reference/generation_config.instruct.json).
GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
}

# CI values of each notebook's parameters; "{model}" and "{workdir}" are filled in by the test.
# A notebook without an entry here fails the test: decide how CI runs it when adding it.
CI_PARAMETERS = {
    "quickstart": {"MODEL": "{model}", "NUM_DEVICES": 2, "MAX_NEW_TOKENS": 8, "STREAM_TOKENS": 8},
    "sharding": {"MODEL": "{model}"},
    "finetune": {
        "MODEL": "{model}",
        "WORKDIR": "{workdir}",
        "NUM_DEVICES": 4,
        "STEPS": 4,
        "SEQ_LEN": 96,
        "BATCH_SIZE": 4,
        "LORA_RANK": 4,
        "LEARNING_RATE": 1e-2,
        "MAX_NEW_TOKENS": 8,
    },
    "grpo": {
        "MODEL": "{model}",
        "DATASET": "synthetic",
        "WORKDIR": "{workdir}",
        "NUM_DEVICES": 2,
        "TRAIN_PROMPTS": 4,
        "EVAL_PROMPTS": 2,
        "STEPS": 2,
        "BATCH_SIZE": 2,
        "NUM_GENERATIONS": 2,
        "MAX_NEW_TOKENS": 16,
        "SEQ_LEN": 80,
        "GRAD_ACCUM": 1,
        "LORA_RANK": 4,
        "LEARNING_RATE": 1e-2,
        "EVAL_EVERY": 1,
        "SHOW_EXAMPLES": 2,
    },
}


def tokenizer_dir() -> Path | None:
    """The real Qwen2.5 tokenizer files: QWEN_JAX_TOKENIZER_DIR, else the shared reference copy."""
    candidates = [os.environ.get("QWEN_JAX_TOKENIZER_DIR"), REPO.parent / "shared" / "reference" / "qwen2.5-tokenizer"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "tokenizer.json").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A random tiny Qwen2 HF checkpoint with the real Qwen2.5 tokenizer and generation config."""
    source = tokenizer_dir()
    if source is None:
        pytest.skip(
            "the Qwen2.5 tokenizer files are needed: set QWEN_JAX_TOKENIZER_DIR to a directory "
            "with tokenizer.json and tokenizer_config.json"
        )
    directory = tmp_path_factory.mktemp("tiny-qwen2.5")
    save_hf_checkpoint(build_hf_model(seed=0, **TINY_QWEN), directory)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, directory / name)
    (directory / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return str(directory)


def parameters_cell_index(notebook) -> int:
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    if len(tagged) != 1:
        raise AssertionError(f"expected exactly one cell tagged 'parameters', found {len(tagged)}")
    return tagged[0]


def assigned_names(source: str) -> set[str]:
    return {
        target.id
        for node in ast.parse(source).body
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name)
    }


def inject_parameters(notebook, values: dict) -> None:
    """Insert, after the `parameters` cell, a cell assigning `values` (papermill's injection)."""
    index = parameters_cell_index(notebook)
    unknown = set(values) - assigned_names(notebook.cells[index].source)
    if unknown:
        raise AssertionError(f"CI sets {sorted(unknown)}, which the parameters cell does not define")
    source = "# Parameters injected by tests/test_notebooks.py\n" + "".join(
        f"{name} = {value!r}\n" for name, value in values.items()
    )
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(index + 1, cell)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_clean(path):
    """No outputs or execution counts in git; a markdown introduction and one parameters cell."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    dirty = [
        i
        for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; strip them before committing"
    assert notebook.cells[0].cell_type == "markdown", f"{path.name}: the first cell must be the markdown introduction"
    assert notebook.cells[parameters_cell_index(notebook)].cell_type == "code"


def test_every_notebook_has_ci_parameters():
    assert NOTEBOOKS, "no notebooks found in notebooks/"
    missing = sorted({p.stem for p in NOTEBOOKS} - set(CI_PARAMETERS))
    assert not missing, f"add CI parameter values for {missing} to CI_PARAMETERS"


@pytest.fixture
def kernel_name(tmp_path, monkeypatch) -> str:
    """A kernel spec that runs this interpreter, so the notebooks import the qwen_jax under test
    (a `python3` kernel spec in the user's Jupyter directories could point at another Python)."""
    name = "qwen-jax-test"
    spec_dir = tmp_path / "jupyter" / "kernels" / name
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "qwen-jax test",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))  # searched before the user's directories
    return name


def run_notebook(notebook, workdir: Path, kernel_name: str) -> None:
    """Execute every cell in `workdir`; AssertionError with the failing cell's source and traceback."""
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={KERNEL_DEVICES}",
        "JAX_PLATFORMS": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }
    client = nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name=kernel_name, resources={"metadata": {"path": str(workdir)}}
    )
    try:
        client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as error:
        # nbclient's message holds the failing cell's source and its traceback.
        raise AssertionError(str(error)) from None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tiny_checkpoint, kernel_name, tmp_path):
    if path.stem not in CI_PARAMETERS:
        pytest.fail(f"{path.name}: no entry in CI_PARAMETERS")
    notebook = nbformat.read(path, as_version=4)
    fill = {"{model}": tiny_checkpoint, "{workdir}": str(tmp_path / "work")}
    values = {
        name: fill.get(value, value) if isinstance(value, str) else value
        for name, value in CI_PARAMETERS[path.stem].items()
    }
    inject_parameters(notebook, values)
    try:
        run_notebook(notebook, tmp_path, kernel_name)
    except AssertionError as error:
        pytest.fail(f"{path.name} failed:\n{error}", pytrace=False)


def test_injected_parameters_override_and_cell_errors_fail(kernel_name, tmp_path):
    """The harness itself: injected values replace the defaults, and a failing cell fails the run
    with its source and error in the message."""
    notebook = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell("# harness check"),
            nbformat.v4.new_code_cell("STEPS = 100", metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell("assert STEPS == 100, f'STEPS is {STEPS}'"),
        ]
    )
    with pytest.raises(AssertionError, match="unknown_name"):
        inject_parameters(notebook, {"unknown_name": 1})
    inject_parameters(notebook, {"STEPS": 3})
    with pytest.raises(AssertionError) as failure:
        run_notebook(notebook, tmp_path, kernel_name)
    message = str(failure.value)
    assert "assert STEPS == 100" in message and "STEPS is 3" in message, message
