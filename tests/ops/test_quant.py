"""Weight-only int8/int4 quantization: kernels, the quantized Linear, loading, convert, generate, QLoRA.

The oracle for a quantized model is the float model (ours and HF transformers') built from the
same dequantized weights: the two must agree to float32 rounding. Against the original float
model, quantization error is bounded by the thresholds stated (and justified) below.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import build_hf_model, save_hf_checkpoint
from flax import nnx

from qwen_jax import Qwen2Config
from qwen_jax.cli import main as cli_main
from qwen_jax.errors import QuantizationError
from qwen_jax.generation.static import generate_ids
from qwen_jax.load import load_model
from qwen_jax.memory import measured_bytes_per_device, plan_memory
from qwen_jax.model.causal_lm import decoder_linears
from qwen_jax.model.linear import QuantizedKernel, QuantizedParam, QuantizedValues
from qwen_jax.model.quantize import dequantize_model, model_quantization, quantize_model
from qwen_jax.ops.quant import QuantScheme, dequantize_dot, dequantize_matrix, matmul, pack, quantize_matrix, unpack
from qwen_jax.sharding import make_mesh

IDS = np.array([[3, 17, 250, 9, 42, 42, 0, 128, 77, 5, 64, 200]], dtype=np.int32)
# hidden 128 and intermediate 256 take the default int4 groups of 128 (two and one per row).
SMALL = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
SCHEMES = ["int8", "int4", "int8-g64"]


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """(torch model, HF checkpoint dir with a word-level tokenizer) of an untied model sized for int4 groups of 128."""
    from train_fixtures import _write_word_tokenizer

    torch_model = build_hf_model(seed=3, tie_word_embeddings=False, **SMALL)
    directory = tmp_path_factory.mktemp("small")
    _write_word_tokenizer(directory)
    return torch_model, save_hf_checkpoint(torch_model, directory)


def _torch_logits(model, ids=IDS, dtype=np.float32) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids)).long()).logits.double().numpy().astype(dtype)


def _dequantized_float_model(path, spec, **kwargs):
    """A float model of ours whose kernels are the dequantized weights of `path` quantized with `spec`."""
    return dequantize_model(load_model(path, quantize=spec, progress=False, **kwargs), jnp.float32)


# --------------------------------------------------------------------------- schemes and arrays
def test_scheme_names_and_errors():
    assert QuantScheme.parse("int8") == QuantScheme(8, None)
    assert QuantScheme.parse("int4") == QuantScheme(4, 128)
    assert QuantScheme.parse("INT4-g32") == QuantScheme(4, 32)
    assert [QuantScheme.parse(n).name for n in ("int8", "int4", "int4-g32", "int8-g128")] == [
        "int8",
        "int4",
        "int4-g32",
        "int8-g128",
    ]
    assert QuantScheme.from_json(QuantScheme(4, 64, True).to_json()) == QuantScheme(4, 64, True)
    for bad in ("int3", "fp8", "int4-g0"):
        with pytest.raises(QuantizationError):
            QuantScheme.parse(bad)
    with pytest.raises(QuantizationError, match="not a multiple of the quantization group size 128"):
        QuantScheme.parse("int4").groups(64)


@pytest.mark.parametrize("spec", ["int8", "int4", "int4-g32"])
def test_quantize_dequantize_round_trip(spec):
    """Scales are absmax/qmax per channel or group (computed here independently); every weight is
    within half a step of its dequantized value; values use the symmetric range."""
    scheme = QuantScheme.parse(spec)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 256)).astype(np.float32)
    w[3] = 0.0  # an all-zero channel must not divide by zero
    values, scale = quantize_matrix(w, scheme)
    values, scale = np.asarray(values), np.asarray(scale)
    group = scheme.group_size or 256
    expected_scale = np.abs(w.reshape(48, -1, group)).max(-1) / scheme.qmax
    np.testing.assert_allclose(scale, expected_scale, rtol=1e-6)
    assert values.dtype == np.int8 and values.shape == w.shape
    assert np.abs(values.astype(np.int32)).max() <= scheme.qmax
    # Stored form: int4 two per byte; packing round-trips on the host and on the device alike.
    stored = pack(values, scheme)
    assert stored.shape == (48, 256 // group, group // (2 if scheme.bits == 4 else 1))
    np.testing.assert_array_equal(unpack(stored, scheme), values)
    np.testing.assert_array_equal(np.asarray(unpack(jnp.asarray(stored), scheme)), values)
    restored = np.asarray(dequantize_matrix(values, scale, None, scheme))
    step = np.repeat(expected_scale, group, axis=1)
    assert np.all(np.abs(restored - w) <= step / 2 + 1e-6)
    assert np.all(restored[3] == 0)


@pytest.mark.parametrize("rows", [1, 3, 17])  # one row and a few take the CPU reduction, 17 the matmul
@pytest.mark.parametrize(
    "spec,zero_point", [("int8", False), ("int4", False), ("int4-g32", True), ("int8-g64", True), ("int8", True)]
)
def test_quantized_matmul_equals_float_on_dequantized_weights(rows, spec, zero_point):
    scheme = QuantScheme.parse(spec)
    scheme = QuantScheme(scheme.bits, scheme.group_size, zero_point)
    rng = np.random.default_rng(rows)
    out, inputs = 40, 256
    groups = scheme.groups(inputs)
    values = rng.integers(scheme.qmin, scheme.qmax + 1, (out, inputs)).astype(np.int8)
    scale = rng.uniform(0.001, 0.01, (out, groups)).astype(np.float32)
    zero = rng.integers(-3, 4, (out, groups)).astype(np.float32) if zero_point else None
    x = rng.standard_normal((rows, inputs)).astype(np.float32)
    reference = x @ np.asarray(dequantize_matrix(values, scale, zero, scheme)).T
    stored = pack(values, scheme)
    got = jax.jit(matmul, static_argnums=(4, 5))(x, stored, scale, zero, scheme, jnp.float32)
    np.testing.assert_allclose(np.asarray(got), reference, atol=1e-5, rtol=1e-5)
    # The GPU/TPU formulation (dequantize, then one matmul) agrees too.
    other = dequantize_dot(x, stored, scale, zero, scheme=scheme, dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(other), reference, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- the quantized model
@pytest.mark.parametrize("spec", SCHEMES)
def test_quantized_model_equals_float_model_of_dequantized_weights(small_checkpoint, spec):
    _, path = small_checkpoint
    model = load_model(path, quantize=spec, progress=False)
    assert model_quantization(model) == QuantScheme.parse(spec)
    kernel = model.model.layers.self_attn.o_proj.kernel
    assert isinstance(kernel, QuantizedKernel) and kernel.scheme == QuantScheme.parse(spec)
    assert isinstance(kernel.scale, QuantizedParam) and kernel.zero is None
    values = kernel.values
    assert isinstance(values, QuantizedValues) and values.get_value().dtype == jnp.int8
    # o_proj [layers, embed (out), groups, group']: the input's axis name (q_heads) goes to the
    # group axis, or with one group (per channel, or int4 over o_proj's 128 inputs) to the input axis.
    one_group = QuantScheme.parse(spec).groups(128) == 1
    expected_axes = (None, "q_heads") if one_group else ("q_heads", None)
    assert values.get_metadata()["logical_axes"] == ("layers", "embed", *expected_axes)
    assert kernel.scale.get_metadata()["logical_axes"] == ("layers", "embed", expected_axes[0])
    reference = _dequantized_float_model(path, spec)
    assert model_quantization(reference) is None
    np.testing.assert_allclose(np.asarray(model(IDS)), np.asarray(reference(IDS)), atol=1e-5)
    if spec in ("int8", "int4"):  # decode-sized calls (1 and 2 rows) take the CPU reduction, unpacked and packed
        np.testing.assert_allclose(np.asarray(model(IDS[:, :1])), np.asarray(reference(IDS[:, :1])), atol=1e-5)
        two = np.concatenate([IDS[:, :1], IDS[:, 1:2]])
        np.testing.assert_allclose(np.asarray(model(two)), np.asarray(reference(two)), atol=1e-5)


def test_quantized_logits_stay_close_to_float(small_checkpoint):
    """Quantization error against the original float model, with thresholds from the step sizes.

    int8 per channel: each weight moves by at most 1/254 of its channel's absmax, a relative
    output error of ~0.3 % (random signs average out); we allow 2 % relative logit error. int4 in
    groups of 128: steps of absmax/7 (~20x int8's), so ~6 % is typical; we allow 20 %. Greedy
    tokens over 16 steps: int8 must equal float; int4 must agree on the first token and on at
    least half (random tiny models have nearly flat logits, so one early flip changes the rest).
    """
    torch_model, path = small_checkpoint
    reference = _torch_logits(torch_model)
    prompt = [[5, 9, 100, 7]]
    float_tokens = generate_ids(load_model(path, progress=False), prompt, max_new_tokens=16, temperature=0).token_ids[0]
    for spec, limit in (("int8", 0.02), ("int4", 0.20)):
        model = load_model(path, quantize=spec, progress=False)
        error = np.linalg.norm(np.asarray(model(IDS)) - reference) / np.linalg.norm(reference)
        assert error < limit, (spec, error)
        tokens = generate_ids(model, prompt, max_new_tokens=16, temperature=0).token_ids[0]
        if spec == "int8":
            assert tokens == float_tokens
        else:
            assert tokens[0] == float_tokens[0] and np.mean(np.equal(tokens, float_tokens)) >= 0.5


def test_quantized_greedy_generation_equals_dequantized_float(small_checkpoint):
    """The KV-cache decode loop (1-row CPU reduction) gives the tokens of the dequantized float model."""
    _, path = small_checkpoint
    model = load_model(path, quantize="int4", scan_layers=False, progress=False)
    reference = _dequantized_float_model(path, "int4", scan_layers=False)
    prompt = [[5, 6, 7, 8, 9]]
    got = generate_ids(model, prompt, max_new_tokens=12, temperature=0).token_ids
    assert got == generate_ids(reference, prompt, max_new_tokens=12, temperature=0).token_ids


def test_quantized_model_sharded_equals_unsharded(small_checkpoint):
    _, path = small_checkpoint
    single = np.asarray(load_model(path, quantize="int4", progress=False)(IDS))
    P = jax.sharding.PartitionSpec
    for mesh, spec in (
        (make_mesh(data=4, tensor=2), P(None, None, "tensor")),
        (make_mesh(data=1, fsdp=4, tensor=2), P(None, "fsdp", "tensor")),
    ):
        model = load_model(path, quantize="int4", mesh=mesh, progress=False)
        # down_proj [layers, embed, 2 groups (mlp), 64 bytes]: split by embed and mlp like the float kernel
        values = model.model.layers.mlp.down_proj.kernel.values.get_value()
        assert values.sharding.spec == spec
        np.testing.assert_allclose(np.asarray(model(IDS)), single, atol=1e-5)


def test_quantize_model_in_memory_equals_quantize_on_loading(small_checkpoint):
    _, path = small_checkpoint
    loaded = load_model(path, quantize="int8", progress=False)
    converted = quantize_model(load_model(path, progress=False), "int8")
    for (path_a, a), (path_b, b) in zip(nnx.to_flat_state(nnx.state(loaded)), nnx.to_flat_state(nnx.state(converted))):
        assert path_a == path_b
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))


def test_memory_planner_counts_quantized_bytes(small_checkpoint):
    _, path = small_checkpoint
    config = Qwen2Config.from_hf(path)
    for spec in ("int8", "int4"):
        mesh_kw = dict(data=1, fsdp=2, tensor=4)
        model = load_model(path, quantize=spec, mesh=make_mesh(**mesh_kw), progress=False)
        measured = max(measured_bytes_per_device(nnx.state(model)).values())
        assert plan_memory(config, param_dtype=jnp.float32, quantize=spec, **mesh_kw).params == measured
    # 72B on a TPU v5e-8 (16 GiB per chip): bfloat16 weights alone need 16.9 GiB per chip, int8 8.8 GiB.
    big = Qwen2Config.preset("72B")
    gib = 1024**3
    assert plan_memory(big, tensor=8).params > 16 * gib
    int8 = plan_memory(big, tensor=8, quantize="int8", batch=4, max_len=8192)
    assert int8.params < 9 * gib and int8.total < 16 * gib


# --------------------------------------------------------------------------- convert, CLI, QLoRA
def test_convert_quantized_loads_exports_and_reports(small_checkpoint, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    _, path = small_checkpoint
    out = tmp_path / "int4"
    assert cli_main(["convert", path, str(out), "--quantize", "int4"]) == 0
    assert "int4 kernels, float32" in capsys.readouterr().out
    manifest = json.loads((out / "qwen_jax_manifest.json").read_text())
    assert manifest["quantization"] == {"bits": 4, "group_size": 128, "zero_point": False}
    assert manifest["format_version"] == 2
    direct = load_model(path, quantize="int4", progress=False)
    restored = load_model(out, progress=False)
    assert model_quantization(restored) == QuantScheme(4, 128)
    np.testing.assert_array_equal(np.asarray(restored(IDS)), np.asarray(direct(IDS)))
    # Bytes: the int4 kernels take half a byte per weight plus a float32 scale per 128 inputs.
    assert cli_main(["info", str(out), "--json"]) == 0
    stored = json.loads(capsys.readouterr().out)["stored"]
    weights = load_model(path, progress=False).num_params()
    kernel_weights = 2 * sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(direct, QuantizedValues)))
    assert stored["quantization"] == "int4" and stored["parameters"] == weights
    assert stored["bytes"] == kernel_weights // 2 + kernel_weights // 128 * 4 + (weights - kernel_weights) * 4
    # export-hf writes dequantized float weights that transformers loads and agrees with.
    assert cli_main(["export-hf", str(out), str(tmp_path / "hf")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    np.testing.assert_allclose(_torch_logits(exported), np.asarray(restored(IDS)), atol=1e-4)


def test_float_orbax_quantizes_on_loading_and_bad_scheme_is_a_clean_error(small_checkpoint, tmp_path, capsys):
    _, path = small_checkpoint
    assert cli_main(["convert", path, str(tmp_path / "float")]) == 0
    got = load_model(tmp_path / "float", quantize="int8", progress=False)
    np.testing.assert_array_equal(
        np.asarray(got(IDS)), np.asarray(load_model(path, quantize="int8", progress=False)(IDS))
    )
    assert cli_main(["convert", path, str(tmp_path / "bad"), "--quantize", "int5"]) == 2
    assert "unknown quantization 'int5'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_qlora_trains_adapters_on_a_quantized_base(small_checkpoint, tmp_path):
    from train_fixtures import TRAIN_LINES
    from transformers import AutoModelForCausalLM

    from qwen_jax.errors import ConfigError
    from qwen_jax.train.config import TrainConfig
    from qwen_jax.train.loop import Trainer

    _, path = small_checkpoint
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in TRAIN_LINES))
    settings = dict(
        model=path,
        data=str(data),
        seq_len=32,
        batch_size=2,
        steps=3,
        learning_rate=5e-2,
        save_every=0,
        mesh="fsdp=2",
        progress=False,
    )
    with pytest.raises(ConfigError, match="quantize needs LoRA"):
        TrainConfig(out=str(tmp_path / "full"), quantize="int8", **settings)
    out = tmp_path / "qlora"
    trainer = Trainer(
        TrainConfig(out=str(out), quantize="int4", lora_rank=4, export_hf=str(tmp_path / "hf"), **settings)
    )
    assert model_quantization(trainer.model) == QuantScheme(4, 128)
    frozen_before = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(trainer.frozen))]
    assert trainer.run() == 0
    for before, after in zip(frozen_before, jax.tree.leaves(jax.device_get(trainer.frozen))):
        np.testing.assert_array_equal(before, np.asarray(after))  # the quantized base never changes
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    # The merged output is a float model: the dequantized base plus the adapters.
    merged = trainer.current_model()
    from qwen_jax.model.lora import merge_lora

    merge_lora(merged)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    # The oracle is the exported weights run in float64. Three steps at this learning rate leave a
    # model that amplifies float32 rounding (torch's own float32 logits differ from its float64
    # ones by ~4e-5 here), so ours must be as close to the float64 logits as a float32 run can be:
    # within 4x torch's float32 error (other products sum in other orders), or 1e-4 if that is larger.
    torch_float32 = _torch_logits(exported)
    reference = _torch_logits(exported.to(torch.float64), dtype=np.float64)
    float32_error = np.max(np.abs(torch_float32 - reference))
    np.testing.assert_allclose(np.asarray(merged(IDS)), reference, rtol=0, atol=max(1e-4, 4 * float32_error))


def test_real_size_int4_mlp_matrices_of_the_0_5b_configuration():
    """0.5B's MLP (896 -> 4864 -> 896): 7 and 38 groups of 128 per row, packed, through both CPU
    paths (8 rows: reduction; 64 rows: dequantize + matmul), against float on the dequantized weights."""
    from qwen_jax.checkpoints.params import param_specs

    config = Qwen2Config.preset("0.5B")
    specs = {spec.stored_path[-2:]: spec for spec in param_specs(config, QuantScheme.parse("int4"))}
    assert specs[("gate_proj", "kernel")].shape == (4864, 7, 64)
    assert specs[("down_proj", "kernel")].shape == (896, 38, 64)
    assert specs[("o_proj", "kernel_scale")].shape == (896, 7)  # 14 heads x 64 = 896 inputs
    rng = np.random.default_rng(0)
    scheme = QuantScheme.parse("int4")
    for out, inputs in ((4864, 896), (896, 4864)):
        w = rng.standard_normal((out, inputs)).astype(np.float32) * 0.02
        values, scale = quantize_matrix(w, scheme)
        dequantized = np.asarray(dequantize_matrix(values, scale, None, scheme))
        assert np.abs(dequantized - w).max() <= np.asarray(scale).max() / 2 + 1e-7
        stored = pack(values, scheme)
        for rows in (8, 64):
            x = rng.standard_normal((rows, inputs)).astype(np.float32)
            got = jax.jit(matmul, static_argnums=(4, 5))(x, stored, scale, None, scheme, jnp.float32)
            np.testing.assert_allclose(np.asarray(got), x @ dequantized.T, atol=2e-5, rtol=1e-4)


def test_decode_loop_keeps_kernels_quantized(small_checkpoint):
    """XLA hoists loop-invariant work out of the decode loop; unless the kernel is tied to the
    step's input (`quant.matmul`), that included converting every kernel to float once: a float
    copy of the weights alive for the whole generation (measured: 114 MiB for two 0.5B layers)."""
    from qwen_jax.compilation import EXECUTABLES

    _, path = small_checkpoint
    model = load_model(path, quantize="int8", scan_layers=False, progress=False)
    EXECUTABLES.clear()
    generate_ids(model, [[5, 6, 7]], max_new_tokens=3, temperature=0)
    loops = EXECUTABLES.executables("generation.decode_loop")
    assert loops, "the decode loop executable was not found"
    float_kernels = sum(
        4 * math.prod(linear.layout.values_shape(QuantScheme(8))) for _, linear in decoder_linears(model)
    )
    temp = loops[0].memory_analysis().temp_size_in_bytes
    assert temp < float_kernels / 4, (temp, float_kernels)
