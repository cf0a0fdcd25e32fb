"""Host-side pieces of the engine and server: stop strings, tool-call streaming, token bytes, request checks."""

import pytest
from serving import real_tokenizer_dir, write_byte_tokenizer

from qwen_jax.config import GenerationConfig
from qwen_jax.engine.requests import check_top_logprobs, resolve_request
from qwen_jax.errors import EngineError
from qwen_jax.generation.text import TextAssembler, cut_at_stop_strings
from qwen_jax.serve.protocol import ChatCompletionRequest, CompletionRequest, RequestError
from qwen_jax.serve.tokens import TokenStrings
from qwen_jax.serve.tools import ToolCallStream, forced_prefix
from qwen_jax.tokenizer import Tokenizer, parse_tool_calls


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("byte_tokenizer")
    write_byte_tokenizer(directory)
    return Tokenizer.from_dir(directory)


def _assemble(tokenizer, text: str, stops):
    assembler = TextAssembler(tokenizer, stops)
    pieces = []
    for token_id in tokenizer.encode(text):
        pieces.append(assembler.push(token_id))
        if assembler.stop_string is not None:
            break
    pieces.append(assembler.finish())
    return pieces, assembler


def test_stop_strings_cut_and_hold_back(byte_tokenizer):
    pieces, assembler = _assemble(byte_tokenizer, "Hello wor\u00e9ld END more", ["END", "xyz"])
    assert "".join(pieces) == "Hello wor\u00e9ld " == assembler.text
    assert assembler.stop_string == "END"
    # "E" could start "END": never shown before it is known; the two-byte character is shown whole.
    assert all("E" not in p for p in pieces) and "\u00e9" in "".join(pieces)
    pieces, assembler = _assemble(byte_tokenizer, "ab ENx", ["END"])  # a false start is released
    assert "".join(pieces) == "ab ENx" and assembler.stop_string is None
    pieces, assembler = _assemble(byte_tokenizer, "one two", [])
    assert "".join(pieces) == "one two" and len([p for p in pieces if p]) == 7  # streamed byte by byte


def test_stop_string_spanning_tokens_earliest_wins(byte_tokenizer):
    pieces, assembler = _assemble(byte_tokenizer, "xx abcdef", ["cdef", "bc"])
    assert assembler.text == "xx a" and assembler.stop_string == "bc"


def test_batch_text_cut_by_the_same_assembler(byte_tokenizer):
    """`qwen_jax.generate` cuts each row with the assembler the engine and `stream` use: the text before
    the first stop string and the fewest ids that reach it."""
    ids = byte_tokenizer.encode("Hello wor\u00e9ld END more")
    text, kept, stopped = cut_at_stop_strings(byte_tokenizer, ids, ["END", "xyz"])
    assert (text, stopped) == ("Hello wor\u00e9ld ", True)
    assert kept == ids[: len(byte_tokenizer.encode("Hello wor\u00e9ld END"))]
    text, kept, stopped = cut_at_stop_strings(byte_tokenizer, ids, ["nowhere"])
    assert (text, kept, stopped) == ("Hello wor\u00e9ld END more", ids, False)
    pieces, _ = _assemble(byte_tokenizer, "Hello wor\u00e9ld END more", ["END", "xyz"])
    assert "".join(pieces) == cut_at_stop_strings(byte_tokenizer, ids, ["END", "xyz"])[0]


def test_tool_call_stream_matches_batch_parser():
    text = (
        'I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}\n</tool_call>'
    )
    content, calls = parse_tool_calls(text)
    for step in (1, 3, 7, len(text)):
        stream = ToolCallStream()
        events = []
        for i in range(0, len(text), step):
            events += stream.feed(text[i : i + step])
        events += stream.finish()
        streamed_calls = [value for kind, value in events if kind == "tool_call"]
        streamed_content = "".join(value for kind, value in events if kind == "content")
        assert streamed_calls == calls
        assert streamed_content.strip() == content
        assert all("<tool" not in value for kind, value in events if kind == "content")


def test_tool_call_stream_keeps_bad_or_unclosed_blocks():
    stream = ToolCallStream()
    events = stream.feed("<tool_call>not json</tool_call> and <tool_") + stream.feed('call>{"name": ') + stream.finish()
    assert [k for k, _ in events] == ["content", "content", "content"]
    assert "".join(v for _, v in events) == '<tool_call>not json</tool_call> and <tool_call>{"name": '


def test_forced_tool_prefix():
    body = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
        }
    )
    prefix = forced_prefix(body.tool_choice)
    content, calls = parse_tool_calls(prefix + '{"x": 1}}\n</tool_call>')
    assert calls == [{"name": "f", "arguments": {"x": 1}}] and content == ""
    assert forced_prefix("required") == "<tool_call>\n" and forced_prefix("auto") == ""


def test_request_checks():
    def chat(**fields):
        body = ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "x"}], **fields}
        )
        body.check_unsupported()
        return body

    assert chat(max_completion_tokens=5).completion_limit() == 5
    assert chat(logit_bias={"7": -100, "12": 2.5}, frequency_penalty=0.5).logit_bias_ids() == {7: -100, 12: 2.5}
    for fields, param in [
        ({"logit_bias": {"x1": 2}}, "logit_bias"),
        ({"logit_bias": {"1": -200}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
        ({"structured_outputs": {"regex": "a+", "choice": ["a"]}}, "structured_outputs"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
        ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
        ({"stop": ["a", ""]}, "stop"),
    ]:
        with pytest.raises(RequestError) as info:
            chat(**fields)
        assert info.value.param == param and info.value.status == 400
    messages = chat(
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}],
            },
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
        ]
    ).template_messages()
    assert messages[0] == {"role": "system", "content": "ab"}
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    completion = CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2], [3]]})
    assert completion.prompts() == [[1, 2], [3]]
    assert CompletionRequest.model_validate({"model": "m", "prompt": [1, 2]}).prompts() == [[1, 2]]


def test_resolve_request_errors_name_the_numbers():
    config = GenerationConfig(max_new_tokens=100, eos_token_ids=(2,))
    options = resolve_request(config, prompt_length=10, max_len=64, vocab_size=300)
    assert options.max_new_tokens == 54 and options.stop_token_ids == {2}  # the default is capped to the context
    with pytest.raises(EngineError, match=r"prompt \(10 tokens\) plus max_new_tokens \(60\).*context of 64") as info:
        resolve_request(config, prompt_length=10, max_len=64, vocab_size=300, max_new_tokens=60)
    assert info.value.param == "max_new_tokens"
    with pytest.raises(EngineError, match="64 tokens, but the context is 64"):
        resolve_request(config, prompt_length=64, max_len=64, vocab_size=300)
    for bad in (
        dict(temperature=-1),
        dict(top_p=0),
        dict(seed=2**64),
        dict(stop=[""]),
        dict(stop=[300]),
    ):
        with pytest.raises(EngineError) as info:
            resolve_request(config, prompt_length=10, max_len=64, vocab_size=300, **bad)
        assert info.value.param == next(iter(bad))  # the server reports it in OpenAI's envelope
    with pytest.raises(EngineError, match="top logprobs"):
        check_top_logprobs(21)
    check_top_logprobs(20)
    assert resolve_request(config, prompt_length=1, max_len=64, vocab_size=300, seed=-1).seed == 2**64 - 1


def test_token_bytes_byte_level(byte_tokenizer):
    strings = TokenStrings(byte_tokenizer)
    ids = byte_tokenizer.encode("é<|im_end|>")
    assert [strings.token_bytes(i) for i in ids] == [b"\xc3", b"\xa9", b"<|im_end|>"]
    entry = strings.completion_logprobs([], 0)
    assert entry == {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


@pytest.mark.skipif(real_tokenizer_dir() is None, reason="QWEN_JAX_TOKENIZER_DIR not set")
def test_token_bytes_real_tokenizer():
    tokenizer = Tokenizer.from_dir(real_tokenizer_dir())
    strings = TokenStrings(tokenizer)
    text = "Grüße, 世界! <tool_call>"
    ids = tokenizer.encode(text)
    assert b"".join(strings.token_bytes(i) for i in ids).decode() == text
    assert strings.token_text(tokenizer.token_to_id("<|im_end|>")) == "<|im_end|>"
