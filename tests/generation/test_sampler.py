"""The one sampler (`qwen_jax.generation.sampler`): HF's logits processors per row, OpenAI's penalties
and bias, seeded draws that depend on nothing but a row's own logits, settings, seed and token index."""

import dataclasses

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

from qwen_jax.errors import GenerationError
from qwen_jax.generation.options import SamplingOptions
from qwen_jax.generation.sampler import (
    ENGINE_VARIANTS,
    History,
    RowParams,
    SamplerVariant,
    adjusted_logits,
    apply_repetition_penalty,
    covering_variant,
    mark_seen,
    processed_logits,
    sample_rows,
    seed_key_data,
    variant_for,
)

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


def _history(seen) -> History:
    seen = jnp.asarray(seen)
    return History(seen, jnp.zeros(seen.shape, jnp.int32), jnp.zeros(seen.shape, jnp.float32))


def _hf(logits, history, *, temperature, top_k, top_p, min_p, repetition_penalty):
    """HF transformers' processors on `logits` [rows, vocab] with `history` [rows, length] as input ids."""
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
    return processors(torch.from_numpy(np.asarray(history)), torch.from_numpy(np.array(logits))).numpy()


@pytest.fixture(scope="module")
def batch():
    logits = jax.random.normal(jax.random.key(0), (len(ROWS), VOCAB)) * 3
    seen = jax.random.bernoulli(jax.random.key(1), 0.1, (len(ROWS), VOCAB))
    return logits, _history(seen)


# ----------------------------------------------------------------------------- HF's processors on fixed logits
HF_VOCAB = 300


def _fixed_logits(seed=0, batch=4, ties=False):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(batch, HF_VOCAB)).astype(np.float32)
    if ties:  # five tokens tied at the top (which of them top-p drops is arbitrary, in HF too)
        logits[0, :5] = 8.0
    return logits


def _fixed_history(batch=4, length=12, seed=1):
    return np.random.default_rng(seed).integers(0, HF_VOCAB, size=(batch, length))


def _ours(logits, history, **settings):
    """processed_logits with every row on `settings`; the rows' seen sets from `history` ids."""
    rows = logits.shape[0]
    row = tuple(settings[k] for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"))
    seen = mark_seen(jnp.zeros((rows, HF_VOCAB), bool), jnp.asarray(history, jnp.int32))
    return np.asarray(
        jax.jit(processed_logits)(jnp.asarray(logits), _history(seen), _params([row] * rows, range(rows)))
    )


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
    logits, history = _fixed_logits(ties=settings.pop("ties", False)), _fixed_history()
    expected = _hf(logits, history, **settings)
    got = _ours(logits, history, **settings)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(expected))
    kept = ~np.isneginf(expected)
    np.testing.assert_allclose(got[kept], expected[kept], rtol=1e-6, atol=1e-6)
    if settings["top_k"] or settings["top_p"] < 1 or settings["min_p"] > 0:
        assert (~kept).any(), "the filter removed nothing: the test would not notice a broken filter"


def test_filters_equal_hf_processors_per_row(batch):
    """Rows with different settings in one batch: each row's distribution is HF's for its own settings."""
    logits, history = batch
    processed = np.asarray(jax.jit(processed_logits)(logits, history, _params(ROWS, range(len(ROWS)))))
    for row, (t, k, p, m, r) in enumerate(ROWS):
        seen_ids = np.flatnonzero(np.asarray(history.seen[row]))[None]
        expected = _hf(logits[row : row + 1], seen_ids, temperature=t, top_k=k, top_p=p, min_p=m, repetition_penalty=r)
        kept = np.isfinite(expected[0])
        np.testing.assert_array_equal(np.isfinite(processed[row]), kept)
        np.testing.assert_allclose(processed[row][kept], expected[0][kept], rtol=1e-5, atol=1e-5)
        if t > 0 and (k or p < 1 or m > 0):
            assert not kept.all(), row


def test_samples_only_kept_tokens_and_follows_probabilities():
    logits = _fixed_logits(seed=3, batch=1)
    settings = dict(temperature=0.8, top_k=10, top_p=0.9, min_p=0.0, repetition_penalty=1.0)
    expected = _hf(logits, _fixed_history(batch=1), **settings)[0]
    params = _params([tuple(settings.values())], [0])
    variant = variant_for([(0.8, 10, 0.9)])
    history = _history(np.zeros((1, HF_VOCAB), bool))

    def draw(index):
        return sample_rows(jnp.asarray(logits), history, params.at_token(index), variant)[0]

    tokens = np.asarray(jax.jit(jax.vmap(draw))(jnp.arange(4000)))
    assert np.isfinite(expected[tokens]).all(), "sampled a filtered token"
    probs = np.exp(expected - expected[np.isfinite(expected)].max())
    probs /= probs.sum()
    frequencies = np.bincount(tokens, minlength=HF_VOCAB) / len(tokens)
    np.testing.assert_allclose(frequencies, probs, atol=0.03)


def test_same_seed_same_sample_and_greedy_is_argmax():
    logits = jnp.asarray(_fixed_logits(seed=4))
    draw = jax.jit(sample_rows, static_argnums=3)
    sampling = _params([(1.0, 0, 1.0, 0.0, 1.0)] * 4, [7] * 4, token_index=3)
    variant = variant_for([(1.0, 0, 1.0)], adjustments=False)
    a, b = draw(logits, None, sampling, variant), draw(logits, None, sampling, variant)
    np.testing.assert_array_equal(a, b)
    assert len(set(np.asarray(a).tolist())) > 1  # the rows' logits differ, and so do their draws
    greedy_variant = variant_for([(0.0, 5, 0.5)], adjustments=False)
    assert greedy_variant.greedy and not greedy_variant.candidates and not greedy_variant.sorted_vocabulary
    greedy = draw(logits, None, _params([(0.0, 5, 0.5, 0.0, 1.0)] * 4, [7] * 4), greedy_variant)
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), axis=-1))
    # The greedy program is the argmax alone: no sort or top-k, and no random bits.
    text = jax.jit(sample_rows, static_argnums=3).lower(logits, None, sampling, greedy_variant).as_text()
    assert "sort" not in text and "top_k" not in text and "threefry" not in text.lower()


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
    settings = dict(max_new_tokens=4, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    name = next(iter(bad))
    with pytest.raises(GenerationError, match=name) as info:
        SamplingOptions(**{**settings, **bad})
    assert isinstance(info.value, ValueError) and info.value.param == name


# ----------------------------------------------------------------------------- per-row draws
def test_draws_do_not_depend_on_batch_mates_or_variant(batch):
    logits, history = batch
    seeds = [11, 12, 13, 14, 15, 16]
    draw = jax.jit(sample_rows, static_argnums=3)
    full = ENGINE_VARIANTS[-1]
    for index in range(3):
        together = np.asarray(draw(logits, history, _params(ROWS, seeds, index), full))
        for row, settings in enumerate(ROWS):
            one = slice(row, row + 1)
            # the cheapest variant for the row alone, and the engine's variant that covers it
            for variant in {
                variant_for([settings[:3]]),
                covering_variant(variant_for([settings[:3]]), ENGINE_VARIANTS),
            }:
                alone = draw(
                    logits[one],
                    jax.tree.map(lambda x, one=one: x[one], history),
                    _params([settings], [seeds[row]], index),
                    variant,
                )
                assert int(alone[0]) == together[row], (row, index, variant)
    engine = [covering_variant(variant_for([r[:3] for r in rows]), ENGINE_VARIANTS) for rows in (ROWS[:3], ROWS)]
    assert engine == [ENGINE_VARIANTS[1], ENGINE_VARIANTS[2]]
    assert variant_for([(0.0, 0, 0.5)]).greedy
    assert variant_for([(1.0, 0, 0.5)]) == variant_for([(1.0, 100, 1.0)]) == SamplerVariant(sorted_vocabulary=True)
    assert variant_for([(1.0, 20, 0.5)]) == SamplerVariant(candidates=True)
    assert variant_for([(1.0, 0, 1.0)]) == SamplerVariant(id_order=True)


def test_without_adjustments_rows_with_neutral_settings_draw_the_same(batch):
    """A static batch without bias or penalties skips them (`adjustments=False`); the engine always
    applies them: for neutral values both give the same tokens."""
    logits, _ = batch
    rows = [(t, k, p, m, 1.0) for t, k, p, m, _ in ROWS]
    seen = jax.random.bernoulli(jax.random.key(2), 0.3, logits.shape)  # read only by a repetition penalty
    draw = jax.jit(sample_rows, static_argnums=3)
    for index in range(4):
        params = _params(rows, range(len(rows)), index)
        plain = draw(logits, None, params, dataclasses.replace(ENGINE_VARIANTS[-1], adjustments=False))
        adjusted = draw(logits, _history(seen), params, ENGINE_VARIANTS[-1])
        np.testing.assert_array_equal(np.asarray(plain), np.asarray(adjusted))


def test_draws_follow_the_processed_distribution(batch):
    logits, history = batch
    params = _params(ROWS, range(len(ROWS)))
    draws = 3000
    tokens = np.asarray(
        jax.jit(jax.vmap(lambda i: sample_rows(logits, history, params.at_token(i), ENGINE_VARIANTS[-1])))(
            jnp.arange(draws)
        )
    )
    probabilities = np.asarray(jax.nn.softmax(processed_logits(logits, history, params), axis=-1))
    greedy = np.argmax(np.asarray(apply_repetition_penalty(logits[0], history.seen[0], 1.3)))
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
    tokens = jax.jit(sample_rows, static_argnums=3)(jnp.asarray(logits), history, greedy, ENGINE_VARIANTS[0])
    np.testing.assert_array_equal(np.asarray(tokens), got.argmax(-1))
    after = history.record(tokens)
    step = np.zeros_like(counts)
    step[np.arange(rows), np.asarray(tokens)] = 1
    np.testing.assert_array_equal(np.asarray(after.counts), counts + step)
    assert np.asarray(after.seen)[np.arange(rows), np.asarray(tokens)].all()


# ----------------------------------------------------------------------------- the vocabulary-length draw
@pytest.mark.parametrize("length", [151_936, 10_007])  # Qwen2.5's vocabulary (blocks by reshape); a prime (padded)
def test_vocabulary_length_inverse_cdf_draws_the_first_index_past_the_target(length):
    """Over a long axis `_inverse_cdf` sums in two levels instead of one cumulative sum; its draw is
    still the first index whose cumulative weight exceeds uniform x total (float64 reference, away
    from rounding ties), never a filtered (-inf) index, and the last kept index at uniform -> 1."""
    from qwen_jax.generation.sampler import _inverse_cdf

    rng = np.random.default_rng(length)
    rows = 16
    values = rng.normal(size=(rows, length)).astype(np.float32) * 3
    values[rng.random((rows, length)) < 0.3] = -np.inf  # filtered tokens
    values[3, : length // 2] = -np.inf  # a row whose mass is all in the second half
    values[5, 1:], values[5, 0] = -np.inf, 0.5  # a row with one token
    uniform = rng.random(rows).astype(np.float32)
    uniform[7] = np.float32(1 - 2**-24)  # the largest uniform: the target may round to the total
    values[7, -1] = 20.0  # ... and the last token holds most of the mass
    drawn = np.asarray(jax.jit(_inverse_cdf)(jnp.asarray(values), jnp.asarray(uniform)))
    weights = np.exp(values.astype(np.float64) - values.max(axis=-1, keepdims=True))
    cdf = np.cumsum(weights, axis=-1)
    for row in range(rows):
        assert np.isfinite(values[row, drawn[row]]), (row, drawn[row])
        target = uniform[row] * cdf[row, -1]
        expected = min(int(np.sum(cdf[row] <= target)), int(np.flatnonzero(weights[row] > 0)[-1]))
        if expected != drawn[row]:  # only a float32 rounding tie at the boundary may move the draw
            assert abs(cdf[row, min(expected, drawn[row])] - target) <= 1e-5 * cdf[row, -1], (row, expected, drawn[row])
    assert drawn[5] == 0
    assert drawn[7] == np.flatnonzero(np.isfinite(values[7]))[-1]


def test_vocabulary_length_draws_follow_the_distribution():
    """Sampled at temperature 1 over Qwen2.5's vocabulary length, the draws follow softmax(logits)."""
    length, draws = 151_936, 4000
    logits = np.full((1, length), -20.0, np.float32)
    hot = np.array([3, 1500, 60_000, 151_935])  # in different blocks, and the very last token
    logits[0, hot] = np.log([0.1, 0.2, 0.3, 0.4])
    params = _params([(1.0, 0, 1.0, 0.0, 1.0)], [5])
    variant = variant_for([(1.0, 0, 1.0)], adjustments=False)
    tokens = np.asarray(
        jax.jit(jax.vmap(lambda i: sample_rows(jnp.asarray(logits), None, params.at_token(i), variant)[0]))(
            jnp.arange(draws)
        )
    )
    probabilities = np.asarray(jax.nn.softmax(jnp.asarray(logits[0])))
    frequencies = np.bincount(tokens, minlength=length) / draws
    np.testing.assert_allclose(frequencies[hot], probabilities[hot], atol=0.03)
    assert frequencies[hot].sum() > 0.95


def test_covering_variants_run_only_the_paths_their_rows_take():
    """A variant compiling several paths guards each with `lax.cond` on whether a sampling row takes
    it; draws equal the single-path variant's, for every mix (the unused path's zeros never leak)."""
    logits = jnp.asarray(_fixed_logits(seed=8, batch=4))
    full = dataclasses.replace(ENGINE_VARIANTS[-1], adjustments=False)
    draw = jax.jit(sample_rows, static_argnums=3)
    for rows in (
        [(1.0, 0, 1.0, 0.0, 1.0)] * 4,  # id order only
        [(1.0, 10, 1.0, 0.0, 1.0)] * 4,  # candidates only
        [(1.0, 0, 0.9, 0.0, 1.0)] * 4,  # sorted vocabulary only
        [(0.0, 0, 1.0, 0.0, 1.0)] * 4,  # greedy only
        [(1.0, 0, 1.0, 0.05, 1.0), (1.0, 10, 1.0, 0.0, 1.0), (0.0, 0, 1.0, 0.0, 1.0), (1.0, 0, 0.9, 0.0, 1.0)],
    ):
        for index in range(3):
            params = _params(rows, [21, 22, 23, 24], index)
            covered = np.asarray(draw(logits, None, params, full))
            for row, settings in enumerate(rows):
                one = _params([settings], [21 + row], index)
                alone = draw(logits[row : row + 1], None, one, variant_for([settings[:3]], adjustments=False))
                assert covered[row] == int(alone[0]), (rows, row, index)


def test_history_records_only_the_valid_rows():
    history = History.empty(4, VOCAB)
    recorded = history.record(jnp.asarray([5, 6, 7], jnp.int32), jnp.asarray([True, False, True]))
    seen, counts = np.asarray(recorded.seen), np.asarray(recorded.counts)
    assert seen[0, 5] and seen[2, 7] and seen.sum() == 2 and counts.sum() == 2
    assert counts[0, 5] == 1 and not seen[1].any() and not seen[3].any()
