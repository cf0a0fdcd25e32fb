"""LoRA as a declared part of `Linear`; an adapted model (float or quantized base) stays an ordinary
model for inference: it unrolls, runs and generates with its adapters unmerged, equal to the
merged model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen_jax.config import GenerationConfig
from qwen_jax.generation.static import generate_ids
from qwen_jax.load import load_model
from qwen_jax.model.causal_lm import decoder_linears, unstack_layers
from qwen_jax.model.linear import LoRA, LoRAParam, QuantizedKernel
from qwen_jax.model.lora import (
    TARGET_PATHS,
    LoRAConfig,
    adapters_disabled,
    apply_lora,
    lora_modules,
    merge_lora,
    set_lora_deterministic,
    target_linears,
)
from qwen_jax.model.quantize import quantize_model

# hidden 128 and intermediate 256 take the default int4 groups of 128.
SMALL = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
IDS = np.array([[3, 17, 250, 9, 42, 42, 0, 128], [5, 6, 7, 8, 9, 10, 11, 12]], np.int32)
PROMPTS = [[5, 9, 100, 7], [3, 17, 250, 9, 42]]
CONFIG = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))


def _adapted(path, quantize=None, seed=0, config=CONFIG):
    """A stacked model with adapters whose B is random too (fresh adapters compute nothing)."""
    model = apply_lora(load_model(path, quantize=quantize, progress=False), config, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for lora in lora_modules(model):
        lora.lora_b.set_value(jnp.asarray(rng.standard_normal(lora.lora_b.shape) * 0.05, lora.lora_b.dtype))
    return model


@pytest.mark.parametrize("quantize", [None, "int4"], ids=["lora", "qlora"])
def test_unrolled_adapted_model_equals_stacked_and_merged(hf_checkpoint, quantize):
    """`unstack_layers` of an adapted model keeps its adapters (and quantized kernels): the same
    logits as the stacked model; greedy generation with the adapters unmerged (a GRPO rollout's
    policy) gives the merged model's tokens, and the merged model's logits."""
    _, path = hf_checkpoint(seed=5, tie_word_embeddings=False, **SMALL)
    stacked = _adapted(path, quantize)
    reference = np.asarray(stacked(IDS))
    assert np.abs(reference - np.asarray(load_model(path, quantize=quantize, progress=False)(IDS))).max() > 1e-3

    unrolled = unstack_layers(_adapted(path, quantize))
    assert isinstance(unrolled.model.layers, nnx.List) and unrolled.quantization == stacked.quantization
    assert len(lora_modules(unrolled)) == len(CONFIG.targets) * unrolled.config.num_hidden_layers
    for _, linear in decoder_linears(unrolled):  # one layer's adapter each
        if linear.lora is not None:
            assert linear.lora.lora_a.shape == (*linear.layout.in_shape, CONFIG.rank)
    out_major = {linear.out_major for _, linear in decoder_linears(unrolled)}
    assert out_major == ({False} if quantize else {True})  # CPU: float kernels out-major beside their adapters
    np.testing.assert_allclose(np.asarray(unrolled(IDS)), reference, atol=1e-5)

    merged = merge_lora(_adapted(path, quantize))
    assert merged.quantization is None and not lora_modules(merged)
    np.testing.assert_allclose(np.asarray(merged(IDS)), reference, atol=1e-4)
    tokens = generate_ids(unrolled, PROMPTS, max_new_tokens=10, temperature=0).token_ids
    assert tokens == generate_ids(merged, PROMPTS, max_new_tokens=10, temperature=0).token_ids

    # Merging the unrolled model (out-major float kernels on CPU) folds the same deltas.
    merged_unrolled = merge_lora(unrolled)
    np.testing.assert_allclose(np.asarray(merged_unrolled(IDS)), np.asarray(merged(IDS)), atol=1e-4)


def test_adapters_on_unrolled_layers_equal_stacked_ones(hf_checkpoint):
    """`apply_lora` draws each target's A for all layers at once: an unrolled model gets the adapters
    the stacked model gets (layer by layer) for the same seed."""
    _, path = hf_checkpoint(**SMALL)
    stacked = apply_lora(load_model(path, progress=False), CONFIG, seed=3)
    unrolled = apply_lora(load_model(path, scan_layers=False, progress=False), CONFIG, seed=3)
    by_target = {name: lora for name, lora in zip(CONFIG.targets, lora_modules(stacked))}
    layers = unrolled.model.layers
    for i, layer in enumerate(layers):
        for name in CONFIG.targets:
            part = "self_attn" if name in ("q_proj", "v_proj", "o_proj") else "mlp"
            lora = getattr(getattr(layer, part), name).lora
            np.testing.assert_array_equal(np.asarray(lora.lora_a[...]), np.asarray(by_target[name].lora_a[...][i]))


def test_linear_and_model_attributes_are_declared_not_bolted_on(hf_checkpoint):
    """Quantizing, adapting, merging and loading change attribute values, never the set of
    attributes: every part of `Linear` and `Qwen2ForCausalLM` is declared in `__init__`."""
    _, path = hf_checkpoint(**SMALL)
    model = load_model(path, progress=False)
    linear = model.model.layers.self_attn.q_proj
    linear_attrs, model_attrs = set(vars(linear)), set(vars(model))
    assert {"kernel", "bias", "lora", "out_major", "cpu_kernels"} <= linear_attrs
    assert {"generation_config", "cpu_kernels"} <= model_attrs and model.generation_config is None
    quantize_model(model, "int8")
    assert isinstance(linear.kernel, QuantizedKernel) and model.quantization is not None
    apply_lora(model, CONFIG)
    assert isinstance(linear.lora, LoRA)
    set_lora_deterministic(model, True)
    merge_lora(model)
    assert linear.lora is None and model.quantization is None
    model.generation_config = GenerationConfig(temperature=0.7)  # what `qwen_jax.load` sets
    assert set(vars(linear)) == linear_attrs and set(vars(model)) == model_attrs


def test_adapted_model_runs_inside_jit_from_its_state(hf_checkpoint):
    """The adapter is ordinary model state: split/merge round-trips it, and a jitted function of the
    state computes what the eager model computes."""
    _, path = hf_checkpoint(**SMALL)
    model = _adapted(path)
    graphdef, state = nnx.split(model)
    assert any("lora_a" in map(str, path) for path, _ in nnx.to_flat_state(state))
    logits = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))(state, IDS)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(IDS)), atol=1e-6)


@pytest.mark.parametrize("quantize", [None, "int4"], ids=["lora", "qlora"])
def test_adapters_disabled_computes_the_base_model(hf_checkpoint, quantize):
    """Within `adapters_disabled` (eagerly or inside a traced function, as a DPO reference forward)
    the adapted model computes its base model's logits; after it, the adapted ones again."""
    _, path = hf_checkpoint(**SMALL)
    base = np.asarray(load_model(path, quantize=quantize, progress=False)(IDS))
    model = _adapted(path, quantize=quantize)
    adapted = np.asarray(model(IDS))
    assert np.abs(adapted - base).max() > 1e-3
    with adapters_disabled(model):
        np.testing.assert_allclose(np.asarray(model(IDS)), base, atol=1e-6)
    np.testing.assert_allclose(np.asarray(model(IDS)), adapted, atol=1e-6)
    graphdef, state = nnx.split(model)

    def both(state, ids):
        model = nnx.merge(graphdef, state)
        with adapters_disabled(model):
            reference = model(ids)
        return model(ids), reference

    policy, reference = jax.jit(both)(state, IDS)
    np.testing.assert_allclose(np.asarray(reference), base, atol=1e-6)
    np.testing.assert_allclose(np.asarray(policy), adapted, atol=1e-6)


def test_adapter_gradients_equal_torch_lora(hf_checkpoint):
    """The gradients of a loss with respect to every adapter weight (all seven targets, stacked
    layers as the train step runs them) equal those of the same adapters on the HF torch model,
    computed as PEFT computes LoRA (`base(x) + scale * B(A(x))`): the adapter's hand-written
    backward (`qwen_jax.model.linear._low_rank_product`) is checked against torch autograd."""
    import torch

    config = LoRAConfig(rank=4, alpha=8.0)
    hf, path = hf_checkpoint(seed=3, tie_word_embeddings=False, **SMALL)
    model = _adapted(path, seed=1, config=config)
    ids = np.concatenate([IDS, IDS[:, ::-1]], axis=0)
    graphdef, params, rest = nnx.split(model, LoRAParam, ...)

    def loss(params):
        logits = nnx.merge(graphdef, params, rest)(ids[:, :-1]).astype(jnp.float32)
        targets = ids[:, 1:]
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - picked)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    grads = nnx.merge(graphdef, grads, rest)  # the gradients in the model's structure

    class TorchLoRA(torch.nn.Module):
        def __init__(self, base, a, b):
            super().__init__()
            self.base, self.a, self.b = base, torch.nn.Parameter(a), torch.nn.Parameter(b)

        def forward(self, x):
            return self.base(x) + config.scale * (x @ self.a.T) @ self.b.T

    adapters = []
    for name, linear in target_linears(model):
        grad_linear = dict(target_linears(grads))[name]
        for layer in range(hf.config.num_hidden_layers):
            a = np.asarray(linear.lora.lora_a[...][layer]).reshape(-1, config.rank)  # [in, R]
            b = np.asarray(linear.lora.lora_b[...][layer]).reshape(config.rank, -1)  # [R, out]
            parent = hf.model.layers[layer]
            for attr in TARGET_PATHS[name][:-1]:
                parent = getattr(parent, attr)
            wrapped = TorchLoRA(getattr(parent, name), torch.tensor(a.T.copy()), torch.tensor(b.T.copy()))
            setattr(parent, name, wrapped)
            expected_a = np.asarray(grad_linear.lora.lora_a[...][layer]).reshape(-1, config.rank)
            expected_b = np.asarray(grad_linear.lora.lora_b[...][layer]).reshape(config.rank, -1)
            adapters.append((f"{name}[{layer}]", wrapped, expected_a, expected_b))
    for p in hf.parameters():
        p.requires_grad_(False)
    for _, wrapped, _, _ in adapters:
        wrapped.a.requires_grad_(True)
        wrapped.b.requires_grad_(True)
    torch_ids = torch.tensor(ids, dtype=torch.long)
    logits = hf(input_ids=torch_ids[:, :-1]).logits.float()
    torch_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch_ids[:, 1:].reshape(-1), reduction="sum"
    )
    torch_loss.backward()
    np.testing.assert_allclose(float(value), torch_loss.item(), rtol=1e-5)
    for label, wrapped, grad_a, grad_b in adapters:
        scale = max(np.abs(grad_a).max(), np.abs(grad_b).max())
        assert scale > 1e-3, label  # a gradient that is there to compare
        np.testing.assert_allclose(grad_a, wrapped.a.grad.numpy().T, atol=1e-5 * scale, err_msg=label)
        np.testing.assert_allclose(grad_b, wrapped.b.grad.numpy().T, atol=1e-5 * scale, err_msg=label)
