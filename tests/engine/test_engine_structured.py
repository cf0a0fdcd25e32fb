"""Structured output in the engine: constrained and free requests share a batch; free ones are unchanged.

Tiny random model over the real Qwen2.5 vocabulary and tokenizer (QWEN_JAX_TOKENIZER_DIR).
"""

import json
import re

import jsonschema
import pytest
from serving import structured_engine, structured_model, wait_until  # noqa: F401 (fixtures)

import qwen_jax
from qwen_jax.errors import EngineError

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "level": {"enum": ["low", "high"]},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 3},
    },
    "required": ["name", "level", "scores"],
    "additionalProperties": False,
}
FREE = ["The quick brown fox", "Hello there, how are you today?", "12345 678"]


@pytest.fixture
def engine(structured_engine):
    yield structured_engine
    assert wait_until(lambda: structured_engine.stats().running == 0 and structured_engine.stats().waiting == 0)


def test_busy_batch_constrained_beside_free(engine, structured_model):
    model, tokenizer = structured_model
    free_settings = [dict(temperature=0), dict(temperature=0.8, seed=11), dict(temperature=0.9, top_k=20, seed=12)]
    alone = [
        engine.generate([prompt], progress=False, max_new_tokens=20, **settings)[0]
        for prompt, settings in zip(FREE, free_settings)
    ]
    # Constrained (greedy, sampled, regex) and free requests at once, joining at different steps.
    handles = [engine.submit(FREE[0], max_new_tokens=20, **free_settings[0])]
    handles.append(engine.submit("JSON please", max_new_tokens=80, temperature=0, json_schema=SCHEMA))
    handles.append(engine.submit(FREE[1], max_new_tokens=20, **free_settings[1]))
    handles.append(engine.submit("JSON again", max_new_tokens=80, temperature=1.0, seed=5, json_schema=SCHEMA))
    handles.append(engine.submit(FREE[2], max_new_tokens=20, **free_settings[2]))
    handles.append(engine.submit("code", max_new_tokens=20, temperature=1.0, seed=6, regex=r"[A-Z]{2}-[0-9]{3}"))
    results = [h.result(300) for h in handles]
    free_results = [results[0], results[2], results[4]]
    for together, single in zip(free_results, alone):
        assert together.token_ids == single.token_ids and together.text == single.text
    for completion in (results[1], results[3]):
        assert completion.finish_reason == "stop", completion
        jsonschema.validate(json.loads(completion.text), SCHEMA)
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", results[5].text) and results[5].finish_reason == "stop"
    # The engine and qwen_jax.generate draw the same constrained tokens for the same seed.
    reference = qwen_jax.generate(
        model, tokenizer, "JSON again", max_new_tokens=80, temperature=1.0, seed=5, json_schema=SCHEMA
    )
    assert results[3].token_ids == reference.token_ids[0]


def test_constrained_requests_run_the_free_programs(engine):
    """The bitmask is an input of every sampler program: a constrained request compiles nothing."""
    for temperature in (0.0, 1.0):
        engine.generate(["JSON please"], progress=False, max_new_tokens=30, temperature=temperature, seed=1)
        programs = set(engine.programs._programs)
        constrained = engine.generate(
            ["JSON please"], progress=False, max_new_tokens=30, temperature=temperature, seed=1, json_schema=SCHEMA
        )
        assert constrained[0].text.startswith('{"name": "')
        assert set(engine.programs._programs) == programs


def test_length_choice_and_errors(engine):
    cut = engine.generate(["x"], progress=False, max_new_tokens=4, temperature=0, json_schema=SCHEMA)[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 4
    pick = engine.generate(
        ["x", "y"], progress=False, max_new_tokens=8, temperature=1.0, seed=[1, 2], choice=["red", "green"]
    )
    assert all(c.text in ("red", "green") and c.finish_reason == "stop" for c in pick)
    streamed = "".join(engine.stream("z", max_new_tokens=8, temperature=0, choice=["alpha", "beta"]))
    assert streamed in ("alpha", "beta")
    with pytest.raises(EngineError, match="Unknown format: ipv4-cidr") as info:
        engine.submit("x", json_schema={"type": "string", "format": "ipv4-cidr"})
    assert info.value.param == "json_schema"
    with pytest.raises(EngineError, match="at most one") as info:
        engine.submit("x", regex="a", choice=["a"])
