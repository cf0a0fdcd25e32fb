"""What a run writes (`qwen_jax.train.outputs`): metrics.jsonl and TensorBoard, the loss curve,
OUT/model through convert / train / export-hf with row-blocked tensors, and a failed final export
that loses nothing and is redone with --export-only.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build_hf_model, save_hf_checkpoint
from train_fixtures import (  # noqa: F401 (fixtures)
    TINY_MODEL,
    _config,
    _metrics,
    _write_word_tokenizer,
    compilation_cache,
    tiny_model_dir,
    train_file,
)

from qwen_jax.checkpoints import params as checkpoint_params
from qwen_jax.checkpoints.orbax import is_orbax_checkpoint, read_manifest
from qwen_jax.cli import main as cli_main
from qwen_jax.convert.to_orbax import hf_to_orbax
from qwen_jax.errors import ConfigError, OutputError
from qwen_jax.load import load_model
from qwen_jax.train import outputs
from qwen_jax.train.config import TrainConfig
from qwen_jax.train.loop import Trainer


# --------------------------------------------------------------------------- metrics, TensorBoard, plot
def test_step_log_writes_metrics_and_events_on_the_primary_only(tmp_path):
    config = TrainConfig(model="m", data="d", out=str(tmp_path / "run"))
    os.makedirs(config.out)
    records = [{"step": 1, "loss": 2.5, "lr": 1e-3}, {"step": 2, "loss": 2.0, "lr": 1e-3, "eval_loss": 2.2}]
    with outputs.StepLog(config, primary=True) as log:
        for record in records:
            log.write(record)
    assert outputs.read_metrics(outputs.metrics_path(config.out)) == records
    with open(os.path.join(config.out, "train_config.yaml"), encoding="utf-8") as f:
        assert f.read().startswith("model: m\ndata: d\n")
    events = os.listdir(os.path.join(config.out, "tensorboard"))
    assert len(events) == 1 and events[0].startswith("events.out.tfevents")
    png = outputs.plot_loss_curve(outputs.metrics_path(config.out), str(tmp_path / "curve.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert outputs.plot_loss_curve(str(tmp_path / "none.jsonl"), str(tmp_path / "none.png")) is None

    other = config.replace(out=str(tmp_path / "other"))
    os.makedirs(other.out)
    with outputs.StepLog(other, primary=False) as log:
        log.write(records[0])
    assert os.listdir(other.out) == []  # a secondary process writes none of the single-copy files


def test_truncate_metrics_keeps_the_steps_of_the_checkpoint(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    lines = [json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in range(1, 6)]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
    outputs.truncate_metrics(path, 3)
    with open(path, encoding="utf-8") as f:
        assert f.readlines() == lines[:3]  # the kept lines byte for byte
    outputs.truncate_metrics(str(tmp_path / "missing.jsonl"), 3)  # nothing to truncate: no error
    assert not os.path.exists(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------- the final model (issue 9: row blocks)
@pytest.mark.parametrize("lora_rank", [0, 4], ids=["full", "lora"])
def test_row_blocked_model_through_convert_train_and_export(lora_rank, tmp_path, train_file, monkeypatch):
    """The path real checkpoints take: embedding and untied lm_head past the row-block size.

    A test-only block of 1000 elements (15 rows of 64) splits both [64, 64] matrices into 5 row
    blocks in every writer (convert, the trainer's OUT/model) and reader (load, export-hf), as
    2**24 does for every Qwen2.5 size. HF -> convert -> train from the Orbax directory ->
    OUT/model -> export-hf -> transformers loads it, and its logits equal the trained model's.
    """
    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(checkpoint_params, "ROW_BLOCK_ELEMENTS", 1000)
    hf_model = build_hf_model(seed=4, **{**TINY_MODEL, "tie_word_embeddings": False})
    src = save_hf_checkpoint(hf_model, tmp_path / "hf")
    _write_word_tokenizer(tmp_path / "hf")
    summary = hf_to_orbax(src, tmp_path / "orbax", progress=False)
    hf_params = sum(p.numel() for p in hf_model.parameters())
    assert summary.parameters == hf_params and summary.bytes_written == 4 * hf_params

    out, export = tmp_path / "run", tmp_path / "run_hf"
    trainer = Trainer(
        _config(
            str(tmp_path / "orbax"),
            train_file,
            out,
            steps=2,
            save_every=0,
            learning_rate=5e-2,
            lora_rank=lora_rank,
            export_hf=str(export),
        )
    )
    assert trainer.run() == 0
    manifest = read_manifest(out / "model")
    blocks = [name for name in manifest["groups"] if ".rows" in name]
    assert blocks == [
        f"{prefix}.rows{start}" for prefix in ("model.embed_tokens", "lm_head") for start in range(0, 64, 15)
    ]
    assert manifest["parameters"] == hf_params and manifest["row_block_elements"] == 1000

    ids = np.asarray([[3, 4, 5, 6, 7, 8, 9, 10]])
    trained = np.asarray(trainer.current_model()(ids))
    monkeypatch.setattr(checkpoint_params, "ROW_BLOCK_ELEMENTS", 2**24)  # readers follow the manifest, not the constant
    np.testing.assert_allclose(np.asarray(load_model(out / "model", dtype=jnp.float32)(ids)), trained, atol=1e-5)
    exported, info = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        hf_logits = exported.eval()(torch.as_tensor(ids)).logits.numpy()
        base_logits = hf_model(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(hf_logits, trained, atol=1e-4)
    assert np.abs(hf_logits - base_logits).max() > 1e-2  # the export carries the training, not the base model


def test_failed_export_keeps_training_and_export_only_redoes_it(tiny_model_dir, train_file, tmp_path, monkeypatch):
    """A failure while writing the outputs loses nothing: the error names the checkpoint and the
    command that writes the outputs from it, and that command does so without training again."""
    out = tmp_path / "run"
    config = _config(
        tiny_model_dir, train_file, out, steps=2, save_every=0, lora_rank=4, export_hf=str(tmp_path / "hf")
    )

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(outputs, "save_model", disk_full)
        with pytest.raises(OutputError) as failure:
            Trainer(config).run()
    message = str(failure.value)
    assert "No space left on device" in message and f"{out}/checkpoints/2" in message
    command = message.split("with: ")[-1]
    assert command == f"qwen-jax train --config {out}/train_config.yaml --export-only"
    assert sorted(os.listdir(out / "checkpoints")) == ["2"] and not (out / "model").exists()
    assert [m["step"] for m in _metrics(out)] == [1, 2]

    assert cli_main(command.split()[1:] + ["--no-progress"]) == 0
    assert [m["step"] for m in _metrics(out)] == [1, 2]  # no step was run again
    assert is_orbax_checkpoint(out / "model") and (tmp_path / "hf" / "model.safetensors").exists()
    resumed = Trainer(config.replace(resume=True))
    ids = jnp.asarray([[3, 4, 5, 6, 7]])
    np.testing.assert_allclose(
        np.asarray(load_model(out / "model", dtype=jnp.float32)(ids)),
        np.asarray(resumed.current_model()(ids)),
        atol=1e-5,
    )
    resumed.checkpoints.close()
    with pytest.raises(ConfigError, match="no train checkpoint to export"):
        Trainer(config.replace(out=str(tmp_path / "empty"), export_only=True))
