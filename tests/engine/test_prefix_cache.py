"""Automatic prefix caching: the block index, and the engine's tokens with and without cache hits."""

import random

import pytest
from serving import ENGINE_CHUNK as CHUNK
from serving import ENGINE_MAX_LEN as MAX_LEN
from serving import ENGINE_SLOTS as SLOTS
from serving import tiny_engine, tiny_engine_uncached, tiny_model, wait_until  # noqa: F401 (fixtures)

import qwen_jax
from qwen_jax.engine.prefix_cache import PrefixIndex
from qwen_jax.errors import EngineError

BASE = "System: you are a helpful fox. User: "  # 37 tokens (bytes): two whole blocks of 16
SEEDED = dict(temperature=0.9, top_k=40, seed=11, repetition_penalty=1.4)  # the penalty reads the cached prefix


def test_index_chains_blocks_leaves_a_token_and_evicts_least_recently_used():
    index = PrefixIndex(blocks=4, block_tokens=4)
    tokens = list(range(10))
    assert index.lookup(tokens) == []
    copies = index.store(tokens)  # two whole blocks
    assert [j for j, _ in copies] == [0, 1] and len({b for _, b in copies}) == 2
    assert index.store(tokens) == []  # already cached
    assert index.lookup(tokens) == [b for _, b in copies]
    assert index.lookup(tokens[:8]) == [copies[0][1]]  # at least the last token is left to prefill
    assert index.lookup([0, 1, 2, 9, 4, 5, 6, 7, 8]) == []  # block keys chain: a changed block 0 misses all
    other = index.store([5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7])  # three blocks: two free, one evicted
    assert len(other) == 3 and index.evicted == 1
    assert index.lookup(tokens) == [
        copies[0][1]
    ]  # the least recently used block went: block 1 (block 0 was looked up last)
    assert index.stats().blocks_used == 4
    # At most `capacity` blocks of one sequence; its block 0 (= `tokens`' block 0) is cached already.
    assert [j for j, _ in index.store(list(range(100)))] == [1, 2, 3]
    assert index.stats().blocks_used == 4 and len(index.lookup(list(range(100)))) == 4


@pytest.fixture
def engine(tiny_engine):
    yield tiny_engine
    assert wait_until(lambda: tiny_engine.stats().running == 0 and tiny_engine.stats().waiting == 0)


@pytest.fixture
def uncached(tiny_engine_uncached):
    return tiny_engine_uncached


def _run(engine, prompts, settings):
    handles = [engine.submit(p, **o) for p, o in zip(prompts, settings)]
    return [h.result(120) for h in handles]


def test_hits_give_the_tokens_of_no_cache_alone_and_in_a_busy_batch(engine, uncached):
    """Greedy and seeded requests give the same tokens with and without hits: a repeated prompt, a
    hit ending mid-block (the prompts part inside a block), a chat's next turn (the previous turn's
    prompt + output are cached), and all of them at once beside requests that miss."""
    assert engine.stats().prefix_cache_blocks == SLOTS * MAX_LEN // 16
    first = engine.generate([BASE + "hi"], max_new_tokens=12, temperature=0, progress=False)[0]
    turn = [*(BASE + "hi").encode(), *first.token_ids, *b" ok"]  # the first's prompt + output, and more
    prompts = [BASE + "hi", BASE + "hello", BASE[:25] + "zz", turn, "unrelated prompt", BASE + "hi"]
    settings = [dict(max_new_tokens=12, temperature=0), SEEDED, dict(max_new_tokens=8, temperature=0)]
    settings = [{**settings[i % 3], "max_new_tokens": 10} for i in range(len(prompts))]
    reference = [c.token_ids for c in _run(uncached, prompts, settings)]
    before = engine.stats()
    alone = [_run(engine, [p], [o])[0] for p, o in zip(prompts, settings)]
    assert [c.token_ids for c in alone] == reference
    hits = [c.cached_tokens for c in alone]
    # The next turn: the first's prompt + output less its last token were cached (39 + 11 tokens: 3 blocks).
    turn_hit = 16 * ((len(BASE + "hi") + len(first.token_ids) - 1) // 16)
    assert hits[0] == 32 and hits[1] == 32 and hits[2] == 16 and hits[3] == turn_hit >= 32 and hits[4] == 0, hits
    after = engine.stats()
    assert after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens == sum(hits)
    assert after.prefix_cache_queried_tokens - before.prefix_cache_queried_tokens == sum(c.prompt_tokens for c in alone)
    busy = _run(engine, prompts + ["x" * 30, "y" * 20], settings + [dict(max_new_tokens=20, temperature=0)] * 2)
    assert [c.token_ids for c in busy[: len(prompts)]] == reference
    assert all(c.cached_tokens for c in busy[:4])


def test_a_running_request_extending_a_cached_prefix(engine, uncached):
    """A long request runs; requests whose prompts start with its prompt (cached as soon as it is in)
    hit while it still decodes, then extend it differently; every one gives its uncached tokens."""
    long_settings = dict(max_new_tokens=20, temperature=0.7, seed=3)
    new_base = "A fox and a crow met by the river: "  # 35 tokens, in no earlier prompt
    prompts = [new_base + "tell", new_base + "tell me", new_base + "tell us more"]
    settings = [long_settings, dict(max_new_tokens=6, temperature=0), SEEDED | dict(max_new_tokens=6)]
    reference = [c.token_ids for c in _run(uncached, prompts, settings)]
    engine.generate(["warm " * 9], max_new_tokens=2, progress=False)  # another prefix in the pool
    before = engine.stats()
    running = engine.submit(prompts[0], **settings[0])
    assert wait_until(lambda: engine.stats().generated_tokens >= before.generated_tokens + 3, interval=0.001)
    late = [engine.submit(p, **o) for p, o in zip(prompts[1:], settings[1:])]
    assert [h.result(120).token_ids for h in (running, *late)] == reference
    assert all(h.result().cached_tokens >= 32 for h in late)


def test_eviction_under_pressure_aborts_and_no_leak(tiny_model, uncached):
    """A pool of 5 blocks under many requests with shared prefixes and aborts (queued, prefilling and
    decoding): the pool stays within its size, evicts, never refuses a request, and every request
    that was not aborted gives its uncached tokens."""
    model, tokenizer = tiny_model
    engine = qwen_jax.Engine(model, tokenizer, slots=SLOTS, max_len=MAX_LEN, prefill_chunk=CHUNK, prefix_cache_blocks=5)
    try:
        rng = random.Random(0)
        prompts = [
            rng.choice([BASE, BASE[:20], "Once upon a time in a land "]) + rng.choice("abcdefgh") * rng.randint(1, 9)
            for _ in range(40)
        ]
        settings = [
            dict(max_new_tokens=rng.randint(1, 10), temperature=0) if i % 2 else SEEDED | dict(max_new_tokens=5)
            for i in range(40)
        ]
        reference = [c.token_ids for c in _run(uncached, prompts, settings)]
        for start in range(0, 40, 10):
            handles = [engine.submit(p, **o) for p, o in zip(prompts[start : start + 10], settings[start : start + 10])]
            aborted = set(rng.sample(range(10), 3))
            for i in aborted:
                handles[i].abort()
            for i, handle in enumerate(handles):
                completion = handle.result(120)
                if i in aborted and completion.finish_reason == "abort":
                    continue
                assert completion.token_ids == reference[start + i], (start + i, completion.cached_tokens)
        assert wait_until(lambda: engine.stats().running == 0)
        stats = engine.stats()
        assert stats.prefix_cache_blocks == 5 and stats.prefix_cache_blocks_used <= 5
        assert stats.prefix_cache_blocks_evicted > 0 and stats.prefix_cache_hit_tokens > 0
        index = engine._prefix
        assert len(index._free) + stats.prefix_cache_blocks_used == 5  # every block is free or cached: none leaked
        assert sorted([*index._free, *index._blocks.values()]) == list(range(5))
    finally:
        engine.shutdown()
    assert engine.programs.compile_seconds > 0  # its own copy programs (its pool's size); the rest are shared


def test_prefix_cache_settings(tiny_model):
    model, tokenizer = tiny_model
    with pytest.raises(EngineError, match="not both"):
        qwen_jax.Engine(model, tokenizer, slots=SLOTS, max_len=MAX_LEN, prefix_cache_blocks=4, prefix_cache_gb=1)
    with pytest.raises(EngineError, match="holds no block"):
        qwen_jax.Engine(model, tokenizer, slots=SLOTS, max_len=MAX_LEN, prefix_cache_gb=1e-12)
    off = qwen_jax.Engine(model, tokenizer, slots=SLOTS, max_len=MAX_LEN, prefill_chunk=0)  # needs chunked prefill
    try:
        assert off.stats().prefix_cache_blocks == 0 and off.programs.pool is None
    finally:
        off.shutdown()


def test_no_block_leaks_after_a_thousand_requests_with_aborts_and_evictions(tiny_model, uncached):
    """1,000 short requests through a 6-block pool, in waves, a fifth of them aborted right after
    submission (wherever that finds them: queued or already admitted): afterwards every pool block
    is either free or cached exactly once, the pool never held more than its size, nothing was
    refused, and sampled requests that ran to the end gave the tokens of the engine without a cache."""
    model, tokenizer = tiny_model
    engine = qwen_jax.Engine(model, tokenizer, slots=SLOTS, max_len=MAX_LEN, prefill_chunk=CHUNK, prefix_cache_blocks=6)
    try:
        rng = random.Random(1)
        stems = [BASE, BASE[:20], "Once upon a time in a land ", "Q: 2+2? A:"]
        prompts = [rng.choice(stems) + "".join(rng.choices("abcdefgh", k=rng.randint(1, 12))) for _ in range(1000)]
        settings = [dict(max_new_tokens=rng.randint(1, 3), temperature=0) for _ in range(1000)]
        checked = set(range(0, 1000, 97))
        reference = dict(
            zip(
                checked,
                (c.token_ids for c in _run(uncached, [prompts[i] for i in checked], [settings[i] for i in checked])),
            )
        )
        finished = aborted = 0
        for start in range(0, 1000, 50):
            wave = range(start, start + 50)
            handles = {i: engine.submit(prompts[i], **settings[i]) for i in wave}
            for i in rng.sample(list(wave), 10):
                handles[i].abort()
            for i, handle in handles.items():
                completion = handle.result(120)
                if completion.finish_reason == "abort":
                    aborted += 1
                    continue
                finished += 1
                if i in reference:
                    assert completion.token_ids == reference[i], i
            assert engine.stats().prefix_cache_blocks_used <= 6
        assert finished + aborted == 1000 and aborted > 0
        assert wait_until(lambda: engine.stats().running == 0)
        stats = engine.stats()
        assert stats.prefix_cache_blocks_evicted > 0 and stats.prefix_cache_hit_tokens > 0
        index = engine._prefix
        assert len(index._free) + stats.prefix_cache_blocks_used == 6  # none leaked
        assert sorted([*index._free, *index._blocks.values()]) == list(range(6))  # and none held twice
    finally:
        engine.shutdown()
