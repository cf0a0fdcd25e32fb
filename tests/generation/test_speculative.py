"""Speculative decoding: greedy output equals plain decoding (ngram and draft proposers, batch rows
with different acceptance, stops, max_new_tokens mid-proposal, logits), sampled output follows the
target distribution exactly (a chi-square test on a tiny vocabulary, fixed seeds), the CLI, errors."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import build_hf_model, save_hf_checkpoint
from flax import nnx
from scipy import stats as scipy_stats

from qwen_jax import make_mesh
from qwen_jax.cli import main
from qwen_jax.config import GenerationConfig, Qwen2Config
from qwen_jax.errors import GenerationError
from qwen_jax.generation import generate_ids as speculative_generate_ids
from qwen_jax.generation import stream_ids as speculative_stream_ids
from qwen_jax.generation.api import generate, stream
from qwen_jax.generation.options import initial_history, resolve_batch, row_params
from qwen_jax.generation.sampler import processed_logits
from qwen_jax.generation.speculative import (
    SpeculativeOptions,
    SpeculativeTokenStream,
    generate_batch,
    ngram_proposals,
    resolve_speculative,
)
from qwen_jax.generation.static import generate_ids
from qwen_jax.load import load
from qwen_jax.model.causal_lm import Qwen2ForCausalLM, create_model

VOCAB = 8  # small enough for the exact distribution of three sampled tokens (VOCAB**3 continuations)
# Row 0 repeats (n-gram matches, proposals accepted), row 1 is short, row 2 is random.
PROMPTS = [[5, 6, 7, 1, 5, 6, 7, 1, 5, 6], [1, 2, 3], [int(t) for t in np.random.default_rng(0).integers(0, VOCAB, 20)]]
NEW_TOKENS = 23  # not a multiple of K + 1: max_new_tokens is reached mid-proposal


def _config(vocab=VOCAB, layers=2):
    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,  # tied tiny random models mostly repeat their input token
    )


@pytest.fixture(scope="module")
def models():
    """(target, draft): the draft (one layer, other weights) proposes from distributions unlike the target's."""
    return (
        create_model(_config(), dtype="float32", seed=3),
        create_model(_config(layers=1), dtype="float32", seed=4),
    )


@pytest.fixture(scope="module")
def target(models):
    return models[0]


def _speculate(model, prompts, speculative, return_logits=False, stop_token_ids=(), **sampling):
    options, seeds = resolve_batch(
        GenerationConfig(), len(prompts), vocab_size=model.config.vocab_size, stop_token_ids=stop_token_ids, **sampling
    )
    return generate_batch(model, prompts, options, seeds, speculative, return_logits=return_logits)


def test_ngram_proposals():
    assert ngram_proposals([1, 2, 3, 9, 1, 2, 3, 7, 1, 2], 3, 1, 3) == [3, 7, 1]  # latest match of [1, 2]
    assert ngram_proposals([4, 5, 6, 4, 5], 4, 2, 2) == [6, 4, 5]  # fewer than K tokens follow
    assert ngram_proposals([1, 2, 3, 4], 4, 1, 3) == []  # no earlier occurrence
    assert ngram_proposals([6, 6, 6, 6, 6, 6], 3, 2, 2) == [6, 6, 6]  # a run: the latest match followed by K
    assert ngram_proposals([7, 1, 2, 8, 2], 2, 1, 3) == [8, 2]  # longer n-grams miss, n = 1 matches


def test_ngram_greedy_equals_plain_decoding_with_logits(target):
    expected = generate_ids(target, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0, return_logits=True)
    got = _speculate(
        target,
        PROMPTS,
        SpeculativeOptions(num_speculative_tokens=3),
        return_logits=True,
        max_new_tokens=NEW_TOKENS,
        temperature=0,
    )
    assert got.token_ids == expected.token_ids
    assert got.finish_reasons == expected.finish_reasons == ["length"] * 3
    for mine, theirs in zip(got.logits, expected.logits):  # the accepted tokens' own target logits
        np.testing.assert_allclose(mine, theirs, atol=2e-5)
    stats = got.speculation
    assert stats.accepted_tokens > 0
    assert stats.generated_tokens == sum(map(len, got.token_ids)) - len(PROMPTS)
    assert 1 < stats.tokens_per_step <= 4


def test_ngram_greedy_with_penalties_and_stop_token(target):
    free = generate_ids(target, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0, repetition_penalty=1.3)
    eos = free.token_ids[2][7]  # a token row 2 produces mid-way
    expected = generate_ids(
        target, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0, repetition_penalty=1.3, stop_token_ids=[eos]
    )
    got = _speculate(
        target,
        PROMPTS,
        SpeculativeOptions(num_speculative_tokens=3),
        stop_token_ids=[eos],
        max_new_tokens=NEW_TOKENS,
        temperature=0,
        repetition_penalty=1.3,
    )
    assert got.token_ids == expected.token_ids and got.finish_reasons == expected.finish_reasons
    assert got.finish_reasons[2] == "stop" and got.token_ids[2][-1] == eos


def test_generate_ids_and_stream_ids_take_speculative(target):
    """`qwen_jax.generation.generate_ids` / `stream_ids` with `speculative=`: plain decoding's ids,
    the acceptance statistics in the result; without it, the static path's result (no statistics)."""
    expected = generate_ids(target, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0)
    spec = SpeculativeOptions(num_speculative_tokens=3)
    got = speculative_generate_ids(target, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0, speculative=spec)
    assert got.token_ids == expected.token_ids and got.speculation.accepted_tokens > 0
    plain = speculative_generate_ids(target, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0)
    assert plain.token_ids == expected.token_ids and plain.speculation is None
    streamed = speculative_stream_ids(target, PROMPTS[0], max_new_tokens=NEW_TOKENS, temperature=0, speculative="ngram")
    assert list(streamed) == expected.token_ids[0] and streamed.result.speculation.accepted_tokens > 0
    with pytest.raises(GenerationError, match="stop strings need the text"):
        speculative_generate_ids(target, PROMPTS, stop=["x"], speculative="ngram")


@pytest.mark.parametrize("same_weights", [True, False])
def test_draft_greedy_equals_plain_decoding(models, same_weights):
    target, draft = models
    draft = target if same_weights else draft
    expected = generate_ids(target, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0)
    got = _speculate(
        target,
        PROMPTS,
        SpeculativeOptions("draft", num_speculative_tokens=3, draft_model=draft),
        max_new_tokens=NEW_TOKENS,
        temperature=0,
    )
    assert got.token_ids == expected.token_ids
    if same_weights:
        assert got.speculation.acceptance_rate == 1.0
    else:
        assert got.speculation.acceptance_rate < 1.0


def test_on_a_tensor_parallel_mesh(models):
    mesh = make_mesh(data=1, fsdp=1, tensor=2, devices=jax.devices()[:2])
    sharded = create_model(_config(), dtype="float32", seed=3, mesh=mesh)
    expected = generate_ids(sharded, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0).token_ids
    for spec in (SpeculativeOptions(num_speculative_tokens=3), SpeculativeOptions("draft", draft_model=sharded)):
        assert _speculate(sharded, PROMPTS, spec, max_new_tokens=NEW_TOKENS, temperature=0).token_ids == expected


# ----------------------------------------------------------------------------- the target distribution
def _exact_distribution(model, prompt, options):
    """The processed distribution of every continuation (t0, t1, t2), `[V, V, V]`, from one full forward."""
    vocab = model.config.vocab_size
    prefixes = [prompt + [a, b] for a in range(vocab) for b in range(vocab)]
    logits = np.asarray(model(np.asarray(prefixes, np.int32)))[:, -3:].reshape(-1, vocab)
    history = initial_history(options, vocab, [prompt] * len(logits))
    processed = np.asarray(processed_logits(logits, history, row_params(options, [0] * len(logits))), np.float64)
    weights = np.exp(processed - processed.max(-1, keepdims=True))
    p = (weights / weights.sum(-1, keepdims=True)).reshape(vocab, vocab, 3, vocab)
    return p[0, 0, 0][:, None, None] * p[:, 0, 1][:, :, None] * p[:, :, 2]


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_sampled_output_follows_the_target_distribution(models, method):
    model, draft = models
    rows = 2000
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]  # n-gram proposals in most steps
    options, _ = resolve_batch(GenerationConfig(), rows, vocab_size=VOCAB, temperature=0.1, top_k=6, max_new_tokens=3)
    exact = _exact_distribution(model, prompt, options)
    speculative = SpeculativeOptions(method, num_speculative_tokens=2, draft_model=draft if method == "draft" else None)
    got = generate_batch(model, [prompt] * rows, options, list(range(rows)), speculative)  # fixed seeds
    assert 0 < got.speculation.accepted_tokens < got.speculation.proposed_tokens
    counts = np.zeros((VOCAB,) * 3)
    for ids in got.token_ids:
        counts[tuple(ids)] += 1
    # Chi-square over the cells the target expects at least 5 times, the rest pooled into one cell.
    expected, observed = exact.ravel() * rows, counts.ravel()
    big = expected >= 5
    f_obs = np.append(observed[big], observed[~big].sum())
    f_exp = np.append(expected[big], expected[~big].sum())
    assert scipy_stats.chisquare(f_obs, f_exp).pvalue > 1e-3
    # The test has power: the proposals' distribution (the draft's, or an n-gram's point mass) is far
    # from the target's, so accepting proposals without the rejection rule would fail it.
    if method == "draft":
        second = _exact_distribution(draft, prompt, options).sum(axis=(0, 2))
        assert 0.5 * np.abs(second - exact.sum(axis=(0, 2))).sum() > 0.2


# ----------------------------------------------------------------------------- errors
def test_vocabulary_mismatch_and_bad_options(target):
    other = nnx.eval_shape(lambda: Qwen2ForCausalLM(_config(vocab=VOCAB + 8, layers=1)))  # only its config is read
    with pytest.raises(GenerationError, match="vocabulary"):
        resolve_speculative(SpeculativeOptions("draft", draft_model=other), target)
    # Padded tables over one tokenizer (Qwen2.5 0.5B vs 7B) are accepted when both cover it.
    assert resolve_speculative(SpeculativeOptions("draft", draft_model=other), target, real_vocab_size=VOCAB)
    with pytest.raises(GenerationError, match="draft_model"):
        SpeculativeOptions("draft")
    with pytest.raises(GenerationError, match="num_speculative_tokens"):
        SpeculativeOptions(num_speculative_tokens=0)
    with pytest.raises(GenerationError, match="ngram_min"):
        SpeculativeOptions(ngram_min=3, ngram_max=2)
    with pytest.raises(GenerationError, match="speculative method"):
        resolve_speculative("eagle", target)


# ----------------------------------------------------------------------------- text, streaming, CLI
@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """A tiny random model over the real Qwen2.5 vocabulary, with the real tokenizer files beside it."""
    tokenizer_dir = os.environ.get("QWEN_JAX_TOKENIZER_DIR")
    if not tokenizer_dir:
        pytest.skip("QWEN_JAX_TOKENIZER_DIR is not set")
    torch_model = build_hf_model(
        seed=2,
        vocab_size=151665,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        max_position_embeddings=512,
        bos_token_id=151643,
        eos_token_id=151645,
    )
    path = save_hf_checkpoint(torch_model, tmp_path_factory.mktemp("chat"))
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), path)
    model, tokenizer = load(path)
    return model, tokenizer, path


PROMPT = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef add"


def test_stop_strings_stream_and_cli(chat_checkpoint, capsys):
    model, tokenizer, path = chat_checkpoint
    plain = generate(model, tokenizer, PROMPT, max_new_tokens=20, temperature=0)
    full = plain.texts[0]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = generate(model, tokenizer, PROMPT, max_new_tokens=20, temperature=0, stop=[stop], speculative="ngram")
    assert cut.texts[0] == full[: full.index(stop)] and cut.finish_reasons == ["stop"]
    pieces = stream(model, tokenizer, PROMPT, max_new_tokens=20, temperature=0, stop=stop, speculative="ngram")
    assert "".join(pieces) == cut.texts[0]
    assert isinstance(pieces._tokens, SpeculativeTokenStream)
    argv = ["generate", "--model", path, "--prompt", PROMPT, "--greedy", "--max-new-tokens", "20", "--json"]
    assert main([*argv, "--speculative", "ngram", "--num-speculative-tokens", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == plain.token_ids[0] and out["text"] == full
    assert 0 <= out["speculation"]["acceptance_rate"] <= 1 and out["speculation"]["tokens_per_step"] >= 1
    assert main([*argv, "--speculative", "draft"]) == 2
    assert "--draft-model" in capsys.readouterr().err
