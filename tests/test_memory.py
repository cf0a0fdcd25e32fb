"""The memory planner agrees with what placement really puts on each device."""

import jax.numpy as jnp
import pytest

import qwen_jax
from qwen_jax.memory import measured_bytes_per_device, plan_memory
from qwen_jax.model.kv_cache import KVCache
from qwen_jax.sharding import named_sharding

CONFIG = qwen_jax.Qwen2Config(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)


@pytest.mark.parametrize("mesh_kw", [dict(data=8), dict(fsdp=4, tensor=2), dict(tensor=8), dict(fsdp=8)])
def test_plan_matches_placement(mesh_kw):
    import jax
    from flax import nnx

    mesh = qwen_jax.make_mesh(**{"data": 1, "fsdp": 1, "tensor": 1, **mesh_kw})
    model = qwen_jax.create_model(CONFIG, dtype=jnp.float32, mesh=mesh)
    cache = KVCache.init(CONFIG, batch=8, max_len=32, dtype=jnp.float32)

    cache = jax.tree.map(
        lambda a: jax.device_put(a, named_sharding(KVCache.logical_axes(), a.shape, mesh)) if a.ndim == 5 else a, cache
    )
    measured_params = max(measured_bytes_per_device(nnx.state(model)).values())
    measured_cache = max(measured_bytes_per_device((cache.k, cache.v)).values())
    plan = plan_memory(CONFIG, param_dtype=jnp.float32, batch=8, max_len=32, cache_dtype=jnp.float32, **mesh_kw)
    assert plan.params == measured_params
    assert plan.kv_cache == measured_cache


def test_published_sizes_by_arithmetic():
    seven_b = qwen_jax.Qwen2Config.preset("7B")
    single = plan_memory(seven_b, param_dtype=jnp.bfloat16)
    assert single.params == 7_615_616_512 * 2
    trained = plan_memory(seven_b, fsdp=8, training=True, master_weights=True)
    # fsdp=8 divides the embed axis of 7B (3584): every weight with an embed axis is split 8 ways;
    # the q/k/v biases ([heads, head_dim]) have none and stay replicated.
    biases = seven_b.num_hidden_layers * (seven_b.num_attention_heads + 2 * seven_b.num_key_value_heads) * 128
    per_device = (7_615_616_512 - biases) // 8 + biases
    assert trained.params == per_device * 2
    assert trained.optimizer == per_device * (8 + 4)
    assert "per device" in str(trained)
