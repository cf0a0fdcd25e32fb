"""Sharded forward on 8 fake CPU devices equals the unsharded one; weights are really split."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import qwen_jax
from qwen_jax.errors import MeshError
from qwen_jax.load import load_model
from qwen_jax.sharding import ShardingRules, logical_to_spec, parse_mesh_spec

# 8 query heads and 2 kv heads: tensor=8 splits q heads but must replicate kv heads.
SHARD_CONFIG = dict(
    hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False
)


def test_eight_fake_devices():
    assert jax.device_count() == 8, "tests/conftest.py must set XLA_FLAGS before jax is imported"


@pytest.mark.parametrize(
    "mesh_kw, split_param, expected_spec",
    [
        (dict(data=8), None, None),
        (dict(fsdp=4, tensor=2), "q_kernel", P(None, "fsdp", "tensor", None)),
        (dict(tensor=8), "q_kernel", P(None, None, "tensor", None)),
    ],
)
def test_sharded_logits_equal_unsharded(hf_checkpoint, mesh_kw, split_param, expected_spec):
    _, path = hf_checkpoint(**SHARD_CONFIG)
    ids = np.random.RandomState(0).randint(0, 256, (8, 12)).astype(np.int32)
    reference = np.asarray(load_model(path)(ids))
    mesh = qwen_jax.make_mesh(**mesh_kw)
    model = load_model(path, mesh=mesh)
    logits = model(ids)
    np.testing.assert_allclose(np.asarray(logits), reference, atol=1e-5)

    layers = model.model.layers
    q_kernel = layers.self_attn.q_proj.kernel[...]
    k_kernel = layers.self_attn.k_proj.kernel[...]
    if split_param is None:  # pure data parallel: weights replicated, batch split
        assert q_kernel.sharding.is_fully_replicated
        assert logits.sharding.spec[0] in ("data", ("data",))
        return
    assert _full_spec(q_kernel) == expected_spec
    shard_shapes = {s.data.shape for s in q_kernel.addressable_shards}
    assert all(np.prod(s) < np.prod(q_kernel.shape) for s in shard_shapes), "q kernel is not split"
    if mesh_kw == dict(tensor=8):
        # 2 kv heads cannot be split 8 ways: replicated along heads instead of an error.
        assert _full_spec(k_kernel) == P(None, None, None, None)
        up = layers.mlp.up_proj.kernel[...]
        assert _full_spec(up) == P(None, None, "tensor")
        assert up.addressable_shards[0].data.shape == (3, 64, 16)


def _full_spec(array) -> P:
    """The array's PartitionSpec padded with None to its rank (jit may drop trailing Nones)."""
    spec = tuple(array.sharding.spec)
    return P(*spec, *(None,) * (array.ndim - len(spec)))


def test_make_mesh_defaults_and_errors():
    assert dict(qwen_jax.make_mesh().shape) == {"data": 1, "fsdp": 1, "tensor": 8}
    assert dict(qwen_jax.make_mesh(data=1, tensor=1).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(qwen_jax.make_mesh(fsdp=4, tensor=2).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="do not divide") as raised:
        qwen_jax.make_mesh(tensor=3)
    assert isinstance(raised.value, MeshError)


def test_non_dividing_axes_replicate():
    mesh = qwen_jax.make_mesh(fsdp=2, tensor=4)
    spec = logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh)
    assert spec == P("fsdp", None, None)
    # The same mesh axis is never used twice in one spec.
    rules = ShardingRules(embed="tensor")
    assert logical_to_spec(("embed", "mlp"), (64, 128), mesh, rules) == P("tensor", None)


def test_parse_mesh_spec():
    assert parse_mesh_spec("data=2,fsdp=2,tensor=2") == {"data": 2, "fsdp": 2, "tensor": 2}
    for bad in ("pipeline=2", "tensor", "tensor=0", "tensor=x"):
        with pytest.raises(ValueError, match="bad mesh spec") as raised:
            parse_mesh_spec(bad)
        assert isinstance(raised.value, MeshError)


def test_create_model_places_params_in_shards():
    config = qwen_jax.Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    mesh = qwen_jax.make_mesh(fsdp=4, tensor=2)
    model = qwen_jax.create_model(config, mesh=mesh)
    emb = model.model.embed_tokens.embedding[...]
    assert _full_spec(emb) == P("tensor", "fsdp")
    unsharded = qwen_jax.create_model(config)
    ids = np.arange(16, dtype=np.int32).reshape(2, 8)
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(unsharded(ids)), atol=1e-5)


def test_unrolled_layers_on_a_mesh(hf_checkpoint):
    _, path = hf_checkpoint(**SHARD_CONFIG)
    ids = np.random.RandomState(1).randint(0, 256, (4, 10)).astype(np.int32)
    reference = np.asarray(load_model(path)(ids))
    model = load_model(path, mesh=qwen_jax.make_mesh(fsdp=4, tensor=2), scan_layers=False)
    # On CPU the unrolled kernels are stored [*out, *in] (`set_out_major`): q_proj [heads, head_dim, embed].
    q_proj = model.model.layers[1].self_attn.q_proj
    assert q_proj.out_major
    assert _full_spec(q_proj.kernel[...]) == P("tensor", None, "fsdp")
    np.testing.assert_allclose(np.asarray(model(ids)), reference, atol=1e-5)
    # 12 rows: the products run as (W @ x.T).T on sharded kernels (`OUT_MAJOR_SWAP_ROWS`).
    short = ids[:, :3]
    np.testing.assert_allclose(np.asarray(model(short)), np.asarray(load_model(path)(short)), atol=1e-5)
