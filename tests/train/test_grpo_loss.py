"""GRPO advantages and loss against TRL's GRPOTrainer on a fixed batch (float32, <= 1e-5)."""

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import entropy_from_logits, nanstd, selective_log_softmax

from qwen_jax.config import Qwen2Config
from qwen_jax.model.causal_lm import Qwen2ForCausalLM
from qwen_jax.train.grpo import (
    GRPOLoss,
    build_batch,
    forward_logits,
    group_advantages,
    scored_logps,
    token_logps_and_entropy,
)

VOCAB, SEQ_LEN, MAX_NEW = 11, 12, 5
PROMPTS = [[1, 2, 3], [4, 5], [1, 2, 3], [4, 5], [6, 7, 8, 9], [3], [6, 7, 8, 9], [3]]
COMPLETIONS = [[2, 3, 4], [5, 6, 7, 8, 9], [1], [2, 2], [3, 4, 5, 6], [7, 8, 9, 1, 2], [10], [4, 4, 4]]


def _trl_advantages(rewards: np.ndarray, num_generations: int, scale_rewards: str) -> tuple[np.ndarray, np.ndarray]:
    """The lines of TRL's `_generate_and_score_completions` ("sum_then_normalize") that turn the total
    rewards into advantages; they are inline in that method (it also generates), so they are copied
    here verbatim, with TRL's own `nanstd`."""
    rewards = torch.tensor(rewards)
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    else:
        std_rewards = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    return torch.nan_to_num(advantages, nan=0.0).numpy(), is_std_zero.numpy()


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_match_trl(scale_rewards):
    rewards = np.array([1.0, 0.0, 0.5, np.nan, 2.0, 2.0, -1.0, 3.0, 0.25, np.nan, np.nan, np.nan], np.float32)
    ours, zero_std = group_advantages(rewards, 4, scale_rewards)
    theirs, theirs_zero = _trl_advantages(rewards, 4, scale_rewards)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(zero_std, theirs_zero)
    equal_group = np.array([1.0, 1.0, 2.0, 0.0], np.float32)
    assert group_advantages(equal_group, 2, scale_rewards)[1].tolist() == (
        [True, True, False, False] if scale_rewards != "batch" else [False] * 4
    )


def _completion_positions(completion_len: int, width: int) -> np.ndarray:
    """Positions of the logits that predict a completion's tokens (completions start at column
    SEQ_LEN - MAX_NEW), padded with the last one to `width`."""
    first = SEQ_LEN - MAX_NEW - 1
    positions = np.arange(first, first + completion_len)
    return np.concatenate([positions, np.full(width - completion_len, positions[-1])])


def _trl_loss(logits, batch, *, loss_type, beta, epsilon, epsilon_high, temperature, old, ref):
    """TRL's `GRPOTrainer._compute_loss` on this batch, its forward replaced by the given logits."""
    rows = len(COMPLETIONS)
    width = max(len(c) for c in COMPLETIONS)
    gather = np.stack([_completion_positions(len(c), width) for c in COMPLETIONS])
    completion_ids = torch.tensor([c + [0] * (width - len(c)) for c in COMPLETIONS])
    mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in COMPLETIONS])
    row_index = np.arange(rows)[:, None]
    picked = torch.from_numpy(np.asarray(logits))[row_index, gather]  # [rows, width, vocab]
    picked.requires_grad_(True)

    def per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        scaled = picked / temperature
        return selective_log_softmax(scaled, completion_ids), entropy_from_logits(scaled), None

    accelerator = types.SimpleNamespace(
        num_processes=1,
        reduce=lambda tensor, reduction: tensor,
        gather=lambda tensor: tensor,
        gather_for_metrics=lambda tensor: tensor,
    )
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token_logps_and_entropies,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=epsilon,
        epsilon_high=epsilon_high,
        use_vllm=False,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        accelerator=accelerator,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        max_completion_length=MAX_NEW,
        _metrics={"train": collections.defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.zeros((rows, 1), dtype=torch.long),
        "prompt_mask": torch.ones((rows, 1), dtype=torch.long),
        "completion_ids": completion_ids,
        "completion_mask": mask,
        "advantages": torch.from_numpy(np.asarray(batch.advantages[:, 0])),
        "num_items_in_batch": mask.sum(),
    }
    if old is not None:
        inputs["old_per_token_logps"] = torch.from_numpy(old[row_index, gather])
    if beta:
        inputs["ref_per_token_logps"] = torch.from_numpy(ref[row_index, gather])
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    grad = np.zeros_like(np.asarray(logits))
    valid = mask.numpy().astype(bool)
    grad[row_index.repeat(width, 1)[valid], gather[valid]] = picked.grad.numpy()[valid]
    return float(loss.detach()), grad, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize(
    "loss_type,beta,num_iterations,temperature",
    [("dapo", 0.0, 1, 1.0), ("grpo", 0.04, 2, 0.7), ("dr_grpo", 0.0, 2, 1.0), ("bnpo", 0.1, 1, 1.3)],
)
def test_loss_and_gradient_match_trl(loss_type, beta, num_iterations, temperature):
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=len(COMPLETIONS)).astype(np.float32)
    advantages, _ = group_advantages(rewards, 2, "group")
    empty = [[0.0] * len(c) for c in COMPLETIONS]
    batch = build_batch(PROMPTS, COMPLETIONS, empty, advantages, SEQ_LEN, MAX_NEW)
    logits = rng.normal(size=(len(COMPLETIONS), SEQ_LEN, VOCAB)).astype(np.float32)
    # Old and reference log-probabilities near the current ones, so that some ratios clip and some do not.
    scaled = jax.nn.log_softmax(jnp.asarray(logits) / temperature, axis=-1)
    current = np.asarray(jnp.take_along_axis(scaled, jnp.asarray(batch.targets)[..., None], axis=-1)[..., 0])
    old = (current + rng.normal(scale=0.3, size=current.shape)).astype(np.float32)
    ref = (current + rng.normal(scale=0.3, size=current.shape)).astype(np.float32)
    batch = batch.replace(old_logps=old, ref_logps=ref)
    loss = GRPOLoss(
        loss_type=loss_type,
        epsilon=0.2,
        epsilon_high=0.28,
        beta=beta,
        temperature=temperature,
        max_new_tokens=MAX_NEW,
        num_iterations=num_iterations,
    )
    arrays = {name: jnp.asarray(getattr(batch, name)) for name in batch.__dataclass_fields__}

    def mean_loss(x):
        total, count, _ = loss.from_logits(x, arrays)
        return total / count

    ours, our_grad = jax.value_and_grad(mean_loss)(jnp.asarray(logits))
    _, _, metrics = loss.from_logits(jnp.asarray(logits), arrays)
    theirs, their_grad, their_metrics = _trl_loss(
        logits,
        batch,
        loss_type=loss_type,
        beta=beta,
        epsilon=0.2,
        epsilon_high=0.28,
        temperature=temperature,
        old=old if num_iterations > 1 else None,
        ref=ref,
    )
    np.testing.assert_allclose(float(ours), theirs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(our_grad), their_grad, rtol=0, atol=1e-5)
    assert float(ours) != 0.0 or num_iterations == 1  # a batch that exercises the ratio
    for ours_name, trl_name in [
        ("entropy", "entropy"),
        ("clip_ratio", "clip_ratio/region_mean"),
        ("clip_ratio/low_mean", "clip_ratio/low_mean"),
        ("clip_ratio/high_mean", "clip_ratio/high_mean"),
    ] + ([("kl", "kl")] if beta else []):
        total, count = metrics[ours_name]
        np.testing.assert_allclose(float(total / count), their_metrics[trl_name], rtol=0, atol=1e-5)
    if num_iterations > 1:
        assert their_metrics["clip_ratio/region_mean"] > 0  # the clipped branch is exercised


def test_loss_on_the_last_positions_equals_the_loss_on_every_position():
    """The model's loss runs the output head on the completion window only (left-padded prompts); it
    equals `from_logits` on the logits of every position, and `scored_logps` gives those log-probs."""
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = Qwen2ForCausalLM(config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    advantages, _ = group_advantages(np.arange(len(COMPLETIONS), dtype=np.float32), 2, "group")
    batch = build_batch(PROMPTS, COMPLETIONS, [[0.0] * len(c) for c in COMPLETIONS], advantages, SEQ_LEN, MAX_NEW)
    arrays = {name: jnp.asarray(getattr(batch, name)) for name in batch.__dataclass_fields__}
    loss = GRPOLoss(loss_type="grpo", temperature=0.8, max_new_tokens=MAX_NEW)
    total, count, _ = loss(model, arrays)
    full_logits = forward_logits(model, arrays, 0)
    full_total, full_count, _ = loss.from_logits(full_logits, arrays)
    np.testing.assert_allclose(float(total), float(full_total), rtol=1e-6)
    assert float(count) == float(full_count) == len(COMPLETIONS)
    expected, _, _ = token_logps_and_entropy(full_logits, arrays["targets"], 0.8)
    mask = batch.weights > 0
    scored = np.asarray(scored_logps(model, arrays, 0.8, MAX_NEW))
    np.testing.assert_allclose(scored[mask], np.asarray(expected)[mask], atol=1e-6)
    # Each prompt ends right before column SEQ_LEN - MAX_NEW, where its completion starts.
    for row, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        start = SEQ_LEN - MAX_NEW
        assert batch.input_ids[row, start - len(prompt) : start + len(completion)].tolist() == prompt + completion
        assert batch.positions[row, start - len(prompt)] == 0 and mask[row].sum() == len(completion)
