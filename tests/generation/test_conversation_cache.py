"""A conversation reuses the previous call's KV cache (`prefix_cache=`, `qwen_jax.generation.conversation_cache`):
the tokens and logits are those of a call without it (greedy, seeded sampling with a penalty, streaming,
a common prefix that ends inside the previous answer, the same prompt again, a chunked rest, a mesh,
speculative decoding with its draft's cache); batches, `prefix_cache=False`, other weights and
dynamic-NTK rope reuse nothing."""

import jax
import numpy as np
import pytest
from flax import nnx

from qwen_jax import make_mesh
from qwen_jax.config import GenerationConfig, Qwen2Config
from qwen_jax.generation import conversation_cache
from qwen_jax.generation.options import resolve_batch
from qwen_jax.generation.speculative import SpeculativeOptions
from qwen_jax.generation.speculative import generate_batch as speculative_generate_batch
from qwen_jax.generation.static import generate_ids, stream_ids
from qwen_jax.model.causal_lm import create_model

VOCAB = 64
NEW_TOKENS = 12
SAMPLED = dict(temperature=0.8, top_p=0.95, repetition_penalty=1.2, seed=5)


def _config(**overrides):
    return Qwen2Config(
        **{
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "tie_word_embeddings": False,  # tied tiny random models mostly repeat their input token
            **overrides,
        }
    )


@pytest.fixture(scope="module")
def model():
    return create_model(_config(), dtype="float32", seed=0)


@pytest.fixture(autouse=True)
def nothing_kept():
    conversation_cache.clear()
    yield
    conversation_cache.clear()


def _random(count, seed):
    return [int(t) for t in np.random.default_rng(seed).integers(0, VOCAB, count)]


def _fresh(model, prompt, **sampling):
    """The call without any reuse (and what it keeps dropped)."""
    result = generate_ids(
        model, [prompt], max_new_tokens=NEW_TOKENS, return_logits=True, prefix_cache=False, **sampling
    )
    conversation_cache.clear(model)
    return result


def test_turns_reuse_the_previous_call_and_give_the_same_tokens(model):
    # Seeded sampling with a repetition penalty (whose seen set comes from the whole prompt); the
    # other tests are greedy.
    sampling = SAMPLED
    prompt = _random(40, 1)
    turns = []
    for turn in range(3):
        result = generate_ids(model, [prompt], max_new_tokens=NEW_TOKENS, return_logits=True, **sampling)
        turns.append((prompt, result))
        answer = result.token_ids[0]
        assert conversation_cache.kept_tokens(model) == len(prompt) + len(answer) - 1
        # The next turn: the history with the answer, then a new user message.
        prompt = prompt + answer + _random(7, 10 + turn)
    for turn, (prompt, result) in enumerate(turns):
        expected = _fresh(model, prompt, **sampling)
        assert result.token_ids == expected.token_ids
        np.testing.assert_allclose(result.logits[0], expected.logits[0], atol=1e-5, rtol=0)
        previous = turns[turn - 1] if turn else None
        cached = len(previous[0]) + len(previous[1].token_ids[0]) - 1 if previous else 0
        assert result.timing.cached_tokens == cached and result.timing.prompt_tokens == len(prompt)


def test_partial_prefix_same_prompt_stream_and_chunked_rest(model):
    prompt = _random(40, 2)
    answer = generate_ids(model, [prompt], max_new_tokens=NEW_TOKENS, temperature=0).token_ids[0]
    # A re-rendered history whose answer differs after its 5th token: the common prefix is reused.
    edited = prompt + answer[:5] + [(answer[5] + 1) % VOCAB] + _random(20, 3)
    streamed = stream_ids(model, edited, max_new_tokens=NEW_TOKENS, temperature=0)
    tokens = list(streamed)
    assert streamed.result.timing.cached_tokens == len(prompt) + 5
    # The same prompt again: all but its last token are reused.
    again = generate_ids(model, [edited], max_new_tokens=NEW_TOKENS, temperature=0)
    assert again.timing.cached_tokens == len(edited) - 1 and again.token_ids[0] == tokens
    # The rest prefilled in several chunks of 8 tokens, each reading the cache.
    longer = edited + tokens + _random(30, 4)
    chunked = generate_ids(model, [longer], max_new_tokens=NEW_TOKENS, temperature=0, prefill_chunk=8)
    assert chunked.timing.cached_tokens == len(edited) + len(tokens) - 1
    assert tokens == _fresh(model, edited, temperature=0).token_ids[0]
    # A stream stopped after 3 tokens (Ctrl-C in the chat) keeps what it computed.
    stopped = stream_ids(model, longer, max_new_tokens=NEW_TOKENS, temperature=0)
    assert [next(stopped) for _ in range(3)] == chunked.token_ids[0][:3]
    stopped.close()
    assert conversation_cache.kept_tokens(model) == len(longer) + 2
    assert chunked.token_ids == _fresh(model, longer, temperature=0).token_ids


def test_what_reuses_nothing(model):
    prompt = _random(40, 5)
    answer = generate_ids(model, [prompt], max_new_tokens=NEW_TOKENS, temperature=0).token_ids[0]
    follow = prompt + answer + _random(5, 6)
    # A batch reuses nothing, keeps nothing, and drops what was kept.
    batch = generate_ids(model, [follow, follow[:30]], max_new_tokens=NEW_TOKENS, temperature=0)
    assert batch.timing.cached_tokens == 0 and conversation_cache.kept_tokens(model) == 0
    # prefix_cache=False: likewise.
    generate_ids(model, [prompt], max_new_tokens=NEW_TOKENS, temperature=0)
    off = generate_ids(model, [follow], max_new_tokens=NEW_TOKENS, temperature=0, prefix_cache=False)
    assert off.timing.cached_tokens == 0 and conversation_cache.kept_tokens(model) == 0
    # A shorter common prefix than MIN_REUSED_TOKENS is prefilled again.
    generate_ids(model, [prompt], max_new_tokens=NEW_TOKENS, temperature=0)
    short = prompt[: conversation_cache.MIN_REUSED_TOKENS - 1] + _random(20, 7)
    assert generate_ids(model, [short], max_new_tokens=NEW_TOKENS, temperature=0).timing.cached_tokens == 0
    # clear() frees what was kept.
    generate_ids(model, [prompt], max_new_tokens=NEW_TOKENS, temperature=0)
    conversation_cache.clear(model)
    assert conversation_cache.kept_tokens(model) == 0


def test_other_weights_invalidate_the_kept_cache():
    model = create_model(_config(), dtype="float32", seed=0)
    prompt = _random(40, 8)
    answer = generate_ids(model, [prompt], max_new_tokens=NEW_TOKENS, temperature=0).token_ids[0]
    follow = prompt + answer + _random(5, 9)
    # New parameter arrays (a training step, nnx.update): the kept keys and values are stale.
    nnx.update(model, jax.tree.map(lambda x: x * 1.5, nnx.state(model)))
    after = generate_ids(model, [follow], max_new_tokens=NEW_TOKENS, temperature=0, return_logits=True)
    assert after.timing.cached_tokens == 0
    expected = _fresh(model, follow, temperature=0)
    assert after.token_ids == expected.token_ids
    np.testing.assert_allclose(after.logits[0], expected.logits[0], atol=1e-5, rtol=0)


def test_dynamic_ntk_rope_reuses_nothing():
    model = create_model(_config().with_rope_scaling({"type": "dynamic", "factor": 2.0}), dtype="float32", seed=0)
    prompt = _random(40, 10)
    answer = generate_ids(model, [prompt], max_new_tokens=NEW_TOKENS, temperature=0).token_ids[0]
    follow = prompt + answer + _random(5, 11)
    assert generate_ids(model, [follow], max_new_tokens=NEW_TOKENS, temperature=0).timing.cached_tokens == 0


def test_on_a_tensor_parallel_mesh(model):
    mesh = make_mesh(data=1, fsdp=1, tensor=2, devices=jax.devices()[:2])
    sharded = create_model(_config(), dtype="float32", seed=0, mesh=mesh)
    prompt = _random(40, 12)
    answer = generate_ids(sharded, [prompt], max_new_tokens=NEW_TOKENS, temperature=0).token_ids[0]
    follow = prompt + answer + _random(9, 13)
    reused = generate_ids(sharded, [follow], max_new_tokens=NEW_TOKENS, temperature=0)
    assert reused.timing.cached_tokens == len(prompt) + len(answer) - 1
    assert reused.token_ids == _fresh(model, follow, temperature=0).token_ids


def test_speculative_turns_reuse_the_target_and_draft_caches(model):
    draft = create_model(_config(num_hidden_layers=1), dtype="float32", seed=4)
    spec = SpeculativeOptions("draft", draft_model=draft)
    options, seeds = resolve_batch(GenerationConfig(), 1, vocab_size=VOCAB, max_new_tokens=NEW_TOKENS, temperature=0)
    prompt = _random(40, 14)
    first = speculative_generate_batch(model, [prompt], options, seeds, spec, prefix_cache=True).token_ids[0]
    follow = prompt + first + _random(6, 15)
    for kept_model in (model, draft):
        assert conversation_cache.kept_tokens(kept_model) == len(prompt) + len(first) - 1
    reused = speculative_generate_batch(model, [follow], options, seeds, spec, prefix_cache=True)
    assert reused.timing.cached_tokens == len(prompt) + len(first) - 1
    conversation_cache.clear()
    fresh = speculative_generate_batch(model, [follow], options, seeds, spec)
    assert fresh.timing.cached_tokens == 0
    assert reused.token_ids == fresh.token_ids == _fresh(model, follow, temperature=0).token_ids
    # The draft's proposals (and so the acceptance) are those of a draft that prefilled everything.
    assert reused.speculation == fresh.speculation
