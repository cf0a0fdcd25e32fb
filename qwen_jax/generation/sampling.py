"""Next-token selection: repetition penalty, temperature, top-k, top-p, min-p, greedy.

Everything works on float32 logits `[batch, vocab]` and is jittable. The filter *values*
(`SamplingParams`) are traced, so changing a temperature or a top-p does not recompile; which
filters exist at all (`SamplingMode`) is static, so greedy decoding pays for no sorting.

Semantics follow HF transformers' logits processors, applied in HF's order:
`RepetitionPenaltyLogitsProcessor`, then (sampling only) `TemperatureLogitsWarper`,
`TopKLogitsWarper`, `TopPLogitsWarper`, `MinPLogitsWarper`.

Top-k works on a static candidate set of `SamplingMode.top_k_cap` (>= top_k) highest logits,
found with `lax.top_k` instead of sorting the whole vocabulary. Logits tied with the k-th
largest are kept (as HF does) as long as they fall inside the candidate set.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_REMOVED = -jnp.inf  # HF's filter_value


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Traced filter values (float32/int32 scalars). Neutral values: 1, 0, 1, 0, 1."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingMode:
    """Static structure of the sampler: which code paths are compiled in."""

    greedy: bool
    top_k_cap: int = 0  # 0: no top-k filter; else the static candidate count (>= top_k)
    top_p: bool = False
    min_p: bool = False
    repetition_penalty: bool = False


def next_power_of_two(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def sampling_setup(
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    repetition_penalty: float,
    vocab_size: int,
) -> tuple[SamplingMode, SamplingParams]:
    """Validate user settings and split them into static mode and traced values.

    temperature 0 means greedy (argmax after the repetition penalty, as HF's greedy search).
    top_k 0, top_p 1, min_p 0 and repetition_penalty 1 switch the respective filter off.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")
    greedy = temperature == 0
    use_top_k = not greedy and 0 < top_k < vocab_size
    mode = SamplingMode(
        greedy=greedy,
        # Power-of-two caps: a new top_k inside the same cap does not recompile.
        top_k_cap=min(max(next_power_of_two(top_k), 8), vocab_size) if use_top_k else 0,
        top_p=not greedy and top_p < 1.0,
        min_p=not greedy and min_p > 0.0,
        repetition_penalty=repetition_penalty != 1.0,
    )
    params = SamplingParams(
        temperature=jnp.asarray(temperature if not greedy else 1.0, jnp.float32),
        top_k=jnp.asarray(top_k if use_top_k else vocab_size, jnp.int32),
        top_p=jnp.asarray(top_p, jnp.float32),
        min_p=jnp.asarray(min_p, jnp.float32),
        repetition_penalty=jnp.asarray(repetition_penalty, jnp.float32),
    )
    return mode, params


# ----------------------------------------------------------------------------- filters
def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """HF: for tokens already in the sequence, divide positive logits and multiply negative ones.

    seen: bool `[batch, vocab]`, True for every token id in the prompt or generated so far.
    """
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def _top_k_keep(sorted_logits: jax.Array, k: jax.Array) -> jax.Array:
    """Keep logits >= the k-th largest (ties kept). sorted_logits: descending `[B, C]`."""
    kth = jnp.take(sorted_logits, jnp.clip(k, 1, sorted_logits.shape[-1]) - 1, axis=-1)
    return sorted_logits >= kth[..., None]


def _top_p_keep(sorted_logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """HF: drop the smallest tokens whose cumulative probability is <= 1 - top_p; keep the top one.

    Computed in ascending order exactly like `TopPLogitsWarper`, so borderline tokens round the same.
    """
    ascending = sorted_logits[..., ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove = (cumulative <= 1 - top_p).at[..., -1].set(False)
    return ~remove[..., ::-1]


def _min_p_keep(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """HF: drop tokens whose probability is below min_p times the top token's probability."""
    probs = jax.nn.softmax(logits, axis=-1)
    top = jnp.max(probs, axis=-1, keepdims=True)
    return probs >= min_p * top


def _candidates(logits: jax.Array, params: SamplingParams, mode: SamplingMode):
    """Filtered candidate logits `[B, C]` and their token ids `[B, C]` (None: C is the vocabulary)."""
    token_ids = None
    if mode.top_k_cap:
        logits, token_ids = jax.lax.top_k(logits, mode.top_k_cap)
    elif mode.top_p:
        vocab = jnp.broadcast_to(jnp.arange(logits.shape[-1], dtype=jnp.int32), logits.shape)
        negated, token_ids = jax.lax.sort_key_val(-logits, vocab, dimension=-1)
        logits = -negated
    if mode.top_k_cap:
        logits = jnp.where(_top_k_keep(logits, params.top_k), logits, _REMOVED)
    if mode.top_p:
        logits = jnp.where(_top_p_keep(logits, params.top_p), logits, _REMOVED)
    if mode.min_p:
        logits = jnp.where(_min_p_keep(logits, params.min_p), logits, _REMOVED)
    return logits, token_ids


def process_logits(logits: jax.Array, seen: jax.Array | None, params: SamplingParams, mode: SamplingMode) -> jax.Array:
    """The full-vocabulary logits the sampler draws from (-inf where filtered), as HF's processors give."""
    logits = logits.astype(jnp.float32)
    if mode.repetition_penalty:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if mode.greedy:
        return logits
    candidates, token_ids = _candidates(logits / params.temperature, params, mode)
    if token_ids is None:
        return candidates
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.full_like(logits, _REMOVED).at[rows, token_ids].set(candidates)


def sample(
    key: jax.Array, logits: jax.Array, seen: jax.Array | None, params: SamplingParams, mode: SamplingMode
) -> jax.Array:
    """Next token ids `int32[B]` from logits `[B, V]`; `key` is used only when sampling."""
    logits = logits.astype(jnp.float32)
    if mode.repetition_penalty:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if mode.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    candidates, token_ids = _candidates(logits / params.temperature, params, mode)
    choice = jax.random.categorical(key, candidates, axis=-1).astype(jnp.int32)
    if token_ids is None:
        return choice
    return jnp.take_along_axis(token_ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def mark_seen(seen: jax.Array, token_ids: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Set seen[b, token_ids[b, ...]] = True (where `valid`); token_ids `[B]` or `[B, T]`."""
    if token_ids.ndim == 1:
        token_ids = token_ids[:, None]
        valid = None if valid is None else valid[:, None]
    if valid is not None:
        token_ids = jnp.where(valid, token_ids, seen.shape[-1])  # out of range: dropped
    rows = jnp.arange(seen.shape[0])[:, None]
    return seen.at[rows, token_ids].set(True, mode="drop")
