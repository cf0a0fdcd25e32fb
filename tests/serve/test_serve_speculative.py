"""`qwen-jax serve` with speculative decoding: responses equal the plain server's (greedy), streamed
too, and /metrics reports proposals, acceptance and tokens per step; with a draft model too (`--speculative
draft --draft-model`)."""

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


def test_serve_cli_draft_model_over_http(tmp_path, tiny_engine, monkeypatch, capsys):
    """`qwen-jax serve --speculative draft --draft-model PATH` builds an engine that runs the draft (here
    the target's own checkpoint: every proposal accepted); served over HTTP it gives the plain server's
    text, and /metrics counts its speculative steps and the draft's catch-up."""
    from serving import byte_checkpoint

    import qwen_jax.serve.server
    from qwen_jax.cli import main

    path = byte_checkpoint(tmp_path / "ckpt", tie_word_embeddings=False, initializer_range=0.3)  # tiny_model's
    built = []
    monkeypatch.setattr(qwen_jax.serve.server, "run_server", lambda app, listener, engine, **_: built.append(engine))
    argv = ["serve", "--model", path, "--port", "0", "--slots", str(ENGINE_SLOTS), "--max-len", str(ENGINE_MAX_LEN)]
    argv += ["--prefill-chunk", str(ENGINE_CHUNK), "--no-warmup", "--speculative", "draft", "--draft-model", path]
    assert main([*argv, "--num-speculative-tokens", "3"]) == 0
    (engine,) = built
    try:
        assert engine.speculative.method == "draft" and engine.speculative.draft_model.mesh == engine.model.mesh
        expected = tiny_engine.generate(PROMPTS, max_new_tokens=24, temperature=0, progress=False)
        with LiveServer(engine, MODEL) as live:
            client = live.client()
            response = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=24, temperature=0)
            assert [c.text for c in response.choices] == [e.text for e in expected]
            chat = [{"role": "user", "content": "hi"}]
            streamed = client.chat.completions.create(
                model=MODEL, messages=chat, max_tokens=24, temperature=0, stream=True
            )
            plain = tiny_engine.generate([chat], max_new_tokens=24, temperature=0, progress=False)[0]
            assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == plain.text
            metrics = _metrics(live)
        stats = engine.stats()
        assert metrics["qwen_jax_speculative_steps_total"] == stats.speculative_steps > 0
        assert metrics["qwen_jax_speculative_accepted_tokens_total"] == stats.speculative_proposed_tokens > 0
        assert metrics["qwen_jax_speculative_draft_catch_up_tokens_total"] == stats.speculative_draft_catch_up_tokens
        assert stats.speculative_draft_catch_up_tokens > 0
    finally:
        engine.shutdown()


def test_serve_cli_draft_arguments(tmp_path, capsys):
    from qwen_jax.cli import main

    assert main(["serve", "--model", str(tmp_path), "--speculative", "draft"]) == 2
    assert "--speculative draft needs --draft-model" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--draft-model", str(tmp_path), "--port", "0"]) == 2
    assert "--draft-model needs --speculative draft" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "missing"), "--speculative", "ngram", "--port", "0"]) == 2
    assert "not found" in capsys.readouterr().err  # the options parse; the model is what is missing
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert "--speculative {ngram,draft}" in usage and "--draft-model PATH|HUB_ID" in usage
    assert "its own KV cache of slots x max-len tokens" in usage
