"""Direct preference optimization (DPO): the loss, its metrics, and the batches it trains on.

A preference pair is a prompt with a chosen and a rejected completion (`data.preference`
tokenizes them). The policy's sequence log-probability of each completion (summed over its
tokens, given the prompt) is compared with the reference's; with the log-ratios
`c = logp(chosen) - ref_logp(chosen)` and `r = logp(rejected) - ref_logp(rejected)` and
`delta = c - r`, the per-pair losses are TRL's (`DPOTrainer`, TRL 1.16):

- sigmoid: `-log sigmoid(beta * delta)` (the DPO paper);
- hinge: `relu(1 - beta * delta)` (SLiC);
- ipo: `(c / n_c - r / n_r - 1 / (2 beta))^2`, n = completion tokens (IPO, length-normalised as TRL);
- robust: `(-(1 - e) log sigmoid(beta delta) + e log sigmoid(-beta delta)) / (1 - 2e)`, e = label_smoothing.

The loss of a batch is the mean over its pairs. Metrics, as TRL names them, means over the pairs:
`rewards/chosen` (beta * c), `rewards/rejected` (beta * r), `rewards/accuracies` (chosen reward >
rejected reward), `rewards/margins`, `logps/chosen`, `logps/rejected` (the policy's).

The reference: the model with its LoRA adapters switched off (`model.lora.adapters_disabled`;
no second copy), or, for full fine-tuning, a frozen copy of the starting parameters
(`TrainSteps(reference=True)`), or per-token log-probabilities computed once before training
(`--precompute-ref-logprobs`; they ride in the batch).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qwen_jax.model.causal_lm import Qwen2ForCausalLM
from qwen_jax.model.lora import adapters_disabled
from qwen_jax.train import multihost
from qwen_jax.train.config import TrainConfig
from qwen_jax.train.data.preference import PreferenceLoader
from qwen_jax.train.step import TrainSteps, token_losses

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def token_logps(model: Qwen2ForCausalLM, ids: jax.Array, targets: jax.Array) -> jax.Array:
    """Log-probability `[B, T]` (float32) of each target token given the tokens up to it."""
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    # Right padding only: causal attention keeps the padding out of every real token's view.
    logits = model.forward(ids, positions, jnp.ones_like(ids))
    return -token_losses(logits, targets)


def pair_losses(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    chosen_tokens: jax.Array,
    rejected_tokens: jax.Array,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """The DPO loss of each pair `[P]` from sequence log-probabilities `[P]` (see the module docstring);
    `*_tokens`: completion tokens of each sequence (the IPO normalisation)."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        return -jax.nn.log_sigmoid(beta * delta)
    if loss_type == "hinge":
        return jax.nn.relu(1.0 - beta * delta)
    if loss_type == "ipo":
        per_token = chosen_ratio / jnp.maximum(chosen_tokens, 1.0) - rejected_ratio / jnp.maximum(rejected_tokens, 1.0)
        return (per_token - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "robust":
        clean = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * delta)
        flipped = -label_smoothing * jax.nn.log_sigmoid(-beta * delta)
        return (clean - flipped) / (1.0 - 2.0 * label_smoothing)
    raise ValueError(f"unknown DPO loss type {loss_type!r}; choose from {', '.join(LOSS_TYPES)}")


def pair_statistics(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    valid: jax.Array,
    *,
    beta: float,
) -> dict[str, jax.Array]:
    """The `METRICS` summed over the valid pairs (divide by their count for TRL's means); no gradient."""
    chosen_logps, rejected_logps = jax.lax.stop_gradient((chosen_logps, rejected_logps))
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    per_pair = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": chosen_logps,
        "logps/rejected": rejected_logps,
    }
    return {name: jnp.sum(value * valid) for name, value in per_pair.items()}


@dataclasses.dataclass(frozen=True)
class DPOLoss:
    """The DPO objective as a `step.Loss` over `PreferenceBatch` micro-batches: (summed pair losses,
    pairs, `METRICS` as `step.Statistics`: each (its sum over the pairs, pairs)). The reference is
    `reference` (a model) when given, else the batch's precomputed log-probabilities when
    `precomputed`, else `model` with its adapters off."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    precomputed: bool = False

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown DPO loss type {self.loss_type!r}; choose from {', '.join(LOSS_TYPES)}")

    def __call__(
        self, model: Qwen2ForCausalLM, batch: dict[str, jax.Array], reference: Qwen2ForCausalLM | None = None
    ) -> tuple[jax.Array, jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
        ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]])  # one forward for both
        targets = jnp.concatenate([batch["chosen_targets"], batch["rejected_targets"]])
        weights = jnp.concatenate([batch["chosen_weights"], batch["rejected_weights"]])
        logps = jnp.sum(token_logps(model, ids, targets) * weights, axis=-1)
        if self.precomputed:
            ref_tokens = jnp.concatenate([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
        elif reference is not None:
            ref_tokens = token_logps(reference, ids, targets)
        else:
            with adapters_disabled(model):
                ref_tokens = token_logps(model, ids, targets)
        ref_logps = jax.lax.stop_gradient(jnp.sum(ref_tokens * weights, axis=-1))
        pairs = batch["chosen_ids"].shape[0]
        chosen_logps, rejected_logps = logps[:pairs], logps[pairs:]
        ref_chosen, ref_rejected = ref_logps[:pairs], ref_logps[pairs:]
        chosen_tokens = jnp.sum(batch["chosen_weights"], axis=-1)
        rejected_tokens = jnp.sum(batch["rejected_weights"], axis=-1)
        valid = (chosen_tokens > 0).astype(jnp.float32)  # padding pairs count for nothing
        losses = pair_losses(
            chosen_logps,
            rejected_logps,
            ref_chosen,
            ref_rejected,
            chosen_tokens,
            rejected_tokens,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
        )
        sums = pair_statistics(chosen_logps, rejected_logps, ref_chosen, ref_rejected, valid, beta=self.beta)
        pair_count = jnp.sum(valid)
        return jnp.sum(losses * valid), pair_count, {name: (total, pair_count) for name, total in sums.items()}

    def reference_logps(self, model: Qwen2ForCausalLM, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The reference's per-token log-probabilities of a batch (`ref_chosen_logps`, `ref_rejected_logps`,
        each `[pairs, seq_len]`, zero off the completions), `model` being the reference (adapters
        switched off here when it has any)."""
        with adapters_disabled(model):
            return {
                f"ref_{side}_logps": token_logps(model, batch[f"{side}_ids"], batch[f"{side}_targets"])
                * batch[f"{side}_weights"]
                for side in ("chosen", "rejected")
            }


# --------------------------------------------------------------------------- precomputed reference
def reference_digest(config: TrainConfig) -> str:
    """What decides the reference log-probabilities besides the tokens: the starting model (its
    directory's files with sizes and modification times) and the numerics settings."""
    files = []
    if config.model and os.path.isdir(config.model):
        for name in sorted(os.listdir(config.model)):
            path = os.path.join(config.model, name)
            if os.path.isfile(path):
                files.append([name, os.path.getsize(path), os.stat(path).st_mtime_ns])
    settings = {
        "model": os.path.abspath(config.model) if config.model else None,
        "files": files,
        **{k: getattr(config, k) for k in ("seq_len", "quantize", "compute_dtype", "param_dtype", "attention")},
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def precompute_reference(
    steps: TrainSteps,
    params: nnx.State,
    frozen: nnx.State,
    loader: PreferenceLoader,
    path: str,
    *,
    log: Callable[[str], None],
) -> Callable[[int, int], np.ndarray]:
    """The reference's per-target log-probabilities of every example of `loader`'s data, computed
    with the model of `params` (the starting parameters; adapters off) and cached at `path` (float32,
    each example's first `min(length, seq_len) - 1` targets end to end); reused when it exists.
    Returns `reference(example, n)`, the first n of an example. Call on every process."""
    lengths = np.maximum(np.minimum(loader.store.lengths, loader.seq_len) - 1, 0)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    with multihost.all_or_none("looking up the precomputed reference log-probabilities"):
        exists = os.path.exists(path)
    if not exists:
        values = np.zeros(int(offsets[-1]), np.float32)
        every_pair = PreferenceLoader(loader.store, loader.seq_len, loader.batch_rows, shuffle=False)
        program = jax.jit(
            lambda params, frozen, batch: steps.loss.reference_logps(steps.model(params, frozen), batch),
            out_shardings=NamedSharding(steps.train_batch_sharding.mesh, PartitionSpec()),
        )
        for index in range(every_pair.batches_in_epoch(0)):
            batch = steps.device_batch(functools.partial(every_pair.batch, 0, index), accumulate=False)
            result = jax.device_get(program(params, frozen, batch))
            for row, pair in enumerate(every_pair.pair_indices(0, index)):
                if pair is None:
                    continue
                for offset, side in ((0, "chosen"), (1, "rejected")):
                    example = 2 * pair + offset
                    n = lengths[example]
                    values[offsets[example] : offsets[example] + n] = result[f"ref_{side}_logps"][row, :n]
        with multihost.all_or_none("writing the precomputed reference log-probabilities"):
            if multihost.is_primary():
                values.tofile(path + ".partial")
                os.replace(path + ".partial", path)
        log(f"reference log-probabilities of {len(every_pair.kept)} pairs cached in {path}")
    stored = np.memmap(path, dtype=np.float32, mode="r", shape=(int(offsets[-1]),)) if offsets[-1] else np.zeros(0)
    return lambda example, n: np.asarray(stored[offsets[example] : offsets[example] + n])
