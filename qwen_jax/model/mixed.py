"""The continuous-batching engine's fused step: decode rows and prompt chunks of several rows in one
model call (`mixed_hidden_states`), each group attending to its own cache rows (`MixedContext`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qwen_jax.model.causal_lm import Qwen2ForCausalLM
from qwen_jax.model.kv_cache import KVCache, write_rows
from qwen_jax.model.modules import AttentionContext
from qwen_jax.model.rope import rope_tables
from qwen_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class MixedContext:
    """Attention of a mixed step (`qwen_jax.model.mixed.mixed_hidden_states`): the call's tokens are
    `width` decode tokens (one per cache row 0..width-1) followed by `len(chunks)` prompt chunks of
    `chunk` tokens each, chunk i of cache row `rows[i]`; each group writes its keys into its rows
    and attends to its own rows of the cache."""

    decode: AttentionContext
    chunks: tuple[AttentionContext, ...]
    width: int
    chunk: int
    rows: jax.Array  # int32 [chunks]: each chunk's cache row (out of range: a padding chunk, written nowhere)

    def write_and_attend(self, q, k, v, kv, layer, use_window):
        W, N, C = self.width, len(self.chunks), self.chunk
        (q_dec, q_chunk), (k_dec, k_chunk), (v_dec, v_chunk) = (
            (x[0, :W, None], x[0, W:].reshape(N, C, *x.shape[2:])) for x in (q, k, v)
        )  # [W, 1, heads, H] and [N, C, heads, H]
        # Decode rows first: an idle row (a chunk's own row among them) writes a slot the chunk then overwrites.
        kv = tuple(write_rows(cache, layer, new, self.decode.cache_starts) for cache, new in zip(kv, (k_dec, v_dec)))
        for i, context in enumerate(self.chunks):
            kv = tuple(
                write_rows(cache, layer, new[i : i + 1], context.cache_starts, self.rows[i])
                for cache, new in zip(kv, (k_chunk, v_chunk))
            )
        out_dec = self.decode.attend(q_dec, *kv, layer, use_window)
        # One attention call per chunk, each reading its own cache row (the rows need not be adjacent).
        out_chunks = [
            context.attend(q_chunk[i : i + 1], *kv, layer, use_window, row_offset=self.rows[i])
            for i, context in enumerate(self.chunks)
        ]
        out_chunk = jnp.concatenate(out_chunks, axis=1) if N > 1 else out_chunks[0]  # [1, N * C, heads, H]
        return jnp.concatenate([out_dec[:, 0][None], out_chunk], axis=1), kv


def mixed_hidden_states(model: Qwen2ForCausalLM, tokens, active, chunk_ids, chunk_lengths, rows, cache: KVCache):
    """One step of continuous batching that decodes and prefills together (chunked prefill).

    tokens: int32 `[W]`, the next token of cache rows 0..W-1; `active[W]` marks the rows that
      decode (an inactive row keeps its length; what it computes is ignored).
    chunk_ids: int32 `[N, C]`: N prompt chunks; chunk i holds the next `chunk_lengths[i]` prompt
      tokens of cache row `rows[i]` (right-padded to C), written from that row's length on;
      `active[rows[i]]` must be False and the rows distinct. A row index outside the cache
      (`>= cache.batch`) marks a padding chunk: it writes nothing and its outputs are meaningless.
      `rows` and `chunk_lengths` may be scalars for one chunk (`N == 1`).
    All groups run through every projection and MLP as one `[1, W + N * C]` batch of tokens (the
    decode rows and the other chunks ride on the same matrix products), and each attends to its
    own cache row exactly as a separate decode step and prefill chunk would (`KVCache` contract).
    Returns final-norm hidden states `[W, D]` (decode rows) and `[N, C, D]` (the chunks; `[C, D]`
    when `rows` is a scalar), and the cache with rows 0..W-1 advanced by `active` and each
    chunk's row by its length.
    """
    cfg, mesh, rules = model.config, model.mesh, model.rules
    one_chunk = jnp.ndim(rows) == 0
    rows = jnp.asarray(rows, jnp.int32).reshape(-1)
    chunk_lengths = jnp.asarray(chunk_lengths, jnp.int32).reshape(-1)
    W, (N, C) = tokens.shape[0], chunk_ids.shape
    decode_starts = cache.lengths[:W]
    row_starts = cache.lengths.at[rows].get(mode="fill", fill_value=0)  # [N]
    chunk_positions = (row_starts[:, None] + jnp.arange(C, dtype=jnp.int32)[None, :]).reshape(1, N * C)
    x = model.model.embed_tokens(jnp.concatenate([tokens[None, :], chunk_ids.reshape(1, N * C)], axis=1))
    x = constrain(x, ("batch", "seq", "act_embed"), mesh, rules)
    tables = [rope_tables(cfg, p, model.dtype) for p in (decode_starts[None, :], chunk_positions)]
    cos, sin = (jnp.concatenate(parts, axis=1) for parts in zip(*tables))
    context = MixedContext(
        model.cached_context(decode_starts, 1, cache.max_len),
        tuple(model.cached_context(row_starts[i : i + 1], C, cache.max_len) for i in range(N)),
        W,
        C,
        rows,
    )
    x, kv = model.run_layers(x, cos, sin, context, (cache.k, cache.v))
    lengths = cache.lengths.at[:W].add(active.astype(jnp.int32)).at[rows].add(chunk_lengths, mode="drop")
    prefilled = x[0, W:].reshape(N, C, -1)
    return x[0, :W], prefilled[0] if one_chunk else prefilled, KVCache(kv[0], kv[1], lengths)
