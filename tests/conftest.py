"""Shared fixtures: tiny random HF checkpoints built with transformers' own save_pretrained.

XLA_FLAGS gives 8 fake CPU devices for sharding tests; it must be set before jax is imported.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# CLI calls in tests must not write to the user's compilation cache; tests that want one say so.
os.environ.setdefault("QWEN_JAX_COMPILE_CACHE", "off")

import pytest  # noqa: E402

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)


def build_hf_model(seed: int = 0, dtype: str = "float32", **overrides):
    """A random transformers Qwen2ForCausalLM (eval mode) with TINY overridden by `overrides`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kwargs = {**TINY, **overrides}
    torch.manual_seed(seed)
    config = Qwen2Config(**kwargs)
    model = Qwen2ForCausalLM(config).eval()
    # HF initialises biases and norms to constants; randomise them so a mapping mistake shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(getattr(torch, dtype))


def save_hf_checkpoint(model, directory, max_shard_size=None) -> str:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return str(directory)


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: hf_checkpoint(**overrides) -> (torch model, checkpoint dir)."""
    counter = iter(range(1000))

    def make(seed=0, dtype="float32", max_shard_size=None, **overrides):
        model = build_hf_model(seed=seed, dtype=dtype, **overrides)
        path = save_hf_checkpoint(model, tmp_path / f"ckpt{next(counter)}", max_shard_size)
        return model, path

    return make
