"""Draft-model speculation in the engine: greedy rows give plain decoding's tokens with a draft that
always agrees (the target's own weights: every proposal accepted) and with one that sometimes does
(the target's first layer: rejections at places no test chooses), alone, in a busy batch beside
prompts going in chunk by chunk, after a prefix-cache hit; max tokens, stops and logprobs inside a
step; aborts; sampled rows; a refused draft; no compilation after warm-up.

The rejection sampler itself (sampled rows follow the target's distribution) is tested
statistically on the static path (tests/generation/test_speculative.py); the engine runs the same
traced code (`draft_proposals`, `verify_proposals`)."""

from pathlib import Path

import jax
import pytest
from conftest import build_hf_model, save_hf_checkpoint
from serving import (  # noqa: F401
    ENGINE_CHUNK,
    ENGINE_MAX_LEN,
    ENGINE_SLOTS,
    count_compiles,
    tiny_engine,
    tiny_engine_uncached,
    tiny_model,
    wait_until,
    write_byte_tokenizer,
)

import qwen_jax
from qwen_jax.config import Qwen2Config
from qwen_jax.engine.core import Engine
from qwen_jax.errors import EngineError
from qwen_jax.generation.speculative import SpeculativeOptions
from qwen_jax.model.causal_lm import create_model

K = 3
PROMPTS = ["The quick brown fox", "Hello there, how are you today?", "abcabcabc", "12345 678"]
LONG = "Once upon a time in a land far away, a fox"  # goes in over three mixed steps (16-token chunks)


@pytest.fixture(scope="module")
def first_layer_draft(tmp_path_factory):
    """`tiny_model`'s checkpoint (the same seed and settings) cut to its first layer."""
    hf = build_hf_model(
        seed=0, vocab_size=259, eos_token_id=None, bos_token_id=None, tie_word_embeddings=False, initializer_range=0.3
    )
    hf.model.layers = hf.model.layers[:1]
    hf.config.num_hidden_layers = 1
    hf.config.layer_types = hf.config.layer_types[:1]
    path = save_hf_checkpoint(hf, tmp_path_factory.mktemp("draft") / "ckpt")
    write_byte_tokenizer(Path(path))
    return qwen_jax.load(path)[0]


def _engine(model, tokenizer, draft, warmup=False, **options):
    """Speculating while at most 4 rows decode (the default): speculative steps of widths 1, 2 and 4."""
    return Engine(
        model,
        tokenizer,
        slots=ENGINE_SLOTS,
        max_len=ENGINE_MAX_LEN,
        prefill_chunk=ENGINE_CHUNK,
        speculative=SpeculativeOptions("draft", num_speculative_tokens=K, draft_model=draft),
        warmup=warmup,
        **options,
    )


@pytest.fixture(scope="module")
def same_engine(tiny_model, tiny_engine):
    """The target's own weights as the draft (every proposal accepted), warmed up."""
    model, tokenizer = tiny_model
    engine = _engine(model, tokenizer, model, warmup=True)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def partial_engine(tiny_model, tiny_engine, first_layer_draft):
    """The target's first layer as the draft (some proposals rejected); compiles on first use."""
    model, tokenizer = tiny_model
    engine = _engine(model, tokenizer, first_layer_draft)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def references(tiny_engine):
    """Plain greedy decoding of every prompt (20 tokens), from the engine without speculation."""
    prompts = [*PROMPTS, LONG]
    completions = tiny_engine.generate(prompts, progress=False, max_new_tokens=20, temperature=0)
    return {tuple(tiny_engine.tokenizer.encode(p)): c.token_ids for p, c in zip(prompts, completions)}


def _delta(engine, before):
    after = engine.stats()
    return {
        name: getattr(after, name) - getattr(before, name)
        for name in (
            "speculative_steps",
            "speculative_proposed_tokens",
            "speculative_accepted_tokens",
            "speculative_draft_catch_up_tokens",
            "prefix_cache_hit_tokens",
            "prefill_chunks",
        )
    }


@pytest.mark.parametrize("draft", ["same", "first_layer"])
def test_greedy_equals_plain_alone_and_in_a_busy_batch(request, references, draft):
    engine = request.getfixturevalue("same_engine" if draft == "same" else "partial_engine")
    encode = engine.tokenizer.encode
    before = engine.stats()
    alone = engine.generate([PROMPTS[0]], progress=False, max_new_tokens=20, temperature=0)[0]
    assert alone.token_ids == references[tuple(encode(PROMPTS[0]))]
    # Busy: four decoding rows (one sampling), then a long prompt going in by mixed steps beside them.
    handles = [engine.submit(p, max_new_tokens=20, temperature=0) for p in PROMPTS]
    sampled = engine.submit(PROMPTS[1], max_new_tokens=20, temperature=0.9, top_k=20, seed=3)
    assert wait_until(lambda: engine.stats().generated_tokens >= before.generated_tokens + 30, interval=0.001)
    late = engine.submit(LONG, max_new_tokens=20, temperature=0)
    for prompt, handle in zip([*PROMPTS, LONG], [*handles, late]):
        assert handle.result(120).token_ids == references[tuple(encode(prompt))], prompt
    assert len(sampled.result(120).token_ids) == 20
    delta = _delta(engine, before)
    assert delta["speculative_steps"] > 0 and delta["prefill_chunks"] >= 3, delta
    # The draft read every prompt (the prefix cache spares the target only) before proposing.
    assert delta["speculative_draft_catch_up_tokens"] >= len(encode(PROMPTS[0])), delta
    if draft == "same":
        assert delta["speculative_accepted_tokens"] == delta["speculative_proposed_tokens"] > 0, delta
    else:
        assert 0 < delta["speculative_accepted_tokens"] < delta["speculative_proposed_tokens"], delta


def test_after_a_prefix_cache_hit(same_engine, tiny_engine_uncached):
    """The target copies a cached prefix; its draft, which has no prefix cache, reads it all."""
    first, second = LONG + " jumped", LONG + " ran"  # 32 tokens in common: two blocks
    expected = tiny_engine_uncached.generate([second], progress=False, max_new_tokens=12, temperature=0)[0]
    same_engine.generate([first], progress=False, max_new_tokens=4, temperature=0)
    before = same_engine.stats()
    got = same_engine.generate([second], progress=False, max_new_tokens=12, temperature=0)[0]
    delta = _delta(same_engine, before)
    assert got.token_ids == expected.token_ids
    assert delta["prefix_cache_hit_tokens"] >= 32 and delta["speculative_steps"] > 0, delta
    assert delta["speculative_draft_catch_up_tokens"] >= len(same_engine.tokenizer.encode(second)) - 1, delta


def test_stops_max_tokens_and_logprobs_inside_a_step(same_engine, tiny_engine):
    prompt = PROMPTS[0]
    free = tiny_engine.generate([prompt], progress=False, max_new_tokens=20, temperature=0, logprobs=2)[0]
    for max_new_tokens in (1, 2, 6, 7):  # ends at every place inside a step of K + 1 = 4 tokens
        got = same_engine.generate([prompt], progress=False, max_new_tokens=max_new_tokens, temperature=0)[0]
        assert got.token_ids == free.token_ids[:max_new_tokens] and got.finish_reason == "length"
    stop = free.text[9:11]
    cut = same_engine.generate([prompt], progress=False, max_new_tokens=20, temperature=0, stop=[stop])[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.index(stop)]
    stop_id = free.token_ids[6]
    by_id = same_engine.generate([prompt], progress=False, max_new_tokens=20, temperature=0, stop=[stop_id])[0]
    assert by_id.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]
    before = same_engine.stats()
    scored = same_engine.generate([prompt], progress=False, max_new_tokens=20, temperature=0, logprobs=2)[0]
    assert _delta(same_engine, before)["speculative_accepted_tokens"] > 0
    assert scored.token_ids == free.token_ids
    for mine, theirs in zip(scored.logprobs, free.logprobs):  # each accepted token's own log-probability
        assert mine.token_id == theirs.token_id and mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)
        assert [t for t, _ in mine.top] == [t for t, _ in theirs.top]


def test_abort_mid_run_and_sampled_rows(same_engine, references):
    """Aborted from its own delta callback once 5 tokens are out: the request ends there with plain
    decoding's first tokens; sampled rows (draft tokens drawn from q, rejection sampling) then run to
    their length, a seed repeating its tokens."""

    def on_delta(delta):
        if delta.completion_tokens >= 5 and delta.finish_reason is None:
            same_engine.abort("draft-abort")

    before = same_engine.stats()
    handle = same_engine.submit(
        PROMPTS[0], max_new_tokens=40, temperature=0, request_id="draft-abort", on_delta=on_delta
    )
    completion = handle.result(60)
    assert completion.finish_reason == "abort" and 5 <= len(completion.token_ids) < 20
    assert (
        completion.token_ids == references[tuple(same_engine.tokenizer.encode(PROMPTS[0]))][: len(completion.token_ids)]
    )
    assert _delta(same_engine, before)["speculative_steps"] > 0
    assert wait_until(lambda: same_engine.stats().running == 0)
    before = same_engine.stats()
    sampling = dict(max_new_tokens=20, temperature=0.8, top_p=0.9)
    runs = [same_engine.generate([PROMPTS[0]], progress=False, seed=seed, **sampling)[0] for seed in (1, 2, 1)]
    assert all(r.finish_reason == "length" and len(r.token_ids) == 20 for r in runs)
    assert runs[0].token_ids != runs[1].token_ids and runs[0].token_ids == runs[2].token_ids  # alone: reproducible
    assert _delta(same_engine, before)["speculative_accepted_tokens"] > 0


def test_refused_drafts(tiny_model):
    model, tokenizer = tiny_model

    def draft(vocab_size, context):
        config = Qwen2Config(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=context,
        )  # fmt: skip
        return create_model(config, dtype="float32", seed=1)

    # The tokenizer has 259 tokens: a draft whose table has fewer has another tokenizer.
    with pytest.raises(EngineError, match="vocabulary"):
        Engine(
            model, tokenizer, slots=1, max_len=32, speculative=SpeculativeOptions("draft", draft_model=draft(200, 128))
        )
    short = draft(259, 16)
    with pytest.raises(EngineError, match="context"):
        Engine(model, tokenizer, slots=1, max_len=32, speculative=SpeculativeOptions("draft", draft_model=short))


def test_no_compilation_after_warmup(same_engine):
    settings = [dict(temperature=0), dict(temperature=0.9, top_k=10, seed=1), dict(temperature=0, logprobs=3)]
    with count_compiles() as compiles:
        handles = [
            same_engine.submit(p, max_new_tokens=12, stop=["q"], **settings[i % 3])
            for i, p in enumerate([*PROMPTS, LONG] * 2)
        ]
        for handle in handles:
            handle.result(120)
    assert compiles == []


def test_on_a_mesh(tmp_path, references):
    """The draft on the target's data x tensor mesh (its cache rows over data, heads over tensor): the
    same tokens; a draft left off the mesh is refused."""
    from serving import byte_checkpoint

    path = byte_checkpoint(tmp_path / "ckpt", tie_word_embeddings=False, initializer_range=0.3)
    mesh = qwen_jax.make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
    model, tokenizer = qwen_jax.load(path, mesh=mesh)
    draft, _ = qwen_jax.load(path, mesh=mesh)
    spec = SpeculativeOptions("draft", num_speculative_tokens=K, draft_model=draft)
    with Engine(
        model, tokenizer, slots=2, max_len=ENGINE_MAX_LEN, prefill_chunk=ENGINE_CHUNK, speculative=spec
    ) as engine:
        completions = engine.generate(PROMPTS[:2], progress=False, max_new_tokens=12, temperature=0)
        stats = engine.stats()
    for prompt, completion in zip(PROMPTS, completions):
        assert completion.token_ids == references[tuple(tokenizer.encode(prompt))][:12]
    assert stats.speculative_accepted_tokens == stats.speculative_proposed_tokens > 0, stats
    with pytest.raises(EngineError, match="mesh"):
        Engine(
            model,
            tokenizer,
            slots=1,
            max_len=32,
            speculative=SpeculativeOptions("draft", draft_model=qwen_jax.load(path)[0]),
        )
