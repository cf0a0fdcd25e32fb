"""What a training run writes besides its train checkpoints, all in OUT/:

    metrics.jsonl      one JSON record per step: the step's metrics (loss, grad_norm, lr, target_tokens;
                       DPO: pairs and rewards/..., logps/...), tokens, step_time, tokens_per_s, epoch,
                       mfu (known peak only), eval_loss and the method's eval_ metrics (when evaluated)
    tensorboard/       the same scalars as TensorBoard event files (tensorboardX), under train/
    train_config.yaml  the run's settings: `qwen-jax train --config` reads it back (e.g. with --export-only)
    loss_curve.png     train (and eval) loss against step
    model/             the final model, LoRA merged, as a qwen-jax Orbax checkpoint (`qwen_jax.load_model`)
    and, with `export_hf`, the same model as HF safetensors in that directory.

In a multi-process run only the primary process writes the single-copy files; every process
writes its shards of model/. The final outputs are written after the last train checkpoint: if
writing them fails, the error names that checkpoint and the `--export-only` command that writes
them from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import jax

from qwen_jax.checkpoints.orbax import save_model
from qwen_jax.checkpoints.outdir import atomic_output_dir
from qwen_jax.convert.to_hf import orbax_to_hf
from qwen_jax.errors import CheckpointError, OutputError
from qwen_jax.extras import require
from qwen_jax.model.causal_lm import Qwen2ForCausalLM
from qwen_jax.model.lora import merge_lora
from qwen_jax.train import multihost
from qwen_jax.train.config import TrainConfig

yaml = require("yaml", extra="train", feature="training")
tensorboardX = require("tensorboardX", extra="train", feature="training")
# A standalone Figure, no pyplot: the caller's (e.g. a notebook's) matplotlib backend is left alone.
matplotlib_figure = require("matplotlib.figure", extra="train", feature="training")


# --------------------------------------------------------------------------- metrics
def metrics_path(out: str) -> str:
    """OUT/metrics.jsonl."""
    return os.path.join(out, "metrics.jsonl")


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: str, step: int) -> None:
    """Drop the records of steps after `step` (a resumed run runs them again)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(kept)


class StepLog:
    """Where the loop reports each step: metrics.jsonl and TensorBoard, written by the primary only.

    Entering it writes train_config.yaml and opens both (appending to metrics.jsonl, which a
    resumed run has truncated to its checkpoint); leaving it closes them.
    """

    def __init__(self, config: TrainConfig, *, primary: bool):
        self.config, self.primary = config, primary
        self._stack = contextlib.ExitStack()
        self._metrics = None
        self._tensorboard = None

    def __enter__(self) -> StepLog:
        if self.primary:
            with open(os.path.join(self.config.out, "train_config.yaml"), "w", encoding="utf-8") as f:
                yaml.safe_dump(self.config.to_dict(), f, sort_keys=False)
            self._tensorboard = tensorboardX.SummaryWriter(os.path.join(self.config.out, "tensorboard"))
            self._stack.callback(self._tensorboard.close)
            self._metrics = self._stack.enter_context(open(metrics_path(self.config.out), "a", encoding="utf-8"))
        return self

    def write(self, record: dict[str, Any]) -> None:
        """One step's record (`record["step"]` is the step); every other key is a TensorBoard scalar."""
        if not self.primary:
            return
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        for key, value in record.items():
            if key != "step":
                self._tensorboard.add_scalar(f"train/{key}", value, record["step"])

    def __exit__(self, *exc) -> None:
        self._stack.close()


def plot_loss_curve(metrics_file: str, png_path: str) -> str | None:
    """Train (and eval) loss against step as a PNG; returns its path (None without metrics)."""
    if not os.path.exists(metrics_file):
        return None
    records = read_metrics(metrics_file)
    return _plot_curve(records, records, "loss", "train loss", "eval_loss", "eval loss", png_path)


def plot_reward_curve(metrics_file: str, png_path: str) -> str | None:
    """Mean reward (and eval reward) against step as a PNG for a run that has rewards (GRPO);
    returns its path (None without rewards)."""
    if not os.path.exists(metrics_file):
        return None
    records = read_metrics(metrics_file)
    train = [r for r in records if "reward" in r]
    if not train:
        return None
    return _plot_curve(records, train, "reward", "reward", "eval_reward", "eval reward (greedy)", png_path)


def _plot_curve(
    records: list[dict], train: list[dict], key: str, label: str, eval_key: str, eval_label: str, png_path: str
) -> str:
    """`key` of the `train` records, and `eval_key` of the records that have it, against step."""
    figure = matplotlib_figure.Figure(figsize=(7, 4))
    axes = figure.subplots()
    axes.plot([r["step"] for r in train], [r[key] for r in train], label=label)
    evals = [r for r in records if r.get(eval_key) is not None]
    if evals:
        axes.plot([r["step"] for r in evals], [r[eval_key] for r in evals], "o-", label=eval_label)
    axes.set_xlabel("step")
    axes.set_ylabel(key)
    axes.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    return png_path


# --------------------------------------------------------------------------- final model
def write_final_outputs(
    model: Qwen2ForCausalLM,
    config: TrainConfig,
    *,
    step: int,
    lora: bool,
    primary: bool,
    log: Callable[[str], None],
) -> None:
    """OUT/model (LoRA merged into `model`, a copy the caller gives up), the optional HF export
    and the loss curve. Call on every process, after train checkpoint `step` is complete.

    A failure to write the model raises OutputError naming checkpoint `step` and the command
    that writes these outputs from it (`--export-only`), without training again.
    """
    try:
        _write_model(model, config, step=step, lora=lora, primary=primary, log=log)
    except (CheckpointError, OSError, ValueError) as e:
        out = os.path.abspath(config.out)
        raise OutputError(
            f"writing the final model failed ({_one_line(e)}); the training is safe in {out}/checkpoints/{step}. "
            f"After fixing the cause, write the outputs from it with: qwen-jax train --config "
            f"{out}/train_config.yaml --export-only"
        ) from None
    plot = primary and plot_loss_curve(metrics_path(config.out), os.path.join(config.out, "loss_curve.png"))
    if plot:
        log(f"loss curve: {plot}")
    plot = primary and plot_reward_curve(metrics_path(config.out), os.path.join(config.out, "reward_curve.png"))
    if plot:
        log(f"reward curve: {plot}")


def _write_model(
    model: Qwen2ForCausalLM, config: TrainConfig, *, step: int, lora: bool, primary: bool, log: Callable[[str], None]
) -> None:
    if lora:
        merge_lora(model)
    model_dir = os.path.abspath(os.path.join(config.out, "model"))
    with _model_staging_dir(model_dir, step=step, primary=primary) as staging:
        save_model(
            model,
            staging,
            source="qwen-jax train",
            side_files_from=config.tokenizer or config.model,
            progress=False if not (config.progress and primary) else None,
        )
    log(f"final model: {model_dir}")
    if config.export_hf:
        with multihost.all_or_none("exporting to HF safetensors"):
            if primary:  # reads OUT/model from disk: no collectives, one writer
                orbax_to_hf(model_dir, config.export_hf, force=True, progress=False)
        log(f"HF export: {config.export_hf}")


@contextlib.contextmanager
def _model_staging_dir(model_dir: str, *, step: int, primary: bool) -> Iterator[str]:
    """Where to write OUT/model so that it appears complete or not at all (`atomic_output_dir`).

    In a multi-process run every process writes its own shards into one staging directory whose
    name they all derive alike; the primary then moves it into place."""
    if jax.process_count() == 1:
        with atomic_output_dir(model_dir, force=True) as staging:
            yield staging
        return
    parent, name = os.path.split(model_dir)
    shared = os.path.join(parent, f".{name}.partial-step{step}")
    with multihost.all_or_none("preparing the model directory"):
        if primary:
            shutil.rmtree(shared, ignore_errors=True)
            os.makedirs(shared)
    yield shared  # an error on one process ends every process (see train/cli.py), leaving OUT/model as it was
    with multihost.all_or_none("moving the model into place"):
        if primary:
            with atomic_output_dir(model_dir, force=True) as staging:
                os.rmdir(staging)
                os.replace(shared, staging)


def _one_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
