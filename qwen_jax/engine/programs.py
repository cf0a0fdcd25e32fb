"""The engine's device side: the batch KV cache, per-slot state and a fixed set of compiled programs.

Programs (pure functions of the model state, compiled ahead of time; after `compile_all` nothing
compiles while serving):
- `prefill[bucket]`: one prompt, right-padded to `bucket`, into a fresh one-row `KVCache`; returns
  that cache, the logits of its last real token and the prompt's token set (repetition penalty).
- `sample[variant]`: per-row sampling (`qwen_jax.generation.sampler`, the sampler `qwen_jax.generate`
  uses too) of a prefilled prompt's first token into its one-row state (last token, penalty
  history, token index).
- `insert[bucket]`: `KVCache.insert` of a prefilled one-row cache, and its row state, into a slot.
- `start`: a request's row state into a slot whose cache row is emptied (before chunked prefill).
- `mixed[count, chunk]`: a decode step of all the slots fused with the next chunks (up to `chunk`
  tokens each) of the prompts of up to `count` slots, each written into its slot's cache row
  (chunked prefill, `qwen_jax.model.mixed.mixed_hidden_states`): the decode rows ride on the
  chunks' matrix products instead of waiting for a separate prefill. `chunk_shapes` lists the
  (count, chunk) pairs: one chunk of any compiled length, or several short ones within the token
  budget (`prefill_chunk`). A chunk's row is one of the slots (idle in the decode part); its
  logits are those of the chunk's last real token. Mixed steps run at the full width only, not at
  every decode width: a mixed step's cost is mostly its chunks' tokens through every weight, to
  which the idle rows add one token each (and, with the chunked attention that cached calls use
  except cuDNN on a GPU, no attention: it reads only a row's filled cache; cuDNN reads each row's
  whole buffer, as a full-width decode step does), while each mixed program is among the slowest
  to compile (every layer of the model, with one attention call per chunk): per-width copies
  multiplied the warm-up (26 mixed programs instead of 8 for 8 slots on CPU).
- `decode[width]`: one token for each of the first `width` slots (`decode_widths`: 1, 2, 4, ...,
  slots); each row attends to its own filled cache and advances its own length (`KVCache`
  contract); idle rows keep their length. The engine keeps its requests in the lowest slots, so a
  step costs what its occupied rows cost, not what `slots` rows cost.
- `step_sample[width, variant]`: sampling of the rows a step produced a token for into the slot state.
  The samplers take each row's allowed tokens as a packed bitmask (structured output,
  `qwen_jax.generation.constraints`): the engine computes it on the host after the step's forward
  is dispatched (`decode_step` / `mixed_step` take a function that gives it); rows without a
  constraint, and steps without one, use an all-ones bitmask kept on the device.
- `logprobs[rows]`: log-softmax of the raw logits: the chosen token's and the 20 most likely.
- `move`: copy one slot's cache row and state into another (the engine closes gaps with it).
- `speculate[width, sampled]` (an engine built with `speculative_tokens` K > 0): the target's check
  of up to K proposed tokens per row for the first `width` slots in one forward of K + 1 positions
  (`speculative_widths`: the decode widths up to the one covering `speculative_rows` rows)
  (`qwen_jax.generation.speculative.verify_proposals`, the check `qwen_jax.generate` runs: greedy
  rows accept the proposals equal to the target's argmax, sampling rows -- compiled in only when
  `sampled` -- use rejection sampling); each row's cache is rolled back to its accepted length and
  its state advanced past its step's tokens. `speculate_logprobs[width]`: logprobs of the K + 1
  positions.
- With a draft model (`draft_model`), the draft has its own batch cache (one row per slot, `max_len`
  tokens, the draft's layers and heads) and two more programs: `draft_catch_up[width, chunk]` writes up
  to `chunk` tokens per row (`draft_chunks`) into the draft's cache rows at given offsets (the tokens a row's
  draft has not read yet: its prompt, tokens decoded without speculation), and `speculate[width,
  sampled]` then first runs the draft K + 1 times on the rows that propose
  (`qwen_jax.generation.speculative.draft_proposals`, as `qwen_jax.generate` does) and checks its
  proposals with the target, in one program; the draft's cache is rolled back with the target's.
  `move` moves a slot's draft cache row too.

The batch cache has per-row lengths and every row's keys start at slot 0, so a request's cache
layout, positions and logits do not depend on its batch-mates or on the slot it sits in.

Programs are compiled into the shared executable cache (`qwen_jax.compilation.EXECUTABLES`, names
"engine.prefill", "engine.decode", ...), so engines with the same model structure, shardings and
sizes share them; each engine also keeps its own programs in a map looked up by a short key.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qwen_jax.compilation import EXECUTABLES
from qwen_jax.engine.requests import MAX_TOP_LOGPROBS
from qwen_jax.errors import EngineError
from qwen_jax.generation.constraints import bitmask_words
from qwen_jax.generation.options import SamplingOptions, initial_history, row_params
from qwen_jax.generation.sampler import (
    ENGINE_VARIANTS,
    History,
    RowParams,
    SamplerVariant,
    covering_variant,
    mark_seen,
    sample_rows,
    variant_for,
)
from qwen_jax.generation.speculative import VerificationStatic, draft_proposals, verify_proposals
from qwen_jax.generation.static import prompt_bucket
from qwen_jax.model.kv_cache import KVCache
from qwen_jax.model.mixed import mixed_hidden_states
from qwen_jax.sharding import named_sharding, platform_of

# Given a step's rows (Requests, None for idle rows), their allowed tokens on the host (None: every token).
BitmaskFunction = Callable[[list], "np.ndarray | None"]
# Tokens per row of a short draft catch-up step (a few tokens decoded without speculation); prompts
# are read by steps of the prefill chunk's length (`EnginePrograms.draft_chunks`).
DRAFT_CATCH_UP_TOKENS = 16


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
    """Per-row decoding state, `[rows]` leading axis."""

    tokens: jax.Array  # int32: each row's last token (the next decode step's input)
    params: RowParams
    history: History  # [rows, vocab]: ids seen, generated-id counts, logit bias


@dataclasses.dataclass
class StepOutputs:
    """Device results of one dispatched step, read back later (see `Engine._process`)."""

    rows: list  # the Request each row belonged to when dispatched (None: an idle row)
    tokens: jax.Array | None  # None: a step that produced no token (a prompt chunk alone); [rows] or [rows, K + 1]
    logprobs: tuple[jax.Array, jax.Array, jax.Array] | None
    accepted: jax.Array | None = None  # a speculative step: each row's accepted proposals (its tokens: accepted + 1)
    proposed: np.ndarray | None = None  # a speculative step: each row's proposals (-1: a row that did not speculate)

    def fetch(
        self,
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray] | None, np.ndarray | None]:
        """(tokens, logprobs, accepted) on the host (accepted: None for a step of one token per row)."""
        tokens = None if self.tokens is None else np.asarray(self.tokens)
        logprobs = None if self.logprobs is None else tuple(np.asarray(x) for x in self.logprobs)
        accepted = None if self.accepted is None else np.asarray(self.accepted)
        return tokens, logprobs, accepted


def prefill_buckets(max_len: int, buckets=None) -> tuple[int, ...]:
    """Padded prompt lengths: powers of two from 16, and max_len - 1 (the longest prompt) last.

    (Midpoints 1.5x between them were tried: they shorten the prefill of a prompt just past a
    power of two, but did not measurably improve end-to-end serving throughput in
    benchmarks/serve.py, and they nearly double the programs compiled at warm-up.)"""
    if buckets is not None:
        chosen = tuple(sorted({int(b) for b in buckets}))
        if not chosen or chosen[0] < 1 or chosen[-1] > max_len - 1:
            raise ValueError(f"prefill buckets must lie in [1, {max_len - 1}], got {list(buckets)}")
        return chosen if chosen[-1] == max_len - 1 else (*chosen, max_len - 1)
    out, bucket = [], prompt_bucket(1)
    while bucket < max_len - 1:
        out.append(bucket)
        bucket *= 2
    return (*out, max_len - 1)


def default_mixed_chunk(platform: str) -> int:
    """Prompt tokens a mixed step prefills at most: 256 on CPU, 512 on GPU/TPU.

    A mixed step costs less than a decode step and a prefill chunk apart (the decode rows ride on
    the chunk's matrix products). With 256-token chunks on CPU a prompt of up to 256 tokens still
    goes in in one step (time to first token as a whole prefill) while the running rows advance;
    smaller chunks raised time to first token for no more throughput (benchmarks/serve.py). A
    larger CPU budget (512, so that eight chat prompts go in as one 8 x 64 step) was slower for a
    burst (benchmarks/burst.py): on CPU a step costs about its padded tokens, and more with several
    chunks, so the 8 x 64 step took longer than the two 4 x 64 steps that give half the burst its
    first tokens after the first one, and a long prompt's 512-token chunk stalls the decoding rows
    for twice as long.
    Accelerators reach full use of their matrix units only at hundreds of rows, where a decode step
    alone is memory-bound."""
    return 256 if platform == "cpu" else 512


def chunk_buckets(prefill_chunk: int) -> tuple[int, ...]:
    """Compiled chunk lengths of the mixed step: powers of two from 16 below `prefill_chunk`, and it."""
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    out, bucket = [], 16
    while bucket < prefill_chunk:
        out.append(bucket)
        bucket *= 2
    return (*out, prefill_chunk)


def chunk_shapes(chunks: tuple[int, ...], widths: tuple[int, ...], budget: int) -> tuple[tuple[int, int], ...]:
    """The (count, chunk) shapes of the mixed step's prompt chunks: one chunk of every compiled
    length, and for each `count` of several (a decode width) the longest compiled chunk length
    whose total fits the token budget `budget`, so that a burst of short prompts goes in together
    in one step. One length per count: a mixed step of several chunks runs one attention call per
    chunk in every layer, so these programs are the slowest to compile, and shorter lengths would
    save only padding of prompts that fit anyway."""
    one = [(1, chunk) for chunk in chunks]
    several = []
    for count in widths[1:]:
        fitting = [chunk for chunk in chunks if count * chunk <= budget]
        if fitting:
            several.append((count, fitting[-1]))
    return (*one, *several)


def plan_chunk_shape(remaining: list[int], shapes: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The (count, chunk) shape of `shapes` for a mixed step whose prompts going in have
    `remaining` tokens each, in arrival order (first come, first served: a shape takes the first
    `count`): the one that ends the most prompts, then puts the most prompt tokens in, then pads
    the least, then takes the fewest prompts.

    Ending prompts first: a step costs about its shape's tokens, padding included (and more with
    more chunks), so splitting a burst into partial chunks (8 x 32 for eight prompts of 40 tokens)
    delays every first token by a step, while whole chunks for half of them (4 x 64) give those
    their first token a step sooner for no more work."""
    best, best_key = shapes[0], None
    for count, chunk in shapes:
        ending = sum(left <= chunk for left in remaining[:count])
        tokens = sum(min(left, chunk) for left in remaining[:count])
        key = (-ending, -tokens, count * chunk, count)
        if best_key is None or key < best_key:
            best, best_key = (count, chunk), key
    return best


MAX_COMPILE_WORKERS = 8
_PRIME_LOCK = threading.Lock()  # guards `_Program.primed` (engines may prime from several threads)


@dataclasses.dataclass
class _Program:
    """A compiled program, as the shared executable cache holds it (one per model structure,
    shardings, sizes and program key, whichever engine compiled it)."""

    executable: Any
    primed: bool = False  # run once on zeros (see `EnginePrograms.prime`)


def default_compile_workers() -> int:
    """Threads `compile_all` compiles with: one per CPU core, at most MAX_COMPILE_WORKERS. XLA's
    compilation releases the GIL, so while one thread traces a program (Python) others compile."""
    return max(1, min(MAX_COMPILE_WORKERS, os.cpu_count() or 1))


def decode_widths(slots: int) -> tuple[int, ...]:
    """Row counts the decode step is compiled for: powers of two below `slots`, and `slots`."""
    widths, width = [], 1
    while width < slots:
        widths.append(width)
        width *= 2
    return (*widths, slots)


def block_counts(most: int) -> tuple[int, ...]:
    """Block counts the prefix cache's copies are compiled for: powers of two below `most`, and `most`."""
    return decode_widths(most)


def _spec(shape, dtype, sharding=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


class EnginePrograms:
    """Owns the batch cache and the slot state and runs the compiled programs on them.

    `prefill_into_slots` and `decode_step` are called from the engine thread only; `compile_all`
    may be called from any thread.
    """

    def __init__(
        self,
        model,
        *,
        slots: int,
        max_len: int,
        buckets=None,
        pad_id: int = 0,
        prefill_chunk: int = 64,
        prefix_blocks: int = 0,
        block_tokens: int = 16,
        speculative_tokens: int = 0,
        speculative_rows: int | None = None,
        draft_model=None,
    ):
        self.config = model.config
        self.speculative_tokens = int(speculative_tokens)  # K proposals per row checked by `speculate` (0: none)
        self.vocab = model.config.vocab_size
        self.slots = slots
        self.max_len = max_len
        self.buckets = prefill_buckets(max_len, buckets)
        self.widths = decode_widths(slots)
        # Widths of the speculative steps: those covering up to `speculative_rows` rows (default all).
        rows = slots if speculative_rows is None else min(slots, speculative_rows)
        self.speculative_widths = self.widths[: self.widths.index(self.width_for(rows)) + 1]
        # Chunked prefill fused with decoding (0: off, every prompt is prefilled alone).
        self.chunks = chunk_buckets(min(prefill_chunk, max_len - 1)) if prefill_chunk else ()
        self.chunk_shapes = chunk_shapes(self.chunks, self.widths, prefill_chunk)
        self.pad_id = int(pad_id)
        self.dtype = model.dtype
        self.graphdef, self.state = nnx.split(model)
        self.mesh, self.rules = model.mesh, model.rules
        self.compile_seconds = 0.0  # seconds this engine spent compiling (`compile_all` runs threads)
        self._compile_lock = threading.Lock()
        self.prime_seconds = 0.0
        # This engine's programs by their short key (the full key adds `_signature`); it also keeps
        # them alive when the shared cache evicts them, so nothing compiles again after warm-up.
        self._programs: dict[tuple, _Program] = {}
        state_signature = tuple((x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(self.state))
        self._signature = (self.graphdef, state_signature, slots, max_len, self.dtype, self.mesh, self.rules)
        self._draft_signature = ()  # added to the keys of the programs that run the draft model
        cache = KVCache.init(self.config, slots, max_len, self.dtype)
        self.cache = cache if self.mesh is None else jax.device_put(cache, self._cache_sharding(slots, max_len))
        # The draft model (speculative decoding), on the model's mesh, with a cache row per slot.
        self.draft_graphdef = self.draft_state = self.draft_config = self.draft_cache = None
        self.draft_chunks: tuple[int, ...] = ()  # compiled tokens per row of a draft catch-up step
        if draft_model is not None:
            self.draft_config, self.draft_dtype = draft_model.config, draft_model.dtype
            self.draft_graphdef, self.draft_state = nnx.split(draft_model)
            longest = max(DRAFT_CATCH_UP_TOKENS, prefill_chunk or default_mixed_chunk(platform_of(self.mesh)))
            self.draft_chunks = tuple(sorted({min(DRAFT_CATCH_UP_TOKENS, max_len - 1), min(longest, max_len - 1)}))
            draft_cache = KVCache.init(self.draft_config, slots, max_len, self.draft_dtype)
            sharding = self._cache_sharding(slots, max_len, self.draft_config)
            self.draft_cache = draft_cache if sharding is None else jax.device_put(draft_cache, sharding)
            draft_leaves = tuple((x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(self.draft_state))
            self._draft_signature = (self.draft_graphdef, draft_leaves, self.draft_dtype)
        self.slot_state = self._put(self._empty_state(slots))
        self.bitmask_words = bitmask_words(self.vocab)
        self._free_bitmasks: dict[int, jax.Array] = {}  # rows -> an all-ones bitmask on the device
        # The prefix cache's pool of KV blocks: (keys, values), each [layers, blocks, block_tokens, kv_heads, head_dim].
        self.block_tokens = int(block_tokens)
        self.prefix_blocks = int(prefix_blocks)
        self.copy_counts = block_counts(max(1, max_len // self.block_tokens)) if prefix_blocks else ()
        self.pool = None
        if prefix_blocks:
            shape = self._pool_shape()
            pool = (jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
            self.pool = pool if self.mesh is None else jax.device_put(pool, self._pool_sharding())

    def update_state(self, state) -> None:
        """Run the programs on other model arrays from now on: `state` must have this state's
        structure and each array its shape, dtype and sharding (so no program recompiles). The
        arrays are used as they are, not copied. Raises EngineError naming the first mismatch."""
        leaves, structure = jax.tree_util.tree_flatten_with_path(state)
        current, current_structure = jax.tree_util.tree_flatten_with_path(self.state)
        if structure != current_structure:
            raise EngineError("update_weights: the new weights do not have the model's structure (variables, adapters)")
        for (path, new), (_, old) in zip(leaves, current):
            name = jax.tree_util.keystr(path)
            if (new.shape, new.dtype) != (old.shape, old.dtype):
                ours = f"{old.dtype}{list(old.shape)}"
                raise EngineError(f"update_weights: {name} is {new.dtype}{list(new.shape)}, the engine's is {ours}")
            if getattr(new, "sharding", None) != old.sharding:
                raise EngineError(f"update_weights: {name} is placed on {new.sharding}, the engine's on {old.sharding}")
        self.state = state

    # ------------------------------------------------------------------ placement
    def _replicated(self) -> NamedSharding | None:
        return None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())

    def _cache_sharding(self, batch: int, length: int, config=None) -> KVCache | None:
        """KVCache of shardings (of the model's cache, or of a cache for `config`, the draft's): keys/values
        by logical axes (kv heads over `tensor`), lengths replicated."""
        if self.mesh is None:
            return None
        config = self.config if config is None else config
        shape = (config.num_hidden_layers, batch, length, config.num_key_value_heads, config.head_dim)
        kv = named_sharding(KVCache.logical_axes(), shape, self.mesh, self.rules)
        return KVCache(kv, kv, self._replicated())

    def _pool_shape(self) -> tuple[int, ...]:
        c = self.config
        return (c.num_hidden_layers, self.prefix_blocks, self.block_tokens, c.num_key_value_heads, c.head_dim)

    def _pool_sharding(self) -> tuple[NamedSharding, NamedSharding] | None:
        if self.mesh is None:
            return None
        axes = ("layers", None, None, "kv_heads", "head_dim")
        sharding = named_sharding(axes, self._pool_shape(), self.mesh, self.rules)
        return sharding, sharding

    def _pool_spec(self):
        shardings = self._pool_sharding() or (None, None)
        return tuple(_spec(self._pool_shape(), self.dtype, s) for s in shardings)

    def _logits_sharding(self, rows: int) -> NamedSharding | None:
        if self.mesh is None:
            return None
        return named_sharding(("batch", "vocab"), (rows, self.vocab), self.mesh, self.rules)

    def _put(self, tree):
        """Small host arrays onto the device (replicated on a mesh)."""
        sharding = self._replicated()
        return jax.tree.map(lambda x: jax.device_put(x, sharding) if sharding is not None else jax.device_put(x), tree)

    def _empty_state(self, rows: int) -> SlotState:
        params = RowParams(
            temperature=np.zeros(rows, np.float32),
            top_k=np.zeros(rows, np.int32),
            top_p=np.ones(rows, np.float32),
            min_p=np.zeros(rows, np.float32),
            repetition_penalty=np.ones(rows, np.float32),
            presence_penalty=np.zeros(rows, np.float32),
            frequency_penalty=np.zeros(rows, np.float32),
            key_data=np.zeros((rows, 2), np.uint32),
            token_index=np.zeros(rows, np.int32),
        )
        return SlotState(np.zeros(rows, np.int32), params, History.empty(rows, self.vocab, np))

    # ------------------------------------------------------------------ abstract arguments
    def _state_spec(self, draft: bool = False):
        return jax.tree.map(lambda x: _spec(x.shape, x.dtype, x.sharding), self.draft_state if draft else self.state)

    def _slot_state_spec(self, rows: int) -> SlotState:
        return jax.tree.map(
            lambda x: _spec(np.shape(x), np.asarray(x).dtype, self._replicated()), self._empty_state(rows)
        )

    def _cache_spec(self, batch: int, length: int, draft: bool = False) -> KVCache:
        config, dtype = (self.draft_config, self.draft_dtype) if draft else (self.config, self.dtype)
        abstract = jax.eval_shape(lambda: KVCache.init(config, batch, length, dtype))
        shardings = self._cache_sharding(batch, length, config)
        if shardings is None:
            return abstract
        return jax.tree.map(lambda a, s: _spec(a.shape, a.dtype, s), abstract, shardings)

    def _scalar_spec(self, shape=(), dtype=jnp.int32) -> jax.ShapeDtypeStruct:
        return _spec(shape, dtype, self._replicated())

    # ------------------------------------------------------------------ compilation
    def _executable(self, key: tuple, build: Callable[[], Any], draft: bool = False):
        # Looked up on every step: in this engine's own programs first, by the short key, since
        # hashing the full key (the model's graph definition, large for an unrolled model) on every
        # lookup, a few lookups a step, would cost the step time (see benchmarks/serve.py).
        known = self._programs.get(key)
        if known is not None:
            return known.executable
        name = f"engine.{key[0]}"
        signature = (self._signature, self._draft_signature) if draft else self._signature
        program, seconds = EXECUTABLES.get(name, (name, *key, signature), lambda: _Program(build()))
        if seconds:
            with self._compile_lock:
                self.compile_seconds += seconds
        self._programs[key] = program
        return program.executable

    def prime(self) -> float:
        """Run each of this engine's compiled programs once on zeros (the model's own weights, a
        scratch cache and slot state; the engine's are not touched); returns the seconds it took.

        On CPU the first run of an XLA executable costs more than the next ones, so without this
        the first requests after warm-up pay it step by step. A program is primed once per process,
        whichever engine runs it. Needs memory for a second KV cache while it runs."""

        def zeros(info, sharding):
            array = np.zeros(info.shape, info.dtype)
            # device_put, not jnp.asarray: the latter compiles a small program per new shape.
            return jax.device_put(array, sharding) if sharding is not None else jax.device_put(array)

        state_structure = jax.tree.structure(self.state)
        draft_structure = None if self.draft_state is None else jax.tree.structure(self.draft_state)
        start = time.perf_counter()
        for program in list(self._programs.values()):
            with _PRIME_LOCK:
                if program.primed:
                    continue
                program.primed = True
            executable = program.executable
            (args_info, _), (shardings, _) = executable.args_info, executable.input_shardings
            # An argument shaped like the model's (or the draft's) state is that state (never donated);
            # the rest are zeros.
            states = {state_structure: self.state, draft_structure: self.draft_state}
            args = [
                states[jax.tree.structure(info)]
                if jax.tree.structure(info) in states
                else jax.tree.map(zeros, info, sharding, is_leaf=lambda x: x is None or hasattr(x, "donated"))
                for info, sharding in zip(args_info, shardings)
            ]
            jax.block_until_ready(executable(*args))
        seconds = time.perf_counter() - start
        self.prime_seconds += seconds
        return seconds

    def compile_all(self, workers: int | None = None) -> float:
        """Compile every program this engine can run; returns the seconds it took now (wall clock).

        `workers` threads (default `default_compile_workers()`) compile different programs at once,
        the largest (mixed and decode steps, prefills) first. `compile_seconds` sums the programs'
        own compile times, so it can exceed the wall clock."""
        start = time.perf_counter()
        jobs = [
            functools.partial(self._mixed_executable, self.slots, count, chunk)
            for count, chunk in reversed(self.chunk_shapes)
        ]
        jobs += [functools.partial(self._prefill_executable, bucket) for bucket in reversed(self.buckets)]
        jobs += [functools.partial(self._decode_executable, width) for width in reversed(self.widths)]
        jobs += [functools.partial(self._insert_executable, bucket) for bucket in self.buckets]
        jobs += [functools.partial(self._sample_executable, variant) for variant in ENGINE_VARIANTS]
        jobs += [
            functools.partial(self._step_sample_executable, width, variant)
            for width in self.widths
            for variant in ENGINE_VARIANTS
        ]
        jobs += [functools.partial(self._logprobs_executable, rows) for rows in sorted({1, *self.widths})]
        if self.speculative_tokens:
            jobs += [
                functools.partial(self._speculate_executable, width, sampled)
                for width in reversed(self.speculative_widths)
                for sampled in (False, True)
            ]
            jobs += [functools.partial(self._speculate_logprobs_executable, width) for width in self.speculative_widths]
        if self.draft_graphdef is not None:
            jobs += [
                functools.partial(self._draft_catch_up_executable, width, chunk)
                for width in reversed(self.speculative_widths)
                for chunk in self.draft_chunks
            ]
            jobs.append(self._draft_move_executable)
        jobs.append(self._move_executable)
        if self.chunks:
            jobs.append(self._start_executable)
        jobs += [functools.partial(self._copy_in_executable, count) for count in self.copy_counts]
        jobs += [functools.partial(self._copy_out_executable, count) for count in self.copy_counts]
        workers = default_compile_workers() if workers is None else int(workers)
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if workers == 1:
            for job in jobs:
                job()
        else:
            with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="qwen-jax-compile") as pool:
                for future in [pool.submit(job) for job in jobs]:
                    future.result()  # the first failure is raised; the pool still finishes the rest
        return time.perf_counter() - start

    def chunk_for(self, tokens: int) -> int:
        """The compiled chunk length for the next `tokens` prompt tokens (at most the largest)."""
        return next((c for c in self.chunks if c >= tokens), self.chunks[-1])

    def width_for(self, rows: int) -> int:
        """The narrowest compiled decode width that covers the first `rows` slots."""
        return next(w for w in self.widths if w >= rows)

    def _prefill_executable(self, bucket: int):
        def prefill(state, input_ids, length):
            model = nnx.merge(self.graphdef, state)
            slots = jnp.arange(bucket, dtype=jnp.int32)[None, :]
            cache = KVCache.init(self.config, 1, bucket, self.dtype)
            # Right padding: the cache's length becomes `length`; the padding slots it wrote stay hidden.
            hidden, cache = model.hidden_states(
                input_ids, slots, (slots < length).astype(jnp.int32), cache=cache, empty_cache=True
            )  # a fresh cache: causal self-attention
            logits = model.logits(jax.lax.dynamic_slice_in_dim(hidden, length - 1, 1, axis=1))[:, 0]
            seen = mark_seen(jnp.zeros((1, self.vocab), bool), input_ids, slots < length)
            return cache, logits, seen

        def build():
            out_shardings = (
                None
                if self.mesh is None
                else (self._cache_sharding(1, bucket), self._logits_sharding(1), self._replicated())
            )
            return (
                jax.jit(prefill, out_shardings=out_shardings)
                .lower(self._state_spec(), self._scalar_spec((1, bucket)), self._scalar_spec())
                .compile()
            )

        return self._executable(("prefill", bucket), build)

    def _insert_executable(self, bucket: int):
        def insert(cache: KVCache, slot_state, row_cache: KVCache, row_state, slot):
            slot_state = jax.tree.map(
                lambda whole, row: jax.lax.dynamic_update_index_in_dim(whole, row[0], slot, 0), slot_state, row_state
            )
            return cache.insert(row_cache, slot), slot_state

        def build():
            out_shardings = (
                None if self.mesh is None else (self._cache_sharding(self.slots, self.max_len), self._replicated())
            )
            return (
                jax.jit(insert, donate_argnums=(0, 1), out_shardings=out_shardings)
                .lower(
                    self._cache_spec(self.slots, self.max_len),
                    self._slot_state_spec(self.slots),
                    self._cache_spec(1, bucket),
                    self._slot_state_spec(1),
                    self._scalar_spec(),
                )
                .compile()
            )

        return self._executable(("insert", bucket), build)

    def _bitmask_spec(self, rows: int) -> jax.ShapeDtypeStruct:
        return self._scalar_spec((rows, self.bitmask_words), jnp.int32)

    def _bitmask(self, host: np.ndarray | None, rows: int) -> jax.Array:
        """`host` (allowed tokens of `rows` rows) on the device; None: every token, kept there once."""
        if host is not None:
            return self._put(host)
        free = self._free_bitmasks.get(rows)
        if free is None:
            free = self._free_bitmasks[rows] = self._put(np.full((rows, self.bitmask_words), -1, np.int32))
        return free

    def _sample_executable(self, variant: SamplerVariant):
        """A prefilled prompt's first token, into its one-row state."""

        def build():
            logits = _spec((1, self.vocab), jnp.float32, self._logits_sharding(1))
            return (
                jax.jit(functools.partial(_sample, variant=variant), donate_argnums=1, out_shardings=self._replicated())
                .lower(logits, self._slot_state_spec(1), self._bitmask_spec(1))
                .compile()
            )

        return self._executable(("sample", variant), build)

    def _step_sample_executable(self, width: int, variant: SamplerVariant):
        """A step's tokens for the first `width` slots, sampled into the slot state of the rows
        `take` marks (the others keep their state: idle slots, a prompt still being prefilled)."""

        def step_sample(logits, slot_state: SlotState, take, bitmask):
            rows = jax.tree.map(lambda x: x[:width], slot_state)
            tokens = sample_rows(logits, rows.history, rows.params, variant, bitmask)
            # Only the `take` rows' entries change: the `[slots, vocab]` history is written in place.
            params = rows.params
            params = dataclasses.replace(params, token_index=params.token_index + take.astype(jnp.int32))
            slot_state = SlotState(
                slot_state.tokens.at[:width].set(jnp.where(take, tokens, rows.tokens)),
                jax.tree.map(lambda whole, part: whole.at[:width].set(part), slot_state.params, params),
                slot_state.history.record(tokens, take),
            )
            return slot_state, tokens

        def build():
            logits = _spec((width, self.vocab), jnp.float32, self._logits_sharding(width))
            return (
                jax.jit(step_sample, donate_argnums=1, out_shardings=self._replicated())
                .lower(
                    logits,
                    self._slot_state_spec(self.slots),
                    self._scalar_spec((width,), jnp.bool_),
                    self._bitmask_spec(width),
                )
                .compile()
            )

        return self._executable(("step_sample", width, variant), build)

    def _logprobs_executable(self, rows: int):
        def build():
            logits = _spec((rows, self.vocab), jnp.float32, self._logits_sharding(rows))
            return (
                jax.jit(_token_logprobs, out_shardings=self._replicated())
                .lower(logits, self._scalar_spec((rows,)), self._scalar_spec((), jnp.bool_))
                .compile()
            )

        return self._executable(("logprobs", rows), build)

    def _decode_executable(self, width: int):
        def decode(state, cache: KVCache, tokens, active):
            model = nnx.merge(self.graphdef, state)
            # Below `slots`, the first `width` rows as a cache of their own; XLA reads and writes them in place.
            whole = width == self.slots
            rows = cache if whole else KVCache(cache.k[:, :width], cache.v[:, :width], cache.lengths[:width])
            logits, rows = model(tokens[:width, None], attention_mask=active[:, None].astype(jnp.int32), cache=rows)
            if not whole:
                rows = KVCache(
                    cache.k.at[:, :width].set(rows.k),
                    cache.v.at[:, :width].set(rows.v),
                    cache.lengths.at[:width].set(rows.lengths),
                )
            return logits[:, 0], rows

        def build():
            out_shardings = (
                None
                if self.mesh is None
                else (self._logits_sharding(width), self._cache_sharding(self.slots, self.max_len))
            )
            return (
                jax.jit(decode, donate_argnums=1, out_shardings=out_shardings)
                .lower(
                    self._state_spec(),
                    self._cache_spec(self.slots, self.max_len),
                    self._scalar_spec((self.slots,)),
                    self._scalar_spec((width,), jnp.bool_),
                )
                .compile()
            )

        return self._executable(("decode", width), build)

    def _start_executable(self):
        def start(cache: KVCache, slot_state, row_state, slot):
            slot_state = jax.tree.map(
                lambda whole, row: jax.lax.dynamic_update_index_in_dim(whole, row[0], slot, 0), slot_state, row_state
            )
            return dataclasses.replace(cache, lengths=cache.lengths.at[slot].set(0)), slot_state

        def build():
            out_shardings = (
                None if self.mesh is None else (self._cache_sharding(self.slots, self.max_len), self._replicated())
            )
            return (
                jax.jit(start, donate_argnums=(0, 1), out_shardings=out_shardings)
                .lower(
                    self._cache_spec(self.slots, self.max_len),
                    self._slot_state_spec(self.slots),
                    self._slot_state_spec(1),
                    self._scalar_spec(),
                )
                .compile()
            )

        return self._executable(("start",), build)

    def _mixed_executable(self, width: int, count: int, chunk: int):
        def mixed(state, cache: KVCache, slot_state: SlotState, active, chunk_ids, chunk_lengths, chunk_rows):
            model = nnx.merge(self.graphdef, state)
            decoded, prefilled, cache = mixed_hidden_states(
                model, slot_state.tokens[:width], active, chunk_ids, chunk_lengths, chunk_rows, cache
            )
            last = prefilled[jnp.arange(count), jnp.maximum(chunk_lengths - 1, 0)]  # [count, D]
            # Each chunk's row gets the hidden state of its last token (a padding chunk's row is out of range).
            hidden = decoded.at[chunk_rows].set(last, mode="drop")
            logits = model.logits(hidden[:, None])[:, 0]
            valid = jnp.arange(chunk, dtype=jnp.int32)[None, :] < chunk_lengths[:, None]
            history = slot_state.history
            rows_seen = mark_seen(history.seen.at[chunk_rows].get(mode="fill", fill_value=False), chunk_ids, valid)
            seen = history.seen.at[chunk_rows].set(rows_seen, mode="drop")
            return logits, cache, dataclasses.replace(slot_state, history=dataclasses.replace(history, seen=seen))

        def build():
            out_shardings = (
                None
                if self.mesh is None
                else (self._logits_sharding(width), self._cache_sharding(self.slots, self.max_len), self._replicated())
            )
            return (
                jax.jit(mixed, donate_argnums=(1, 2), out_shardings=out_shardings)
                .lower(
                    self._state_spec(),
                    self._cache_spec(self.slots, self.max_len),
                    self._slot_state_spec(self.slots),
                    self._scalar_spec((width,), jnp.bool_),
                    self._scalar_spec((count, chunk)),
                    self._scalar_spec((count,)),
                    self._scalar_spec((count,)),
                )
                .compile()
            )

        return self._executable(("mixed", width, count, chunk), build)

    def _speculate_executable(self, width: int, sampled: bool):
        """The speculative step of the first `width` slots: each row's pending token (its slot
        state's last token) and its proposals in one forward, checked as `qwen_jax.generate` checks
        them; returns the tokens `[width, K + 1]` (the accepted proposals, then the target's own),
        the accepted counts, the raw logits `[width, K + 1, vocab]`, and the cache and slot state
        after the step (inactive rows unchanged).

        Without a draft the proposals are arguments (from the host); with one, the draft proposes
        them first for the rows with `num_proposed` > 0 (their draft cache rows must hold the same
        tokens as their target rows), and the draft's cache comes back too, those rows' lengths set
        to the target's (the others' kept)."""
        k = self.speculative_tokens
        with_draft = self.draft_graphdef is not None
        static = VerificationStatic(
            graphdef=self.graphdef,
            draft_graphdef=self.draft_graphdef,
            num_tokens=k,
            sampled=sampled,
            adjustments=True,  # the engine's rows always carry bias and penalties (ENGINE_VARIANTS)
            return_logits=True,
        )
        whole = width == self.slots

        def rows_of(cache: KVCache) -> KVCache:
            return cache if whole else KVCache(cache.k[:, :width], cache.v[:, :width], cache.lengths[:width])

        def put_back(cache: KVCache, rows: KVCache) -> KVCache:
            if whole:
                return rows
            return KVCache(
                cache.k.at[:, :width].set(rows.k),
                cache.v.at[:, :width].set(rows.v),
                cache.lengths.at[:width].set(rows.lengths),
            )

        def check(state, cache: KVCache, slot_state: SlotState, rows: SlotState, proposals, num_proposed, q, active):
            model = nnx.merge(self.graphdef, state)
            count = rows.params.token_index
            tokens, accepted, rows_cache, history, logits = verify_proposals(
                static, model, rows_of(cache), rows.tokens, proposals, num_proposed, q, rows.history, rows.params,
                count, active,
            )  # fmt: skip
            last = jnp.take_along_axis(tokens, accepted[:, None], axis=1)[:, 0]
            params = dataclasses.replace(rows.params, token_index=jnp.where(active, count + accepted + 1, count))
            rows = SlotState(jnp.where(active, last, rows.tokens), params, history)
            slot_state = jax.tree.map(lambda whole_x, part: whole_x.at[:width].set(part), slot_state, rows)
            return tokens, accepted, logits, put_back(cache, rows_cache), slot_state

        def speculate(state, cache: KVCache, slot_state: SlotState, proposals, num_proposed, active):
            rows = jax.tree.map(lambda x: x[:width], slot_state)
            return check(state, cache, slot_state, rows, proposals, num_proposed, None, active)

        def speculate_with_draft(
            state, draft_state, cache: KVCache, draft_cache: KVCache, slot_state, num_proposed, active
        ):
            draft = nnx.merge(self.draft_graphdef, draft_state)
            rows = jax.tree.map(lambda x: x[:width], slot_state)
            proposing = active & (num_proposed > 0)
            draft_rows, target_lengths = rows_of(draft_cache), cache.lengths[:width]
            kept_lengths = draft_rows.lengths
            draft_rows = KVCache(draft_rows.k, draft_rows.v, jnp.where(proposing, target_lengths, kept_lengths))
            proposals, q, draft_rows = draft_proposals(
                static, draft, draft_rows, rows.tokens, rows.history, rows.params, rows.params.token_index, self.vocab
            )
            tokens, accepted, logits, cache, slot_state = check(
                state, cache, slot_state, rows, proposals, num_proposed, q, active
            )
            # The draft read the pending token and every proposal: it holds what the target accepted.
            lengths = jnp.where(proposing, cache.lengths[:width], kept_lengths)
            draft_cache = put_back(draft_cache, KVCache(draft_rows.k, draft_rows.v, lengths))
            return tokens, accepted, logits, cache, draft_cache, slot_state

        def build():
            logits_sharding = (
                None
                if self.mesh is None
                else named_sharding(("batch", "seq", "vocab"), (width, k + 1, self.vocab), self.mesh, self.rules)
            )
            cache_sharding = self._cache_sharding(self.slots, self.max_len)
            steps = self._scalar_spec((width,)), self._scalar_spec((width,), jnp.bool_)
            if with_draft:
                out_shardings = (
                    None
                    if self.mesh is None
                    else (
                        self._replicated(),
                        self._replicated(),
                        logits_sharding,
                        cache_sharding,
                        self._cache_sharding(self.slots, self.max_len, self.draft_config),
                        self._replicated(),
                    )
                )
                jitted = jax.jit(speculate_with_draft, donate_argnums=(2, 3, 4), out_shardings=out_shardings)
                return jitted.lower(
                    self._state_spec(),
                    self._state_spec(draft=True),
                    self._cache_spec(self.slots, self.max_len),
                    self._cache_spec(self.slots, self.max_len, draft=True),
                    self._slot_state_spec(self.slots),
                    *steps,
                ).compile()
            out_shardings = (
                None
                if self.mesh is None
                else (self._replicated(), self._replicated(), logits_sharding, cache_sharding, self._replicated())
            )
            jitted = jax.jit(speculate, donate_argnums=(1, 2), out_shardings=out_shardings)
            return jitted.lower(
                self._state_spec(),
                self._cache_spec(self.slots, self.max_len),
                self._slot_state_spec(self.slots),
                self._scalar_spec((width, k)),
                *steps,
            ).compile()

        return self._executable(("speculate", width, k, sampled), build, draft=with_draft)

    def _draft_catch_up_executable(self, width: int, chunk: int):
        """Up to `chunk` tokens per row of the first `width` slots into the draft's cache: row r
        reads `ids[r, :counts[r]]` at slots `starts[r]` onwards and its length becomes `starts[r] +
        counts[r]`; a row with `counts[r]` = 0 is left as it is (its padding writes are dropped)."""

        def catch_up(draft_state, draft_cache: KVCache, ids, starts, counts):
            draft = nnx.merge(self.draft_graphdef, draft_state)
            whole = width == self.slots
            k, v, lengths = draft_cache.k, draft_cache.v, draft_cache.lengths
            if not whole:
                k, v, lengths = k[:, :width], v[:, :width], lengths[:width]
            reading = counts > 0
            at = jnp.where(reading, starts, self.max_len)  # past the cache: the writes are dropped
            positions = at[:, None] + jnp.arange(chunk, dtype=jnp.int32)[None, :]
            mask = (jnp.arange(chunk, dtype=jnp.int32)[None, :] < counts[:, None]).astype(jnp.int32)
            _, rows = draft.hidden_states(ids, positions, mask, cache=KVCache(k, v, at))
            lengths = jnp.where(reading, starts + counts, lengths)
            if whole:
                return KVCache(rows.k, rows.v, lengths)
            return KVCache(
                draft_cache.k.at[:, :width].set(rows.k),
                draft_cache.v.at[:, :width].set(rows.v),
                draft_cache.lengths.at[:width].set(lengths),
            )

        def build():
            draft_cache = self._cache_spec(self.slots, self.max_len, draft=True)
            out_shardings = self._cache_sharding(self.slots, self.max_len, self.draft_config)
            rows = self._scalar_spec((width,))
            return (
                jax.jit(catch_up, donate_argnums=1, out_shardings=out_shardings)
                .lower(self._state_spec(draft=True), draft_cache, self._scalar_spec((width, chunk)), rows, rows)
                .compile()
            )

        return self._executable(("draft_catch_up", width, chunk), build, draft=True)

    def _draft_move_executable(self):
        def move(draft_cache: KVCache, source, target):
            def copy(x, axis):
                row = jax.lax.dynamic_index_in_dim(x, source, axis, keepdims=True)
                return jax.lax.dynamic_update_slice_in_dim(x, row, target, axis)

            return KVCache(copy(draft_cache.k, 1), copy(draft_cache.v, 1), copy(draft_cache.lengths, 0))

        def build():
            out_shardings = self._cache_sharding(self.slots, self.max_len, self.draft_config)
            return (
                jax.jit(move, donate_argnums=0, out_shardings=out_shardings)
                .lower(self._cache_spec(self.slots, self.max_len, draft=True), self._scalar_spec(), self._scalar_spec())
                .compile()
            )

        return self._executable(("draft_move",), build, draft=True)

    def _speculate_logprobs_executable(self, width: int):
        """`logprobs` of a speculative step's K + 1 positions per row."""
        positions = self.speculative_tokens + 1

        def build():
            sharding = (
                None
                if self.mesh is None
                else named_sharding(("batch", "seq", "vocab"), (width, positions, self.vocab), self.mesh, self.rules)
            )
            logits = _spec((width, positions, self.vocab), jnp.float32, sharding)
            return (
                jax.jit(_token_logprobs, out_shardings=self._replicated())
                .lower(logits, self._scalar_spec((width, positions)), self._scalar_spec((), jnp.bool_))
                .compile()
            )

        return self._executable(("speculate_logprobs", width, positions), build)

    def _move_executable(self):
        def move(cache: KVCache, slot_state: SlotState, source, target):
            def copy(x, axis):
                row = jax.lax.dynamic_index_in_dim(x, source, axis, keepdims=True)
                return jax.lax.dynamic_update_slice_in_dim(x, row, target, axis)

            cache = KVCache(copy(cache.k, 1), copy(cache.v, 1), copy(cache.lengths, 0))
            return cache, jax.tree.map(lambda x: copy(x, 0), slot_state)

        def build():
            out_shardings = (
                None if self.mesh is None else (self._cache_sharding(self.slots, self.max_len), self._replicated())
            )
            return (
                jax.jit(move, donate_argnums=(0, 1), out_shardings=out_shardings)
                .lower(
                    self._cache_spec(self.slots, self.max_len),
                    self._slot_state_spec(self.slots),
                    self._scalar_spec(),
                    self._scalar_spec(),
                )
                .compile()
            )

        return self._executable(("move",), build)

    def _copy_in_executable(self, count: int):
        """Up to `count` pool blocks into the first slots of a cache row, which then holds `length`
        tokens, with the request's row state (as `start`)."""
        size = self.block_tokens

        def copy_in(cache: KVCache, slot_state, pool, blocks, used, slot, row_state):
            index = jnp.arange(count, dtype=jnp.int32)
            positions = jnp.where(index < used, index, self.max_len)[:, None] * size + jnp.arange(size)[None, :]
            positions = positions.reshape(-1)  # past max_len (unused entries): dropped

            def put(whole, blocks_kv):
                rows = blocks_kv.at[:, blocks].get(mode="fill", fill_value=0)  # [L, count, size, K, H]
                rows = rows.reshape(rows.shape[0], count * size, *rows.shape[3:])
                return whole.at[:, slot, positions].set(rows, mode="drop")

            slot_state = jax.tree.map(
                lambda whole, row: jax.lax.dynamic_update_index_in_dim(whole, row[0], slot, 0), slot_state, row_state
            )
            lengths = cache.lengths.at[slot].set(used * size)
            return KVCache(put(cache.k, pool[0]), put(cache.v, pool[1]), lengths), slot_state

        def build():
            out_shardings = (
                None if self.mesh is None else (self._cache_sharding(self.slots, self.max_len), self._replicated())
            )
            return (
                jax.jit(copy_in, donate_argnums=(0, 1), out_shardings=out_shardings)
                .lower(
                    self._cache_spec(self.slots, self.max_len),
                    self._slot_state_spec(self.slots),
                    self._pool_spec(),
                    self._scalar_spec((count,)),
                    self._scalar_spec(),
                    self._scalar_spec(),
                    self._slot_state_spec(1),
                )
                .compile()
            )

        return self._executable(("copy_in", count, self.prefix_blocks), build)  # the pool size is in the shapes

    def _copy_out_executable(self, count: int):
        """Up to `count` blocks of a cache row into pool blocks (an out-of-range pool block: skipped)."""
        size = self.block_tokens

        def copy_out(pool, cache: KVCache, slot, row_blocks, blocks):
            positions = (row_blocks[:, None] * size + jnp.arange(size)[None, :]).reshape(-1)

            def take(whole, blocks_kv):
                row = jax.lax.dynamic_index_in_dim(whole, slot, 1, keepdims=False)  # [L, S, K, H]
                rows = row.at[:, positions].get(mode="fill", fill_value=0)
                rows = rows.reshape(rows.shape[0], count, size, *rows.shape[2:])
                return blocks_kv.at[:, blocks].set(rows, mode="drop")

            return take(cache.k, pool[0]), take(cache.v, pool[1])

        def build():
            return (
                jax.jit(copy_out, donate_argnums=0, out_shardings=self._pool_sharding())
                .lower(
                    self._pool_spec(),
                    self._cache_spec(self.slots, self.max_len),
                    self._scalar_spec(),
                    self._scalar_spec((count,)),
                    self._scalar_spec((count,)),
                )
                .compile()
            )

        return self._executable(("copy_out", count, self.prefix_blocks), build)

    # ------------------------------------------------------------------ running
    def prefill_into_slots(
        self, prompt_ids: list[int], requests: list, bitmasks: list[np.ndarray | None]
    ) -> list[StepOutputs]:
        """Prefill one prompt once and, for each of `requests` (all of this prompt, each in its own
        slot), sample its first token from the prompt's logits with its own settings and insert the
        prompt's cache and its state into its slot (dispatched, not awaited); `bitmasks`: per request,
        the first token's allowed tokens `[1, bitmask_words]` (None: every token)."""
        length = len(prompt_ids)
        bucket = next(b for b in self.buckets if b >= length)
        ids = np.full((1, bucket), self.pad_id, np.int32)
        ids[0, :length] = prompt_ids
        ids, length_arg = self._put((ids, np.int32(length)))
        row_cache, logits, seen = self._prefill_executable(bucket)(self.state, ids, length_arg)
        insert = self._insert_executable(bucket)
        outputs = []
        for i, (request, bitmask) in enumerate(zip(requests, bitmasks)):
            options = request.options
            # The sampler consumes (donates) its row state, so the prompt's ids seen, which the
            # prefill marked, serve the first request only; the others' are marked on the host.
            row_state = _row_state(options, self.vocab, () if i == 0 else prompt_ids)
            slot_arg, row_state = self._put((np.int32(request.slot), row_state))
            if i == 0:
                row_state = dataclasses.replace(row_state, history=dataclasses.replace(row_state.history, seen=seen))
            row_state, tokens = self._sample_executable(_engine_variant([options]))(
                logits, row_state, self._bitmask(bitmask, 1)
            )
            logprobs = (
                None
                if request.top_logprobs is None
                else self._logprobs_executable(1)(logits, tokens, self._put(np.bool_(request.top_logprobs > 0)))
            )
            self.cache, self.slot_state = insert(self.cache, self.slot_state, row_cache, row_state, slot_arg)
            outputs.append(StepOutputs([request], tokens, logprobs))
        return outputs

    def decode_step(self, rows: list, bitmask: BitmaskFunction | None = None) -> StepOutputs:
        """One token for each of the first `len(rows)` slots whose entry is a Request (None: the slot
        idles); `len(rows)` must be one of `widths`. `bitmask(rows)`, called once the forward is
        dispatched, gives the rows' allowed tokens (`[len(rows), bitmask_words]`, or None: every token)."""
        width = len(rows)
        active = self._put(np.asarray([r is not None for r in rows]))
        logits, self.cache = self._decode_executable(width)(self.state, self.cache, self.slot_state.tokens, active)
        return self._sample_step(rows, logits, active, bitmask)

    def speculative_step(self, rows: list, proposals: np.ndarray | None, proposed: np.ndarray) -> StepOutputs:
        """Check each decoding row's proposals (`proposals` `[len(rows), K]`, the first `proposed[r]`
        of row r real; -1 marks a row that did not speculate, 0 proposals) in one forward: every
        row of `rows` (a Request, or None for an idle row) gets 1 to K + 1 tokens. `len(rows)` must
        be one of `widths`; no row may be constrained (the check takes no bitmask).

        With a draft model, `proposals` is None: the draft proposes K tokens for each row with
        `proposed[r]` > 0, of which the first `proposed[r]` are checked; those rows' draft cache
        rows must hold the tokens their target rows hold (`draft_catch_up`)."""
        width = len(rows)
        active = np.asarray([r is not None for r in rows])
        sampled = any(r is not None and r.options.temperature > 0 for r in rows)
        executable = self._speculate_executable(width, sampled)
        num_proposed, active = self._put((np.maximum(proposed, 0).astype(np.int32), active))
        if self.draft_graphdef is None:
            tokens, accepted, logits, self.cache, self.slot_state = executable(
                self.state, self.cache, self.slot_state, self._put(proposals.astype(np.int32)), num_proposed, active
            )
        else:
            tokens, accepted, logits, self.cache, self.draft_cache, self.slot_state = executable(
                self.state, self.draft_state, self.cache, self.draft_cache, self.slot_state, num_proposed, active
            )
        top = _wants_top_logprobs(rows)
        logprobs = None if top is None else self._speculate_logprobs_executable(width)(logits, tokens, self._put(top))
        return StepOutputs(list(rows), tokens, logprobs, accepted, np.asarray(proposed))

    def draft_catch_up(self, ids: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> None:
        """Write tokens into the draft's cache rows of the first `len(ids)` slots (one of `widths`):
        row r reads `ids[r, :counts[r]]` (`ids` `[rows, chunk]`, `chunk` one of `draft_chunks`) at slots
        `starts[r]` onwards and then holds `starts[r] + counts[r]` tokens; rows with `counts[r]` = 0 are
        left alone."""
        executable = self._draft_catch_up_executable(len(ids), ids.shape[1])
        args = self._put((ids.astype(np.int32), starts.astype(np.int32), counts.astype(np.int32)))
        self.draft_cache = executable(self.draft_state, self.draft_cache, *args)

    def start_row(self, options: SamplingOptions, slot: int) -> None:
        """Empty `slot`'s cache row and give it the request's sampling state (before `mixed_step`)."""
        row_state, slot_arg = self._put((_row_state(options, self.vocab), np.int32(slot)))
        self.cache, self.slot_state = self._start_executable()(self.cache, self.slot_state, row_state, slot_arg)

    def mixed_step(
        self,
        rows: list,
        chunks: list[tuple[Any, list[int], bool]],
        shape: tuple[int, int],
        bitmask: BitmaskFunction | None = None,
    ) -> StepOutputs:
        """A decode step of `rows` (as in `decode_step`, but one entry per slot: mixed steps run at
        the full width) fused with prompt chunks: `chunks` holds (request, prompt token ids, final)
        per request prefilling; `rows[request.slot]` must be None.
        `shape` = (count, chunk) is one of `chunk_shapes`, with count >= len(chunks) and every chunk
        at most `chunk` tokens (the unused entries are padding chunks). A `final` chunk (the
        prompt's last) also samples the request's first token; it decodes from the next step on
        (`bitmask` as in `decode_step`, its rows including those requests')."""
        width, (count, chunk) = len(rows), shape
        if width != self.slots:
            raise ValueError(f"a mixed step runs all {self.slots} slots, got {width} rows")
        if not 1 <= len(chunks) <= count or any(len(ids) > chunk for _, ids, _ in chunks):
            raise ValueError(f"{len(chunks)} chunks do not fit the chunk shape {shape}")
        ids = np.full((count, chunk), self.pad_id, np.int32)
        lengths = np.zeros(count, np.int32)
        chunk_rows = np.full(count, self.slots, np.int32)  # out of range: a padding chunk
        rows = list(rows)
        for i, (request, chunk_ids, _) in enumerate(chunks):
            if not request.slot < width or rows[request.slot] is not None:
                raise ValueError(f"slot {request.slot} must be an idle row of the {width} decoded")
            ids[i, : len(chunk_ids)], lengths[i], chunk_rows[i] = chunk_ids, len(chunk_ids), request.slot
        active = np.asarray([r is not None for r in rows])
        active_arg, ids, lengths, chunk_rows = self._put((active, ids, lengths, chunk_rows))
        logits, self.cache, self.slot_state = self._mixed_executable(width, count, chunk)(
            self.state, self.cache, self.slot_state, active_arg, ids, lengths, chunk_rows
        )
        finals = [request for request, _, final in chunks if final]
        for request in finals:
            rows[request.slot] = request
        take = self._put(np.asarray([r is not None for r in rows])) if finals else active_arg
        return self._sample_step(rows, logits, take, bitmask)

    def _sample_step(self, rows: list, logits, take, bitmask: BitmaskFunction | None) -> StepOutputs:
        if not any(rows):  # a chunk of a prompt, nothing decoding: no token this step
            return StepOutputs(list(rows), None, None)
        width = len(rows)
        variant = _engine_variant([r.options for r in rows if r is not None])
        allowed = self._bitmask(None if bitmask is None else bitmask(list(rows)), width)
        self.slot_state, tokens = self._step_sample_executable(width, variant)(logits, self.slot_state, take, allowed)
        top = _wants_top_logprobs(rows)
        logprobs = None if top is None else self._logprobs_executable(width)(logits, tokens, self._put(top))
        return StepOutputs(list(rows), tokens, logprobs)

    def copy_in(self, slot: int, blocks: list[int], options: SamplingOptions, prefix_ids: list[int]) -> None:
        """Fill `slot`'s cache row with the pool `blocks` (a cached prefix `prefix_ids`) and give it
        the request's sampling state, its prefix seen (dispatched, not awaited; before `mixed_step`)."""
        count = next(c for c in self.copy_counts if c >= len(blocks))
        padded = np.full(count, self.prefix_blocks, np.int32)
        padded[: len(blocks)] = blocks
        args = self._put((padded, np.int32(len(blocks)), np.int32(slot), _row_state(options, self.vocab, prefix_ids)))
        self.cache, self.slot_state = self._copy_in_executable(count)(self.cache, self.slot_state, self.pool, *args)

    def copy_out(self, slot: int, copies: list[tuple[int, int]]) -> None:
        """Copy blocks of `slot`'s cache row into the pool: (block index in the row, pool block) pairs."""
        for start in range(0, len(copies), self.copy_counts[-1]):
            part = copies[start : start + self.copy_counts[-1]]
            count = next(c for c in self.copy_counts if c >= len(part))
            row_blocks, blocks = np.zeros(count, np.int32), np.full(count, self.prefix_blocks, np.int32)
            row_blocks[: len(part)], blocks[: len(part)] = zip(*part)
            args = self._put((np.int32(slot), row_blocks, blocks))
            self.pool = self._copy_out_executable(count)(self.pool, self.cache, *args)

    def move(self, source: int, target: int) -> None:
        """Copy slot `source`'s cache row and state (and draft cache row) into slot `target` (dispatched,
        not awaited)."""
        source, target = self._put((np.int32(source), np.int32(target)))
        self.cache, self.slot_state = self._move_executable()(self.cache, self.slot_state, source, target)
        if self.draft_cache is not None:
            self.draft_cache = self._draft_move_executable()(self.draft_cache, source, target)


def _token_logprobs(logits, tokens, top):
    """The log-probability of each of `tokens` under `logits` (`[..., vocab]`, raw: before any
    sampling setting), and, where the traced flag `top` is set, the `MAX_TOP_LOGPROBS` most likely
    tokens with theirs (zeros otherwise: no top-k over the vocabulary when no request asks for it).
    The chosen values are `jax.nn.log_softmax`'s, without writing out the whole distribution."""
    logits = logits.astype(jnp.float32)
    most = jnp.max(logits, axis=-1, keepdims=True)
    log_total = jnp.log(jnp.sum(jnp.exp(logits - most), axis=-1, keepdims=True))
    chosen = (jnp.take_along_axis(logits, tokens[..., None], axis=-1) - most - log_total)[..., 0]

    def top_tokens():
        top_values, top_ids = jax.lax.top_k(logits - most - log_total, MAX_TOP_LOGPROBS)
        return top_ids, top_values

    def none():
        shape = (*tokens.shape, MAX_TOP_LOGPROBS)
        return jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.float32)

    top_ids, top_values = jax.lax.cond(top, top_tokens, none)
    return chosen, top_ids, top_values


def _wants_top_logprobs(rows: list) -> np.bool_ | None:
    """None when no request of `rows` asks for log-probabilities, else whether any asks for top ones."""
    asking = [r.top_logprobs for r in rows if r is not None and r.top_logprobs is not None]
    return np.bool_(max(asking) > 0) if asking else None


def _sample(logits, slot_state: SlotState, bitmask, variant: SamplerVariant):
    tokens = sample_rows(logits, slot_state.history, slot_state.params, variant, bitmask)
    params = dataclasses.replace(slot_state.params, token_index=slot_state.params.token_index + 1)
    return SlotState(tokens, params, slot_state.history.record(tokens)), tokens


def _engine_variant(options: list[SamplingOptions]) -> SamplerVariant:
    """The compiled sampler variant (one of `ENGINE_VARIANTS`) that draws every row of `options`."""
    return covering_variant(variant_for(o.draw_settings for o in options), ENGINE_VARIANTS)


def _row_state(options: SamplingOptions, vocab: int, seen: list[int] | tuple = ()) -> SlotState:
    """A request's one-row state on the host: its settings and seed, a history with its logit bias
    and the prompt tokens `seen` so far (a cached prefix), nothing generated."""
    return SlotState(
        np.zeros(1, np.int32), row_params(options, [options.seed]), initial_history(options, vocab, [list(seen)])
    )
