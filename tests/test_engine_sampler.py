"""Per-row sampler of the engine: HF's filters per row, draws independent of batch-mates and variants."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax import sampling
from qwen_jax.engine.sampler import (
    RowParams,
    SamplerVariant,
    processed_logits,
    sample_rows,
    seed_key_data,
    variant_for,
)

VOCAB = 512
# (temperature, top_k, top_p, min_p, repetition_penalty): greedy, candidates, id order, sorted vocabulary
ROWS = [(0.0, 0, 1.0, 0.0, 1.3), (0.7, 20, 0.8, 0.0, 1.05), (1.2, 0, 1.0, 0.05, 1.0), (0.9, 0, 0.9, 0.0, 1.2),
        (1.0, 100, 1.0, 0.1, 1.0), (1.5, 64, 0.95, 0.02, 1.1)]


def _params(rows, seeds, token_index=0) -> RowParams:
    columns = list(zip(*rows))
    return RowParams(
        temperature=jnp.asarray(columns[0], jnp.float32), top_k=jnp.asarray(columns[1], jnp.int32),
        top_p=jnp.asarray(columns[2], jnp.float32), min_p=jnp.asarray(columns[3], jnp.float32),
        repetition_penalty=jnp.asarray(columns[4], jnp.float32),
        key_data=jnp.stack([seed_key_data(s) for s in seeds]), token_index=jnp.full(len(rows), token_index, jnp.int32))


@pytest.fixture(scope="module")
def batch():
    logits = jax.random.normal(jax.random.key(0), (len(ROWS), VOCAB)) * 3
    seen = jax.random.bernoulli(jax.random.key(1), 0.1, (len(ROWS), VOCAB))
    return logits, seen


def test_filters_equal_hf_processors_per_row(batch):
    logits, seen = batch
    processed = jax.jit(processed_logits)(logits, seen, _params(ROWS, range(len(ROWS))))
    reference_logits = jax.jit(sampling.process_logits, static_argnums=3)
    for row, (t, k, p, m, r) in enumerate(ROWS):
        if t == 0:
            continue
        mode, params = sampling.sampling_setup(temperature=t, top_k=k, top_p=p, min_p=m, repetition_penalty=r,
                                               vocab_size=VOCAB)
        reference = reference_logits(logits[row:row + 1], seen[row:row + 1], params, mode)[0]
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
            alone = draw(logits[one], seen[one], _params([settings], [seeds[row]], index), variant)
            assert int(alone[0]) == together[row], (row, index, variant)
    assert variant_for([r[:3] for r in ROWS[:3]]) is SamplerVariant.CANDIDATES
    assert variant_for([(0.0, 0, 0.5)]) is SamplerVariant.GREEDY
    assert variant_for([(1.0, 0, 0.5)]) is variant_for([(1.0, 100, 1.0)]) is SamplerVariant.FULL


def test_draws_follow_the_processed_distribution(batch):
    logits, seen = batch
    params = _params(ROWS, range(len(ROWS)))
    draws = 3000
    tokens = np.asarray(jax.jit(jax.vmap(
        lambda i: sample_rows(logits, seen, dataclasses.replace(params, token_index=jnp.full(len(ROWS), i)),
                              SamplerVariant.FULL)))(jnp.arange(draws)))
    probabilities = np.asarray(jax.nn.softmax(processed_logits(logits, seen, params), axis=-1))
    greedy = np.argmax(np.asarray(sampling.apply_repetition_penalty(logits[0], seen[0], 1.3)))
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
