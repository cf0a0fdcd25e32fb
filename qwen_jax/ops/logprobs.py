"""Log-probabilities of chosen tokens (and the entropy) from logits, for the training losses.

`token_logprobs(logits, targets, temperature)` is `take_along_axis(log_softmax(logits / t), targets)`
with a written-out gradient. Autodiff of that expression writes the whole log-softmax, its
exponential and, for the gradient of the gather, a zero-filled `[..., vocab]` array that a scatter
then fills: several arrays the size of the logits (8 rows × 129 positions × 151,936 entries are
627 MB each in float32) per loss. Here the forward reads the logits twice (maximum, then the sums of
the exponentials) and writes nothing of that size; the backward writes only the logits' gradient,
`(g · (onehot − p) − h · p · (log p + H)) / t`, in one pass (`p` the probabilities, `g` and `h` the
cotangents of the log-probability and of the entropy `H`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, targets: jax.Array, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """`(log p(target), entropy)` per position of `logits / temperature` (`[..., vocab]`; float32 `[...]`
    each), differentiable in `logits`. `-inf` logits (masked tokens) are allowed: they get
    probability 0 and no gradient; a target must not be one of them."""
    temperature = float(temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _token_logprobs(logits, jnp.asarray(targets, jnp.int32), temperature)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _token_logprobs(logits, targets, temperature):
    (logps, entropy), _ = _forward(logits, targets, temperature)
    return logps, entropy


def _forward(logits, targets, temperature):
    scaled = _scaled(logits, temperature)
    most = jnp.max(scaled, axis=-1, keepdims=True)  # never differentiated: the backward is written out
    most = jnp.where(jnp.isfinite(most), most, 0.0)  # a row of -inf only: no nan from (-inf) - (-inf)
    shifted = scaled - most
    weights = jnp.exp(shifted)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    # sum p·(z - max) without writing p: exp(-inf)·(-inf) is nan, so masked entries count 0.
    weighted = jnp.sum(jnp.where(weights > 0, weights * shifted, 0.0), axis=-1, keepdims=True)
    log_total = jnp.log(total)
    normalizer = most + log_total  # log-sum-exp of the scaled logits
    chosen = jnp.take_along_axis(scaled, targets[..., None], axis=-1)
    logps = (chosen - normalizer)[..., 0]
    entropy = (log_total - weighted / total)[..., 0]
    return (logps, entropy), (logits, targets, normalizer, entropy)


def _token_logprobs_bwd(temperature, residuals, cotangents):
    logits, targets, normalizer, entropy = residuals
    d_logps, d_entropy = cotangents
    log_probs = _scaled(logits, temperature) - normalizer  # recomputed in the one fused pass below
    probs = jnp.exp(log_probs)
    onehot = jnp.arange(logits.shape[-1], dtype=jnp.int32) == targets[..., None]
    # d log p(y) / dz = onehot - p;  dH / dz = -p · (log p + H);  z = logits / t.
    entropy_term = jnp.where(probs > 0, probs * (log_probs + entropy[..., None]), 0.0)
    grad = d_logps[..., None] * (onehot - probs) - d_entropy[..., None] * entropy_term
    if temperature != 1.0:
        grad = grad / temperature
    return grad.astype(logits.dtype), None


_token_logprobs.defvjp(_forward, _token_logprobs_bwd)


def _scaled(logits, temperature):
    logits = logits.astype(jnp.float32)
    return logits if temperature == 1.0 else logits / temperature
