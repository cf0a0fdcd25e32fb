"""`ops.logprobs.token_logprobs`: the training losses' log-probabilities and entropy, with a written-out
gradient. The oracle is torch in float64 (log_softmax, its gather and the entropy, through autograd)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qwen_jax.ops.logprobs import token_logprobs


def _torch_reference(logits, targets, temperature, d_logps, d_entropy):
    """(logps, entropy, d loss / d logits) in float64 for loss = sum(d_logps·logps + d_entropy·entropy)."""
    z = torch.tensor(np.asarray(logits, np.float64), requires_grad=True)
    log_probs = torch.log_softmax(z / temperature, dim=-1)
    logps = torch.gather(log_probs, -1, torch.tensor(np.asarray(targets))[..., None].long())[..., 0]
    probs = log_probs.exp()
    entropy = -torch.sum(torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)), dim=-1)
    loss = torch.sum(logps * torch.tensor(d_logps, dtype=torch.float64))
    loss = loss + torch.sum(entropy * torch.tensor(d_entropy, dtype=torch.float64))
    loss.backward()
    return logps.detach().numpy(), entropy.detach().numpy(), z.grad.numpy()


def _ours(logits, targets, temperature, d_logps, d_entropy):
    def loss(x):
        logps, entropy = token_logprobs(x, targets, temperature)
        return jnp.sum(logps * d_logps) + jnp.sum(entropy * d_entropy), (logps, entropy)

    (_, (logps, entropy)), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(logits)
    return np.asarray(logps), np.asarray(entropy), np.asarray(grad)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("vocab", [1000, 151_936])  # a small vocabulary and Qwen2.5's
def test_values_and_gradient_equal_torch_float64(temperature, vocab):
    rng = np.random.default_rng(vocab)
    shape = (2, 3)
    logits = (rng.standard_normal((*shape, vocab)) * 3).astype(np.float32)
    targets = rng.integers(0, vocab, shape).astype(np.int32)
    targets[0, 0] = int(np.argmax(logits[0, 0]))  # a likely token beside unlikely ones
    d_logps, d_entropy = rng.standard_normal(shape), rng.standard_normal(shape)
    want = _torch_reference(logits, targets, temperature, d_logps, d_entropy)
    got = _ours(jnp.asarray(logits), jnp.asarray(targets), temperature, jnp.asarray(d_logps), jnp.asarray(d_entropy))
    for name, ours, reference in zip(("logps", "entropy", "gradient"), got, want):
        assert ours.dtype == np.float32, name
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=2e-6, err_msg=name)


def test_masked_tokens_get_no_probability_and_no_gradient():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 50)).astype(np.float32)
    logits[0, 10:] = -np.inf  # a filtered row: ten tokens left
    logits[1, 1:] = -np.inf  # one token left: probability 1
    targets = np.array([3, 0], np.int32)
    d_logps, d_entropy = np.array([1.0, -2.0]), np.array([0.5, 0.25])
    logps, entropy, grad = _ours(jnp.asarray(logits), jnp.asarray(targets), 1.0, d_logps, d_entropy)
    want = _torch_reference(np.where(np.isinf(logits), -1e30, logits), targets, 1.0, d_logps, d_entropy)
    assert np.all(np.isfinite(logps)) and np.all(np.isfinite(entropy)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(logps, want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(entropy, want[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, want[2], rtol=1e-5, atol=1e-6)
    assert logps[1] == 0.0 and entropy[1] == 0.0 and np.all(grad[0, 10:] == 0) and np.all(grad[1] == 0)


def test_bfloat16_logits_give_float32_values_and_a_bfloat16_gradient():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((4, 2048)) * 2, jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, 2048, 4), jnp.int32)
    ones = jnp.ones(4)
    logps, entropy, grad = _ours(logits, targets, 1.0, ones, ones)
    want = _torch_reference(np.asarray(logits.astype(jnp.float32)), targets, 1.0, np.ones(4), np.ones(4))
    assert logps.dtype == np.float32 and grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(logps, want[0], rtol=1e-5, atol=1e-5)  # computed in float32 from the bf16 values
    np.testing.assert_allclose(entropy, want[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad, np.float32), want[2], rtol=1e-2, atol=1e-3)


def test_the_gradient_is_one_pass_without_a_scatter():
    # Autodiff of take_along_axis(log_softmax(x)) scatters into a zero-filled [..., vocab] array.
    logits = jnp.zeros((4, 8, 1000))
    targets = jnp.zeros((4, 8), jnp.int32)

    def loss(x):
        return jnp.sum(token_logprobs(x, targets)[0])

    text = jax.jit(jax.grad(loss)).lower(logits).compile().as_text()
    reference = jax.jit(jax.grad(lambda x: jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(x), targets[..., None], -1))))
    assert re.search(r"\bscatter\(", reference.lower(logits).compile().as_text())  # what the check would catch
    assert not re.search(r"\bscatter\(", text)  # the op, not a name in the metadata


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(jnp.zeros((1, 4)), jnp.zeros((1,), jnp.int32), 0.0)
