"""Checks that need an NVIDIA GPU: the cuDNN attention backend against the xla reference, and the
model on it (prefill, cached decode, left padding) against the einsum path and HF.

Skipped where JAX has no GPU (CI has none; tests/ops/test_attention.py checks cuDNN's arguments through
jax's xla implementation there). On a GPU: `pytest tests/test_gpu.py`. benchmarks/RESULTS.md (GPU tests)
section says when and on which card this last ran.

Tolerances: cuDNN computes in bfloat16 with float32 softmax statistics; the reference is the xla
backend in float32 on the same (bf16-rounded) inputs. Outputs are O(1), so 2e-2 is a few bf16 ulps;
a wrong mask (a key seen or missed) moves the output by O(1/length) to O(1) and gradients by a
multiple of their scale, far beyond these bounds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from attention_fixtures import _qkv, _segments

from qwen_jax.generation.static import generate_ids
from qwen_jax.load import load_model
from qwen_jax.model.mixed import mixed_hidden_states
from qwen_jax.ops.attention import attend
from qwen_jax.ops.attention.mask import AttentionMask
from qwen_jax.ops.attention.selection import select_backend
from qwen_jax.sharding import platform_of

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (cuDNN attention); CI has none"
)

FWD_TOL = 2e-2
GRAD_REL_TOL = 3e-2

UNCACHED = {
    "gqa": dict(heads=4, kv_heads=2, head_dim=64),
    "mha": dict(heads=4, kv_heads=4, head_dim=64),
    "mqa_head_dim_128": dict(heads=8, kv_heads=1, head_dim=128),
    "window": dict(heads=4, kv_heads=2, head_dim=64, window=37),
    "segments": dict(heads=4, kv_heads=2, head_dim=64, segments=True),
    "window_and_segments": dict(heads=6, kv_heads=2, head_dim=64, window=9, segments=True),
}


def _f32(*xs):
    return [x.astype(jnp.float32) for x in xs]


def _forward_and_grads(backend, mask, q, k, v):
    weights = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)

    def fn(q, k, v):
        return attend(q, k, v, mask, backend=backend)

    @jax.jit
    def both(q, k, v):
        grads = jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * weights), argnums=(0, 1, 2))(q, k, v)
        return fn(q, k, v), grads

    return both(q, k, v)


@pytest.mark.parametrize("case", list(UNCACHED))
def test_cudnn_forward_and_gradients_equal_xla(case):
    """Self-attention of 200 tokens (no cuDNN tile divides it), batch 2: GQA/MHA/MQA, head_dim
    64 and 128, sliding window, packed segments with a padding tail."""
    kw = dict(UNCACHED[case])
    segments, window = kw.pop("segments", False), kw.pop("window", 0)
    q, k, v = _qkv(2, 200, 200, dtype=jnp.bfloat16, **kw)
    mask = AttentionMask.causal(_segments(2, 200) if segments else None, window=window)
    ref, ref_grads = _forward_and_grads("xla", mask, *_f32(q, k, v))
    out, grads = _forward_and_grads("cudnn", mask, q, k, v)
    assert out.dtype == jnp.bfloat16
    keep = np.ones(out.shape[:2], bool)
    if segments:  # padding queries (segment 0) attend to other padding: both backends agree there too,
        keep = np.asarray(_segments(2, 200)) > 0  # but cuDNN may treat a fully padded row as empty
    err = np.abs(np.asarray(out, np.float32) - np.asarray(ref))[keep].max()
    assert err <= FWD_TOL, err
    for got, want in zip(grads, ref_grads):
        want = np.asarray(want)
        got = np.asarray(got, np.float32)
        if segments:
            got, want = got * keep[..., None, None], want * keep[..., None, None]
        assert np.abs(got - want).max() <= GRAD_REL_TOL * np.abs(want).max(), case


@pytest.mark.parametrize("new_tokens,window", [(1, 0), (1, 64), (128, 0), (6, 11)])
def test_cudnn_reads_a_ragged_cache_like_xla(new_tokens, window):
    """Cached calls on the stacked cache `[L, B, S, K, H]` read at a traced layer: rows at lengths
    0, 31 and full, a decode step (T = 1) and prefill chunks, with and without a window."""
    q, k, v = _qkv(3, new_tokens, 300, heads=4, kv_heads=2, head_dim=64, layers=2, dtype=jnp.bfloat16)
    lengths = jnp.asarray([0, 31, 300 - new_tokens], jnp.int32)
    mask = AttentionMask.cached(lengths, window=window)

    @jax.jit
    def both(q, k, v, layer):
        ref = attend(*_f32(q, k, v), mask, backend="xla", layer=layer)
        return ref, attend(q, k, v, mask, backend="cudnn", layer=layer)

    ref, out = both(q, k, v, jnp.int32(1))
    err = np.abs(np.asarray(out, np.float32) - np.asarray(ref)).max()
    assert err <= FWD_TOL, err


def test_auto_picks_cudnn_for_bfloat16_on_this_gpu():
    pick = dict(q_len=4096, kv_len=4096, cached=False, head_dim=64, platform=platform_of())
    assert select_backend("auto", dtype=jnp.bfloat16, **pick) == "cudnn"
    assert select_backend("auto", dtype=jnp.float32, **pick) == "chunked"


def _hf_logits(model, ids, mask=None):
    with torch.no_grad():
        return (
            model(torch.tensor(ids, dtype=torch.long), attention_mask=None if mask is None else torch.tensor(mask))
            .logits.float()
            .numpy()
        )


def test_model_with_cudnn_matches_hf_and_the_einsum_path(hf_checkpoint):
    """bf16 model, head_dim 64, GQA, sliding-window layers mixed with full ones, a left-padded row:
    the cuDNN model's error against HF float32 is no worse than HF bfloat16's own (slack as in
    tests/model/test_model.py), and equal to the xla backend's within bf16 rounding."""
    hf32, path = hf_checkpoint(
        seed=1,
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        tie_word_embeddings=False,
        max_position_embeddings=1024,
        use_sliding_window=True,
        sliding_window=100,
        max_window_layers=1,
    )
    ids = np.random.RandomState(0).randint(0, 256, (2, 300)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :37] = 0
    ref32 = _hf_logits(hf32, ids, mask)
    ref16 = _hf_logits(hf32.to(torch.bfloat16), ids, mask)
    model = load_model(path, dtype=jnp.bfloat16, attention="cudnn")
    ours = np.asarray(model(ids, attention_mask=mask), np.float32)
    model.attention = "xla"
    einsum = np.asarray(model(ids, attention_mask=mask), np.float32)
    rows = [(0, slice(None)), (1, slice(37, None))]
    for row, cols in rows:
        hf_err = np.abs(ref16[row, cols] - ref32[row, cols]).max()
        our_err = np.abs(ours[row, cols] - ref32[row, cols]).max()
        assert hf_err > 0
        assert our_err <= 1.25 * hf_err + 1e-3, (row, our_err, hf_err)
        assert np.abs(ours[row, cols] - einsum[row, cols]).max() <= 2 * hf_err + 1e-3, row


@pytest.mark.parametrize("prefill_chunk", [None, 64])
def test_generation_with_cudnn_decodes_like_a_full_forward(hf_checkpoint, prefill_chunk):
    """Ragged prompts prefilled in one call (the GPU default: cuDNN's causal path into an empty
    cache) or in chunks of 64 (later chunks read the cache through a slot mask), then 24 cached
    decode steps with cuDNN: each step's logits equal a full (uncached, xla) forward over prompt +
    generated tokens within bf16 rounding, so the cache, its lengths and the mask are right."""
    _, path = hf_checkpoint(
        seed=2,
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=512,
        max_position_embeddings=1024,
    )
    model = load_model(path, dtype=jnp.bfloat16, attention="cudnn")
    rng = np.random.RandomState(1)
    prompts = [rng.randint(0, 256, n).tolist() for n in (150, 37)]
    out = generate_ids(
        model, prompts, max_new_tokens=24, temperature=0.0, return_logits=True, prefill_chunk=prefill_chunk
    )
    model.attention = "xla"
    for prompt, tokens, step_logits in zip(prompts, out.token_ids, out.logits):
        full = np.asarray(model(np.asarray([prompt + tokens[:-1]], np.int32)), np.float32)[0]
        expected = full[len(prompt) - 1 :]
        scale = np.abs(expected).max()
        assert np.abs(np.asarray(step_logits, np.float32) - expected).max() <= 0.03 * scale + 0.05


def test_mixed_step_with_cudnn_equals_a_decode_step_and_a_prefill_chunk(hf_checkpoint):
    """The serving engine's mixed step (decode rows + one row's prompt chunk, read at a row offset of
    the batch cache) with cuDNN gives the hidden states of a separate decode step and prefill chunk."""
    from qwen_jax.model.kv_cache import KVCache

    _, path = hf_checkpoint(
        seed=3,
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=512,
        max_position_embeddings=1024,
    )
    model = load_model(path, dtype=jnp.bfloat16, attention="cudnn")
    rng = np.random.RandomState(2)
    cache = KVCache.init(model.config, 4, 320, jnp.bfloat16)
    for row, length in enumerate((200, 17, 5)):
        one = KVCache.init(model.config, 1, 320, jnp.bfloat16)
        _, one = model(rng.randint(0, 256, (1, length)).astype(np.int32), cache=one)
        cache = cache.insert(one, row)
    tokens = jnp.asarray(rng.randint(0, 256, 4).astype(np.int32))
    active = jnp.asarray([True, True, False, False])
    chunk_ids = jnp.asarray(rng.randint(0, 256, (1, 64)).astype(np.int32))
    decoded, prefilled, _ = mixed_hidden_states(model, tokens, active, chunk_ids, jnp.int32(50), jnp.int32(2), cache)
    step, _ = model.hidden_states(
        tokens[:, None], cache.lengths[:, None], active[:, None].astype(jnp.int32), cache=cache
    )
    row = KVCache(cache.k[:, 2:3], cache.v[:, 2:3], cache.lengths[2:3])
    alone, _ = model.hidden_states(
        chunk_ids, row.lengths[:, None] + jnp.arange(64)[None], (jnp.arange(64) < 50)[None].astype(jnp.int32), cache=row
    )
    for got, want in (
        (np.asarray(decoded, np.float32)[:2], np.asarray(step, np.float32)[:2, 0]),
        (np.asarray(prefilled, np.float32)[:50], np.asarray(alone, np.float32)[0, :50]),
    ):
        assert np.abs(got - want).max() <= 0.03 * np.abs(want).max() + 0.05
