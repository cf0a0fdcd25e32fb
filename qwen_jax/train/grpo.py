"""GRPO: group-relative advantages, the clipped surrogate loss, and its batch format (as TRL's GRPOTrainer).

A rollout batch holds `prompts x num_generations` completions; a prompt's completions are
consecutive rows (a group). Advantages (`group_advantages`, on the host after the reward functions
ran) are each completion's total reward minus its group's mean, divided by the group's standard
deviation (`scale_rewards="group"`), by the whole batch's (`"batch"`) or not at all (`"none"`, Dr.
GRPO); TRL's nan-aware rules for rewards that are `None`.

The loss (`grpo_loss`) is TRL's `_compute_loss` for the token-level importance ratio
`r = exp(logp - logp_old)`: per token `-min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A)`, plus
`beta * k3` with `k3 = exp(ref - logp) - (ref - logp) - 1` against the reference, reduced by
`loss_type`:
- `grpo`: each completion's token mean, averaged over completions;
- `bnpo`, `dapo`: the mean over every completion token of the batch (TRL's bnpo normalizes each
  micro-batch by its own tokens; here both normalize by the whole batch's, which is what dapo
  does and what bnpo does without gradient accumulation);
- `dr_grpo`: the token sum divided by completions x max_new_tokens.
Log-probabilities are of `logits / temperature`, as TRL computes them. With one policy update per
rollout (`num_iterations=1`) the old log-probabilities are the current ones with their gradient
stopped (r = 1, TRL's shortcut); with more, the trainer scores the rollout once with the rollout's
parameters before the first update (`old_logps`).

Rows (`GRPOBatch`, `seq_len` tokens): the prompt right-aligned before column
`seq_len - max_new_tokens`, where every completion starts (TRL left-pads its prompts the same way),
then padding; positions count from the prompt's first token. The loss covers the positions whose
next token is a completion token (`weights`); only the last `max_new_tokens + 1` positions can be
such, so the output head runs on those alone (`logits_to_keep`), not on the prompts and their padding.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.model.causal_lm import Qwen2ForCausalLM
from qwen_jax.ops.logprobs import token_logprobs

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")
# What the GRPO loss reports besides the loss (token means over the completion tokens).
# (kl only with beta > 0.)
GRPO_LOSS_METRICS = ("clip_ratio", "clip_ratio/low_mean", "clip_ratio/high_mean", "entropy", "logprob_diff", "kl")


# --------------------------------------------------------------------------- advantages
def _nanstd(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    """TRL's `nanstd`: the Bessel-corrected standard deviation of the non-NaN values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanstd(values, axis=axis, ddof=1)


def group_advantages(rewards: np.ndarray, num_generations: int, scale_rewards: str) -> tuple[np.ndarray, np.ndarray]:
    """Advantages `[N]` float32 of total rewards `[N]` (NaN: unscorable), groups of `num_generations`
    consecutive rows; and per row whether its group's (or the batch's) reward std is zero (TRL's
    `frac_reward_zero_std`). Unscorable rows get advantage 0."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale_rewards!r}")
    rewards = np.asarray(rewards, np.float32)
    groups = rewards.reshape(-1, num_generations)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.repeat(np.nanmean(groups, axis=1), num_generations)
    if scale_rewards == "batch":
        std = np.full_like(rewards, _nanstd(rewards) if rewards.size > 1 else 0.0)
    elif num_generations > 1:
        std = np.repeat(_nanstd(groups, axis=1), num_generations).astype(np.float32)
    else:
        std = np.zeros_like(rewards)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + np.float32(1e-4))
    zero_std = np.isclose(std, 0.0)
    return np.nan_to_num(advantages, nan=0.0).astype(np.float32), zero_std


# --------------------------------------------------------------------------- batch
@dataclasses.dataclass(frozen=True)
class GRPOBatch:
    """Rollout rows for the GRPO loss, every field `[rows, seq_len]` (`advantages` repeated along the row).

    input_ids / positions / segment_ids / targets: padding, prompt, completion, padding (padding: segment 0);
    weights: 1.0 where the next token (`targets`) is a completion token the loss covers;
    advantages: the row's advantage; old_logps: log-probabilities at the rollout's parameters
    (used when num_iterations > 1); ref_logps: under the reference (used when beta > 0);
    rollout_logps: what the engine reported while sampling (raw logits; for the logprob_diff metric)."""

    input_ids: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    advantages: np.ndarray
    old_logps: np.ndarray
    ref_logps: np.ndarray
    rollout_logps: np.ndarray

    def select(self, rows: np.ndarray) -> GRPOBatch:
        """The given rows (what `TrainSteps.device_batch` asks each process for)."""
        return GRPOBatch(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})

    def replace(self, **fields: np.ndarray) -> GRPOBatch:
        return dataclasses.replace(self, **fields)


def build_batch(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    rollout_logps: Sequence[Sequence[float]],
    advantages: np.ndarray,
    seq_len: int,
    max_new_tokens: int,
    loss_mask: np.ndarray | None = None,
) -> GRPOBatch:
    """Rows of `seq_len` tokens, completions starting at column `seq_len - max_new_tokens` (each prompt
    must fit before it, each completion after it).

    loss_mask: per row, False to leave the completion out of the loss (masked truncated completions)."""
    rows = len(completion_ids)
    shape = (rows, seq_len)
    input_ids = np.zeros(shape, np.int32)
    positions = np.zeros(shape, np.int32)
    segment_ids = np.zeros(shape, np.int32)
    targets = np.zeros(shape, np.int32)
    weights = np.zeros(shape, np.float32)
    rollout = np.zeros(shape, np.float32)
    completion_start = seq_len - max_new_tokens
    for row, (prompt, completion, logps) in enumerate(zip(prompt_ids, completion_ids, rollout_logps)):
        if len(prompt) > completion_start or len(completion) > max_new_tokens:
            raise ValueError(
                f"row {row}: a prompt of {len(prompt)} tokens and a completion of {len(completion)} do not fit "
                f"{completion_start} + {max_new_tokens} tokens"
            )
        tokens = [*prompt, *completion]
        start, end = completion_start - len(prompt), completion_start + len(completion)
        input_ids[row, start:end] = tokens
        positions[row, start:end] = np.arange(len(tokens))
        segment_ids[row, start:end] = 1
        targets[row, start : end - 1] = tokens[1:]
        first = completion_start - 1  # the position whose next token is the first completion token
        if loss_mask is None or loss_mask[row]:
            weights[row, first : end - 1] = 1.0
        rollout[row, first : first + len(logps)] = logps
    repeated = np.repeat(np.asarray(advantages, np.float32)[:, None], seq_len, axis=1)
    zeros = np.zeros(shape, np.float32)
    return GRPOBatch(input_ids, positions, segment_ids, targets, weights, repeated, zeros, zeros, rollout)


# --------------------------------------------------------------------------- loss
def token_logps_and_entropy(
    logits: jax.Array, targets: jax.Array, temperature: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per position: log p(target) of `logits / temperature`, the entropy of that distribution and
    log p(target) of the raw logits (what the engine reports), float32 `[B, T]` each."""
    logps, entropy = token_logprobs(logits, targets, temperature)
    if temperature == 1.0:
        return logps, entropy, logps
    raw, _ = token_logprobs(jax.lax.stop_gradient(logits), targets)
    return logps, entropy, raw


def forward_logits(model: Qwen2ForCausalLM, batch: dict[str, jax.Array], keep: int) -> jax.Array:
    """Logits `[B, keep, V]` of the last `keep` positions of rollout rows (padding is its own segment)."""
    ones = jnp.ones_like(batch["input_ids"])
    return model.forward(
        batch["input_ids"], batch["positions"], ones, segment_ids=batch["segment_ids"], logits_to_keep=keep
    )


def _last(batch: dict[str, jax.Array], keep: int) -> dict[str, jax.Array]:
    return {name: value[:, -keep:] for name, value in batch.items()}


def surrogate_terms(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    *,
    epsilon_low: float,
    epsilon_high: float,
    beta: float,
    ref_logps: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """Per token: the loss, the importance ratio and the k3 KL against the reference (None without beta)."""
    ratio = jnp.exp(logps - old_logps)
    clipped = jnp.clip(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -jnp.minimum(ratio * advantages, clipped * advantages)
    kl = None
    if beta != 0.0:
        delta = ref_logps - logps
        kl = jnp.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    return per_token, ratio, kl


def reduce_loss(
    per_token: jax.Array, mask: jax.Array, loss_type: str, max_new_tokens: int
) -> tuple[jax.Array, jax.Array]:
    """(summed loss, the count it averages over) of one micro-batch, by `loss_type` (module docstring);
    sums and counts of micro-batches add up to the whole batch's loss."""
    masked = per_token * mask
    if loss_type == "grpo":
        per_row = jnp.sum(masked, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
        return jnp.sum(per_row), jnp.asarray(per_token.shape[0], jnp.float32)
    if loss_type == "dr_grpo":
        return jnp.sum(masked), jnp.asarray(per_token.shape[0] * max_new_tokens, jnp.float32)
    if loss_type in ("dapo", "bnpo"):
        return jnp.sum(masked), jnp.sum(mask)
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


@dataclasses.dataclass(frozen=True)
class GRPOLoss:
    """The GRPO objective as a `step.Loss` (with metrics): `(model, micro-batch) -> (sum, count, metrics)`.

    `metrics` (`step.Statistics`) maps each of `GRPO_LOSS_METRICS` (kl only with beta > 0) to a
    (sum, count) pair over completion tokens."""

    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    temperature: float = 1.0
    max_new_tokens: int = 256
    num_iterations: int = 1

    def from_logits(
        self, logits: jax.Array, batch: dict[str, jax.Array]
    ) -> tuple[jax.Array, jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
        """The loss of rows whose logits are given (what `__call__` computes after the forward)."""
        mask = batch["weights"]
        logps, entropy, raw_logps = token_logps_and_entropy(logits, batch["targets"], self.temperature)
        old = jax.lax.stop_gradient(logps) if self.num_iterations == 1 else batch["old_logps"]
        advantages = batch["advantages"]
        per_token, ratio, kl = surrogate_terms(
            logps,
            old,
            advantages,
            epsilon_low=self.epsilon,
            epsilon_high=self.epsilon_high,
            beta=self.beta,
            ref_logps=batch["ref_logps"] if self.beta != 0.0 else None,
        )
        total, count = reduce_loss(per_token, mask, self.loss_type, self.max_new_tokens)
        tokens = jnp.sum(mask)
        low = ((ratio < 1 - self.epsilon) & (advantages < 0)).astype(jnp.float32)
        high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).astype(jnp.float32)

        def token_sum(x):
            return jax.lax.stop_gradient(jnp.sum(x * mask)), tokens

        metrics = {
            "clip_ratio": token_sum(jnp.maximum(low, high)),
            "clip_ratio/low_mean": token_sum(low),
            "clip_ratio/high_mean": token_sum(high),
            "entropy": token_sum(entropy),
            "logprob_diff": token_sum(jnp.abs(raw_logps - batch["rollout_logps"])),
        }
        if kl is not None:
            metrics["kl"] = token_sum(kl)
        return total, count, metrics

    def __call__(
        self, model: Qwen2ForCausalLM, batch: dict[str, jax.Array]
    ) -> tuple[jax.Array, jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
        keep = self.max_new_tokens + 1
        return self.from_logits(forward_logits(model, batch, keep), _last(batch, keep))


def scored_logps(
    model: Qwen2ForCausalLM, batch: dict[str, jax.Array], temperature: float, max_new_tokens: int
) -> jax.Array:
    """Log-probabilities `[B, T]` of the targets under `model` at `temperature` (old and reference
    log-probs), computed on the last `max_new_tokens + 1` positions (zeros before them)."""
    keep = max_new_tokens + 1
    logits = forward_logits(model, batch, keep)
    logps, _, _ = token_logps_and_entropy(logits, batch["targets"][:, -keep:], temperature)
    return jnp.pad(logps, ((0, 0), (batch["targets"].shape[1] - keep, 0)))
