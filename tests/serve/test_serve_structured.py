"""Structured output over HTTP with the openai client: response_format, structured_outputs, strict tool calls.

Tiny random model over the real Qwen2.5 vocabulary and tokenizer (QWEN_JAX_TOKENIZER_DIR): its
unconstrained text is never valid JSON, so parsed answers show the constraint at work.
"""

import json
import re

import jsonschema
import openai
import pydantic
import pytest
from serving import LiveServer, structured_engine, structured_model  # noqa: F401 (fixtures)

MODEL = "tiny-structured"
MESSAGES = [{"role": "user", "content": "Describe a city as JSON."}]


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    population: int = pydantic.Field(ge=0, le=10**6)
    coastal: bool


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
PING = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def client(structured_engine):
    with LiveServer(structured_engine, MODEL) as live:
        yield live.client()


def test_parse_with_a_pydantic_model(client):
    for temperature in (0.0, 1.0):
        completion = client.chat.completions.parse(
            model=MODEL, messages=MESSAGES, response_format=City, temperature=temperature, seed=3, max_tokens=80
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, City)
        assert City.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_object_streaming_and_length(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            response_format={"type": "json_object"},
            temperature=0,
            max_tokens=100,
            stream=True,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(json.loads(text), dict) and chunks[-1].choices[0].finish_reason == "stop"
    schema = {"name": "city", "schema": City.model_json_schema()}
    cut = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, response_format={"type": "json_schema", "json_schema": schema}, max_tokens=3
    )
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content == '{"name":'


def test_structured_outputs_extension(client):
    regex = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=1.0,
        seed=2,
        max_tokens=20,
        extra_body={"structured_outputs": {"regex": "[a-z]{3,6}-[0-9]{2}"}},
    )
    assert re.fullmatch("[a-z]{3,6}-[0-9]{2}", regex.choices[0].message.content)
    choice = client.completions.create(
        model=MODEL,
        prompt="Pick one:",
        n=2,
        temperature=1.0,
        seed=4,
        max_tokens=10,
        extra_body={"structured_outputs": {"choice": ["left", "right"]}},
    )
    assert all(c.text in ("left", "right") and c.finish_reason == "stop" for c in choice.choices)
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4}
    completion = client.completions.create(
        model=MODEL,
        prompt="Numbers:",
        temperature=0,
        max_tokens=30,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}},
    )
    jsonschema.validate(json.loads(completion.choices[0].text), schema)


def test_strict_tool_calls(client):
    schema = WEATHER["function"]["parameters"]
    for tool_choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        response = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            tools=[WEATHER, PING],
            tool_choice=tool_choice,
            temperature=0,
            max_tokens=120,
        )
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        for call in choice.message.tool_calls:
            assert call.function.name in ("get_weather", "ping")
            arguments = json.loads(call.function.arguments)
            if call.function.name == "get_weather":
                jsonschema.validate(arguments, schema)
        if tool_choice != "required":
            assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            tools=[WEATHER],
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=1.0,
            seed=8,
            max_tokens=120,
            stream=True,
        )
    )
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), schema)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_unsupported_schema_is_a_400_naming_the_reason(client):
    bad = {"type": "object", "properties": {"ip": {"type": "string", "format": "ipv4-cidr"}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad, "strict": True}},
        )
    error = info.value.body
    assert "ipv4-cidr" in error["message"] and error["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_body={"structured_outputs": {"regex": "(?=a)a"}}
        )
    assert "look-around" in info.value.body["message"] and info.value.body["param"] == "structured_outputs"
