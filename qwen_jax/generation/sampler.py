"""Per-row sampling for batches whose rows belong to different requests.

Each row carries its own settings (`RowParams`): temperature (0 = greedy), top-k, top-p, min-p,
repetition penalty, OpenAI's presence and frequency penalties, and a key with a token index; a
row's `History` holds what those penalties read (the ids seen in prompt and output, the counts of
generated ids) and its logit bias. The logits are adjusted in vLLM's order: logit bias, repetition
penalty (prompt and output ids), then `logits -= frequency * count + presence * (count > 0)` over
the generated ids (OpenAI's definition); the filters that follow are HF's logits processors in
HF's order (as `qwen_jax.sampling`). Everything is applied row by row with traced values, so any
mix of requests runs through one compiled program.

A row's token depends only on its own logits, settings, seed and token index -- never on its
batch-mates -- which is what lets a request give the same tokens alone or in a busy batch.
Greedy rows take the argmax of the adjusted logits. Sampling rows draw by inverse
CDF with one uniform number `u = uniform(fold_in(key(seed), token_index))` over their kept tokens,
in an order fixed by the row's own settings:
- 0 < top_k <= CANDIDATES: the `CANDIDATES` largest logits (`lax.top_k`), in descending order;
- no top-k and no top-p (temperature and min-p only): the vocabulary in id order (no sort needed);
- otherwise (top-p without a small top-k, or a large top-k): the whole vocabulary sorted in
  descending order -- exact, but a full sort, which is slow on CPU (~0.5 s for 8 x 151,936).
The program variant (`SamplerVariant`) only decides which of these paths are computed for a batch.
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.generation.sampling import (
    _min_p_keep,
    _top_p_keep,
    apply_repetition_penalty,
    mark_seen,
)

CANDIDATES = 64  # the candidate set of rows whose top_k fits in it


class SamplerVariant(enum.Enum):
    """Which sampling paths one compiled sampler computes (static)."""

    GREEDY = "greedy"  # every row greedy: argmax only
    CANDIDATES = "candidates"  # no row needs the sorted vocabulary: top-k candidates and id-order draws
    FULL = "full"  # some row needs the whole vocabulary sorted (every path computed)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowParams:
    """Per-row sampling settings, each `[rows]` (key_data `[rows, 2]`)."""

    temperature: jax.Array  # float32; 0 = greedy
    top_k: jax.Array  # int32; 0 = off
    top_p: jax.Array  # float32; 1 = off
    min_p: jax.Array  # float32; 0 = off
    repetition_penalty: jax.Array  # float32; 1 = off
    presence_penalty: jax.Array  # float32; 0 = off
    frequency_penalty: jax.Array  # float32; 0 = off
    key_data: jax.Array  # uint32 [rows, 2]: threefry key of the request's seed
    token_index: jax.Array  # int32: index of the token being drawn (0 = first generated token)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class History:
    """What a row's penalties and bias read, each `[rows, vocab]`."""

    seen: jax.Array  # bool: ids in the prompt or generated so far (repetition penalty)
    counts: jax.Array  # int32: how often each id was generated (presence and frequency penalties)
    bias: jax.Array  # float32: added to the logits (OpenAI's logit_bias); 0 = none

    @classmethod
    def empty(cls, rows: int, vocab: int, xp=jnp) -> History:
        return cls(
            xp.zeros((rows, vocab), bool), xp.zeros((rows, vocab), xp.int32), xp.zeros((rows, vocab), xp.float32)
        )

    def record(self, tokens: jax.Array) -> History:
        """The history after each row generated `tokens[row]`."""
        rows = jnp.arange(tokens.shape[0])
        return History(mark_seen(self.seen, tokens), self.counts.at[rows, tokens].add(1), self.bias)


def adjusted_logits(logits: jax.Array, history: History, params: RowParams) -> jax.Array:
    """float32 logits after the logit bias and the repetition, frequency and presence penalties."""
    logits = logits.astype(jnp.float32) + history.bias
    logits = apply_repetition_penalty(logits, history.seen, params.repetition_penalty[:, None])
    counts = history.counts.astype(jnp.float32)
    return (
        logits
        - params.frequency_penalty[:, None] * counts
        - params.presence_penalty[:, None] * (history.counts > 0).astype(jnp.float32)
    )


def seed_key_data(seed: int) -> np.ndarray:
    """Threefry key data of a 64-bit seed, as `jax.random.key(seed)` builds it ([high word, low word])."""
    seed %= 2**64
    return np.asarray([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


def _uses_candidates(top_k):
    return (top_k > 0) & (top_k <= CANDIDATES)


def _needs_sort(top_k, top_p):
    """Sampling rows that need the sorted vocabulary: top-p without a small top-k, or a large top-k."""
    return ~_uses_candidates(top_k) & ((top_p < 1) | (top_k > CANDIDATES))


def variant_for(rows: list[tuple[float, int, float]]) -> SamplerVariant:
    """The cheapest variant that serves every (temperature, top_k, top_p) in `rows` (host-side `_needs_sort`)."""
    sampling_rows = [(k, p) for t, k, p in rows if t > 0]
    if not sampling_rows:
        return SamplerVariant.GREEDY
    if any(not 0 < k <= CANDIDATES and (p < 1 or k > CANDIDATES) for k, p in sampling_rows):
        return SamplerVariant.FULL
    return SamplerVariant.CANDIDATES


def sample_rows(logits: jax.Array, history: History, params: RowParams, variant: SamplerVariant) -> jax.Array:
    """Next token per row, int32 `[rows]`, from float32 logits `[rows, vocab]` and each row's `history`."""
    logits = adjusted_logits(logits, history, params)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if variant is SamplerVariant.GREEDY:
        return greedy
    vocab = logits.shape[-1]
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
    scaled = logits / temperature
    uniform = jax.vmap(_uniform)(params.key_data, params.token_index)
    sampled = jnp.where(
        _uses_candidates(params.top_k),
        _draw_sorted(scaled, params, uniform, min(CANDIDATES, vocab)),
        _draw_in_id_order(scaled, params, uniform),
    )
    if variant is SamplerVariant.FULL:
        sampled = jnp.where(
            _needs_sort(params.top_k, params.top_p), _draw_sorted(scaled, params, uniform, vocab), sampled
        )
    return jnp.where(params.temperature > 0, sampled, greedy)


def _uniform(key_data: jax.Array, token_index: jax.Array) -> jax.Array:
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data, impl="threefry2x32"), token_index)
    return jax.random.uniform(key, (), jnp.float32)


def _inverse_cdf(values: jax.Array, uniform: jax.Array) -> jax.Array:
    """Index drawn from the unnormalised distribution exp(values) (-inf = never) with one uniform per row."""
    weights = jnp.exp(values - jnp.max(values, axis=-1, keepdims=True))
    cdf = jnp.cumsum(weights, axis=-1)
    index = jnp.sum(cdf <= uniform[:, None] * cdf[:, -1:], axis=-1)
    return jnp.minimum(index, values.shape[-1] - 1)


def _draw_sorted(scaled: jax.Array, params: RowParams, uniform: jax.Array, candidates: int) -> jax.Array:
    """Draw over the `candidates` largest scaled logits (descending) after top-k, top-p and min-p."""
    values, token_ids = jax.lax.top_k(scaled, candidates)  # ties: lower id first
    values = jnp.where(_filter_keep(values, params), values, -jnp.inf)
    index = _inverse_cdf(values, uniform)
    return jnp.take_along_axis(token_ids, index[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _draw_in_id_order(scaled: jax.Array, params: RowParams, uniform: jax.Array) -> jax.Array:
    """Draw over the whole vocabulary in id order after min-p (rows without top-k and top-p)."""
    values = jnp.where(_min_p_keep(scaled, params.min_p[:, None]), scaled, -jnp.inf)
    return _inverse_cdf(values, uniform).astype(jnp.int32)


def _filter_keep(values: jax.Array, params: RowParams) -> jax.Array:
    """HF's TopK, TopP, MinP warpers on descending candidates `[rows, C]` (True = keep)."""
    candidates = values.shape[-1]
    k = jnp.clip(params.top_k, 1, candidates)[:, None]
    kth = jnp.take_along_axis(values, k - 1, axis=-1)
    keep = (values >= kth) | (params.top_k[:, None] <= 0)
    values = jnp.where(keep, values, -jnp.inf)
    keep = keep & _top_p_keep(values, params.top_p[:, None])
    values = jnp.where(keep, values, -jnp.inf)
    return keep & _min_p_keep(values, params.min_p[:, None])


def processed_logits(logits: jax.Array, history: History, params: RowParams) -> jax.Array:
    """The full-vocabulary logits each sampling row draws from (-inf where filtered), for tests and tools."""
    logits = adjusted_logits(logits, history, params)
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
    values, token_ids = jax.lax.top_k(logits / temperature, logits.shape[-1])
    values = jnp.where(_filter_keep(values, params), values, -jnp.inf)
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.full_like(logits, -jnp.inf).at[rows, token_ids].set(values)
