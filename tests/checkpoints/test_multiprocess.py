"""Two processes joined by `jax.distributed.initialize` (4 CPU devices each) load and run a model
on one 8-device mesh: each process reads only the shards of its own devices, and the logits equal
the single-process ones."""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

from qwen_jax.load import load_model

WORKER = textwrap.dedent("""
    import os, sys
    process_id, port, checkpoint, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # collectives across processes on CPU
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)
    import numpy as np
    from jax.experimental import multihost_utils
    import qwen_jax

    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    model = qwen_jax.load_model(checkpoint, mesh=qwen_jax.make_mesh(fsdp=4, tensor=2))
    kernel = model.model.layers.self_attn.q_proj.kernel[...]
    assert not kernel.is_fully_addressable  # each process holds only its devices' shards
    ids = np.random.RandomState(0).randint(0, 256, (8, 12)).astype(np.int32)
    logits = multihost_utils.process_allgather(model(ids), tiled=True)
    if process_id == 0:
        np.save(out, np.asarray(logits))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    ids = np.random.RandomState(0).randint(0, 256, (8, 12)).astype(np.int32)
    reference = np.asarray(load_model(path)(ids))

    out = tmp_path / "logits.npy"
    port = str(_free_port())
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(i), port, path, str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [w.communicate(timeout=300)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
    for i, (worker, output) in enumerate(zip(workers, outputs)):
        assert worker.returncode == 0, f"process {i} failed:\n{output[-3000:]}"
    np.testing.assert_allclose(np.load(out), reference, atol=1e-5)
