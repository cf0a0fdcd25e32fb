"""Sampling filters against HF transformers' logits processors on fixed logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwen_jax.generation.sampling import mark_seen, process_logits, sample, sampling_setup

VOCAB = 300


def _fixed_logits(seed=0, batch=4, ties=False):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(batch, VOCAB)).astype(np.float32)
    if ties:  # five tokens tied at the top (which of them top-p drops is arbitrary, in HF too)
        logits[0, :5] = 8.0
    return logits


def _history(batch=4, length=12, seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length))


def _hf(logits, history, *, temperature, top_k, top_p, min_p, repetition_penalty):
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if temperature != 0:  # HF adds warpers only when sampling, in this order
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
        if min_p > 0:
            processors.append(MinPLogitsWarper(min_p))
    return processors(torch.from_numpy(history), torch.from_numpy(logits.copy())).numpy()


def _ours(logits, history, **settings):
    mode, params = sampling_setup(vocab_size=VOCAB, **settings)
    seen = mark_seen(jnp.zeros((logits.shape[0], VOCAB), bool), jnp.asarray(history, jnp.int32))
    return np.asarray(jax.jit(process_logits, static_argnums=3)(jnp.asarray(logits), seen, params, mode))


SETTINGS = [
    dict(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0),
    dict(temperature=1.0, top_k=20, top_p=1.0, min_p=0.0, repetition_penalty=1.0),
    dict(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0, repetition_penalty=1.0, ties=True),  # all ties kept
    dict(temperature=1.0, top_k=0, top_p=0.8, min_p=0.0, repetition_penalty=1.0),
    dict(temperature=1.3, top_k=0, top_p=1.0, min_p=0.1, repetition_penalty=1.0),
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.3),
    dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.3),  # greedy: penalty only
    # Qwen2.5-Instruct's generation_config.json, plus min-p.
    dict(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.05),
    dict(temperature=0.5, top_k=100, top_p=0.95, min_p=0.0, repetition_penalty=0.9),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_processed_logits_match_hf(settings):
    settings = dict(settings)
    logits, history = _fixed_logits(ties=settings.pop("ties", False)), _history()
    expected = _hf(logits, history, **settings)
    got = _ours(logits, history, **settings)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(expected))
    kept = ~np.isneginf(expected)
    np.testing.assert_allclose(got[kept], expected[kept], rtol=1e-6, atol=1e-6)
    if settings["top_k"] or settings["top_p"] < 1 or settings["min_p"] > 0:
        assert (~kept).any(), "the filter removed nothing: the test would not notice a broken filter"


def test_samples_only_kept_tokens_and_follows_probabilities():
    logits = _fixed_logits(seed=3, batch=1)
    settings = dict(temperature=0.8, top_k=10, top_p=0.9, min_p=0.0, repetition_penalty=1.0)
    mode, params = sampling_setup(vocab_size=VOCAB, **settings)
    expected = _hf(logits, _history(batch=1), **settings)[0]
    draw = jax.jit(jax.vmap(lambda k: sample(k, jnp.asarray(logits), None, params, mode)[0]))
    tokens = np.asarray(draw(jax.random.split(jax.random.key(0), 4000)))
    assert np.isfinite(expected[tokens]).all(), "sampled a filtered token"
    probs = np.exp(expected - expected[np.isfinite(expected)].max())
    probs /= probs.sum()
    frequencies = np.bincount(tokens, minlength=VOCAB) / len(tokens)
    np.testing.assert_allclose(frequencies, probs, atol=0.03)


def test_same_key_same_sample_and_greedy_is_argmax():
    logits = jnp.asarray(_fixed_logits(seed=4))
    mode, params = sampling_setup(
        temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, vocab_size=VOCAB
    )
    a = sample(jax.random.key(7), logits, None, params, mode)
    b = sample(jax.random.key(7), logits, None, params, mode)
    np.testing.assert_array_equal(a, b)
    greedy_mode, greedy_params = sampling_setup(
        temperature=0.0, top_k=5, top_p=0.5, min_p=0.0, repetition_penalty=1.0, vocab_size=VOCAB
    )
    assert greedy_mode.greedy and not greedy_mode.top_k_cap and not greedy_mode.top_p
    greedy = sample(jax.random.key(7), logits, None, greedy_params, greedy_mode)
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), axis=-1))


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1.0),
        dict(top_k=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(min_p=2.0),
        dict(repetition_penalty=0.0),
    ],
)
def test_invalid_settings_are_rejected(bad):
    settings = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, vocab_size=VOCAB)
    with pytest.raises(ValueError, match=next(iter(bad))):
        sampling_setup(**{**settings, **bad})
