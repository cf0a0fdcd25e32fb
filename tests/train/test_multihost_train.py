"""`qwen-jax train` across processes, and the data sources it reads.

Multi-process runs are the real CLI in 2 local processes x 4 CPU devices joined by
`jax.distributed` (gloo collectives), compared with 1 process x 8 devices in this process.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from train_fixtures import TRAIN_LINES, _config, _metrics, compilation_cache, tiny_model_dir, train_file  # noqa: F401

from qwen_jax.train import data as data_lib
from qwen_jax.train import sources, token_cache
from qwen_jax.train.trainer import EXIT_PREEMPTED, Trainer

# The CLI; process P (* for every process) sends itself signal NAME after step S when
# QWEN_JAX_TEST_SIGNAL=P:S:NAME. Before a SIGKILL it waits for the checkpoints being written.
_CHILD = """
import os, signal, sys
plan = os.environ.get("QWEN_JAX_TEST_SIGNAL")
if plan:
    from qwen_jax.train import trainer
    process, at_step, name = plan.split(":")
    run = trainer.Trainer.run

    def send(self, step):
        import jax
        if step == int(at_step) and process in ("*", str(jax.process_index())):
            if name == "SIGKILL":
                self.checkpoints.wait_until_finished()
            os.kill(os.getpid(), getattr(signal, name))

    trainer.Trainer.run = lambda self, on_step_end=None: run(self, on_step_end=send)
from qwen_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""
# Full fine-tuning as in test_train (gradient accumulation, periodic checkpoints at 3 and 6).
_RUN = dict(steps=6, save_every=3, batch_size=8, grad_accum=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _flags(config) -> list[str]:
    flags = []
    for key, value in config.to_dict().items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


def _two_processes(
    config, env, signal_plan: str | None = None, timeout: float = 240, launch_by_env: bool = False
) -> list[tuple[int, str]]:
    """Run `qwen-jax train` as 2 processes x 4 devices; (exit status, stderr) of each. The launch
    settings are flags, or with `launch_by_env` the JAX_* environment variables."""
    port = _free_port()
    env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    if signal_plan:
        env["QWEN_JAX_TEST_SIGNAL"] = signal_plan
    workers = []
    for i in range(2):
        launch = ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)]
        process_env = env
        if launch_by_env:
            launch, process_env = (
                [],
                {
                    **env,
                    "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                    "JAX_NUM_PROCESSES": "2",
                    "JAX_PROCESS_ID": str(i),
                },
            )
        workers.append(
            subprocess.Popen(
                [sys.executable, "-c", _CHILD, "train", *_flags(config), *launch],
                env=process_env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        errors = [w.communicate(timeout=timeout)[1] for w in workers]
    finally:
        for w in workers:
            w.kill()
    return [(w.returncode, e) for w, e in zip(workers, errors)]


def _losses(out) -> list[float]:
    return [m["loss"] for m in _metrics(out)]


def test_two_processes_train_like_one(tiny_model_dir, train_file, tmp_path, compilation_cache):
    """Full fine-tuning on fsdp=8, SIGKILLed on both processes mid-run and resumed: 2 x 4 devices
    give the losses (and eval loss) of 1 x 8 without interruption; only process 0 writes the
    single-copy outputs; checkpoints and OUT/model are written together; OUT/model loads and
    --export-hf (written by process 0) loads in transformers with the same logits."""
    run = dict(_RUN, mesh="fsdp=8", eval_data=train_file)
    single = Trainer(_config(tiny_model_dir, train_file, tmp_path / "one", **run), log=lambda m: None)
    assert single.run() == 0
    export = tmp_path / "two_hf"
    config = _config(tiny_model_dir, train_file, tmp_path / "two", export_hf=str(export), **run)
    # Both processes killed after step 4 (checkpoint 3 complete), then the run resumed.
    for i, (status, stderr) in enumerate(_two_processes(config, compilation_cache, signal_plan="*:4:SIGKILL")):
        assert status < 0, f"process {i}:\n{stderr[-3000:]}"  # killed (by its SIGKILL, or aborted as its peer died)
    assert [m["step"] for m in _metrics(config.out)] == [1, 2, 3, 4]
    results = _two_processes(config.replace(resume=True), compilation_cache)
    for i, (status, stderr) in enumerate(results):
        assert status == 0, f"process {i}:\n{stderr[-3000:]}"
        assert "resumed from" in stderr
    assert [m["step"] for m in _metrics(config.out)] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(_losses(config.out), _losses(single.config.out), rtol=1e-5)
    eval_losses = [m["eval_loss"] for m in _metrics(config.out) if "eval_loss" in m]
    assert len(eval_losses) == 1
    np.testing.assert_allclose(eval_losses, [_metrics(single.config.out)[-1]["eval_loss"]], rtol=1e-5)
    assert sorted(os.listdir(os.path.join(config.out, "checkpoints"))) == ["3", "6"]
    events = os.listdir(os.path.join(config.out, "tensorboard"))
    assert len(events) == 2, events  # one writer per launch, process 0's
    assert sorted(os.listdir(config.out)) == sorted(os.listdir(single.config.out))  # nothing per process
    log_0, log_1 = results[0][1], results[1][1]
    assert "[process" not in log_0 and "[process 1] training all weights" in log_1
    from qwen_jax import load_model

    reloaded = load_model(os.path.join(config.out, "model"))
    ids = np.asarray([[3, 4, 5, 6, 7]])
    expected = np.asarray(single.current_model()(ids))
    np.testing.assert_allclose(np.asarray(reloaded(ids)), expected, atol=1e-5)
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    with torch.no_grad():
        np.testing.assert_allclose(hf(torch.as_tensor(ids)).logits.numpy(), expected, atol=1e-4)


def test_sigterm_to_one_process_then_resume_on_one(tiny_model_dir, train_file, tmp_path, compilation_cache):
    """LoRA on fsdp=4 x tensor=2. SIGTERM to process 1 after step 2: both processes save the same
    step (JAX's preemption sync point: the first step every process reaches after the notice has
    propagated, so 3 or later depending on timing) and exit 143. Resumed by a single process, the
    run continues exactly as an uninterrupted single-process run."""
    lora = dict(_RUN, lora_rank=4, lora_alpha=16.0, lora_dropout=0.1, learning_rate=5e-2, mesh="fsdp=4,tensor=2")
    straight = Trainer(_config(tiny_model_dir, train_file, tmp_path / "straight", **lora), log=lambda m: None)
    assert straight.run() == 0
    config = _config(tiny_model_dir, train_file, tmp_path / "term", **lora)
    started = time.monotonic()
    results = _two_processes(config, compilation_cache, signal_plan="1:2:SIGTERM")
    saved = []
    for i, (status, stderr) in enumerate(results):
        assert status == EXIT_PREEMPTED, f"process {i}:\n{stderr[-3000:]}"
        found = re.search(r"signal SIGTERM: checkpoint saved at step (\d+); rerun with --resume", stderr)
        assert found, f"process {i}:\n{stderr[-3000:]}"
        saved.append(int(found.group(1)))
    step = saved[0]
    assert saved == [step, step] and 3 <= step < _RUN["steps"], saved  # the same step on both, before the end
    assert time.monotonic() - started < 240
    expected_checkpoints = sorted({str(s) for s in (3, step)})  # save_every=3, plus the preemption save
    assert sorted(os.listdir(os.path.join(config.out, "checkpoints"))) == expected_checkpoints
    assert not os.path.exists(os.path.join(config.out, "model"))
    np.testing.assert_allclose(_losses(config.out), _losses(straight.config.out)[:step], rtol=1e-5)

    resumed = Trainer(config.replace(resume=True), log=lambda m: None)
    assert int(resumed.state["step"]) == step
    assert resumed.run() == 0
    np.testing.assert_allclose(_losses(config.out), _losses(straight.config.out), rtol=1e-5)


def test_bad_record_on_process_1_ends_both_with_status_2(tiny_model_dir, tmp_path, compilation_cache):
    lines = [json.dumps(line) for line in TRAIN_LINES] + ['{"text": "the cat", oops}', json.dumps(TRAIN_LINES[0])]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")  # the bad line lies in the second half: process 1 reads it
    config = _config(tiny_model_dir, str(data), tmp_path / "bad")
    started = time.monotonic()
    results = _two_processes(config, compilation_cache, timeout=120, launch_by_env=True)
    assert time.monotonic() - started < 120
    for i, (status, stderr) in enumerate(results):
        assert status == 2, f"process {i}:\n{stderr[-3000:]}"
        assert f"{data}:7: invalid JSON" in stderr
    assert not os.path.exists(os.path.join(config.out, "checkpoints"))


# --------------------------------------------------------------------------- data sources
ALPACA = [
    {"instruction": "what color is the sky", "input": "", "output": "blue"},
    {"instruction": "the dog ran to", "input": "the park", "output": "the park"},
    {"instruction": "one two three", "input": "four", "output": "five six"},
]


def _examples(source, tokenizer, mapping=sources.ColumnMapping()) -> list[tuple[list, list]]:
    tokenization = data_lib.Tokenization(tokenizer)
    return [
        (e.tokens.tolist(), e.loss_mask.tolist())
        for e in (tokenization.example(mapping.canonical(record)) for _, record in source.records())
    ]


def test_sources_give_the_examples_of_the_equivalent_jsonl(tiny_model_dir, train_file, tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qwen_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    expected = [(e.tokens.tolist(), e.loss_mask.tolist()) for e in data_lib.read_jsonl(train_file, tokenizer)]
    # Parquet needs one schema: every row has all columns (None where a JSONL line has no key),
    # so the records are given an explicit format each, as users of such tables would.
    table_rows = [
        {"prompt": r.get("prompt"), "completion": r.get("completion"), "text": r.get("text")} for r in TRAIN_LINES
    ]
    pq.write_table(pa.Table.from_pylist(table_rows[:4]), tmp_path / "a.parquet", row_group_size=3)
    os.makedirs(tmp_path / "shards")
    pq.write_table(pa.Table.from_pylist(table_rows[:4]), tmp_path / "shards" / "00.parquet", row_group_size=3)
    pq.write_table(pa.Table.from_pylist(table_rows[4:]), tmp_path / "shards" / "01.parquet")
    datasets.Dataset.from_list(table_rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(table_rows)}).save_to_disk(str(tmp_path / "dict"))

    def canonical(row):  # a table row as the JSONL line it came from
        return {k: v for k, v in row.items() if v is not None}

    class Rows(sources.ColumnMapping):
        def canonical(self, record):
            return super().canonical(canonical(record))

    for spec in (tmp_path / "shards", tmp_path / "saved", tmp_path / "dict"):
        source = sources.open_source(str(spec))
        assert _examples(source, tokenizer, Rows()) == expected, spec
    assert _examples(sources.open_source(str(tmp_path / "a.parquet")), tokenizer, Rows()) == expected[:4]
    # Every source splits into contiguous parts that concatenate to the whole, for any count
    # (JSONL parts are byte ranges: blank lines, multi-byte characters, no final newline).
    ragged = tmp_path / "ragged.jsonl"
    ragged.write_bytes(
        "\n".join(
            [json.dumps({"text": "ünïcödé " * n}, ensure_ascii=False) if n % 3 else "" for n in range(1, 12)]
        ).encode()
    )
    assert [loc for loc, _ in sources.open_source(str(ragged)).records()][-1] == f"{ragged}:11"
    for spec in (train_file, ragged, tmp_path / "shards", tmp_path / "saved"):
        source = sources.open_source(str(spec))
        whole = [location for location, _ in source.records()]
        for parts in (2, 3, 5, 7):
            assert [loc for p in range(parts) for loc, _ in source.records(p, parts)] == whole, (spec, parts)
    with pytest.raises(sources.DataError, match="no split 'test'"):
        sources.open_source(str(tmp_path / "dict"), split="test")
    with pytest.raises(sources.DataError, match="data file not found"):
        sources.open_source(str(tmp_path / "missing.jsonl"))

    # Column mapping: alpaca's instruction + input -> prompt, output -> completion.
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("".join(json.dumps(r) + "\n" for r in ALPACA))
    mapping = sources.ColumnMapping("prompt-completion", prompt=("instruction", "input"), completion="output")
    mapped = _examples(sources.open_source(str(alpaca)), tokenizer, mapping)
    plain = tmp_path / "plain.jsonl"
    plain.write_text(
        "".join(
            json.dumps({"prompt": "\n\n".join(filter(None, (r["instruction"], r["input"]))), "completion": r["output"]})
            + "\n"
            for r in ALPACA
        )
    )
    assert mapped == _examples(sources.open_source(str(plain)), tokenizer)

    # A Hub id goes to datasets.load_dataset with the split (no Hub access here: a local dataset stands in).
    calls = []

    def load_dataset(repo_id, split):
        calls.append((repo_id, split))
        return datasets.Dataset.from_list(ALPACA)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    hub = sources.open_source("tatsu-lab/alpaca", split="train")
    assert calls == [("tatsu-lab/alpaca", "train")] and _examples(hub, tokenizer, mapping) == mapped


def test_token_cache_is_reused_and_keyed_by_inputs(tiny_model_dir, train_file, tmp_path):
    from qwen_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    tokenization = data_lib.Tokenization(tokenizer)
    messages = []

    def load(path, skip_bad_lines=False):
        return token_cache.load(
            sources.open_source(str(path)),
            tokenization,
            sources.ColumnMapping(),
            str(tmp_path / "cache"),
            tokenizer_dir=tiny_model_dir,
            skip_bad_lines=skip_bad_lines,
            progress=False,
            log=messages.append,
        )

    store, stats = load(train_file)
    in_memory = data_lib.read_jsonl(train_file, tokenizer)
    assert stats.examples == len(store) == len(in_memory)
    for i, example in enumerate(in_memory):
        assert store.example(i).tokens.tolist() == example.tokens.tolist()
        assert store.example(i).loss_mask.tolist() == example.loss_mask.tolist()
    load(train_file)
    assert "tokenized into" in messages[0] and "cached tokens" in messages[1]
    load(train_file, skip_bad_lines=True)  # other settings: another cache
    copy = tmp_path / "copy.jsonl"
    copy.write_text(open(train_file).read() + json.dumps({"text": "a dog"}) + "\n")  # other data: another cache
    assert len(load(copy)[0]) == len(store) + 1
    assert len(os.listdir(tmp_path / "cache")) == 3


def test_batches_built_from_row_subsets_equal_whole_batches(tiny_model_dir, train_file):
    """Whatever rows each process builds, together they are the batch one process would build;
    the last batch is padded with zero-weight rows, so every process runs the same steps."""
    from qwen_jax.tokenizer import Tokenizer

    examples = data_lib.read_jsonl(train_file, Tokenizer.from_dir(tiny_model_dir))
    loader = data_lib.DataLoader(examples, seq_len=16, batch_rows=3, seed=1)
    assert loader.truncated == 0 and loader.dropped == 0
    for epoch in range(2):
        for index in range(loader.batches_in_epoch(epoch)):
            whole = loader.batch(epoch, index)
            for rows in ([0, 1], [2], [0, 2], [1]):
                part = loader.batch(epoch, index, rows=rows)
                for name in ("input_ids", "positions", "segment_ids", "targets", "weights"):
                    np.testing.assert_array_equal(getattr(part, name), getattr(whole, name)[rows])
            assert loader.batch_tokens(epoch, index) == int(np.count_nonzero(whole.segment_ids))
    plan = loader.plan(0)
    assert plan.rows % 3 == 0 and plan.real_rows < plan.rows  # 6 examples in 4 rows of 16, padded to 6
    last = loader.batch(0, loader.batches_in_epoch(0) - 1)
    assert not last.weights[plan.real_rows - plan.rows :].any()
    # Truncation and dropping as fit_to_length does them.
    short = data_lib.DataLoader(examples, seq_len=4, batch_rows=2)
    stats = data_lib.DatasetStats()
    fitted = data_lib.fit_to_length(examples, 4, stats)
    assert (short.truncated, short.dropped, len(short.kept)) == (stats.truncated, stats.dropped, len(fitted))


# --------------------------------------------------------------------------- launch settings
def test_launch_settings_are_checked_and_clusters_detected(monkeypatch, tmp_path, capsys):
    from qwen_jax.train import multihost

    for name in (
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "SLURM_NTASKS",
        "SLURM_STEP_NUM_TASKS",
        "SLURM_PROCID",
        "OMPI_COMM_WORLD_SIZE",
    ):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(multihost.LaunchError, match="needs all of --coordinator"):
        multihost.initialize(coordinator="localhost:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(multihost.LaunchError, match=r"process id must be in \[0, 2\), got 2"):
        multihost.initialize(coordinator="localhost:1234")
    monkeypatch.setenv("JAX_PROCESS_ID", "one")
    with pytest.raises(multihost.LaunchError, match="JAX_PROCESS_ID='one' is not an integer"):
        multihost.initialize()
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    with pytest.raises(multihost.LaunchError, match="expected HOST:PORT"):
        multihost.initialize(coordinator="localhost")
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    monkeypatch.delenv("JAX_PROCESS_ID")
    if multihost._detected_cluster() is None:
        with pytest.raises(multihost.LaunchError, match="multi-process runs only"):
            multihost.initialize(local_device_ids=[0])

    if multihost._detected_cluster() is None:  # not on a TPU VM (no libtpu)
        monkeypatch.setenv("SLURM_NTASKS", "1")
        monkeypatch.setenv("SLURM_PROCID", "0")
        assert multihost._detected_cluster() is None  # one task: a plain process with every GPU of the node
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert multihost._detected_cluster() == "SLURM"
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert multihost._detected_cluster() == "Open MPI"
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")

    from qwen_jax.cli import main

    assert (
        main(
            [
                "train",
                "--model",
                str(tmp_path),
                "--data",
                "x.jsonl",
                "--out",
                str(tmp_path / "o"),
                "--coordinator",
                "localhost:1234",
                "--process-id",
                "0",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs all of --coordinator HOST:PORT, --num-processes N and --process-id I" in err[0]
