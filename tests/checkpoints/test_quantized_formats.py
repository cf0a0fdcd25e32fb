"""Importing quantized checkpoints: GPTQ and AWQ safetensors, GGUF files; their errors; 72B padding.

Test checkpoints are written in the published layouts by `quant_fixtures` (packers written from
the format descriptions, independently of qwen_jax's unpacking). The oracle for GPTQ/AWQ is HF
transformers running the dequantized float weights; for GGUF it is transformers' own GGUF loading
(`from_pretrained(..., gguf_file=...)`) of the same file.
"""

import dataclasses
import json
import os
import shutil
import struct

import jax
import numpy as np
import pytest
import torch
from conftest import build_hf_model
from quant_fixtures import (
    CHAT_TEMPLATE,
    awq_quantize_pack,
    gptq_pack,
    gptq_quantize,
    write_quantized_checkpoint,
    write_tiny_gguf,
)

from qwen_jax import Qwen2Config
from qwen_jax.checkpoints.gptq_awq import PrequantizedConfig, unpack_awq, unpack_gptq
from qwen_jax.checkpoints.params import param_specs
from qwen_jax.checkpoints.safetensors import SafetensorsFile, write_safetensors
from qwen_jax.cli import main as cli_main
from qwen_jax.errors import CheckpointError
from qwen_jax.load import load, load_model
from qwen_jax.model.quantize import model_quantization
from qwen_jax.ops.quant import QuantizedMatrix, QuantScheme
from qwen_jax.sharding import logical_to_spec

IDS = np.array([[3, 17, 250, 9, 42, 42, 0, 128, 77, 5, 64, 200]], dtype=np.int32)


def _torch_logits(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids)).long()).logits.float().numpy()


# --------------------------------------------------------------------------- unpacking
@pytest.mark.parametrize(
    "bits,group,sym,act_order,v1",
    [
        (4, 32, True, False, True),
        (8, 32, True, False, True),
        (4, 32, False, False, True),
        (4, 32, True, True, True),
        (8, -1, False, False, False),
        (4, 64, False, True, False),
    ],
)
def test_gptq_unpacking_matches_the_reference_dequantization(bits, group, sym, act_order, v1):
    rng = np.random.default_rng(bits + group)
    w = rng.standard_normal((48, 128)).astype(np.float32)
    reference = gptq_quantize(w, bits, group, sym, act_order, rng)
    packed = gptq_pack(reference, bits, v1=v1)
    config = PrequantizedConfig(
        "gptq", bits, None if group == -1 else group, act_order, sym, "gptq" if v1 else "gptq_v2"
    )
    got = unpack_gptq(**packed, in_features=128, out_features=48, config=config)
    if act_order:  # groups are not runs of inputs: dequantized
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, reference["dequantized"])
    else:  # mapped to our layout without dequantizing
        assert isinstance(got, QuantizedMatrix) and got.scheme == QuantScheme(bits, config.group_size, not sym)
        np.testing.assert_allclose(got.dequantize(), reference["dequantized"], rtol=1e-6, atol=1e-7)


def test_awq_unpacking_matches_the_reference_dequantization():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    packed, dequantized = awq_quantize_pack(w, 32)
    config = PrequantizedConfig("awq", 4, 32, sym=False, checkpoint_format="gemm")
    got = unpack_awq(**packed, in_features=128, out_features=64, config=config)
    np.testing.assert_allclose(got.dequantize(), dequantized, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- checkpoints
CASES = {
    "gptq4-sym": dict(method="gptq", bits=4),
    "gptq8-sym": dict(method="gptq", bits=8),
    "gptq4-asym": dict(method="gptq", bits=4, sym=False),
    "gptq4-act-order": dict(method="gptq", bits=4, desc_act=True),
    "gptq4-v2-asym": dict(method="gptq", bits=4, sym=False, checkpoint_format="gptq_v2"),
    "awq": dict(method="awq"),
    "gptq4-padded-mlp": dict(method="gptq", bits=4, pad_intermediate_to=160),
}
NATIVE = {
    "gptq4-sym": QuantScheme(4, 32),
    "gptq8-sym": QuantScheme(8, 32),
    "gptq4-asym": QuantScheme(4, 32, True),
    "gptq4-act-order": None,
    "gptq4-v2-asym": QuantScheme(4, 32, True),
    "awq": QuantScheme(4, 32, True),
    "gptq4-padded-mlp": QuantScheme(4, 32),
}


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_checkpoint_logits_equal_float_model_of_dequantized_weights(case, tmp_path):
    torch_model = build_hf_model(seed=len(case), hidden_size=64, intermediate_size=128)
    path = write_quantized_checkpoint(torch_model, tmp_path / case, **CASES[case])
    model = load_model(path, progress=False)
    assert model_quantization(model) == NATIVE[case]  # act-order loads dequantized
    if case == "gptq4-padded-mlp":  # the repo's own (padded) config is read; the padding is inert
        assert model.config.intermediate_size == 160 and torch_model.config.intermediate_size == 128
    np.testing.assert_allclose(np.asarray(model(IDS)), _torch_logits(torch_model), atol=1e-4)


def test_quantized_checkpoint_through_convert_and_requantize(tmp_path, capsys):
    torch_model = build_hf_model(seed=1, hidden_size=64, intermediate_size=128)
    path = write_quantized_checkpoint(torch_model, tmp_path / "awq", method="awq")
    assert cli_main(["info", path]) == 0
    assert "quantization: awq 4-bit, group size 32, zero points" in capsys.readouterr().out
    out = tmp_path / "orbax"
    assert cli_main(["convert", path, str(out)]) == 0  # keeps AWQ's own int4 with zero points
    manifest = json.loads((out / "qwen_jax_manifest.json").read_text())
    assert manifest["quantization"] == {"bits": 4, "group_size": 32, "zero_point": True}
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    converted = load_model(out, progress=False)
    np.testing.assert_allclose(np.asarray(converted(IDS)), _torch_logits(torch_model), atol=1e-4)
    # quantize with other bits: dequantized, then quantized to int8 per output channel
    requantized = load_model(path, quantize="int8", progress=False)
    assert model_quantization(requantized) == QuantScheme(8, None)
    relative = np.linalg.norm(np.asarray(requantized(IDS)) - _torch_logits(torch_model)) / np.linalg.norm(
        _torch_logits(torch_model)
    )
    assert relative < 0.02  # int8 of the dequantized weights: see test_quant's thresholds


def _rewrite(path, name, array):
    """Replace (or with None, drop) one tensor of a single-file safetensors checkpoint."""
    file = os.path.join(path, "model.safetensors")
    st = SafetensorsFile(file)
    tensors = {n: np.array(st.get(n)) for n in st.keys() if n != name}
    if array is not None:
        tensors[name] = array
    os.remove(file)
    write_safetensors(file, sorted(tensors.items()))


def _set_quantization_config(path, **changes):
    config = json.loads(open(os.path.join(path, "config.json")).read())
    config["quantization_config"].update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def test_corrupted_or_unsupported_quantized_checkpoints_fail_with_one_clear_error(tmp_path):
    torch_model = build_hf_model(seed=0, hidden_size=64, intermediate_size=128)
    base = write_quantized_checkpoint(torch_model, tmp_path / "base", method="gptq", bits=4)
    module = "model.layers.1.mlp.down_proj"
    cases = {
        "wrong packing shape": (
            lambda p: _rewrite(p, f"{module}.qweight", np.zeros((8, 64), np.int32)),
            "has shape [8, 64], 4-bit gptq with group size 32 and this config expects [16, 64]",
        ),
        "float packed tensor": (
            lambda p: _rewrite(p, f"{module}.qzeros", np.zeros((4, 8), np.float32)),
            "packed tensors are int32",
        ),
        "unknown bits": (lambda p: _set_quantization_config(p, bits=3), "3-bit gptq is not supported"),
        "unknown method": (
            lambda p: _set_quantization_config(p, quant_method="bitsandbytes"),
            "quant_method 'bitsandbytes' is not supported",
        ),
        "unknown format": (
            lambda p: _set_quantization_config(p, checkpoint_format="marlin"),
            "checkpoint_format 'marlin' is not supported",
        ),
        "awq gemv": (
            lambda p: _set_quantization_config(p, quant_method="awq", version="gemv"),
            "AWQ version 'gemv' is not supported",
        ),
        "missing tensor": (lambda p: _rewrite(p, f"{module}.scales", None), f"missing tensor '{module}.scales'"),
        "sym with zeros": (
            lambda p: (
                _set_quantization_config(p, sym=True)
                or _rewrite(p, f"{module}.qzeros", np.full((4, 8), 0x12345678, np.int32))
            ),
            "although quantization_config says sym",
        ),
    }
    for name, (corrupt, message) in cases.items():
        path = tmp_path / name.replace(" ", "_")
        shutil.copytree(base, path)
        corrupt(str(path))
        with pytest.raises(CheckpointError) as error:
            load_model(path, progress=False)(IDS)
        assert message in str(error.value), (name, str(error.value))
        assert "\n" not in str(error.value)


def test_72b_padding_arithmetic_without_allocating():
    """Qwen's 72B quantized repos pad intermediate_size 29,568 -> 29,696: with int4 groups of 128
    every tensor-parallel shard (tensor=8) of down_proj then holds whole groups and its scales
    shard with it; unpadded, the 231 groups do not divide 8 and the scales are replicated."""
    P = jax.sharding.PartitionSpec
    mesh = type("Mesh", (), {"shape": {"data": 1, "fsdp": 1, "tensor": 8}})()
    scheme = QuantScheme(4, 128)
    for intermediate, groups, scale_spec in (
        (29_696, 232, P(None, None, "tensor")),
        (29_568, 231, P(None, None, None)),
    ):
        config = dataclasses.replace(Qwen2Config.preset("72B"), intermediate_size=intermediate)
        specs = {s.stored_path: s for s in param_specs(config, scheme)}
        down = specs[("model", "layers", "mlp", "down_proj", "kernel")]
        scale = specs[("model", "layers", "mlp", "down_proj", "kernel_scale")]
        assert down.shape == (8192, groups, 64) and down.hf_shape == (8192, intermediate)
        assert scale.shape == (8192, groups)
        assert logical_to_spec(("layers", "embed", "mlp"), (80, 8192, groups), mesh) == scale_spec
        # GPTQ tensors of this layout: qweight [in * 4 / 32, out], qzeros [groups, out * 4 / 32]
        assert (intermediate * 4 // 32, 8192) == (intermediate // 8, 8192)
    plan = __import__("qwen_jax.memory", fromlist=["plan_memory"]).plan_memory
    padded = plan(dataclasses.replace(Qwen2Config.preset("72B"), intermediate_size=29_696), tensor=8, quantize="int4")
    unpadded = plan(Qwen2Config.preset("72B"), tensor=8, quantize="int4")
    assert padded.params < unpadded.params  # replicated scales cost more than the padding


# --------------------------------------------------------------------------- GGUF
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gguf")
    info = write_tiny_gguf(str(directory / "tiny.gguf"), tied=False)
    return str(directory), info


def test_gguf_config_tokenizer_and_logits_equal_transformers_gguf_loading(tiny_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, info = tiny_gguf
    file = os.path.join(directory, "tiny.gguf")
    assert set(info["types"].values()) >= {"F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"}
    hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file="tiny.gguf")
    model, tokenizer = load(file, progress=False)
    config = model.config
    assert (
        config.vocab_size,
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.tie_word_embeddings,
    ) == (info["vocab"], 256, 512, 2, 4, 2, False)
    texts = ["the quick brown fox", "<|im_start|>user\nthe lazy dog<|im_end|>\n", "  sat on   the mat!! 42 <tool_call>"]
    for text in texts:
        assert tokenizer.encode(text) == hf_tokenizer(text)["input_ids"], text
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True) == hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert model.generation_config.eos_token_ids[0] == info["tokens"].index("<|im_end|>")
    ids = np.asarray([tokenizer.encode(texts[1])], np.int32)
    reference = _torch_logits(hf, ids)
    np.testing.assert_allclose(np.asarray(model(ids)), reference, atol=1e-4 * np.abs(reference).max())


def test_gguf_convert_requantize_and_info(tiny_gguf, tmp_path, capsys):
    directory, _ = tiny_gguf
    file = os.path.join(directory, "tiny.gguf")
    assert cli_main(["info", file]) == 0
    printed = capsys.readouterr().out
    assert "GGUF tensors" in printed and "Q4_K" in printed and "Q6_K" in printed
    out = tmp_path / "int8"
    assert cli_main(["convert", file, str(out), "--quantize", "int8"]) == 0
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(os.listdir(out))
    converted, tokenizer = load(out, progress=False)
    direct = load_model(file, quantize="int8", progress=False)
    ids = np.asarray([tokenizer.encode("the cat sat on the mat")], np.int32)
    np.testing.assert_array_equal(np.asarray(converted(ids)), np.asarray(direct(ids)))
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_gguf_without_the_gguf_package_names_the_extra(tiny_gguf, monkeypatch, capsys):
    """`gguf` is an optional extra: reading a GGUF file without it is one error naming the pip command
    (the package is simulated missing: an import of it fails)."""
    import sys

    from qwen_jax.errors import MissingExtraError

    file = os.path.join(tiny_gguf[0], "tiny.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'qwen-jax\[gguf\]'") as error:
        load_model(file, progress=False)
    assert "\n" not in str(error.value)
    assert cli_main(["info", file]) == 2
    assert "pip install 'qwen-jax[gguf]'" in capsys.readouterr().err


def test_bad_gguf_files_fail_with_one_clear_error(tiny_gguf, tmp_path):
    import gguf

    directory, _ = tiny_gguf
    data = open(os.path.join(directory, "tiny.gguf"), "rb").read()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 3])
    # The first tensor-info record's type field (after name, n_dims, dims) set to a type id that does not exist.
    reader = gguf.GGUFReader(os.path.join(directory, "tiny.gguf"))
    field = reader.tensors[0].field
    type_offset = field.offset + sum(part.nbytes for part in field.parts[:4])
    unknown = bytearray(data)
    unknown[type_offset : type_offset + 4] = struct.pack("<I", 99)
    (tmp_path / "unknown.gguf").write_bytes(bytes(unknown))
    llama = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(llama), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    for path, message in (
        (truncated, "truncated GGUF"),
        (tmp_path / "unknown.gguf", "unknown GGUF tensor type 99"),
        (llama, "GGUF architecture 'llama'; qwen-jax reads qwen2"),
    ):
        with pytest.raises(CheckpointError) as error:
            load_model(path, progress=False)
        assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_gguf_tokenizer_from_the_real_qwen_vocabulary(tmp_path):
    """Metadata of the real Qwen2.5 vocabulary (151,643 BPE tokens, 22 added ones) rebuilds the real tokenizer."""
    import gguf

    from qwen_jax.checkpoints.gguf import GGUFCheckpoint
    from qwen_jax.tokenizer import Tokenizer

    real = os.environ.get("QWEN_JAX_TOKENIZER_DIR")
    if not real or not os.path.isfile(os.path.join(real, "tokenizer.json")):
        pytest.skip("QWEN_JAX_TOKENIZER_DIR is not set")
    spec = json.loads(open(os.path.join(real, "tokenizer.json"), encoding="utf-8").read())
    vocab = spec["model"]["vocab"]
    tokens = [None] * (len(vocab) + len(spec["added_tokens"]))
    types = [1] * len(tokens)
    for token, index in vocab.items():
        tokens[index] = token
    for added in spec["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = 3 if added["special"] else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(151645)
    writer.add_context_length(32768)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    GGUFCheckpoint(str(path)).write_side_files(str(tmp_path))
    rebuilt, reference = Tokenizer.from_dir(tmp_path), Tokenizer.from_dir(real)
    for text in ("Hello, world! 你好 👋\n\n  def fib(n):\treturn 42", "<|im_start|>user\nHi<|im_end|><tool_call>"):
        assert rebuilt.encode(text) == reference.encode(text)
        assert rebuilt.decode(rebuilt.encode(text)) == reference.decode(reference.encode(text))


def test_hub_ids_reach_gguf_files_and_quantized_repos(tiny_gguf, tmp_path, monkeypatch):
    """`org/repo/file.gguf` downloads that one file; a GPTQ repo id downloads its safetensors and configs."""
    import huggingface_hub

    directory, _ = tiny_gguf
    torch_model = build_hf_model(seed=2, hidden_size=64, intermediate_size=128)
    gptq = write_quantized_checkpoint(torch_model, tmp_path / "gptq", method="gptq", bits=8)
    calls = []
    monkeypatch.setattr(
        huggingface_hub,
        "hf_hub_download",
        lambda repo, filename: calls.append((repo, filename)) or os.path.join(directory, "tiny.gguf"),
    )
    monkeypatch.setattr(
        huggingface_hub,
        "snapshot_download",
        lambda repo, allow_patterns: calls.append((repo, tuple(allow_patterns))) or gptq,
    )
    model = load_model("Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf", progress=False)
    assert calls[-1] == ("Qwen/Qwen2.5-0.5B-Instruct-GGUF", "qwen2.5-0.5b-instruct-q4_k_m.gguf")
    assert model.config.hidden_size == 256
    model = load_model("Qwen/Qwen2.5-0.5B-Instruct-GPTQ-Int8", progress=False)
    assert calls[-1][0] == "Qwen/Qwen2.5-0.5B-Instruct-GPTQ-Int8" and "quantize_config.json" in calls[-1][1]
    assert model_quantization(model) == QuantScheme(8, 32)
    np.testing.assert_allclose(np.asarray(model(IDS)), _torch_logits(torch_model), atol=1e-4)
