"""The engine's device side: the batch KV cache, per-slot state and a fixed set of compiled programs.

Programs (all pure functions of the model state; compiled ahead of time, never while serving
once `compile_all` ran):
- `prefill[bucket]`: one prompt, right-padded to `bucket`, through the model into a fresh
  one-row cache; returns that cache, the last real token's logits and the prompt's token set.
- `sample[rows, variant]`: per-row sampling (`qwen_jax.engine.sampler`) for 1 row (a prefilled
  prompt) or all slots (a decode step); updates each row's last token, seen-token set and index.
- `logprobs[rows]`: log-softmax of the raw logits: the chosen token's and the top 20.
- `insert`: writes a prefilled one-row cache and its row state into one slot of the batch.
- `decode`: one token for every slot; each row attends only to its own filled cache.

The batch cache is `KVCache` with per-row lengths: every row's keys start at slot 0, so a
request's cache layout, positions and hence its logits do not depend on its batch-mates.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qwen_jax.engine.requests import MAX_TOP_LOGPROBS, RequestOptions
from qwen_jax.engine.sampler import RowParams, SamplerVariant, sample_rows, seed_key_data, variant_for
from qwen_jax.generation import prompt_bucket
from qwen_jax.model import KVCache
from qwen_jax.sampling import mark_seen
from qwen_jax.sharding import named_sharding


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
    """Per-row decoding state, `[rows]` leading axis."""

    tokens: jax.Array  # int32: each row's last token (the next decode step's input)
    params: RowParams
    seen: jax.Array  # bool [rows, vocab]: ids in the row's sequence (repetition penalty)


@dataclasses.dataclass
class StepOutputs:
    """Device results of one dispatched program, read back later (see `Engine._process`)."""

    rows: list  # the Request each row belonged to when dispatched (None: unused row)
    tokens: jax.Array
    logprobs: tuple[jax.Array, jax.Array, jax.Array] | None

    def fetch(self) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
        tokens = np.asarray(self.tokens)
        logprobs = None if self.logprobs is None else tuple(np.asarray(x) for x in self.logprobs)
        return tokens, logprobs


def prefill_buckets(max_len: int, buckets=None) -> tuple[int, ...]:
    """Padded prompt lengths: powers of two from 16, the last one max_len - 1 (the longest prompt)."""
    if buckets is not None:
        chosen = tuple(sorted({int(b) for b in buckets}))
        if not chosen or chosen[0] < 1 or chosen[-1] > max_len:
            raise ValueError(f"prefill buckets must lie in [1, {max_len}], got {list(buckets)}")
        if chosen[-1] < max_len - 1:
            chosen += (max_len - 1,)
        return chosen
    out, bucket = [], prompt_bucket(1)
    while bucket < max_len - 1:
        out.append(bucket)
        bucket *= 2
    return (*out, max_len - 1)


_EXECUTABLES: dict[tuple, Any] = {}
_COMPILE_LOCK = threading.Lock()


class EnginePrograms:
    """Owns the batch cache and slot state and runs the compiled programs on them (engine thread only)."""

    def __init__(self, model, *, slots: int, max_len: int, buckets=None, pad_id: int = 0):
        self.config = model.config
        self.vocab = model.config.vocab_size
        self.slots = slots
        self.max_len = max_len
        self.buckets = prefill_buckets(max_len, buckets)
        self.pad_id = int(pad_id)
        self.dtype = model.dtype
        self.graphdef, self.state = nnx.split(model)
        self.mesh, self.rules = model.mesh, model.rules
        self.compile_seconds = 0.0
        # What the compiled programs specialise on besides each program's own key.
        state_signature = tuple((x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(self.state))
        self._signature = (self.graphdef, state_signature, slots, max_len, self.dtype, self.mesh, self.rules)
        self.cache = self._put_cache(_init_cache(self.config, slots, max_len, self.dtype), slots, max_len)
        self.slot_state = self._put_small(self._empty_state(slots))

    # ------------------------------------------------------------------ placement
    def _replicated(self) -> NamedSharding | None:
        return None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())

    def _cache_sharding(self, batch: int, length: int):
        if self.mesh is None:
            return None
        return _cache_shardings(self.config, batch, length, self.mesh, self.rules)

    def _logits_sharding(self, rows: int):
        if self.mesh is None:
            return None
        return named_sharding(("batch", "vocab"), (rows, self.vocab), self.mesh, self.rules)

    def _put_small(self, tree):
        sharding = self._replicated()
        return jax.tree.map(lambda x: jax.device_put(x, sharding) if sharding is not None else jax.device_put(x), tree)

    def _put_cache(self, cache, batch: int, length: int):
        if self.mesh is None:
            return cache
        return jax.device_put(cache, self._cache_sharding(batch, length))

    def _empty_state(self, rows: int) -> SlotState:
        params = RowParams(
            temperature=np.zeros(rows, np.float32), top_k=np.zeros(rows, np.int32), top_p=np.ones(rows, np.float32),
            min_p=np.zeros(rows, np.float32), repetition_penalty=np.ones(rows, np.float32),
            key_data=np.zeros((rows, 2), np.uint32), token_index=np.zeros(rows, np.int32))
        return SlotState(np.zeros(rows, np.int32), params, np.zeros((rows, self.vocab), bool))

    # ------------------------------------------------------------------ compilation
    def _executable(self, key: tuple, build: Callable[[], Any]):
        """The compiled program for `key`, shared by every engine of the same model structure and sizes."""
        key = (*key, self._signature)
        executable = _EXECUTABLES.get(key)
        if executable is None:
            with _COMPILE_LOCK:
                executable = _EXECUTABLES.get(key)
                if executable is None:
                    start = time.perf_counter()
                    executable = build()
                    self.compile_seconds += time.perf_counter() - start
                    _EXECUTABLES[key] = executable
        return executable

    def compile_all(self) -> float:
        """Compile every program this engine can run; returns the seconds it took now."""
        start = time.perf_counter()
        for bucket in self.buckets:
            self._prefill_executable(bucket)
        for rows in (1, self.slots):
            for variant in SamplerVariant:
                self._sample_executable(rows, variant)
            self._logprobs_executable(rows)
        self._insert_executable()
        self._decode_executable()
        return time.perf_counter() - start

    def _abstract(self, tree, sharding_tree=None):
        def one(x, sharding=None):
            return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype,
                                        sharding=sharding)

        if sharding_tree is None:
            sharding = self._replicated()
            return jax.tree.map(lambda x: one(x, sharding), tree)
        return jax.tree.map(one, tree, sharding_tree)

    def _state_abstract(self):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)

    def _prefill_executable(self, bucket: int):
        def build():
            graphdef, config, dtype = self.graphdef, self.config, self.dtype

            def prefill(state, input_ids, length):
                model = nnx.merge(graphdef, state)
                logits, cache = _prefill_forward(model, input_ids, length, _init_cache(config, 1, bucket, dtype))
                seen = mark_seen(jnp.zeros((1, config.vocab_size), bool), input_ids,
                                 (jnp.arange(bucket) < length)[None])
                return cache, logits, seen

            ids = jax.ShapeDtypeStruct((1, bucket), jnp.int32, sharding=self._replicated())
            length = jax.ShapeDtypeStruct((), jnp.int32, sharding=self._replicated())
            out_shardings = None if self.mesh is None else (
                self._cache_sharding(1, bucket), self._logits_sharding(1), self._replicated())
            return jax.jit(prefill, out_shardings=out_shardings).lower(self._state_abstract(), ids, length).compile()

        return self._executable(("prefill", bucket), build)

    def _sample_executable(self, rows: int, variant: SamplerVariant):
        def build():
            def sample(logits, slot_state: SlotState):
                tokens = sample_rows(logits, slot_state.seen, slot_state.params, variant)
                params = dataclasses.replace(slot_state.params, token_index=slot_state.params.token_index + 1)
                return SlotState(tokens, params, mark_seen(slot_state.seen, tokens)), tokens

            logits = jax.ShapeDtypeStruct((rows, self.vocab), jnp.float32, sharding=self._logits_sharding(rows))
            state = self._abstract(self._empty_state(rows))
            out_shardings = None if self.mesh is None else self._replicated()
            return jax.jit(sample, donate_argnums=1, out_shardings=out_shardings).lower(logits, state).compile()

        return self._executable(("sample", rows, variant), build)

    def _logprobs_executable(self, rows: int):
        def build():
            def logprobs(logits, tokens):
                log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
                chosen = jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]
                top_values, top_ids = jax.lax.top_k(log_probs, MAX_TOP_LOGPROBS)
                return chosen, top_ids, top_values

            logits = jax.ShapeDtypeStruct((rows, self.vocab), jnp.float32, sharding=self._logits_sharding(rows))
            tokens = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=self._replicated())
            out_shardings = None if self.mesh is None else self._replicated()
            return jax.jit(logprobs, out_shardings=out_shardings).lower(logits, tokens).compile()

        return self._executable(("logprobs", rows), build)

    def _insert_executable(self):
        def build():
            def insert(cache, slot_state, row_cache, row_state, slot, length):
                cache = _insert_row(cache, row_cache, slot, length)
                slot_state = jax.tree.map(
                    lambda whole, row: jax.lax.dynamic_update_index_in_dim(whole, row[0], slot, 0),
                    slot_state, row_state)
                return cache, slot_state

            cache = self._cache_abstract(self.slots, self.max_len)
            row_cache = {bucket: self._cache_abstract(1, bucket) for bucket in self.buckets}
            state = self._abstract(self._empty_state(self.slots))
            row_state = self._abstract(self._empty_state(1))
            scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=self._replicated())
            out_shardings = None if self.mesh is None else (self._cache_sharding(self.slots, self.max_len),
                                                            self._replicated())
            jitted = jax.jit(insert, donate_argnums=(0, 1), out_shardings=out_shardings)
            return {bucket: jitted.lower(cache, state, row_cache[bucket], row_state, scalar, scalar).compile()
                    for bucket in self.buckets}

        return self._executable(("insert",), build)

    def _decode_executable(self):
        def build():
            graphdef = self.graphdef

            def decode(state, cache, tokens, active):
                model = nnx.merge(graphdef, state)
                return _decode_forward(model, cache, tokens, active)

            cache = self._cache_abstract(self.slots, self.max_len)
            tokens = jax.ShapeDtypeStruct((self.slots,), jnp.int32, sharding=self._replicated())
            active = jax.ShapeDtypeStruct((self.slots,), jnp.bool_, sharding=self._replicated())
            out_shardings = None if self.mesh is None else (self._logits_sharding(self.slots),
                                                            self._cache_sharding(self.slots, self.max_len))
            return (jax.jit(decode, donate_argnums=1, out_shardings=out_shardings)
                    .lower(self._state_abstract(), cache, tokens, active).compile())

        return self._executable(("decode",), build)

    def _cache_abstract(self, batch: int, length: int):
        abstract = jax.eval_shape(lambda: _init_cache(self.config, batch, length, self.dtype))
        if self.mesh is None:
            return abstract
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                            self._cache_sharding(batch, length))

    # ------------------------------------------------------------------ running
    def prefill_into_slot(self, prompt_ids: list[int], options: RequestOptions, slot: int, request) -> StepOutputs:
        """Prefill one prompt, sample its first token and insert it into `slot` (all dispatched asynchronously)."""
        length = len(prompt_ids)
        bucket = next(b for b in self.buckets if b >= length)
        ids = np.full((1, bucket), self.pad_id, np.int32)
        ids[0, :length] = prompt_ids
        put = self._put_small
        ids, length_arg, slot_arg = put(ids), put(np.int32(length)), put(np.int32(slot))
        row_cache, logits, seen = self._prefill_executable(bucket)(self.state, ids, length_arg)
        params = put(_row_params([options]))
        row_state = SlotState(put(np.zeros(1, np.int32)), params, seen)
        variant = variant_for([(options.temperature, options.top_k)])
        row_state, tokens = self._sample_executable(1, variant)(logits, row_state)
        logprobs = self._logprobs_executable(1)(logits, tokens) if options.logprobs is not None else None
        insert = self._insert_executable()[bucket]
        self.cache, self.slot_state = insert(self.cache, self.slot_state, row_cache, row_state, slot_arg, length_arg)
        return StepOutputs([request], tokens, logprobs)

    def decode_step(self, rows: list) -> StepOutputs:
        """One token for every slot whose entry in `rows` is a Request (None: left idle)."""
        active = self._put_small(np.asarray([r is not None for r in rows]))
        logits, self.cache = self._decode_executable()(self.state, self.cache, self.slot_state.tokens, active)
        variant = variant_for([(r.options.temperature, r.options.top_k) for r in rows if r is not None])
        self.slot_state, tokens = self._sample_executable(self.slots, variant)(logits, self.slot_state)
        wants_logprobs = any(r is not None and r.options.logprobs is not None for r in rows)
        logprobs = self._logprobs_executable(self.slots)(logits, tokens) if wants_logprobs else None
        return StepOutputs(list(rows), tokens, logprobs)


def _row_params(options: list[RequestOptions]) -> RowParams:
    return RowParams(
        temperature=np.asarray([o.temperature for o in options], np.float32),
        top_k=np.asarray([o.top_k for o in options], np.int32),
        top_p=np.asarray([o.top_p for o in options], np.float32),
        min_p=np.asarray([o.min_p for o in options], np.float32),
        repetition_penalty=np.asarray([o.repetition_penalty for o in options], np.float32),
        key_data=np.stack([seed_key_data(o.seed) for o in options]),
        token_index=np.zeros(len(options), np.int32),
    )


# ----------------------------------------------------------------------------- model calls
# TEMPORARY stand-in until the per-row-length KVCache lands on main: each row runs the model
# with its own one-row cache and index (vmap). Replaced by KVCache(lengths=...) calls.
def _init_cache(config, batch: int, length: int, dtype):
    return (KVCache.init(config, batch, length, dtype), jnp.zeros((batch,), jnp.int32))


def _cache_shardings(config, batch, length, mesh, rules):
    shape = (config.num_hidden_layers, batch, length, config.num_key_value_heads, config.head_dim)
    kv = named_sharding(KVCache.logical_axes(), shape, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    return (KVCache(kv, kv, replicated), replicated)


def _prefill_forward(model, input_ids, length, cache):
    """Run a right-padded prompt `[1, bucket]` into `cache`; logits `[1, V]` of its last real token."""
    kv, _ = cache
    bucket = input_ids.shape[1]
    positions = jnp.arange(bucket, dtype=jnp.int32)[None]
    hidden, kv = model.hidden_states(input_ids, positions, jnp.ones((1, kv.max_len), jnp.int32), cache=kv)
    last = jax.lax.dynamic_slice_in_dim(hidden, length - 1, 1, axis=1)
    return model.logits(last)[:, 0], (kv, jnp.full((1,), length, jnp.int32))


def _decode_forward(model, cache, tokens, active):
    """One token per row at each row's own length; rows not `active` keep their length."""
    kv, lengths = cache
    max_len = kv.max_len

    def one_row(k, v, token, length):
        row = KVCache(k[:, None], v[:, None], length)
        mask = (jnp.arange(max_len) <= length).astype(jnp.int32)[None]
        logits, row = model.forward(token[None, None], length[None, None], mask, cache=row)
        return logits[0, 0], row.k[:, 0], row.v[:, 0]

    logits, k, v = jax.vmap(one_row, in_axes=(1, 1, 0, 0), out_axes=(0, 1, 1))(kv.k, kv.v, tokens, lengths)
    return logits, (KVCache(k, v, kv.index), jnp.where(active, lengths + 1, lengths))


def _insert_row(cache, row_cache, slot, length):
    kv, lengths = cache
    row_kv, _ = row_cache
    k = jax.lax.dynamic_update_slice(kv.k, row_kv.k.astype(kv.k.dtype), (0, slot, 0, 0, 0))
    v = jax.lax.dynamic_update_slice(kv.v, row_kv.v.astype(kv.v.dtype), (0, slot, 0, 0, 0))
    return (KVCache(k, v, kv.index), lengths.at[slot].set(length))
