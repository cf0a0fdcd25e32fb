"""benchmarks/device_suite.py: its CPU smoke mode writes the JSON and the table, steps whose feature
has not landed are reported as skipped (and run once it has), and it fails fast with one line."""

import dataclasses
import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import qwen_jax

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SUITE = str(BENCHMARKS / "device_suite.py")


@pytest.fixture(scope="module")
def device_suite():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import device_suite

        yield device_suite
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    """Shared by the tests here, so the random checkpoints of the smoke sizes are written once."""
    return str(tmp_path_factory.mktemp("device_suite_work"))


def _env() -> dict:
    # One CPU device, as on a machine without an accelerator (the test suite fakes 8).
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}


def test_cpu_smoke_writes_json_and_table(tmp_path, workdir, device_suite):
    # Every kind of step once (0.5B tied, 7B untied with the HF peer); the others run the same code
    # (prefill: in the test of the feature steps below).
    skip = ["decode-0.5B", "prefill-2K-0.5B", "prefill-2K-7B", "train-1.5B"]
    child = subprocess.run(
        [sys.executable, SUITE, "--cpu-smoke", "--out", str(tmp_path / "out"), "--workdir", workdir, "--skip", *skip],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "device_suite.json").read_text())
    table = (tmp_path / "out" / "device_suite.md").read_text()
    assert report["machine"]["plan"] == "cpu-smoke" and report["machine"]["backend"] == "cpu"
    records = {record["step"]: record for record in report["steps"]}
    expected = [step.name for step in device_suite.STEPS if step.name not in skip]
    assert list(records) == expected

    accepts = inspect.signature(qwen_jax.load_model).parameters
    for step in device_suite.STEPS:
        if step.name in skip:
            continue
        record = records[step.name]
        assert f"| {step.name} |" in table
        if step.needs and step.needs not in accepts:
            assert record["status"] == device_suite.SKIPPED_FEATURE and not record["rows"]
            assert f"| {step.name} | {device_suite.SKIPPED_FEATURE} |" in table
            continue
        assert record["status"] == "ok", record
        assert record["rows"] and all(math.isfinite(row["value"]) and row["value"] > 0 for row in record["rows"]), (
            record
        )

    decode = {row["metric"]: row for row in records["decode-7B"]["rows"]}
    assert 0 < decode["decode tok/s, batch 1"]["percent"], decode
    assert decode["prefill tok/s (1x16), bfloat16"]["hf"] > 0, decode  # the HF peer ran
    first_run, second_run = (row["note"] for row in records["startup-0.5B"]["rows"])
    assert first_run.endswith(", 0 cache hits") and not first_run.startswith("0 "), first_run
    assert second_run.startswith("0 XLA compilations, "), second_run
    assert "train tokens/s" in records["train-0.5B"]["rows"][0]["metric"]


def test_fails_fast_with_one_line(tmp_path):
    without_accelerator = subprocess.run(
        [sys.executable, SUITE, "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, env=_env()
    )
    assert without_accelerator.returncode == 2
    assert without_accelerator.stderr.strip().splitlines() == [
        "device_suite: error: no accelerator found: JAX runs on the CPU. Install the JAX backend for your machine "
        '(pip install -e ".[cuda12]", ".[cuda13]" or ".[tpu]") or run the CPU smoke test with --cpu-smoke'
    ]
    assert not (tmp_path / "device_suite.json").exists()


def test_memory_and_step_checks(device_suite, tmp_path, monkeypatch):
    plan = device_suite.accelerator_plan()
    steps = {step.name: step for step in device_suite.STEPS}
    weights_7b = 7_615_616_512 * 2
    assert device_suite.estimated_bytes(plan, steps["decode-7B"]) > 2 * weights_7b
    # 1.5B training: float32 weights, gradients and two AdamW moments at least.
    assert device_suite.estimated_bytes(plan, steps["train-1.5B"]) > 16 * 1_543_714_304

    class SixteenGiB:
        device_kind = "a 16 GiB accelerator"

        def memory_stats(self):
            return {"bytes_limit": 16 * 2**30}

    monkeypatch.setattr(device_suite.jax, "devices", lambda *args: [SixteenGiB()])
    device_suite.check_fits(plan, [steps["decode-0.5B"], steps["prefill-2K-0.5B"]], str(tmp_path))
    with pytest.raises(
        device_suite.PreflightError, match=r"step decode-7B needs about 2\d\.\d GiB .* --skip decode-7B"
    ):
        device_suite.check_fits(plan, [steps["decode-0.5B"], steps["decode-7B"]], str(tmp_path))
    with pytest.raises(device_suite.PreflightError, match="unknown step.*decode-70B"):
        device_suite.select_steps(["decode-70B"], [])
    assert [s.name for s in device_suite.select_steps(None, ["train-1.5B"])][-1] == "train-0.5B"
    assert [s.name for s in device_suite.select_steps(["prefill-2K-0.5B", "decode-0.5B"], [])] == [
        "decode-0.5B",
        "prefill-2K-0.5B",
    ]  # suite order
    with pytest.raises(device_suite.PreflightError, match="unknown step.*decode-70B"):
        device_suite.select_steps(["decode-0.5B", "decode-70B"], [])


def test_feature_steps_run_once_load_model_accepts_their_argument(device_suite, workdir, monkeypatch):
    """What happens when the long-context and quantization branches land: a load_model taking the
    documented `attention=` / `quantize=` arguments makes those steps run and pass them."""
    real_load_model = qwen_jax.load_model
    calls = []

    def load_model(path, *, attention=None, quantize=None, **kwargs):
        calls.append((attention, quantize))
        return real_load_model(path, **kwargs)

    monkeypatch.setattr(qwen_jax, "load_model", load_model)
    plan = dataclasses.replace(device_suite.cpu_smoke_plan(), batches=(1,), long_prefill_len=100, new_tokens=4)
    suite = device_suite.Suite(plan, workdir, hf_peer=False)
    steps = [step for step in device_suite.STEPS if step.name in ("prefill-32K-0.5B", "decode-int8-7B")]
    reports = []
    assert device_suite.run_steps(suite, steps, keep_going=False, report=reports.append) == 0
    assert [record["status"] for record in reports[-1]] == ["ok", "ok"]
    assert calls == [("auto", None), (None, "int8")]
    prefill, decode = (record["rows"] for record in reports[-1])
    assert any(row["metric"] == "prefill tok/s (1x100), attention=auto" for row in prefill)
    assert any(row["metric"] == "decode tok/s, batch 1" and row["percent"] > 0 for row in decode)
