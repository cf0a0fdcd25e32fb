"""The XLA:CPU specialisations (`qwen_jax.ops.cpu`): one switch, decided by the platform of the
mesh's devices; turned off, every model path computes the same logits and greedy tokens."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.config import Qwen2Config
from qwen_jax.errors import UsageError
from qwen_jax.generation.static import generate_ids
from qwen_jax.load import load_model
from qwen_jax.model.causal_lm import Qwen2ForCausalLM, decoder_linears
from qwen_jax.ops import cpu
from qwen_jax.sharding import make_mesh

# hidden 128 and intermediate 256 take the default int4 groups of 128.
SMALL = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
PROMPTS = [[5, 9, 100, 7], [3, 17, 250, 9, 42], [8, 8, 1]]


def _fake_mesh(platform: str):
    """Stands in for a mesh of `platform` devices (only `.devices` is read)."""
    return types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform=platform)]))


def test_switch_follows_the_mesh_platform_and_the_environment(monkeypatch):
    monkeypatch.delenv(cpu.ENV_VAR, raising=False)
    mesh = make_mesh(fsdp=4, tensor=2)
    assert cpu.enabled() and cpu.applies(mesh) and cpu.applies()  # the test devices are CPUs
    for platform in ("cuda", "rocm", "tpu"):  # decided by the mesh's devices, not the default backend
        assert not cpu.applies(_fake_mesh(platform))
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    assert not Qwen2ForCausalLM(config, mesh=_fake_mesh("cuda")).cpu_kernels
    assert Qwen2ForCausalLM(config, mesh=mesh).cpu_kernels and Qwen2ForCausalLM(config).cpu_kernels
    for value in ("0", "off", "False", " no "):
        monkeypatch.setenv(cpu.ENV_VAR, value)
        assert not cpu.enabled() and not cpu.applies(mesh)
        assert not Qwen2ForCausalLM(config, mesh=mesh).cpu_kernels
    for value in ("1", "on", "true", "yes", ""):
        monkeypatch.setenv(cpu.ENV_VAR, value)
        assert cpu.applies(mesh)
    monkeypatch.setenv(cpu.ENV_VAR, "sometimes")
    with pytest.raises(UsageError, match="QWEN_JAX_CPU_KERNELS"):
        cpu.enabled()


def _forward_program(model, rows: int) -> str:
    ids = jnp.ones((rows, 1), jnp.int32)
    positions = jnp.zeros((rows, 1), jnp.int32)
    return str(jax.make_jaxpr(lambda ids, positions: model.forward(ids, positions, None))(ids, positions))


def test_model_on_a_cpu_mesh_takes_the_cpu_path(hf_checkpoint, monkeypatch):
    """On a CPU mesh the model's projections and head use the CPU formulations (out-major kernels
    multiplied kernel-first for 2-64 rows, behind an optimization barrier); with the switch off the
    same model has none of them."""
    monkeypatch.delenv(cpu.ENV_VAR, raising=False)
    _, path = hf_checkpoint(**SMALL)
    mesh = make_mesh(fsdp=4, tensor=2)
    on = load_model(path, mesh=mesh, scan_layers=False, progress=False)
    assert on.cpu_kernels and all(linear.cpu_kernels and linear.out_major for _, linear in decoder_linears(on))
    assert "optimization_barrier" in _forward_program(on, rows=2)
    monkeypatch.setenv(cpu.ENV_VAR, "0")
    off = load_model(path, mesh=mesh, scan_layers=False, progress=False)
    assert not off.cpu_kernels
    assert not any(linear.cpu_kernels or linear.out_major for _, linear in decoder_linears(off))
    assert "optimization_barrier" not in _forward_program(off, rows=2)
    ids = np.random.RandomState(0).randint(0, 256, (8, 6)).astype(np.int32)
    np.testing.assert_allclose(np.asarray(off(ids)), np.asarray(on(ids)), atol=1e-5)


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_switch_off_gives_the_same_logits_and_greedy_tokens(hf_checkpoint, monkeypatch, quantize):
    """Every regime the CPU kernels change: out-major products of 1, 2-64 and more rows, the
    quantized row reduction (up to 16 rows), decode attention by sums (several rows of one token),
    the logits product; and batched greedy generation through all of them."""
    monkeypatch.delenv(cpu.ENV_VAR, raising=False)
    _, path = hf_checkpoint(seed=2, tie_word_embeddings=False, **SMALL)
    on = load_model(path, scan_layers=False, quantize=quantize, progress=False)
    monkeypatch.setenv(cpu.ENV_VAR, "0")
    off = load_model(path, scan_layers=False, quantize=quantize, progress=False)
    assert on.cpu_kernels and not off.cpu_kernels
    assert _forward_program(on, rows=1) != _forward_program(off, rows=1)  # the switch changes the program
    rng = np.random.RandomState(1)
    for rows, length in ((1, 1), (2, 1), (3, 1), (17, 1), (65, 1), (2, 9)):
        ids = rng.randint(0, 256, (rows, length)).astype(np.int32)
        np.testing.assert_allclose(np.asarray(off(ids)), np.asarray(on(ids)), atol=1e-5, err_msg=f"{rows}x{length}")
    tokens_on = generate_ids(on, PROMPTS, max_new_tokens=12, temperature=0, stop_token_ids=()).token_ids
    tokens_off = generate_ids(off, PROMPTS, max_new_tokens=12, temperature=0, stop_token_ids=()).token_ids
    assert tokens_on == tokens_off
