"""HF <-> Orbax conversion: bit-exact round trips, logits, sharded restore, memory, bad input.

transformers (loading the exported directory) and the source safetensors bytes are the oracle.
"""

import contextlib
import glob
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from qwen_jax.checkpoints import params as checkpoint_params
from qwen_jax.checkpoints.hf import HFCheckpoint
from qwen_jax.checkpoints.orbax import is_orbax_checkpoint, read_manifest
from qwen_jax.checkpoints.params import param_groups, param_specs
from qwen_jax.checkpoints.safetensors import SafetensorsFile, write_safetensors
from qwen_jax.cli import main as cli_main
from qwen_jax.config import Qwen2Config
from qwen_jax.convert.to_hf import orbax_to_hf
from qwen_jax.convert.to_orbax import hf_to_orbax
from qwen_jax.errors import CheckpointError
from qwen_jax.load import load_model
from qwen_jax.sharding import make_mesh, state_shardings

IDS = np.array([[3, 17, 250, 9, 42, 42, 0, 128, 77, 5, 64, 200]], dtype=np.int32)


def _tensor_bytes(ckpt: HFCheckpoint, name: str) -> tuple[str, tuple[int, ...], bytes]:
    array = np.asarray(ckpt.get(name))
    return str(array.dtype), array.shape, array.tobytes()


def _source_names(ckpt: HFCheckpoint, config: Qwen2Config) -> set[str]:
    names = ckpt.names()
    if config.tie_word_embeddings:
        names.discard("lm_head.weight")  # a redundant copy some exporters write; exports never do
    return names


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(IDS).long()).logits.float().numpy()


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_round_trip_is_bit_exact_and_loads_in_transformers(hf_checkpoint, tmp_path, dtype, tied):
    from transformers import AutoModelForCausalLM

    torch_model, src = hf_checkpoint(seed=1, dtype=dtype, tie_word_embeddings=tied)
    orbax_dir, hf_dir = tmp_path / "orbax", tmp_path / "hf"
    summary = hf_to_orbax(src, orbax_dir, progress=False)
    # Untied exports are cut into several shards to exercise the index.
    export = orbax_to_hf(orbax_dir, hf_dir, max_shard_size="64KB" if not tied else "5GB", progress=False)

    manifest = read_manifest(orbax_dir)
    assert manifest["dtype"] == summary.dtype == export.dtype == dtype
    assert manifest["parameters"] == sum(p.numel() for p in torch_model.parameters())
    assert (len(export.files) > 2) == (not tied)
    source, exported = HFCheckpoint(src), HFCheckpoint(hf_dir)
    config = Qwen2Config.from_hf(src)
    assert exported.names() == _source_names(source, config)
    for name in exported.names():
        assert _tensor_bytes(exported, name) == _tensor_bytes(source, name), name

    reloaded, info = AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.dtype == getattr(torch, dtype)
    # Compared with the source loaded the same way: a model cast with .to(bfloat16) after building
    # (torch_model) also rounds its rotary buffers, which from_pretrained does not.
    original = AutoModelForCausalLM.from_pretrained(src).eval()
    np.testing.assert_array_equal(_torch_logits(reloaded.eval()), _torch_logits(original))
    assert (hf_dir / "generation_config.json").read_text() == (orbax_dir / "generation_config.json").read_text()


def test_row_blocks_round_trip_and_restore_onto_a_mesh(hf_checkpoint, tmp_path, monkeypatch):
    """Embedding and lm_head stored in uneven row blocks (as 0.5B's are) still round-trip and load sharded."""
    monkeypatch.setattr(checkpoint_params, "ROW_BLOCK_ELEMENTS", 1000)  # 15 rows of 64: 18 blocks of 256 rows
    _, src = hf_checkpoint(seed=10, tie_word_embeddings=False)
    hf_to_orbax(src, tmp_path / "orbax", progress=False)
    monkeypatch.setattr(checkpoint_params, "ROW_BLOCK_ELEMENTS", 2**24)  # the manifest, not the constant, decides
    groups = read_manifest(tmp_path / "orbax")["groups"]
    assert "model.embed_tokens.rows255" in groups and "lm_head.rows15" in groups
    orbax_to_hf(tmp_path / "orbax", tmp_path / "hf", max_shard_size="40KB", progress=False)
    source, exported = HFCheckpoint(src), HFCheckpoint(tmp_path / "hf")
    assert exported.names() == source.names()
    for name in exported.names():
        assert _tensor_bytes(exported, name) == _tensor_bytes(source, name), name
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    sharded = load_model(tmp_path / "orbax", dtype="float32", mesh=mesh)
    embedding = sharded.model.embed_tokens.embedding.get_value()
    assert not embedding.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(embedding), np.asarray(source.get("model.embed_tokens.weight")))
    np.testing.assert_allclose(
        np.asarray(sharded(IDS)), np.asarray(load_model(src, dtype="float32")(IDS)), atol=1e-5, rtol=0
    )


def test_dtype_conversion_through_the_cli(hf_checkpoint, tmp_path, capsys):
    """bf16 -> stored as float32 -> exported as bf16 reproduces the source bytes (the widening is exact)."""
    _, src = hf_checkpoint(seed=2, dtype="bfloat16")
    orbax_dir, hf_dir = tmp_path / "orbax", tmp_path / "hf"
    assert cli_main(["convert", src, str(orbax_dir), "--dtype", "float32"]) == 0
    assert "float32" in capsys.readouterr().out
    assert json.loads((orbax_dir / "config.json").read_text())["dtype"] == "float32"
    assert cli_main(["export-hf", str(orbax_dir), str(hf_dir), "--dtype", "bfloat16"]) == 0
    source, exported = HFCheckpoint(src), HFCheckpoint(hf_dir)
    for name in exported.names():
        assert _tensor_bytes(exported, name) == _tensor_bytes(source, name), name


def test_non_finite_weights_warn_or_refuse_with_strict(hf_checkpoint, tmp_path, capsys):
    """A NaN in the checkpoint, and a float32 value that overflows float16 in the cast: reported
    by name (the conversion still writes), refused with --strict (nothing written)."""
    model, src = hf_checkpoint(seed=4)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = 1e6
    model.save_pretrained(src)
    capsys.readouterr()  # transformers' progress bars
    assert cli_main(["convert", src, str(tmp_path / "warned")]) == 0
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("qwen-jax convert: warning: 1 tensor(s) hold NaN"), warning
    assert "model.layers.1.mlp.up_proj.weight" in warning[0] and is_orbax_checkpoint(tmp_path / "warned")
    assert cli_main(["convert", src, str(tmp_path / "half"), "--dtype", "float16"]) == 0
    assert "model.layers.0.self_attn.q_proj.weight" in capsys.readouterr().err  # inf after the cast
    assert cli_main(["convert", src, str(tmp_path / "strict"), "--strict"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("qwen-jax convert: error: model.layers.1.mlp.up_proj.weight holds NaN or infinite")
    assert not (tmp_path / "strict").exists() and not glob.glob(str(tmp_path / ".strict*"))


# --------------------------------------------------------------------------- loading
def test_orbax_logits_equal_hf_directory_logits(hf_checkpoint, tmp_path):
    torch_model, src = hf_checkpoint(seed=3, tie_word_embeddings=False)
    hf_to_orbax(src, tmp_path / "orbax", progress=False)
    assert is_orbax_checkpoint(tmp_path / "orbax") and not is_orbax_checkpoint(src)
    from_orbax = np.asarray(load_model(tmp_path / "orbax", dtype="float32")(IDS))
    from_hf = np.asarray(load_model(src, dtype="float32")(IDS))
    np.testing.assert_array_equal(from_orbax, from_hf)
    np.testing.assert_allclose(from_orbax, _torch_logits(torch_model), atol=1e-4, rtol=0)


def test_relative_paths(hf_checkpoint, tmp_path, monkeypatch):
    """Orbax wants absolute paths; users type relative ones."""
    _, src = hf_checkpoint(seed=4)
    monkeypatch.chdir(tmp_path)
    hf_to_orbax(src, "orbax", progress=False)
    orbax_to_hf("orbax", "hf", progress=False)
    np.testing.assert_array_equal(np.asarray(load_model("orbax")(IDS)), np.asarray(load_model("hf")(IDS)))


def test_restore_onto_a_mesh_gives_sharded_parameters_and_the_same_logits(hf_checkpoint, tmp_path):
    _, src = hf_checkpoint(seed=4, dtype="bfloat16")
    hf_to_orbax(src, tmp_path / "orbax", progress=False)
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    assert len(jax.devices()) == 8
    sharded = load_model(tmp_path / "orbax", dtype="float32", mesh=mesh)
    single = load_model(tmp_path / "orbax", dtype="float32")

    state = nnx.state(sharded)
    expected = dict(nnx.to_flat_state(state_shardings(state, mesh)))
    split = 0
    for path, variable in nnx.to_flat_state(state):
        value = variable.get_value()
        assert value.sharding.is_equivalent_to(expected[path].get_value(), value.ndim), path
        split += not value.sharding.is_fully_replicated
    assert split >= 10  # embedding, q/k/v/o, MLP kernels are all split over fsdp and/or tensor
    embedding = sharded.model.embed_tokens.embedding.get_value()
    assert {s.data.shape for s in embedding.addressable_shards} == {(embedding.shape[0] // 2, embedding.shape[1] // 4)}
    np.testing.assert_allclose(np.asarray(sharded(IDS)), np.asarray(single(IDS)), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- memory
_MEMORY_CHILD = textwrap.dedent("""
    import json, sys
    from qwen_jax.convert import hf_to_orbax

    def status_kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS: measure the conversion, not the imports
    baseline = status_kib("VmRSS")
    hf_to_orbax(sys.argv[1], sys.argv[2], progress=False)
    print(json.dumps({"baseline_kib": baseline, "peak_kib": status_kib("VmHWM")}))
""")


def test_conversion_memory_stays_near_one_layer(tmp_path):
    """Peak RSS growth of a conversion is bounded by the largest parameter group, not the checkpoint.

    The random checkpoint is 323 MB of float32 in 24 layers of 12 MB (largest group: the 17 MB
    embedding). Bound: 64 MB of fixed overhead (Orbax/tensorstore thread pools and caches, malloc
    arenas; measured ~40 MB) plus 4x the largest group (the group itself, the source pages it was
    read from, and tensorstore's encode/write buffers, measured ~2x when Orbax writes an array):
    131 MB, 40 % of the checkpoint. A converter that loads the model first grows by >= 323 MB.

    Measured in a fresh process from /proc/self/status (VmHWM after resetting it post-import).
    `getrusage(...).ru_maxrss` cannot be used: Linux carries the parent's high-water mark across
    fork+exec, so the child would report pytest's own RSS.
    """
    config = Qwen2Config(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=24,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    rng = np.random.default_rng(0)
    tensors = [
        (name, rng.standard_normal(spec.hf_shape, dtype=np.float32))
        for spec in param_specs(config)
        for name in spec.hf_names(config.num_hidden_layers)
    ]
    src = tmp_path / "src"
    src.mkdir()
    write_safetensors(src / "model.safetensors", tensors)
    (src / "config.json").write_text(json.dumps(config.to_hf()))
    size = sum(array.nbytes for _, array in tensors)
    del tensors
    largest_group = max(sum(4 * int(np.prod(spec.hf_shape)) for spec in group.specs) for group in param_groups(config))
    bound = 64 * 2**20 + 4 * largest_group
    assert size > 300e6 and bound < 0.45 * size

    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(src), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    growth = (report["peak_kib"] - report["baseline_kib"]) * 1024
    print(
        f"conversion RSS: baseline {report['baseline_kib'] / 1024:.0f} MiB, growth {growth / 1e6:.0f} MB "
        f"(bound {bound / 1e6:.0f} MB), checkpoint {size / 1e6:.0f} MB"
    )
    assert growth < bound, f"conversion grew RSS by {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB checkpoint"
    assert read_manifest(tmp_path / "out")["parameters"] * 4 == size


# --------------------------------------------------------------------------- bad input
def _run_cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli_main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_clean_failure(code: int, err: str, fragment: str, out) -> None:
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert fragment in err, err
    assert not os.path.exists(out)
    parent, name = os.path.split(os.fspath(out))
    assert not glob.glob(os.path.join(parent, f".{name}.*")), "a partial output was left behind"


def _remove_safetensors(src):
    os.remove(os.path.join(src, "model.safetensors"))


def _corrupt_header(src):
    with open(os.path.join(src, "model.safetensors"), "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage\xff")


def _truncate(src):
    path = os.path.join(src, "model.safetensors")
    os.truncate(path, os.path.getsize(path) // 2)


def _remove_config(src):
    os.remove(os.path.join(src, "config.json"))


def _drop_tensor(src):
    path = os.path.join(src, "model.safetensors")
    st = SafetensorsFile(path)
    tensors = {name: np.array(st.get(name)) for name in st.keys() if name != "model.layers.1.mlp.up_proj.weight"}
    del st
    write_safetensors(path, tensors)


def _edit_config(**changes):
    def edit(src):
        path = os.path.join(src, "config.json")
        with open(path) as f:
            data = json.load(f)
        data.update(changes)
        with open(path, "w") as f:
            json.dump(data, f)

    return edit


BAD_SOURCES = {
    "missing-safetensors": (_remove_safetensors, "no model.safetensors"),
    "corrupted-header": (_corrupt_header, "corrupted safetensors header"),
    "truncated": (_truncate, "truncated"),
    "missing-config": (_remove_config, "config.json not found"),
    "missing-tensor": (_drop_tensor, "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
    "wrong-shape": (_edit_config(intermediate_size=96), "config expects [96, 64]"),
    "unsupported-architecture": (
        _edit_config(model_type="llama", architectures=["LlamaForCausalLM"]),
        "unsupported architecture",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source_exits_2_without_output(hf_checkpoint, tmp_path, capsys, case):
    damage, fragment = BAD_SOURCES[case]
    _, src = hf_checkpoint(seed=5)
    damage(src)
    out = tmp_path / "out"
    _assert_clean_failure(*_run_cli(["convert", src, str(out)], capsys), fragment, out)


def test_missing_source_exits_2(tmp_path, capsys):
    out = tmp_path / "out"
    _assert_clean_failure(*_run_cli(["convert", str(tmp_path / "nowhere"), str(out)], capsys), "not found", out)


def test_unavailable_hub_id_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never touch the network: the id must fail as unavailable
    monkeypatch.chdir(tmp_path)  # so "no-such-org/no-such-model" is not a local directory either
    out = tmp_path / "out"
    code, err = _run_cli(["convert", "no-such-org/no-such-model", str(out)], capsys)
    _assert_clean_failure(code, err, "no-such-org/no-such-model: not a local directory, and not downloadable", out)


def test_existing_output_is_refused_without_force_and_replaced_with_it(hf_checkpoint, tmp_path, capsys):
    _, src = hf_checkpoint(seed=6)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    code, err = _run_cli(["convert", src, str(out)], capsys)
    assert code == 2 and "already exists" in err and len(err.splitlines()) == 1
    assert (out / "keep.txt").read_text() == "previous"
    assert _run_cli(["convert", src, str(out), "--force"], capsys)[0] == 0
    assert is_orbax_checkpoint(out) and not (out / "keep.txt").exists()
    assert not glob.glob(str(tmp_path / ".out.*"))


@contextlib.contextmanager
def _file_size_limit(limit_bytes: int = 16 * 1024):
    """Make file writes past `limit_bytes` fail with EFBIG, as a full disk would (this process only)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # report the failure instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("command", ["convert", "export-hf"])
def test_disk_write_failure_exits_2_and_keeps_the_previous_output(hf_checkpoint, tmp_path, capsys, command):
    _, src = hf_checkpoint(seed=7)
    if command == "export-hf":
        hf_to_orbax(src, tmp_path / "orbax", progress=False)
        src = str(tmp_path / "orbax")
    out = tmp_path / "out"
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "keep.txt").write_text("previous")

    with _file_size_limit():
        fresh = _run_cli([command, src, str(out)], capsys)
        forced = _run_cli([command, src, str(previous), "--force"], capsys)
    _assert_clean_failure(*fresh, "cannot write the output (File too large)", out)
    assert forced[0] == 2 and "File too large" in forced[1]
    assert (previous / "keep.txt").read_text() == "previous"
    assert not glob.glob(str(tmp_path / ".previous.*"))


def test_export_rejects_what_is_not_a_converted_checkpoint(hf_checkpoint, tmp_path, capsys):
    _, src = hf_checkpoint(seed=8)
    out = tmp_path / "out"
    _assert_clean_failure(*_run_cli(["export-hf", src, str(out)], capsys), "not a qwen-jax Orbax checkpoint", out)
    _assert_clean_failure(*_run_cli(["export-hf", str(tmp_path / "nowhere"), str(out)], capsys), "not found", out)

    hf_to_orbax(src, tmp_path / "orbax", progress=False)
    code, err = _run_cli(["export-hf", str(tmp_path / "orbax"), str(out), "--max-shard-size", "lots"], capsys)
    _assert_clean_failure(code, err, "bad size 'lots'", out)
    shutil.rmtree(tmp_path / "orbax" / "params" / "model.layers.2")
    code, err = _run_cli(["export-hf", str(tmp_path / "orbax"), str(out)], capsys)
    _assert_clean_failure(code, err, "missing parameter group params/model.layers.2", out)


def test_missing_group_is_reported_when_loading(hf_checkpoint, tmp_path):
    _, src = hf_checkpoint(seed=9)
    hf_to_orbax(src, tmp_path / "orbax", progress=False)
    shutil.rmtree(tmp_path / "orbax" / "params" / "model.norm")
    with pytest.raises(CheckpointError, match="missing parameter group params/model.norm"):
        load_model(tmp_path / "orbax")
