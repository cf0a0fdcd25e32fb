"""Long context at the model level: chunked attention, YaRN override, chunked prefill, memory, errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import build_hf_model

import qwen_jax
from qwen_jax.errors import AttentionBackendError, GenerationError
from qwen_jax.generation.static import generate_ids
from qwen_jax.load import load_model
from qwen_jax.model.mixed import mixed_hidden_states

FP32_TOL = 1e-4


def _ids(batch, length, seed=0, vocab=256):
    return np.random.RandomState(seed).randint(0, vocab, (batch, length)).astype(np.int32)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_chunked_model_logits_equal_xla(hf_checkpoint, scan_layers):
    """600 tokens (two 512-blocks, a ragged tail), GQA, full and sliding-window layers mixed (a
    traced per-layer choice inside the scan), a left-padded row: chunked equals the einsum."""
    _, path = hf_checkpoint(
        use_sliding_window=True, sliding_window=100, max_window_layers=1, max_position_embeddings=1024
    )
    model = load_model(path, dtype=jnp.float32, scan_layers=scan_layers, attention="chunked")
    ids = _ids(2, 600)
    mask = np.ones_like(ids)
    mask[1, :37] = 0
    chunked = np.asarray(model(ids, attention_mask=mask))
    model.attention = "xla"
    reference = np.asarray(model(ids, attention_mask=mask))
    np.testing.assert_allclose(chunked[0], reference[0], atol=1e-5)
    np.testing.assert_allclose(chunked[1, 37:], reference[1, 37:], atol=1e-5)


def test_chunked_attention_on_a_mesh_equals_one_device(hf_checkpoint):
    """The chunked kernel's loops partition over batch (data/fsdp) and heads (tensor)."""
    _, path = hf_checkpoint(max_position_embeddings=1024)
    ids = _ids(2, 600, seed=3)
    reference = np.asarray(load_model(path, attention="chunked")(ids))
    mesh = qwen_jax.make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
    sharded = np.asarray(load_model(path, attention="chunked", mesh=mesh)(ids))
    np.testing.assert_allclose(sharded, reference, atol=1e-5)


def test_hf_parity_at_4k_tokens_with_yarn_override(hf_checkpoint):
    """A checkpoint without rope scaling, loaded with rope_scaling='yarn:4', matches HF running
    the same weights with Qwen's YaRN config, at 4,160 tokens (past the original 1,024)."""
    hf_yarn = build_hf_model(
        seed=4,
        max_position_embeddings=1024,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
            "rope_theta": 10000.0,
        },
    )
    _, path = hf_checkpoint(seed=4, max_position_embeddings=1024)  # same weights, plain rope in config.json
    model = load_model(path, dtype=jnp.float32, rope_scaling="yarn:4")
    assert model.config.context_length == 4096 and model.config.rope_scaling.rope_type == "yarn"
    ids = _ids(1, 4160, seed=1)
    ours = np.asarray(model(ids))
    with torch.no_grad():
        reference = hf_yarn(torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - reference).max() <= FP32_TOL
    last = np.asarray(model(ids, logits_to_keep=1))
    assert last.shape == (1, 1, 256)
    np.testing.assert_allclose(last[:, 0], ours[:, -1], atol=1e-6)


def _hf_greedy(torch_model, prompts, new_tokens):
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    out = torch_model.generate(
        ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None
    )
    return out[:, width:].tolist()


def test_chunked_prefill_ragged_batch_greedy_matches_hf(hf_checkpoint):
    """Prompts of 900 and 260 tokens prefilled 128 tokens per call (chunks past a row's end are
    padding), then decoded: the same greedy tokens as HF and as a one-shot prefill. Dynamic NTK
    rope (past 512 positions) checks that every chunk uses the full prompt's base, as HF does."""
    torch_model, path = hf_checkpoint(
        seed=5,
        tie_word_embeddings=False,
        eos_token_id=None,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    )
    model = load_model(path, dtype=jnp.float32, scan_layers=False)
    prompts = [_ids(1, 900, seed=6)[0].tolist(), _ids(1, 260, seed=7)[0].tolist()]
    expected = _hf_greedy(torch_model, prompts, 8)
    chunked = generate_ids(model, prompts, max_new_tokens=8, temperature=0, prefill_chunk=128)
    one_shot = generate_ids(model, prompts, max_new_tokens=8, temperature=0, prefill_chunk=1024)
    assert chunked.token_ids == expected
    assert one_shot.token_ids == expected


@pytest.mark.parametrize("backend", ["xla", "chunked"])
def test_prefill_into_an_empty_cache_equals_reading_the_cache(hf_checkpoint, backend):
    """`empty_cache=True` (causal self-attention over the call's own keys, used for a one-chunk
    prefill) gives the cached path's hidden states and cache: right-padded ragged rows, a mix of
    sliding-window and full layers, a cache longer than the call."""
    from qwen_jax.model.kv_cache import KVCache

    _, path = hf_checkpoint(
        use_sliding_window=True, sliding_window=20, max_window_layers=1, max_position_embeddings=1024
    )
    model = load_model(path, dtype=jnp.float32, attention=backend)
    ids = jnp.asarray(_ids(2, 96, seed=2))
    steps = jnp.arange(96, dtype=jnp.int32)[None, :]
    lengths = jnp.asarray([96, 41], jnp.int32)
    mask = (steps < lengths[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(steps, (2, 96))
    outputs = {}
    for empty in (True, False):
        cache = KVCache.init(model.config, 2, 160, jnp.float32)
        outputs[empty] = model.hidden_states(ids, positions, mask, cache=cache, empty_cache=empty)
    (fresh, fresh_cache), (ref, ref_cache) = outputs[True], outputs[False]
    real = np.asarray(mask, bool)
    assert np.abs(np.asarray(fresh)[real] - np.asarray(ref)[real]).max() <= 1e-5
    np.testing.assert_array_equal(np.asarray(fresh_cache.lengths), [96, 41])
    np.testing.assert_array_equal(np.asarray(fresh_cache.lengths), np.asarray(ref_cache.lengths))
    for got, want in ((fresh_cache.k, ref_cache.k), (fresh_cache.v, ref_cache.v)):
        assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-5


@pytest.mark.parametrize("backend,scan_layers", [("xla", True), ("chunked", False)])
def test_mixed_step_equals_a_decode_step_and_a_prefill_chunk(hf_checkpoint, backend, scan_layers):
    """`mixed_hidden_states` (the serving engine's decode rows and one row's prompt chunk in one call)
    gives what a separate decode step of those rows and a prefill chunk of that row give: hidden
    states, cache contents and lengths; ragged rows, an idle row, sliding-window and full layers,
    a chunk continuing a partly prefilled row with padding after its real tokens."""
    from qwen_jax.model.kv_cache import KVCache

    _, path = hf_checkpoint(
        use_sliding_window=True, sliding_window=20, max_window_layers=1, max_position_embeddings=1024
    )
    model = load_model(path, dtype=jnp.float32, attention=backend, scan_layers=scan_layers)
    rows, max_len, chunk, real = 4, 600, 48, 37
    cache = KVCache.init(model.config, rows, max_len, jnp.float32)
    prompts = _ids(rows, 560, seed=3)
    for row, length in enumerate((530, 30, 9, 0)):  # row 2 is the one being prefilled (9 tokens in so far)
        if length:
            one = KVCache.init(model.config, 1, max_len, jnp.float32)
            _, one = model(jnp.asarray(prompts[row : row + 1, :length]), cache=one)
            cache = cache.insert(one, row)
    tokens = jnp.asarray(_ids(1, rows, seed=4)[0])
    active = jnp.asarray([True, True, False, False])
    chunk_ids = jnp.asarray(_ids(1, chunk, seed=5))
    decoded, prefilled, mixed_cache = mixed_hidden_states(
        model, tokens, active, chunk_ids, jnp.int32(real), jnp.int32(2), cache
    )
    step, step_cache = model.hidden_states(
        tokens[:, None], cache.lengths[:, None], active[:, None].astype(jnp.int32), cache=cache
    )
    row_cache = KVCache(cache.k[:, 2:3], cache.v[:, 2:3], cache.lengths[2:3])
    positions = row_cache.lengths[:, None] + jnp.arange(chunk, dtype=jnp.int32)[None, :]
    mask = (jnp.arange(chunk) < real)[None].astype(jnp.int32)
    alone, alone_cache = model.hidden_states(chunk_ids, positions, mask, cache=row_cache)
    np.testing.assert_array_equal(np.asarray(mixed_cache.lengths), [531, 31, 9 + real, 0])
    assert np.abs(np.asarray(decoded)[:2] - np.asarray(step)[:2, 0]).max() <= 1e-5
    assert np.abs(np.asarray(prefilled)[:real] - np.asarray(alone)[0, :real]).max() <= 1e-5
    for got, decode_ref, chunk_ref in (
        (mixed_cache.k, step_cache.k, alone_cache.k),
        (mixed_cache.v, step_cache.v, alone_cache.v),
    ):
        got, decode_ref, chunk_ref = np.asarray(got), np.asarray(decode_ref), np.asarray(chunk_ref)
        for row, filled in ((0, 531), (1, 31)):
            assert np.abs(got[:, row, :filled] - decode_ref[:, row, :filled]).max() <= 1e-5
        assert np.abs(got[:, 2, : 9 + real] - chunk_ref[:, 0, : 9 + real]).max() <= 1e-5


def test_prefill_memory_grows_linearly_with_length():
    """Compiled memory of a jitted long-prompt forward (0.5B attention geometry: 14 query heads,
    2 KV heads, head_dim 64, MLP 4864) stays under a bound linear in T with chunked attention;
    the einsum path's [T, T] scores exceed it."""
    from flax import nnx

    config = qwen_jax.Qwen2Config(vocab_size=1024, num_hidden_layers=2)

    def temp_bytes(backend, length):
        abstract = nnx.eval_shape(lambda: qwen_jax.Qwen2ForCausalLM(config, dtype=jnp.float32, attention=backend))
        graphdef, state = nnx.split(abstract)

        def prefill(state, ids):
            positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
            return nnx.merge(graphdef, state).forward(ids, positions, None, logits_to_keep=1)

        compiled = jax.jit(prefill).lower(state, jax.ShapeDtypeStruct((1, length), jnp.int32)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    def linear_bound(length):  # per token: the MLP's three [T, F] arrays and a few [T, D] ones, float32
        return length * 4 * (4 * config.intermediate_size + 8 * config.hidden_size) + 32 * 2**20

    sizes = {length: temp_bytes("chunked", length) for length in (2048, 4096, 8192)}
    for length, size in sizes.items():
        assert size <= linear_bound(length), (length, size)
    assert sizes[8192] <= 2.2 * sizes[4096] and sizes[4096] <= 2.2 * sizes[2048]
    assert temp_bytes("xla", 8192) > 4 * linear_bound(8192)


def test_context_errors_and_rope_scaling_override(hf_checkpoint, capsys):
    """Prompt + max_new_tokens past the context fails before any compile, naming the way out;
    rope_scaling='yarn:4' at load quadruples the context."""
    from qwen_jax.compilation import compile_counts

    _, path = hf_checkpoint(max_position_embeddings=64)
    model = load_model(path, dtype=jnp.float32, scan_layers=False)
    before = compile_counts()
    with pytest.raises(GenerationError, match=r"overflows the context.*rope_scaling='yarn:4'"):
        generate_ids(model, [[1] * 60], max_new_tokens=8)
    assert compile_counts() == before
    scaled = load_model(path, dtype=jnp.float32, scan_layers=False, rope_scaling="yarn:4")
    assert scaled.config.context_length == 256
    assert len(generate_ids(scaled, [[1] * 60], max_new_tokens=8, temperature=0).token_ids[0]) == 8
    with pytest.raises(GenerationError, match="context is 256"):
        generate_ids(scaled, [[1] * 250], max_new_tokens=8)
    with pytest.raises(qwen_jax.ConfigError, match="bad rope scaling 'yarn'"):
        load_model(path, rope_scaling="yarn")


def test_unavailable_backend_is_refused_before_loading(hf_checkpoint, tmp_path, capsys):
    from qwen_jax.cli import main

    with pytest.raises(AttentionBackendError, match="'cudnn' needs an NVIDIA GPU"):
        load_model(tmp_path / "no-such-checkpoint", attention="cudnn")  # refused before the path is read
    _, path = hf_checkpoint()
    model = load_model(path)
    with pytest.raises(AttentionBackendError, match="'splash' needs a TPU"):
        model.attention = "splash"
    assert model.attention == "auto"
    capsys.readouterr()
    assert main(["generate", "--model", path, "--prompt", "hi", "--attention", "cudnn"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs an NVIDIA GPU" in err[0]


def test_info_plans_memory_at_a_context(capsys):
    from qwen_jax.cli import main
    from qwen_jax.memory import plan_memory

    assert main(["info", "7B", "--context", "131072", "--rope-scaling", "yarn:4", "--mesh", "tensor=8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["context_length"] == 131072
    plan = plan_memory(
        qwen_jax.Qwen2Config.preset("7B").with_rope_scaling("yarn:4"),
        tensor=8,
        batch=1,
        max_len=131072,
        prefill_chunk=2048,
    )
    # 28 layers x 131,072 tokens x 4 KV heads (not divisible by 8: replicated) x 128 x 2 (k, v) x 2 bytes
    assert out["memory"]["kv_cache"] == plan.kv_cache == 28 * 131072 * 4 * 128 * 2 * 2
    assert 0 < out["memory"]["prefill_activations"] < plan.kv_cache / 10
    assert main(["info", "0.5B", "--context", "65536"]) == 0
    assert "exceed the model's context of 32,768 (try --rope-scaling yarn:4)" in capsys.readouterr().out
