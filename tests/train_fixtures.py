"""Shared by the training tests (and the QLoRA tests): a word-level tokenizer, a tiny model, training data."""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import build_hf_model, save_hf_checkpoint

from qwen_jax.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


QWEN_TOKENIZER = Path(os.environ.get("QWEN_JAX_TOKENIZER_DIR", REPO.parent / "shared/reference/qwen2.5-tokenizer"))


WORDS = (
    "the cat sat on mat dog ran to park a red blue green ball is what color sky sea answer question "
    "one two three four five six seven eight nine ten"
).split()


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


TINY_MODEL = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


TRAIN_LINES = [
    {"text": "the cat sat on the mat"},
    {"prompt": "what color is the sky", "completion": "blue"},
    {"prompt": "what color is the sea", "completion": "blue green"},
    {"text": "one two three four five six seven eight nine ten"},
    {"prompt": "the dog ran to", "completion": "the park"},
    {"text": "a red ball a blue ball a green ball"},
]


# --------------------------------------------------------------------------- fixtures
def _write_word_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(["<unk>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    """Tiny random HF checkpoint + word-level tokenizer (vocab fits in 64 rows)."""
    directory = tmp_path_factory.mktemp("tiny_model")
    save_hf_checkpoint(build_hf_model(seed=0, **TINY_MODEL), directory)
    _write_word_tokenizer(directory)
    return str(directory)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in TRAIN_LINES))
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache for this module: runs with the same settings (in this process or in
    the child processes, which get the returned environment) compile each program once. Every
    program is cached, however quick to compile: a GRPO run's many small engine and rollout
    programs add up when a test starts several trainers."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    directory = str(tmp_path_factory.mktemp("jax_cache"))
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update(names[0], directory)
    jax.config.update(names[1], 0.0)
    cc.reset_cache()
    yield {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": directory,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "QWEN_JAX_COMPILE_CACHE": directory,
    }  # the same cache for `qwen-jax train` in a child
    for name, value in saved.items():
        jax.config.update(name, value)
    cc.reset_cache()


def _config(model_dir, data, out, **overrides) -> TrainConfig:
    settings = dict(
        model=model_dir,
        data=data,
        out=str(out),
        seq_len=32,
        batch_size=2,
        steps=6,
        learning_rate=1e-2,
        warmup_steps=1,
        save_every=3,
        mesh="fsdp=1",
        progress=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def _metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]
