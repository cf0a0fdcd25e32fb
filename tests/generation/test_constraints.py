"""Structured output: constraints, compiled grammars, the sampler's bitmask, and `generate` / `stream` under them.

The model has random weights, so unconstrained output is never valid JSON: outputs that validate
show that the constraint works. Tokenizer: the real Qwen2.5 one (QWEN_JAX_TOKENIZER_DIR).
"""

import json
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
from serving import structured_model  # noqa: F401 (fixture)

import qwen_jax
from qwen_jax.errors import GenerationError
from qwen_jax.generation.constraints import (
    Constraint,
    bitmask_words,
    constraint_from,
    fill_bitmask,
    grammar_compiler,
    tool_call_grammar,
)
from qwen_jax.generation.options import generation_defaults
from qwen_jax.generation.sampler import RowParams, SamplerVariant, allowed_tokens, sample_rows, seed_key_data
from qwen_jax.generation.static import generate_ids

NAME = {"type": "string", "maxLength": 12}
# The list: nested objects, arrays with bounds, enums, anyOf, numbers with minimum/maximum,
# strings with patterns and formats, optional properties.
SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": NAME,
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "nickname": NAME,  # optional
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "owner": {
                "type": "object",
                "properties": {"name": NAME, "role": {"enum": ["admin", "user", "guest"]}},
                "required": ["name", "role"],
                "additionalProperties": False,
            },
            "tags": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 9},
                "minItems": 2,
                "maxItems": 3,
            },
        },
        "required": ["owner", "tags"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "id": {
                "anyOf": [
                    {"type": "integer", "minimum": 0, "maximum": 1000},
                    {"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"},
                ]
            },
            "day": {"type": "string", "format": "date"},
            "uid": {"type": "string", "format": "uuid"},
            "score": {"type": "number", "minimum": -1, "maximum": 1},
        },
        "required": ["id", "day", "uid", "score"],
        "additionalProperties": False,
    },
]
FORMATS = jsonschema.FormatChecker()


def _valid(text: str, schema) -> None:
    jsonschema.validate(json.loads(text), schema, format_checker=FORMATS)


# ----------------------------------------------------------------------------- constraints (no model)
def test_constraint_from_checks_its_arguments():
    assert constraint_from() is None
    assert constraint_from(regex="a+") == Constraint("regex", "a+")
    assert constraint_from(choice=["yes", "no"]) == Constraint("choice", '["yes", "no"]')
    # A schema keeps its property order (the output follows it); JSON text and dicts are the same constraint.
    schema = {"type": "object", "properties": {"b": {}, "a": {}}}
    assert constraint_from(json_schema=schema) == constraint_from(json_schema=json.dumps(schema))
    assert constraint_from(json_schema=schema).spec.index('"b"') < constraint_from(json_schema=schema).spec.index('"a"')
    for kwargs, param in [
        ({"regex": "a", "choice": ["a"]}, "regex"),
        ({"choice": "yes"}, "choice"),
        ({"choice": ["yes", ""]}, "choice"),
        ({"regex": ""}, "regex"),
        ({"json_schema": "{not json"}, "json_schema"),
        ({"json_schema": [1]}, "json_schema"),
    ]:
        with pytest.raises(GenerationError) as info:
            constraint_from(**kwargs)
        assert info.value.param == param


def test_pydantic_model_as_schema():
    pydantic = pytest.importorskip("pydantic")

    class Point(pydantic.BaseModel):
        x: int
        y: int

    constraint = constraint_from(json_schema=Point)
    assert json.loads(constraint.spec) == Point.model_json_schema()


def test_sampler_bitmask_unpacks_and_masks_first():
    vocab = 70
    allowed = np.zeros((2, vocab), bool)
    allowed[0, [3, 40, 69]] = True
    allowed[1] = True
    packed = np.packbits(np.pad(allowed, ((0, 0), (0, 32 * bitmask_words(vocab) - vocab))), axis=1, bitorder="little")
    bitmask = packed.view(np.int32)
    np.testing.assert_array_equal(np.asarray(allowed_tokens(jnp.asarray(bitmask), vocab)), allowed)

    logits = np.random.default_rng(0).normal(size=(2, vocab)).astype(np.float32)
    logits[:, 5] = 50.0  # the best token: not allowed in row 0
    rows = 2
    params = RowParams(
        temperature=np.asarray([0.0, 0.0], np.float32),
        top_k=np.zeros(rows, np.int32),
        top_p=np.ones(rows, np.float32),
        min_p=np.zeros(rows, np.float32),
        repetition_penalty=np.ones(rows, np.float32),
        presence_penalty=np.zeros(rows, np.float32),
        frequency_penalty=np.zeros(rows, np.float32),
        key_data=np.stack([seed_key_data(1), seed_key_data(2)]),
        token_index=np.zeros(rows, np.int32),
    )
    greedy = np.asarray(sample_rows(jnp.asarray(logits), None, params, SamplerVariant(adjustments=False), bitmask))
    assert greedy[0] == [3, 40, 69][int(np.argmax(logits[0, [3, 40, 69]]))]
    assert greedy[1] == 5 == int(np.argmax(logits[1]))  # a free row: the plain argmax
    sampled = RowParams(**{**params.__dict__, "temperature": np.asarray([5.0, 5.0], np.float32)})
    variant = SamplerVariant(candidates=True, id_order=True, sorted_vocabulary=True, adjustments=False)
    draw = jax.jit(lambda index: sample_rows(jnp.asarray(logits), None, sampled.at_token(index), variant, bitmask))
    draws = {int(draw(index)[0]) for index in range(40)}
    assert draws <= {3, 40, 69} and len(draws) > 1  # hot sampling: several allowed tokens, nothing else


# ----------------------------------------------------------------------------- compiled grammars (real tokenizer)
def test_compiler_caches_refuses_and_masks_the_padding(structured_model):
    model, tokenizer = structured_model
    vocab = model.config.vocab_size
    assert vocab > tokenizer.vocab_size  # Qwen2.5 pads its embedding rows
    compiler = grammar_compiler(tokenizer, vocab, [tokenizer.eos_token_id])
    assert grammar_compiler(tokenizer, vocab, [tokenizer.eos_token_id]) is compiler
    constraint = constraint_from(regex="[a-z]+")
    before = compiler.cached
    first, second = compiler.matcher(constraint), compiler.matcher(constraint)
    assert compiler.cached == before + 1  # compiled once, two independent matchers
    assert first.advance(tokenizer.encode("abc")[0]) and first.complete
    bitmask = fill_bitmask([second, None], vocab)
    allowed = np.asarray(allowed_tokens(jnp.asarray(bitmask), vocab))
    assert not allowed[0, tokenizer.vocab_size :].any()  # padding rows never allowed
    assert allowed[0, tokenizer.encode("abc")[0]] and not allowed[0, tokenizer.encode("1")[0]]
    assert allowed[1].all()

    for kwargs, reason in [
        ({"json_schema": {"type": "string", "format": "ipv4-cidr"}}, "Unknown format: ipv4-cidr"),
        ({"json_schema": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
        ({"regex": "(?=a)a"}, "look-around"),
        ({"grammar": "start: x\nx: /[/"}, "unclosed character class"),
    ]:
        with pytest.raises(ValueError, match=re.escape(reason)) as info:
            compiler.matcher(constraint_from(**kwargs))
        assert info.value.param == next(iter(kwargs))


def test_tool_call_grammar(structured_model):
    model, tokenizer = structured_model
    compiler = grammar_compiler(tokenizer, model.config.vocab_size, [tokenizer.eos_token_id])
    weather = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tags = {tag: tokenizer.token_to_id(tag) for tag in ("<tool_call>", "</tool_call>")}
    grammar = tool_call_grammar(
        [{"name": "get_weather", "parameters": weather}, {"name": "ping", "parameters": None}],
        required=True,
        token_ids=tags,
    )

    def accepts(text: str) -> bool:
        matcher = compiler.matcher(constraint_from(grammar=grammar))
        return all(matcher.advance(t) for t in tokenizer.encode(text)) and matcher.complete

    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert accepts(call)
    assert accepts(call + '\n<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>')
    assert not accepts('<tool_call>\n{"name": "get_weather", "arguments": {"town": "Paris"}}\n</tool_call>')
    assert not accepts("Sure, the weather")  # required: calls only


# ----------------------------------------------------------------------------- generate and stream
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_outputs_validate(structured_model, temperature):
    model, tokenizer = structured_model
    free = qwen_jax.generate(model, tokenizer, "Give me JSON.", max_new_tokens=24, temperature=temperature, seed=3)
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.texts[0])  # random weights: no JSON without the constraint
    for schema in SCHEMAS:
        out = qwen_jax.generate(
            model,
            tokenizer,
            ["Give me JSON.", "Another one"],
            max_new_tokens=150,
            temperature=temperature,
            seed=[1, 2],
            json_schema=schema,
        )
        for text, reason, ids in zip(out.texts, out.finish_reasons, out.token_ids):
            assert reason == "stop" and ids[-1] in generation_defaults(model, tokenizer).eos_token_ids
            _valid(text, schema)


def test_regex_choice_stream_and_length(structured_model):
    model, tokenizer = structured_model
    pattern = r"[0-9]{3}-[a-z]{2,5}"
    out = qwen_jax.generate(
        model, tokenizer, ["a", "b"], max_new_tokens=20, temperature=1.0, seed=[4, 5], regex=pattern
    )
    assert all(re.fullmatch(pattern, text) for text in out.texts) and out.finish_reasons == ["stop", "stop"]
    choices = ["yes", "no", "maybe later"]
    out = qwen_jax.generate(model, tokenizer, "q", max_new_tokens=10, temperature=1.0, seed=6, choice=choices)
    assert out.texts[0] in choices
    # The stream decodes the same tokens as the batch path.
    schema = SCHEMAS[0]
    batch = qwen_jax.generate(model, tokenizer, "x", max_new_tokens=60, temperature=0.7, seed=9, json_schema=schema)
    streamed = qwen_jax.stream(model, tokenizer, "x", max_new_tokens=60, temperature=0.7, seed=9, json_schema=schema)
    assert "".join(streamed) == batch.texts[0] and streamed.result.token_ids == batch.token_ids
    # Cut by max_new_tokens: "length", the JSON incomplete (as OpenAI's).
    cut = qwen_jax.generate(model, tokenizer, "x", max_new_tokens=3, temperature=0, json_schema=schema)
    assert cut.finish_reasons == ["length"] and len(cut.token_ids[0]) == 3
    with pytest.raises(GenerationError, match="needs the tokenizer"):
        generate_ids(model, [[1, 2]], max_new_tokens=2, regex="a")


def test_speculation_with_a_constraint_is_refused(structured_model):
    model, tokenizer = structured_model
    for call in (qwen_jax.generate, qwen_jax.stream):
        with pytest.raises(GenerationError, match="cannot be combined with structured output") as error:
            call(model, tokenizer, "x", max_new_tokens=4, regex="[0-9]+", speculative="ngram")
        assert error.value.param == "speculative"
    # Without a constraint the same call runs (the refusal is about the combination only).
    assert len(qwen_jax.generate(model, tokenizer, "x", max_new_tokens=4, speculative="ngram").token_ids[0]) <= 4
