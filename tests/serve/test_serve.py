"""`qwen-jax serve` over real HTTP on 127.0.0.1, with the official `openai` client as the test client."""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import (  # noqa: F401 (fixtures)
    ENGINE_CHUNK,
    ENGINE_MAX_LEN,
    ENGINE_SLOTS,
    LiveServer,
    bigram_checkpoint,
    http,
    raw_connection,
    real_tokenizer_dir,
    tiny_engine,
    tiny_model,
    wait_until,
)

from qwen_jax.engine.core import Engine

MODEL = "test-model"
MESSAGES = [{"role": "user", "content": "Hi"}]  # 21 tokens with the byte tokenizer and ChatML


@pytest.fixture(scope="module")
def server(tiny_engine):
    with LiveServer(tiny_engine, MODEL) as live:
        yield live
    assert wait_until(lambda: tiny_engine.stats().running == 0)


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def long_prompt(tiny_engine):
    """A prompt whose greedy continuation runs 50 tokens without a stop token (requests that must stay busy)."""
    candidates = ["abc", "hold", "Hello world", "xyz", "12345", "qwerty", "lorem ipsum"]
    results = tiny_engine.generate(candidates, max_new_tokens=50, temperature=0, progress=False)
    return next(p for p, r in zip(candidates, results) if r.finish_reason == "length")


def _chat_prompt(engine, messages=MESSAGES):
    return engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _metrics(server) -> dict:
    samples = {}
    for family in text_string_to_metric_families(http("GET", server.url + "/metrics").text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_chat_completion(server, client, tiny_engine):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    expected = tiny_engine.generate([_chat_prompt(tiny_engine)], max_new_tokens=12, temperature=0, progress=False)[0]
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.model == MODEL and response.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason and choice.message.tool_calls is None
    assert response.usage.prompt_tokens == expected.prompt_tokens
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    raw = _post(
        server,
        "/v1/chat/completions",
        {"model": MODEL, "messages": MESSAGES, "max_completion_tokens": 12, "temperature": 0},
    ).json()
    assert "tool_calls" not in raw["choices"][0]["message"]  # omitted when empty
    assert raw["choices"][0]["message"]["content"] == expected.text  # max_completion_tokens is max_tokens' alias


def test_chat_streaming(client, tiny_engine):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=40,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    expected = tiny_engine.generate([_chat_prompt(tiny_engine)], max_new_tokens=40, temperature=0, progress=False)[0]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [expected.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1


def test_completions(client, tiny_engine):
    prompt = "Once upon a time"
    expected = tiny_engine.generate([prompt], max_new_tokens=10, temperature=0, progress=False)[0]
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
    assert response.object == "text_completion" and response.choices[0].text == expected.text
    assert response.usage.completion_tokens == len(expected.token_ids)
    ids = tiny_engine.tokenizer.encode(prompt)
    batch = client.completions.create(model=MODEL, prompt=[prompt, "abc"], max_tokens=10, temperature=0, echo=True)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == prompt + expected.text and batch.choices[1].text.startswith("abc")
    by_ids = client.completions.create(model=MODEL, prompt=[ids, ids[:3]], max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == expected.text and by_ids.usage.prompt_tokens == len(ids) + 3
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected.text
    default = client.completions.create(model=MODEL, prompt=prompt, temperature=0)  # OpenAI's default: 16 tokens
    assert default.usage.completion_tokens <= 16


def test_logprobs(client, tiny_engine):
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    expected = tiny_engine.generate(
        [_chat_prompt(tiny_engine)], max_new_tokens=6, temperature=0, logprobs=3, progress=False
    )[0]
    content = response.choices[0].logprobs.content
    assert len(content) == len(expected.token_ids)
    for entry, reference in zip(content, expected.logprobs):
        assert entry.logprob == pytest.approx(reference.logprob, abs=1e-6)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([lp for _, lp in reference.top], abs=1e-6)
        assert entry.top_logprobs[0].token == entry.token
        if reference.token_id < 256:  # the byte tokenizer: token id = byte value
            assert entry.bytes == [reference.token_id]
    completion = client.completions.create(model=MODEL, prompt="abc", max_tokens=4, temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert all(len(top) == 2 for top in logprobs.top_logprobs) and logprobs.text_offset == sorted(logprobs.text_offset)
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, stream=True
    )
    streamed = [e.logprob for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == pytest.approx([e.logprob for e in content], abs=1e-6)


def test_n_seed_and_stop(client):
    def ask(**kw):
        kw.setdefault("temperature", 1.0)
        return client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, **kw)

    three = ask(n=3, seed=7, logprobs=True)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert [c.message.content for c in ask(n=3, seed=7).choices] == [c.message.content for c in three.choices]
    assert ask(seed=7).choices[0].message.content == three.choices[0].message.content
    assert len({c.message.content for c in three.choices}) > 1
    assert three.usage.completion_tokens == sum(len(c.logprobs.content) for c in three.choices)
    text = ask(temperature=0).choices[0].message.content
    stop = text[3:5]
    stopped = ask(temperature=0, stop=[stop])
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def _post(server, path, body):
    return http("POST", server.url + path, body)


@pytest.mark.parametrize(
    "body, status, param, message",
    [
        (
            {"model": MODEL, "messages": MESSAGES, "max_tokens": ENGINE_MAX_LEN},
            400,
            "max_tokens",
            "maximum context length is 64",
        ),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x" * 80}]}, 400, "messages", "resulted in"),
        ('{"model": "test-model", "messages": [', 400, None, "not valid JSON"),
        ({"model": MODEL, "messages": MESSAGES, "temperature": "hot"}, 400, "temperature", "invalid value"),
        ({"model": MODEL, "messages": MESSAGES, "max_tokenz": 3}, 400, "max_tokenz", "unrecognized"),
        ({"model": MODEL, "messages": MESSAGES, "temperature": 3}, 400, "temperature", "invalid value"),
        ({"model": MODEL, "messages": MESSAGES, "n": 0}, 400, "n", "invalid value"),
        ({"model": MODEL, "messages": []}, 400, "messages", "invalid value"),
        ({"model": MODEL}, 400, "messages", "missing"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role", "invalid value"),
        ({"model": MODEL, "messages": MESSAGES, "presence_penalty": 3}, 400, "presence_penalty", "invalid value"),
        ({"model": MODEL, "messages": MESSAGES, "logit_bias": {"q": 1}}, 400, "logit_bias", "must be token ids"),
        ({"model": MODEL, "messages": MESSAGES, "logit_bias": {"5": 101}}, 400, "logit_bias", "between -100 and 100"),
        (
            {"model": MODEL, "messages": MESSAGES, "logit_bias": {"999999": 1}},
            400,
            "logit_bias",
            "not in the vocabulary",
        ),
        ({"model": "gpt-4", "messages": MESSAGES}, 404, "model", "does not exist"),
        ([1, 2], 400, None, "JSON object"),
        ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content", "invalid value"),
    ],
)
def test_errors_use_openai_envelope(server, body, status, param, message):
    response = _post(server, "/v1/chat/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and message in error["message"]


def test_logit_bias_and_penalties(client, tiny_engine, long_prompt):
    """OpenAI's logit_bias / presence_penalty / frequency_penalty reach the engine: the server's
    output equals the engine's own for the same settings, and a strong bias decides every token."""
    forced = client.completions.create(
        model=MODEL, prompt=long_prompt, max_tokens=6, temperature=0, logit_bias={str(ord("z")): 100}
    )
    assert forced.choices[0].text == "z" * 6
    plain = client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=30, temperature=0)
    options = dict(presence_penalty=1.5, frequency_penalty=2.0)
    penalised = client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=30, temperature=0, **options)
    engine = tiny_engine.generate([long_prompt], max_new_tokens=30, temperature=0, progress=False, **options)[0]
    assert penalised.choices[0].text == engine.text != plain.choices[0].text
    chat = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,
        logit_bias={str(ord("k")): 100},
        presence_penalty=0.5,
    )
    assert chat.choices[0].message.content == "kkkk"


def test_bad_requests_do_not_disturb_running_ones(server, client, long_prompt):
    alone = client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=40, temperature=0)
    stream = client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=40, temperature=0, stream=True)
    pieces = [next(iter(stream)).choices[0].text]
    for body in (
        '{"model": ',
        {"model": MODEL, "prompt": "x", "max_tokens": 1000},
        {"model": MODEL, "prompt": []},
        {"model": MODEL, "prompt": "x", "top_p": 0},
    ):
        assert _post(server, "/v1/completions", body).status_code == 400
    pieces += [c.choices[0].text for c in stream]
    assert "".join(pieces) == alone.choices[0].text


def test_context_error_states_both_numbers(server, client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x" * 30, max_tokens=40)
    assert "maximum context length is 64" in str(
        info.value
    ) and "70 tokens (30 in the prompt, 40 for the completion)" in str(info.value)
    assert _post(server, "/v1/nothing", {}).status_code == 404
    assert http("GET", server.url + "/v1/chat/completions").status_code == 405


def test_models_health_and_api_key(server, tiny_engine):
    assert http("GET", server.url + "/health").json()["status"] == "ok"
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    with LiveServer(tiny_engine, MODEL, api_key="sesame") as secured:
        with pytest.raises(openai.AuthenticationError):
            secured.client(api_key="wrong").models.list()
        response = http("POST", secured.url + "/v1/chat/completions", b"{broken")
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert secured.client(api_key="sesame").chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=2
        ).choices[0].finish_reason in ("stop", "length")
        assert http("GET", secured.url + "/health").status_code == 200  # health and metrics stay open


def test_disconnect_aborts_and_frees_the_slot(server, tiny_engine, long_prompt):
    before = tiny_engine.stats().aborted_requests
    for number, stream in enumerate((True, False), 1):
        payload = json.dumps(
            {"model": MODEL, "prompt": long_prompt, "max_tokens": 50, "temperature": 0, "stream": stream}
        )
        with raw_connection(server.port) as connection:
            connection.sendall(
                (
                    f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n{payload}"
                ).encode()
            )
            if stream:
                assert b"200 OK" in connection.recv(4096)  # the stream has started
            else:
                assert wait_until(lambda: tiny_engine.stats().generated_tokens > 0 and tiny_engine.stats().running >= 1)
        # 50 tokens take far longer than noticing the closed connection: the request is aborted, not finished.
        assert wait_until(lambda number=number: tiny_engine.stats().aborted_requests == before + number, timeout=30)
    assert wait_until(lambda: tiny_engine.stats().running == 0, timeout=30)


def test_queue_full_gives_503(tiny_model, long_prompt):
    model, tokenizer = tiny_model
    engine = Engine(
        model, tokenizer, slots=ENGINE_SLOTS, max_len=ENGINE_MAX_LEN, max_queue=0, prefill_chunk=ENGINE_CHUNK
    )  # shares programs
    try:
        with LiveServer(engine, MODEL) as live:
            client = live.client()
            handles = [engine.submit(long_prompt, max_new_tokens=50, temperature=0) for _ in range(ENGINE_SLOTS)]
            with pytest.raises(openai.APIStatusError) as info:
                client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
            assert info.value.status_code == 503 and info.value.body["code"] == "queue_full"
            for handle in handles:
                handle.abort()
            assert wait_until(lambda: all(handle.done for handle in handles))
            assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2).choices
            assert 'status="503"' in http("GET", live.url + "/metrics").text
    finally:
        engine.shutdown()


def test_shutdown_deadline_aborts_running_streams(tiny_model, long_prompt):
    model, tokenizer = tiny_model
    engine = Engine(model, tokenizer, slots=ENGINE_SLOTS, max_len=ENGINE_MAX_LEN, prefill_chunk=ENGINE_CHUNK)
    try:
        with LiveServer(engine, MODEL) as live:
            stream = live.client().completions.create(
                model=MODEL, prompt=long_prompt, max_tokens=50, temperature=0, stream=True
            )
            next(iter(stream))
            engine.begin_shutdown(0.0)
            with pytest.raises(openai.APIError, match="shutting down"):
                for _ in stream:
                    pass
            assert http("GET", live.url + "/health").status_code == 503
            response = _post(live, "/v1/completions", {"model": MODEL, "prompt": "a"})
            assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
    finally:
        engine.shutdown()


def test_metrics_count_what_happened(server, client):
    before = _metrics(server)
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0)
    _post(server, "/v1/chat/completions", {"model": MODEL})
    after = _metrics(server)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("qwen_jax_http_requests_total", path="/v1/chat/completions", status="200") == 1
    assert delta("qwen_jax_http_requests_total", path="/v1/chat/completions", status="400") == 1
    assert delta("qwen_jax_time_to_first_token_seconds_count") == 1
    assert delta("qwen_jax_inter_token_latency_seconds_count") >= 1
    assert delta("qwen_jax_generation_tokens_total") >= 1
    assert after[("qwen_jax_slots", ())] == ENGINE_SLOTS and after[("qwen_jax_slots_in_use", ())] == 0
    assert ("qwen_jax_generation_tokens_per_second", ()) in after and ("qwen_jax_queue_length", ()) in after


def test_cached_tokens_in_usage_and_prefix_cache_metrics(server, client):
    """A chat sent again hits the prefix cache: `usage.prompt_tokens_details.cached_tokens`
    says how many prompt tokens were reused (whole blocks of 16), in responses and streams; /metrics counts them."""
    messages = [{"role": "system", "content": "Riddles, always."}, *MESSAGES]  # 47 tokens: 2 whole blocks
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    before = _metrics(server)
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert again.choices[0].message.content == first.choices[0].message.content
    assert 0 < cached < again.usage.prompt_tokens and cached % 16 == 0
    after = _metrics(server)
    hits = (
        after[("qwen_jax_prefix_cache_hit_tokens_total", ())] - before[("qwen_jax_prefix_cache_hit_tokens_total", ())]
    )
    assert hits == cached
    queried = ("qwen_jax_prefix_cache_queried_tokens_total", ())
    assert after[queried] - before[queried] == again.usage.prompt_tokens
    assert after[("qwen_jax_prefix_cache_blocks_used", ())] > 0 and ("qwen_jax_prefix_cache_blocks", ()) in after
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    assert list(stream)[-1].usage.prompt_tokens_details.cached_tokens == cached


def test_load_64_streams_equal_served_alone(server, client, tiny_engine):
    """64 concurrent streaming requests of mixed lengths on 8 slots: all complete, each equals itself served alone."""
    requests = []
    for i in range(64):
        prompt = "abcdefghij"[: 1 + i % 10] * (1 + i % 4)
        requests.append(dict(prompt=prompt, max_tokens=4 + (i * 7) % 20, temperature=0 if i % 3 else 0.8, seed=i))

    def run(request):
        pieces, finish, usage = [], None, None
        for chunk in client.completions.create(
            model=MODEL, stream=True, stream_options={"include_usage": True}, timeout=120, **request
        ):
            if chunk.choices:
                pieces.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return "".join(pieces), finish, usage

    chunks_before = _metrics(server).get(("qwen_jax_prefill_chunks_total", ()), 0)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
        streamed = list(pool.map(run, requests, timeout=300))
    assert time.monotonic() - started < 300
    assert tiny_engine.stats().healthy
    # Requests admitted while others decode were prefilled in mixed steps (`/metrics` counts them).
    assert _metrics(server)[("qwen_jax_prefill_chunks_total", ())] > chunks_before
    for request, result in zip(requests, streamed):
        alone = client.completions.create(model=MODEL, **request)
        assert result == (alone.choices[0].text, alone.choices[0].finish_reason, alone.usage.completion_tokens)
    assert http("GET", server.url + "/health").json() == {
        "status": "ok",
        "slots": ENGINE_SLOTS,
        "running": 0,
        "waiting": 0,
    }


TOOL_ANSWER = 'Checking.<tool_call>{"name":"get_weather","arguments":{"days":3}}</tool_call><|im_end|>'
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather forecast",
            "parameters": {"type": "object", "properties": {"days": {"type": "integer"}}},
        },
    }
]


@pytest.mark.skipif(real_tokenizer_dir() is None, reason="QWEN_JAX_TOKENIZER_DIR not set")
def test_tool_calls_with_real_tokenizer(tmp_path):
    import qwen_jax

    model, tokenizer = qwen_jax.load(bigram_checkpoint(tmp_path / "bigram", real_tokenizer_dir(), TOOL_ANSWER))
    engine = Engine(model, tokenizer, slots=2, max_len=256)
    messages = [{"role": "user", "content": "Weather for the next 3 days?"}]
    try:
        with LiveServer(engine, MODEL) as live:
            client = live.client()
            response = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0)
            choice = response.choices[0]
            assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
            (call,) = choice.message.tool_calls
            assert call.type == "function" and call.id.startswith("call_")
            assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"days": 3}

            chunks = list(
                client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0, stream=True)
            )
            deltas = [c.choices[0].delta for c in chunks]
            assert "".join(d.content or "" for d in deltas) == "Checking."
            calls = [tc for d in deltas for tc in (d.tool_calls or [])]
            assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
            assert json.loads(calls[0].function.arguments) == {"days": 3}
            assert chunks[-1].choices[0].finish_reason == "tool_calls"

            plain = client.chat.completions.create(
                model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", temperature=0
            )  # no parsing: the raw text comes back
            assert plain.choices[0].finish_reason == "stop" and "<tool_call>" in plain.choices[0].message.content
            history = messages + [
                choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sun"}'},
            ]
            follow_up = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, temperature=0)
            assert follow_up.choices[0].message.tool_calls  # the round trip renders and generates
    finally:
        engine.shutdown()


def test_serve_cli_sigterm_finishes_running_requests_and_exits_0(tiny_engine, tmp_path):
    from serving import byte_checkpoint

    path = byte_checkpoint(tmp_path / "ckpt", tie_word_embeddings=False, initializer_range=0.3)
    command = [
        sys.executable,
        "-m",
        "qwen_jax.cli",
        "serve",
        "--model",
        path,
        "--port",
        "0",
        "--slots",
        "2",
        "--max-len",
        "64",
        "--no-warmup",
        "--served-model-name",
        MODEL,
        "--shutdown-timeout",
        "60",
    ]
    env = {**os.environ, "XLA_FLAGS": ""}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        for line in process.stderr:  # bounded: the process exits (EOF) if it fails
            if "listening on" in line:
                url = line.split("listening on ")[1].split()[0]
                break
        assert url, "the server did not start"
        lines = []
        threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        stream = client.completions.create(model=MODEL, prompt="hello", max_tokens=40, temperature=0, stream=True)
        first = next(iter(stream))
        process.send_signal(signal.SIGTERM)
        rest = list(stream)  # the running request finishes normally after SIGTERM
        text = first.choices[0].text + "".join(c.choices[0].text for c in rest)
        assert rest[-1].choices[0].finish_reason in ("stop", "length") and text
        assert process.wait(timeout=60) == 0
        with pytest.raises(OSError):  # nothing listens any more
            http("GET", url + "/health", timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_cli_bad_arguments_exit_2(tmp_path, capsys):
    import socket

    from qwen_jax.cli import main
    from qwen_jax.cli.arguments import DEFAULT_MODEL

    assert main(["serve", "--model", str(tmp_path), "--slots", "0"]) == 2
    assert "--slots must be >= 1" in capsys.readouterr().err
    for flag in ("--max-request-bytes", "--limit-concurrency", "--read-timeout", "--keep-alive-timeout"):
        assert main(["serve", "--model", str(tmp_path), flag, "0"]) == 2
        assert f"{flag} must be > 0, got 0" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--prime", "--no-warmup"]) == 2
    assert "--prime runs the compiled programs once: it needs --warmup" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        assert main(["serve", "--model", str(tmp_path), "--port", str(busy.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "not found" in capsys.readouterr().err
    from qwen_jax.cli.main import build_parser

    parser, _ = build_parser()
    for command in ("serve", "generate", "chat"):
        args = parser.parse_args([command] + (["--prompt", "x"] if command == "generate" else []))
        assert args.model == DEFAULT_MODEL == "Qwen/Qwen2.5-0.5B-Instruct"
