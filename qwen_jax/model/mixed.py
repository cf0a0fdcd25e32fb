"""The continuous-batching engine's fused step: decode rows and one prompt chunk in one model call
(`mixed_hidden_states`), each group attending to its own cache rows (`MixedContext`)."""

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
    `width` decode tokens (one per cache row 0..width-1) followed by a prompt chunk of cache row
    `row`; each group writes its keys into its rows and attends to its own rows of the cache."""

    decode: AttentionContext
    chunk: AttentionContext
    width: int
    row: jax.Array  # int32 scalar: the chunk's cache row

    def write_and_attend(self, q, k, v, kv, layer, use_window):
        W = self.width
        (q_dec, q_chunk), (k_dec, k_chunk), (v_dec, v_chunk) = (
            (x[0, :W, None], x[:, W:]) for x in (q, k, v)
        )  # [W, 1, heads, H] and [1, C, heads, H]
        # Decode rows first: an idle row (the chunk's own row among them) writes a slot the chunk then overwrites.
        kv = tuple(write_rows(cache, layer, new, self.decode.cache_starts) for cache, new in zip(kv, (k_dec, v_dec)))
        kv = tuple(
            write_rows(cache, layer, new, self.chunk.cache_starts, self.row)
            for cache, new in zip(kv, (k_chunk, v_chunk))
        )
        out_dec = self.decode.attend(q_dec, *kv, layer, use_window)
        out_chunk = self.chunk.attend(q_chunk, *kv, layer, use_window, row_offset=self.row)
        return jnp.concatenate([out_dec[:, 0][None], out_chunk], axis=1), kv


def mixed_hidden_states(model: Qwen2ForCausalLM, tokens, active, chunk_ids, chunk_length, row, cache: KVCache):
    """One step of continuous batching that decodes and prefills together (chunked prefill).

    tokens: int32 `[W]`, the next token of cache rows 0..W-1; `active[W]` marks the rows that
      decode (an inactive row keeps its length; what it computes is ignored).
    chunk_ids: int32 `[1, C]`, the next `chunk_length` prompt tokens of cache row `row`
      (right-padded to C), written from that row's length on; `active[row]` must be False.
    Both groups run through every projection and MLP as one `[1, W + C]` batch of tokens
    (the decode rows ride on the chunk's matrix products), and each attends to its own cache
    rows exactly as a separate decode step and prefill chunk would (`KVCache` contract).
    Returns final-norm hidden states `[W, D]` (decode rows) and `[C, D]` (the chunk), and the
    cache with rows 0..W-1 advanced by `active` and row `row` by `chunk_length`.
    """
    cfg, mesh, rules = model.config, model.mesh, model.rules
    W, C = tokens.shape[0], chunk_ids.shape[1]
    decode_starts = cache.lengths[:W]
    row_start = jax.lax.dynamic_index_in_dim(cache.lengths, row, keepdims=True)  # [1]
    chunk_positions = row_start[:, None] + jnp.arange(C, dtype=jnp.int32)[None, :]
    x = model.model.embed_tokens(jnp.concatenate([tokens[None, :], chunk_ids], axis=1))
    x = constrain(x, ("batch", "seq", "act_embed"), mesh, rules)
    tables = [rope_tables(cfg, p, model.dtype) for p in (decode_starts[None, :], chunk_positions)]
    cos, sin = (jnp.concatenate(parts, axis=1) for parts in zip(*tables))
    context = MixedContext(
        model.cached_context(decode_starts, 1, cache.max_len),
        model.cached_context(row_start, C, cache.max_len),
        W,
        jnp.asarray(row, jnp.int32),
    )
    x, kv = model.run_layers(x, cos, sin, context, (cache.k, cache.v))
    lengths = cache.lengths.at[:W].add(active.astype(jnp.int32)).at[row].add(chunk_length)
    return x[0, :W], x[0, W:], KVCache(kv[0], kv[1], lengths)
