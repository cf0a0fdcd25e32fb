"""`qwen-jax serve` with speculative decoding: responses equal the plain server's (greedy), streamed
too, and /metrics reports proposals, acceptance and tokens per step; `--speculative draft` is refused."""

import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import ENGINE_CHUNK, ENGINE_MAX_LEN, ENGINE_SLOTS, LiveServer, http, tiny_engine, tiny_model  # noqa: F401

from qwen_jax.engine.core import Engine
from qwen_jax.generation.speculative import SpeculativeOptions

MODEL = "test-model"
PROMPTS = ["abcabcabcabc", "The quick brown fox"]  # the first has n-gram matches


def _metrics(server) -> dict:
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(http("GET", server.url + "/metrics").text)
        for sample in family.samples
        if not sample.labels
    }


@pytest.fixture(scope="module")
def spec_server(tiny_model, tiny_engine):
    model, tokenizer = tiny_model
    engine = Engine(
        model,
        tokenizer,
        slots=ENGINE_SLOTS,
        max_len=ENGINE_MAX_LEN,
        prefill_chunk=ENGINE_CHUNK,
        speculative=SpeculativeOptions(num_speculative_tokens=3),
        speculative_max_rows=ENGINE_SLOTS,
    )
    with LiveServer(engine, MODEL) as live:
        yield live
    engine.shutdown()


def test_responses_equal_plain_serving_and_metrics(spec_server, tiny_engine):
    client = spec_server.client()
    expected = tiny_engine.generate(PROMPTS, max_new_tokens=24, temperature=0, progress=False)
    response = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=24, temperature=0)
    assert [c.text for c in response.choices] == [e.text for e in expected]
    streamed = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected[0].text
    metrics = _metrics(spec_server)
    stats = spec_server.engine.stats()
    assert metrics["qwen_jax_speculative_steps_total"] == stats.speculative_steps > 0
    assert metrics["qwen_jax_speculative_proposed_tokens_total"] == stats.speculative_proposed_tokens > 0
    assert metrics["qwen_jax_speculative_accepted_tokens_total"] == stats.speculative_accepted_tokens
    assert metrics["qwen_jax_speculative_acceptance_rate"] == pytest.approx(stats.speculative_acceptance_rate)
    assert metrics["qwen_jax_speculative_tokens_per_step"] == pytest.approx(stats.speculative_tokens_per_step)
    assert stats.speculative_tokens_per_step >= 1
    assert "qwen_jax_speculative_skipped_steps_total" in metrics and "qwen_jax_speculative_pauses_total" in metrics


def test_serve_cli_refuses_a_draft_model(tmp_path, capsys):
    from qwen_jax.cli import main

    assert main(["serve", "--model", str(tmp_path), "--speculative", "draft", "--draft-model", str(tmp_path)]) == 2
    assert "speculates with --speculative ngram only" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "missing"), "--speculative", "ngram", "--port", "0"]) == 2
    assert "not found" in capsys.readouterr().err  # the options parse; the model is what is missing
