"""The train step: loss, optimizer and schedule, the train state, and the jitted train and eval steps.

A training method is a loss over a batch format. `TrainSteps` takes the loss and compiles the
steps a loop runs (`loop.Trainer`); the loop never looks inside them, so a new method brings its
loss and its batches and leaves the loop's resume, signal and output handling as they are.

Train state (what a checkpoint holds, besides the data position and the config):
`{"params": trainable parameters, "opt_state": optax state, "step": int32, "rng": uint32[2]}`.
In LoRA mode the trainable parameters are only the adapters (`LoRAParam`); the frozen base
weights are an input of the step, never updated. In full mode every `nnx.Param` trains.

Batches: the fields of a batch dataclass (`data.packing.PackedBatch` for SFT), each
`[batch_size, seq_len]`, sharded over the mesh by rows. The train step takes them as
`[grad_accum, batch_size / grad_accum, seq_len]` and runs one micro-batch after another.

A loss returns the summed loss of a micro-batch and the count it averages over (target tokens
for SFT, preference pairs for DPO, completion tokens or completions for GRPO); the step divides
the sums over all micro-batches by the whole batch's count, so gradient accumulation gives exactly
the gradient of the whole batch. A loss may also return its own metrics (`Statistics`, e.g. DPO's
`rewards/chosen`, GRPO's `clip_ratio`): each a (sum, count) pair, both summed over the micro-batches
(and over an eval set's batches) and reported as sum / count under the metric's name; the count
is each metric's own (DPO: pairs; GRPO: completion tokens, whatever the loss's count is).

A method that compares the policy with a reference (DPO with full fine-tuning) asks for
`reference=True`: the train and eval steps then also take the reference's trainable variables
(a frozen copy of the starting ones, never updated) and call the loss with `reference=` the
reference model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen_jax.config import Qwen2Config
from qwen_jax.extras import require
from qwen_jax.model.causal_lm import Qwen2ForCausalLM
from qwen_jax.model.lora import set_lora_deterministic, set_lora_dropout_keys
from qwen_jax.ops.logprobs import token_logprobs
from qwen_jax.sharding import DEFAULT_RULES, named_sharding, state_shardings
from qwen_jax.train import multihost
from qwen_jax.train.config import TrainConfig

optax = require("optax", extra="train", feature="training")

Statistics = dict[str, tuple[jax.Array, jax.Array]]
"""A loss's own metrics: `{name: (sum, count)}`, float32 scalars, reported as total sum / total count."""

Loss = Callable[..., tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, Statistics]]
"""A training objective: `(model, micro-batch) -> (summed loss, count it averages over)`, float32
scalars, optionally followed by its `Statistics`; with `TrainSteps(reference=True)` it is also
called with `reference=` the reference model."""

TrainState = dict[str, Any]
"""`{"params", "opt_state", "step", "rng"}` (see the module docstring)."""

# What the train step reports for every step (metrics.jsonl has these, the loss's own statistics and
# the loop's own); "target_tokens" is the loss's count, under the name `TrainSteps(count_name=)` gives.
STEP_METRICS = ("loss", "grad_norm", "lr", "target_tokens")


def _with_statistics(result: tuple) -> tuple[jax.Array, jax.Array, Statistics]:
    """A loss's result as (summed loss, count, statistics), the statistics empty if it has none."""
    return (*result, {}) if len(result) == 2 else result


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


# --------------------------------------------------------------------------- optimizer
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


def path_names(path: tuple) -> list[str]:
    """The names of a pytree key path (dict keys, attribute names, sequence indices) as strings."""
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: not on norm weights or biases."""

    def decays(path, _):
        names = [n for n in path_names(path) if n != "value"]
        return not (any("norm" in n for n in names) or names[-1] == "bias")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Global-norm clipping (unless max_grad_norm is 0), then AdamW on `schedule` (no decay of norms and biases)."""
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


# --------------------------------------------------------------------------- loss
def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy of every position `[B, T]` (float32), unweighted."""
    logps, _ = token_logprobs(logits, targets)
    return -logps


def forward_losses(model: Qwen2ForCausalLM, batch: dict[str, jax.Array]) -> jax.Array:
    """Per-position losses `[B, T]` of a packed batch (segments isolated, positions per segment)."""
    ones = jnp.ones_like(batch["input_ids"])
    logits = model.forward(batch["input_ids"], batch["positions"], ones, segment_ids=batch["segment_ids"])
    return token_losses(logits, batch["targets"])


def sft_loss(model: Qwen2ForCausalLM, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Supervised fine-tuning on a packed batch: summed token cross-entropy over the target tokens
    (`weights`), and their count (the mean over a whole batch is the loss reported and trained)."""
    losses = forward_losses(model, batch)
    return jnp.sum(losses * batch["weights"]), jnp.sum(batch["weights"])


# --------------------------------------------------------------------------- FLOPs
def matmul_params(config: Qwen2Config) -> int:
    """Parameters that take part in a matmul per token (decoder layers + output head)."""
    D, F, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    NH, KH = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_layer = D * NH + 2 * D * KH + NH * D + 3 * D * F
    return L * per_layer + config.vocab_size * D


def flops_per_token(config: Qwen2Config, seq_len: int, lora: bool) -> float:
    """Training FLOPs per token: 6N (full) or 4N (LoRA: no weight gradients) + attention (PaLM)."""
    weight_flops = (4 if lora else 6) * matmul_params(config)
    attention_flops = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return weight_flops + attention_flops


def peak_flops_per_device(config_peak_tflops: float) -> float | None:
    """Peak FLOP/s of one device: the configured TFLOP/s, else the known accelerator's (None if unknown)."""
    if config_peak_tflops > 0:
        return config_peak_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return flops
    return None


# --------------------------------------------------------------------------- steps
def batch_arrays(batch: Any, grad_accum: int) -> dict[str, np.ndarray]:
    """The fields of a batch dataclass as host arrays `[grad_accum, rows / grad_accum, ...]` (fields
    that are None are left out)."""
    out = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if value is None:
            continue
        out[f.name] = value.reshape(grad_accum, value.shape[0] // grad_accum, *value.shape[1:])
    return out


BuildRows = Callable[[np.ndarray], Any]
"""`build_rows(rows)`: the given rows (indices within the global batch) of a batch dataclass."""


class TrainSteps:
    """The jitted train and eval steps of one model, optimizer and loss on a mesh.

    The model is split into trainable variables (those of type `trainable`: `nnx.Param` for full
    fine-tuning, `LoRAParam` for adapters only) and frozen ones; the steps take both, and the
    train step donates and returns the train state. Batches are `batch_size` rows of `seq_len`
    tokens, `grad_accum` micro-batches per train step.

    dropout: the model has LoRA dropout to drive (a fresh key per step and micro-batch, derived
    from the state's rng, so a resumed run draws the same masks).
    count_name: the name the loss's count is reported under (SFT: target tokens).
    reference: the steps take a reference's trainable variables (see the module docstring).
    """

    def __init__(
        self,
        model: Qwen2ForCausalLM,
        *,
        loss: Loss,
        optimizer: optax.GradientTransformation,
        schedule: optax.Schedule,
        trainable: type[nnx.Variable],
        mesh: Mesh,
        batch_size: int,
        grad_accum: int,
        seq_len: int,
        dropout: bool = False,
        count_name: str = "target_tokens",
        reference: bool = False,
    ):
        self.loss, self.optimizer, self.schedule, self.trainable = loss, optimizer, schedule, trainable
        self.count_name, self.uses_reference = count_name, reference
        self.graphdef, params, frozen = nnx.split(model, trainable, ...)
        set_lora_deterministic(model, True)
        self.eval_graphdef = nnx.graphdef(model)
        set_lora_deterministic(model, False)
        self.num_trainable = sum(x.size for x in jax.tree.leaves(params))

        replicated = NamedSharding(mesh, PartitionSpec())
        param_sharding = state_shardings(params, mesh, DEFAULT_RULES)
        self.frozen_sharding = state_shardings(frozen, mesh, DEFAULT_RULES)
        by_path = {tuple(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(param_sharding)[0]}

        def opt_leaf_sharding(path, _):
            path = tuple(path)
            for start in range(len(path)):
                if path[start:] in by_path:  # adam moments mirror the params they belong to
                    return by_path[path[start:]]
            return replicated

        opt_sharding = jax.tree_util.tree_map_with_path(opt_leaf_sharding, jax.eval_shape(optimizer.init, params))
        self.state_sharding = {
            "params": param_sharding,
            "opt_state": opt_sharding,
            "step": replicated,
            "rng": replicated,
        }

        rows = batch_size // grad_accum
        self.train_batch_shape = (grad_accum, rows, seq_len)
        self.train_batch_sharding = named_sharding((None, "batch", "seq"), self.train_batch_shape, mesh, DEFAULT_RULES)
        self.eval_batch_shape = (batch_size, seq_len)
        self.eval_batch_sharding = named_sharding(("batch", "seq"), self.eval_batch_shape, mesh, DEFAULT_RULES)
        reference_sharding = param_sharding if reference else {}
        self._train = jax.jit(
            self._train_step(dropout),
            in_shardings=(self.state_sharding, self.frozen_sharding, reference_sharding, self.train_batch_sharding),
            out_shardings=(self.state_sharding, replicated),
            donate_argnums=0,
        )
        self._evaluate = jax.jit(
            self._eval_step(),
            in_shardings=(param_sharding, self.frozen_sharding, reference_sharding, self.eval_batch_sharding),
            out_shardings=replicated,
        )

    def init(self, model: Qwen2ForCausalLM, seed: int) -> tuple[TrainState, nnx.State]:
        """The train state at step 0 (the model's trainable variables, a fresh optimizer state, the
        rng of `seed`) and the frozen variables, placed on the mesh."""
        _, params, frozen = nnx.split(model, self.trainable, ...)
        state = {
            "params": params,
            "opt_state": jax.jit(self.optimizer.init)(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed)),
        }
        return jax.device_put(state, self.state_sharding), jax.device_put(frozen, self.frozen_sharding)

    def reference_of(self, state: TrainState) -> nnx.State:
        """A copy of the state's trainable variables to keep as the reference (with `reference=True`);
        call at step 0, before the optimizer changes them."""
        return jax.jit(lambda params: jax.tree.map(jnp.copy, params))(state["params"])

    def train(
        self, state: TrainState, frozen: nnx.State, build_rows: BuildRows, reference: nnx.State | None = None
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step on the global batch `build_rows` builds (each process builds only its
        own rows); `state` is donated. Returns the new state and the step's metrics: `STEP_METRICS`
        (the count under `count_name`) and the loss's own statistics."""
        return self._train(state, frozen, self._reference(reference), self.device_batch(build_rows))

    def evaluate(
        self, params: nnx.State, frozen: nnx.State, build_rows: BuildRows, reference: nnx.State | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """The loss's (sum, count) over one eval batch, without dropout."""
        total, count, _ = self.evaluate_statistics(params, frozen, build_rows, reference)
        return total, count

    def evaluate_statistics(
        self, params: nnx.State, frozen: nnx.State, build_rows: BuildRows, reference: nnx.State | None = None
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """The loss's (sum, count, `Statistics`) over one eval batch, without dropout."""
        batch = self.device_batch(build_rows, accumulate=False)
        return self._evaluate(params, frozen, self._reference(reference), batch)

    def _reference(self, reference: nnx.State | None) -> nnx.State | dict:
        if self.uses_reference and reference is None:
            raise ValueError("these steps compare with a reference: pass its variables (reference_of)")
        return reference if self.uses_reference else {}

    def model(self, params: nnx.State, frozen: nnx.State, *, deterministic: bool = True) -> Qwen2ForCausalLM:
        """The model with these parameters (a copy; adapters attached in LoRA mode)."""
        return nnx.merge(self.eval_graphdef if deterministic else self.graphdef, params, frozen, copy=True)

    def device_batch(self, build_rows: BuildRows, *, accumulate: bool = True) -> dict[str, jax.Array]:
        """A global batch on the mesh. `build_rows(rows)` returns the given rows of the batch: each
        process builds only the rows its devices hold, and `jax.make_array_from_process_local_data`
        joins them (every process builds every row when the batch axis is replicated).

        accumulate: shaped `[grad_accum, rows / grad_accum, T]` for the train step, else `[rows, T]`."""
        if accumulate:
            shape, sharding, row_axis = self.train_batch_shape, self.train_batch_sharding, 1
            accum, rows = shape[0], shape[1]
        else:
            shape, sharding, row_axis = self.eval_batch_shape, self.eval_batch_sharding, 0
            accum, rows = 1, shape[0]
        local = multihost.process_rows(sharding, shape, axis=row_axis)
        wanted = (np.arange(accum)[:, None] * rows + local[None, :]).reshape(-1)  # rows within the whole batch
        arrays = batch_arrays(build_rows(wanted), accum)
        if not accumulate:
            arrays = {name: value[0] for name, value in arrays.items()}
        return {name: multihost.global_array(sharding, shape, value) for name, value in arrays.items()}

    # ---------------------------------------------------------------- the traced functions
    def _call_loss(self, model: Qwen2ForCausalLM, micro, frozen, reference):
        """The loss on `model`, with the reference model when the steps use one; (sum, count, statistics)."""
        if not self.uses_reference:
            return _with_statistics(self.loss(model, micro))
        reference_model = nnx.merge(self.eval_graphdef, reference, frozen, copy=True)
        return _with_statistics(self.loss(model, micro, reference=reference_model))

    def _train_step(self, dropout: bool):
        graphdef, optimizer, schedule, call_loss = self.graphdef, self.optimizer, self.schedule, self._call_loss
        count_name = self.count_name

        def loss_and_count(params, frozen, reference, micro, key):
            model = nnx.merge(graphdef, params, frozen, copy=True)
            if dropout:
                set_lora_dropout_keys(model, key)
            loss, count, statistics = call_loss(model, micro, frozen, reference)
            return loss, (count, statistics)

        def train_step(state, frozen, reference, batch):
            params = state["params"]
            step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
            grad_fn = jax.value_and_grad(loss_and_count, has_aux=True)

            def micro_step(carry, xs):
                grads_sum, loss_sum, count_sum, statistics_sum = carry
                micro, index = xs
                (loss, (count, statistics)), grads = grad_fn(
                    params, frozen, reference, micro, jax.random.fold_in(step_key, index)
                )
                return (
                    jax.tree.map(jnp.add, grads_sum, grads),
                    loss_sum + loss,
                    count_sum + count,
                    jax.tree.map(jnp.add, statistics_sum, statistics),
                ), None

            accum = jax.tree.leaves(batch)[0].shape[0]
            first = jax.tree.map(lambda x: x[0], batch)
            if accum == 1:  # no accumulation loop: a smaller program that compiles faster
                (loss_sum, (count, statistics)), grads = grad_fn(params, frozen, reference, first, step_key)
            else:
                zeros = jax.tree.map(jnp.zeros_like, params)
                shapes = jax.eval_shape(loss_and_count, params, frozen, reference, first, step_key)[1][1]
                no_statistics = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
                init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), no_statistics)
                (grads, loss_sum, count, statistics), _ = jax.lax.scan(micro_step, init, (batch, jnp.arange(accum)))
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
                count_name: count,
                **{name: total / jnp.maximum(n, 1.0) for name, (total, n) in statistics.items()},
            }
            return new_state, metrics

        return train_step

    def _eval_step(self):
        eval_graphdef, call_loss = self.eval_graphdef, self._call_loss

        def eval_step(params, frozen, reference, batch):
            return call_loss(nnx.merge(eval_graphdef, params, frozen, copy=True), batch, frozen, reference)

        return eval_step
