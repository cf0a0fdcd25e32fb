"""`qwen-jax train` settings: YAML and flags, and the settings refused before anything is written."""

import pytest
from train_fixtures import _config, compilation_cache, tiny_model_dir, train_file  # noqa: F401 (fixtures)

from qwen_jax.cli import main
from qwen_jax.errors import CheckpointError, ConfigError
from qwen_jax.load import load_model
from qwen_jax.train.config import TrainConfig, read_yaml
from qwen_jax.train.loop import Trainer


def test_bad_config(tmp_path, tiny_model_dir, train_file, capsys):
    yaml_path = tmp_path / "train.yaml"
    yaml_path.write_text("learning_rate: 1e-3\nlearnig_rate: 2\n")
    with pytest.raises(ConfigError, match="unknown setting 'learnig_rate'"):
        read_yaml(yaml_path)
    yaml_path.write_text("batch_size: eight\n")
    with pytest.raises(ConfigError, match="batch_size: expected int, got str"):
        read_yaml(yaml_path)
    with pytest.raises(ConfigError, match="not a multiple of grad_accum"):
        TrainConfig(batch_size=3, grad_accum=2)
    with pytest.raises(ConfigError, match="schedule: 'cosin' is not one of"):
        TrainConfig(schedule="cosin")
    yaml_path.write_text(f"model: {tiny_model_dir}\ndata: {train_file}\nlora_rank: 4\nlora_targets: q_proj,qq\n")
    assert main(["train", "--config", str(yaml_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown LoRA targets ['qq']" in err[0]
    assert main(["train", "--config", str(yaml_path)]) == 2
    assert "missing required setting(s): out" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--model",
                tiny_model_dir,
                "--data",
                str(train_file),
                "--out",
                str(tmp_path / "s"),
                "--attention",
                "splash",
            ]
        )
        == 2
    )
    assert "attention='splash' needs a TPU" in capsys.readouterr().err and not (tmp_path / "s").exists()
    # An inference model (unrolled layers) is refused with the way out, not an AttributeError.
    unrolled = load_model(tiny_model_dir, scan_layers=False)
    with pytest.raises(ValueError, match=r"scan_layers=True"):
        Trainer(_config(tiny_model_dir, train_file, tmp_path / "u"), model=unrolled)
    with pytest.raises(CheckpointError, match="model directory not found"):
        Trainer(_config(str(tmp_path / "no_model"), train_file, tmp_path / "m"))
