"""Generation from token ids with a preallocated KV cache: a static batch (one jitted loop) and streaming
(one jitted step per token); `qwen_jax.generate` / `stream` (`api`) add text on top.

How a call runs:

1. Prompts are right-padded to a bucket (powers of two from `MIN_PROMPT_BUCKET`, multiples of
   `LONG_PROMPT_BUCKET` past it), so a new prompt length inside a bucket reuses the compiled code.
   The cache length (`prompt bucket + max_new_tokens`, capped at the context) is bucketed too.
   Every row's tokens start at cache slot 0 and the cache keeps one length per row
   (`KVCache.lengths`), so a row's result never depends on its batch-mates. A prompt plus
   `max_new_tokens` beyond the model's context (`Qwen2Config.context_length`) is an error before
   anything is compiled.
2. Prefill: the prompts go through the model in chunks (`default_prefill_chunk`: `PREFILL_CHUNK`
   tokens on CPU, the whole prompt on a GPU/TPU), one call of a single compiled chunk step per
   chunk up to the longest prompt, each writing the cache, so prefill memory is bounded by the
   chunk (a progress bar shows on a terminal for long prompts); each row's first new token comes
   from its last prompt token. A prompt that fits one chunk is plain causal self-attention over
   its own keys (`empty_cache`): the fused kernels' causal path, without reading the cache.
3. Decode: `generate_ids` runs every remaining step inside one jitted `lax.while_loop` that stops
   when all rows have hit a stop token or `max_new_tokens`; `stream_ids` runs one jitted step per
   token so text can be shown as it is produced. Both draw with the one sampler
   (`qwen_jax.generation.sampler`): row r's token i with `fold_in(key(seed_r), i)`, so they give
   the same tokens, and the same as the engine for the same seed and settings.

Structured output (`grammars`: one `GrammarMatcher` per row, from `qwen_jax.generate` / `stream`,
which compile the request's constraint with the tokenizer): each row's allowed tokens depend on
the token drawn before, so a constrained batch decodes one jitted step per token (the stream's
step, over the whole batch), the host filling the rows' bitmask between steps.

The model is split once per call (`nnx.split`); the jitted functions are pure functions of
(graphdef, state), compiled ahead of time into the shared executable cache
(`qwen_jax.compilation.EXECUTABLES`, names "generation.prefill", "generation.first_token",
"generation.decode_loop", "generation.decode_step", "generation.carry_prefix") keyed by argument
shapes and shardings, which lets `Timing` report compile time apart from prefill and decode time.
The cache is donated to every call.

A conversation (`prefix_cache=`, on by default): a call of one prompt leaves its cache in
`qwen_jax.generation.conversation_cache`; the model's next call takes it, and when its prompt
starts with the tokens that cache holds, "generation.carry_prefix" copies it into the new cache
and prefill starts after the common prefix (step 2 then prefills only the rest).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm
from typing_extensions import Unpack

from qwen_jax.compilation import EXECUTABLES, argument_signature
from qwen_jax.config import GenerationConfig, Qwen2Config
from qwen_jax.errors import GenerationError
from qwen_jax.generation import conversation_cache
from qwen_jax.generation.constraints import GrammarMatcher, fill_bitmask
from qwen_jax.generation.options import (
    SamplingKwargs,
    SamplingOptions,
    generation_defaults,
    initial_history,
    resolve_batch,
    row_params,
)
from qwen_jax.generation.sampler import History, RowParams, SamplerVariant, sample_rows, variant_for
from qwen_jax.model.causal_lm import Qwen2ForCausalLM
from qwen_jax.model.kv_cache import KVCache
from qwen_jax.sharding import named_sharding, platform_of

MIN_PROMPT_BUCKET = 16
PREFILL_CHUNK = 2048  # prompt tokens per model call on CPU: bounds prefill activations, keeps matmuls large
PROGRESS_MIN_CHUNKS = 4  # prefills of this many chunks or more show a progress bar on a terminal
LONG_PROMPT_BUCKET = 8192  # past this, prompt buckets grow by multiples of it instead of doubling


def default_prefill_chunk(platform: str, longest: int) -> int:
    """Prompt tokens per prefill call when the caller gives none: `PREFILL_CHUNK` on CPU; `longest`
    (the whole prompt in one call) on a GPU or TPU, where activations of even a 128K-token prompt
    of the 0.5B model (~3 GB) are small next to device memory, and one call lets the fused
    attention kernels run their causal path (a later chunk must mask the cache it reads, which
    cuDNN does with a dense bias). Pass `prefill_chunk=` to bound prefill memory on a small card."""
    return PREFILL_CHUNK if platform == "cpu" else longest


# ----------------------------------------------------------------------------- results
@dataclasses.dataclass
class Timing:
    """Wall-clock timing of one generation call (compile time is counted apart)."""

    prompt_tokens: int = 0  # real (unpadded) prompt tokens over all rows
    cached_tokens: int = 0  # of those, tokens whose keys and values the previous call left (not prefilled)
    prefill_s: float = 0.0
    decode_tokens: int = 0  # tokens produced after the first one, over all rows
    decode_s: float = 0.0
    compile_s: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens prefilled (cached ones are not) per second."""
        prefilled = self.prompt_tokens - self.cached_tokens
        return prefilled / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def summary(self) -> str:
        cached = f" ({self.cached_tokens} cached)" if self.cached_tokens else ""
        return (
            f"prompt {self.prompt_tokens} tokens{cached}, prefill {self.prefill_s:.3f} s "
            f"({self.prefill_tokens_per_s:.1f} tok/s), decode {self.decode_tokens} tokens "
            f"({self.decode_tokens_per_s:.1f} tok/s), compile {self.compile_s:.2f} s"
        )


@dataclasses.dataclass
class SpeculationStats:
    """Acceptance of a speculative generation call (`qwen_jax.generation.speculative`), over all rows.

    steps: target verification steps, counted per row (a batch step of 3 active rows counts 3).
    proposed_tokens / accepted_tokens: proposals made and accepted by the target.
    generated_tokens: tokens those steps produced (accepted proposals plus the target's own, after
    truncation at a stop token or max_new_tokens).
    """

    steps: int = 0
    proposed_tokens: int = 0
    accepted_tokens: int = 0
    generated_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted over proposed tokens (0 when nothing was proposed)."""
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens produced per target step of a row (1 without speculation)."""
        return self.generated_tokens / self.steps if self.steps else 0.0

    def summary(self) -> str:
        return (
            f"speculation: {self.accepted_tokens}/{self.proposed_tokens} proposals accepted "
            f"({self.acceptance_rate:.0%}), {self.tokens_per_step:.2f} tokens per step"
        )


@dataclasses.dataclass
class Generation:
    """Result of a generation call, one entry per prompt.

    token_ids: the generated ids, ending with the stop token when one was produced.
    finish_reasons: "stop" (a stop token or stop string) or "length" (max_new_tokens).
    texts: the decoded continuation without special tokens (None from the id-level API).
    logits: with `return_logits`, the raw model logits of each generated step `[steps, vocab]`.
    speculation: with `speculative=`, the acceptance statistics (None without speculation).
    """

    token_ids: list[list[int]]
    finish_reasons: list[str]
    prompt_lengths: list[int]
    timing: Timing
    texts: list[str] | None = None
    logits: list[np.ndarray] | None = None
    speculation: SpeculationStats | None = None


# ----------------------------------------------------------------------------- compilation
def _compiled(name: str, jitted, static: _Static, args: tuple) -> tuple[Any, float]:
    """(the executable of `jitted` for `static` and these arguments, seconds spent compiling it now)."""
    key = (name, static, argument_signature(args))
    return EXECUTABLES.get(f"generation.{name}", key, lambda: jitted.lower(static, *args).compile())


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the traced functions specialise on besides array shapes."""

    graphdef: Any
    variant: SamplerVariant | None  # None: no sampling (a prefill chunk)
    return_logits: bool
    cache_sharding: Any  # NamedSharding of the cache arrays, or None off a mesh
    capacity: int  # length of the decode loop's token buffer (>= max_new_tokens)
    empty_cache: bool = False  # a prefill chunk into an empty cache (the first of one): see Qwen2ForCausalLM


def _constrain_cache(cache: KVCache, static: _Static) -> KVCache:
    if static.cache_sharding is None:
        return cache
    k = jax.lax.with_sharding_constraint(cache.k, static.cache_sharding)
    v = jax.lax.with_sharding_constraint(cache.v, static.cache_sharding)
    return KVCache(k, v, cache.lengths)


def _prefill_chunk(static: _Static, state, cache, chunk_ids, chunk_lengths, last, rope_length):
    """One chunk of the (right-padded) prompts: write its tokens into the cache and keep, per row,
    the hidden state of the latest prompt token seen (a row's first new token comes from its last).

    chunk_lengths: int32 [B], the prompt tokens of each row in this chunk (0 once a row's prompt
    has ended). rope_length: the longest prompt, from which dynamic-NTK rope scales in every chunk.
    """
    model = nnx.merge(static.graphdef, state)
    steps = jnp.arange(chunk_ids.shape[1], dtype=jnp.int32)
    mask = (steps[None, :] < chunk_lengths[:, None]).astype(jnp.int32)
    positions = cache.lengths[:, None] + steps[None, :]
    hidden, cache = model.hidden_states(
        chunk_ids, positions, mask, cache=cache, rope_length=rope_length, empty_cache=static.empty_cache
    )
    here = jnp.take_along_axis(hidden, jnp.maximum(chunk_lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    last = jnp.where((chunk_lengths > 0)[:, None], here, last)
    return _constrain_cache(cache, static), last


def _carry_prefix(static: _Static, cache, kept, reused):
    """`cache` (batch 1) holding the previous call's keys and values `kept` in its first slots, its
    length set to `reused`: the prompt's tokens past them are prefilled next."""
    slots = min(kept.max_len, cache.max_len)
    k = jax.lax.dynamic_update_slice_in_dim(cache.k, kept.k[:, :, :slots].astype(cache.k.dtype), 0, axis=2)
    v = jax.lax.dynamic_update_slice_in_dim(cache.v, kept.v[:, :, :slots].astype(cache.v.dtype), 0, axis=2)
    lengths = jnp.broadcast_to(reused, cache.lengths.shape).astype(jnp.int32)
    return _constrain_cache(KVCache(k, v, lengths), static)


def _sample(static: _Static, logits, history, params: RowParams, index, bitmask=None):
    """Token `index` of every row from `logits` (allowed by `bitmask`, None: any), and the history that includes it."""
    tokens = sample_rows(logits, history, params.at_token(index), static.variant, bitmask)
    return tokens, None if history is None else history.record(tokens)


def _first_token(static: _Static, state, last, history, params, bitmask):
    """Each row's first new token from the hidden state of its last prompt token."""
    model = nnx.merge(static.graphdef, state)
    logits = model.logits(last[:, None])[:, 0]
    token, history = _sample(static, logits, history, params, 0, bitmask)
    return token, history, logits if static.return_logits else None


def _decode_token(static: _Static, model, cache, token, history, params, step, bitmask=None):
    """One cached forward of `token` (each row at its own cache length), then the next token.

    Shared by the loop and the stream.
    """
    logits, cache = model.forward(token[:, None], cache.lengths[:, None], None, cache=cache)
    logits = logits[:, 0]
    next_token, history = _sample(static, logits, history, params, step, bitmask)
    return next_token, _constrain_cache(cache, static), history, logits


def _decode_loop(static: _Static, state, cache, first_token, history, params, max_new_tokens, stop_ids):
    """All remaining decode steps in one `lax.while_loop`.

    Returns tokens `[B, static.capacity]` (pad after each row's end), the number of tokens each
    row produced, the cache, and (with return_logits) the logits of every step.
    """
    model = nnx.merge(static.graphdef, state)
    batch = first_token.shape[0]
    tokens = jnp.zeros((batch, static.capacity), jnp.int32).at[:, 0].set(first_token)
    done = jnp.isin(first_token, stop_ids)
    lengths = jnp.ones((batch,), jnp.int32)
    vocab = model.config.vocab_size
    all_logits = jnp.zeros((batch, static.capacity, vocab), jnp.float32) if static.return_logits else None

    def cond(carry):
        step, done = carry[0], carry[1]
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, done, lengths, tokens, cache, history, all_logits = carry
        previous = tokens[:, step - 1]
        next_token, cache, history, logits = _decode_token(static, model, cache, previous, history, params, step)
        next_token = jnp.where(done, 0, next_token)
        tokens = tokens.at[:, step].set(next_token)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(next_token, stop_ids)
        if all_logits is not None:
            all_logits = all_logits.at[:, step].set(logits)
        return step + 1, done, lengths, tokens, cache, history, all_logits

    carry = (jnp.asarray(1, jnp.int32), done, lengths, tokens, cache, history, all_logits)
    _, _, lengths, tokens, cache, _, all_logits = jax.lax.while_loop(cond, body, carry)
    return tokens, lengths, cache, all_logits


def _decode_step(static: _Static, state, cache, token, history, params, step, bitmask):
    """One decode step for streaming and for constrained batches (`bitmask`: None, or each row's allowed tokens)."""
    model = nnx.merge(static.graphdef, state)
    next_token, cache, history, logits = _decode_token(static, model, cache, token, history, params, step, bitmask)
    return next_token, cache, history, logits if static.return_logits else None


# `static` (argument 0) is hashable (graphdef, frozen settings); the cache (argument 2) is donated.
_PREFILL = jax.jit(_prefill_chunk, static_argnums=0, donate_argnums=2)
_CARRY_PREFIX = jax.jit(_carry_prefix, static_argnums=0, donate_argnums=1)
_FIRST_TOKEN = jax.jit(_first_token, static_argnums=0)
_DECODE_LOOP = jax.jit(_decode_loop, static_argnums=0, donate_argnums=2)
_DECODE_STEP = jax.jit(_decode_step, static_argnums=0, donate_argnums=2)


# ----------------------------------------------------------------------------- request preparation
def next_power_of_two(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def prompt_bucket(length: int) -> int:
    """Padded prompt length: the next power of two (at least MIN_PROMPT_BUCKET) up to
    LONG_PROMPT_BUCKET, then the next multiple of it (a 40K prompt pads to 40,960, not 65,536)."""
    if length <= LONG_PROMPT_BUCKET:
        return max(MIN_PROMPT_BUCKET, next_power_of_two(length))
    return -(-length // LONG_PROMPT_BUCKET) * LONG_PROMPT_BUCKET


def cache_bucket(length: int) -> int:
    """Cache length: the next power of two up to 4096, then the next multiple of 4096
    (large caches round up by less)."""
    if length <= 4096:
        return next_power_of_two(length)
    return -(-length // 4096) * 4096


def new_tokens_bucket(max_new_tokens: int) -> int:
    """Length of the decode loop's token buffer: the next power of two, at least MIN_PROMPT_BUCKET."""
    return max(MIN_PROMPT_BUCKET, next_power_of_two(max_new_tokens))


@dataclasses.dataclass
class _Request:
    """A validated batch: padded arrays on device plus everything the loops need."""

    model: Qwen2ForCausalLM
    options: SamplingOptions
    static: _Static
    state: Any
    host_ids: np.ndarray  # the padded prompts on the host past `reused`, sliced into prefill chunks
    prompts: list[list[int]]
    prompt_lengths: list[int]
    prefill_chunk: int  # prompt tokens per model call in prefill (divides host_ids' width)
    cache: KVCache
    params: RowParams  # each row's sampling settings and seed
    history: History | None  # each row's prompt ids and logit bias (None: no bias or penalty)
    stop_ids: jax.Array
    max_new_tokens: int
    replicated: NamedSharding | None  # where small inputs go on a mesh (None: the default device)
    grammars: list[GrammarMatcher | None] | None = None  # structured output: each row's matcher
    prefix_cache: bool = False  # keep the cache for the model's next call (`conversation_cache`)
    reused: int = 0  # the prompt's first tokens whose keys and values `carried` holds (batch 1)
    carried: KVCache | None = None  # the previous call's cache, copied into `cache` before prefill

    def put(self, x) -> jax.Array:
        return _put(x, self.replicated)

    def bitmask(self, done: Sequence[bool] = ()) -> jax.Array | None:
        """The rows' allowed next tokens on the device (None without grammars); rows `done` are free."""
        if self.grammars is None:
            return None
        matchers = [None if row < len(done) and done[row] else g for row, g in enumerate(self.grammars)]
        return self.put(fill_bitmask(matchers, self.model.config.vocab_size))


def _put(x, sharding: NamedSharding | None) -> jax.Array:
    return jax.device_put(x, sharding) if sharding is not None else jax.device_put(x)


def _prepare(
    model: Qwen2ForCausalLM,
    prompts: Sequence[Sequence[int]],
    options: SamplingOptions,
    seeds: Sequence[int],
    pad_id: int | None,
    return_logits: bool,
    prefill_chunk: int | None = None,
    *,
    grammars: Sequence[GrammarMatcher | None] | None = None,
    cache_slack: int = 0,
    prefix_cache: bool = False,
) -> _Request:
    """A validated batch; `cache_slack` more cache slots past prompt + max_new_tokens (speculative
    verification writes a few proposals past a row's length). With `prefix_cache`, a single prompt
    that extends the model's previous call reuses its cache (`conversation_cache`); any call first
    drops what the previous one kept."""
    if not isinstance(model, Qwen2ForCausalLM):
        raise TypeError(f"expected a Qwen2ForCausalLM, got {type(model).__name__}")
    model_config = model.config
    context = model_config.context_length
    if prefill_chunk is None:
        prefill_chunk = default_prefill_chunk(platform_of(model.mesh), context)
    prefill_chunk = int(prefill_chunk)
    if prefill_chunk < 1:
        raise GenerationError(f"prefill_chunk must be >= 1, got {prefill_chunk}", param="prefill_chunk")
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts:
        raise GenerationError("no prompts given")
    max_new = options.max_new_tokens
    for i, ids in enumerate(prompts):
        if not ids:
            raise GenerationError(f"prompt {i} is empty: at least one token is needed to generate from")
        if len(ids) > context:
            raise GenerationError(
                f"prompt {i} has {len(ids)} tokens, more than the model's context of {context}"
                f"{_context_hint(model_config)}"
            )
        if len(ids) + max_new > context:
            raise GenerationError(
                f"max_new_tokens={max_new} overflows the context: prompt {i} has {len(ids)} tokens and the "
                f"model's context is {context} (at most {context - len(ids)} new tokens){_context_hint(model_config)}",
                param="max_new_tokens",
            )
        if min(ids) < 0 or max(ids) >= model_config.vocab_size:
            raise GenerationError(f"prompt {i} has token ids outside the vocabulary [0, {model_config.vocab_size})")

    graphdef, state = nnx.split(model)
    single = prompts[0] if prefix_cache and len(prompts) == 1 else None
    carried, reused = conversation_cache.take(model, graphdef, state, single)

    pad_id = pad_id if pad_id is not None else 0
    full_bucket = prompt_bucket(max(len(p) for p in prompts))
    bucket = prompt_bucket(max(len(p) for p in prompts) - reused)
    chunk = min(prefill_chunk, bucket)
    bucket = -(-bucket // chunk) * chunk  # whole chunks
    input_ids = np.full((len(prompts), bucket), pad_id, np.int32)
    for row, ids in enumerate(prompts):  # right padding: every row's tokens start at cache slot 0
        input_ids[row, : len(ids) - reused] = ids[reused:]

    mesh = model.mesh
    # Derived from the bucket (a new prompt length inside it reuses the compiled code), never past
    # the context's bucket (prompt + max_new_tokens fit the context, checked above). A reused
    # prefix leaves it as is (padding of the rest's last chunk past it is dropped by the writes).
    cache_len = min(cache_bucket(full_bucket + max_new + cache_slack), cache_bucket(context + cache_slack))
    cache_dtype = model.dtype
    cache_sharding = None
    replicated = None
    if mesh is not None:
        shape = (
            model_config.num_hidden_layers,
            len(prompts),
            cache_len,
            model_config.num_key_value_heads,
            model_config.head_dim,
        )
        cache_sharding = named_sharding(KVCache.logical_axes(), shape, mesh, model.rules)
        replicated = NamedSharding(mesh, PartitionSpec())
        cache = jax.jit(
            lambda: KVCache.init(model_config, len(prompts), cache_len, cache_dtype),
            out_shardings=KVCache(cache_sharding, cache_sharding, replicated),
        )()
    else:
        cache = KVCache.init(model_config, len(prompts), cache_len, cache_dtype)

    eos = sorted(options.stop_token_ids) or [-1]  # -1 never matches: no stop token
    put = functools.partial(_put, sharding=replicated)
    variant = variant_for([options.draw_settings], adjustments=options.adjusts_logits)
    history = initial_history(options, model_config.vocab_size, prompts) if variant.adjustments else None
    return _Request(
        model=model,
        options=options,
        static=_Static(graphdef, variant, return_logits, cache_sharding, min(cache_len, new_tokens_bucket(max_new))),
        state=state,
        host_ids=input_ids,
        prompts=prompts,
        prompt_lengths=[len(p) for p in prompts],
        prefill_chunk=chunk,
        cache=cache,
        params=jax.tree.map(put, row_params(options, seeds)),
        history=None if history is None else jax.tree.map(put, history),
        stop_ids=put(np.asarray(eos, np.int32)),
        max_new_tokens=max_new,
        replicated=replicated,
        grammars=None if grammars is None or not any(grammars) else list(grammars),
        prefix_cache=prefix_cache,
        reused=reused,
        carried=carried,
    )


def _context_hint(config: Qwen2Config) -> str:
    if config.rope_scaling.rope_type != "default":
        return ""
    return (
        "; a longer context needs rope scaling, e.g. YaRN as Qwen documents for 128K: "
        "load with rope_scaling='yarn:4' (command line: --rope-scaling yarn:4)"
    )


def _run_prefill(request: _Request, timing: Timing):
    """Prefill chunk by chunk (one compiled chunk step, called up to the longest prompt), with a
    progress bar on a terminal when the prompt spans several chunks; then the first tokens. A
    reused prefix (`request.carried`) is copied into the cache first and only the rest is prefilled."""
    chunk = request.prefill_chunk
    # Keyed only on what each function uses: another max_new_tokens or sampler variant reuses them.
    lengths = np.asarray(request.prompt_lengths, np.int32)
    pending = lengths - request.reused  # the prompt tokens to prefill
    chunks = -(-int(pending.max()) // chunk)
    first_static = dataclasses.replace(request.static, capacity=0)
    # One chunk into an empty cache: attention over its own keys. Several: every chunk reads the
    # cache, so one compiled step serves them all (an empty-cache first chunk would be a second compilation).
    prefill_static = dataclasses.replace(
        first_static, variant=None, return_logits=False, empty_cache=chunks == 1 and not request.reused
    )
    last = request.put(np.zeros((len(lengths), request.model.config.hidden_size), request.model.dtype))
    rope_length = request.put(np.int32(lengths.max()))
    cache, request.cache = request.cache, None  # donated
    carried, request.carried = request.carried, None
    compile_s = 0.0
    start = time.perf_counter()
    if carried is not None:
        args = (cache, carried, request.put(np.int32(request.reused)))
        carry, seconds = _compiled("carry_prefix", _CARRY_PREFIX, prefill_static, args)
        compile_s += seconds
        del cache
        cache = carry(*args)
        del args, carried
    with tqdm(
        total=int(pending.sum()),
        unit="tok",
        desc="prefill",
        leave=False,
        disable=None if chunks >= PROGRESS_MIN_CHUNKS else True,
    ) as bar:
        for index in range(chunks):
            real = np.clip(pending - index * chunk, 0, chunk).astype(np.int32)
            args = (
                request.state,
                cache,
                request.put(request.host_ids[:, index * chunk : (index + 1) * chunk]),
                request.put(real),
                last,
                rope_length,
            )
            step, seconds = _compiled("prefill", _PREFILL, prefill_static, args)  # compiled once
            compile_s += seconds
            del cache
            cache, last = step(*args)
            bar.update(int(real.sum()))
        args = (request.state, last, request.history, request.params, request.bitmask())
        first, seconds = _compiled("first_token", _FIRST_TOKEN, first_static, args)
        compile_s += seconds
        token, history, logits = first(*args)
        token.block_until_ready()
    timing.compile_s += compile_s
    timing.prefill_s = time.perf_counter() - start - compile_s
    timing.prompt_tokens = sum(request.prompt_lengths)
    timing.cached_tokens = request.reused
    return token, cache, history, logits


def _keep(request: _Request, generated: Sequence[Sequence[int]], cache: KVCache | None) -> None:
    """Leave a single prompt's cache for the model's next call: it holds the prompt and the generated
    tokens but the last (no step has read that one)."""
    if not request.prefix_cache or len(generated) != 1 or cache is None:
        return
    tokens = request.prompts[0] + list(generated[0][:-1])
    conversation_cache.keep(request.model, request.static.graphdef, request.state, tokens, cache)


# ----------------------------------------------------------------------------- public API
def generate_ids(
    model: Qwen2ForCausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    stop_token_ids: Sequence[int] = (),
    config: GenerationConfig | None = None,
    return_logits: bool = False,
    prefill_chunk: int | None = None,
    prefix_cache: bool = True,
    **sampling: Unpack[SamplingKwargs],
) -> Generation:
    """Generate from a batch of token-id prompts: prefill, then one jitted decode loop
    (`qwen_jax.generation.generate_ids` is this function with `speculative=` added).

    Args:
        model: a loaded `Qwen2ForCausalLM`.
        prompts: token-id prompts (any lengths; each row's result is independent of the others).
        stop_token_ids: more ids that end a row (besides the config's eos ids and `stop`'s ids).
        config: the sampling defaults (default: the model's, from the checkpoint's generation_config.json).
        return_logits: also return the raw logits of every generated step (`Generation.logits`).
        prefill_chunk: prompt tokens per model call during prefill (default `default_prefill_chunk`:
            2,048 on CPU, the whole prompt on a GPU/TPU); smaller bounds prefill memory tighter,
            larger runs bigger matrix products, and a prompt that fits one chunk skips reading the cache.
        prefix_cache: reuse the previous call's cache when this single prompt extends it (a
            conversation: only the new tokens are prefilled; `qwen_jax.generation.conversation_cache`),
            and keep this call's cache for the next one. The tokens are those of a call without it.
            False: neither (and drop what was kept).
        **sampling: the sampling options (`qwen_jax.generation.options.SamplingKwargs`), e.g.
            `temperature=0.7, top_p=0.9, seed=1`; `seed` may give one seed per prompt. `stop` may
            hold token ids only here (stop strings need the text: `qwen_jax.generate`).
    """
    config, options, seeds = resolve_ids_options(model, len(prompts), stop_token_ids, config, sampling)
    return generate_batch(
        model, prompts, options, seeds, config.pad_token_id, return_logits, prefill_chunk, prefix_cache=prefix_cache
    )


def resolve_ids_options(
    model: Qwen2ForCausalLM,
    rows: int,
    stop_token_ids: Sequence[int],
    config: GenerationConfig | None,
    sampling: dict,
) -> tuple[GenerationConfig, SamplingOptions, list[int]]:
    """(config, options, per-row seeds) of a token-id call (`generate_ids`, `stream_ids`); refuses
    the options that need the tokenizer (stop strings, structured output) with a GenerationError."""
    config = generation_defaults(model, config=config)
    options, seeds = resolve_batch(
        config, rows, vocab_size=model.config.vocab_size, stop_token_ids=stop_token_ids, **sampling
    )
    _refuse_text_options(options)
    return config, options, list(seeds)


def _refuse_text_options(options: SamplingOptions) -> None:
    if options.constraint is not None:
        raise GenerationError(
            f"structured output ({options.constraint.kind}) needs the tokenizer: use qwen_jax.generate, "
            "qwen_jax.stream or the Engine",
            param=options.constraint.kind,
        )
    if options.stop_strings:
        raise GenerationError(
            "stop strings need the text: use qwen_jax.generate or qwen_jax.stream "
            "(generate_ids and stream_ids stop on token ids)",
            param="stop",
        )


def generate_batch(
    model: Qwen2ForCausalLM,
    prompts: Sequence[Sequence[int]],
    options: SamplingOptions,
    seeds: Sequence[int],
    pad_id: int | None = None,
    return_logits: bool = False,
    prefill_chunk: int | None = None,
    grammars: Sequence[GrammarMatcher | None] | None = None,
    prefix_cache: bool = False,
) -> Generation:
    """`generate_ids` with resolved options: row r of `prompts` seeded with `seeds[r]`, constrained
    by `grammars[r]` where given (structured output: decoded step by step); `prefix_cache` as there."""
    if grammars is not None and len(grammars) != len(prompts):
        raise ValueError(f"{len(grammars)} grammars for {len(prompts)} prompts")
    request = _prepare(
        model,
        prompts,
        options,
        seeds,
        pad_id,
        return_logits,
        prefill_chunk,
        grammars=grammars,
        prefix_cache=prefix_cache,
    )
    timing = Timing()
    first_token, cache, history, first_logits = _run_prefill(request, timing)
    if request.grammars is not None:
        return _decode_constrained(request, first_token, cache, history, first_logits, timing)

    args = (
        request.state,
        cache,
        first_token,
        history,
        request.params,
        request.put(np.int32(request.max_new_tokens)),
        request.stop_ids,
    )
    executable, compile_s = _compiled("decode_loop", _DECODE_LOOP, request.static, args)
    del cache
    start = time.perf_counter()
    tokens, lengths, cache, step_logits = executable(*args)
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    timing.compile_s += compile_s
    timing.decode_s = time.perf_counter() - start
    timing.decode_tokens = int(lengths.sum()) - len(lengths)

    token_ids = [tokens[row, :n].tolist() for row, n in enumerate(lengths)]
    _keep(request, token_ids, cache)
    reasons = ["stop" if ids[-1] in options.stop_token_ids else "length" for ids in token_ids]
    logits = None
    if return_logits:
        step_logits = np.array(step_logits)  # writable copy
        step_logits[:, 0] = np.asarray(first_logits)
        logits = [step_logits[row, :n] for row, n in enumerate(lengths)]
    return Generation(token_ids, reasons, request.prompt_lengths, timing, logits=logits)


def _advance(request: _Request, row: int, token_id: int) -> None:
    """Feed a drawn token to row `row`'s grammar."""
    grammar = request.grammars[row] if request.grammars is not None else None
    if grammar is not None and not grammar.advance(token_id):
        # Cannot happen for a token drawn under the grammar's own bitmask; kept as a clear failure.
        raise GenerationError(f"the generated token {token_id} does not match the {grammar.constraint.kind}")


def _decode_constrained(request: _Request, first_token, cache, history, first_logits, timing: Timing) -> Generation:
    """The decode of a batch with grammars: one jitted step per token, the bitmask filled on the host."""
    stop_ids = request.options.stop_token_ids
    rows = len(request.prompt_lengths)
    generated: list[list[int]] = [[] for _ in range(rows)]
    logits: list[list[np.ndarray]] = [[] for _ in range(rows)]
    done = [False] * rows
    token, step_logits, executable, start = first_token, first_logits, None, None
    for step in range(request.max_new_tokens):
        if step > 0:
            args = (request.state, cache, token, history, request.params, request.put(np.int32(step)))
            args = (*args, request.bitmask(done))
            if executable is None:  # every step has the same signature: look it up once
                executable, compile_s = _compiled("decode_step", _DECODE_STEP, request.static, args)
                timing.compile_s += compile_s
                start = time.perf_counter()
            del cache
            token, cache, history, step_logits = executable(*args)
        host = np.asarray(token)
        for row in range(rows):
            if done[row]:
                continue
            token_id = int(host[row])
            generated[row].append(token_id)
            if step_logits is not None:
                logits[row].append(np.asarray(step_logits[row]))
            _advance(request, row, token_id)
            done[row] = token_id in stop_ids
        if all(done):
            break
    if start is not None:
        timing.decode_s = time.perf_counter() - start
    _keep(request, generated, cache)
    timing.decode_tokens = sum(len(ids) for ids in generated) - rows
    reasons = ["stop" if ids[-1] in stop_ids else "length" for ids in generated]
    stacked = [np.stack(row_logits) for row_logits in logits] if first_logits is not None else None
    return Generation(generated, reasons, request.prompt_lengths, timing, logits=stacked)


class _Stream:
    """An iterator over the subclass's `_run()` generator; `result` is set once it finishes or is closed."""

    def __init__(self):
        self.result: Generation | None = None
        self._iterator = self._run()

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._iterator)

    def close(self) -> None:
        """Stop generating (e.g. on Ctrl-C); `result` then holds what was produced so far."""
        self._iterator.close()


class TokenStream(_Stream):
    """Iterator over the ids generated for one prompt, one jitted decode step per token.

    After the iteration ends (or `close()`), `result` holds the `Generation` (timing included).
    """

    def __init__(
        self,
        model: Qwen2ForCausalLM,
        prompt_ids: Sequence[int],
        options: SamplingOptions,
        pad_id: int | None = None,
        return_logits: bool = False,
        prefill_chunk: int | None = None,
        grammar: GrammarMatcher | None = None,
        prefix_cache: bool = False,
    ):
        self._request = _prepare(
            model,
            [prompt_ids],
            options,
            [options.seed],
            pad_id,
            return_logits,
            prefill_chunk,
            grammars=[grammar],
            prefix_cache=prefix_cache,
        )
        self._return_logits = return_logits
        super().__init__()

    def _run(self) -> Iterator[int]:
        request, timing = self._request, Timing()
        generated: list[int] = []
        logits: list[np.ndarray] = []
        stop_ids = request.options.stop_token_ids
        finish = "length"
        cache = None  # the latest step's cache (None while a step runs on the donated one)
        try:
            token, cache, history, step_logits = _run_prefill(request, timing)
            decode_start = executable = None
            for step in range(request.max_new_tokens):
                if step > 0:
                    args = (request.state, cache, token, history, request.params, request.put(np.int32(step)))
                    args = (*args, request.bitmask())
                    if executable is None:  # every step has the same signature: look it up once
                        executable, compile_s = _compiled("decode_step", _DECODE_STEP, request.static, args)
                        timing.compile_s += compile_s
                        decode_start = time.perf_counter()
                    cache = None
                    token, cache, history, step_logits = executable(*args)
                token_id = int(token[0])
                generated.append(token_id)
                _advance(request, 0, token_id)
                if self._return_logits:
                    logits.append(np.asarray(step_logits[0]))
                if step > 0:
                    timing.decode_tokens += 1
                    timing.decode_s = time.perf_counter() - decode_start
                yield token_id
                if token_id in stop_ids:
                    finish = "stop"
                    break
        finally:
            if generated:
                _keep(request, [generated], cache)
            self.result = Generation(
                [generated], [finish], request.prompt_lengths, timing, logits=[np.stack(logits)] if logits else None
            )


def stream_ids(
    model: Qwen2ForCausalLM,
    prompt_ids: Sequence[int],
    *,
    stop_token_ids: Sequence[int] = (),
    config: GenerationConfig | None = None,
    return_logits: bool = False,
    prefill_chunk: int | None = None,
    prefix_cache: bool = True,
    **sampling: Unpack[SamplingKwargs],
) -> TokenStream:
    """Generate from one token-id prompt, yielding each id as soon as it is produced.

    Arguments as for `generate_ids` (one prompt, one seed): the ids are those `generate_ids` gives
    (`qwen_jax.generation.stream_ids` is this function with `speculative=` added).
    """
    config, options, seeds = resolve_ids_options(model, 1, stop_token_ids, config, sampling)
    return TokenStream(
        model,
        prompt_ids,
        options.replace(seed=seeds[0]),
        config.pad_token_id,
        return_logits,
        prefill_chunk,
        prefix_cache=prefix_cache,
    )
