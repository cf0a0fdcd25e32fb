"""Speculative decoding for `qwen_jax.generate` / `stream`: propose K tokens cheaply, let the target
model score all of them in one forward, keep the longest acceptable prefix plus one token of its own.

Proposers:

- `ngram` (prompt lookup): the K tokens that followed the latest earlier occurrence of the last n
  tokens of prompt + output, n from `ngram_max` down to `ngram_min`; no extra weights. A row without
  a match proposes nothing that step (it decodes one token, as without speculation).
- `draft`: a smaller Qwen2.5 with the same tokenizer, run for K tokens with the row's own settings
  (greedy rows take its argmax, sampling rows draw from its processed distribution q).

Verification (one compiled program per K, batch width and sampler variant, looked up once per
call in the shared executable cache; with a draft, the draft's K proposals and the target's check
are the same program): the target reads [pending token, d1 .. dK] at each row's cache length and
gives the logits of K + 1 positions. Position j is processed exactly as the one sampler processes
token `count + j` with d1 .. dj already generated (logit bias, penalties over a history that
includes them, temperature, top-k, top-p, min-p), so:

- greedy rows accept the longest prefix of proposals equal to the target's argmax, then take the
  target's argmax at the first mismatch (or after the last proposal: the bonus token) -- the tokens
  plain greedy decoding gives (up to float rounding between a K+1-token forward and a 1-token one);
- sampling rows use speculative rejection sampling (Leviathan et al. 2023, Chen et al. 2023):
  accept d with probability min(1, p(d) / q(d)); at the first rejection draw from
  norm(max(p - q, 0)); after K acceptances draw the bonus token from p. An n-gram proposal is a
  point mass (q(d) = 1), so it is accepted with probability p(d) and a rejection draws from p
  without d. The output then follows the target distribution p exactly, for any proposer.

Each row keeps its own cache length: after a step it is set to the accepted length (the pending
token and the accepted proposals); the rejected slots are overwritten by the next step. The random
numbers of row r's step come from `fold_in(fold_in(key(seed_r), token index), purpose)`, so a row's
tokens depend only on its own prompt, settings and seed (not on its batch-mates), though sampled
tokens differ from non-speculative sampling with the same seed (the same distribution, other draws).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax.compilation import EXECUTABLES, argument_signature
from qwen_jax.errors import GenerationError
from qwen_jax.generation.options import SamplingOptions
from qwen_jax.generation.sampler import History, RowParams, adjusted_logits, mark_seen, processed_logits
from qwen_jax.generation.static import (
    Generation,
    SpeculationStats,
    Timing,
    _keep,
    _prepare,
    _Request,
    _run_prefill,
    _Stream,
)
from qwen_jax.model.causal_lm import Qwen2ForCausalLM
from qwen_jax.model.kv_cache import KVCache

METHODS = ("ngram", "draft")
MAX_SPECULATIVE_TOKENS = 16  # each proposal is one more position in the compiled verification

_ACCEPT, _RESIDUAL, _DRAFT = 1, 2, 3  # purposes folded into a row's key: independent random streams


@dataclasses.dataclass(frozen=True)
class SpeculativeOptions:
    """How `generate` / `stream` speculate (`speculative=`; a string names the method with these defaults).

    Attributes:
        method: "ngram" (prompt lookup) or "draft" (a smaller model proposes).
        num_speculative_tokens: K, the tokens proposed per step (the target checks K + 1 positions).
        ngram_min: the shortest suffix of prompt + output looked up (ngram).
        ngram_max: the longest suffix looked up first (ngram).
        draft_model: the draft model (draft): a Qwen2ForCausalLM with the target's tokenizer.
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    ngram_min: int = 1
    ngram_max: int = 4
    draft_model: Qwen2ForCausalLM | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise GenerationError(
                f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}", param="speculative"
            )
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise GenerationError(
                f"num_speculative_tokens must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], got {k!r}",
                param="num_speculative_tokens",
            )
        for name in ("ngram_min", "ngram_max"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GenerationError(f"{name} must be an integer >= 1, got {value!r}", param=name)
        if self.ngram_min > self.ngram_max:
            raise GenerationError(
                f"ngram_min ({self.ngram_min}) must not exceed ngram_max ({self.ngram_max})", param="ngram_min"
            )
        if self.method == "draft" and not isinstance(self.draft_model, Qwen2ForCausalLM):
            raise GenerationError(
                "speculative method 'draft' needs draft_model=, a loaded Qwen2ForCausalLM "
                "(command line: --draft-model PATH|HUB_ID)",
                param="draft_model",
            )
        if self.method == "ngram" and self.draft_model is not None:
            raise GenerationError("draft_model is only used by the speculative method 'draft'", param="draft_model")


def resolve_speculative(
    speculative: str | SpeculativeOptions | None, model: Qwen2ForCausalLM, real_vocab_size: int | None = None
) -> SpeculativeOptions | None:
    """`SpeculativeOptions` from `speculative=` (a method name or the options), checked against `model`.

    real_vocab_size: the tokenizer's vocabulary (ids below it are real tokens), when known: a draft
    whose embedding table is padded to another size than the target's is accepted when both cover it.
    """
    if speculative is None:
        return None
    if isinstance(speculative, str):
        speculative = SpeculativeOptions(method=speculative)
    if not isinstance(speculative, SpeculativeOptions):
        raise GenerationError(
            f"speculative must be 'ngram', 'draft' or SpeculativeOptions, got {type(speculative).__name__}",
            param="speculative",
        )
    if speculative.draft_model is not None:
        check_draft_vocabulary(model, speculative.draft_model, real_vocab_size)
    return speculative


def check_draft_vocabulary(target: Qwen2ForCausalLM, draft: Qwen2ForCausalLM, real_vocab_size: int | None) -> None:
    """Refuse a draft whose vocabulary differs from the target's (GenerationError).

    Qwen2.5 checkpoints pad the embedding table to different sizes (151,936 for 0.5B-3B, 152,064 for
    7B-72B) over the same tokenizer; with the tokenizer's size known, the tables may differ as long
    as both cover the tokenizer (the draft's logits are fitted to the target's table, the padding
    ids can never be drawn). Without it (token-id calls), the sizes must be equal.
    """
    target_vocab, draft_vocab = target.config.vocab_size, draft.config.vocab_size
    if target_vocab == draft_vocab:
        return
    if real_vocab_size is not None and real_vocab_size <= min(target_vocab, draft_vocab):
        return
    known = "" if real_vocab_size is None else f" and the tokenizer's {real_vocab_size} tokens"
    raise GenerationError(
        f"the draft model's vocabulary ({draft_vocab} ids) differs from the target's ({target_vocab} ids){known}: "
        "a draft model must share the target's tokenizer",
        param="draft_model",
    )


# ----------------------------------------------------------------------------- proposals (host)
def ngram_proposals(tokens: Sequence[int], k: int, ngram_min: int, ngram_max: int) -> list[int]:
    """Prompt lookup: the (up to) k tokens that followed the latest earlier occurrence of the last n
    tokens of `tokens`, for the largest n in [ngram_min, ngram_max] that occurs; [] when none does.

    The latest occurrence followed by k tokens wins over a later one followed by fewer (inside a
    repeated run the latest occurrence overlaps the suffix and is followed by only one token)."""
    length = len(tokens)
    for n in range(min(ngram_max, length - 1), ngram_min - 1, -1):
        suffix = list(tokens[length - n :])
        first = suffix[0]
        best: list[int] = []
        for start in range(length - n - 1, -1, -1):  # latest first; the suffix itself is excluded
            if tokens[start] == first and list(tokens[start : start + n]) == suffix:
                following = list(tokens[start + n : start + n + k])
                if len(following) == k:
                    return following
                if len(following) > len(best):
                    best = following
        if best:
            return best
    return []


# ----------------------------------------------------------------------------- traced programs
@dataclasses.dataclass(frozen=True)
class VerificationStatic:
    """Everything a speculative step specialises on besides array shapes (also the engine's,
    `qwen_jax.engine.programs`)."""

    graphdef: Any
    draft_graphdef: Any | None  # None: proposals come from the host (ngram)
    num_tokens: int  # K
    sampled: bool  # some row samples: compile the rejection sampler (else argmax acceptance only)
    adjustments: bool  # logit bias and penalties compiled in (a history is carried)
    return_logits: bool
    cache_sharding: Any = None  # NamedSharding of the target's cache arrays, or None off a mesh
    draft_cache_sharding: Any = None


def _rolled_back(cache: KVCache, lengths: jax.Array, sharding) -> KVCache:
    """`cache` with `lengths`, its arrays kept in `sharding` (so every step has the same signature)."""
    k, v = cache.k, cache.v
    if sharding is not None:
        k = jax.lax.with_sharding_constraint(k, sharding)
        v = jax.lax.with_sharding_constraint(v, sharding)
    return KVCache(k, v, lengths)


def _row_keys(params: RowParams, index: jax.Array, purpose: int) -> jax.Array:
    def key(key_data, token_index):
        base = jax.random.wrap_key_data(key_data, impl="threefry2x32")
        return jax.random.fold_in(jax.random.fold_in(base, token_index), purpose)

    return jax.vmap(key)(params.key_data, index)


def _record(history: History | None, tokens: jax.Array, valid: jax.Array | None = None) -> History | None:
    """`history` after each row generated `tokens[row]` (where `valid`)."""
    if history is None:
        return None
    rows = jnp.arange(tokens.shape[0])
    added = jnp.ones_like(tokens) if valid is None else valid.astype(jnp.int32)
    return History(mark_seen(history.seen, tokens, valid), history.counts.at[rows, tokens].add(added), history.bias)


def _distributions(static: VerificationStatic, logits, history, params, index):
    """(the greedy token, the sampling distribution or None) of every row for token `index`, as the one
    sampler processes `logits` (the distribution only when the variant samples)."""
    params = dataclasses.replace(params, token_index=index)
    adjusted = adjusted_logits(logits, history, params) if static.adjustments else logits.astype(jnp.float32)
    greedy = jnp.argmax(adjusted, axis=-1).astype(jnp.int32)
    if not static.sampled:
        return greedy, None
    if history is None:
        rows, vocab = logits.shape
        history = History.empty(rows, vocab)
    return greedy, jax.nn.softmax(processed_logits(logits, history, params), axis=-1)


def _draw(keys: jax.Array, weights: jax.Array) -> jax.Array:
    """One id per row from the unnormalised non-negative `weights` `[rows, vocab]`."""
    return jax.vmap(lambda key, w: jax.random.categorical(key, jnp.log(w)))(keys, weights).astype(jnp.int32)


def _fit_vocabulary(logits: jax.Array, vocab: int) -> jax.Array:
    """Draft logits on the target's vocabulary: padding ids the draft lacks are never proposed."""
    have = logits.shape[-1]
    if have >= vocab:
        return logits[..., :vocab]
    return jnp.pad(logits, ((0, 0), (0, vocab - have)), constant_values=-jnp.inf)


def draft_proposals(
    static: VerificationStatic, draft: Qwen2ForCausalLM, cache: KVCache, pending, history, params, count, vocab: int
):
    """K draft tokens per row `[B, K]`, and (when sampling, else None) the draft distributions q
    `[B, K, vocab]` they were drawn from, and the draft's cache; traced inside a speculative step
    (generate's and the engine's).

    The draft reads `pending` `[B]` at each row's cache length, which must hold every earlier token.
    Rows draw as the one sampler does for token `count + i` (`history`, `params`: the target's), on
    the target's `vocab`. The draft also reads its K-th proposal (K + 1 forwards), so its cache holds
    every token the target may accept: after the check, set its lengths to the target's."""
    token, proposals, probabilities = pending, [], []
    for i in range(static.num_tokens + 1):
        logits, cache = draft.forward(token[:, None], cache.lengths[:, None], None, cache=cache)
        if i == static.num_tokens:
            break
        logits = _fit_vocabulary(logits[:, 0], vocab)
        greedy, q = _distributions(static, logits, history, params, count + i)
        token = greedy
        if q is not None:
            drawn = _draw(_row_keys(params, count + i, _DRAFT), q)
            token = jnp.where(params.temperature > 0, drawn, greedy)
            probabilities.append(q)
        proposals.append(token)
        history = _record(history, token)
    q = jnp.stack(probabilities, axis=1) if probabilities else None
    return jnp.stack(proposals, axis=1), q, cache


def verify_proposals(
    static: VerificationStatic, model, cache, pending, proposals, num_proposed, q, history, params, count, active
):
    """The target's check of `proposals` `[B, K]` (the first `num_proposed` of each row are real), traced
    inside a speculative step (generate's and the engine's).

    `pending` `[B]` is each row's last token (not in the cache yet), `count` `[B]` its index among the
    generated tokens, `q` the draft's distributions `[B, K, V]` (None: point-mass proposals, ngram),
    `active` `[B]` the rows that decode (the others keep their cache length and history).

    Returns the step's tokens `[B, K + 1]` (the accepted proposals, then the target's own token at
    index `accepted`), `accepted` `[B]`, the cache rolled back to the accepted length, the history
    after the step's tokens, and (with return_logits) the raw logits of the K + 1 positions.
    """
    k = static.num_tokens
    batch = pending.shape[0]
    inputs = jnp.concatenate([pending[:, None], proposals], axis=1)
    positions = cache.lengths[:, None] + jnp.arange(k + 1, dtype=jnp.int32)[None, :]
    lengths = cache.lengths
    logits, cache = model.forward(inputs, positions, None, cache=cache)
    rows = jnp.arange(batch)
    sampling = params.temperature > 0
    accepts, own_tokens, step_history = [], [], history
    for j in range(k + 1):
        greedy, p = _distributions(static, logits[:, j], step_history, params, count + j)
        own = greedy
        if j < k:
            proposal = proposals[:, j]
            accept = proposal == greedy
            if p is not None:
                p_proposal = p[rows, proposal]
                # ngram proposals are a point mass: q(d) = 1 and the residual is p without d.
                q_j = jax.nn.one_hot(proposal, p.shape[-1], dtype=p.dtype) if q is None else q[:, j]
                u = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(
                    _row_keys(params, count + j, _ACCEPT)
                )
                accept = jnp.where(sampling, u * q_j[rows, proposal] < p_proposal, accept)
                residual = jnp.maximum(p - q_j, 0.0)
                # A position past the row's proposals (a short n-gram match) draws from p itself.
                usable = (jnp.sum(residual, axis=-1, keepdims=True) > 0) & (j < num_proposed)[:, None]
                residual = jnp.where(usable, residual, p)
                own = jnp.where(sampling, _draw(_row_keys(params, count + j, _RESIDUAL), residual), greedy)
            accepts.append(accept & (j < num_proposed))
            step_history = _record(step_history, proposal)
        elif p is not None:  # the bonus token, from p itself
            own = jnp.where(sampling, _draw(_row_keys(params, count + j, _RESIDUAL), p), greedy)
        own_tokens.append(own)
    accepted = jnp.sum(jnp.cumprod(jnp.stack(accepts, axis=1).astype(jnp.int32), axis=1), axis=1)
    own = jnp.take_along_axis(jnp.stack(own_tokens, axis=1), accepted[:, None], axis=1)[:, 0]
    steps = jnp.arange(k + 1, dtype=jnp.int32)[None, :]
    padded = jnp.concatenate([proposals, jnp.zeros((batch, 1), jnp.int32)], axis=1)
    tokens = jnp.where(steps < accepted[:, None], padded, jnp.where(steps == accepted[:, None], own[:, None], 0))
    for j in range(k + 1):
        history = _record(history, tokens[:, j], (j <= accepted) & active)
    cache = _rolled_back(cache, lengths + jnp.where(active, accepted + 1, 0), static.cache_sharding)
    return tokens, accepted, cache, history, logits if static.return_logits else None


def _ngram_step(
    static: VerificationStatic, state, cache, pending, proposals, num_proposed, history, params, count, active
):
    model = nnx.merge(static.graphdef, state)
    return verify_proposals(
        static, model, cache, pending, proposals, num_proposed, None, history, params, count, active
    )


def _draft_step(
    static: VerificationStatic, state, draft_state, cache, draft_cache, pending, history, params, count, active
):
    model = nnx.merge(static.graphdef, state)
    draft = nnx.merge(static.draft_graphdef, draft_state)
    lengths = draft_cache.lengths
    proposals, q, draft_cache = draft_proposals(
        static, draft, draft_cache, pending, history, params, count, model.config.vocab_size
    )
    num_proposed = jnp.full_like(count, static.num_tokens)
    tokens, accepted, cache, history, logits = verify_proposals(
        static, model, cache, pending, proposals, num_proposed, q, history, params, count, active
    )
    draft_cache = _rolled_back(draft_cache, lengths + jnp.where(active, accepted + 1, 0), static.draft_cache_sharding)
    return tokens, accepted, cache, draft_cache, history, logits


# `static` (argument 0) is hashable; the caches are donated.
_NGRAM_STEP = jax.jit(_ngram_step, static_argnums=0, donate_argnums=2)
_DRAFT_STEP = jax.jit(_draft_step, static_argnums=0, donate_argnums=(3, 4))


def _compiled(name: str, jitted, static: VerificationStatic, args: tuple) -> tuple[Any, float]:
    key = (name, static, argument_signature(args))
    return EXECUTABLES.get(f"generation.{name}", key, lambda: jitted.lower(static, *args).compile())


# ----------------------------------------------------------------------------- the host loop
class _Run:
    """One speculative generation of a batch: `steps()` yields each step's new tokens per row."""

    def __init__(
        self,
        model: Qwen2ForCausalLM,
        prompts: Sequence[Sequence[int]],
        options: SamplingOptions,
        seeds: Sequence[int],
        speculative: SpeculativeOptions,
        pad_id: int | None,
        return_logits: bool,
        prefill_chunk: int | None,
        prefix_cache: bool = False,
    ):
        k = speculative.num_speculative_tokens
        slack = k + 1  # a step writes K + 1 slots past a row's length
        self.speculative = speculative
        # With prefix_cache, the target and the draft each reuse and keep their own cache (a step
        # leaves both holding the prompt and the tokens but the last, as plain decoding does).
        self.request = _prepare(
            model,
            prompts,
            options,
            seeds,
            pad_id,
            return_logits,
            prefill_chunk,
            cache_slack=slack,
            prefix_cache=prefix_cache,
        )
        self.draft_request: _Request | None = None
        if speculative.draft_model is not None:
            self.draft_request = _prepare(
                speculative.draft_model,
                prompts,
                options,
                seeds,
                pad_id,
                False,
                prefill_chunk,
                cache_slack=slack,
                prefix_cache=prefix_cache,
            )
        variant = self.request.static.variant
        self.static = VerificationStatic(
            graphdef=self.request.static.graphdef,
            draft_graphdef=None if self.draft_request is None else self.draft_request.static.graphdef,
            num_tokens=k,
            sampled=not variant.greedy,
            adjustments=variant.adjustments,
            return_logits=return_logits,
            cache_sharding=self.request.static.cache_sharding,
            draft_cache_sharding=None if self.draft_request is None else self.draft_request.static.cache_sharding,
        )
        self.prompts = [list(map(int, p)) for p in prompts]
        self.timing = Timing()
        self.stats = SpeculationStats()
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.logits: list[list[np.ndarray]] = [[] for _ in prompts]
        self.finish = ["length"] * len(prompts)
        self.cache: KVCache | None = None  # the latest step's caches (None while a step runs on them)
        self.draft_cache: KVCache | None = None

    def _take(self, row: int, new: Sequence[int], logits: np.ndarray | None) -> bool:
        """Append a row's new tokens up to max_new_tokens and the first stop id; whether the row ended."""
        request = self.request
        out = self.tokens[row]
        for i, token in enumerate(new):
            out.append(int(token))
            if logits is not None:
                self.logits[row].append(logits[i])
            if token in request.options.stop_token_ids:
                self.finish[row] = "stop"
                return True
            if len(out) >= request.max_new_tokens:
                return True
        return False

    def steps(self) -> Iterator[list[list[int]]]:
        request, draft_request, static = self.request, self.draft_request, self.static
        timing, stats, k = self.timing, self.stats, static.num_tokens
        batch = len(self.prompts)
        first, cache, history, first_logits = _run_prefill(request, timing)
        draft_cache = None
        if draft_request is not None:
            draft_timing = Timing()
            _, draft_cache, _, _ = _run_prefill(draft_request, draft_timing)
            timing.compile_s += draft_timing.compile_s
            timing.prefill_s += draft_timing.prefill_s
        self.cache, self.draft_cache = cache, draft_cache
        first = np.asarray(first)
        first_logits = None if first_logits is None else np.asarray(first_logits)
        active = np.ones(batch, bool)
        new = []
        for row in range(batch):
            active[row] = not self._take(
                row, [int(first[row])], None if first_logits is None else first_logits[row : row + 1]
            )
            new.append([int(first[row])])
        yield new
        executable = None
        start = time.perf_counter()
        while active.any():
            count = np.asarray([len(t) for t in self.tokens], np.int32)
            pending = np.asarray([t[-1] for t in self.tokens], np.int32)
            common = (history, request.params, request.put(count), request.put(active))
            if draft_request is None:
                proposals = np.zeros((batch, k), np.int32)
                num_proposed = np.zeros(batch, np.int32)
                for row in np.flatnonzero(active):
                    found = ngram_proposals(
                        self.prompts[row] + self.tokens[row], k, self.speculative.ngram_min, self.speculative.ngram_max
                    )
                    proposals[row, : len(found)] = found
                    num_proposed[row] = len(found)
                args = (
                    request.state,
                    cache,
                    request.put(pending),
                    request.put(proposals),
                    request.put(num_proposed),
                    *common,
                )
                jitted, name = _NGRAM_STEP, "speculative_ngram_step"
            else:
                num_proposed = np.where(active, k, 0)
                args = (request.state, draft_request.state, cache, draft_cache, request.put(pending), *common)
                jitted, name = _DRAFT_STEP, "speculative_draft_step"
            if executable is None:  # every step has the same signature: look it up once
                executable, compile_s = _compiled(name, jitted, static, args)
                timing.compile_s += compile_s
                start = time.perf_counter()
            del cache, draft_cache
            self.cache = self.draft_cache = None  # donated
            if draft_request is None:
                tokens, accepted, cache, history, logits = executable(*args)
                draft_cache = None
            else:
                tokens, accepted, cache, draft_cache, history, logits = executable(*args)
            self.cache, self.draft_cache = cache, draft_cache
            del args, common
            tokens, accepted = np.asarray(tokens), np.asarray(accepted)
            logits = None if logits is None else np.asarray(logits)
            new = [[] for _ in range(batch)]
            for row in np.flatnonzero(active):
                before = len(self.tokens[row])
                ended = self._take(row, tokens[row, : accepted[row] + 1], None if logits is None else logits[row])
                new[row] = self.tokens[row][before:]
                stats.steps += 1
                stats.proposed_tokens += int(num_proposed[row])
                stats.accepted_tokens += int(accepted[row])
                stats.generated_tokens += len(new[row])
                active[row] = not ended
            timing.decode_s = time.perf_counter() - start
            timing.decode_tokens = sum(map(len, self.tokens)) - batch
            yield new

    def keep(self) -> None:
        """Leave the target's and the draft's caches for their models' next calls (with `prefix_cache`)."""
        _keep(self.request, self.tokens, self.cache)
        if self.draft_request is not None:
            _keep(self.draft_request, self.tokens, self.draft_cache)

    def result(self) -> Generation:
        logits = None
        if self.static.return_logits:
            logits = [np.stack(rows) for rows in self.logits]
        return Generation(
            [list(t) for t in self.tokens],
            list(self.finish),
            self.request.prompt_lengths,
            self.timing,
            logits=logits,
            speculation=self.stats,
        )


def generate_batch(
    model: Qwen2ForCausalLM,
    prompts: Sequence[Sequence[int]],
    options: SamplingOptions,
    seeds: Sequence[int],
    speculative: SpeculativeOptions,
    pad_id: int | None = None,
    return_logits: bool = False,
    prefill_chunk: int | None = None,
    prefix_cache: bool = False,
) -> Generation:
    """`qwen_jax.generation.static.generate_batch` with speculation: row r of `prompts` seeded with
    `seeds[r]`; `Generation.speculation` holds the acceptance statistics; `prefix_cache` as there
    (the draft model reuses and keeps its own cache too)."""
    run = _Run(model, prompts, options, seeds, speculative, pad_id, return_logits, prefill_chunk, prefix_cache)
    for _ in run.steps():
        pass
    run.keep()
    return run.result()


class SpeculativeTokenStream(_Stream):
    """Iterator over the ids generated for one prompt with speculation (several per target step).

    After the iteration ends (or `close()`), `result` holds the `Generation`."""

    def __init__(
        self,
        model: Qwen2ForCausalLM,
        prompt_ids: Sequence[int],
        options: SamplingOptions,
        speculative: SpeculativeOptions,
        pad_id: int | None = None,
        return_logits: bool = False,
        prefill_chunk: int | None = None,
        prefix_cache: bool = False,
    ):
        self._spec_run = _Run(
            model,
            [prompt_ids],
            options,
            [options.seed],
            speculative,
            pad_id,
            return_logits,
            prefill_chunk,
            prefix_cache,
        )
        super().__init__()

    def _run(self) -> Iterator[int]:
        yielded = 0
        try:
            for new in self._spec_run.steps():
                for token in new[0]:
                    yielded += 1
                    yield token
        finally:
            self._spec_run.keep()
            result = self._spec_run.result()
            if len(result.token_ids[0]) > yielded:  # closed inside a step: the result is what was yielded
                result.token_ids[0] = result.token_ids[0][:yielded]
                result.finish_reasons[0] = "length"
                if result.logits is not None:
                    result.logits[0] = result.logits[0][:yielded]
            self.result = result
