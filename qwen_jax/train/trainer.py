"""The training loop: one jitted, sharded, donated train step; Orbax checkpoints; metrics.

Train state (what a checkpoint holds, besides the data position and the config):
`{"params": trainable parameters, "opt_state": optax state, "step": int32, "rng": uint32[2]}`.
In LoRA mode the trainable parameters are only the adapters (`LoRAParam`); the frozen base
weights are an input of the step, never updated. In full mode every `nnx.Param` trains.

The loss is the mean token cross-entropy over the batch's target tokens: each micro-batch
contributes its summed loss and gradient, and the sum is divided by the batch's target count,
so gradient accumulation gives exactly the gradient of the whole batch.

Outputs in `out/`: `checkpoints/<step>/` (train state, resumable), `model/` (final weights,
LoRA merged, as a qwen-jax Orbax checkpoint that `qwen_jax.load_model` reads), `metrics.jsonl`,
`loss_curve.png`, `tensorboard/` (event files, via tensorboardX), `train_config.yaml`.

Signals: SIGTERM and SIGINT finish the current step, write a checkpoint, and the run returns
`EXIT_PREEMPTED` (143) or `EXIT_INTERRUPTED` (130) so schedulers can tell an interrupted run
from a finished one (0). Restart with `--resume` to continue exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen_jax.checkpoints.orbax import save_model
from qwen_jax.errors import CheckpointError, ConfigError, OutputError
from qwen_jax.model.causal_lm import Qwen2ForCausalLM, default_dtype
from qwen_jax.model.lora import (
    LoRAConfig,
    LoRAParam,
    apply_lora,
    merge_lora,
    set_lora_deterministic,
    set_lora_dropout_keys,
)
from qwen_jax.model.quantize import model_quantization
from qwen_jax.ops.attention.selection import check_backend, platform_of
from qwen_jax.sharding import (
    DEFAULT_RULES,
    make_mesh,
    named_sharding,
    parse_mesh_spec,
    state_shardings,
)
from qwen_jax.train import data as data_lib
from qwen_jax.train import multihost, sources, token_cache
from qwen_jax.train.config import TrainConfig

EXIT_PREEMPTED = 128 + signal.SIGTERM  # 143
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130

# Settings a resumed run must share with the run that wrote the checkpoint.
_RESUME_KEYS = (
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

# Dense bf16 peak FLOP/s per device, for MFU on known accelerators (matched on device_kind).
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v6", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
)


# --------------------------------------------------------------------------- pieces
def _check_attention(config: TrainConfig, mesh: Mesh) -> None:
    """Refuse an attention backend that cannot run on this mesh's platform before anything is written."""
    dtype = default_dtype() if config.compute_dtype == "auto" else jnp.dtype(config.compute_dtype)
    try:
        check_backend(config.attention, dtype=dtype, head_dim=None, platform=platform_of(mesh))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def resolve_mesh(spec: str, devices=None) -> Mesh:
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


def make_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then cosine / linear decay to min_lr_ratio * peak, or constant."""
    peak = config.learning_rate
    decay_steps = max(total_steps - config.warmup_steps, 1)
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.min_lr_ratio)
    elif config.schedule == "linear":
        decay = optax.linear_schedule(peak, peak * config.min_lr_ratio, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if config.warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, config.warmup_steps), decay], [config.warmup_steps])


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def decay_mask(params):
    """True where weight decay applies: not on norm weights or biases."""

    def decays(path, _):
        names = [n for n in _path_names(path) if n != "value"]
        return not (any("norm" in n for n in names) or names[-1] == "bias")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    clip = optax.clip_by_global_norm(config.max_grad_norm) if config.max_grad_norm > 0 else optax.identity()
    adamw = optax.adamw(
        schedule,
        b1=config.adam_b1,
        b2=config.adam_b2,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        mask=decay_mask,
    )
    return optax.chain(clip, adamw)


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy of every position `[B, T]` (float32), unweighted."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def forward_losses(model: Qwen2ForCausalLM, batch: dict[str, jax.Array]) -> jax.Array:
    """Per-position losses `[B, T]` of a packed batch (segments isolated, positions per segment)."""
    ones = jnp.ones_like(batch["input_ids"])
    logits = model.forward(batch["input_ids"], batch["positions"], ones, segment_ids=batch["segment_ids"])
    return token_losses(logits, batch["targets"])


def batch_arrays(batch: data_lib.PackedBatch, grad_accum: int) -> dict[str, np.ndarray]:
    """Host arrays `[grad_accum, rows / grad_accum, T]` for the train step."""
    out = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        out[f.name] = value.reshape(grad_accum, value.shape[0] // grad_accum, *value.shape[1:])
    return out


def matmul_params(config) -> int:
    """Parameters that take part in a matmul per token (decoder layers + output head)."""
    D, F, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    NH, KH = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_layer = D * NH + 2 * D * KH + NH * D + 3 * D * F
    return L * per_layer + config.vocab_size * D


def flops_per_token(config, seq_len: int, lora: bool) -> float:
    """Training FLOPs per token: 6N (full) or 4N (LoRA: no weight gradients) + attention (PaLM)."""
    weight_flops = (4 if lora else 6) * matmul_params(config)
    attention_flops = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return weight_flops + attention_flops


def peak_flops_per_device(config_peak_tflops: float) -> float | None:
    if config_peak_tflops > 0:
        return config_peak_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return flops
    return None


def _nested(tree) -> dict:
    """A pytree as nested dicts keyed by its path names (what Orbax saves)."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        node = out
        names = _path_names(path)
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = leaf
    return out


def _from_nested(nested: dict, like):
    """Inverse of `_nested`: the leaves of `nested` in the structure of `like`."""
    leaves = []
    for path, _ in jax.tree_util.tree_flatten_with_path(like)[0]:
        node = nested
        for name in _path_names(path):
            node = node[name]
        leaves.append(node)
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


# --------------------------------------------------------------------------- trainer
class Trainer:
    """Full or LoRA fine-tuning of a Qwen2.5 model on JSONL data, as configured by `TrainConfig`.

    `Trainer(config).run()` trains and writes everything to `config.out`; it returns the exit
    status (0 finished, EXIT_PREEMPTED / EXIT_INTERRUPTED after a signal-triggered checkpoint).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        model: Qwen2ForCausalLM | None = None,
        devices=None,
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
            self.mesh = resolve_mesh(config.mesh, devices)
            _check_attention(config, self.mesh)
            if model is None and not os.path.isdir(config.model):
                raise FileNotFoundError(f"{config.model}: model directory not found")
            self.lora_config = self._lora_config()
            os.makedirs(config.out, exist_ok=True)
        multihost.check_shared_directory(config.out)
        self._load_data()  # before the model: bad data fails in seconds, not after loading 72B weights
        self.model = model if model is not None else self._load_model()
        if isinstance(self.model.model.layers, nnx.List):
            raise ValueError(
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
        self.schedule = make_schedule(config, self.total_steps)
        self.optimizer = make_optimizer(config, self.schedule)
        self._build_state()
        self._compile()
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
        from qwen_jax.load import load_model

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
        from qwen_jax.tokenizer import Tokenizer

        config = self.config
        tokenizer_dir = config.tokenizer or config.model
        with multihost.all_or_none("loading the tokenizer"):
            self.tokenizer = Tokenizer.from_dir(tokenizer_dir)
            tokenization = data_lib.Tokenization(self.tokenizer)
        self.loader, stats = self._loader(config.data, tokenization, tokenizer_dir, shuffle=True)
        self.data_stats = dataclasses.replace(stats, truncated=self.loader.truncated, dropped=self.loader.dropped)
        stats = self.data_stats
        self.log(
            f"data: {stats.examples} examples from {config.data} ({stats.skipped_lines} bad records skipped, "
            f"{stats.truncated} truncated to {config.seq_len} tokens, {stats.dropped} dropped)"
        )
        self.eval_loader = None
        if config.eval_data:
            self.eval_loader, _ = self._loader(config.eval_data, tokenization, tokenizer_dir, shuffle=False)

    def _loader(
        self, spec: str, tokenization: data_lib.Tokenization, tokenizer_dir: str, shuffle: bool
    ) -> tuple[data_lib.DataLoader, data_lib.DatasetStats]:
        """Open a data source, tokenize it (or reuse OUT/data_cache), and load packed batches from it."""
        config = self.config
        with multihost.all_or_none(f"opening {spec}"):
            source = sources.open_source(spec, config.data_split)
        store, stats = token_cache.load(
            source,
            tokenization,
            config.column_mapping,
            os.path.join(config.out, "data_cache"),
            tokenizer_dir=tokenizer_dir,
            skip_bad_lines=config.skip_bad_lines,
            progress=config.progress,
            log=self.log,
        )
        with multihost.all_or_none(f"packing {spec}"):
            try:
                loader = data_lib.DataLoader(
                    store, config.seq_len, config.batch_size, seed=config.seed, shuffle=shuffle
                )
            except ValueError:
                raise data_lib.DataError(
                    f"{spec}: no example has a target token within seq_len {config.seq_len}"
                ) from None
        return loader, stats

    def _build_state(self) -> None:
        trainable = LoRAParam if self.lora else nnx.Param
        self.graphdef, params, self.frozen = nnx.split(self.model, trainable, ...)
        set_lora_deterministic(self.model, True)
        self.eval_graphdef = nnx.graphdef(self.model)
        set_lora_deterministic(self.model, False)

        replicated = NamedSharding(self.mesh, PartitionSpec())
        param_sharding = state_shardings(params, self.mesh, DEFAULT_RULES)
        self.frozen_sharding = state_shardings(self.frozen, self.mesh, DEFAULT_RULES)
        opt_state = jax.jit(self.optimizer.init)(params)
        by_path = {tuple(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(param_sharding)[0]}

        def opt_leaf_sharding(path, _):
            path = tuple(path)
            for start in range(len(path)):
                if path[start:] in by_path:  # adam moments mirror the params they belong to
                    return by_path[path[start:]]
            return replicated

        opt_sharding = jax.tree_util.tree_map_with_path(opt_leaf_sharding, opt_state)
        self.state_sharding = {
            "params": param_sharding,
            "opt_state": opt_sharding,
            "step": replicated,
            "rng": replicated,
        }
        state = {
            "params": params,
            "opt_state": opt_state,
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(self.config.seed)),
        }
        self.state = jax.device_put(state, self.state_sharding)
        self.frozen = jax.device_put(self.frozen, self.frozen_sharding)
        self.num_trainable = sum(x.size for x in jax.tree.leaves(params))

    def _batch_sharding(self, shape) -> NamedSharding:
        return named_sharding((None, "batch", "seq"), shape, self.mesh, DEFAULT_RULES)

    def _compile(self) -> None:
        graphdef, eval_graphdef, optimizer, schedule = self.graphdef, self.eval_graphdef, self.optimizer, self.schedule
        dropout = self.lora and self.config.lora_dropout > 0

        def loss_and_count(params, frozen, micro, key):
            model = nnx.merge(graphdef, params, frozen, copy=True)
            if dropout:
                set_lora_dropout_keys(model, key)
            losses = forward_losses(model, micro)
            return jnp.sum(losses * micro["weights"]), jnp.sum(micro["weights"])

        def train_step(state, frozen, batch):
            params = state["params"]
            step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
            grad_fn = jax.value_and_grad(loss_and_count, has_aux=True)

            def micro_step(carry, xs):
                grads_sum, loss_sum, count_sum = carry
                micro, index = xs
                (loss, count), grads = grad_fn(params, frozen, micro, jax.random.fold_in(step_key, index))
                return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss, count_sum + count), None

            accum = batch["input_ids"].shape[0]
            if accum == 1:  # no accumulation loop: a smaller program that compiles faster
                (loss_sum, count), grads = grad_fn(params, frozen, jax.tree.map(lambda x: x[0], batch), step_key)
            else:
                zeros = jax.tree.map(jnp.zeros_like, params)
                init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
                (grads, loss_sum, count), _ = jax.lax.scan(micro_step, init, (batch, jnp.arange(accum)))
            denominator = jnp.maximum(count, 1.0)
            grads = jax.tree.map(lambda g: g / denominator, grads)
            updates, opt_state = optimizer.update(grads, state["opt_state"], params)
            new_state = {
                "params": optax.apply_updates(params, updates),
                "opt_state": opt_state,
                "step": state["step"] + 1,
                "rng": state["rng"],
            }
            metrics = {
                "loss": loss_sum / denominator,
                "grad_norm": optax.tree.norm(grads),
                "lr": schedule(state["step"]),
                "target_tokens": count,
            }
            return new_state, metrics

        def eval_step(params, frozen, batch):
            model = nnx.merge(eval_graphdef, params, frozen, copy=True)
            losses = forward_losses(model, batch)
            return jnp.sum(losses * batch["weights"]), jnp.sum(batch["weights"])

        replicated = NamedSharding(self.mesh, PartitionSpec())
        accum, rows = self.config.grad_accum, self.config.batch_size // self.config.grad_accum
        batch_sharding = self._batch_sharding((accum, rows, self.config.seq_len))
        metric_sharding = {k: replicated for k in ("loss", "grad_norm", "lr", "target_tokens")}
        self._train_step = jax.jit(
            train_step,
            in_shardings=(self.state_sharding, self.frozen_sharding, batch_sharding),
            out_shardings=(self.state_sharding, metric_sharding),
            donate_argnums=0,
        )
        self._eval_sharding = named_sharding(
            ("batch", "seq"), (self.config.batch_size, self.config.seq_len), self.mesh, DEFAULT_RULES
        )
        self._eval_step = jax.jit(
            eval_step,
            in_shardings=(self.state_sharding["params"], self.frozen_sharding, self._eval_sharding),
            out_shardings=(replicated, replicated),
        )

    def _device_batch(
        self, build_rows: Callable[[np.ndarray], data_lib.PackedBatch], *, accumulate: bool = True
    ) -> dict[str, jax.Array]:
        """A global batch on the mesh. `build_rows(rows)` returns the given rows of the batch: each
        process builds only the rows its devices hold, and `jax.make_array_from_process_local_data`
        joins them (every process builds every row when the batch axis is replicated).

        accumulate: shaped `[grad_accum, rows / grad_accum, T]` for the train step, else `[rows, T]`."""
        config = self.config
        if accumulate:
            accum, rows = config.grad_accum, config.batch_size // config.grad_accum
            shape, row_axis = (accum, rows, config.seq_len), 1
            sharding = self._batch_sharding(shape)
        else:
            accum, rows = 1, config.batch_size
            shape, row_axis, sharding = (rows, config.seq_len), 0, self._eval_sharding
        local = multihost.process_rows(sharding, shape, axis=row_axis)
        wanted = (np.arange(accum)[:, None] * rows + local[None, :]).reshape(-1)  # rows within the whole batch
        arrays = batch_arrays(build_rows(wanted), accum)
        if not accumulate:
            arrays = {name: value[0] for name, value in arrays.items()}
        return {name: multihost.global_array(sharding, shape, value) for name, value in arrays.items()}

    # ---------------------------------------------------------------- checkpoints
    def _restore_or_start(self) -> None:
        self.metrics_path = os.path.join(self.config.out, "metrics.jsonl")
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
            changed = [k for k in _RESUME_KEYS if saved.get(k, getattr(defaults, k)) != getattr(self.config, k)]
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
            self._truncate_metrics(latest)
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

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics of steps after the restored checkpoint (they will be run again)."""
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.metrics_path, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def save_checkpoint(self) -> None:
        step = int(self.state["step"])
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
        graphdef = self.eval_graphdef if deterministic else self.graphdef
        return nnx.merge(graphdef, self.state["params"], self.frozen, copy=True)

    def evaluate(self) -> float | None:
        """Mean token loss over the eval data (None without eval data)."""
        if self.eval_loader is None:
            return None
        total, count = 0.0, 0.0
        for index in range(self.eval_loader.batches_in_epoch(0)):
            arrays = self._device_batch(functools.partial(self.eval_loader.batch, 0, index), accumulate=False)
            loss, n = self._eval_step(self.state["params"], self.frozen, arrays)
            total, count = total + float(loss), count + float(n)
        return total / max(count, 1.0)

    # ---------------------------------------------------------------- the loop
    def train_step(
        self, batch: data_lib.PackedBatch | Callable[[np.ndarray], data_lib.PackedBatch]
    ) -> dict[str, float]:
        """One optimizer step on a global batch of `batch_size` packed rows; returns its metrics.

        `batch`: the whole batch, or a function that builds the given rows of it (what the training
        loop passes, so that each process builds only its own rows)."""
        build_rows = batch.select if isinstance(batch, data_lib.PackedBatch) else batch
        self.state, metrics = self._train_step(self.state, self.frozen, self._device_batch(build_rows))
        return {k: float(v) for k, v in jax.device_get(metrics).items()}

    def run(self, on_step_end: Callable[[Trainer, int], None] | None = None) -> int:
        """Train to `total_steps`; returns 0, or EXIT_PREEMPTED / EXIT_INTERRUPTED after a signal.

        Every process of a multi-process run calls this; only the primary writes metrics.jsonl,
        TensorBoard events, train_config.yaml and the progress bar."""
        from tqdm import tqdm

        config = self.config
        if config.export_only:
            self.log(
                f"export only: writing the outputs of train checkpoint {int(self.state['step'])} "
                f"(of {self.total_steps} steps)"
            )
            try:
                self._write_outputs()
            finally:
                self.checkpoints.close()
            return 0
        writer = None
        if self.primary:
            with open(os.path.join(config.out, "train_config.yaml"), "w", encoding="utf-8") as f:
                import yaml

                yaml.safe_dump(config.to_dict(), f, sort_keys=False)
            writer = _tensorboard_writer(os.path.join(config.out, "tensorboard"))
        flops = flops_per_token(self.model.config, config.seq_len, self.lora)
        peak = peak_flops_per_device(config.peak_tflops)
        step = int(self.state["step"])
        self.log(
            f"training {'LoRA adapters' if self.lora else 'all weights'}: {self.num_trainable:,} parameters, "
            f"{self.total_steps} steps, mesh {dict(self.mesh.shape)}"
        )
        stopped = False
        try:
            with (
                multihost.StopSignals() as signals,
                open(self.metrics_path if self.primary else os.devnull, "a", encoding="utf-8") as metrics_file,
                tqdm(
                    total=self.total_steps,
                    initial=step,
                    desc="train",
                    dynamic_ncols=True,
                    disable=None if config.progress and self.primary else True,
                ) as bar,
            ):
                while step < self.total_steps and not stopped:
                    epoch, index = self.loader.advance()
                    tokens = self.loader.batch_tokens(epoch, index)
                    start = time.perf_counter()
                    metrics = self.train_step(functools.partial(self.loader.batch, epoch, index))
                    seconds = time.perf_counter() - start
                    step += 1
                    record = {
                        "step": step,
                        **metrics,
                        "tokens": tokens,
                        "step_time": seconds,
                        "tokens_per_s": tokens / seconds,
                        "epoch": self.loader.epoch,
                    }
                    if peak:
                        record["mfu"] = flops * tokens / seconds / (peak * self.mesh.size)
                    if (
                        config.eval_every
                        and step % config.eval_every == 0
                        or (step == self.total_steps and self.eval_loader is not None)
                    ):
                        record["eval_loss"] = self.evaluate()
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    if writer is not None:
                        for key, value in record.items():
                            if key != "step":
                                writer.add_scalar(f"train/{key}", value, step)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                    bar.update(1)
                    if config.save_every and step % config.save_every == 0:
                        self.save_checkpoint()
                    if on_step_end is not None:
                        on_step_end(self, step)
                    stopped = signals.stop_after(step)  # the same answer on every process
            self.save_checkpoint()
            self.checkpoints.wait_until_finished()
            if stopped:
                self.log(f"signal {signals.name}: checkpoint saved at step {step}; rerun with --resume to continue")
                return signals.exit_status
            self._write_outputs()
            return 0
        finally:
            if writer is not None:
                writer.close()
            self.checkpoints.close()

    def _write_outputs(self) -> None:
        """Final model (LoRA merged) as a qwen-jax Orbax checkpoint, optional HF export, loss curve.

        Runs after the last train checkpoint is saved: if writing fails, the error says how to
        write the outputs again from that checkpoint (`--export-only`), without training again.
        """
        try:
            self._write_model()
        except (CheckpointError, OSError, ValueError) as e:
            step = self.checkpoints.latest_step()
            out = os.path.abspath(self.config.out)
            raise OutputError(
                f"writing the final model failed ({_one_line(e)}); the training is safe in {out}/checkpoints/{step}. "
                f"After fixing the cause, write the outputs from it with: qwen-jax train --config "
                f"{out}/train_config.yaml --export-only"
            ) from None
        plot = self.primary and plot_loss_curve(self.metrics_path, os.path.join(self.config.out, "loss_curve.png"))
        if plot:
            self.log(f"loss curve: {plot}")

    def _write_model(self) -> None:
        from qwen_jax.convert.to_hf import orbax_to_hf

        model = self.current_model()
        if self.lora:
            merge_lora(model)
        model_dir = os.path.abspath(os.path.join(self.config.out, "model"))
        with self._model_staging_dir(model_dir) as staging:
            save_model(
                model,
                staging,
                source="qwen-jax train",
                side_files_from=self.config.tokenizer or self.config.model,
                progress=False if not (self.config.progress and self.primary) else None,
            )
        self.log(f"final model: {model_dir}")
        if self.config.export_hf:
            with multihost.all_or_none("exporting to HF safetensors"):
                if self.primary:  # reads OUT/model from disk: no collectives, one writer
                    orbax_to_hf(model_dir, self.config.export_hf, force=True, progress=False)
            self.log(f"HF export: {self.config.export_hf}")

    @contextlib.contextmanager
    def _model_staging_dir(self, model_dir: str) -> Iterator[str]:
        """Where to write OUT/model so that it appears complete or not at all (`atomic_output_dir`).

        In a multi-process run every process writes its own shards into one staging directory whose
        name they all derive alike; the primary then moves it into place."""
        from qwen_jax.checkpoints.outdir import atomic_output_dir

        if jax.process_count() == 1:
            with atomic_output_dir(model_dir, force=True) as staging:
                yield staging
            return
        parent, name = os.path.split(model_dir)
        shared = os.path.join(parent, f".{name}.partial-step{int(self.state['step'])}")
        with multihost.all_or_none("preparing the model directory"):
            if self.primary:
                shutil.rmtree(shared, ignore_errors=True)
                os.makedirs(shared)
        yield shared  # an error on one process ends every process (see train/cli.py), leaving OUT/model as it was
        with multihost.all_or_none("moving the model into place"):
            if self.primary:
                with atomic_output_dir(model_dir, force=True) as staging:
                    os.rmdir(staging)
                    os.replace(shared, staging)


# --------------------------------------------------------------------------- outputs
def _one_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _tensorboard_writer(logdir: str):
    """A TensorBoard SummaryWriter if tensorboardX or tensorboard is installed, else None."""
    import importlib.util

    if importlib.util.find_spec("tensorboardX") is not None:
        from tensorboardX import SummaryWriter
    elif importlib.util.find_spec("tensorboard") is not None and importlib.util.find_spec("torch") is not None:
        from torch.utils.tensorboard import SummaryWriter
    else:
        return None
    return SummaryWriter(logdir)


def plot_loss_curve(metrics_path: str, png_path: str) -> str | None:
    """Train (and eval) loss against step as a PNG, if matplotlib is installed."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None or not os.path.exists(metrics_path):
        return None
    # A standalone Figure: no pyplot, so the caller's (e.g. a notebook's) backend is left alone.
    from matplotlib.figure import Figure

    with open(metrics_path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    axes.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss")
    evals = [r for r in records if r.get("eval_loss") is not None]
    if evals:
        axes.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    return png_path
