"""Config parsing, presets and parameter counts."""

import json

import pytest

import qwen_jax
from qwen_jax.checkpoints.assemble import abstract_model
from qwen_jax.config import GenerationConfig, Qwen2Config
from qwen_jax.errors import ConfigError

REFERENCE = "qwen2.5-configs.json"


def test_published_parameter_counts_without_allocating():
    # Totals published on the Qwen2.5 model cards.
    assert abstract_model(Qwen2Config.preset("0.5B")).num_params() == 494_032_768
    assert abstract_model(Qwen2Config.preset("7B")).num_params() == 7_615_616_512


def test_presets_match_reference(reference_dir):
    with open(reference_dir / REFERENCE) as f:
        reference = json.load(f)
    for name in qwen_jax.config.PRESET_NAMES:
        config = Qwen2Config.preset(name).to_hf()
        for key, value in reference[name].items():
            assert config[key] == value, (name, key)
    assert Qwen2Config.qwen2_5_72b().num_hidden_layers == 80


@pytest.fixture
def reference_dir():
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference"
    if not path.is_dir():
        pytest.skip(f"reference facts not found at {path}")
    return path


def test_roundtrip_through_transformers(tmp_path):
    """to_hf() is readable by transformers and survives from_hf() unchanged."""
    from transformers import AutoConfig

    config = Qwen2Config.preset("7B").replace(
        rope_scaling=qwen_jax.RopeScaling("yarn", 4.0, original_max_position_embeddings=32768)
    )
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf()))
    hf = AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == "qwen2" and hf.hidden_size == 3584
    assert hf.rope_parameters["rope_type"] == "yarn"
    assert Qwen2Config.from_hf(tmp_path) == config
    hf.save_pretrained(tmp_path / "v5")  # transformers 5 writes rope_parameters
    assert Qwen2Config.from_hf(tmp_path / "v5") == config


def test_sliding_window_fields():
    base = Qwen2Config.preset("0.5B").to_hf()
    off = Qwen2Config.from_hf({**base, "use_sliding_window": False, "sliding_window": 4096})
    assert off.sliding_window is None and set(off.layer_types) == {"full_attention"}
    on = Qwen2Config.from_hf({**base, "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 20})
    assert on.layer_types[19] == "full_attention" and on.layer_types[20] == "sliding_attention"
    assert on.layer_windows[:20] == (0,) * 20 and on.layer_windows[20] == 64


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "unsupported architecture"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "unsupported rope_scaling type 'longrope'"),
        ({"num_key_value_heads": 3}, "not a multiple"),
        ({"hidden_size": None}, "config.json: hidden_size must be a positive integer; got None"),
        ({"num_hidden_layers": "24"}, "num_hidden_layers must be a positive integer; got '24'"),
        ({"num_key_value_heads": -2}, "num_key_value_heads must be a positive integer; got -2"),
    ],
)
def test_bad_configs(change, message):
    with pytest.raises(ConfigError, match=message):
        Qwen2Config.from_hf({**Qwen2Config.preset("0.5B").to_hf(), **change})


def test_config_without_a_size():
    config = Qwen2Config.preset("0.5B").to_hf()
    del config["intermediate_size"]
    with pytest.raises(ConfigError, match="intermediate_size must be a positive integer; it is missing"):
        Qwen2Config.from_hf(config)


def test_unreadable_config_files(tmp_path):
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ConfigError, match=r"config.json: cannot read config.json \(Expecting"):
        Qwen2Config.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(ConfigError, match="config.json is not a JSON object"):
        Qwen2Config.from_hf(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.7,}')
    with pytest.raises(ConfigError, match="cannot read generation_config.json"):
        GenerationConfig.from_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.7}')
    assert GenerationConfig.from_pretrained(tmp_path).temperature == 0.7


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        Qwen2Config.preset("9B")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
        ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),
        ({"num_attention_heads": -2}, "num_attention_heads must be a positive integer, got -2"),
        ({"hidden_size": 0}, "hidden_size must be a positive integer, got 0"),
        ({"num_hidden_layers": True}, "num_hidden_layers must be a positive integer, got True"),
        ({"num_attention_heads": 5}, "hidden_size 896 is not divisible by num_attention_heads 5"),
        ({"num_key_value_heads": 3}, "num_attention_heads 14 is not a multiple of num_key_value_heads 3"),
    ],
)
def test_impossible_configs_are_refused_when_constructed(change, message):
    """Built directly (GGUF metadata, presets, code), not only from config.json: a ConfigError naming the field."""
    with pytest.raises(ConfigError, match=message):
        Qwen2Config.preset("0.5B").replace(**change)
