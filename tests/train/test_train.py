"""`qwen-jax train`: data/loss masks, packing, LoRA, exact resume, signals, sharding, HF export.

Training runs use a tiny model with a tiny word-level tokenizer built here (fast to compile);
the chat loss-mask test uses the real Qwen2.5 tokenizer.
"""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build_hf_model, save_hf_checkpoint
from train_fixtures import (  # noqa: F401 (fixtures)
    QWEN_TOKENIZER,
    SPECIALS,
    TINY_MODEL,
    TRAIN_LINES,
    WORDS,
    _config,
    _host,
    _metrics,
    _write_word_tokenizer,
    compilation_cache,
    tiny_model_dir,
    train_file,
)

from qwen_jax import Qwen2Config, create_model
from qwen_jax.checkpoints import params as checkpoint_params
from qwen_jax.errors import ConfigError
from qwen_jax.train import data as data_lib
from qwen_jax.train import trainer as trainer_module
from qwen_jax.train.config import TrainConfig, read_yaml
from qwen_jax.train.trainer import EXIT_PREEMPTED, Trainer, forward_losses


# --------------------------------------------------------------------------- data
@pytest.mark.skipif(not (QWEN_TOKENIZER / "tokenizer.json").exists(), reason="Qwen2.5 tokenizer files not found")
def test_chat_loss_mask_token_by_token():
    """Only assistant content and its <|im_end|> are learned, checked against pieces encoded apart."""
    from qwen_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(QWEN_TOKENIZER)
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4, of course."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    example = data_lib.Tokenization(tokenizer).example({"messages": messages})
    # The same conversation assembled from separately encoded pieces with the mask we expect.
    pieces = [
        (
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
            "<|im_start|>assistant\n",
            False,
        ),
        ("4, of course.<|im_end|>", True),
        ("\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n", False),
        ("6<|im_end|>", True),
        ("\n", False),
    ]
    tokens, mask = [], []
    for text, learned in pieces:
        ids = tokenizer.encode(text)
        tokens += ids
        mask += [learned] * len(ids)
    assert example.tokens.tolist() == tokens
    assert example.loss_mask.tolist() == mask
    assert (
        tokenizer.decode(example.tokens[example.loss_mask], skip_special_tokens=False)
        == "4, of course.<|im_end|>6<|im_end|>"
    )


def test_prompt_completion_and_text_masks(tiny_model_dir):
    from qwen_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    tokenization = data_lib.Tokenization(tokenizer)
    eos = tokenizer.eos_token_id
    example = tokenization.example({"prompt": "what color is the sky", "completion": "blue"})
    assert example.tokens.tolist() == tokenizer.encode("what color is the sky") + tokenizer.encode("blue") + [eos]
    assert example.loss_mask.tolist() == [False] * 5 + [True, True]
    example = tokenization.example({"text": "the cat sat"})
    assert example.tokens.tolist() == tokenizer.encode("the cat sat") + [eos]
    assert example.loss_mask.all()


def test_bad_data_lines(tiny_model_dir, tmp_path):
    from qwen_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "the cat"}\n{"text": \n{"prompt": "the"}\n\n[1, 2]\n{"text": "a dog"}\n')
    with pytest.raises(data_lib.DataError, match=rf"^{re.escape(str(path))}:2: invalid JSON"):
        data_lib.read_jsonl(path, tokenizer)
    stats = data_lib.DatasetStats()
    examples = data_lib.read_jsonl(path, tokenizer, skip_bad_lines=True, stats=stats)
    assert (len(examples), stats.skipped_lines) == (2, 3)
    path.write_text('{"text": "the"}\n{"prompt": "the", "completion": 3}\n')
    with pytest.raises(
        data_lib.DataError, match=rf"^{re.escape(str(path))}:2: 'prompt' and 'completion' must both be strings"
    ):
        data_lib.read_jsonl(path, tokenizer)
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(data_lib.DataError, match=rf"^{re.escape(str(path))}:1: no assistant message"):
        data_lib.read_jsonl(path, tokenizer)


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
    from qwen_jax.cli import main

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
    from qwen_jax.load import load_model

    unrolled = load_model(tiny_model_dir, scan_layers=False)
    with pytest.raises(ValueError, match=r"scan_layers=True"):
        Trainer(_config(tiny_model_dir, train_file, tmp_path / "u"), model=unrolled)


def test_packed_batch_matches_unpacked_examples():
    from flax import nnx

    config = Qwen2Config(**{**TINY_MODEL, "vocab_size": 48})
    model = create_model(config, dtype=jnp.float32, seed=1)
    losses_of = nnx.jit(lambda model, batch: forward_losses(model, batch))
    rng = np.random.default_rng(0)
    examples = []
    for length in (5, 9, 7, 3):
        mask = rng.random(length) < 0.7
        mask[-1] = True
        examples.append(data_lib.Example(rng.integers(0, 48, length).astype(np.int32), mask))
    packed = data_lib.pack(examples, seq_len=16)
    assert packed.rows == 2 and packed.segment_ids[:, -1].tolist() == [0, 0]  # 5+9 in one row, 7+3 in the next
    assert packed.positions[0, :14].tolist() == [*range(5), *range(9)]
    # Unpacked: every example alone at the start of its own (padded) row.
    alone = data_lib.concat([data_lib.pack([example], seq_len=16) for example in examples])

    def run(batch):
        return np.asarray(losses_of(model, {k: jnp.asarray(v) for k, v in dataclasses.asdict(batch).items()}))

    # Same shape [4, 16] for both, so the forward compiles once.
    packed_losses, alone_losses = run(data_lib.concat([packed, data_lib.empty_rows(2, 16)])), run(alone)
    for index, example in enumerate(examples):
        row, segment = divmod(index, 2)
        in_segment = packed.segment_ids[row] == segment + 1
        n = len(example.tokens)
        np.testing.assert_allclose(
            packed_losses[row][in_segment] * packed.weights[row][in_segment],
            alone_losses[index][:n] * alone.weights[index][:n],
            rtol=1e-5,
            atol=1e-5,
        )
    # Without segment ids the second example would attend to the first: the check can fail.
    crossed = data_lib.concat([packed, data_lib.empty_rows(2, 16)])
    crossed = dataclasses.replace(crossed, segment_ids=np.ones_like(crossed.segment_ids))
    assert not np.allclose(run(crossed)[0][5:14], packed_losses[0][5:14], atol=1e-3)


def test_loader_order_is_seeded_and_resumable(tiny_model_dir, train_file):
    from qwen_jax.tokenizer import Tokenizer

    examples = data_lib.read_jsonl(train_file, Tokenizer.from_dir(tiny_model_dir))
    loader = data_lib.DataLoader(examples, seq_len=32, batch_rows=1, seed=3)
    straight = [next(loader).input_ids for _ in range(8)]
    again = data_lib.DataLoader(examples, seq_len=32, batch_rows=1, seed=3)
    [next(again) for _ in range(3)]
    position = again.position
    resumed = data_lib.DataLoader(examples, seq_len=32, batch_rows=1, seed=3)
    resumed.restore(position)
    assert all(np.array_equal(a, next(resumed).input_ids) for a in straight[3:])
    other = data_lib.DataLoader(examples, seq_len=32, batch_rows=1, seed=4)
    assert not all(np.array_equal(a, next(other).input_ids) for a in straight)


# --------------------------------------------------------------------------- training
# Full fine-tuning with gradient accumulation (micro-batches of 4 rows, which shard over fsdp=4);
# the runs below share its compiled train step through the persistent cache.
# adam_eps 1e-3: Adam divides by sqrt(v) + eps, so with the default 1e-8 a gradient element near zero
# turns a float32 rounding difference (sharded sums add in another order) into a step of up to the
# learning rate; 1e-3 keeps the update a smooth function of the gradient, so the sharded run can be
# held to the single-device one tightly.
_STRAIGHT = dict(steps=6, save_every=3, batch_size=8, grad_accum=2, adam_eps=1e-3)


@pytest.fixture(scope="module")
def straight_run(tiny_model_dir, train_file, tmp_path_factory) -> Trainer:
    trainer = Trainer(_config(tiny_model_dir, train_file, tmp_path_factory.mktemp("straight"), **_STRAIGHT))
    assert trainer.run() == 0
    return trainer


def test_full_finetune_loss_falls(straight_run):
    out = straight_run.config.out
    losses = [m["loss"] for m in _metrics(out)]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["3", "6"]
    events = [f for f in os.listdir(os.path.join(out, "tensorboard")) if f.startswith("events.out.tfevents")]
    assert events and os.path.getsize(os.path.join(out, "tensorboard", events[0])) > 0
    with open(os.path.join(out, "loss_curve.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # The final model directory loads through the public loader and carries the trained weights.
    from qwen_jax.load import load_model

    reloaded = load_model(os.path.join(out, "model"), dtype=jnp.float32)
    ids = jnp.asarray([[3, 4, 5, 6, 7]])
    np.testing.assert_allclose(np.asarray(reloaded(ids)), np.asarray(straight_run.current_model()(ids)), atol=1e-5)


_KILL_CHILD = """
import json, os, signal, sys
from qwen_jax.train.config import TrainConfig
from qwen_jax.train.trainer import Trainer

def kill_after(trainer, step):
    if step == int(sys.argv[2]):
        trainer.checkpoints.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)

Trainer(TrainConfig(**json.loads(sys.argv[1]))).run(on_step_end=kill_after)
"""


def test_exact_resume_after_sigkill(straight_run, tiny_model_dir, train_file, tmp_path, compilation_cache):
    killed = _config(tiny_model_dir, train_file, tmp_path / "killed", **_STRAIGHT)
    child = subprocess.run(
        [sys.executable, "-c", _KILL_CHILD, json.dumps(killed.to_dict()), "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env=compilation_cache,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert [m["step"] for m in _metrics(killed.out)] == [1, 2, 3]
    resumed = Trainer(killed.replace(resume=True))
    assert int(resumed.state["step"]) == 3 and resumed.loader.position != {"epoch": 0, "index": 0}
    assert resumed.run() == 0
    straight_losses = [m["loss"] for m in _metrics(straight_run.config.out)]
    resumed_losses = [m["loss"] for m in _metrics(killed.out)]
    np.testing.assert_allclose(resumed_losses, straight_losses, rtol=0, atol=1e-6)
    for a, b in zip(_host(straight_run.state), _host(resumed.state)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="pass --resume"):
        Trainer(killed)  # a finished run is never silently overwritten


# The real CLI in a child process; the signal is sent from inside the loop after step 2 (as a
# preemption notice would arrive), so the test does not depend on timing.
_TERM_CHILD = """
import os, signal, sys
from qwen_jax.train import trainer

run = trainer.Trainer.run
def send_sigterm(self, step):
    if step == 2:
        os.kill(os.getpid(), signal.SIGTERM)
trainer.Trainer.run = lambda self, on_step_end=None: run(self, on_step_end=send_sigterm)
from qwen_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_saves_checkpoint_and_exits_143(tiny_model_dir, train_file, tmp_path, compilation_cache):
    out = tmp_path / "term"
    yaml_path = tmp_path / "train.yaml"
    settings = _config(tiny_model_dir, train_file, out, **_STRAIGHT).to_dict()
    yaml_path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items() if v is not None))
    child = subprocess.run(
        [sys.executable, "-c", _TERM_CHILD, "train", "--config", str(yaml_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=compilation_cache,
    )
    assert child.returncode == EXIT_PREEMPTED == 143, child.stderr[-2000:]
    assert [m["step"] for m in _metrics(out)] == [1, 2]
    assert sorted(os.listdir(out / "checkpoints")) == ["2"]
    assert "signal SIGTERM: checkpoint saved at step 2" in child.stderr
    assert not (out / "model").exists()  # an interrupted run writes no final model


def test_lora_trains_adapters_only_and_merged_export_matches_hf(tiny_model_dir, train_file, tmp_path):
    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from qwen_jax.model.lora import LoRAParam

    out, export = tmp_path / "lora", tmp_path / "lora_hf"
    trainer = Trainer(
        _config(
            tiny_model_dir,
            train_file,
            out,
            steps=8,
            save_every=0,
            learning_rate=5e-2,
            lora_rank=4,
            lora_alpha=16.0,
            lora_dropout=0.1,
            export_hf=str(export),
        )
    )
    base_before = _host(trainer.frozen)
    assert trainer.run() == 0
    losses = [m["loss"] for m in _metrics(out)]
    assert losses[-1] < 0.93 * losses[0], losses  # adapters start as a no-op and learn slowly
    assert {type(v) for _, v in nnx.to_flat_state(trainer.state["params"])} == {LoRAParam}
    for before, after in zip(base_before, _host(trainer.frozen)):
        np.testing.assert_array_equal(before, after)  # base weights untouched

    ids = np.asarray([[3, 4, 5, 6, 7, 8, 9, 10]])
    ours = np.asarray(trainer.current_model()(ids))

    def hf_logits(directory):
        hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        with torch.no_grad():
            return hf(torch.as_tensor(ids)).logits.numpy()

    assert np.abs(ours - hf_logits(tiny_model_dir)).max() > 1e-2  # the adapters changed the model
    np.testing.assert_allclose(hf_logits(export), ours, atol=1e-4)


def test_sharded_steps_match_single_device(straight_run, tiny_model_dir, train_file, tmp_path):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    sharded = Trainer(_config(tiny_model_dir, train_file, tmp_path / "sharded", mesh="fsdp=4,tensor=2", **_STRAIGHT))
    kernel = sharded.state["params"]["model"]["layers"]["mlp"]["up_proj"]["kernel"].get_value()
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    assert sharded.run() == 0
    single_metrics, sharded_metrics = _metrics(straight_run.config.out), _metrics(sharded.config.out)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in sharded_metrics], [m[key] for m in single_metrics], rtol=1e-6)
    # Measured 1.2e-7 at most after 6 steps (with adam_eps 1e-8 it was 5.5e-5: see _STRAIGHT).
    for a, b in zip(_host(straight_run.state["params"]), _host(sharded.state["params"])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- row blocks (issue 9)
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

    from qwen_jax.checkpoints.orbax import read_manifest
    from qwen_jax.convert.to_orbax import hf_to_orbax
    from qwen_jax.load import load_model

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
    from qwen_jax.checkpoints.orbax import is_orbax_checkpoint
    from qwen_jax.cli import main as cli_main
    from qwen_jax.errors import OutputError

    out = tmp_path / "run"
    config = _config(
        tiny_model_dir, train_file, out, steps=2, save_every=0, lora_rank=4, export_hf=str(tmp_path / "hf")
    )

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "save_model", disk_full)
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
    from qwen_jax.load import load_model

    np.testing.assert_allclose(
        np.asarray(load_model(out / "model", dtype=jnp.float32)(ids)),
        np.asarray(resumed.current_model()(ids)),
        atol=1e-5,
    )
    resumed.checkpoints.close()
    with pytest.raises(ConfigError, match="no train checkpoint to export"):
        Trainer(config.replace(out=str(tmp_path / "empty"), export_only=True))
