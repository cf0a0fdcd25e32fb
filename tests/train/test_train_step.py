"""The train step (`qwen_jax.train.step`): schedule, weight-decay mask, FLOPs, and `TrainSteps`:
gradient accumulation gives the whole batch's step, eval matches the loss, and the step trains
the loss it is given (what a new training method plugs in)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_fixtures import TINY_MODEL, compilation_cache  # noqa: F401 (fixtures)

from qwen_jax import Qwen2Config, create_model
from qwen_jax.train.config import TrainConfig
from qwen_jax.train.data.examples import Example
from qwen_jax.train.data.packing import PackedBatch, pack
from qwen_jax.train.loop import resolve_mesh
from qwen_jax.train.step import (
    TrainSteps,
    decay_mask,
    flops_per_token,
    make_optimizer,
    make_schedule,
    matmul_params,
    path_names,
    sft_loss,
)

_CONFIG = Qwen2Config(**{**TINY_MODEL, "vocab_size": 48})
_ROWS, _SEQ_LEN = 4, 16


def test_schedule_warms_up_then_decays():
    config = TrainConfig(learning_rate=1e-3, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    cosine = [float(make_schedule(config, total_steps=10)(step)) for step in range(11)]
    assert cosine[:3] == pytest.approx([0.0, 5e-4, 1e-3])  # linear warmup from 0 to the peak
    assert cosine[10] == pytest.approx(1e-4)  # min_lr_ratio * peak at the last step
    assert all(a > b for a, b in zip(cosine[2:], cosine[3:]))
    linear = make_schedule(config.replace(schedule="linear"), total_steps=10)
    assert float(linear(6)) == pytest.approx(1e-3 - 0.5 * 0.9e-3)  # half way through the 8 decay steps
    constant = make_schedule(config.replace(schedule="constant", warmup_steps=0), total_steps=10)
    assert [float(constant(step)) for step in (0, 5, 10)] == pytest.approx([1e-3] * 3)


def test_decay_mask_spares_norms_and_biases():
    params = nnx.state(create_model(_CONFIG, dtype=jnp.float32), nnx.Param)
    flat = jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]
    mask = {".".join(n for n in path_names(path) if n != "value"): decays for path, decays in flat}
    assert mask["model.embed_tokens.embedding"] and mask["model.layers.self_attn.q_proj.kernel"]
    assert not mask["model.layers.self_attn.q_proj.bias"] and not mask["model.norm.weight"]
    assert not any(decays for name, decays in mask.items() if "norm" in name or name.endswith("bias"))


def test_flops_count_every_matmul_weight():
    params = nnx.state(create_model(_CONFIG, dtype=jnp.float32), nnx.Param)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    kernels = sum(leaf.size for path, leaf in flat if "kernel" in path_names(path))
    head = _CONFIG.vocab_size * _CONFIG.hidden_size  # tied: the output head is the embedding
    assert _CONFIG.tie_word_embeddings and matmul_params(_CONFIG) == kernels + head
    full, lora = flops_per_token(_CONFIG, 128, lora=False), flops_per_token(_CONFIG, 128, lora=True)
    assert full - lora == 2 * matmul_params(_CONFIG)  # LoRA computes no weight gradients
    attention = 12 * _CONFIG.num_hidden_layers * _CONFIG.num_attention_heads * _CONFIG.head_dim * 128
    assert full == 6 * matmul_params(_CONFIG) + attention


def _batch() -> PackedBatch:
    """Four packed rows with different target counts, so that averaging per micro-batch would be wrong."""
    rng = np.random.default_rng(0)
    examples = []
    for length in (16, 7, 9, 16, 10, 6):  # rows: 16 | 7 + 9 | 16 | 10 + 6
        mask = rng.random(length) < (0.9 if length % 2 else 0.3)
        mask[-1] = True
        examples.append(Example(rng.integers(0, _CONFIG.vocab_size, length).astype(np.int32), mask))
    batch = pack(examples, _SEQ_LEN)
    assert batch.rows == _ROWS
    return batch


def _steps(grad_accum: int, loss=sft_loss) -> tuple[TrainSteps, dict, nnx.State]:
    mesh = resolve_mesh("fsdp=1")
    model = create_model(_CONFIG, dtype=jnp.float32, param_dtype=jnp.float32, mesh=mesh, seed=1)
    # adam_eps 1e-3: with 1e-8 Adam turns a float32 rounding difference in a near-zero gradient
    # element (micro-batch sums add in another order) into a step of up to the learning rate.
    config = TrainConfig(learning_rate=1e-2, adam_eps=1e-3, batch_size=_ROWS, grad_accum=grad_accum, seq_len=_SEQ_LEN)
    schedule = make_schedule(config, total_steps=10)
    steps = TrainSteps(
        model,
        loss=loss,
        optimizer=make_optimizer(config, schedule),
        schedule=schedule,
        trainable=nnx.Param,
        mesh=mesh,
        batch_size=_ROWS,
        grad_accum=grad_accum,
        seq_len=_SEQ_LEN,
    )
    return steps, *steps.init(model, seed=0)


def _host(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_accumulated_step_is_the_whole_batch_step():
    batch = _batch()
    whole, whole_state, whole_frozen = _steps(grad_accum=1)
    # The loss of each half alone, and of the whole batch (sums over the target tokens).
    model = whole.model(whole_state["params"], whole_frozen)
    halves = [
        [float(x) for x in nnx.jit(sft_loss)(model, {k: jnp.asarray(v) for k, v in vars(half).items()})]
        for half in (batch.select(slice(0, 2)), batch.select(slice(2, 4)))
    ]
    (sum_a, count_a), (sum_b, count_b) = halves
    expected = (sum_a + sum_b) / (count_a + count_b)
    assert abs((sum_a / count_a + sum_b / count_b) / 2 - expected) > 1e-3  # a mean of means would differ

    eval_sum, eval_count = whole.evaluate(whole_state["params"], whole_frozen, batch.select)
    np.testing.assert_allclose([float(eval_sum), float(eval_count)], [sum_a + sum_b, count_a + count_b], rtol=1e-6)

    whole_state, whole_metrics = whole.train(whole_state, whole_frozen, batch.select)
    accumulated, state, frozen = _steps(grad_accum=2)
    state, metrics = accumulated.train(state, frozen, batch.select)
    assert float(whole_metrics["target_tokens"]) == float(metrics["target_tokens"]) == count_a + count_b
    assert float(whole_metrics["loss"]) == pytest.approx(expected, rel=1e-6)
    for key in ("loss", "grad_norm", "lr"):
        np.testing.assert_allclose(float(metrics[key]), float(whole_metrics[key]), rtol=1e-6)
    assert int(state["step"]) == int(whole_state["step"]) == 1
    for a, b in zip(_host(whole_state["params"]), _host(state["params"])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_the_step_trains_the_loss_it_is_given():
    def doubled(model, batch):
        total, count = sft_loss(model, batch)
        return 2.0 * total, count

    batch = _batch()
    sft, sft_state, sft_frozen = _steps(grad_accum=1)
    _, sft_metrics = sft.train(sft_state, sft_frozen, batch.select)
    other, state, frozen = _steps(grad_accum=1, loss=doubled)
    _, metrics = other.train(state, frozen, batch.select)
    np.testing.assert_allclose(float(metrics["loss"]), 2 * float(sft_metrics["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), 2 * float(sft_metrics["grad_norm"]), rtol=1e-5)
