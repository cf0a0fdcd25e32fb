"""`qwen-jax train --method dpo` end to end on a tiny model: LoRA DPO (reference = adapters off) learns
a preference that holds on held-out pairs; full fine-tuning's frozen reference and precomputed
reference log-probabilities give the same run; a resumed run continues exactly; bad settings are
one clear error."""

import functools
import json
import math
import os

import jax
import numpy as np
import pytest
from train_fixtures import (  # noqa: F401 (fixtures)
    _config,
    _host,
    _metrics,
    compilation_cache,
    tiny_model_dir,
)

from qwen_jax.cli import main
from qwen_jax.errors import ConfigError
from qwen_jax.train.config import TrainConfig
from qwen_jax.train.dpo import METRICS
from qwen_jax.train.loop import Trainer

COLORS = ("red", "blue", "green")
THINGS = ("sky", "sea", "ball", "mat", "cat", "dog", "park")


def _pairs(things):
    """The preferred answer always names 'blue', the other 'red' or 'green': a preference that a
    policy can learn from some prompts and show on prompts it never saw."""
    pairs = []
    for i, thing in enumerate(things):
        for j, rejected in enumerate(("red", "green")):
            pairs.append(
                {"prompt": f"what color is the {thing}", "chosen": " blue", "rejected": f" {rejected}"}
                if (i + j) % 2
                else {"chosen": f"the {thing} is blue", "rejected": f"the {thing} is {rejected}"}  # implicit prompt
            )
    return pairs


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pairs")
    files = {}
    for name, things in (("train", THINGS[:5]), ("eval", THINGS[5:])):
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in _pairs(things)))
        files[name] = str(path)
    return files


_LORA = dict(method="dpo", lora_rank=4, beta=0.5, steps=8, batch_size=4, seq_len=16, save_every=4, eval_every=4)


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, pair_files, tmp_path_factory) -> Trainer:
    config = _config(
        tiny_model_dir, pair_files["train"], tmp_path_factory.mktemp("dpo"), eval_data=pair_files["eval"], **_LORA
    )
    trainer = Trainer(config)
    assert trainer.run() == 0
    return trainer


def test_lora_dpo_raises_reward_accuracy_on_held_out_pairs(lora_run):
    records = _metrics(lora_run.config.out)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(name in records[0] for name in (*METRICS, "pairs", "loss", "grad_norm"))
    # Step 1: the adapters start at zero, so the policy is its reference (adapters off): loss log 2.
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6) and records[0]["pairs"] == 4
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8] and all(f"eval_{name}" in evals[0] for name in METRICS)
    assert evals[-1]["eval_rewards/accuracies"] == 1.0 and evals[-1]["eval_rewards/margins"] > 0.1
    assert evals[-1]["eval_loss"] < 0.9 * math.log(2)
    assert records[-1]["rewards/chosen"] > records[-1]["rewards/rejected"]


def test_dpo_resume_continues_exactly(lora_run, tiny_model_dir, pair_files, tmp_path):
    config = _config(tiny_model_dir, pair_files["train"], tmp_path / "run", eval_data=pair_files["eval"], **_LORA)

    def stop_at_4(trainer, step):
        if step == 4:
            raise KeyboardInterrupt  # the step's checkpoint has been started; the run ends here

    with pytest.raises(KeyboardInterrupt):
        Trainer(config).run(on_step_end=stop_at_4)
    resumed = Trainer(config.replace(resume=True))
    assert int(resumed.state["step"]) == 4
    assert resumed.run() == 0
    straight, again = _metrics(lora_run.config.out), _metrics(config.out)
    assert [r["step"] for r in again] == list(range(1, 9))
    for a, b in zip(straight, again):
        for name in ("loss", *METRICS, "eval_loss", "eval_rewards/accuracies"):
            if name in a:
                np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-6, err_msg=name)
    for a, b in zip(_host(lora_run.state), _host(resumed.state)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_full_finetune_frozen_reference_equals_precomputed(tiny_model_dir, pair_files, tmp_path):
    settings = dict(method="dpo", steps=3, batch_size=4, seq_len=16, learning_rate=3e-3, save_every=0)
    runs = {}
    for precompute in (False, True):
        out = tmp_path / str(precompute)
        config = _config(
            tiny_model_dir,
            pair_files["train"],
            out,
            precompute_ref_logprobs=precompute,
            eval_data=pair_files["eval"],
            **settings,
        )
        trainer = Trainer(config)
        assert (trainer.reference is None) == precompute  # the frozen copy only without precomputed values
        assert trainer.run() == 0
        runs[precompute] = _metrics(config.out)
    assert any(name.startswith("ref_logps-") for _, _, files in os.walk(tmp_path / "True") for name in files)
    frozen, precomputed = runs[False], runs[True]
    assert frozen[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(frozen[-1]["loss"] - math.log(2)) > 1e-3  # the reference stayed at the start, the policy moved
    for a, b in zip(frozen, precomputed):
        for name in ("loss", "grad_norm", *METRICS, "eval_loss", *(f"eval_{m}" for m in METRICS)):
            if name in a:
                np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(method="dpo", label_smoothing=0.1), "robust loss only"),
        (dict(method="dpo", loss_type="robust", label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
        (dict(method="dpo", loss_type="kto"), "loss_type: 'kto' is not one of sigmoid, ipo, hinge, robust"),
        (dict(method="dpo", beta=0.0), "beta must be > 0"),
        (dict(beta=0.1), "beta: not a setting of method sft"),
        (dict(precompute_ref_logprobs=True), "not a setting of method sft"),
    ],
)
def test_bad_dpo_settings_are_one_clear_error(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**settings)
    assert (
        TrainConfig(method="dpo").setting("beta") == 0.1 and TrainConfig(method="dpo").setting("loss_type") == "sigmoid"
    )


def test_cli_bad_pair_is_one_line_and_exit_2(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "the sky is", "chosen": " blue"}) + "\n")
    args = ["--method", "dpo", "--model", tiny_model_dir, "--data", str(data), "--out", str(tmp_path / "o")]
    status = main(["train", *args, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "pairs.jsonl:1" in err[0] and "'rejected'" in err[0], err


def test_sharded_accumulated_dpo_steps_match_the_single_device_run(lora_run, tiny_model_dir, pair_files, tmp_path):
    """The pairs sharded over a data x fsdp x tensor mesh, in two accumulated micro-batches: the same
    loss, gradient norm and metrics as the one-device run of the whole batch."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = "data=2,fsdp=2,tensor=2"
    settings = {**_LORA, "eval_every": 0, "mesh": mesh, "grad_accum": 2}
    config = _config(tiny_model_dir, pair_files["train"], tmp_path / "sharded", **settings)
    trainer = Trainer(config)
    straight = _metrics(lora_run.config.out)
    for step in range(4):
        epoch, index = trainer.loader.advance()
        metrics = trainer.train_step(functools.partial(trainer.loader.batch, epoch, index))
        for name in ("loss", "grad_norm", "pairs", *METRICS):
            if name == "rewards/accuracies" and abs(straight[step]["rewards/margins"]) < 1e-4:
                continue  # policy = reference (zero adapters, warmup's lr 0): the rewards are rounding noise
            np.testing.assert_allclose(metrics[name], straight[step][name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert metrics["rewards/margins"] > 1e-3  # the later steps compared real rewards
    trainer.checkpoints.close()
