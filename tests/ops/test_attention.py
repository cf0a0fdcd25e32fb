"""Attention backends against the xla reference (`qwen_jax.attention`), and backend selection.

Kernel tests use small shapes and small blocks so that several query/key blocks, ragged tails,
the causal diagonal and window edges are all exercised; model-level checks live in
tests/ops/test_long_context.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_fixtures import _qkv, _segments

from qwen_jax.errors import AttentionBackendError
from qwen_jax.ops import cpu
from qwen_jax.ops.attention import attend
from qwen_jax.ops.attention.chunked import BLOCK_KV, BLOCK_Q, DIAGONAL_MIN_QUERIES, LEAN_MIN_QUERIES
from qwen_jax.ops.attention.cudnn import cudnn_arguments
from qwen_jax.ops.attention.mask import AttentionMask
from qwen_jax.ops.attention.selection import check_backend, select_backend

FWD_TOL, GRAD_TOL = 1e-5, 1e-4


def _run(backend, mask, **kw):
    def fn(q, k, v):
        return attend(q, k, v, mask, backend=backend, **kw)

    return fn


def _forward_and_grads(fn, q, k, v):
    weights = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)

    @jax.jit
    def both(q, k, v):
        out = fn(q, k, v)
        grads = jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * weights), argnums=(0, 1, 2))(q, k, v)
        return out, grads

    return both(q, k, v)


UNCACHED = {
    "gqa": dict(heads=4, kv_heads=2, head_dim=64),
    "mha": dict(heads=4, kv_heads=4, head_dim=64),
    "mqa_head_dim_128": dict(heads=4, kv_heads=1, head_dim=128),
    "segments": dict(heads=4, kv_heads=2, head_dim=64, segments=True),
    "window": dict(heads=4, kv_heads=2, head_dim=64, window=21),
    "window_and_segments": dict(heads=6, kv_heads=2, head_dim=64, window=9, segments=True),
}


# (tokens, query block, key block): lengths no block divides. Query blocks below
# `attention.LEAN_MIN_QUERIES` rows take the plain float32 path, larger ones the lean one (scale
# folded into q, lazy rescaling); "diagonal" query blocks also mask in blocks of their own width
# (narrower than the key blocks of the clean part).
SHAPES = {"plain": (45, 16, 8), "lean": (150, 64, 16), "diagonal": (300, 128, 256)}
assert SHAPES["plain"][1] < LEAN_MIN_QUERIES <= SHAPES["lean"][1]
assert DIAGONAL_MIN_QUERIES <= SHAPES["diagonal"][1] < SHAPES["diagonal"][2]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case", list(UNCACHED))
def test_chunked_forward_and_gradients_equal_xla(case, shape):
    """Diagonal, tail and window-edge blocks, both float32 paths."""
    kw = dict(UNCACHED[case])
    segments, window = kw.pop("segments", False), kw.pop("window", 0)
    length, block_q, block_kv = SHAPES[shape]
    q, k, v = _qkv(2, length, length, **kw)
    mask = AttentionMask.causal(_segments(2, length) if segments else None, window=window)
    ref, ref_grads = _forward_and_grads(_run("xla", mask), q, k, v)
    out, grads = _forward_and_grads(_run("chunked", mask, block_q=block_q, block_kv=block_kv), q, k, v)
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() <= FWD_TOL
    for got, want in zip(grads, ref_grads):
        assert np.abs(np.asarray(got) - np.asarray(want)).max() <= GRAD_TOL


@pytest.mark.parametrize("segments", [False, True])
def test_chunked_gradients_at_the_default_blocks_equal_xla(segments):
    """Training's shape: the default blocks, several query blocks against one key block (the key
    range XLA's loop-invariant code motion would compute in full for every query block), packed
    segments with a padding tail; float32 gradients within 1e-5 of the unblocked reference."""
    length = 2 * BLOCK_Q
    assert length == BLOCK_KV
    q, k, v = _qkv(2, length, length, heads=4, kv_heads=2, head_dim=64)
    mask = AttentionMask.causal(_segments(2, length) if segments else None)
    ref, ref_grads = _forward_and_grads(_run("xla", mask), q, k, v)
    out, grads = _forward_and_grads(_run("chunked", mask), q, k, v)
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() <= FWD_TOL
    for got, want in zip(grads, ref_grads):
        assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-5


def test_chunked_gradient_computes_no_product_over_every_key():
    """Causal training attention at the default blocks (two query blocks, one key block): the
    compiled forward and backward contain no product over all the keys; each query block reads
    only the keys up to its diagonal (XLA once hoisted a loop-invariant full-width block out of a
    loop that runs zero times, and the backward read the whole key block for every query block)."""
    length = 2 * BLOCK_Q
    q, k, v = _qkv(1, length, length, heads=6, kv_heads=2, head_dim=64)
    mask = AttentionMask.causal(_segments(1, length))
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(attend(*a, mask, backend="chunked")), argnums=(0, 1, 2)))
    hlo = grad.lower(q, k, v).compile().as_text()
    products = [tuple(map(int, dims.split(","))) for dims in re.findall(r"= f32\[([\d,]+)\]\{[\d,]*\} dot\(", hlo)]
    assert products and all(length not in shape for shape in products), products


@pytest.mark.parametrize(
    "new_tokens,window,block_q,block_kv,cache",
    [
        (1, 0, 4, 16, 163),
        (9, 0, 4, 16, 163),
        (9, 6, 4, 16, 163),
        (70, 0, 64, 16, 163),
        (70, 23, 64, 16, 163),
        (300, 0, 128, 256, 701),
        (300, 57, 128, 256, 701),
    ],
)
def test_chunked_reads_a_ragged_cache_like_xla(new_tokens, window, block_q, block_kv, cache):
    """Cached calls: rows at different lengths (one empty), the stacked cache read at a traced
    layer, cache lengths no block divides, a decode step (T = 1) and prefill chunks (70 tokens in
    64-query blocks: the lean float32 path; 300 tokens in 128-query blocks: also masked in blocks
    of 128 keys, with clean blocks of 256 and 128 keys)."""
    q, k, v = _qkv(3, new_tokens, cache, heads=4, kv_heads=2, head_dim=64, layers=2)
    lengths = jnp.asarray([0, 31, cache - new_tokens], jnp.int32)
    mask = AttentionMask.cached(lengths, window=window)

    @jax.jit
    def both(q, k, v, layer):
        return (
            attend(q, k, v, mask, backend="xla", layer=layer),
            attend(q, k, v, mask, backend="chunked", layer=layer, block_q=block_q, block_kv=block_kv),
        )

    ref, out = both(q, k, v, jnp.int32(1))
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() <= FWD_TOL


def test_lazy_rescaling_redoes_blocks_whose_scores_jump():
    """Scores that rise far above a row's reference maximum in later key blocks (keys scaled up
    block by block, to e^100 and more over the first block: float32 overflows at e^88) take the exact
    path for those blocks; the output and gradients still equal the einsum reference."""
    q, k, v = _qkv(1, 128, 128, heads=4, kv_heads=2, head_dim=64)
    growth = jnp.repeat(jnp.asarray([0.01, 1.0, 5.0, 12.0, 30.0, 30.0, 40.0, 40.0]), 16)  # per 16-key block
    k = k * growth[None, :, None, None]
    mask = AttentionMask.causal()
    ref, ref_grads = _forward_and_grads(_run("xla", mask), q, k, v)
    out, grads = _forward_and_grads(_run("chunked", mask, block_q=64, block_kv=16), q, k, v)
    assert np.isfinite(np.asarray(out)).all()
    scores = np.einsum("tnh,snh->nts", np.asarray(q)[0], np.repeat(np.asarray(k)[0], 2, axis=1)) / 8
    assert (scores[:, 64:, 64:].max(-1) - scores[:, 64:, :16].max(-1)).max() > 100  # past float32's range
    # Scores near 150 carry a float32 rounding of ~1e-5 (the scale is applied to q here, to the
    # scores in the reference), which exp turns into relative differences of that size.
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=GRAD_TOL * np.abs(want).max(), rtol=1e-4)


@pytest.mark.parametrize("backend", ["xla", "chunked"])
def test_cached_read_at_a_row_offset_equals_those_rows_alone(backend):
    """`row_offset`: queries for 2 rows read rows 3 and 4 of a 6-row stacked cache in place (traced
    offset and layer) and get what the same call on a cache of just those rows gives."""
    q, k, v = _qkv(6, 5, 83, heads=4, kv_heads=2, head_dim=64, layers=2)
    q = q[:2]
    lengths = jnp.asarray([40, 78], jnp.int32)
    mask = AttentionMask.cached(lengths)
    kw = dict(block_q=4, block_kv=16) if backend == "chunked" else {}

    @jax.jit
    def both(q, k, v, layer, offset):
        return (
            attend(q, k, v, mask, backend=backend, layer=layer, row_offset=offset, **kw),
            attend(q, k[:, 3:5], v[:, 3:5], mask, backend=backend, layer=layer, **kw),
        )

    out, ref = both(q, k, v, jnp.int32(1), jnp.int32(3))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    with pytest.raises(ValueError, match="row_offset"):
        attend(q, k[1], v[1], mask, backend=backend, row_offset=3)


def _numpy_cached_attention(q, k, v, lengths, window=0):
    """float64 reference for queries at the end of each row's cache: q `[B, T, N, H]`, k/v `[B, S, K, H]`."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    K = k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for t in range(T):
            pos = int(lengths[b]) + t  # this query's slot; it sees slots <= pos (and within the window)
            lo = max(0, pos - window + 1) if window else 0
            for n in range(N):
                kk, vv = k[b, lo : pos + 1, n // (N // K)], v[b, lo : pos + 1, n // (N // K)]
                s = kk @ q[b, t, n] / np.sqrt(H)
                p = np.exp(s - s.max())
                out[b, t, n] = (p / p.sum()) @ vv
    return out


@pytest.mark.parametrize("backend", ["xla", "chunked"])
@pytest.mark.parametrize("window", [0, 29])
@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_decode_rows_against_a_float64_reference(backend, window, cpu_kernels):
    """One query per row and several rows (a batch decode step): with the CPU kernels q.k and p.v
    are summed broadcast products that read the cache in place (`cpu.decode_by_sums`), without them
    batched matrix products; against an independent float64 reference, rows at different lengths,
    the stacked cache read at a traced layer and row offset. One row keeps the matrix product; same
    check."""
    assert cpu.decode_by_sums(3, 1) and not cpu.decode_by_sums(1, 1)
    assert not cpu.decode_by_sums(3, 2)
    q, k, v = _qkv(5, 1, 200, heads=6, kv_heads=2, head_dim=32, layers=2)
    kw = dict(block_kv=64) if backend == "chunked" else {}
    kw["cpu_kernels"] = cpu_kernels
    # The switch decides the formulation: summed products have no dot_general in the program.
    decode = jax.make_jaxpr(
        lambda q, k, v: attend(q, k, v, AttentionMask.cached(jnp.zeros(3, jnp.int32)), backend=backend, **kw)
    )
    assert ("dot_general" in str(decode(q[:3], k[0, :3], v[0, :3]))) != cpu_kernels
    for rows, offset in ((3, 2), (1, 4)):
        lengths = jnp.asarray([0, 57, 199][:rows] if rows == 3 else [120], jnp.int32)
        mask = AttentionMask.cached(lengths, window=window)
        out = jax.jit(
            lambda q, k, v, layer, off, mask=mask: attend(
                q, k, v, mask, backend=backend, layer=layer, row_offset=off, **kw
            )
        )(q[:rows], k, v, jnp.int32(1), jnp.int32(offset))
        ref = _numpy_cached_attention(
            q[:rows], k[1, offset : offset + rows], v[1, offset : offset + rows], np.asarray(lengths), window
        )
        assert np.abs(np.asarray(out) - ref).max() <= FWD_TOL
    # bfloat16 operands: close to the float64 reference of the same (rounded) inputs.
    lengths = jnp.asarray([3, 57, 199], jnp.int32)
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q[:3], k[0, :3], v[0, :3]))
    out = jax.jit(lambda q, k, v: attend(q, k, v, AttentionMask.cached(lengths, window=window), backend=backend, **kw))(
        qb, kb, vb
    )
    assert out.dtype == jnp.bfloat16
    ref = _numpy_cached_attention(*(np.asarray(x, np.float32) for x in (qb, kb, vb)), np.asarray(lengths), window)
    assert np.abs(np.asarray(out, np.float32) - ref).max() <= 2e-2


def test_chunked_bfloat16_close_to_xla():
    """bfloat16: probabilities are rounded at a different point (before normalisation), so the two
    differ by bf16 rounding of the output (|out| ~ 1, bf16 eps 2**-8): tolerance 2e-2."""
    q, k, v = _qkv(1, 64, 64, heads=4, kv_heads=2, head_dim=64, dtype=jnp.bfloat16)
    mask = AttentionMask.causal()
    ref = jax.jit(_run("xla", mask))(q, k, v)
    out = jax.jit(_run("chunked", mask, block_q=16, block_kv=16))(q, k, v)
    assert out.dtype == jnp.bfloat16
    assert np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32)).max() <= 2e-2


@pytest.mark.parametrize("window,segments", [(0, False), (37, True)])
def test_splash_in_interpret_mode_equals_xla(window, segments):
    """TPU splash attention, run by the Pallas interpreter on CPU: GQA, a length that needs
    padding to 128, sliding window, segment ids with padding; forward and gradients."""
    q, k, v = _qkv(2, 200, 200, heads=4, kv_heads=2, head_dim=64)
    mask = AttentionMask.causal(_segments(2, 200) if segments else None, window=window)
    ref, ref_grads = _forward_and_grads(_run("xla", mask), q, k, v)
    out, grads = _forward_and_grads(_run("splash", mask, interpret=True), q, k, v)
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() <= FWD_TOL
    for got, want in zip(grads, ref_grads):
        assert np.abs(np.asarray(got) - np.asarray(want)).max() <= GRAD_TOL


CUDNN_CASES = {
    "causal": dict(),
    "window": dict(window=7),
    "segments": dict(segments=True),
    "decode_ragged": dict(cached=True, new_tokens=1),
    "chunk_ragged_window": dict(cached=True, new_tokens=6, window=11),
}


@pytest.mark.parametrize("case", list(CUDNN_CASES))
def test_cudnn_arguments_express_the_mask(case):
    """No GPU here: the arguments prepared for cuDNN (top-left causal alignment, window,
    segment mask, cache lengths) go through jax.nn.dot_product_attention's xla implementation,
    which takes the same arguments, and must give the reference result."""
    kw = CUDNN_CASES[case]
    new_tokens = kw.get("new_tokens", 40)
    q, k, v = _qkv(2, new_tokens, 40, heads=4, kv_heads=2, head_dim=64)
    if kw.get("cached"):
        mask = AttentionMask.cached(jnp.asarray([3, 40 - new_tokens], jnp.int32), window=kw.get("window", 0))
    else:
        mask = AttentionMask.causal(_segments(2, 40) if kw.get("segments") else None, window=kw.get("window", 0))
    ref = attend(q, k, v, mask, backend="xla")
    arguments = cudnn_arguments(mask, new_tokens, 40)
    assert arguments.get("is_causal", False) == (not kw.get("cached"))  # cuDNN's own causal mask when aligned
    out = jax.nn.dot_product_attention(q, k, v, implementation="xla", **arguments)
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() <= FWD_TOL


def test_auto_selection_per_platform_and_dtype():
    def pick(platform, dtype=jnp.float32, q_len=4096, kv_len=4096, cached=False, head_dim=64):
        return select_backend(
            "auto", q_len=q_len, kv_len=kv_len, cached=cached, dtype=dtype, head_dim=head_dim, platform=platform
        )

    assert pick("cpu", q_len=64, kv_len=64) == "xla"
    assert pick("cpu") == "chunked"
    assert pick("cpu", q_len=1, kv_len=1024, cached=True) == "chunked"  # decode reads only the filled cache
    assert pick("cpu", q_len=64, kv_len=128, cached=True) == "xla"  # a short prompt in a cache of one block
    assert pick("cpu", q_len=512, kv_len=512, cached=True) == "chunked"
    assert pick("gpu", jnp.bfloat16) == "cudnn"
    assert pick("gpu", jnp.bfloat16, q_len=1, cached=True) == "cudnn"
    assert pick("gpu", jnp.float32) == "chunked"  # cuDNN flash attention has no float32
    assert pick("gpu", jnp.bfloat16, head_dim=96 + 4) == "chunked"
    assert pick("tpu", jnp.bfloat16) == "splash"
    assert pick("tpu", jnp.bfloat16, q_len=1, cached=True) == "chunked"
    for name in ("xla", "chunked"):
        assert (
            select_backend(name, q_len=8, kv_len=8, cached=False, dtype=jnp.float32, head_dim=64, platform="cpu")
            == name
        )


def test_backends_that_cannot_run_are_refused():
    def check(name, platform, dtype=jnp.bfloat16, head_dim=64):
        check_backend(name, dtype=dtype, head_dim=head_dim, platform=platform)

    with pytest.raises(AttentionBackendError, match="'cudnn' needs an NVIDIA GPU; this runs on cpu"):
        check("cudnn", "cpu")
    with pytest.raises(AttentionBackendError, match="bfloat16 or float16 compute, not float32"):
        check("cudnn", "gpu", jnp.float32)
    with pytest.raises(AttentionBackendError, match="head_dim a multiple of 8"):
        check("cudnn", "gpu", head_dim=100)
    with pytest.raises(AttentionBackendError, match="'splash' needs a TPU; this runs on gpu"):
        check("splash", "gpu")
    with pytest.raises(AttentionBackendError, match="unknown attention backend 'flash'"):
        check("flash", "cpu")
    check("cudnn", "gpu")
    check("splash", "tpu")


def test_splash_runs_per_shard_on_a_mesh():
    """A Pallas kernel is not partitioned by XLA: splash runs under shard_map, batch over data and
    heads over tensor when the KV heads divide (else replicated), equal to the reference."""
    import qwen_jax

    q, k, v = _qkv(4, 200, 200, heads=4, kv_heads=2, head_dim=64)
    mask = AttentionMask.causal(_segments(4, 200), window=37)
    ref = jax.jit(_run("xla", mask))(q, k, v)
    for sizes in (dict(data=2, fsdp=1, tensor=2), dict(data=1, fsdp=2, tensor=4)):
        mesh = qwen_jax.make_mesh(**sizes, devices=jax.devices()[: sizes["data"] * sizes["fsdp"] * sizes["tensor"]])
        out = jax.jit(_run("splash", mask, interpret=True, mesh=mesh))(q, k, v)
        assert np.abs(np.asarray(out) - np.asarray(ref)).max() <= FWD_TOL, sizes
