"""Logits of qwen_jax against HF transformers on tiny random checkpoints (the numerics contract)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qwen_jax
from qwen_jax.load import load_model

FP32_TOL = 1e-4


def hf_logits(model, ids, attention_mask=None):
    with torch.no_grad():
        kwargs = {} if attention_mask is None else {"attention_mask": torch.tensor(attention_mask)}
        return model(torch.tensor(ids), **kwargs).logits.float().numpy()


def random_ids(batch, length, vocab=256, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, (batch, length)).astype(np.int32)


CASES = {
    "mha_tied": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa_untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "mqa_untied": dict(num_key_value_heads=1, tie_word_embeddings=False),
    "gqa_8heads": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2),
    "rope_linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    "rope_yarn": dict(
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "rope_theta": 10000.0,
        }
    ),
    "sliding_window": dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_logits_match_hf(hf_checkpoint, case):
    overrides = CASES[case]
    hf_model, path = hf_checkpoint(**overrides)
    ids = random_ids(2, 24)
    ours = np.asarray(load_model(path, dtype=jnp.float32)(ids))
    ref = hf_logits(hf_model, ids)
    assert ours.shape == ref.shape == (2, 24, 256)
    assert np.abs(ours - ref).max() <= FP32_TOL


@pytest.mark.parametrize("case", ["gqa_untied", "sliding_window"])
def test_unrolled_layers_match_hf(hf_checkpoint, case):
    """scan_layers=False (one array per layer, the CPU decode default) computes the same logits."""
    from flax import nnx

    hf_model, path = hf_checkpoint(**CASES[case])
    model = load_model(path, dtype=jnp.float32, scan_layers=False)
    assert isinstance(model.model.layers, nnx.List) and len(model.model.layers) == 3
    ids = random_ids(2, 24)
    assert np.abs(np.asarray(model(ids)) - hf_logits(hf_model, ids)).max() <= FP32_TOL
    # The HF key map reads both layouts: exporting the unrolled model gives the checkpoint back.
    from qwen_jax.checkpoints.hf import iter_hf_tensors

    state = hf_model.state_dict()
    for name, array in iter_hf_tensors(model):
        np.testing.assert_array_equal(array, state[name].numpy())


@pytest.mark.parametrize("rows", [1, 2, 3, 12, 64, 65])
def test_out_major_kernels_match_hf_in_every_product_regime(hf_checkpoint, rows):
    """Unrolled kernels on CPU are stored [*out, *in] (`set_out_major`): one row is a matrix-vector
    product, 2-64 rows `(W @ x.T).T`, more a matrix product with the kernel on the right; the
    lm_head the same. Each equals HF (the rows are decode-shaped: `rows` sequences of one token) and
    the einsum layout."""
    from qwen_jax.model.linear import Linear
    from qwen_jax.ops.cpu import OUT_MAJOR_SWAP_ROWS

    hf_model, path = hf_checkpoint(**CASES["gqa_untied"])
    model = load_model(path, dtype=jnp.float32, scan_layers=False)
    linears = [m for _, m in __import__("flax").nnx.iter_modules(model.model.layers) if isinstance(m, Linear)]
    assert len(linears) == 3 * 7 and all(linear.out_major for linear in linears)
    assert model.model.layers[0].mlp.down_proj.kernel.shape == (64, 128)  # [hidden, intermediate]
    assert OUT_MAJOR_SWAP_ROWS == (2, 64)  # the regimes this test spans
    ids = random_ids(rows, 1, seed=rows)
    ours = np.asarray(model(ids))
    assert np.abs(ours - hf_logits(hf_model, ids)).max() <= FP32_TOL
    einsum = load_model(path, dtype=jnp.float32, scan_layers=True)
    np.testing.assert_allclose(ours, np.asarray(einsum(ids)), atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 7, 64, 65])
def test_rows_times_out_major_in_every_regime_and_under_grad(rows):
    """`rows_times_out_major` equals `x @ W.T` for every row count, keeps a preferred element type,
    and differentiates (the training loss reaches the lm_head through it on CPU)."""
    from qwen_jax.ops.cpu import rows_times_out_major

    rng = np.random.RandomState(rows)
    x = rng.randn(rows, 48).astype(np.float32)
    w = rng.randn(80, 48).astype(np.float32)
    y = jax.jit(rows_times_out_major)(x, w)
    assert y.shape == (rows, 80)
    np.testing.assert_allclose(np.asarray(y), x @ w.T, rtol=1e-5, atol=1e-5)
    low = rows_times_out_major(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), jnp.float32)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(low), x @ w.T, rtol=0.05, atol=0.3)
    gx, gw = jax.grad(lambda a, b: jnp.sum(jnp.sin(rows_times_out_major(a, b))), argnums=(0, 1))(x, w)
    gy = np.cos(x @ w.T)
    np.testing.assert_allclose(np.asarray(gx), gy @ w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gw), gy.T @ x, rtol=1e-4, atol=1e-4)


def test_out_major_models_save_quantize_and_unstack_without_it(hf_checkpoint, tmp_path):
    """Writers read out-major kernels back in the einsum layout; quantizing one starts from that
    layout; `out_major=False` keeps the einsum layout."""
    from qwen_jax.checkpoints.orbax import save_model
    from qwen_jax.model.causal_lm import unstack_layers
    from qwen_jax.model.quantize import quantize_model

    _, path = hf_checkpoint(**CASES["gqa_untied"])
    ids = random_ids(2, 7)
    model = load_model(path, dtype=jnp.float32, scan_layers=False)
    reference = np.asarray(model(ids))
    save_model(model, tmp_path / "orbax", source=str(path))
    restored = load_model(str(tmp_path / "orbax"), dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(restored(ids)), reference, atol=1e-5)

    plain = unstack_layers(load_model(path, dtype=jnp.float32), out_major=False)
    assert not plain.model.layers[0].self_attn.o_proj.out_major
    assert plain.model.layers[0].self_attn.o_proj.kernel.shape == (4, 16, 64)  # einsum [heads, head_dim, hidden]
    np.testing.assert_allclose(np.asarray(plain(ids)), reference, atol=1e-5)

    layout = model.model.layers[0].self_attn.o_proj.layout
    assert layout == plain.model.layers[0].self_attn.o_proj.layout
    quantize_model(model, "int8")
    expected = load_model(path, dtype=jnp.float32, scan_layers=False, quantize="int8")
    assert not expected.model.layers[0].self_attn.o_proj.out_major  # quantized before unstacking
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(expected(ids)), atol=1e-5)


def test_sliding_window_is_really_applied(hf_checkpoint):
    """The window must change the logits past it (guards against a mask that is never used)."""
    _, windowed = hf_checkpoint(seed=3, use_sliding_window=True, sliding_window=3, max_window_layers=0)
    _, full = hf_checkpoint(seed=3)
    ids = random_ids(1, 12)
    a = np.asarray(load_model(windowed, dtype=jnp.float32)(ids))
    b = np.asarray(load_model(full, dtype=jnp.float32)(ids))
    np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-5)  # inside the window: identical
    assert np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-3


def test_dynamic_ntk_beyond_max_positions(hf_checkpoint):
    hf_model, path = hf_checkpoint(
        max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    )
    ids = random_ids(1, 40)  # longer than max_position_embeddings: the base is recomputed
    ours = np.asarray(load_model(path, dtype=jnp.float32)(ids))
    ref = hf_logits(hf_model, ids)
    assert np.abs(ours - ref).max() <= FP32_TOL
    # Within the original length dynamic NTK equals the default rope.
    _, plain = hf_checkpoint(max_position_embeddings=16)
    short = random_ids(1, 10)
    np.testing.assert_allclose(load_model(path)(short), load_model(plain)(short), atol=1e-6)


def test_sharded_safetensors(hf_checkpoint):
    hf_model, path = hf_checkpoint(tie_word_embeddings=False, max_shard_size="60KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 2
    ids = random_ids(2, 16)
    assert np.abs(np.asarray(load_model(path, dtype=jnp.float32)(ids)) - hf_logits(hf_model, ids)).max() <= FP32_TOL


def _rewrite_config(path, edit):
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    edit(cfg)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return cfg


@pytest.mark.parametrize("legacy_key", ["type", "rope_type"])
def test_v4_and_v5_config_json(hf_checkpoint, legacy_key):
    """transformers 5 writes rope_parameters; older files carry rope_theta + rope_scaling."""
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0}
    hf_model, path = hf_checkpoint(rope_parameters=rope)
    ids = random_ids(1, 20)
    v5 = np.asarray(load_model(path, dtype=jnp.float32)(ids))
    assert "rope_parameters" in json.load(open(os.path.join(path, "config.json")))

    def to_v4(cfg):
        params = cfg.pop("rope_parameters")
        cfg.pop("layer_types", None)
        cfg["rope_theta"] = params.pop("rope_theta")
        params[legacy_key] = params.pop("rope_type")
        cfg["rope_scaling"] = params

    _rewrite_config(path, to_v4)
    config = qwen_jax.Qwen2Config.from_hf(path)
    assert config.rope_scaling.rope_type == "yarn" and config.rope_theta == 10000.0
    v4 = np.asarray(load_model(path, dtype=jnp.float32)(ids))
    np.testing.assert_array_equal(v4, v5)
    assert np.abs(v4 - hf_logits(hf_model, ids)).max() <= FP32_TOL


def test_tied_checkpoint_with_redundant_lm_head(hf_checkpoint, tmp_path):
    """Tied checkpoints may carry lm_head.weight too; it is ignored."""
    from qwen_jax.checkpoints.safetensors import SafetensorsFile, write_safetensors

    hf_model, path = hf_checkpoint()
    st = SafetensorsFile(os.path.join(path, "model.safetensors"))
    tensors = {name: np.array(st.get(name)) for name in st.keys()}
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = np.zeros_like(tensors["model.embed_tokens.weight"])  # would break logits if used
    write_safetensors(os.path.join(path, "model.safetensors"), tensors)
    ids = random_ids(1, 8)
    assert np.abs(np.asarray(load_model(path)(ids)) - hf_logits(hf_model, ids)).max() <= FP32_TOL


def test_left_padded_batch_equals_rows_alone(hf_checkpoint):
    _, path = hf_checkpoint(tie_word_embeddings=False)
    model = load_model(path, dtype=jnp.float32)
    lengths = [12, 5, 9]
    rows = [random_ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    T = max(lengths)
    ids = np.zeros((len(rows), T), np.int32)
    mask = np.zeros((len(rows), T), np.int32)
    for i, row in enumerate(rows):
        ids[i, T - len(row) :] = row
        mask[i, T - len(row) :] = 1
    batched = np.asarray(model(ids, attention_mask=mask))
    assert np.isfinite(batched).all()
    for i, row in enumerate(rows):
        alone = np.asarray(model(row[None, :]))[0]
        np.testing.assert_allclose(batched[i, T - len(row) :], alone, atol=1e-5)


def test_explicit_positions_and_hf_padding(hf_checkpoint):
    """Left padding agrees with HF given the same attention mask."""
    hf_model, path = hf_checkpoint()
    ids = random_ids(2, 10)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    ours = np.asarray(load_model(path)(ids, attention_mask=mask))
    ref = hf_logits(hf_model, ids, attention_mask=mask)
    assert np.abs(ours[0] - ref[0]).max() <= FP32_TOL
    assert np.abs(ours[1, 4:] - ref[1, 4:]).max() <= FP32_TOL


def test_bfloat16_error_within_hf_bfloat16_error(hf_checkpoint):
    """bf16: our difference to HF fp32 is no worse than HF bf16's own (slack: 1.25x + 1e-3 absolute).

    The slack covers rounding-order differences between XLA and torch kernels; a missing
    rounding point or a wrong dtype path shows as a multiple, not 25 %.
    """
    hf32, path = hf_checkpoint(seed=1, tie_word_embeddings=False)
    ids = random_ids(2, 32)
    ref32 = hf_logits(hf32, ids)
    hf16 = build_bf16_copy(hf32)
    ref16 = hf_logits(hf16, ids)
    model = load_model(path, dtype=jnp.bfloat16)
    assert model.model.layers.mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    ours = np.asarray(model(ids))
    hf_err = np.abs(ref16 - ref32).max()
    our_err = np.abs(ours - ref32).max()
    assert hf_err > 0
    assert our_err <= 1.25 * hf_err + 1e-3, (our_err, hf_err)
    # And the two bf16 implementations are close to each other.
    assert np.abs(ours - ref16).max() <= 2 * hf_err + 1e-3


def build_bf16_copy(model):
    import copy

    return copy.deepcopy(model).to(torch.bfloat16)


def test_bf16_checkpoint_loads_as_float32(hf_checkpoint):
    hf16, path = hf_checkpoint(dtype="bfloat16")
    model = load_model(path, dtype=jnp.float32)
    assert model.model.embed_tokens.embedding[...].dtype == jnp.float32
    ids = random_ids(1, 8)
    ref = hf_logits(hf16.float(), ids)  # the same bf16 weights, computed in fp32
    assert np.abs(np.asarray(model(ids)) - ref).max() <= FP32_TOL


def test_jit_is_reused_and_call_works_inside_jit(hf_checkpoint):
    from flax import nnx

    _, path = hf_checkpoint()
    model = load_model(path)
    ids = random_ids(1, 8)
    eager = np.asarray(model(ids))
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, ids):
        return nnx.merge(graphdef, state)(ids)

    np.testing.assert_allclose(np.asarray(f(state, ids)), eager, atol=1e-6)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_kv_cache_prefill_and_decode_equal_full_forward(hf_checkpoint, scan_layers):
    from qwen_jax.model.kv_cache import KVCache

    _, path = hf_checkpoint(tie_word_embeddings=False, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    model = load_model(path, dtype=jnp.float32, scan_layers=scan_layers)
    ids = random_ids(2, 10)
    full = np.asarray(model(ids))
    cache = KVCache.init(model.config, batch=2, max_len=16, dtype=jnp.float32)
    logits, cache = model(ids[:, :6], cache=cache)
    np.testing.assert_allclose(np.asarray(logits), full[:, :6], atol=1e-5)
    for t in range(6, 10):
        step, cache = model(ids[:, t : t + 1], cache=cache)
        np.testing.assert_allclose(np.asarray(step)[:, 0], full[:, t], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [10, 10])


def test_kv_cache_ragged_rows_and_insert(hf_checkpoint):
    """Right-padded rows of different lengths share a cache; each row equals its own forward pass.

    Then a row prefilled alone and inserted into a slot of a batch cache decodes like the others.
    """
    from qwen_jax.model.kv_cache import KVCache

    _, path = hf_checkpoint(tie_word_embeddings=False)
    model = load_model(path, dtype=jnp.float32, scan_layers=False)
    rows = [random_ids(1, n, seed=n)[0] for n in (7, 3, 5)]
    full = [np.asarray(model(np.concatenate([r, [9, 8]])[None]))[0] for r in rows]
    ids = np.zeros((3, 8), np.int32)
    mask = np.zeros((3, 8), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    cache = KVCache.init(model.config, batch=3, max_len=12, dtype=jnp.float32)
    logits, cache = model(ids, attention_mask=mask, cache=cache)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [7, 3, 5])
    for i, r in enumerate(rows):
        np.testing.assert_allclose(np.asarray(logits)[i, : len(r)], full[i][: len(r)], atol=1e-5)
    for t, token in enumerate((9, 8)):  # two ragged decode steps, each row at its own position
        step, cache = model(np.full((3, 1), token, np.int32), cache=cache)
        for i, r in enumerate(rows):
            np.testing.assert_allclose(np.asarray(step)[i, 0], full[i][len(r) + t], atol=1e-5)
    # Row 1 prefilled alone (batch 1, shorter cache), inserted into slot 0 of a 2-row cache.
    alone = KVCache.init(model.config, batch=1, max_len=8, dtype=jnp.float32)
    _, alone = model(rows[1][None], cache=alone)
    shared = KVCache.init(model.config, batch=2, max_len=12, dtype=jnp.float32)
    _, shared = model(ids[[2, 2]], attention_mask=mask[[2, 2]], cache=shared)
    shared = jax.jit(KVCache.insert, donate_argnums=0)(shared, alone, 0)
    np.testing.assert_array_equal(np.asarray(shared.lengths), [3, 5])
    step, shared = model(np.full((2, 1), 9, np.int32), cache=shared)
    np.testing.assert_allclose(np.asarray(step)[0, 0], full[1][3], atol=1e-5)
    np.testing.assert_allclose(np.asarray(step)[1, 0], full[2][5], atol=1e-5)
    with pytest.raises(ValueError, match="max_len"):
        alone.insert(shared, 0)
