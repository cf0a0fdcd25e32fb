"""Speculative decoding in the engine: greedy rows give plain decoding's tokens (alone, in a busy batch,
beside prompts going in chunk by chunk), stops / max tokens / logprobs inside a step's accepted
proposals, aborts, sampled rows, the back-off rule, no compilation after warm-up.

Random weights do not copy their input, so n-gram lookup rarely proposes a correct token: most tests
replace the engine's proposer by an oracle that knows plain decoding's output and proposes it (every
proposal accepted) or proposes some of it then wrong tokens (rejections at a known place)."""

import jax
import pytest
from serving import (  # noqa: F401
    ENGINE_CHUNK,
    ENGINE_MAX_LEN,
    ENGINE_SLOTS,
    count_compiles,
    tiny_engine,
    tiny_model,
    wait_until,
)

import qwen_jax.engine.core as engine_core
from qwen_jax.engine.core import Engine
from qwen_jax.errors import EngineError
from qwen_jax.generation.speculative import SpeculativeOptions

K = 3
PROMPTS = ["The quick brown fox", "Hello there, how are you today?", "abcabcabc", "12345 678"]
LONG = "Once upon a time in a land far away, a fox"  # goes in over three mixed steps (16-token chunks)


@pytest.fixture(scope="module")
def spec_engine(tiny_model, tiny_engine):
    """`tiny_engine`'s configuration with ngram speculation, K = 3, at any load (it shares the
    plain programs; warm-up compiles the speculative ones)."""
    model, tokenizer = tiny_model
    engine = Engine(
        model,
        tokenizer,
        slots=ENGINE_SLOTS,
        max_len=ENGINE_MAX_LEN,
        prefill_chunk=ENGINE_CHUNK,
        speculative=SpeculativeOptions(num_speculative_tokens=K),
        speculative_max_rows=ENGINE_SLOTS,
        warmup=True,
    )
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def references(tiny_engine):
    """Plain greedy decoding of every prompt (48 tokens), from the engine without speculation."""
    prompts = [*PROMPTS, LONG]
    completions = tiny_engine.generate(prompts, progress=False, max_new_tokens=20, temperature=0)
    return {tuple(tiny_engine.tokenizer.encode(p)): c.token_ids for p, c in zip(prompts, completions)}


class Oracle:
    """Proposes plain decoding's next tokens: the first `correct` of each proposal right, the rest wrong."""

    def __init__(self, references, correct: int = K):
        self.references, self.correct, self.calls = references, correct, 0

    def __call__(self, tokens, k, ngram_min, ngram_max):
        self.calls += 1
        for prompt, output in self.references.items():
            if tuple(tokens[: len(prompt)]) == prompt and len(tokens) - len(prompt) <= len(output):
                done = len(tokens) - len(prompt)
                right = output[done : done + k]
                return [t if i < self.correct else (t + 1) % 256 for i, t in enumerate(right)]
        return []


@pytest.fixture
def oracle(monkeypatch, references):
    def install(correct=K):
        proposer = Oracle(references, correct)
        monkeypatch.setattr(engine_core, "ngram_proposals", proposer)
        return proposer

    return install


def _delta(engine, before):
    after = engine.stats()
    return {
        name: getattr(after, name) - getattr(before, name)
        for name in (
            "speculative_steps",
            "speculative_proposed_tokens",
            "speculative_accepted_tokens",
            "speculative_skipped_steps",
            "speculative_pauses",
            "decode_steps",
            "prefill_chunks",
        )
    }


@pytest.mark.parametrize("correct", [K, 1, 0])
def test_greedy_equals_plain_alone_and_in_a_busy_batch(spec_engine, references, oracle, correct):
    oracle(correct)
    engine = spec_engine
    before = engine.stats()
    alone = engine.generate([PROMPTS[0]], progress=False, max_new_tokens=20, temperature=0)[0]
    assert alone.token_ids == references[tuple(engine.tokenizer.encode(PROMPTS[0]))]
    # Busy: four decoding rows (one sampling), then a long prompt going in by mixed steps beside them.
    handles = [engine.submit(p, max_new_tokens=20, temperature=0) for p in PROMPTS]
    sampled = engine.submit(PROMPTS[1], max_new_tokens=20, temperature=0.9, top_k=20, seed=3)
    assert wait_until(lambda: engine.stats().generated_tokens >= before.generated_tokens + 30, interval=0.001)
    late = engine.submit(LONG, max_new_tokens=20, temperature=0)
    for prompt, handle in zip([*PROMPTS, LONG], [*handles, late]):
        assert handle.result(120).token_ids == references[tuple(engine.tokenizer.encode(prompt))], prompt
    assert len(sampled.result(120).token_ids) == 20
    delta = _delta(engine, before)
    assert delta["speculative_steps"] > 0 and delta["prefill_chunks"] >= 3, delta
    if correct == K:  # every proposal accepted: several tokens per step
        assert delta["speculative_accepted_tokens"] >= delta["speculative_proposed_tokens"] // 2 > 0, delta
    if correct == 0:
        assert delta["speculative_accepted_tokens"] == 0 and delta["speculative_pauses"] > 0, delta


def test_real_ngram_lookup_gives_plain_tokens(spec_engine, references):
    before = spec_engine.stats()
    completions = spec_engine.generate(PROMPTS, progress=False, max_new_tokens=20, temperature=0)
    for prompt, completion in zip(PROMPTS, completions):
        assert completion.token_ids == references[tuple(spec_engine.tokenizer.encode(prompt))]
    assert _delta(spec_engine, before)["speculative_proposed_tokens"] > 0  # "abcabcabc" has matches


def test_stops_max_tokens_and_logprobs_inside_a_step(spec_engine, tiny_engine, references, oracle):
    proposer = oracle(K)
    prompt = PROMPTS[0]
    free = tiny_engine.generate([prompt], progress=False, max_new_tokens=20, temperature=0, logprobs=2)[0]
    for max_new_tokens in (1, 2, 6, 7):  # ends at every place inside a step of K + 1 = 4 tokens
        got = spec_engine.generate([prompt], progress=False, max_new_tokens=max_new_tokens, temperature=0)[0]
        assert got.token_ids == free.token_ids[:max_new_tokens] and got.finish_reason == "length"
    stop = free.text[9:11]
    cut = spec_engine.generate([prompt], progress=False, max_new_tokens=20, temperature=0, stop=[stop])[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.index(stop)]
    stop_id = free.token_ids[6]
    by_id = spec_engine.generate([prompt], progress=False, max_new_tokens=20, temperature=0, stop=[stop_id])[0]
    assert by_id.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]
    before = spec_engine.stats()
    scored = spec_engine.generate([prompt], progress=False, max_new_tokens=20, temperature=0, logprobs=2)[0]
    assert _delta(spec_engine, before)["speculative_accepted_tokens"] > 0 and proposer.calls > 0
    assert scored.token_ids == free.token_ids
    for mine, theirs in zip(scored.logprobs, free.logprobs):  # each accepted token's own log-probability
        assert mine.token_id == theirs.token_id and mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)
        assert [t for t, _ in mine.top] == [t for t, _ in theirs.top]


def test_abort_during_speculation(spec_engine, references, oracle):
    """Aborted from its own delta callback (on the engine thread) once 5 tokens are out: the request
    ends there, with plain decoding's first tokens, and the engine serves the next one."""
    oracle(K)

    def on_delta(delta):
        if delta.completion_tokens >= 5 and delta.finish_reason is None:
            spec_engine.abort("spec-abort")

    before = spec_engine.stats()
    handle = spec_engine.submit(
        PROMPTS[0], max_new_tokens=40, temperature=0, request_id="spec-abort", on_delta=on_delta
    )
    completion = handle.result(60)
    assert completion.finish_reason == "abort" and 5 <= len(completion.token_ids) < 20
    assert (
        completion.token_ids == references[tuple(spec_engine.tokenizer.encode(PROMPTS[0]))][: len(completion.token_ids)]
    )
    assert _delta(spec_engine, before)["speculative_steps"] > 0
    assert wait_until(lambda: spec_engine.stats().running == 0)
    again = spec_engine.generate([PROMPTS[0]], progress=False, max_new_tokens=20, temperature=0)[0]
    assert again.finish_reason == "length" and len(again.token_ids) == 20


def test_sampled_rows_and_opt_out(spec_engine, references, oracle):
    """Sampled rows (rejection sampling over the oracle's point-mass proposals) run to their length
    beside an exact greedy row; a request submitted with speculate=False never proposes."""
    oracle(K)
    handles = [
        spec_engine.submit(PROMPTS[0], max_new_tokens=20, temperature=0.8, seed=seed, top_p=0.9) for seed in (1, 2)
    ]
    greedy = spec_engine.submit(PROMPTS[2], max_new_tokens=20, temperature=0)
    assert greedy.result(120).token_ids == references[tuple(spec_engine.tokenizer.encode(PROMPTS[2]))]
    runs = [h.result(120).token_ids for h in handles]
    assert all(len(r) == 20 for r in runs) and runs[0] != runs[1]
    before = spec_engine.stats()
    out = spec_engine.submit(PROMPTS[0], max_new_tokens=20, temperature=0, speculate=False).result(120)
    assert out.token_ids == references[tuple(spec_engine.tokenizer.encode(PROMPTS[0]))]
    assert _delta(spec_engine, before)["speculative_steps"] == 0


def test_back_off_at_load(tiny_model, spec_engine, references, oracle):
    """With speculative_max_rows=2, steps with more decoding rows do not speculate."""
    oracle(K)
    model, tokenizer = tiny_model
    with Engine(
        model,
        tokenizer,
        slots=ENGINE_SLOTS,
        max_len=ENGINE_MAX_LEN,
        prefill_chunk=ENGINE_CHUNK,
        speculative=SpeculativeOptions(num_speculative_tokens=K),
        speculative_max_rows=2,
    ) as engine:
        completions = engine.generate(PROMPTS, progress=False, max_new_tokens=20, temperature=0)
        stats = engine.stats()
    for prompt, completion in zip(PROMPTS, completions):
        assert completion.token_ids == references[tuple(tokenizer.encode(prompt))]
    assert stats.speculative_skipped_steps > 0, stats
    assert stats.speculative_steps < stats.decode_steps, stats


def test_refused_options(tiny_model):
    model, tokenizer = tiny_model
    with pytest.raises(EngineError, match="speculative_max_rows"):
        Engine(model, tokenizer, slots=1, max_len=32, speculative="ngram", speculative_max_rows=0)
    with pytest.raises(EngineError, match="speculative method"):
        Engine(model, tokenizer, slots=1, max_len=32, speculative="eagle")


def test_no_compilation_after_warmup(spec_engine, oracle):
    oracle(1)
    settings = [dict(temperature=0), dict(temperature=0.9, top_k=10, seed=1), dict(temperature=0, logprobs=3)]
    with count_compiles() as compiles:
        handles = [
            spec_engine.submit(p, max_new_tokens=12, stop=["q"], **settings[i % 3])
            for i, p in enumerate([*PROMPTS, LONG] * 2)
        ]
        for handle in handles:
            handle.result(120)
    assert compiles == []


def test_on_a_mesh(tmp_path, references, oracle):
    """Speculative steps on a data x tensor mesh (slots over data, heads over tensor) give the same tokens."""
    from serving import byte_checkpoint

    import qwen_jax

    oracle(2)
    path = byte_checkpoint(tmp_path / "ckpt", tie_word_embeddings=False, initializer_range=0.3)
    mesh = qwen_jax.make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
    model, tokenizer = qwen_jax.load(path, mesh=mesh)
    with Engine(
        model, tokenizer, slots=2, max_len=ENGINE_MAX_LEN, prefill_chunk=ENGINE_CHUNK, speculative="ngram"
    ) as engine:
        completions = engine.generate(PROMPTS[:2], progress=False, max_new_tokens=12, temperature=0)
        stats = engine.stats()
    for prompt, completion in zip(PROMPTS, completions):
        assert completion.token_ids == references[tuple(tokenizer.encode(prompt))][:12]
    assert stats.speculative_accepted_tokens > 0, stats
