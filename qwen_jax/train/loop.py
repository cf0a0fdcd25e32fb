"""The training loop: setup, the run, train checkpoints, exact resume, signals.

`Trainer(config).run()` fine-tunes a model (all weights, or LoRA adapters) with the method
`config.method` names (sft: supervised; dpo: preference pairs, `dpo.py`; grpo: the subclass
`grpo_trainer.GRPOTrainer`) and writes everything to `config.out`. Setup, on every process of a run
(an error on one is raised on all): the settings, the mesh, the data (before the model: bad data
fails in seconds, not after loading 72B weights), the model, the train steps (`step.TrainSteps` with
the method's loss), the checkpoint manager, then a fresh start or an exact resume.

Train checkpoints (`OUT/checkpoints/<step>/`, Orbax, asynchronous, the last `keep_checkpoints`)
hold the train state, the data position and the settings. `--resume` restores the latest one
into this run's shardings and continues with exactly the batches and dropout masks an
uninterrupted run would have seen; the settings that decide those (`_RESUME_KEYS`) must not
change, the number of processes and devices may.

Signals: SIGTERM and SIGINT finish the current step, write a checkpoint, and the run returns
`EXIT_PREEMPTED` (143) or `EXIT_INTERRUPTED` (130) so schedulers can tell an interrupted run
from a finished one (0). Restart with `--resume` to continue exactly where it stopped.

The loop runs what a training method provides: a loader of resumable batches (`advance`,
`position` / `restore`, `batch(epoch, index, rows)`, `batch_tokens`, `batches_in_epoch`; built in
`_load_data`) and `TrainSteps` built with the method's loss (`_build_steps`). Checkpoints,
resume, signals and outputs (`outputs.py`) work on those alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from qwen_jax.checkpoints.outdir import write_failure_reason
from qwen_jax.errors import CheckpointError, ConfigError, OutputError
from qwen_jax.load import load_model
from qwen_jax.model.causal_lm import Qwen2ForCausalLM, default_dtype
from qwen_jax.model.lora import LoRAConfig, LoRAParam, apply_lora
from qwen_jax.model.quantize import model_quantization
from qwen_jax.ops.attention.selection import check_backend
from qwen_jax.sharding import make_mesh, parse_mesh_spec, platform_of
from qwen_jax.tokenizer import Tokenizer
from qwen_jax.train import dpo, multihost, outputs
from qwen_jax.train.config import TrainConfig
from qwen_jax.train.data.examples import Tokenization
from qwen_jax.train.data.loader import open_loader
from qwen_jax.train.data.packing import PackedBatch
from qwen_jax.train.data.preference import PreferenceBatch, PreferenceTokenization, open_preference_loader
from qwen_jax.train.step import (
    BuildRows,
    TrainSteps,
    flops_per_token,
    make_optimizer,
    make_schedule,
    matmul_params,
    path_names,
    peak_flops_per_device,
    sft_loss,
)

EXIT_PREEMPTED = 128 + signal.SIGTERM  # 143
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130

# Settings a resumed run must share with the run that wrote the checkpoint.
_RESUME_KEYS = (
    "method",
    "data",
    "data_split",
    "data_format",
    "messages_column",
    "prompt_column",
    "completion_column",
    "text_column",
    "seq_len",
    "batch_size",
    "grad_accum",
    "seed",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "param_dtype",
    "quantize",
)


# --------------------------------------------------------------------------- setup pieces
def resolve_mesh(spec: str, devices: list[jax.Device] | None = None) -> Mesh:
    """`--mesh` value -> Mesh. Axes not named are 1, except fsdp, which takes the remaining
    devices (so an empty spec puts every device on fsdp, the training default)."""
    try:
        sizes = parse_mesh_spec(spec) if spec else {}
    except ValueError as e:
        raise ConfigError(str(e)) from None
    sizes = {"data": 1, "tensor": 1, **sizes}
    try:
        return make_mesh(**sizes, devices=devices)
    except ValueError as e:
        raise ConfigError(f"mesh {spec!r}: {e}") from None


def _check_attention(config: TrainConfig, mesh: Mesh) -> None:
    """Refuse an attention backend that cannot run on this mesh's platform before anything is written."""
    dtype = default_dtype() if config.compute_dtype == "auto" else jnp.dtype(config.compute_dtype)
    try:
        check_backend(config.attention, dtype=dtype, head_dim=None, platform=platform_of(mesh))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _nested(tree: Any) -> dict:
    """A pytree as nested dicts keyed by its path names (what Orbax saves)."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        node = out
        names = path_names(path)
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = leaf
    return out


def _from_nested(nested: dict, like: Any) -> Any:
    """Inverse of `_nested`: the leaves of `nested` in the structure of `like`."""
    leaves = []
    for path, _ in jax.tree_util.tree_flatten_with_path(like)[0]:
        node = nested
        for name in path_names(path):
            node = node[name]
        leaves.append(node)
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


# --------------------------------------------------------------------------- trainer
class Trainer:
    """Full or LoRA fine-tuning of a Qwen2.5 model on JSONL data, as configured by `TrainConfig`.

    `Trainer(config).run()` trains and writes everything to `config.out`; it returns the exit
    status (0 finished, EXIT_PREEMPTED / EXIT_INTERRUPTED after a signal-triggered checkpoint).
    Another method subclasses it (`qwen_jax.train.grpo_trainer.GRPOTrainer`): it overrides the
    data (`_load_data`), the steps (`_build_steps`), `run_step` and `eval_metrics`, and may extend
    `resume_keys`.
    """

    methods: tuple[str, ...] = ("sft", "dpo")  # the `method` settings this class trains
    resume_keys: tuple[str, ...] = _RESUME_KEYS
    updates_per_step = 1  # optimizer updates per step of the loop

    def __init__(
        self,
        config: TrainConfig,
        *,
        model: Qwen2ForCausalLM | None = None,
        devices: list[jax.Device] | None = None,
        log: Callable[[str], None] | None = None,
    ):
        """model: an already built model to train instead of loading `config.model` (it must live on
        the mesh that `config.mesh` describes; `config.tokenizer` then names the tokenizer).

        In a multi-process run (`multihost.initialize` first) every process constructs the Trainer
        with the same config; a setup error on any process is raised on all of them."""
        self.config = config
        say = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.log = lambda message: say(multihost.process_tag(message))
        self.primary = multihost.is_primary()
        with multihost.all_or_none("checking the settings"):
            config.check_required()
            if config.method not in self.methods:
                raise ConfigError(
                    f"method {config.method!r} is not trained by {type(self).__name__} (it trains "
                    f"{', '.join(self.methods)}; method grpo: qwen_jax.train.grpo_trainer.GRPOTrainer)"
                )
            self.mesh = resolve_mesh(config.mesh, devices)
            _check_attention(config, self.mesh)
            if model is None and not os.path.isdir(config.model):
                raise CheckpointError(f"{config.model}: model directory not found")
            self.lora_config = self._lora_config()
            os.makedirs(config.out, exist_ok=True)
        multihost.check_shared_directory(config.out)
        self.metrics_path = outputs.metrics_path(config.out)
        self._load_data()  # before the model: bad data fails in seconds, not after loading 72B weights
        self.model = model if model is not None else self._load_model()
        if isinstance(self.model.model.layers, nnx.List):
            raise ConfigError(
                "training runs the layers with a scan: pass a model loaded with scanned layers "
                "(qwen_jax.load_model(path), or qwen_jax.load(path, scan_layers=True))"
            )
        self.model.remat = config.remat
        self.model.attention = config.attention
        self.lora = self.lora_config is not None
        if model_quantization(self.model) is not None and not self.lora:
            raise ConfigError(
                f"the base model is quantized ({model_quantization(self.model).name}): its weights "
                "cannot be trained; train LoRA adapters on it (lora_rank > 0)"
            )
        if self.lora:
            apply_lora(self.model, self.lora_config, seed=config.seed)
        self.total_steps = config.steps or sum(self.loader.batches_in_epoch(e) for e in range(config.epochs))
        self._peak_flops = peak_flops_per_device(config.peak_tflops)
        self._build_steps()
        self.checkpoints = ocp.CheckpointManager(
            os.path.abspath(os.path.join(config.out, "checkpoints")),
            options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, enable_async_checkpointing=True),
            item_names=("state", "meta"),
        )
        self._restore_or_start()

    # ---------------------------------------------------------------- setup
    def _lora_config(self) -> LoRAConfig | None:
        config = self.config
        if config.lora_rank == 0:
            return None
        try:
            return LoRAConfig(config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_target_list)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _load_model(self) -> Qwen2ForCausalLM:
        config = self.config
        dtype = None if config.compute_dtype == "auto" else config.compute_dtype
        param_dtype = None if config.param_dtype == "auto" else config.param_dtype
        return load_model(
            config.model,
            dtype=dtype,
            param_dtype=param_dtype or dtype,
            mesh=self.mesh,
            quantize=config.quantize or None,
        )

    def _load_data(self) -> None:
        """The tokenizer, the train loader and the optional eval loader (SFT: packed examples;
        DPO: preference pairs)."""
        config = self.config
        tokenizer_dir = config.tokenizer or config.model
        with multihost.all_or_none("loading the tokenizer"):
            self.tokenizer = Tokenizer.from_dir(tokenizer_dir)
            if config.method == "dpo":
                tokenization, open_data, unit = PreferenceTokenization(self.tokenizer), open_preference_loader, "pairs"
            else:
                tokenization, open_data, unit = Tokenization(self.tokenizer), open_loader, "examples"
        self.loader, stats = open_data(config.data, config, tokenization, tokenizer_dir, shuffle=True, log=self.log)
        self.data_stats = dataclasses.replace(stats, truncated=self.loader.truncated, dropped=self.loader.dropped)
        stats = self.data_stats
        self.log(
            f"data: {stats.examples} {unit} from {config.data} ({stats.skipped_lines} bad records skipped, "
            f"{stats.truncated} truncated to {config.seq_len} tokens, {stats.dropped} dropped)"
        )
        self.eval_loader = None
        if config.eval_data:
            self.eval_loader, _ = open_data(
                config.eval_data, config, tokenization, tokenizer_dir, shuffle=False, log=self.log
            )

    def _build_steps(self) -> None:
        """The optimizer, the method's train and eval steps, and the train state at step 0 (DPO: and
        the reference, a frozen copy of the starting parameters or precomputed log-probabilities)."""
        config = self.config
        self.schedule = make_schedule(config, self.total_steps)
        self.optimizer = make_optimizer(config, self.schedule)
        is_dpo = config.method == "dpo"
        # DPO's reference: with LoRA the model with adapters off; for full fine-tuning a frozen copy,
        # unless its log-probabilities are computed once before training.
        frozen_copy = is_dpo and not self.lora and not config.precompute_ref_logprobs
        loss = (
            dpo.DPOLoss(
                config.setting("beta"),
                config.setting("loss_type"),
                config.label_smoothing,
                precomputed=config.precompute_ref_logprobs,
            )
            if is_dpo
            else sft_loss
        )
        self.steps = TrainSteps(
            self.model,
            loss=loss,
            optimizer=self.optimizer,
            schedule=self.schedule,
            trainable=LoRAParam if self.lora else nnx.Param,
            mesh=self.mesh,
            batch_size=config.batch_size,
            grad_accum=config.grad_accum,
            seq_len=config.seq_len,
            dropout=self.lora and config.lora_dropout > 0,
            count_name="pairs" if is_dpo else "target_tokens",
            reference=frozen_copy,
        )
        self.state, self.frozen = self.steps.init(self.model, config.seed)
        self.num_trainable = self.steps.num_trainable
        self.reference = self.steps.reference_of(self.state) if frozen_copy else None
        if is_dpo and config.precompute_ref_logprobs and not config.export_only:
            for loader in filter(None, (self.loader, self.eval_loader)):
                path = os.path.join(loader.store.directory, f"ref_logps-{dpo.reference_digest(config)}.bin")
                loader.set_reference(
                    dpo.precompute_reference(self.steps, self.state["params"], self.frozen, loader, path, log=self.log)
                )

    # ---------------------------------------------------------------- checkpoints
    def _restore_or_start(self) -> None:
        with multihost.all_or_none("looking for a train checkpoint"):  # every process reads the same directory
            latest = self.checkpoints.latest_step()
            if latest is None and self.config.export_only:
                raise ConfigError(f"export_only: {self.config.out}/checkpoints holds no train checkpoint to export")
            if latest is not None and not (self.config.resume or self.config.export_only):
                raise ConfigError(
                    f"{self.config.out}/checkpoints already holds a run (step {latest}); "
                    "pass --resume to continue it or choose another --out"
                )
        if latest is None:
            if self.primary and os.path.exists(self.metrics_path):
                os.remove(self.metrics_path)  # a fresh run: no stale curve from an earlier one
            return
        meta = self.checkpoints.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        with multihost.all_or_none("comparing the settings with the checkpoint's"):
            saved = meta["config"]
            defaults = TrainConfig()  # settings a checkpoint from an older qwen-jax does not record
            changed = [k for k in self.resume_keys if saved.get(k, getattr(defaults, k)) != getattr(self.config, k)]
            if changed:
                detail = ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(self.config, k)!r}" for k in changed)
                raise ConfigError(f"cannot resume with changed settings ({detail})")
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
        restored = self.checkpoints.restore(
            latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(_nested(abstract)))
        )["state"]
        self.state = _from_nested(restored, self.state)
        self.loader.restore(meta["data_position"])
        if self.primary:
            outputs.truncate_metrics(self.metrics_path, latest)
        # The state is restored into this run's shardings and the data position counts global batches,
        # so a run may resume on another number of processes or devices.
        saved_processes = meta.get("process_count", 1)
        moved = (
            f"; it was written by {saved_processes} process(es), this run has {jax.process_count()}"
            if saved_processes != jax.process_count()
            else ""
        )
        self.log(
            f"resumed from {self.config.out}/checkpoints/{latest} (epoch {self.loader.epoch}, "
            f"batch {self.loader.index}){moved}"
        )

    def save_checkpoint(self) -> None:
        """Start writing a train checkpoint of the current step (asynchronous; none if it exists)."""
        step = self.completed_steps()
        if self.checkpoints.latest_step() == step:
            return
        meta = {
            "config": self.config.to_dict(),
            "data_position": self.loader.position,
            "step": step,
            "process_count": jax.process_count(),
            "device_count": jax.device_count(),
        }
        self.checkpoints.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(_nested(self.state)), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    # ---------------------------------------------------------------- model access
    def current_model(self, *, deterministic: bool = True) -> Qwen2ForCausalLM:
        """The model with the current trained parameters (adapters attached in LoRA mode)."""
        return self.steps.model(self.state["params"], self.frozen, deterministic=deterministic)

    def evaluate(self) -> float | None:
        """Mean loss over the eval data (None without eval data)."""
        return self.eval_metrics().get("eval_loss")

    def eval_metrics(self) -> dict[str, Any]:
        """What an evaluation adds to a step's record: `eval_loss` and the method's own metrics (DPO:
        `eval_rewards/chosen`, ...) over the eval data, each the mean over the whole eval set (empty
        without eval data)."""
        if self.eval_loader is None:
            return {}
        total, count, sums = 0.0, 0.0, {}
        for index in range(self.eval_loader.batches_in_epoch(0)):
            loss, n, statistics = self.steps.evaluate_statistics(
                self.state["params"], self.frozen, functools.partial(self.eval_loader.batch, 0, index), self.reference
            )
            total, count = total + float(loss), count + float(n)
            for name, (value, value_count) in jax.device_get(statistics).items():
                previous = sums.get(name, (0.0, 0.0))
                sums[name] = (previous[0] + float(value), previous[1] + float(value_count))
        metrics = {"eval_loss": total / max(count, 1.0)}
        metrics.update({f"eval_{name}": value / max(n, 1.0) for name, (value, n) in sums.items()})
        return metrics

    # ---------------------------------------------------------------- the loop
    def train_step(self, batch: PackedBatch | PreferenceBatch | BuildRows) -> dict[str, float]:
        """One optimizer step on a global batch of `batch_size` packed rows (DPO: pairs); returns its metrics.

        `batch`: the whole batch, or a function that builds the given rows of it (what the training
        loop passes, so that each process builds only its own rows)."""
        build_rows = batch if callable(batch) else batch.select
        self.state, metrics = self.steps.train(self.state, self.frozen, build_rows, self.reference)
        return {k: float(v) for k, v in jax.device_get(metrics).items()}

    def completed_steps(self) -> int:
        """Steps of the loop done so far (a method may make several optimizer updates per step)."""
        return int(self.state["step"]) // self.updates_per_step

    def run_step(self) -> tuple[dict[str, Any], dict[str, str]]:
        """One step of the loop on the next batch: its metrics (metrics.jsonl) and the progress bar's postfix."""
        config = self.config
        epoch, index = self.loader.advance()
        tokens = self.loader.batch_tokens(epoch, index)
        start = time.perf_counter()
        metrics = self.train_step(functools.partial(self.loader.batch, epoch, index))
        seconds = time.perf_counter() - start
        record = {
            **metrics,
            "tokens": tokens,
            "step_time": seconds,
            "tokens_per_s": tokens / seconds,
            "epoch": self.loader.epoch,
        }
        if self._peak_flops:
            flops = flops_per_token(self.model.config, config.seq_len, self.lora)
            if config.method == "dpo" and not config.precompute_ref_logprobs:
                flops += 2 * matmul_params(self.model.config)  # the reference's forward
            record["mfu"] = flops * tokens / seconds / (self._peak_flops * self.mesh.size)
        return record, {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}"}

    def run(self, on_step_end: Callable[[Trainer, int], None] | None = None) -> int:
        """Train to `total_steps`; returns 0, or EXIT_PREEMPTED / EXIT_INTERRUPTED after a signal.

        Every process of a multi-process run calls this; only the primary writes metrics.jsonl,
        TensorBoard events, train_config.yaml and the progress bar."""
        config = self.config
        if config.export_only:
            self.log(
                f"export only: writing the outputs of train checkpoint {self.completed_steps()} "
                f"(of {self.total_steps} steps)"
            )
            try:
                self._write_outputs()
            finally:
                with self._writing_checkpoints():
                    self.checkpoints.close()
            return 0
        step = self.completed_steps()
        self.log(
            f"training {'LoRA adapters' if self.lora else 'all weights'}: {self.num_trainable:,} parameters, "
            f"{self.total_steps} steps, mesh {dict(self.mesh.shape)}"
        )
        stopped = False
        try:
            with (
                multihost.StopSignals() as signals,
                outputs.StepLog(config, primary=self.primary) as step_log,
                tqdm(
                    total=self.total_steps,
                    initial=step,
                    desc="train",
                    dynamic_ncols=True,
                    disable=None if config.progress and self.primary else True,
                ) as bar,
            ):
                while step < self.total_steps and not stopped:
                    metrics, postfix = self.run_step()
                    step += 1
                    record = {"step": step, **metrics}
                    if (
                        config.eval_every
                        and step % config.eval_every == 0
                        or (step == self.total_steps and config.eval_data)
                    ):
                        record.update(self.eval_metrics())
                    step_log.write(record)
                    bar.set_postfix(postfix)
                    bar.update(1)
                    if config.save_every and step % config.save_every == 0:
                        with self._writing_checkpoints():
                            self.save_checkpoint()
                    if on_step_end is not None:
                        on_step_end(self, step)
                    stopped = signals.stop_after(step)  # the same answer on every process
            with self._writing_checkpoints():
                self.save_checkpoint()
                self.checkpoints.wait_until_finished()
            if stopped:
                self.log(f"signal {signals.name}: checkpoint saved at step {step}; rerun with --resume to continue")
                return signals.exit_status
            self._write_outputs()
            return 0
        finally:
            with self._writing_checkpoints():
                self.checkpoints.close()

    @contextlib.contextmanager
    def _writing_checkpoints(self) -> Iterator[None]:
        """Turn a failed checkpoint write (disk full, read-only, permissions: an OSError, or the
        ValueError tensorstore raises from Orbax's writer threads) into one OutputError saying which
        checkpoint is complete and how to go on. Orbax writes each checkpoint under a temporary name
        and renames it when complete, so a failed write leaves the previous checkpoints intact."""
        try:
            yield
        except (OSError, ValueError) as e:
            if isinstance(e, ValueError) and "os_error_code" not in str(e):
                raise
            directory = os.path.abspath(os.path.join(self.config.out, "checkpoints"))
            reason = write_failure_reason(e)
            # An earlier checkpoint may still be in flight: let it complete (or fail) before saying which is kept.
            with contextlib.suppress(Exception):
                self.checkpoints.wait_until_finished()
            complete = sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []
            kept = (
                f"the last complete one is {directory}/{complete[-1]}: after fixing the cause, continue from it "
                "with the same command and --resume"
                if complete
                else "none is complete yet"
            )
            raise OutputError(f"writing a train checkpoint in {directory} failed ({reason}); {kept}") from None

    def _write_outputs(self) -> None:
        """OUT/model, the HF export and the loss curve from the current state (its checkpoint is complete)."""
        outputs.write_final_outputs(
            self.current_model(),
            self.config,
            step=self.completed_steps(),
            lora=self.lora,
            primary=self.primary,
            log=self.log,
        )
