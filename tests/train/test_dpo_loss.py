"""The DPO loss (`qwen_jax.train.dpo`) against TRL's: TRL 1.16's `DPOTrainer._compute_loss` runs on the
same per-token log-probabilities (a stand-in model hands them over), float32; its loss, its gradient
with respect to those log-probabilities and its logged metrics are the oracle, for every loss type.
On a tiny model the whole objective (policy forward, reference = adapters off) has the parameter
gradient that TRL's log-probability gradient gives through the model."""

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_fixtures import TINY_MODEL

from qwen_jax import Qwen2Config, create_model
from qwen_jax.model.lora import LoRAConfig, LoRAParam, adapters_disabled, apply_lora, lora_modules
from qwen_jax.train.dpo import METRICS, DPOLoss, pair_losses, pair_statistics, token_logps

torch = pytest.importorskip("torch")
dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")

PAIRS, LENGTH = 4, 9
CASES = [("sigmoid", 0.1, 0.0), ("hinge", 0.5, 0.0), ("ipo", 0.2, 0.0), ("robust", 0.1, 0.2)]


def _trl(per_token, mask, ref_chosen, ref_rejected, *, beta, loss_type, label_smoothing):
    """TRL's loss, its gradient wrt the per-token log-probabilities `[2P, T-1]`, and its metrics."""
    logps = torch.tensor(np.asarray(per_token), requires_grad=True)
    completion_mask = torch.tensor(np.asarray(mask))

    class Model:
        training = True

        def __call__(self, **_):
            zeros = torch.zeros(logps.shape)
            # TRL's fused head returns the labels' log-probabilities, 0 where the label is -100
            return types.SimpleNamespace(
                log_probs=logps * completion_mask[:, 1:],
                entropy=zeros,
                mean_logits=zeros,
                is_top1=zeros.bool(),
            )

    trainer = types.SimpleNamespace(
        model=Model(),
        accelerator=types.SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(mask.shape, dtype=torch.long),
        "attention_mask": torch.ones(mask.shape, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.tensor(np.asarray(ref_chosen)),
        "ref_rejected_logps": torch.tensor(np.asarray(ref_rejected)),
    }
    loss = dpo_trainer.DPOTrainer._compute_loss(trainer, trainer.model, inputs, False)
    loss.backward()
    metrics = {name: trainer._metrics["train"][name][0] for name in METRICS}
    return float(loss.detach()), logps.grad.numpy(), metrics


def _batch(seed: int):
    """Per-token log-probabilities, a completion mask (prompts of 2-4 tokens, completions of various
    lengths, right padding) and reference sequence log-probabilities, float32."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((2 * PAIRS, LENGTH), np.int64)
    for row in range(2 * PAIRS):
        start, stop = rng.integers(2, 5), rng.integers(5, LENGTH + 1)
        mask[row, start:stop] = 1
    per_token = (-rng.exponential(1.0, (2 * PAIRS, LENGTH - 1))).astype(np.float32)
    ref = (-rng.exponential(4.0, 2 * PAIRS)).astype(np.float32)
    return per_token, mask, ref[:PAIRS], ref[PAIRS:]


def _ours(per_token, mask, ref_chosen, ref_rejected, *, beta, loss_type, label_smoothing):
    weights = jnp.asarray(mask[:, 1:], jnp.float32)  # the target of position t is token t+1

    def mean_loss(per_token):
        logps = jnp.sum(per_token * weights, axis=-1)
        tokens = jnp.sum(weights, axis=-1)
        losses = pair_losses(
            logps[:PAIRS],
            logps[PAIRS:],
            ref_chosen,
            ref_rejected,
            tokens[:PAIRS],
            tokens[PAIRS:],
            beta=beta,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
        )
        return jnp.mean(losses), logps

    (loss, logps), grad = jax.value_and_grad(mean_loss, has_aux=True)(jnp.asarray(per_token))
    sums = pair_statistics(logps[:PAIRS], logps[PAIRS:], ref_chosen, ref_rejected, jnp.ones(PAIRS), beta=beta)
    return float(loss), np.asarray(grad), {name: float(value) / PAIRS for name, value in sums.items()}


@pytest.mark.parametrize("loss_type,beta,label_smoothing", CASES)
def test_loss_gradient_and_metrics_equal_trl(loss_type, beta, label_smoothing):
    settings = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    for seed in (0, 1):
        batch = _batch(seed)
        trl_loss, trl_grad, trl_metrics = _trl(*batch, **settings)
        loss, grad, metrics = _ours(*batch, **settings)
        assert abs(trl_loss) > 1e-3 and np.abs(trl_grad).max() > 1e-4  # a case with something to compare
        np.testing.assert_allclose(loss, trl_loss, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grad, trl_grad, rtol=1e-5, atol=1e-6)
        for name in METRICS:
            np.testing.assert_allclose(metrics[name], trl_metrics[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_model_gradient_is_trls_through_the_model():
    """DPOLoss on a tiny LoRA model (reference = adapters off): its adapter gradient equals TRL's
    log-probability gradient pulled back through the model's per-token log-probabilities."""
    config = Qwen2Config(**{**TINY_MODEL, "vocab_size": 48})
    model = create_model(config, dtype=jnp.float32, param_dtype=jnp.float32, seed=3)
    apply_lora(model, LoRAConfig(rank=4, targets=("q_proj", "v_proj", "down_proj")), seed=0)
    for lora in lora_modules(model):  # B starts at 0; make the policy differ from the reference
        lora.lora_b.set_value(0.3 * jax.random.normal(jax.random.key(1), lora.lora_b.shape))
    _, mask, _, _ = _batch(2)
    rng = np.random.default_rng(5)
    ids = rng.integers(1, config.vocab_size, (2 * PAIRS, LENGTH)).astype(np.int32)
    ids[:PAIRS, :2] = ids[PAIRS:, :2]  # shared prompt start
    targets = np.concatenate([ids[:, 1:], np.zeros((2 * PAIRS, 1), np.int32)], axis=1)
    weights = np.concatenate([mask[:, 1:], np.zeros((2 * PAIRS, 1))], axis=1).astype(np.float32)
    batch = {
        "chosen_ids": ids[:PAIRS],
        "chosen_targets": targets[:PAIRS],
        "chosen_weights": weights[:PAIRS],
        "rejected_ids": ids[PAIRS:],
        "rejected_targets": targets[PAIRS:],
        "rejected_weights": weights[PAIRS:],
    }
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    graphdef, params, rest = nnx.split(model, LoRAParam, ...)

    def policy_tokens(params):
        return token_logps(nnx.merge(graphdef, params, rest), jnp.asarray(ids), jnp.asarray(targets))[:, :-1]

    with adapters_disabled(model):
        reference = np.asarray(nnx.jit(token_logps)(model, jnp.asarray(ids), jnp.asarray(targets)))
    ref_sums = np.sum(reference * weights, axis=-1)
    per_token = jax.jit(policy_tokens)(params)
    pullback = jax.jit(lambda params, cotangent: jax.vjp(policy_tokens, params)[1](cotangent)[0])
    for loss_type, beta, label_smoothing in (CASES[2],):  # ipo: uses the completion lengths too
        settings = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
        trl_loss, trl_grad, _ = _trl(np.asarray(per_token), mask, ref_sums[:PAIRS], ref_sums[PAIRS:], **settings)
        expected = pullback(params, jnp.asarray(trl_grad))

        def mean_loss(params, settings=settings):
            total, count, _ = DPOLoss(**settings)(nnx.merge(graphdef, params, rest), batch)
            return total / count

        loss, grads = jax.jit(jax.value_and_grad(mean_loss))(params)
        np.testing.assert_allclose(float(loss), trl_loss, rtol=1e-5, atol=1e-6)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
            assert np.abs(want).max() > 0
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
