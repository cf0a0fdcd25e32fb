"""benchmarks/serve_model.py: the engine-schedule model gives the step sums its policy implies; and
benchmarks/serve.py's choice of the pass it reports."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import serve_model  # noqa: E402

COSTS = ({1: 100, 2: 140}, {32: 230, 64: 290}, {16: 50, 32: 90})


def test_whole_prompt_prefill_then_decode_steps():
    # One slot: each request is prefilled whole (10 + 20 template tokens -> bucket 32, its first token),
    # then decodes its other 2 tokens in 1-row steps; the second waits for the first.
    assert serve_model.simulate([10, 10], [3, 3], 1, 0, COSTS) == 2 * (230 + 2 * 100) / 1000


def test_mixed_steps_carry_the_running_row():
    # Two slots, chunks of 16: A (30 tokens) is prefilled whole; B (30) goes in as chunks of 16 + 14 (bucket 16),
    # each beside A's decode step in a 2-row step; B's last chunk is its first token.
    # A: prefill (token 1), then 2 mixed steps (tokens 2, 3) -> done. B: then 2 more tokens in 1-row steps.
    expected = 230 + 2 * (140 + 50) + 2 * 100
    assert serve_model.simulate([10, 10], [3, 3], 2, 16, COSTS) == expected / 1000


def test_serve_benchmark_keeps_the_fastest_pass_and_lists_all():
    import serve  # benchmarks/serve.py

    nan = float("nan")
    rows = [
        dict(system="s", output_tokens_per_s=v, ttft_p50_s=i, failed=0, errors=[])
        for i, v in enumerate([20.5, nan, 23.25, 19.0])
    ]
    rows[3].update(failed=2, errors=["APITimeoutError: timed out"])  # a slower pass had failures
    best = serve.best_pass(rows)
    assert best["output_tokens_per_s"] == 23.25 and best["ttft_p50_s"] == 2  # the whole row of that pass
    assert best["passes"][0] == 20.5 and best["passes"][2:] == [23.25, 19.0]
    assert best["failed"] == 2 and best["errors"] == ["APITimeoutError: timed out"]  # not hidden
    failed = serve.best_pass([dict(system="s", output_tokens_per_s=nan, failed=16, errors=["e"])])  # all failed
    assert failed["passes"] and failed["output_tokens_per_s"] != failed["output_tokens_per_s"]
    assert failed["failed"] == 16 and failed["errors"] == ["e"]
