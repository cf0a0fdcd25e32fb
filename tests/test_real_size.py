"""Real-size paths: the Qwen2.5-0.5B configuration with random weights, end to end.

Only real shapes reach some code paths: a vocabulary of 151,936 rows splits the embedding and
lm_head into 9 row blocks of <= 2**24 elements each, and 24 layers. The checkpoint here is the
0.5B configuration with an untied lm_head (630,167,424 parameters, like the Instruct checkpoint
the row-block bugs were found with), saved by transformers in bfloat16, with the real tokenizer.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qwen_jax.checkpoints.hf import HFCheckpoint
from qwen_jax.checkpoints.orbax import PARAMS_DIR, read_manifest

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = Path(os.environ.get("QWEN_JAX_TOKENIZER_DIR", REPO.parent / "shared/reference/qwen2.5-tokenizer"))
pytestmark = pytest.mark.skipif(
    not (TOKENIZER / "tokenizer.json").exists(),
    reason="the real Qwen2.5 tokenizer is needed (set QWEN_JAX_TOKENIZER_DIR)",
)
IDS = np.array([[9707, 11, 1879, 0, 151644, 872, 198, 3838, 374, 220]], dtype=np.int64)
CHAT = [
    {
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
]


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory) -> tuple[str, int]:
    """(directory, parameter count) of a random 0.5B-configuration HF checkpoint with the real tokenizer."""
    import torch
    from transformers import Qwen2Config as HFQwen2Config
    from transformers import Qwen2ForCausalLM

    from qwen_jax.config import Qwen2Config

    config = {**Qwen2Config.preset("0.5B").to_hf(), "tie_word_embeddings": False}
    config.pop("architectures", None)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(HFQwen2Config(**config))
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():  # small random weights: the logits stay in a sane range over 24 layers
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) + 0.1 * torch.randn_like(p) if "norm" in name else 0.02 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("qwen2.5-0.5b-untied")
    model.save_pretrained(directory, safe_serialization=True)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER / name, directory / name)
    return str(directory), parameters


def _disk_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def test_convert_reports_the_real_size(real_checkpoint, tmp_path, capsys):
    """Issue 15: the parameter count and bytes of a converted 0.5B checkpoint are the real ones."""
    from qwen_jax.cli import main as cli_main

    src, parameters = real_checkpoint
    assert parameters == 630_167_424
    assert parameters == sum(int(np.prod(HFCheckpoint(src).shape(n))) for n in HFCheckpoint(src).names())
    out = tmp_path / "orbax"
    assert cli_main(["convert", src, str(out)]) == 0  # auto dtype: bfloat16
    printed = capsys.readouterr().out
    assert f"{parameters:,} parameters, bfloat16, {2 * parameters / 1e9:.2f} GB" in printed
    manifest = read_manifest(out)
    assert manifest["parameters"] == parameters and manifest["bytes"] == 2 * parameters
    assert [g for g in manifest["groups"] if ".rows" in g] == [
        f"{prefix}.rows{start}" for prefix in ("model.embed_tokens", "lm_head") for start in range(0, 151936, 18724)
    ]
    on_disk = _disk_bytes(out / PARAMS_DIR)
    # Orbax compresses (zstd): random bf16 weights shrink by about a quarter (low-entropy exponents).
    assert 0.5 * 2 * parameters < on_disk < 2 * parameters + 5e6, on_disk
    assert f"({on_disk / 1e9:.2f} GB on disk)" in printed

    assert cli_main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == info["stored"]["parameters"] == parameters
    assert info["stored"]["row_blocks"] == 18 and info["stored"]["bytes_on_disk"] == on_disk


def test_train_cli_lora_step_and_hf_export_at_real_size(real_checkpoint, tmp_path):
    """Issue 9: `qwen-jax train` (LoRA, one step) on the real configuration writes an OUT/model that
    loads and an --export-hf that transformers loads with the same logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from qwen_jax.load import load_model

    src, parameters = real_checkpoint
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in CHAT))
    out, export = tmp_path / "run", tmp_path / "run_hf"
    command = [
        sys.executable,
        "-m",
        "qwen_jax.cli",
        "train",
        "--model",
        src,
        "--data",
        str(data),
        "--out",
        str(out),
        "--seq-len",
        "64",
        "--batch-size",
        "1",
        "--steps",
        "1",
        "--lora-rank",
        "4",
        "--learning-rate",
        "1e-2",
        "--save-every",
        "0",
        "--no-progress",
        "--export-hf",
        str(export),
    ]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}  # one CPU device, as a user's laptop
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "final model" in done.stderr and "HF export" in done.stderr

    manifest = read_manifest(out / "model")
    assert manifest["parameters"] == parameters and manifest["dtype"] == "float32"
    assert sum(".rows" in g for g in manifest["groups"]) == 18
    ours = np.asarray(load_model(out / "model", dtype="float32")(IDS.astype(np.int32)))
    exported, info = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        theirs = exported.eval()(torch.as_tensor(IDS)).logits.numpy()
    del exported
    assert np.abs(theirs).max() > 0.1  # not a degenerate model
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=0)
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(torch.as_tensor(IDS)).logits.numpy()
    assert np.abs(base_logits - theirs).max() > 1e-4  # the export carries the (merged) adapters


def test_train_cli_dpo_lora_steps_at_real_size(real_checkpoint, tmp_path):
    """Issue 31: `qwen-jax train --method dpo` (LoRA, two steps, conversational pairs) on the real
    configuration: the reference is the base with the adapters off, so step 1's loss is log 2, and
    the TRL-named metrics are written."""
    src, _ = real_checkpoint
    pairs = [
        {
            "prompt": [{"role": "user", "content": "What is the capital of France?"}],
            "chosen": [{"role": "assistant", "content": "Paris."}],
            "rejected": [{"role": "assistant", "content": "Rome, I think."}],
        },
        {
            "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
            "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
        },
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in pairs))
    out = tmp_path / "dpo"
    command = [sys.executable, "-m", "qwen_jax.cli", "train", "--method", "dpo", "--model", src]
    command += ["--tokenizer", str(TOKENIZER), "--data", str(data), "--out", str(out), "--seq-len", "64"]
    command += ["--batch-size", "1", "--steps", "2", "--lora-rank", "4", "--learning-rate", "1e-2"]
    command += ["--save-every", "0", "--no-progress"]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["pairs"] == 1 for r in records)
    assert abs(records[0]["loss"] - np.log(2)) < 1e-4 and abs(records[0]["rewards/margins"]) < 1e-4
    assert all(np.isfinite(r[name]) and r[name] < 0 for r in records for name in ("logps/chosen", "logps/rejected"))


def test_train_cli_grpo_lora_step_at_real_size(real_checkpoint, tmp_path):
    """Issue 31: `qwen-jax train --method grpo` (LoRA, one step, 2 prompts x 2 generations, a few
    tokens) on the real configuration: engine rollouts over the trainer's arrays, built-in rewards
    (math_accuracy with math-verify, think_format), the update and the final model."""
    src, _ = real_checkpoint
    data = tmp_path / "math.jsonl"
    records = [
        {"prompt": "What is 2+2? Answer in \\boxed{}.", "answer": "4"},
        {"prompt": "What is 3*5? Answer in \\boxed{}.", "answer": "15"},
    ]  # short text prompts: one prefill bucket to compile (chat prompts are covered on the tiny model)
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "grpo"
    command = [sys.executable, "-m", "qwen_jax.cli", "train", "--method", "grpo", "--model", src]
    command += ["--data", str(data), "--out", str(out), "--reward", "math_accuracy", "--reward", "think_format"]
    command += ["--reward-weights", "1", "0.5", "--batch-size", "2", "--num-generations", "2"]
    command += ["--max-new-tokens", "4", "--seq-len", "24", "--steps", "1", "--lora-rank", "4"]
    command += ["--save-every", "0", "--no-progress"]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 1 and np.isfinite(record["loss"])
    assert 0.0 <= record["rewards/math_accuracy/mean"] <= 1.0 and "rewards/think_format/mean" in record
    assert record["completion_length/max"] <= 4 and record["logprob_diff"] < 1e-3
    assert (out / "model").is_dir() and (out / "reward_curve.png").exists()
