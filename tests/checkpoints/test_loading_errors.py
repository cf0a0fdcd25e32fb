"""Bad checkpoints fail with one clear line naming the file and the tensor."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from qwen_jax.checkpoints.safetensors import SafetensorsFile, write_safetensors
from qwen_jax.errors import CheckpointError, ConfigError
from qwen_jax.load import load_model


@pytest.fixture
def checkpoint(hf_checkpoint):
    _, path = hf_checkpoint(tie_word_embeddings=False)
    return path


def _tensors(path):
    st = SafetensorsFile(os.path.join(path, "model.safetensors"))
    return {name: np.array(st.get(name)) for name in st.keys()}


def _rewrite(path, tensors):
    write_safetensors(os.path.join(path, "model.safetensors"), tensors)


def test_missing_tensor(checkpoint):
    tensors = _tensors(checkpoint)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    _rewrite(checkpoint, tensors)
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_model(checkpoint)


def test_unexpected_tensor(checkpoint):
    tensors = _tensors(checkpoint)
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros((4,), np.float32)
    _rewrite(checkpoint, tensors)
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.self_attn\.extra"
    ):
        load_model(checkpoint)


def test_wrong_shape(checkpoint):
    tensors = _tensors(checkpoint)
    tensors["model.layers.2.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    _rewrite(checkpoint, tensors)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor 'model\.layers\.2\.self_attn\.k_proj\.weight' "
        r"has shape \[16, 64\], config expects \[32, 64\]",
    ):
        load_model(checkpoint)


def test_truncated_file(checkpoint):
    path = os.path.join(checkpoint, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor '.*' needs \d+ data bytes"):
        load_model(checkpoint)


def test_corrupted_header(checkpoint):
    path = os.path.join(checkpoint, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage{{{")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupted safetensors header"):
        load_model(checkpoint)


def test_not_a_safetensors_file(checkpoint):
    with open(os.path.join(checkpoint, "model.safetensors"), "wb") as f:
        f.write(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupted or truncated safetensors header"):
        load_model(checkpoint)


def test_missing_config(checkpoint):
    os.remove(os.path.join(checkpoint, "config.json"))
    with pytest.raises(ConfigError, match=r"config\.json not found"):
        load_model(checkpoint)


def test_bad_config_json(checkpoint):
    with open(os.path.join(checkpoint, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ConfigError, match=r"cannot read config\.json"):
        load_model(checkpoint)


def test_unsupported_architecture(checkpoint):
    path = os.path.join(checkpoint, "config.json")
    cfg = json.load(open(path))
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
    json.dump(cfg, open(path, "w"))
    with pytest.raises(ConfigError, match="unsupported architecture"):
        load_model(checkpoint)


def test_pickle_checkpoint_refused(checkpoint):
    os.remove(os.path.join(checkpoint, "model.safetensors"))
    with open(os.path.join(checkpoint, "pytorch_model.bin"), "wb") as f:
        f.write(b"this would be a pickle; it must never be opened")
    with pytest.raises(CheckpointError, match=r"pickle checkpoints \(pytorch_model\.bin\).*never unpickles"):
        load_model(checkpoint)


def test_index_names_missing_shard(hf_checkpoint):
    _, path = hf_checkpoint(max_shard_size="60KB")
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    shard = sorted(set(index["weight_map"].values()))[-1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(CheckpointError, match=rf"{shard}, which does not exist"):
        load_model(path)


def test_directory_not_found(tmp_path):
    with pytest.raises(CheckpointError, match="nope: checkpoint directory not found"):
        load_model(tmp_path / "nope")


def test_cli_info_and_errors(checkpoint):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "qwen_jax.cli", *args], capture_output=True, text=True)

    result = cli("--help")
    assert result.returncode == 0 and "info" in result.stdout
    result = cli("info", checkpoint)
    assert result.returncode == 0, result.stderr
    assert "144,192 parameters" in result.stdout and "num_key_value_heads: 2" in result.stdout
    result = cli("info", "0.5B", "--json")
    assert json.loads(result.stdout)["parameters"] == 494_032_768
    os.remove(os.path.join(checkpoint, "config.json"))
    result = cli("info", checkpoint)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "config.json not found" in result.stderr
