"""Attention backends: one entry point, `attend`, for every way the model attends.

Shapes (einsum letters as in `qwen_jax.model`): queries `q[B, T, N, H]`; keys and values
`k, v[B, S, K, H]`, or the stacked KV cache `[L, B, S, K, H]` together with `layer` (a cached
call reads its layer's blocks straight from the cache, never copying the whole layer). Query head
n reads key/value head `n // (N // K)` (GQA; MQA and MHA are the cases K = 1 and K = N).

Which keys a query sees is described by an `AttentionMask` of slots, never by a `[T, S]` array
(see its docstring): causal, per-row lengths of a KV cache, a sliding window, segment ids of
packed sequences or padding.

Backends (`BACKENDS`):

- `xla`: the reference: one float32 score tensor `[B, K, G, T, S]` and a dense mask. Memory and
  time grow with T * S; a cached call reads every slot of the cache. Short sequences only.
- `chunked`: pure JAX flash attention, runs everywhere. Query blocks x key blocks with an online
  softmax (float32 running max, sum and accumulator); each KV head's G query heads are folded into
  the query rows (one matrix product per KV head); only blocks on the causal diagonal, the window
  edge or with segment ids are masked, blocks above the diagonal, past a row's length or outside
  the window are never visited. A decode step therefore reads only the filled part of the cache.
  Memory O(T * block); gradients by a custom VJP that recomputes each block (FlashAttention-2).
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` (NVIDIA GPU, bfloat16/float16,
  head_dim a multiple of 8). Uncached calls use cuDNN's causal mask and window; segment ids and
  cached calls (whose causal diagonal is bottom-right, not cuDNN's top-left) pass an explicit
  mask plus `key_value_seq_lengths`. See `cudnn_arguments`.
- `splash`: TPU splash attention (Pallas), one MQA kernel per KV head, vmapped over the batch,
  with segment ids and a local mask for sliding windows; sequences are padded to a multiple of 128.
  It serves uncached calls (training, full forward passes); cached calls (prefill chunks and
  decode steps) run the `chunked` kernel, which reads only the filled cache.
- `auto`: `select_backend`: splash on TPU, cudnn on GPU for bfloat16/float16, otherwise chunked,
  except xla for short sequences on CPU (below `CPU_CHUNKED_MIN_SCORES` scores, and for cached
  calls a cache of at most `BLOCK_KV` slots), where one einsum is faster than a loop.

Asking for `cudnn` or `splash` where it cannot run raises `AttentionBackendError`; nothing falls
back silently.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.config import ATTENTION_BACKENDS as BACKENDS

MASKED = -1e30  # finite: a row that sees no key gets a uniform softmax, never NaN
# float32 chunked attention keeps a row's softmax reference (`row_max`) while a key block's
# probabilities, taken against it, sum to less than this per row (no overflow is near: float32
# reaches 3.4e38); a block that exceeds it is redone against its true maximum.
LAZY_SUM_LIMIT = 1e20
# Query blocks of fewer rows (decode steps, short chunks) take the plain float32 path: for them the
# shortcuts below cost more than they save (measured: 8 rows decoding against 8K-slot caches, 12 %).
LEAN_MIN_QUERIES = 64
# Query blocks of this many rows or more that divide BLOCK_KV mask their causal diagonal in blocks of
# their own width (see `_flash_forward`).
DIAGONAL_MIN_QUERIES = 128
# Block sizes of the chunked kernel: 256 x 512 measured best on CPU, forward and backward (one 0.5B
# layer, 2 cores: 2K and 8K causal, 4K with gradients; 128-1,024 tried; see the README, Long context).
BLOCK_Q = 256
BLOCK_KV = 512
# On CPU an uncached call with fewer scores per (batch row, head) than this runs the xla einsum:
# there it costs about what chunked costs (measured on 2 cores: chunked is faster from ~64 tokens
# up, 6x at 1,024) and rounds bfloat16 probabilities exactly where HF does.
CPU_CHUNKED_MIN_SCORES = 256 * 256


class AttentionBackendError(ValueError):
    """An attention backend that cannot run here (platform, dtype or head size)."""


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("q_offset", "q_segment_ids", "kv_segment_ids"),
                   meta_fields=("window",))
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys each query sees, as slot arithmetic.

    Query t of row b sits at slot `q_offset[b] + t`, key s at slot s. The query sees the key iff
      s <= q_offset[b] + t                                  (causal: a cache row's filled slots and
                                                             this call's tokens up to the query)
      window == 0 or s > q_offset[b] + t - window           (sliding window, HF's rule)
      q_segment_ids[b, t] == kv_segment_ids[b, s]           (packed sequences / padding)
    `q_offset=None` means 0: self-attention without a cache, where queries and keys start
    together (backends use that static knowledge for their fast paths).
    """

    q_offset: jax.Array | None = None  # int32 [B]
    q_segment_ids: jax.Array | None = None  # int32 [B, T]
    kv_segment_ids: jax.Array | None = None  # int32 [B, S]
    window: int = 0

    @classmethod
    def causal(cls, segment_ids: jax.Array | None = None, window: int = 0) -> "AttentionMask":
        """Self-attention over one sequence per row; `segment_ids[B, T]` isolates packed segments
        (and padding, given its own id)."""
        return cls(q_segment_ids=segment_ids, kv_segment_ids=segment_ids, window=window)

    @classmethod
    def cached(cls, lengths: jax.Array, window: int = 0) -> "AttentionMask":
        """New tokens of a KV cache call: row b's queries start at slot `lengths[b]` (its length
        before the call)."""
        return cls(q_offset=lengths, window=window)

    @property
    def is_cached(self) -> bool:
        return self.q_offset is not None

    def with_window(self, window: int) -> "AttentionMask":
        return dataclasses.replace(self, window=int(window))

    def visible(self, q_slots: jax.Array, k_slots: jax.Array, q_segments=None, kv_segments=None) -> jax.Array:
        """bool `[B, Tq, Sk]` for query slots `[B, Tq]`, key slots `[Sk]` and the segment ids of
        those queries/keys (`[B, Tq]`, `[B, Sk]`) -- used densely (xla) and per block (chunked)."""
        seen = k_slots[None, None, :] <= q_slots[:, :, None]
        if self.window:
            seen = seen & (k_slots[None, None, :] > q_slots[:, :, None] - self.window)
        if q_segments is not None:
            seen = seen & (q_segments[:, :, None] == kv_segments[:, None, :])
        return seen

    def q_slots(self, batch: int, q_len: int, start=0) -> jax.Array:
        """int32 `[B, q_len]`: slots of queries `start .. start + q_len - 1`."""
        t = start + jnp.arange(q_len, dtype=jnp.int32)[None, :]
        return t if self.q_offset is None else self.q_offset[:, None] + t

    def dense(self, batch: int, q_len: int, kv_len: int) -> jax.Array:
        """The full bool mask `[B, T, S]` (reference and cuDNN paths only)."""
        q_slots = jnp.broadcast_to(self.q_slots(batch, q_len), (batch, q_len))
        return self.visible(q_slots, jnp.arange(kv_len, dtype=jnp.int32), self.q_segment_ids, self.kv_segment_ids)


# ----------------------------------------------------------------------------- selection
def platform_of(mesh=None) -> str:
    """'cpu', 'gpu' or 'tpu': the platform of the mesh's devices, else of the default backend."""
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def check_backend(name: str, *, dtype, head_dim: int | None, platform: str, interpret: bool = False) -> None:
    """Raise `AttentionBackendError` (one line, naming the problem) if `name` cannot run here.

    head_dim None skips the head-size check (loaders check before the config is read).
    """
    if name not in BACKENDS:
        raise AttentionBackendError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name == "cudnn":
        if platform != "gpu":
            raise AttentionBackendError(f"attention='cudnn' needs an NVIDIA GPU; this runs on {platform}")
        if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            raise AttentionBackendError(
                f"attention='cudnn' needs bfloat16 or float16 compute, not {jnp.dtype(dtype).name} "
                "(load with dtype='bfloat16', or use attention='chunked')")
        if head_dim is not None and (head_dim % 8 or head_dim > 256):
            raise AttentionBackendError(f"attention='cudnn' needs head_dim a multiple of 8 and <= 256, not {head_dim}")
    if name == "splash" and platform != "tpu" and not interpret:
        raise AttentionBackendError(f"attention='splash' needs a TPU; this runs on {platform}")


def select_backend(name: str, *, q_len: int, kv_len: int, cached: bool, dtype, head_dim: int, platform: str,
                   interpret: bool = False) -> str:
    """The backend that runs one call: `name` itself (checked), or what `auto` picks.

    auto: cached calls -> chunked (it reads only the filled cache) except on GPU with cuDNN;
    TPU -> splash; GPU with bfloat16/float16 and head_dim a multiple of 8 up to 128 -> cudnn;
    CPU -> xla when `q_len * kv_len < CPU_CHUNKED_MIN_SCORES` and, for a cached call, the cache
    has at most `BLOCK_KV` slots (xla reads every slot; chunked would read that one block anyway),
    else chunked; otherwise chunked.
    """
    check_backend(name, dtype=dtype, head_dim=head_dim, platform=platform, interpret=interpret)
    if name == "splash" and cached:
        return "chunked"  # documented: splash serves uncached calls only
    if name != "auto":
        return name
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    if platform == "tpu" and not cached:
        return "splash"
    if platform == "cpu" and q_len * kv_len < CPU_CHUNKED_MIN_SCORES and (not cached or kv_len <= BLOCK_KV):
        return "xla"  # small: the einsum is faster and compiles faster; a cache of one block costs xla no more
    return "chunked"


# ----------------------------------------------------------------------------- entry point
def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, backend: str = "xla",
           scale: float | None = None, layer=None, row_offset=0, block_q: int | None = None,
           block_kv: int | None = None, interpret: bool = False, mesh=None, rules=None) -> jax.Array:
    """Attention output `[B, T, N, H]` in q's dtype.

    backend: a concrete backend ('xla', 'chunked', 'cudnn', 'splash'); resolve 'auto' with
      `select_backend` first. `splash` with a cached mask runs `chunked` (see the module doc).
    layer: with k/v the stacked cache `[L, B, S, K, H]`, the layer to read (may be traced).
    row_offset: with `layer`, query row b reads cache row `row_offset + b` (may be traced); the
      cache may then have more rows than q (a slice of a batch cache, read in place).
    block_q, block_kv: chunked kernel block sizes (default `BLOCK_Q`, `BLOCK_KV`).
    scale: score scale (default `head_dim ** -0.5`).
    interpret: run Pallas kernels (splash) in interpret mode, for testing on CPU.
    mesh, rules: the model's mesh and sharding rules; splash runs per shard (`shard_map` over the
      batch and, when the KV heads divide, the heads). The other backends are partitioned by XLA.
    Scores and softmax are float32; probabilities are rounded to q's dtype before the product
    with v, as HF does.
    """
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if scale is None else float(scale)
    if q.shape[2] % k.shape[-2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[-2]} key/value heads")
    if layer is None and (not isinstance(row_offset, int) or row_offset or k.shape[0] != q.shape[0]):
        raise ValueError("row_offset and a cache with more rows than q need the stacked cache and `layer`")
    if backend == "xla":
        k, v = (k, v) if layer is None else (_cache_rows(k, layer, row_offset, q.shape[0]),
                                             _cache_rows(v, layer, row_offset, q.shape[0]))
        return _xla_attention(q, k, v, mask, scale)
    if backend == "cudnn":
        k, v = (k, v) if layer is None else (_cache_rows(k, layer, row_offset, q.shape[0]),
                                             _cache_rows(v, layer, row_offset, q.shape[0]))
        return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), scale=scale,
                                            implementation="cudnn", **cudnn_arguments(mask, q.shape[1], k.shape[1]))
    if backend == "splash" and not mask.is_cached:
        return _splash_sharded(q, k, v, mask, scale, interpret, mesh, rules)
    if backend not in ("chunked", "splash"):
        raise ValueError(f"attend() takes a concrete backend, got {backend!r} (resolve 'auto' with select_backend)")
    blocks = (min(block_q or BLOCK_Q, q.shape[1]), min(block_kv or BLOCK_KV, k.shape[-3]))
    if layer is None:
        return _flash(q, k, v, mask, scale, blocks)
    out, _ = _flash_forward(q, k, v, layer, mask, scale, blocks, row_offset)
    return out


def _cache_rows(cache, layer, row_offset, rows: int):
    """Rows `row_offset .. row_offset + rows - 1` of one layer of a stacked cache `[L, B, S, K, H]`."""
    if isinstance(row_offset, int) and row_offset == 0 and rows == cache.shape[1]:
        return cache[layer]
    start = (layer, row_offset, 0, 0, 0)
    return jax.lax.dynamic_slice(cache, start, (1, rows, *cache.shape[2:]))[0]


# ----------------------------------------------------------------------------- xla (reference)
def _xla_attention(q, k, v, mask: AttentionMask, scale: float) -> jax.Array:
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    q = jnp.transpose(q.reshape(B, T, K, N // K, H), (0, 2, 3, 1, 4))  # [B, K, G, T, H]
    scores = _qk(q, k) * scale
    scores = jnp.where(mask.dense(B, T, S)[:, None, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.transpose(_pv(probs, v), (0, 3, 1, 2, 4)).reshape(B, T, N, H)


def _decode_by_sums(batch: int, queries: int) -> bool:
    """Whether `_qk` / `_pv` multiply and sum instead of calling a batched matrix product.

    For one query per row (decode) and several rows on CPU: the batched product over (row, KV head)
    needs each layer's cached keys and values copied head-major first, and those copies cost more
    than the products. Summing broadcast products reads the cache in place. Measured on 2 cores,
    24 layers of the 0.5B's attention (2 KV heads x 7 queries, head_dim 64), float32: 8 rows x 512
    cached slots 54 -> 22.5 ms, 8 x 2,048 153 -> 71 ms, 4 x 8,192 (8 layers) 121 -> 48 ms, 2 x 512
    4.6 -> 3.5 ms; one row is faster as a product (3.4 against 6.3 ms), so it stays one.
    """
    return queries == 1 and batch >= 2 and jax.default_backend() == "cpu"


def _qk(q, k) -> jax.Array:
    """Float32 scores `[B, K, G, Q, S]` (unscaled) of queries `[B, K, G, Q, H]` against keys `[B, S, K, H]`.

    Products of the operands' own precision, summed in float32 (what a float32-accumulating matrix
    product of the same operands computes).
    """
    B, K, G, Q, H = q.shape
    if not _decode_by_sums(B, Q):
        return jnp.einsum("BKGQH,BSKH->BKGQS", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
    qf = q[:, :, :, 0].astype(jnp.float32)  # [B, K, G, H]
    kf = k.astype(q.dtype).astype(jnp.float32)
    s = jnp.sum(qf[:, None] * kf[:, :, :, None, :], axis=-1)  # [B, S, K, G]
    return jnp.transpose(s, (0, 2, 3, 1))[:, :, :, None, :]


def _pv(p, v, preferred_element_type=None) -> jax.Array:
    """`[B, K, G, Q, H]`: probabilities `[B, K, G, Q, S]` times values `[B, S, K, H]` (as
    `einsum("BKGQS,BSKH->BKGQH")`: v in p's dtype, the result in `preferred_element_type` or p's)."""
    B, K, G, Q, S = p.shape
    v = v.astype(p.dtype)
    if not _decode_by_sums(B, Q):
        return jnp.einsum("BKGQS,BSKH->BKGQH", p, v, preferred_element_type=preferred_element_type)
    pf = jnp.transpose(p[:, :, :, 0].astype(jnp.float32), (0, 3, 1, 2))  # [B, S, K, G]
    out = jnp.sum(pf[..., None] * v.astype(jnp.float32)[:, :, :, None, :], axis=1)  # [B, K, G, H]
    return out[:, :, :, None, :].astype(preferred_element_type or p.dtype)


# ----------------------------------------------------------------------------- cudnn
def cudnn_arguments(mask: AttentionMask, q_len: int, kv_len: int) -> dict:
    """Keyword arguments of `jax.nn.dot_product_attention` that express `mask` for cuDNN.

    cuDNN's causal mask is aligned top-left (query t sees keys <= t), right only when queries
    and keys start together: uncached self-attention uses `is_causal` (and `local_window_size`,
    cuDNN's window (t - window, t]) so cuDNN skips blocks above the diagonal; segment ids add a
    segment-equality mask. A cached call's queries start at `q_offset[b]`, so it passes the
    explicit slot mask `[B, 1, T, S]` and the keys in use (`key_value_seq_lengths`, which lets
    cuDNN skip the unfilled cache).
    """
    if not mask.is_cached:
        kwargs: dict = {"is_causal": True}
        if mask.window:
            kwargs["local_window_size"] = (mask.window - 1, 0)
        if mask.q_segment_ids is not None:
            same = mask.q_segment_ids[:, :, None] == mask.kv_segment_ids[:, None, :]
            kwargs["mask"] = same[:, None]
        return kwargs
    batch = mask.q_offset.shape[0]
    used = mask.q_offset + q_len  # the last query's slot + 1
    return {
        "mask": mask.dense(batch, q_len, kv_len)[:, None],
        "query_seq_lengths": jnp.full((batch,), q_len, jnp.int32),
        "key_value_seq_lengths": jnp.minimum(used, kv_len).astype(jnp.int32),
    }


# ----------------------------------------------------------------------------- splash (TPU)
SPLASH_LANES = 128


@functools.lru_cache(maxsize=32)
def _splash_kernel(length: int, group: int, window: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    if window:
        head_mask = mask_lib.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
    else:
        head_mask = mask_lib.CausalMask((length, length))
    sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                  block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                  block_kv_dq=block)
    # The kernel holds its block-mask tables as arrays: make them concrete, not tracers of
    # whichever trace first asked for the kernel (it is cached across traces).
    with jax.ensure_compile_time_eval():
        return kernel_lib.make_splash_mqa_single_device(mask_lib.MultiHeadMask([head_mask] * group),
                                                        block_sizes=sizes, interpret=interpret)


def _splash_sharded(q, k, v, mask: AttentionMask, scale: float, interpret: bool, mesh, rules) -> jax.Array:
    """Splash on a mesh: a Pallas kernel is not partitioned by XLA, so run it on each device's
    shard (batch over the rules' batch axes; heads over `kv_heads`' axis when the KV heads divide,
    which keeps every query head with its KV head)."""
    if mesh is None or mesh.size == 1:
        return _splash_attention(q, k, v, mask, scale, interpret)
    from jax.sharding import PartitionSpec

    from qwen_jax.sharding import DEFAULT_RULES, logical_to_spec

    rules = rules or DEFAULT_RULES
    batch_axes, _, kv_axes, _ = logical_to_spec(("batch", None, "kv_heads", None), k.shape, mesh, rules)
    q_spec = PartitionSpec(batch_axes, None, kv_axes, None)
    k_spec = PartitionSpec(batch_axes, None, kv_axes, None)
    segment_ids = mask.q_segment_ids
    in_specs = (q_spec, k_spec, k_spec, None if segment_ids is None else PartitionSpec(batch_axes, None))

    def local(q, k, v, segment_ids):
        local_mask = AttentionMask.causal(segment_ids, window=mask.window)
        return _splash_attention(q, k, v, local_mask, scale, interpret)

    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=q_spec, check_vma=False)(q, k, v, segment_ids)


def _splash_attention(q, k, v, mask: AttentionMask, scale: float, interpret: bool) -> jax.Array:
    """Uncached self-attention with splash: one MQA kernel per KV head, vmapped over batch and heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib

    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    length = -(-T // SPLASH_LANES) * SPLASH_LANES  # splash blocks are multiples of 128 that divide T
    block = next(b for b in (512, 256, 128) if length % b == 0)
    pad = ((0, 0), (0, length - T), (0, 0), (0, 0))
    # Splash takes no scale: fold it into q. Layout [B, K, G, T, H] and [B, K, T, H].
    qh = jnp.pad(q * jnp.asarray(scale, q.dtype), pad).reshape(B, length, K, G, H).transpose(0, 2, 3, 1, 4)
    kh = jnp.pad(k.astype(q.dtype), pad).transpose(0, 2, 1, 3)
    vh = jnp.pad(v.astype(q.dtype), pad).transpose(0, 2, 1, 3)
    kernel = _splash_kernel(length, G, mask.window, block, interpret)
    if mask.q_segment_ids is None:
        per_head = jax.vmap(kernel, in_axes=(0, 0, 0))
        out = jax.vmap(per_head)(qh, kh, vh)
    else:
        # Padding queries get segment -1 and see only padding keys (every row must see some key).
        segments = jnp.pad(mask.q_segment_ids.astype(jnp.int32), ((0, 0), (0, length - T)), constant_values=-1)

        def one_row(q_row, k_row, v_row, seg):
            ids = kernel_lib.SegmentIds(q=seg, kv=seg)
            return jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=ids))(q_row, k_row, v_row)

        out = jax.vmap(one_row)(qh, kh, vh, segments)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, length, N, H)[:, :T].astype(q.dtype)


# ----------------------------------------------------------------------------- chunked (flash)
def _ceil_div(a, b):
    return -(-a // b)


def _block_ranges(mask: AttentionMask, first_q, last_q, bk: int, num_kv_blocks: int, kv_len: int):
    """Key blocks to visit for one query block, in block units: masked [lo, clean_lo),
    clean [clean_lo, clean_hi) (every query of every row sees every key: no mask), masked
    [clean_hi, hi). first_q/last_q: int32 [B] slots of the block's first and last real query;
    blocks past the last one's slot (a cache row's unfilled part) are never visited."""
    hi = jnp.clip(_ceil_div(jnp.max(jnp.minimum(last_q, kv_len - 1)) + 1, bk), 0, num_kv_blocks)
    lo = jnp.zeros((), jnp.int32)
    clean_lo = jnp.zeros((), jnp.int32)
    if mask.window:
        lo = jnp.maximum(jnp.min(first_q) - mask.window + 1, 0) // bk
        clean_lo = _ceil_div(jnp.maximum(jnp.max(last_q) - mask.window + 1, 0), bk)
    # Keys up to every row's first query are seen by all; a clamped tail block never is clean.
    clean_hi = jnp.minimum((jnp.min(first_q) + 1) // bk, kv_len // bk)
    if mask.q_segment_ids is not None:
        clean_hi = clean_lo
    clean_lo = jnp.clip(clean_lo, lo, hi)
    clean_hi = jnp.clip(clean_hi, clean_lo, hi)
    return lo.astype(jnp.int32), clean_lo.astype(jnp.int32), clean_hi.astype(jnp.int32), hi.astype(jnp.int32)


def _kv_block(k, v, layer, i, bk: int, row_offset=0, rows=None):
    """Keys/values of block i `[rows, bk, K, H]` (cache rows from `row_offset`) and their slots; the
    start is clamped so the last block of a length no block size divides re-reads some keys
    (masked by `_fresh`)."""
    start = jnp.minimum(i * bk, k.shape[2] - bk)
    kb, vb = _kv_slice(k, v, layer, start, bk, row_offset, rows)
    return kb, vb, start + jnp.arange(bk, dtype=jnp.int32)


def _kv_slice(k, v, layer, start, size: int, row_offset=0, rows=None):
    """Keys/values of slots `start .. start + size - 1` `[rows, size, K, H]`, cache rows from `row_offset`."""
    index = (layer, row_offset, start, 0, 0)
    shape = (1, k.shape[1] if rows is None else rows, size, k.shape[3], k.shape[4])
    return jax.lax.dynamic_slice(k, index, shape)[0], jax.lax.dynamic_slice(v, index, shape)[0]


def _block_visible(mask: AttentionMask, q_slots, q_segments, k_slots, i, bk: int):
    kv_segments = None
    if mask.kv_segment_ids is not None:
        kv_segments = jax.lax.dynamic_slice_in_dim(mask.kv_segment_ids, k_slots[0], k_slots.shape[0], axis=1)
    fresh = k_slots >= i * bk  # keys a clamped tail block re-reads were counted by the block before
    return mask.visible(q_slots, k_slots, q_segments, kv_segments) & fresh[None, None, :]


def _scores(qb, kb, scale):
    return _qk(qb, kb) * scale


def _flash_forward(q, k, v, layer, mask: AttentionMask, scale: float, blocks: tuple[int, int], row_offset=0):
    """Forward of the chunked kernel: (out `[B, T, N, H]`, lse `[nq, B, K, G, bq]` float32).

    k/v: `[L, B', S, K, H]` (a plain `[B, S, K, H]` is passed as `k[None]` with layer 0); query row
    b reads row `row_offset + b`.
    """
    if k.ndim == 4:
        k, v, layer = k[None], v[None], 0
    B, T, N, H = q.shape
    S, K = k.shape[2], k.shape[3]
    G = N // K
    bq, bk = blocks
    # Masked blocks (the causal diagonal, window edges, ragged rows) are `bm` keys wide, clean ones
    # `bk`: with query blocks of `DIAGONAL_MIN_QUERIES` rows or more that divide bk, a query block's
    # diagonal is bq keys wide, not bk, so less of the block above the diagonal is computed and
    # thrown away (one 0.5B layer, 8K causal, 2 CPU cores, 256 x 512 blocks: 856 ms without, 816-839
    # ms with, in separate runs).
    bm = bq if DIAGONAL_MIN_QUERIES <= bq < bk and bk % bq == 0 else bk
    nq, nm = _ceil_div(T, bq), _ceil_div(S, bm)
    q_blocks, segment_blocks = _query_blocks(q, mask, nq * bq, bq, K)

    # float32 (the CPU default) query blocks of `LEAN_MIN_QUERIES` rows or more take two shortcuts
    # (measured on 2 CPU cores, one 0.5B layer, 8K-token causal attention):
    # - the scale is folded into each query block (one pass over it, not one over every score block);
    # - lazy rescaling: after a row's first block, probabilities are taken against the row's
    #   reference maximum without computing the block's maximum (a pass over the scores); a block
    #   whose probabilities sum past `LAZY_SUM_LIMIT` in some row (a score far above the reference,
    #   or an overflow) is redone against its true maximum. The softmax is the same for any
    #   reference (it cancels); only overflow matters, and that is what the check catches.
    # Lower precisions keep HF's order: scores scaled in float32, probabilities rounded to q's
    # dtype before the product, sums of the unrounded probabilities, a maximum per block.
    lean = q.dtype == jnp.float32 and bq >= LEAN_MIN_QUERIES

    def one_query_block(args):
        j, qb, q_segments = args
        q_slots = mask.q_slots(B, bq, j * bq)
        first_q = q_slots[:, 0]
        last_q = q_slots[:, 0] + jnp.minimum(bq, T - j * bq) - 1
        lo, clean_lo, clean_hi, hi = _block_ranges(mask, first_q, last_q, bm, nm, S)
        q_scaled = qb * scale if lean else None

        def exact(s, vb, acc, row_max, row_sum):
            new_max = jnp.maximum(row_max, jnp.max(s, axis=-1))
            correction = jnp.exp(row_max - new_max)
            p = jnp.exp(s - new_max[..., None])
            row_sum = row_sum * correction + jnp.sum(p, axis=-1)
            pv = _pv(p.astype(qb.dtype), vb, preferred_element_type=jnp.float32)
            return acc * correction[..., None] + pv, new_max, row_sum

        def update(s, vb, carry):
            acc, row_max, row_sum = carry
            if not lean:
                return exact(s, vb, acc, row_max, row_sum)

            def lazy():
                p = jnp.exp(s - row_max[..., None])
                p_sum = jnp.sum(p, axis=-1)
                safe = jnp.all(p_sum < LAZY_SUM_LIMIT)  # False for inf and NaN too
                return jax.lax.cond(
                    safe, lambda: (acc + jnp.einsum("BKGQS,BSKH->BKGQH", p, vb.astype(jnp.float32)),
                                   row_max, row_sum + p_sum),
                    lambda: exact(s, vb, acc, row_max, row_sum))

            started = jnp.all(row_max > MASKED / 2)  # every row has a reference from a visible key
            return jax.lax.cond(started, lazy, lambda: exact(s, vb, acc, row_max, row_sum))

        def scores(kb):
            if lean:
                return jnp.einsum("BKGQH,BSKH->BKGQS", q_scaled, kb.astype(jnp.float32))
            return _scores(qb, kb, scale)

        def masked_step(i, carry):  # block i of bm keys, masked
            kb, vb, k_slots = _kv_block(k, v, layer, i, bm, row_offset, B)
            seen = _block_visible(mask, jnp.broadcast_to(q_slots, (B, bq)), q_segments, k_slots, i, bm)
            return update(jnp.where(seen[:, None, None], scores(kb), MASKED), vb, carry)

        def clean_block(start, size, carry):  # `size` keys from slot `start`, all visible to every query
            kb, vb = _kv_slice(k, v, layer, start, size, row_offset, B)
            return update(scores(kb), vb, carry)

        carry = (jnp.zeros((B, K, G, bq, H), jnp.float32), jnp.full((B, K, G, bq), MASKED, jnp.float32),
                 jnp.zeros((B, K, G, bq), jnp.float32))
        carry = jax.lax.fori_loop(lo, clean_lo, masked_step, carry)
        # The clean range [clean_lo * bm, clean_hi * bm): whole bk blocks, then bm blocks for the rest.
        whole = (clean_hi - clean_lo) * bm // bk
        carry = jax.lax.fori_loop(0, whole, lambda t, c: clean_block(clean_lo * bm + t * bk, bk, c), carry)
        if bm != bk:
            carry = jax.lax.fori_loop(clean_lo + whole * (bk // bm), clean_hi,
                                      lambda i, c: clean_block(i * bm, bm, c), carry)
        acc, row_max, row_sum = jax.lax.fori_loop(clean_hi, hi, masked_step, carry)
        row_sum = jnp.maximum(row_sum, jnp.finfo(jnp.float32).tiny)
        return (acc / row_sum[..., None]).astype(q.dtype), row_max + jnp.log(row_sum)

    xs = (jnp.arange(nq, dtype=jnp.int32), q_blocks, segment_blocks)
    if nq == 1:
        out, lse = jax.tree.map(lambda a: a[None], one_query_block(jax.tree.map(lambda a: a[0], xs)))
    else:
        out, lse = jax.lax.map(one_query_block, xs)
    # [nq, B, K, G, bq, H] -> [B, T, N, H]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * bq, N, H)[:, :T]
    return out, lse


def _query_blocks(x, mask: AttentionMask, padded: int, bq: int, K: int):
    """x `[B, T, N, H]` -> `[nq, B, K, G, bq, H]`, and the query segment ids as `[nq, B, bq]` (or None)."""
    B, T, N, H = x.shape
    nq = padded // bq
    x = jnp.pad(x, ((0, 0), (0, padded - T), (0, 0), (0, 0)))
    blocks = x.reshape(B, nq, bq, K, N // K, H).transpose(1, 0, 3, 4, 2, 5)
    segments = None
    if mask.q_segment_ids is not None:
        seg = jnp.pad(mask.q_segment_ids, ((0, 0), (0, padded - T)), constant_values=-1)
        segments = seg.reshape(B, nq, bq).transpose(1, 0, 2)
    return blocks, segments


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, mask: AttentionMask, scale: float, blocks: tuple[int, int]):
    """Uncached chunked attention with a memory-lean gradient (k, v: `[B, S, K, H]`)."""
    return _flash_forward(q, k, v, 0, mask, scale, blocks)[0]


def _flash_fwd(q, k, v, mask, scale, blocks):
    out, lse = _flash_forward(q, k, v, 0, mask, scale, blocks)
    return out, (q, k, v, mask, out, lse)


def _flash_bwd(scale, blocks, residuals, d_out):
    """FlashAttention-2 backward: per query block, recompute each visited block's probabilities
    from the saved log-sum-exp; dq accumulates per query block, dk/dv in float32 `[B, S, K, H]`."""
    q, k, v, mask, out, lse = residuals
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    bq, bk = blocks
    nq, nk = _ceil_div(T, bq), _ceil_div(S, bk)
    q_blocks, segment_blocks = _query_blocks(q, mask, nq * bq, bq, K)
    dout_blocks, _ = _query_blocks(d_out, mask, nq * bq, bq, K)
    out_blocks, _ = _query_blocks(out, mask, nq * bq, bq, K)
    # D = rowsum(dO * O): the softmax-gradient correction of every query row.
    delta = jnp.sum(dout_blocks.astype(jnp.float32) * out_blocks.astype(jnp.float32), axis=-1)
    k5, v5 = k[None], v[None]

    def one_query_block(dkv, xs):
        j, qb, dob, lse_j, delta_j, q_segments = xs
        q_slots = jnp.broadcast_to(mask.q_slots(B, bq, j * bq), (B, bq))
        lo, clean_lo, clean_hi, hi = _block_ranges(mask, q_slots[:, 0], q_slots[:, 0] + jnp.minimum(bq, T - j * bq) - 1,
                                                   bk, nk, S)

        def step(masked):
            def body(i, carry):
                dq, dk, dv = carry
                kb, vb, k_slots = _kv_block(k5, v5, 0, i, bk)
                s = _scores(qb, kb, scale)
                if masked:
                    seen = _block_visible(mask, q_slots, q_segments, k_slots, i, bk)
                    s = jnp.where(seen[:, None, None], s, MASKED)
                p = jnp.exp(s - lse_j[..., None])
                dp = jnp.einsum("BKGQH,BSKH->BKGQS", dob, vb.astype(dob.dtype), preferred_element_type=jnp.float32)
                ds = p * (dp - delta_j[..., None]) * scale
                dq = dq + jnp.einsum("BKGQS,BSKH->BKGQH", ds, kb.astype(jnp.float32))
                start = k_slots[0]
                dv_block = jnp.einsum("BKGQS,BKGQH->BSKH", p, dob.astype(jnp.float32))
                dk_block = jnp.einsum("BKGQS,BKGQH->BSKH", ds, qb.astype(jnp.float32))
                dk = jax.lax.dynamic_update_slice_in_dim(
                    dk, jax.lax.dynamic_slice_in_dim(dk, start, bk, axis=1) + dk_block, start, axis=1)
                dv = jax.lax.dynamic_update_slice_in_dim(
                    dv, jax.lax.dynamic_slice_in_dim(dv, start, bk, axis=1) + dv_block, start, axis=1)
                return dq, dk, dv
            return body

        carry = (jnp.zeros(qb.shape, jnp.float32), *dkv)
        carry = jax.lax.fori_loop(lo, clean_lo, step(True), carry)
        carry = jax.lax.fori_loop(clean_lo, clean_hi, step(False), carry)
        dq, dk, dv = jax.lax.fori_loop(clean_hi, hi, step(True), carry)
        return (dk, dv), dq

    dkv = (jnp.zeros((B, S, K, H), jnp.float32), jnp.zeros((B, S, K, H), jnp.float32))
    xs = (jnp.arange(nq, dtype=jnp.int32), q_blocks, dout_blocks, lse, delta, segment_blocks)
    (dk, dv), dq = jax.lax.scan(one_query_block, dkv, xs)
    dq = dq.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * bq, N, H)[:, :T]
    mask_cotangent = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), mask)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), mask_cotangent


_flash.defvjp(_flash_fwd, _flash_bwd)
