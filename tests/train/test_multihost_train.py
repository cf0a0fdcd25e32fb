"""`qwen-jax train` across processes, and its launch settings.

Multi-process runs are the real CLI in 2 local processes x 4 CPU devices joined by
`jax.distributed` (gloo collectives), compared with 1 process x 8 devices in this process:
SFT (resume after SIGKILL, SIGTERM to one process), DPO and GRPO.
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
from test_dpo_train import pair_files  # noqa: F401 (fixture)
from test_grpo_train import _config as _grpo_config
from test_grpo_train import grpo_setup  # noqa: F401 (fixture)
from train_fixtures import TRAIN_LINES, _config, _metrics, compilation_cache, tiny_model_dir, train_file  # noqa: F401

from qwen_jax import load_model
from qwen_jax.cli import main
from qwen_jax.errors import LaunchError
from qwen_jax.train import multihost
from qwen_jax.train.grpo_trainer import GRPOTrainer
from qwen_jax.train.loop import EXIT_PREEMPTED, Trainer

# The CLI; process P (* for every process) sends itself signal NAME after step S when
# QWEN_JAX_TEST_SIGNAL=P:S:NAME. Before a SIGKILL it waits for the checkpoints being written.
_CHILD = """
import os, signal, sys
plan = os.environ.get("QWEN_JAX_TEST_SIGNAL")
if plan:
    from qwen_jax.train import loop
    process, at_step, name = plan.split(":")
    run = loop.Trainer.run

    def send(self, step):
        import jax
        if step == int(at_step) and process in ("*", str(jax.process_index())):
            if name == "SIGKILL":
                self.checkpoints.wait_until_finished()
            os.kill(os.getpid(), getattr(signal, name))

    loop.Trainer.run = lambda self, on_step_end=None: run(self, on_step_end=send)
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
        elif isinstance(value, (list, tuple)):  # a list setting: its values after the flag, none when empty
            flags += [flag, *map(str, value)] if value else []
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


def _same_final_model(out_a, out_b) -> None:
    ids = np.asarray([[3, 4, 5, 6, 7]])
    a, b = load_model(os.path.join(out_a, "model")), load_model(os.path.join(out_b, "model"))
    np.testing.assert_allclose(np.asarray(b(ids)), np.asarray(a(ids)), atol=1e-5)


def test_dpo_on_two_processes_equals_one(tiny_model_dir, pair_files, tmp_path, compilation_cache):
    """Full-weight DPO on fsdp=8 with reference log-probabilities precomputed (by both processes
    together, each its rows) and gradient accumulation: 2 x 4 devices log the losses, DPO metrics and
    eval metrics of 1 x 8, and write the same final model."""
    run = dict(
        method="dpo",
        steps=2,
        batch_size=8,
        grad_accum=2,
        seq_len=16,
        beta=0.5,
        save_every=0,
        mesh="fsdp=8",
        precompute_ref_logprobs=True,
        eval_data=pair_files["eval"],
    )
    single = Trainer(_config(tiny_model_dir, pair_files["train"], tmp_path / "one", **run), log=lambda m: None)
    assert single.run() == 0
    config = _config(tiny_model_dir, pair_files["train"], tmp_path / "two", **run)
    for i, (status, stderr) in enumerate(_two_processes(config, compilation_cache)):
        assert status == 0, f"process {i}:\n{stderr[-3000:]}"
    one, two = _metrics(single.config.out), _metrics(config.out)
    assert [m["step"] for m in two] == [1, 2] and "eval_rewards/accuracies" in two[-1]
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/margins", "logps/rejected", "pairs"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=f"step {a['step']} {key}")
    for key in ("eval_loss", "eval_rewards/margins", "eval_logps/chosen"):
        np.testing.assert_allclose(two[-1][key], one[-1][key], rtol=1e-5, atol=1e-6, err_msg=key)
    _same_final_model(single.config.out, config.out)


def test_grpo_on_two_processes_equals_one(grpo_setup, tmp_path, compilation_cache):
    """LoRA GRPO on fsdp=8 with a KL term and gradient accumulation: each process rolls out its 2 of
    the 4 prompts (x 4 generations) on its own 4 devices, with the adapters and the base gathered
    from the devices of both (fsdp spans the processes). SIGTERM to process 1 after step 1 stops both
    at the same step; resumed by one process, the run finishes. Every step's seeded rollouts give the
    rewards and completion lengths of 1 x 8 devices without interruption, the losses and KL the same
    values (so the parameters after each update are the same), and the final model is the same."""
    run = dict(steps=4, batch_size=4, num_generations=4, grad_accum=2, beta=0.05, mesh="fsdp=8", eval_every=2)
    run["eval_data"] = grpo_setup[1]  # greedy rollouts of 4 prompts, 2 per process
    single = GRPOTrainer(_grpo_config(grpo_setup, tmp_path / "one", **run), log=lambda m: None)
    assert single.run() == 0
    config = _grpo_config(grpo_setup, tmp_path / "two", **run)
    env = {**compilation_cache, "GRPO_TEST_TOKEN": os.environ["GRPO_TEST_TOKEN"]}
    saved = []
    for i, (status, stderr) in enumerate(_two_processes(config, env, signal_plan="1:1:SIGTERM")):
        assert status == EXIT_PREEMPTED, f"process {i}:\n{stderr[-3000:]}"
        assert "parameters gathered across processes (frozen and trained)" in stderr, stderr[-3000:]
        found = re.search(r"signal SIGTERM: checkpoint saved at step (\d+)", stderr)
        assert found, f"process {i}:\n{stderr[-3000:]}"
        saved.append(int(found.group(1)))
    assert saved[0] == saved[1] and 2 <= saved[0] < run["steps"], saved
    assert [m["step"] for m in _metrics(config.out)] == list(range(1, saved[0] + 1))
    resumed_log = []
    assert GRPOTrainer(config.replace(resume=True), log=resumed_log.append).run() == 0
    # The prompts and eval prompts the two processes tokenized (a part each) serve the one process.
    cache_lines = [m for m in resumed_log if m.startswith("data: ") and "data_cache" in m]
    assert len(cache_lines) == 2 and all(m.startswith("data: cached tokens") for m in cache_lines), resumed_log
    assert len(list((tmp_path / "two" / "data_cache").glob("*/parts-of-2/1/records.bin"))) == 1  # eval = train file
    one, two = _metrics(single.config.out), _metrics(config.out)
    assert [m["step"] for m in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        for key in ("reward", "rewards/chosen_token/mean", "completion_length", "completion_length/max", "tokens"):
            assert b[key] == a[key], (a["step"], key, a[key], b[key])
        for key in ("loss", "kl", "entropy", "grad_norm", "reward_std", "frac_reward_zero_std"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=f"step {a['step']} {key}")
        assert b["logprob_diff"] < 1e-4
        assert b.get("eval_reward") == a.get("eval_reward") and b.get("eval_completion_length") == a.get(
            "eval_completion_length"
        )
    assert [m["step"] for m in two if "eval_reward" in m] == [2, 4]  # step 2 on two processes, 4 on one
    assert one[-1]["kl"] > 0 and len({m["reward"] for m in one}) > 1
    _same_final_model(single.config.out, config.out)


# Process P of 2 lays an [8, 6] array out on three meshes of the 8 devices and prints what
# ProcessLocalView makes of it: its values on the local devices, whether that needed a copy, and
# whether the local arrays are the global array's own buffers.
_LOCAL_VIEW_CHILD = """
import json, sys
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from qwen_jax.train import multihost

multihost.initialize(sys.argv[1], 2, int(sys.argv[2]))
mine = [d for d in jax.devices() if d.process_index == 0], [d for d in jax.devices() if d.process_index == 1]
grids = {
    "data_across_processes": np.asarray([*mine[0], *mine[1]]).reshape(2, 4, 1),
    "fsdp_across_processes": np.asarray([*mine[0], *mine[1]]).reshape(1, 8, 1),
    "interleaved": np.asarray([d for pair in zip(*mine) for d in pair]).reshape(1, 8, 1),
}
values = np.arange(48, dtype=np.float32).reshape(8, 6)
report = {}
for name, grid in grids.items():
    mesh = Mesh(grid, ("data", "fsdp", "tensor"))
    specs = {"sharded": PartitionSpec("fsdp", None), "replicated": PartitionSpec()}
    tree = {key: jax.make_array_from_callback(values.shape, NamedSharding(mesh, spec), lambda i: values[i])
            for key, spec in specs.items()}
    view = multihost.ProcessLocalView(mesh)
    local = view.local(tree)
    pointers = lambda a: sorted(s.data.unsafe_buffer_pointer() for s in a.addressable_shards)
    report[name] = {
        "mesh": dict(view.mesh.shape),
        "equal": all(np.array_equal(np.asarray(a), values) and a.is_fully_addressable for a in local.values()),
        "copies": [view.needs_copy(tree[key]) for key in specs],
        "own_buffers": [pointers(local[key]) == pointers(tree[key]) for key in specs],
    }
print(json.dumps(report))
"""


def test_process_local_view_copies_only_what_spans_processes(compilation_cache):
    """Arrays seen on a process's own devices: sharded over fsdp within a process (data across
    processes) or replicated, they are the global array's buffers; sharded over devices of both
    processes, a gathered copy; processes whose devices interleave in the mesh get all theirs on fsdp."""
    port = _free_port()
    env = {**compilation_cache, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _LOCAL_VIEW_CHILD, f"localhost:{port}", str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [w.communicate(timeout=120) for w in workers]
    finally:
        for w in workers:
            w.kill()
    for w, (out, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-3000:]
        report = json.loads(out.strip().splitlines()[-1])
        assert all(r["equal"] for r in report.values()), report
        local_mesh = {"data": 1, "fsdp": 4, "tensor": 1}
        assert report["data_across_processes"] == dict(
            mesh=local_mesh, equal=True, copies=[False, False], own_buffers=[True, True]
        )
        assert report["fsdp_across_processes"] == dict(
            mesh=local_mesh, equal=True, copies=[True, False], own_buffers=[False, True]
        )
        assert report["interleaved"] == dict(
            mesh=local_mesh, equal=True, copies=[True, False], own_buffers=[False, True]
        )


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


# --------------------------------------------------------------------------- launch settings
def test_launch_settings_are_checked_and_clusters_detected(monkeypatch, tmp_path, capsys):
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
    with pytest.raises(LaunchError, match="needs all of --coordinator"):
        multihost.initialize(coordinator="localhost:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(LaunchError, match=r"process id must be in \[0, 2\), got 2"):
        multihost.initialize(coordinator="localhost:1234")
    monkeypatch.setenv("JAX_PROCESS_ID", "one")
    with pytest.raises(LaunchError, match="JAX_PROCESS_ID='one' is not an integer"):
        multihost.initialize()
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    with pytest.raises(LaunchError, match="expected HOST:PORT"):
        multihost.initialize(coordinator="localhost")
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    monkeypatch.delenv("JAX_PROCESS_ID")
    if multihost._detected_cluster() is None:
        with pytest.raises(LaunchError, match="multi-process runs only"):
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
