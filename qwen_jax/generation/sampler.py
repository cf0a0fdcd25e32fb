"""The one sampler: next tokens for a batch whose rows may each have their own settings and seed.

`qwen_jax.generate` / `stream` (the static-batch programs of `qwen_jax.generation.static`) and the
engine (`qwen_jax.engine.programs`) both draw through `sample_rows`, so the same seed and settings
give the same tokens from all of them.

A row may be constrained to a set of allowed tokens (structured output,
`qwen_jax.generation.constraints`): a packed int32 bitmask `[rows, ceil(vocab / 32)]` (bit
`t % 32` of word `t // 32` set = token t allowed; all ones = a free row). It is applied first, to
the raw logits, as vLLM applies its grammar bitmask before the sampling parameters: every
disallowed token gets -inf, which the bias, the penalties and the filters that follow keep at
-inf, so the filters act on the allowed tokens only.

Each row carries its own settings (`RowParams`): temperature (0 = greedy), top-k, top-p, min-p,
repetition penalty, OpenAI's presence and frequency penalties, and a key with a token index; a
row's `History` holds what those penalties read (the ids seen in prompt and output, the counts of
generated ids) and its logit bias. The logits are adjusted in vLLM's order: logit bias, repetition
penalty (prompt and output ids), then `logits -= frequency * count + presence * (count > 0)` over
the generated ids (OpenAI's definition); the filters that follow are HF's logits processors in
HF's order (`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`, `MinPLogitsWarper`,
with HF's semantics: top-k keeps ties with the k-th logit, top-p keeps the top token). Settings are
traced values, so a new temperature or top-p does not recompile, and any mix of requests runs
through one compiled program.

A row's token depends only on its own logits, settings, seed and token index -- never on its
batch-mates -- which is what lets a request give the same tokens alone or in a busy batch.
Greedy rows take the argmax of the adjusted logits. Sampling rows draw by inverse CDF with one
uniform number `u = uniform(fold_in(key(seed), token_index))` over their kept tokens, in an order
fixed by the row's own settings:
- 0 < top_k <= CANDIDATES: the `CANDIDATES` largest logits (`lax.top_k`), in descending order;
- no top-k and no top-p (temperature and min-p only): the vocabulary in id order (no sort needed);
- otherwise (top-p without a small top-k, or a large top-k): the whole vocabulary sorted in
  descending order -- exact, but a full sort of the vocabulary, the costly path (see
  benchmarks/generate.py and benchmarks/serve.py).
The program variant (`SamplerVariant`, static) only decides which of these paths are compiled for
a batch, and whether the bias and penalties are compiled in: a greedy batch without penalties
compiles to the argmax alone. A variant that compiles several paths runs each only when some
sampling row of the batch takes it (`lax.cond`), so the engine's covering variants cost a batch
no more than the paths its rows use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

CANDIDATES = 64  # the candidate set of rows whose top_k fits in it
_CDF_BLOCK = 1024  # weights per block of the two-level cumulative sum over the vocabulary (`_inverse_cdf`)
_REMOVED = -jnp.inf  # HF's filter_value


@dataclasses.dataclass(frozen=True)
class SamplerVariant:
    """What one compiled sampler computes (static). A row's token never depends on the variant,
    only on its own settings; the variant must cover every row's draw (`variant_for`)."""

    candidates: bool = False  # draws over the top-CANDIDATES logits (rows with 0 < top_k <= CANDIDATES)
    id_order: bool = False  # draws over the vocabulary in id order (rows without top-k and top-p)
    sorted_vocabulary: bool = False  # draws over the sorted vocabulary (top-p without a small top-k, large top-k)
    adjustments: bool = True  # the logit bias and the repetition, presence and frequency penalties

    @property
    def greedy(self) -> bool:
        """No draw compiled in: every row takes the argmax."""
        return not (self.candidates or self.id_order or self.sorted_vocabulary)

    def covers(self, other: SamplerVariant) -> bool:
        """Whether this variant computes everything `other` does."""
        return all(getattr(self, f.name) or not getattr(other, f.name) for f in dataclasses.fields(self))


# The engine compiles these three for every step width (its rows always carry bias and penalties):
# a greedy batch, a batch without sorted-vocabulary rows, and any batch.
ENGINE_VARIANTS = (
    SamplerVariant(),
    SamplerVariant(candidates=True, id_order=True),
    SamplerVariant(candidates=True, id_order=True, sorted_vocabulary=True),
)


def variant_for(rows: Iterable[tuple[float, int, float]], adjustments: bool = True) -> SamplerVariant:
    """The cheapest variant that draws every (temperature, top_k, top_p) row of `rows` (host side)."""
    candidates = id_order = sorted_vocabulary = False
    for temperature, top_k, top_p in rows:
        if temperature <= 0:
            continue
        if 0 < top_k <= CANDIDATES:
            candidates = True
        elif top_p < 1 or top_k > CANDIDATES:
            sorted_vocabulary = True
        else:
            id_order = True
    return SamplerVariant(candidates, id_order, sorted_vocabulary, adjustments)


def covering_variant(variant: SamplerVariant, choices: Iterable[SamplerVariant]) -> SamplerVariant:
    """The first of `choices` that covers `variant` (the engine rounds up to `ENGINE_VARIANTS`)."""
    return next(choice for choice in choices if choice.covers(variant))


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

    def at_token(self, index: jax.Array) -> RowParams:
        """The same settings drawing token `index` in every row."""
        return dataclasses.replace(self, token_index=jnp.full_like(self.token_index, index))


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

    def record(self, tokens: jax.Array, valid: jax.Array | None = None) -> History:
        """The history after row r generated `tokens[r]`, for the first `len(tokens)` rows (where
        `valid`; the other rows keep theirs). Only the recorded entries are written: with the
        history donated, XLA updates it in place."""
        if valid is not None:
            tokens = jnp.where(valid, tokens, self.seen.shape[-1])  # out of range: dropped
        rows = jnp.arange(tokens.shape[0])
        seen = self.seen.at[rows, tokens].set(True, mode="drop")  # mark_seen spans every row of `seen`
        return History(seen, self.counts.at[rows, tokens].add(1, mode="drop"), self.bias)


def seed_key_data(seed: int) -> np.ndarray:
    """Threefry key data of a 64-bit seed, as `jax.random.key(seed)` builds it ([high word, low word])."""
    seed %= 2**64
    return np.asarray([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


def mark_seen(seen: jax.Array, token_ids: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Set seen[b, token_ids[b, ...]] = True (where `valid`); token_ids `[B]` or `[B, T]`."""
    if token_ids.ndim == 1:
        token_ids = token_ids[:, None]
        valid = None if valid is None else valid[:, None]
    if valid is not None:
        token_ids = jnp.where(valid, token_ids, seen.shape[-1])  # out of range: dropped
    rows = jnp.arange(seen.shape[0])[:, None]
    return seen.at[rows, token_ids].set(True, mode="drop")


# ----------------------------------------------------------------------------- adjustments and HF's filters
def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """HF's `RepetitionPenaltyLogitsProcessor`: for tokens already in the sequence (`seen`), divide
    positive logits by the penalty and multiply negative ones."""
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


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


def _top_p_keep(sorted_logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """HF's `TopPLogitsWarper` on descending logits: drop the smallest tokens whose cumulative
    probability is <= 1 - top_p, always keep the top one. Computed in ascending order exactly like
    HF, so borderline tokens round the same."""
    ascending = sorted_logits[..., ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove = (cumulative <= 1 - top_p).at[..., -1].set(False)
    return ~remove[..., ::-1]


def _min_p_keep(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """HF's `MinPLogitsWarper`: drop tokens whose probability is below min_p times the top token's."""
    probs = jax.nn.softmax(logits, axis=-1)
    top = jnp.max(probs, axis=-1, keepdims=True)
    return probs >= min_p * top


def _filter_keep(values: jax.Array, params: RowParams) -> jax.Array:
    """HF's TopK, TopP, MinP warpers on descending candidates `[rows, C]` (True = keep)."""
    candidates = values.shape[-1]
    k = jnp.clip(params.top_k, 1, candidates)[:, None]
    kth = jnp.take_along_axis(values, k - 1, axis=-1)
    keep = (values >= kth) | (params.top_k[:, None] <= 0)  # ties with the k-th are kept, as HF does
    values = jnp.where(keep, values, _REMOVED)
    keep = keep & _top_p_keep(values, params.top_p[:, None])
    values = jnp.where(keep, values, _REMOVED)
    return keep & _min_p_keep(values, params.min_p[:, None])


def _scaled(logits: jax.Array, params: RowParams) -> jax.Array:
    """HF's `TemperatureLogitsWarper` (greedy rows, temperature 0, are left unscaled)."""
    return logits / jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]


# ----------------------------------------------------------------------------- drawing
def _uses_candidates(top_k):
    return (top_k > 0) & (top_k <= CANDIDATES)


def _needs_sort(top_k, top_p):
    """Sampling rows that need the sorted vocabulary: top-p without a small top-k, or a large top-k."""
    return ~_uses_candidates(top_k) & ((top_p < 1) | (top_k > CANDIDATES))


def allowed_tokens(bitmask: jax.Array, vocab: int) -> jax.Array:
    """bool `[rows, vocab]` from a packed int32 bitmask `[rows, ceil(vocab / 32)]` (see the module docstring)."""
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].astype(bool)


def sample_rows(
    logits: jax.Array,
    history: History | None,
    params: RowParams,
    variant: SamplerVariant,
    bitmask: jax.Array | None = None,
) -> jax.Array:
    """Next token per row, int32 `[rows]`, from logits `[rows, vocab]` and each row's `history`
    (None when `variant.adjustments` is off: no bias or penalty in any row); `bitmask`: each row's
    allowed tokens (packed int32 `[rows, ceil(vocab / 32)]`; None: every token)."""
    logits = logits.astype(jnp.float32)
    if bitmask is not None:
        logits = jnp.where(allowed_tokens(bitmask, logits.shape[-1]), logits, _REMOVED)
    logits = adjusted_logits(logits, history, params) if variant.adjustments else logits
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if variant.greedy:
        return greedy
    vocab = logits.shape[-1]
    scaled = _scaled(logits, params)
    uniform = jax.vmap(_uniform)(params.key_data, params.token_index)
    draws = []  # (rows that take this draw, the draw); the rows of the paths compiled in cover every sampling row
    several = sum((variant.candidates, variant.sorted_vocabulary, variant.id_order)) > 1

    def draw_for(rows, draw):
        # A variant that covers several paths computes a path only when some sampling row takes it.
        if not several:
            return draw()
        return jax.lax.cond(
            jnp.any(rows & (params.temperature > 0)), draw, lambda: jnp.zeros(logits.shape[0], jnp.int32)
        )

    if variant.candidates:
        rows = _uses_candidates(params.top_k)
        draws.append((rows, draw_for(rows, lambda: _draw_sorted(scaled, params, uniform, min(CANDIDATES, vocab)))))
    if variant.sorted_vocabulary:
        rows = _needs_sort(params.top_k, params.top_p)
        draws.append((rows, draw_for(rows, lambda: _draw_sorted(scaled, params, uniform, vocab))))
    if variant.id_order:
        rows = ~_uses_candidates(params.top_k) & ~_needs_sort(params.top_k, params.top_p)
        draws.append((None, draw_for(rows, lambda: _draw_in_id_order(scaled, params, uniform))))
    sampled = draws[-1][1]
    for rows, draw in reversed(draws[:-1]):
        sampled = jnp.where(rows, draw, sampled)
    return jnp.where(params.temperature > 0, sampled, greedy)


def _uniform(key_data: jax.Array, token_index: jax.Array) -> jax.Array:
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data, impl="threefry2x32"), token_index)
    return jax.random.uniform(key, (), jnp.float32)


def _inverse_cdf(values: jax.Array, uniform: jax.Array) -> jax.Array:
    """Index drawn from the unnormalised distribution exp(values) (-inf = never) with one uniform
    per row: the first index whose cumulative weight exceeds `uniform` times the total.

    Over a long axis (the vocabulary) the cumulative sums are taken in two levels, as a prefix sum
    over blocks of `_CDF_BLOCK` weights and a prefix sum inside the one block the draw falls in:
    a full-length cumulative sum is a logarithmic-depth scan on XLA's CPU and GPU backends, far
    slower than the reductions this needs. A row's draw still depends on its own values only."""
    most = jnp.max(values, axis=-1, keepdims=True)
    weights = jnp.exp(values - most)
    rows, length = weights.shape
    if length <= 4 * _CDF_BLOCK:
        cdf = jnp.cumsum(weights, axis=-1)
        index = jnp.sum(cdf <= uniform[:, None] * cdf[:, -1:], axis=-1)
        return _last_positive(weights, index)  # also keeps a draw past the end inside the row
    size = _cdf_block(length)
    blocks = -(-length // size)
    if blocks * size > length:  # no divisor near _CDF_BLOCK: zero weights pad the last block
        weights = jnp.pad(weights, ((0, 0), (0, blocks * size - length)))
    prefix = jnp.cumsum(weights.reshape(rows, blocks, size).sum(axis=-1), axis=-1)  # inclusive, per block
    target = uniform * prefix[:, -1]
    block = jnp.sum(prefix <= target[:, None], axis=-1)
    # rounding can put the target at the total: the draw is then the last block holding weight
    block = jnp.minimum(block, _last_positive(prefix - jnp.pad(prefix[:, :-1], ((0, 0), (1, 0))), blocks - 1))
    before = jnp.where(block > 0, jnp.take_along_axis(prefix, jnp.maximum(block - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
    positions = block[:, None] * size + jnp.arange(size)
    # the block's weights recomputed from `values`: the full-length weights are only ever summed
    inside = jnp.where(
        positions < length,
        jnp.exp(jnp.take_along_axis(values, jnp.minimum(positions, length - 1), axis=-1) - most),
        0.0,
    )
    cdf = before[:, None] + jnp.cumsum(inside, axis=-1)
    within = _last_positive(inside, jnp.sum(cdf <= target[:, None], axis=-1))
    return block * size + within


def _cdf_block(length: int) -> int:
    """Weights per block of `_inverse_cdf`'s two-level sum: a divisor of `length` between half and
    twice `_CDF_BLOCK` where there is one (the blocks are then a reshape, nothing copied), else
    `_CDF_BLOCK`. Qwen2.5's 151,936-token vocabulary takes 128 blocks of 1,187."""
    low, high = _CDF_BLOCK // 2, 2 * _CDF_BLOCK
    divisors = [d for d in range(low, high + 1) if length % d == 0]
    return min(divisors, key=lambda d: abs(d - _CDF_BLOCK)) if divisors else _CDF_BLOCK


def _last_positive(weights: jax.Array, index: jax.Array) -> jax.Array:
    """`index` per row, or the row's last index with a positive weight where that comes first: a
    draw that rounding pushed past the end never lands on a zero-weight (filtered) token."""
    positions = jnp.arange(weights.shape[-1])
    last = jnp.max(jnp.where(weights > 0, positions, 0), axis=-1)
    return jnp.minimum(index, last)


def _draw_sorted(scaled: jax.Array, params: RowParams, uniform: jax.Array, candidates: int) -> jax.Array:
    """Draw over the `candidates` largest scaled logits (descending) after top-k, top-p and min-p."""
    values, token_ids = jax.lax.top_k(scaled, candidates)  # ties: lower id first
    values = jnp.where(_filter_keep(values, params), values, _REMOVED)
    index = _inverse_cdf(values, uniform)
    return jnp.take_along_axis(token_ids, index[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _draw_in_id_order(scaled: jax.Array, params: RowParams, uniform: jax.Array) -> jax.Array:
    """Draw over the whole vocabulary in id order after min-p (rows without top-k and top-p)."""
    values = jax.lax.cond(
        jnp.any(params.min_p > 0),
        lambda: jnp.where(_min_p_keep(scaled, params.min_p[:, None]), scaled, _REMOVED),
        lambda: scaled,  # min_p = 0 keeps every token: the filter is skipped when no row sets it
    )
    return _inverse_cdf(values, uniform).astype(jnp.int32)


def processed_logits(logits: jax.Array, history: History, params: RowParams) -> jax.Array:
    """The full-vocabulary logits each row picks from, as HF's logits processors give them: a
    sampling row's distribution (-inf where filtered), a greedy row's adjusted logits (for tests and tools)."""
    logits = adjusted_logits(logits, history, params)
    values, token_ids = jax.lax.top_k(_scaled(logits, params), logits.shape[-1])
    values = jnp.where(_filter_keep(values, params), values, _REMOVED)
    rows = jnp.arange(logits.shape[0])[:, None]
    filtered = jnp.full_like(logits, _REMOVED).at[rows, token_ids].set(values)
    return jnp.where((params.temperature > 0)[:, None], filtered, logits)
