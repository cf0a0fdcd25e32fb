"""`qwen-jax train --method grpo` on a tiny model: learning, outputs, exact resume, QLoRA, bad input."""

import argparse
import json
import os
import signal

import numpy as np
import pytest
from conftest import build_hf_model, save_hf_checkpoint
from train_fixtures import SPECIALS, WORDS, _write_word_tokenizer, compilation_cache  # noqa: F401 (fixture)

from qwen_jax.errors import ConfigError, DataError
from qwen_jax.tokenizer import Tokenizer
from qwen_jax.train import config as config_lib
from qwen_jax.train.config import TrainConfig
from qwen_jax.train.grpo_trainer import GRPOTrainer
from qwen_jax.train.loop import EXIT_PREEMPTED

PROMPTS = [
    {"prompt": "what color is the sky", "answer": "blue"},
    {"prompt": "what color is the sea", "answer": "blue"},
    {"prompt": [{"role": "user", "content": "the dog ran to"}], "answer": "park"},
    {"prompt": "one two three", "answer": "four"},
]
REWARD_MODULE = '''
import os

TOKEN = int(os.environ["GRPO_TEST_TOKEN"])


def chosen_token(prompts, completions, completion_ids, answer, **kwargs):
    """The fraction of a completion's tokens that are the chosen one (answer is checked to arrive)."""
    assert len(answer) == len(completions)
    return [sum(t == TOKEN for t in ids) / max(len(ids), 1) for ids in completion_ids]
'''


@pytest.fixture(scope="module")
def grpo_setup(tmp_path_factory):
    """A tiny checkpoint whose vocabulary is exactly the word tokenizer's, the prompts, and a reward file."""
    directory = tmp_path_factory.mktemp("grpo")
    model_dir = directory / "model"
    vocab = 1 + len(WORDS) + len(SPECIALS)
    hf = build_hf_model(
        seed=0,
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=None,
        bos_token_id=None,
    )
    save_hf_checkpoint(hf, model_dir)
    _write_word_tokenizer(model_dir)
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = (
        "{% for m in messages %}<|im_start|> {{ m['content'] }} <|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>{% endif %}"
    )
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    data = directory / "prompts.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    reward = directory / "rewards.py"
    reward.write_text(REWARD_MODULE)
    token = Tokenizer.from_dir(str(model_dir)).encode("blue")[0]
    os.environ["GRPO_TEST_TOKEN"] = str(token)
    return str(model_dir), str(data), f"{reward}:chosen_token"


def _config(setup, out, **overrides) -> TrainConfig:
    model_dir, data, reward = setup
    settings = dict(
        method="grpo",
        model=model_dir,
        data=data,
        out=str(out),
        reward=[reward],
        seq_len=24,
        max_new_tokens=8,
        batch_size=2,
        num_generations=8,
        steps=16,
        learning_rate=5e-2,
        schedule="constant",
        lora_rank=8,
        lora_alpha=16.0,
        save_every=0,
        mesh="fsdp=1",
        progress=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def _metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_grpo_learns_a_reward_and_writes_the_outputs(grpo_setup, tmp_path):
    out = tmp_path / "run"
    config = _config(grpo_setup, out, eval_data=grpo_setup[1], eval_every=8, lora_rank=0, learning_rate=1e-2)
    trainer = GRPOTrainer(config, log=lambda _: None)
    assert trainer.run() == 0
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 17))
    # Each rollout prefills a prompt once for its 8 completions; the two greedy evals, one completion per prompt.
    engine = trainer.rollouts.engine.stats()
    rolled_out = engine.prompt_tokens - 2 * sum(len(r.prompt_ids) for r in trainer.eval_records)
    assert rolled_out > 0 and rolled_out % 8 == 0 and engine.shared_prefill_tokens == rolled_out * 7 // 8
    rewards = [m["reward"] for m in metrics]
    assert np.mean(rewards[-4:]) > np.mean(rewards[:4]) + 0.3, rewards
    evals = [m["eval_reward"] for m in metrics if "eval_reward" in m]
    assert len(evals) == 2 and evals[-1] > 0.5, evals
    first = metrics[0]
    for key in (
        "loss",
        "grad_norm",
        "reward_std",
        "rewards/chosen_token/mean",
        "completion_length",
        "completion_length/max",
        "clip_ratio",
        "entropy",
        "frac_reward_zero_std",
        "rollout_seconds",
        "update_seconds",
        "rollout_tokens_per_s",
    ):
        assert key in first, key
    assert "eval_rewards/chosen_token" in metrics[7]
    # The engine's log-probabilities of the sampled tokens are the trainer's (float32 on CPU).
    assert max(m["logprob_diff"] for m in metrics) < 1e-4
    for name in ("loss_curve.png", "reward_curve.png", "model/config.json"):
        assert os.path.exists(out / name), name


def test_qlora_grpo_resumes_after_sigterm_exactly(grpo_setup, tmp_path):
    """A QLoRA run (int8 base, adapters unmerged in the rollouts) with a KL term and two updates per
    rollout, stopped by SIGTERM after step 2 and resumed, logs what an uninterrupted run logs. The
    first step on a data x fsdp mesh of 8 devices logs what it logs on one device."""
    settings = dict(steps=4, num_iterations=2, beta=0.05, loss_type="grpo", quantize="int8")
    whole = tmp_path / "whole"
    assert GRPOTrainer(_config(grpo_setup, whole, **settings), log=lambda _: None).run() == 0
    parts = tmp_path / "parts"

    def stop_after(last):
        def stop(trainer, step):
            if step == last:
                os.kill(os.getpid(), signal.SIGTERM)

        return stop

    config = _config(grpo_setup, parts, **settings)
    assert GRPOTrainer(config, log=lambda _: None).run(stop_after(2)) == EXIT_PREEMPTED
    assert GRPOTrainer(config.replace(resume=True), log=lambda _: None).run() == 0
    expected, got = _metrics(whole), _metrics(parts)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for a, b in zip(expected, got):
        assert b["reward"] == a["reward"] and b["completion_length"] == a["completion_length"]
        for key in ("loss", "kl", "entropy", "grad_norm"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=f"step {a['step']} {key}")
    assert expected[-1]["kl"] > 0
    assert max(m["logprob_diff"] for m in got) < 1e-4  # the int8 engine samples the policy the trainer scores
    sharded = tmp_path / "sharded"
    config = _config(grpo_setup, sharded, **settings, mesh="data=2,fsdp=4")
    assert GRPOTrainer(config, log=lambda _: None).run(stop_after(1)) == EXIT_PREEMPTED
    (on_mesh,) = _metrics(sharded)
    assert on_mesh["reward"] == expected[0]["reward"]
    for key in ("loss", "kl", "entropy", "grad_norm"):
        np.testing.assert_allclose(on_mesh[key], expected[0][key], rtol=1e-4, atol=1e-6, err_msg=f"mesh {key}")


def test_bad_grpo_input_is_named(grpo_setup, tmp_path):
    model_dir, data, reward = grpo_setup
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"prompt": "what", "solution": "blue"}) + "\n")
    with pytest.raises(DataError, match="'math_accuracy' needs the column 'answer'.*columns: solution"):
        config = _config(grpo_setup, tmp_path / "a", data=str(no_answer), batch_size=1, reward=["math_accuracy"])
        GRPOTrainer(config, log=lambda _: None)
    long_prompts = tmp_path / "long.jsonl"
    long_prompts.write_text(json.dumps({"prompt": "the cat " * 10, "answer": "x"}) + "\n")
    with pytest.raises(DataError, match="long.jsonl:1: the prompt has 20 tokens; with max_new_tokens 8 at most 16"):
        GRPOTrainer(_config(grpo_setup, tmp_path / "b", data=str(long_prompts)), log=lambda _: None)
    no_prompt = tmp_path / "no_prompt.jsonl"
    no_prompt.write_text(json.dumps({"question": "what"}) + "\n")
    with pytest.raises(DataError, match="no_prompt.jsonl:1: no 'prompt' column"):
        GRPOTrainer(_config(grpo_setup, tmp_path / "c", data=str(no_prompt)), log=lambda _: None)
    with pytest.raises(ConfigError, match="needs at least one --reward"):
        _config(grpo_setup, tmp_path / "d", reward=[])
    with pytest.raises(ConfigError, match="loss_type: 'sigmoid' is not a GRPO loss"):
        _config(grpo_setup, tmp_path / "e", loss_type="sigmoid")


def test_reward_flags_repeat_and_yaml_lists(tmp_path):
    parser = argparse.ArgumentParser()
    config_lib.add_arguments(parser)
    yaml_file = tmp_path / "grpo.yaml"
    yaml_file.write_text("method: grpo\nreward: [math_accuracy, think_format]\nreward_weights: [1, 0.5]\n")
    required = ["--model", "m", "--data", "d", "--out", "o"]
    from_yaml = config_lib.from_args(parser.parse_args(["--config", str(yaml_file), *required]))
    assert from_yaml.reward == ("math_accuracy", "think_format") and from_yaml.reward_weights == (1.0, 0.5)
    args = ["--method", "grpo", "--reward", "a.py:f", "--reward", "b", "c:g", "--reward-weights", "1", "2", "3"]
    from_flags = config_lib.from_args(parser.parse_args([*args, *required]))
    assert from_flags.reward == ("a.py:f", "b", "c:g") and from_flags.reward_weights == (1.0, 2.0, 3.0)
    with pytest.raises(ConfigError, match="reward_weights has 1 value"):
        config_lib.from_args(parser.parse_args([*args[:6], "--reward-weights", "1", *required]))
    assert TrainConfig().reward == () and TrainConfig().method == "sft"


def test_method_settings_default_per_method_and_stay_with_their_method():
    grpo = TrainConfig(method="grpo", reward=["math_accuracy"])
    assert (grpo.beta, grpo.loss_type) == (None, None)
    assert (grpo.setting("beta"), grpo.setting("loss_type")) == (0.0, "dapo")
    dpo = TrainConfig(method="dpo")
    assert (dpo.setting("beta"), dpo.setting("loss_type")) == (0.1, "sigmoid")
    with pytest.raises(ConfigError, match="beta must be >= 0 for grpo"):
        TrainConfig(method="grpo", reward=["math_accuracy"], beta=-0.1)
    for dpo_only, message in (
        (dict(label_smoothing=0.1), "label_smoothing is a setting of method dpo"),
        (dict(precompute_ref_logprobs=True), "precompute_ref_logprobs is a setting of method dpo"),
    ):
        with pytest.raises(ConfigError, match=message):
            TrainConfig(method="grpo", reward=["math_accuracy"], **dpo_only)
