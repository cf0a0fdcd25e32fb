"""Per-row sampler of the engine: HF's filters per row, draws independent of batch-mates and variants."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.generation.sampler import (
    History,
    RowParams,
    SamplerVariant,
    adjusted_logits,
    processed_logits,
    sample_rows,
    seed_key_data,
    variant_for,
)
from qwen_jax.generation.sampling import apply_repetition_penalty, process_logits, sampling_setup

VOCAB = 512
# (temperature, top_k, top_p, min_p, repetition_penalty): greedy, candidates, id order, sorted vocabulary
ROWS = [
    (0.0, 0, 1.0, 0.0, 1.3),
    (0.7, 20, 0.8, 0.0, 1.05),
    (1.2, 0, 1.0, 0.05, 1.0),
    (0.9, 0, 0.9, 0.0, 1.2),
    (1.0, 100, 1.0, 0.1, 1.0),
    (1.5, 64, 0.95, 0.02, 1.1),
]


def _params(rows, seeds, token_index=0, presence=None, frequency=None) -> RowParams:
    columns = list(zip(*rows))
    zeros = np.zeros(len(rows), np.float32)
    return RowParams(
        temperature=jnp.asarray(columns[0], jnp.float32),
        top_k=jnp.asarray(columns[1], jnp.int32),
        top_p=jnp.asarray(columns[2], jnp.float32),
        min_p=jnp.asarray(columns[3], jnp.float32),
        repetition_penalty=jnp.asarray(columns[4], jnp.float32),
        presence_penalty=jnp.asarray(zeros if presence is None else presence, jnp.float32),
        frequency_penalty=jnp.asarray(zeros if frequency is None else frequency, jnp.float32),
        key_data=jnp.stack([seed_key_data(s) for s in seeds]),
        token_index=jnp.full(len(rows), token_index, jnp.int32),
    )


@pytest.fixture(scope="module")
def batch():
    logits = jax.random.normal(jax.random.key(0), (len(ROWS), VOCAB)) * 3
    seen = jax.random.bernoulli(jax.random.key(1), 0.1, (len(ROWS), VOCAB))
    return logits, History(seen, jnp.zeros(seen.shape, jnp.int32), jnp.zeros(seen.shape, jnp.float32))


def test_filters_equal_hf_processors_per_row(batch):
    logits, seen = batch
    processed = jax.jit(processed_logits)(logits, seen, _params(ROWS, range(len(ROWS))))
    reference_logits = jax.jit(process_logits, static_argnums=3)
    for row, (t, k, p, m, r) in enumerate(ROWS):
        if t == 0:
            continue
        mode, params = sampling_setup(temperature=t, top_k=k, top_p=p, min_p=m, repetition_penalty=r, vocab_size=VOCAB)
        reference = reference_logits(logits[row : row + 1], seen.seen[row : row + 1], params, mode)[0]
        kept = np.isfinite(np.asarray(reference))
        np.testing.assert_array_equal(np.isfinite(np.asarray(processed[row])), kept)
        np.testing.assert_allclose(np.asarray(processed[row])[kept], np.asarray(reference)[kept], rtol=1e-6)


def test_draws_do_not_depend_on_batch_mates_or_variant(batch):
    logits, seen = batch
    seeds = [11, 12, 13, 14, 15, 16]
    draw = jax.jit(sample_rows, static_argnums=3)
    for index in range(3):
        together = np.asarray(draw(logits, seen, _params(ROWS, seeds, index), SamplerVariant.FULL))
        for row, settings in enumerate(ROWS):
            one = slice(row, row + 1)
            variant = variant_for([settings[:3]])
            alone = draw(
                logits[one], jax.tree.map(lambda x: x[one], seen), _params([settings], [seeds[row]], index), variant
            )
            assert int(alone[0]) == together[row], (row, index, variant)
    assert variant_for([r[:3] for r in ROWS[:3]]) is SamplerVariant.CANDIDATES
    assert variant_for([(0.0, 0, 0.5)]) is SamplerVariant.GREEDY
    assert variant_for([(1.0, 0, 0.5)]) is variant_for([(1.0, 100, 1.0)]) is SamplerVariant.FULL


def test_draws_follow_the_processed_distribution(batch):
    logits, seen = batch
    params = _params(ROWS, range(len(ROWS)))
    draws = 3000
    tokens = np.asarray(
        jax.jit(
            jax.vmap(
                lambda i: sample_rows(
                    logits, seen, dataclasses.replace(params, token_index=jnp.full(len(ROWS), i)), SamplerVariant.FULL
                )
            )
        )(jnp.arange(draws))
    )
    probabilities = np.asarray(jax.nn.softmax(processed_logits(logits, seen, params), axis=-1))
    greedy = np.argmax(np.asarray(apply_repetition_penalty(logits[0], seen.seen[0], 1.3)))
    assert set(tokens[:, 0]) == {greedy}
    for row in range(1, len(ROWS)):
        counts = np.bincount(tokens[:, row], minlength=VOCAB)
        assert probabilities[row][counts > 0].min() > 0  # never a filtered token
        total_variation = 0.5 * np.abs(counts / draws - probabilities[row]).sum()
        kept = int((probabilities[row] > 0).sum())
        assert total_variation < 0.05 + 0.5 * np.sqrt(kept / draws), (row, total_variation, kept)


def test_seed_key_data_matches_jax_random_key():
    for seed in (0, 1, 12345, 2**32 - 1):
        np.testing.assert_array_equal(seed_key_data(seed), jax.random.key_data(jax.random.key(seed)))
    assert seed_key_data(2**40 + 7).tolist() == [2**8, 7]


def test_bias_and_penalties_follow_vllm_order_and_openai_formula():
    """logit bias, then HF's repetition penalty over prompt + output ids, then OpenAI's
    `logits -= frequency * count + presence * (count > 0)` over generated ids only."""
    rng = np.random.default_rng(0)
    rows = 4
    logits = rng.normal(size=(rows, VOCAB)).astype(np.float32) * 3
    seen = rng.random((rows, VOCAB)) < 0.1
    counts = np.where(rng.random((rows, VOCAB)) < 0.05, rng.integers(1, 4, (rows, VOCAB)), 0).astype(np.int32)
    seen |= counts > 0  # generated ids are in the sequence
    bias = np.where(rng.random((rows, VOCAB)) < 0.02, rng.uniform(-100, 100, (rows, VOCAB)), 0).astype(np.float32)
    repetition = np.asarray([1.0, 1.3, 1.0, 1.2], np.float32)
    presence = np.asarray([0.0, 0.5, -1.0, 2.0], np.float32)
    frequency = np.asarray([0.0, 0.3, 1.5, -0.5], np.float32)
    settings = [(1.0, 0, 1.0, 0.0, float(r)) for r in repetition]
    params = _params(settings, range(rows), presence=presence, frequency=frequency)
    history = History(jnp.asarray(seen), jnp.asarray(counts), jnp.asarray(bias))
    got = np.asarray(jax.jit(adjusted_logits)(jnp.asarray(logits), history, params))

    expected = logits.astype(np.float64) + bias
    penalised = np.where(expected < 0, expected * repetition[:, None], expected / repetition[:, None])
    expected = np.where(seen, penalised, expected)
    expected -= frequency[:, None] * counts + presence[:, None] * (counts > 0)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-4)
    assert np.abs(got - logits).max() > 1  # the adjustments did something
    np.testing.assert_array_equal(got[0], np.where(seen[0], got[0], logits[0] + bias[0]))

    # A greedy row picks the argmax of the adjusted logits; `record` counts what was generated.
    greedy = _params(
        [(0.0, 0, 1.0, 0.0, float(r)) for r in repetition], range(rows), presence=presence, frequency=frequency
    )
    tokens = jax.jit(sample_rows, static_argnums=3)(jnp.asarray(logits), history, greedy, SamplerVariant.GREEDY)
    np.testing.assert_array_equal(np.asarray(tokens), got.argmax(-1))
    after = history.record(tokens)
    step = np.zeros_like(counts)
    step[np.arange(rows), np.asarray(tokens)] = 1
    np.testing.assert_array_equal(np.asarray(after.counts), counts + step)
    assert np.asarray(after.seen)[np.arange(rows), np.asarray(tokens)].all()
