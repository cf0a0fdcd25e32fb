"""The continuous-batching engine: batch-independence, equality with qwen_jax.generate, stops, abort, no compiles."""

import threading

import jax
import numpy as np
import pytest
from serving import ENGINE_CHUNK as CHUNK
from serving import ENGINE_MAX_LEN as MAX_LEN
from serving import ENGINE_SLOTS as SLOTS
from serving import count_compiles, tiny_engine, tiny_engine_uncached, tiny_model, wait_until  # noqa: F401 (fixtures)

import qwen_jax
from qwen_jax.engine.programs import chunk_buckets, chunk_shapes, decode_widths, plan_chunk_shape
from qwen_jax.errors import EngineClosedError, EngineError, QueueFullError

PROBE = "The quick brown fox"
OTHERS = ["Hello there, how are you today?", "a", "Once upon a time in a land far away", "12345 678"]


@pytest.fixture
def loaded(tiny_model):
    return tiny_model


@pytest.fixture
def engine(tiny_engine):
    yield tiny_engine
    assert wait_until(lambda: tiny_engine.stats().running == 0 and tiny_engine.stats().waiting == 0)


def _tokens(engine, prompt, **options):
    return engine.generate([prompt], progress=False, **options)[0]


def test_greedy_alone_equals_generate_and_busy(engine, loaded):
    model, tokenizer = loaded
    alone = _tokens(engine, PROBE, max_new_tokens=24, temperature=0)
    reference = qwen_jax.generate(model, tokenizer, PROBE, max_new_tokens=24, temperature=0)
    assert alone.token_ids == reference.token_ids[0]
    assert alone.text == reference.texts[0] and alone.finish_reason == reference.finish_reasons[0]
    # Busy: long requests occupy all slots but one; a short one holds the last slot for `hold` tokens, then
    # the probe is inserted into the slot it vacates while the long ones are mid-way (a different step each time).
    for hold in (1, 4, 9):
        handles = [
            engine.submit(OTHERS[i % 4], max_new_tokens=25, temperature=0.9 * (i % 2), seed=i) for i in range(SLOTS - 1)
        ]
        handles.append(engine.submit(OTHERS[1], max_new_tokens=hold, temperature=0))
        probe = engine.submit(PROBE, max_new_tokens=24, temperature=0)
        assert probe.result(120).token_ids == alone.token_ids, f"probe inserted after {hold} tokens"
        assert all(h.result(120).finish_reason in ("stop", "length") for h in handles)


def test_batch_of_many_equals_each_alone(engine):
    prompts = [PROBE, *OTHERS, "zz top", "Lorem ipsum dolor sit amet"]
    together = engine.generate(prompts, max_new_tokens=16, temperature=0, progress=False)
    assert [c.prompt_tokens for c in together] == [len(p.encode()) for p in prompts]  # input order
    for prompt, completion in zip(prompts, together):
        assert _tokens(engine, prompt, max_new_tokens=16, temperature=0).token_ids == completion.token_ids


def test_seeded_sampling_independent_of_batch(engine):
    settings = [
        dict(temperature=0.8, top_k=20, seed=11),
        dict(temperature=1.1, top_p=0.9, seed=12),
        dict(temperature=0.7, top_k=40, top_p=0.8, min_p=0.05, repetition_penalty=1.3, seed=13),
    ]
    for options in settings:
        alone = _tokens(engine, PROBE, max_new_tokens=20, **options).token_ids
        busy = [
            engine.submit(p, max_new_tokens=20, temperature=t, seed=s)
            for p, t, s in zip(OTHERS, (0, 1.0, 0.5), (1, 2, 3))
        ]
        probe = engine.submit(PROBE, max_new_tokens=20, **options)
        assert probe.result(120).token_ids == alone, options
        for handle in busy:
            handle.result(120)
    a = _tokens(engine, PROBE, max_new_tokens=20, temperature=1.0, seed=1).token_ids
    b = _tokens(engine, PROBE, max_new_tokens=20, temperature=1.0, seed=2).token_ids
    assert a != b  # the seed matters


# Greedy and sampled settings that take every path of the sampler: greedy with and without the
# penalties, id order (temperature, min-p), the top-k candidates, the sorted vocabulary (top-p, a
# top-k past the candidates), and OpenAI's penalties and bias.
SAME_TOKENS = [
    dict(temperature=0),
    dict(temperature=0, repetition_penalty=1.3),
    dict(temperature=0.8, seed=3),
    dict(temperature=0.7, min_p=0.1, seed=6),
    dict(temperature=0.9, top_k=20, seed=4),
    dict(temperature=1.1, top_p=0.9, seed=5),
    dict(temperature=1.0, top_k=100, seed=8),
    dict(temperature=0.7, top_k=40, top_p=0.8, min_p=0.05, repetition_penalty=1.3, seed=7),
    dict(temperature=0.9, frequency_penalty=0.5, presence_penalty=0.3, logit_bias={ord("e"): 3.0}, seed=9),
]


@pytest.mark.parametrize("options", SAME_TOKENS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_same_seed_and_settings_same_tokens_from_generate_stream_and_engine(engine, loaded, options):
    """One sampler: `qwen_jax.generate` (a batch), `qwen_jax.stream` and the engine (alone and in a busy
    batch, whose other rows run other settings) give the same tokens for the same seed and settings."""
    model, tokenizer = loaded
    batch = qwen_jax.generate(model, tokenizer, [PROBE, OTHERS[0]], max_new_tokens=16, **options)
    streamed = qwen_jax.stream(model, tokenizer, PROBE, max_new_tokens=16, **options)
    assert "".join(streamed) == batch.texts[0] and streamed.result.token_ids[0] == batch.token_ids[0]
    alone = _tokens(engine, PROBE, max_new_tokens=16, **options)
    assert alone.token_ids == batch.token_ids[0] and alone.text == batch.texts[0]
    assert alone.finish_reason == batch.finish_reasons[0]
    busy = [
        engine.submit(p, max_new_tokens=20, temperature=t, top_p=0.9, seed=s)
        for p, t, s in zip(OTHERS[1:], (0, 1.0, 0.5), (1, 2, 3))
    ]
    handles = [engine.submit(p, max_new_tokens=16, **options) for p in (PROBE, OTHERS[0])]
    assert [h.result(120).token_ids for h in handles] == batch.token_ids
    assert [h.result().finish_reason for h in handles] == batch.finish_reasons
    for handle in busy:
        handle.result(120)


def test_engine_generate_takes_one_seed_or_one_per_prompt(engine):
    settings = dict(max_new_tokens=12, temperature=0.9, top_k=30, progress=False)
    prompts = [PROBE, PROBE, OTHERS[0]]
    shared = engine.generate(prompts, seed=4, **settings)
    assert shared[0].token_ids == shared[1].token_ids  # one seed: every prompt draws with it
    per_prompt = engine.generate(prompts, seed=[4, 5, 4], **settings)
    assert per_prompt[0].token_ids == shared[0].token_ids and per_prompt[2].token_ids == shared[2].token_ids
    assert per_prompt[1].token_ids != shared[1].token_ids
    with pytest.raises(EngineError, match="2 seeds for 3 prompts") as info:
        engine.generate(prompts, seed=[1, 2], **settings)
    assert info.value.param == "seed"


def _reference_greedy(model, prompt_ids, steps, *, repetition=1.0, presence=0.0, frequency=0.0, bias=None):
    """Greedy decoding on the host from full forwards: logit bias, repetition penalty over prompt +
    output ids, then OpenAI's presence/frequency penalties over the generated ids."""
    ids, generated = list(prompt_ids), []
    for _ in range(steps):
        logits = np.asarray(model(np.asarray([ids], np.int32), logits_to_keep=1))[0, -1].astype(np.float64)
        for token_id, value in (bias or {}).items():
            logits[token_id] += value
        seen = np.zeros(logits.shape, bool)
        seen[ids] = True
        logits = np.where(seen, np.where(logits < 0, logits * repetition, logits / repetition), logits)
        counts = np.bincount(np.asarray(generated, int), minlength=logits.shape[0])
        logits = logits - frequency * counts - presence * (counts > 0)
        token = int(np.argmax(logits))
        ids.append(token)
        generated.append(token)
    return generated


def test_presence_frequency_penalties_and_logit_bias(engine, loaded):
    model, tokenizer = loaded
    prompt_ids = tokenizer.encode(PROBE)
    plain = _tokens(engine, PROBE, max_new_tokens=20, temperature=0).token_ids
    biased = {ord("e"): 6.0, ord(" "): -2.5}  # the tiny model rarely repeats a token unless pushed to
    base = _tokens(engine, PROBE, max_new_tokens=20, temperature=0, logit_bias=biased).token_ids
    # (options, the tokens without the penalties): each setting must change the output
    settings = [
        (dict(frequency_penalty=-2.0), plain),
        (dict(presence_penalty=-2.0, repetition_penalty=1.2), plain),
        (dict(frequency_penalty=1.0, presence_penalty=0.5, logit_bias=biased), base),
    ]
    assert base != plain
    for options, without in settings:
        alone = _tokens(engine, PROBE, max_new_tokens=20, temperature=0, **options)
        reference = _reference_greedy(
            model,
            prompt_ids,
            len(alone.token_ids),
            repetition=options.get("repetition_penalty", 1.0),
            presence=options.get("presence_penalty", 0.0),
            frequency=options.get("frequency_penalty", 0.0),
            bias=options.get("logit_bias"),
        )
        assert alone.token_ids == reference, options
        assert alone.token_ids != without[: len(alone.token_ids)], options
        busy = [
            engine.submit(p, max_new_tokens=20, temperature=t, seed=s, frequency_penalty=0.5 * s)
            for p, t, s in zip(OTHERS, (0, 1.0, 0.5), (1, 2, 3))
        ]
        probe = engine.submit(PROBE, max_new_tokens=20, temperature=0, **options)
        assert probe.result(120).token_ids == alone.token_ids, options
        for handle in busy:
            handle.result(120)
    # A strong bias decides every token; a ban keeps a token out.
    forced = _tokens(engine, PROBE, max_new_tokens=8, temperature=0.9, seed=5, logit_bias={ord("q"): 100})
    assert forced.text == "q" * 8
    banned = _tokens(engine, PROBE, max_new_tokens=20, temperature=0, logit_bias={plain[0]: -100})
    assert plain[0] not in banned.token_ids


def test_stop_strings_stop_ids_and_max_tokens(engine):
    free = _tokens(engine, OTHERS[0], max_new_tokens=30, temperature=0)
    assert free.finish_reason == "length" and len(free.token_ids) == 30
    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = _tokens(engine, OTHERS[0], max_new_tokens=30, temperature=0, stop=[stop, "\x00never"])
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[: text.index(stop)]
    assert cut.token_ids == free.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < 30
    stop_id = free.token_ids[5]
    by_id = _tokens(engine, OTHERS[0], max_new_tokens=30, temperature=0, stop=[stop_id])
    assert by_id.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == stop_id


def test_streaming_text_equals_completion(engine):
    pieces = list(engine.stream(OTHERS[2], max_new_tokens=20, temperature=0))
    assert "".join(pieces) == _tokens(engine, OTHERS[2], max_new_tokens=20, temperature=0).text
    handle = engine.submit(OTHERS[2], max_new_tokens=5, temperature=0, logprobs=3)
    deltas = list(handle)
    assert [d.finish_reason for d in deltas] == [None] * 4 + ["length"]
    completion = handle.result()
    assert [t.token_id for t in completion.logprobs] == completion.token_ids
    for entry in completion.logprobs:
        assert len(entry.top) == 3 and entry.top[0][1] >= entry.top[1][1] >= entry.top[2][1]
        assert entry.logprob <= 0 and entry.top[0][0] == entry.token_id  # greedy: the chosen one is the top one
        assert entry.logprob == pytest.approx(entry.top[0][1])


def test_token_logprobs_are_log_softmax_and_top_ones_only_when_asked():
    """The engine's log-probability program: the chosen tokens' values are `jax.nn.log_softmax`'s
    (rows of any shape: a step's `[rows]`, a speculative step's `[rows, positions]`); the top ones
    come only with the traced flag set, zeros otherwise."""
    from qwen_jax.engine.programs import _token_logprobs
    from qwen_jax.engine.requests import MAX_TOP_LOGPROBS

    logits = jax.random.normal(jax.random.key(0), (3, 2, 1000)) * 4
    tokens = jax.random.randint(jax.random.key(1), (3, 2), 0, 1000)
    expected = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    program = jax.jit(_token_logprobs)
    for cut in (lambda x: x, lambda x: x[:, 0]):  # [rows, positions, vocab] and [rows, vocab]
        chosen, top_ids, top_values = program(cut(logits), cut(tokens), np.bool_(True))
        want = np.take_along_axis(cut(expected), np.asarray(cut(tokens))[..., None], axis=-1)[..., 0]
        np.testing.assert_allclose(np.asarray(chosen), want, rtol=1e-6, atol=1e-6)
        order = np.argsort(-cut(expected), axis=-1, kind="stable")[..., :MAX_TOP_LOGPROBS]
        np.testing.assert_array_equal(np.asarray(top_ids), order)
        np.testing.assert_allclose(
            np.asarray(top_values), np.take_along_axis(cut(expected), order, axis=-1), rtol=1e-6, atol=1e-6
        )
        plain, no_ids, no_values = program(cut(logits), cut(tokens), np.bool_(False))
        np.testing.assert_array_equal(np.asarray(plain), np.asarray(chosen))
        assert not np.asarray(no_ids).any() and not np.asarray(no_values).any()


def test_gaps_are_closed_and_steps_run_only_the_rows_in_use(engine):
    """A short request between two long ones finishes; the long one above it moves down into its
    slot (cache row, last token, seed, token index and seen set with it) and the steps narrow to
    the rows in use: every request still gives exactly what it gives alone."""
    settings = [
        dict(max_new_tokens=24, temperature=0),
        dict(max_new_tokens=3, temperature=0),
        dict(max_new_tokens=24, temperature=0.8, seed=5, repetition_penalty=1.3, top_k=20),
    ]
    prompts = [PROBE, OTHERS[1], OTHERS[2]]
    alone = [_tokens(engine, p, **o).token_ids for p, o in zip(prompts, settings)]
    before = engine.stats()
    handles = [engine.submit(p, **o) for p, o in zip(prompts, settings)]
    assert [h.result(120).token_ids for h in handles] == alone
    after = engine.stats()
    steps, rows = after.decode_steps - before.decode_steps, after.decode_rows - before.decode_rows
    chunks = after.prefill_chunks - before.prefill_chunks  # at least as many as the mixed steps
    # The third request into the second's slot; again into slot 0 if the first ends before it.
    assert 1 <= after.slot_moves - before.slot_moves <= 2
    # A mixed step (a prompt going in, at most one per chunk) runs all the slots; then width 4 while 3 run,
    # then 2. (Steps that never narrowed would compute 4 rows each: far more.)
    assert steps >= 23 and rows <= SLOTS * chunks + 4 * 4 + 2 * (steps - chunks - 4), (steps, rows, chunks)


def test_prompts_go_in_chunk_by_chunk_while_others_decode(tiny_engine_uncached):
    """A long prompt admitted while requests decode is prefilled over several mixed steps (each
    also decoding the running rows); the running requests keep generating meanwhile, and every
    request gives exactly what it gives alone (a multi-chunk prompt alone is prefilled whole).
    Without a prefix cache, so that the prompts, just run alone, are prefilled again."""
    engine = tiny_engine_uncached
    long_prompt = "Once upon a time in a land far away, a fox"  # 42 tokens: chunks of 16, 16 and 10
    assert len(long_prompt) > 2 * CHUNK
    settings = [
        dict(max_new_tokens=20, temperature=0),
        dict(max_new_tokens=20, temperature=0.9, top_p=0.9, seed=7, repetition_penalty=1.2),
        dict(max_new_tokens=8, temperature=0),
    ]
    prompts = [PROBE, OTHERS[0], long_prompt]
    alone = [_tokens(engine, p, **o).token_ids for p, o in zip(prompts, settings)]
    before = engine.stats()
    running = [engine.submit(p, **o) for p, o in zip(prompts[:2], settings[:2])]
    assert wait_until(lambda: engine.stats().generated_tokens >= before.generated_tokens + 2, interval=0.001)
    late = engine.submit(prompts[2], **settings[2])
    assert [h.result(120).token_ids for h in (*running, late)] == alone
    after = engine.stats()
    # The first prompt (nothing decoding) is prefilled whole; the second goes in as a chunk beside the first's
    # decoding, the late one in three chunks beside both: every chunk step decoded the running rows too.
    assert after.prefill_chunks - before.prefill_chunks >= 4, (before, after)
    assert after.decode_rows - before.decode_rows >= 2 * (after.prefill_chunks - before.prefill_chunks)


def test_abort_frees_the_slot(engine):
    first_token = threading.Event()
    handle = engine.submit(PROBE, max_new_tokens=40, temperature=0.5, on_delta=lambda delta: first_token.set())
    assert first_token.wait(60)
    assert handle.abort()
    completion = handle.result(60)
    assert completion.finish_reason == "abort" and len(completion.token_ids) < 40
    assert not handle.abort()  # already finished
    assert wait_until(lambda: engine.stats().running == 0)
    waiting = [engine.submit(OTHERS[0], max_new_tokens=30, temperature=0) for _ in range(SLOTS + 2)]
    assert waiting[-1].abort()  # aborted while queued
    assert waiting[-1].result(60).finish_reason == "abort" and waiting[-1].result().token_ids == []
    for handle in waiting[:-1]:
        assert handle.result(120).finish_reason == "length"


def test_bad_requests_and_queue_limit(loaded, engine):
    with pytest.raises(EngineError, match="plus max_new_tokens"):
        engine.submit(PROBE, max_new_tokens=MAX_LEN)
    with pytest.raises(EngineError, match="empty"):
        engine.submit("")
    with pytest.raises(EngineError, match="outside the vocabulary"):
        engine.submit([1, 2, 10_000])
    with pytest.raises(EngineError, match="presence_penalty must be a number between -2 and 2, got 3"):
        engine.submit(PROBE, presence_penalty=3)
    with pytest.raises(EngineError, match="frequency_penalty must be a number"):
        engine.submit(PROBE, frequency_penalty="high")
    with pytest.raises(EngineError, match="logit_bias token id 10000 is not in the vocabulary"):
        engine.submit(PROBE, logit_bias={10_000: 1.0})
    with pytest.raises(EngineError, match="logit_bias value for token 5 must be a number between -100 and 100"):
        engine.submit(PROBE, logit_bias={5: 200})
    with pytest.raises(EngineError, match="top logprobs must be between 0 and 20"):
        engine.submit(PROBE, logprobs=21)
    with pytest.raises(EngineError, match="stop strings must not be empty") as info:
        engine.submit(PROBE, stop=["x", ""])
    assert info.value.param == "stop"
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        engine.submit(PROBE, temprature=0.5)
    model, tokenizer = loaded
    small = qwen_jax.Engine(
        model, tokenizer, slots=SLOTS, max_len=MAX_LEN, max_queue=1, prefill_chunk=CHUNK
    )  # shares the compiled programs
    try:
        admitted = [small.submit(PROBE, max_new_tokens=40) for _ in range(SLOTS + 1)]
        with pytest.raises(QueueFullError):
            small.submit(PROBE, max_new_tokens=4)
        for handle in admitted:
            handle.abort()
    finally:
        small.shutdown()
    assert small.programs.compile_seconds == 0
    with pytest.raises(EngineClosedError):
        small.submit(PROBE)


def test_no_compilation_after_warmup(engine):
    with count_compiles() as compiles:
        mixed = [
            dict(temperature=0),
            dict(temperature=0.9, top_k=10, seed=1),
            dict(temperature=1.0, seed=2),
            dict(temperature=0.7, top_p=0.5, min_p=0.1, repetition_penalty=1.2, seed=3),
            dict(temperature=0, logprobs=5),
            dict(temperature=0.5, top_k=200, logprobs=0, seed=4),
        ]
        prompts = ["x" * n for n in (1, 15, 16, 17, 40, 62)]  # every prefill bucket, at its edges
        handles = [
            engine.submit(
                p, max_new_tokens=MAX_LEN - len(p) if i == 5 else min(6, MAX_LEN - len(p)), stop=["q"], **mixed[i % 6]
            )
            for i, p in enumerate(prompts * 2)
        ]
        handles[3].abort()
        for handle in handles:
            handle.result(120)
    assert compiles == []


def test_engine_on_a_mesh_equals_one_device(tmp_path, tiny_engine):
    from serving import byte_checkpoint

    path = byte_checkpoint(tmp_path / "ckpt", tie_word_embeddings=False, initializer_range=0.3)
    mesh = qwen_jax.make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])  # slots over data, heads over tensor
    model, tokenizer = qwen_jax.load(path, mesh=mesh)
    sharded = qwen_jax.Engine(model, tokenizer, slots=SLOTS, max_len=MAX_LEN, prefill_chunk=CHUNK)
    try:
        prompts = [PROBE, *OTHERS]
        on_mesh = sharded.generate(prompts, max_new_tokens=12, temperature=0, progress=False)
        reference = tiny_engine.generate(prompts, max_new_tokens=12, temperature=0, progress=False)
        assert [c.token_ids for c in on_mesh] == [c.token_ids for c in reference]
        assert sharded.programs.prime() > 0  # the programs used so far, on sharded scratch arrays
        again = sharded.generate(prompts, max_new_tokens=12, temperature=0, progress=False)
        assert [c.token_ids for c in again] == [c.token_ids for c in reference]
        spec = tuple(sharded.programs.cache.k.sharding.spec)
        assert spec[1:4] == ("data", None, "tensor")  # [layers, batch, seq, kv_heads, head_dim]
    finally:
        sharded.shutdown()


def test_device_failure_fails_requests_and_refuses_new_ones(loaded, caplog):
    model, tokenizer = loaded
    broken = qwen_jax.Engine(
        model, tokenizer, slots=SLOTS, max_len=MAX_LEN, prefill_chunk=CHUNK
    )  # shares the compiled programs

    def decode_step(rows, bitmask=None):
        raise RuntimeError("device lost")

    broken.programs.decode_step = decode_step  # fault injection: the next decode step fails
    handle = broken.submit(PROBE, max_new_tokens=10)
    completion = handle.result(60)
    assert completion.finish_reason == "error" and "device lost" in completion.error
    assert not broken.stats().healthy
    with pytest.raises(EngineClosedError, match="device lost"):
        broken.submit(PROBE)
    assert "engine thread failed" in caplog.text
    broken.shutdown()


def test_quantized_model_serves_like_its_generate(tmp_path):
    """The engine runs an int8 model (what `qwen-jax serve --quantize int8` loads): each prompt's greedy
    tokens in a shared batch equal `qwen_jax.generate` on the same quantized model."""
    from serving import byte_checkpoint

    from qwen_jax.model.quantize import model_quantization

    path = byte_checkpoint(tmp_path / "ckpt", tie_word_embeddings=False, initializer_range=0.3)
    model, tokenizer = qwen_jax.load(path, quantize="int8")
    assert model_quantization(model) is not None
    engine = qwen_jax.Engine(model, tokenizer, slots=4, max_len=MAX_LEN)
    try:
        prompts = [PROBE, *OTHERS[:3]]
        served = engine.generate(prompts, max_new_tokens=12, temperature=0, progress=False)
        for prompt, completion in zip(prompts, served):
            reference = qwen_jax.generate(model, tokenizer, prompt, max_new_tokens=12, temperature=0)
            assert completion.token_ids == reference.token_ids[0], prompt
    finally:
        engine.shutdown()


def test_parallel_warmup_compiles_each_program_once(loaded, tiny_engine):
    """Warm-up compiles on several threads; two warm-ups at once still build each program once, and a
    workload after them compiles nothing and gives the tokens of an engine warmed up one program at a time."""
    import collections

    model, tokenizer = loaded
    # 4 slots: a structure of its own, so its programs are compiled here rather than taken from `tiny_engine`'s.
    engine = qwen_jax.Engine(model, tokenizer, slots=4, max_len=MAX_LEN, prefill_chunk=CHUNK)
    builds = collections.Counter()
    executable = engine.programs._executable

    def counting(key, build):
        def counted():
            builds[key] += 1
            return build()

        return executable(key, counted)

    engine.programs._executable = counting
    try:
        with pytest.raises(ValueError, match="workers must be >= 1"):
            engine.warmup(workers=0)
        threads = [threading.Thread(target=engine.warmup, kwargs=dict(workers=2)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        assert len(builds) > 10 and set(builds.values()) == {1}, builds
        # Mixed steps at the full width only: one program per chunk shape (the workload below compiles nothing more).
        mixed = sorted(key[1:] for key in builds if key[0] == "mixed")
        assert mixed == sorted((4, *shape) for shape in engine.programs.chunk_shapes), mixed
        with count_compiles() as compiles:
            # Priming runs every program once on scratch arrays: nothing compiles, the engine's state stays empty.
            engine.warmup(prime=True)
            assert engine.programs.prime_seconds > 0
            assert all(program.primed for program in engine.programs._programs.values())
            assert not np.asarray(engine.programs.cache.lengths).any()
            prompts = [PROBE, *OTHERS, "x" * 40]
            options = dict(max_new_tokens=10, stop=["q"])
            greedy = engine.generate(prompts, temperature=0, progress=False, **options)
            seeded = engine.generate(prompts, temperature=0.8, top_k=20, seed=7, progress=False, **options)
        assert compiles == []
        assert [c.token_ids for c in greedy] == [
            c.token_ids for c in tiny_engine.generate(prompts, temperature=0, progress=False, **options)
        ]
        assert [c.token_ids for c in seeded] == [
            c.token_ids
            for c in tiny_engine.generate(prompts, temperature=0.8, top_k=20, seed=7, progress=False, **options)
        ]
    finally:
        engine.shutdown()


def test_a_step_finds_its_program_without_hashing_the_model(engine):
    """Each step looks its programs up; after the first lookup that must not hash the full key (the
    model's graph definition: ~4 ms a lookup for the unrolled 0.5B)."""
    programs = engine.programs
    width = programs.widths[-1]
    first = programs._decode_executable(width)

    class Unhashable:
        def __hash__(self):
            raise AssertionError("the full key was hashed")

    signature, programs._signature = programs._signature, Unhashable()
    try:
        assert programs._decode_executable(width) is first
    finally:
        programs._signature = signature


def test_evicting_the_shared_cache_recompiles_nothing_the_engine_holds(engine):
    """The shared executable cache is LRU-bounded; an engine keeps its own programs, so when they are
    evicted from the shared cache it still serves without compiling (runs last: it empties the cache)."""
    from qwen_jax.compilation import EXECUTABLES

    bound = EXECUTABLES.max_entries
    try:
        with count_compiles() as compiles:
            EXECUTABLES.max_entries = 1
            assert len(EXECUTABLES) <= 1
            handles = [
                engine.submit(p, max_new_tokens=8, temperature=t, top_p=0.9, seed=i)
                for i, (p, t) in enumerate(zip([PROBE, *OTHERS], (0, 0.8, 1.0, 0, 0.5)))
            ]
            assert all(h.result(120).finish_reason in ("stop", "length") for h in handles)
    finally:
        EXECUTABLES.max_entries = bound
    assert compiles == []


def test_a_mixed_step_ends_the_most_prompts_it_can():
    """The shape of a mixed step's chunks: the one that ends the most prompts (their first tokens come a
    step sooner for the same work), then the one that puts the most prompt tokens in; first come, first served."""
    shapes = chunk_shapes(chunk_buckets(256), decode_widths(8), 256)
    assert shapes[-3:] == ((2, 128), (4, 64), (8, 32))
    assert plan_chunk_shape([40] * 8, shapes) == (4, 64)  # 8 x 32 would put more tokens in but end none
    assert plan_chunk_shape([40] * 3, shapes) == (4, 64)
    assert plan_chunk_shape([20] * 8, shapes) == (8, 32)  # every prompt ends in one step
    assert plan_chunk_shape([300, 20], shapes) == (2, 128)  # the short one ends, the long one goes on
    assert plan_chunk_shape([300], shapes) == (1, 256)
    assert plan_chunk_shape([100, 30, 30], shapes) == (2, 128)  # two end either way: 130 tokens in, not 124
    assert plan_chunk_shape([30, 30, 30, 30, 300], shapes) == (8, 32)  # four end either way; the fifth starts too


@pytest.fixture(scope="module")
def budget_engine(tiny_model):
    """An engine whose token budget (128) lets up to 8 short prompts go in together in one step."""
    model, tokenizer = tiny_model
    engine = qwen_jax.Engine(model, tokenizer, slots=SLOTS, max_len=MAX_LEN, prefill_chunk=128)
    yield engine
    engine.shutdown()


def test_a_burst_of_prompts_goes_in_in_one_step(budget_engine, engine):
    """Eight requests submitted at once are prefilled together, as eight chunks of one mixed step,
    and a long prompt arriving while they decode shares the budget with a short one; every request
    gives exactly the tokens it gives alone (greedy and seeded)."""
    prompts = ["The quick fox", "Hello there", "a", "Once upon a time", "12345 678", "zz top", "Lorem ipsum", "9 lives"]
    settings = [dict(max_new_tokens=12, temperature=0.8 * (i % 2), seed=i, top_k=30) for i in range(len(prompts))]
    alone = [_tokens(engine, p, **o).token_ids for p, o in zip(prompts, settings)]
    before = budget_engine.stats()
    handles = [budget_engine.submit(p, **o) for p, o in zip(prompts, settings)]
    assert [h.result(120).token_ids for h in handles] == alone
    after = budget_engine.stats()
    # At most the first request (if the engine thread took it up alone) is prefilled whole; one step put the
    # others in (one chunk of at most 16 tokens each) and sampled their first tokens; each further step decoded.
    # One chunk per step would have taken 7 steps for them.
    assert after.prefill_chunks - before.prefill_chunks >= len(prompts) - 1
    assert after.decode_steps - before.decode_steps <= 2 + 12, (before, after)
    long_prompt = "Once upon a time in a land far away, a fox"
    late = [
        budget_engine.submit(p, max_new_tokens=10, temperature=0)
        for p in (OTHERS[0], long_prompt, OTHERS[3], long_prompt[::-1])
    ]
    reference = [_tokens(engine, p, max_new_tokens=10, temperature=0).token_ids for p in (OTHERS[0], long_prompt)]
    assert [h.result(120).token_ids for h in late[:2]] == reference
    assert (
        late[3].result(120).token_ids == _tokens(engine, long_prompt[::-1], max_new_tokens=10, temperature=0).token_ids
    )
