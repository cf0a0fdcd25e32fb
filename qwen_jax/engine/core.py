"""`Engine`: continuous batching over a fixed number of decode slots, on its own thread.

How it runs. Requests wait in a FIFO queue and take the lowest free slot as one frees up. Each
engine iteration dispatches one step. The prompts of requests that have taken a slot go in by
chunks fused with the decode step of the running requests (`mixed` programs: the decode rows ride
on the chunks' matrix products, so the running requests keep generating while prompts go in, and
one step costs less than a prefill and a decode step apart). The prompts share a token budget per
step (`prefill_chunk` tokens, default 256 on CPU and 512 on GPU/TPU): one long prompt takes it
whole, or several short ones a chunk each, so a burst of requests gets its first tokens after one
step (`_plan_chunks`); a chunk that ends its prompt also samples its first token. When one prompt
goes in and nothing is decoding, it is prefilled whole in one call (padded to a bucket,
`prefill_buckets`: the fastest way to a first token) and inserted into its slot. Otherwise one
decode step advances every decoding slot by a token. With `prefill_chunk=0` every prompt is
prefilled whole, and requests of the same prompt admitted together (`generate` queues its batch
at once) share one prefill: its cache goes into each one's slot, each draws its own first token.

Prefix caching (`prefix_cache=True`, the default): a request that takes a slot first copies the
longest cached prefix of its prompt (whole blocks of 16 tokens) from the pool into its cache row
and prefills only the rest; its prompt's blocks, and at its end its prompt + output, are copied out
into the pool (`qwen_jax.engine.prefix_cache`). Each slot keeps its
own cache length and positions, so what a request generates never depends on which requests share
the batch or when it joined. A request that finishes (stop token, stop string, max tokens) or is
aborted frees its slot at once; a gap it leaves below running requests is closed by moving the
highest one down (one row copy), so the running requests fill slots 0..n-1 and each decode step
runs the narrowest compiled width (1, 2, 4, ..., slots) that covers them: a lightly loaded server
does not pay for idle slots. (A mixed step runs every slot: its cost is its prompt chunks', and one
width keeps the warm-up short; see `qwen_jax.engine.programs`.)

The host never waits for the step it just dispatched: step i is dispatched before the tokens of
step i-1 are read back, so detokenizing and stop-string matching overlap the device. A request
that ends is therefore computed one step further than needed, and that token is dropped.

All device work goes through `EnginePrograms`: a fixed set of ahead-of-time compiled programs
(prefill per bucket, insert, decode step per width, mixed step per width and chunk length, row
start, samplers, logprobs, row move). `warmup()` compiles all of them; afterwards nothing
compiles while serving.

Structured output (`json_schema=`, `regex=`, `choice=`, `grammar=`): a constrained request's
grammar is compiled (once per schema, cached) in the caller's thread by `submit`, and its matcher
lives on the request. Its next allowed tokens depend on the token just drawn, so for a step with a
constrained row the engine dispatches the step's forward first, then reads back the earlier steps'
tokens and computes every constrained row's bitmask on the host while the device runs that
forward, then dispatches the sampling with the bitmask (free rows: all ones, same program).

Speculative decoding (`speculative="ngram"` or `SpeculativeOptions`): a decode step may instead be
a speculative step, in which each decoding row proposes up to K tokens and the target checks every
row's proposals in one forward of K + 1 positions per row (one compiled program per width,
`EnginePrograms.speculative_step`); a row gets its accepted proposals and one token of the
target's own, 1 to K + 1 tokens. With "ngram" (prompt lookup) the proposals are the tokens that
followed the latest earlier occurrence of the row's last n tokens in its own prompt + output. With
a draft model (`SpeculativeOptions(method="draft", draft_model=...)`) the draft proposes, in the
same compiled program as the check; it has a KV cache row per slot and takes no part in prefill or
mixed steps: before a speculative step, each proposing row's draft first reads the tokens it has not
seen (its prompt, a cached prefix included, and tokens decoded without speculation) in catch-up
steps of up to 16 tokens per row, or of the prefill chunk's length for a prompt
(`EnginePrograms.draft_chunks`, `_draft_catch_up`), and after the step
its cache length is the target's (it read every proposal), so the next speculative step needs none.
Greedy rows give exactly the tokens of plain decoding; sampling rows follow the same distribution by
rejection sampling (other random draws than plain decoding).
Proposals need every earlier token on the host, so a speculative step first reads back the steps in
flight (it gives up the host/device overlap of plain decode steps). Back-off rule, per step:
- a step speculates only when no prompt chunk goes in (mixed steps decode one token per row), no
  decoding row is constrained (structured output), and at most `speculative_max_rows` rows decode
  (default 4: at high load the batch already keeps the device busy, and vLLM measured speculation
  slowing serving down there), within the compiled speculative widths (the lowest slots);
- a row proposes only while the moving average of its accepted fraction (accepted / proposed per
  step, a step without an n-gram match counting 0, weight `ACCEPTANCE_WEIGHT` for the newest step)
  stays at or above `speculative_min_acceptance` (default 0.25); below it the row stops proposing
  for `PAUSE_STEPS` decode steps, then tries again from the floor (one more poor step pauses it again);
- when no row has a proposal, the step is a plain decode step.
Acceptance counters are in `EngineStats` (`speculative_*`).

Requests take the sampling keyword arguments of every generation call (`SamplingKwargs`) and draw
with the same sampler as `qwen_jax.generate` (`qwen_jax.generation.sampler`), so a request gives
the tokens `qwen_jax.generate` gives for the same prompt, seed and settings.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx
from tqdm.auto import tqdm
from typing_extensions import Unpack

from qwen_jax.config import GenerationConfig
from qwen_jax.engine.prefix_cache import DEFAULT_BLOCK_TOKENS, PrefixIndex
from qwen_jax.engine.programs import EnginePrograms, StepOutputs, default_mixed_chunk, plan_chunk_shape
from qwen_jax.engine.requests import (
    Completion,
    Delta,
    Request,
    RequestHandle,
    TokenLogprob,
    check_top_logprobs,
    new_request_id,
    resolve_request,
)
from qwen_jax.errors import EngineClosedError, EngineError, GenerationError, QueueFullError
from qwen_jax.generation.constraints import GrammarCompiler, fill_bitmask, grammar_compiler
from qwen_jax.generation.options import Prompt, SamplingKwargs, generation_defaults, row_seeds
from qwen_jax.generation.speculative import SpeculativeOptions, ngram_proposals, resolve_speculative
from qwen_jax.sharding import platform_of

DEFAULT_MAX_LEN = 4096
DEFAULT_SPECULATIVE_MAX_ROWS = 4  # speculate only while at most this many rows decode (see the back-off rule)
DEFAULT_MIN_ACCEPTANCE = 0.25  # a row proposes while its moving acceptance stays at or above this
ACCEPTANCE_WEIGHT = 0.25  # weight of a row's newest step in its moving acceptance
PAUSE_STEPS = 16  # decode steps a row with poor acceptance sits out before proposing again
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's counters."""

    slots: int
    running: int  # requests in a slot
    waiting: int  # requests queued for a slot
    prompt_tokens: int  # totals since start
    generated_tokens: int
    finished_requests: int
    aborted_requests: int
    decode_steps: int
    decode_rows: int  # rows the decode steps computed (a compiled width >= the occupied slots; mixed steps: all)
    prefill_chunks: int  # decode steps that also prefilled a chunk of a prompt (mixed steps)
    slot_moves: int  # requests moved to a lower slot to close a gap
    healthy: bool
    accepting: bool
    prefix_cache_blocks: int = 0  # capacity of the prefix cache (0: off)
    prefix_cache_blocks_used: int = 0
    prefix_cache_blocks_evicted: int = 0  # totals since start
    prefix_cache_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hit_tokens: int = 0  # prompt tokens found there (copied, not prefilled)
    # Prompt tokens not prefilled because a request with the same prompt was prefilled with them
    # (whole-prompt prefill, `prefill_chunk=0`: e.g. the completions of one GRPO prompt).
    shared_prefill_tokens: int = 0
    speculative_steps: int = 0  # decode steps that checked proposals (speculative decoding)
    speculative_row_steps: int = 0  # decoding rows of those steps (each got accepted + 1 tokens)
    speculative_proposed_tokens: int = 0
    speculative_accepted_tokens: int = 0
    speculative_skipped_steps: int = 0  # decode steps that did not speculate because too many rows decoded
    speculative_pauses: int = 0  # times a row stopped proposing for poor acceptance
    speculative_draft_catch_up_tokens: int = 0  # tokens the draft model read to catch up (not proposals)

    @property
    def speculative_acceptance_rate(self) -> float:
        """Accepted / proposed tokens (0 before any proposal)."""
        return self.speculative_accepted_tokens / max(1, self.speculative_proposed_tokens)

    @property
    def speculative_tokens_per_step(self) -> float:
        """Tokens a row got per speculative step (1 + its accepted proposals; 0 before any)."""
        rows = self.speculative_row_steps
        return (rows + self.speculative_accepted_tokens) / rows if rows else 0.0


class Engine:
    """Continuous-batching generation for one model: many requests share `slots` decode rows.

    Offline: `Engine(model, tokenizer).generate(prompts)` returns one `Completion` per prompt, in
    order, with a progress bar. Online: `submit(...)` returns a `RequestHandle` (iterate it for
    deltas, `.result()` for the completion), `stream(...)` yields text pieces, `abort(id)` stops a
    request. Sampling defaults come from `config` (default: the checkpoint's
    generation_config.json, as for `qwen_jax.generate`); the tokenizer's eos always stops.

    Args:
        model: a loaded `Qwen2ForCausalLM` (on a mesh or one device).
        tokenizer: its `qwen_jax.Tokenizer`.
        slots: decode rows: how many requests generate at once.
        max_len: tokens per slot (prompt + generated); default min(model context, 4096).
        max_queue: requests allowed to wait for a slot (None: unbounded); beyond it `submit`
            raises QueueFullError.
        prefill_buckets: padded prompt lengths of a whole-prompt prefill (default: powers of two
            from 16 to max_len).
        prefill_chunk: prompt tokens per mixed step while other requests decode (default 256 on
            CPU, 512 on GPU/TPU); 0 prefills every prompt whole, pausing the running requests.
        warmup: compile every program now instead of on first use (see `warmup()`).
        prefix_cache: keep the KV of prompts (and of finished requests' prompt + output) in a pool
            of blocks of 16 tokens, so that a request starting with a cached prefix (a shared system
            prompt, the earlier turns of a chat) prefills only the rest (`qwen_jax.engine.prefix_cache`).
            Needs chunked prefill (`prefill_chunk` > 0). Tokens are the same with and without it.
        prefix_cache_blocks: the pool's size in blocks (default: as many tokens as the batch cache,
            `slots * max_len`); or give `prefix_cache_gb` (GiB of keys and values).
        speculative: speculative decoding: "ngram" (prompt lookup) or `SpeculativeOptions(method="ngram",
            num_speculative_tokens=K, ngram_min=..., ngram_max=...)`, or a draft model,
            `SpeculativeOptions(method="draft", draft_model=draft, num_speculative_tokens=K)`: a smaller
            Qwen2.5 with the tokenizer's vocabulary, on the model's mesh, whose context covers
            `max_len`; the engine runs it with its own KV cache (slots x max_len tokens of the draft's
            layers). See the module docstring for when a step speculates.
        speculative_max_rows: speculate only while at most this many rows decode (default 4); the
            speculative steps are compiled for the decode widths up to the one covering this many rows.
        speculative_min_acceptance: a row stops proposing for a while when the moving average of
            its accepted fraction falls below this (default 0.25; 0 never pauses).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        slots: int = 8,
        max_len: int | None = None,
        max_queue: int | None = None,
        config: GenerationConfig | None = None,
        prefill_buckets: Sequence[int] | None = None,
        prefill_chunk: int | None = None,
        warmup: bool = False,
        prefix_cache: bool = True,
        prefix_cache_blocks: int | None = None,
        prefix_cache_gb: float | None = None,
        speculative: str | SpeculativeOptions | None = None,
        speculative_max_rows: int = DEFAULT_SPECULATIVE_MAX_ROWS,
        speculative_min_acceptance: float = DEFAULT_MIN_ACCEPTANCE,
    ):
        context = model.config.max_position_embeddings
        max_len = min(context, DEFAULT_MAX_LEN) if max_len is None else int(max_len)
        if not 2 <= max_len <= context:
            raise EngineError(f"max_len must be between 2 and the model's context of {context} tokens, got {max_len}")
        if slots < 1:
            raise EngineError(f"slots must be >= 1, got {slots}")
        if max_queue is not None and max_queue < 0:
            raise EngineError(f"max_queue must be >= 0, got {max_queue}")
        if prefill_chunk is None:
            prefill_chunk = default_mixed_chunk(platform_of(model.mesh))
        if prefill_chunk < 0:
            raise EngineError(f"prefill_chunk must be >= 0 (0: prefill prompts whole), got {prefill_chunk}")
        self.speculative = _engine_speculation(
            model, tokenizer, speculative, max_len, speculative_max_rows, speculative_min_acceptance
        )
        self.speculative_max_rows = int(speculative_max_rows)
        self.speculative_min_acceptance = float(speculative_min_acceptance)
        self.model = model
        self.tokenizer = tokenizer
        self.slots = int(slots)
        self.max_len = max_len
        self.max_queue = max_queue
        config = generation_defaults(model, tokenizer, config)
        self.config = config
        blocks = (
            _prefix_cache_blocks(model, self.slots, max_len, prefix_cache_blocks, prefix_cache_gb)
            if prefix_cache and prefill_chunk
            else 0
        )
        self.programs = EnginePrograms(
            model,
            slots=self.slots,
            max_len=max_len,
            buckets=prefill_buckets,
            pad_id=config.pad_token_id or 0,
            prefill_chunk=prefill_chunk,
            prefix_blocks=blocks,
            block_tokens=DEFAULT_BLOCK_TOKENS,
            speculative_tokens=0 if self.speculative is None else self.speculative.num_speculative_tokens,
            speculative_rows=self.speculative_max_rows,
            draft_model=None if self.speculative is None else self.speculative.draft_model,
        )
        self._prefix = PrefixIndex(blocks, DEFAULT_BLOCK_TOKENS) if blocks else None

        self._lock = threading.Lock()  # guards the counters below, read by other threads
        self._live_ids: set[str] = set()  # submitted and not finished
        self._accepting = True
        self._stats = collections.Counter()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: collections.deque[Request] = collections.deque()
        self._prefilling: collections.deque[Request] = collections.deque()  # in a slot, prompt not all in yet
        self._requests: dict[str, Request] = {}
        self._slot_owner: list[Request | None] = [None] * self.slots
        self._pending: collections.deque[StepOutputs] = collections.deque()
        self._processed_early = 0  # earlier steps read back inside this iteration's dispatch (bitmasks)
        self._grammars: GrammarCompiler | None = None  # built on the first constrained request
        self._shutdown_deadline: float | None = None
        self._error: BaseException | None = None
        if warmup:
            self.warmup()
        self._thread = threading.Thread(target=self._run, name="qwen-jax-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    def warmup(self, workers: int | None = None, prime: bool = False) -> float:
        """Compile every program the engine can run (all prefill buckets, decode, samplers); returns seconds.

        `workers` threads compile different programs at once (default: one per CPU core, at most 8).
        `prime` then runs each program once on zeros (`EnginePrograms.prime`), so that the first
        requests run at the steady-state speed: on CPU the first run of each program costs more
        than later ones. Priming takes longer than the first requests save (benchmarks/serve.py),
        so it is off by default: use it to time the engine from its first request. It needs memory
        for a second KV cache while it runs.
        Safe to call while serving: each program is compiled once, under its own lock, and priming
        leaves the engine's cache and slots alone.
        """
        seconds = self.programs.compile_all(workers)
        if prime:
            seconds += self.programs.prime()
        return seconds

    def submit(
        self,
        prompt: Prompt | Sequence[int],
        *,
        logprobs: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        request_id: str | None = None,
        on_delta: Callable[[Delta], None] | None = None,
        speculate: bool = True,
        **sampling: Unpack[SamplingKwargs],
    ) -> RequestHandle:
        """Queue a request; returns at once. Raises EngineError (bad request), QueueFullError, EngineClosedError.

        Args:
            prompt: text, a chat conversation (list of messages, rendered with the chat template and
                `tools`), or token ids.
            logprobs: `k` returns each generated token's log-probability and the k most likely
                alternatives (0 <= k <= 20).
            request_id: the id of the request (default: a fresh one).
            on_delta: called on the engine thread with each `Delta` (keep it short); without it,
                iterate the handle.
            speculate: False keeps this request out of speculative decoding (an engine built
                with `speculative=`); constrained requests never speculate.
            **sampling: the sampling options of every generation call
                (`qwen_jax.generation.options.SamplingKwargs`). `seed`: the token at index i is drawn
                with `fold_in(key(seed), i)`, so a seeded request gives the same tokens whatever else
                is running, and the tokens `qwen_jax.generate` gives. `max_new_tokens` unset fills
                what the context leaves, up to the config's default. `json_schema`, `regex`,
                `choice`, `grammar`: structured output (`qwen_jax.generation.constraints`); a
                constraint the library cannot enforce raises EngineError naming the reason.
        """
        request = self._make_request(prompt, tools, request_id, on_delta, logprobs, sampling, speculate)
        self._enqueue([request], enforce_queue_limit=True)
        return request.handle

    def stream(
        self,
        prompt: Prompt | Sequence[int],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        request_id: str | None = None,
        **sampling: Unpack[SamplingKwargs],
    ) -> Iterator[str]:
        """Submit one request and yield its text as it is generated; closing the iterator aborts it."""
        handle = self.submit(prompt, tools=tools, request_id=request_id, **sampling)
        try:
            for delta in handle:
                if delta.error:
                    raise EngineError(delta.error)
                if delta.text:
                    yield delta.text
        finally:
            handle.abort()

    def abort(self, request_id: str) -> bool:
        """Stop a request (waiting or running); its slot is freed on the engine's next iteration.

        Returns False if the request is unknown or already finished. Never blocks.
        """
        with self._lock:
            if request_id not in self._live_ids:
                return False
            self._inbox.put(("abort", request_id))
        return True

    def generate(
        self,
        prompts: Sequence[Prompt | Sequence[int]],
        *,
        progress: bool = True,
        logprobs: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **sampling: Unpack[SamplingKwargs],
    ) -> list[Completion]:
        """Run many prompts through the engine; one Completion per prompt, in input order.

        The options are those of `submit`, the same for every prompt, except `seed`: one for every
        prompt, or one per prompt. Every prompt is validated before any is queued; the queue limit
        does not apply. Raises EngineError if a request fails.
        """
        finished: queue.SimpleQueue = queue.SimpleQueue()

        def on_delta(delta: Delta) -> None:
            if delta.finish_reason is not None:
                finished.put(delta.request_id)

        try:
            seeds = row_seeds(sampling.pop("seed", None), len(prompts))
        except GenerationError as e:
            raise EngineError(str(e), param=e.param) from None
        requests = [
            self._make_request(prompt, tools, None, on_delta, logprobs, {**sampling, "seed": seed})
            for prompt, seed in zip(prompts, seeds)
        ]
        # One inbox command: the engine admits the batch together, so requests of one prompt share its prefill.
        self._enqueue(requests, enforce_queue_limit=False)
        try:
            with tqdm(total=len(requests), desc="generating", unit="request", disable=not progress) as bar:
                for _ in requests:
                    finished.get()
                    bar.update(1)
        except BaseException:  # Ctrl-C: do not leave the batch running
            for request in requests:
                self.abort(request.id)
            raise
        results = [request.handle.result() for request in requests]
        errors = [r.error for r in results if r.finish_reason == "error"]
        if errors:
            raise EngineError(errors[0])
        return results

    def update_weights(self, weights: Any) -> None:
        """Generate with other weights of the same model from now on, without copying or recompiling.

        `weights`: a model of the same structure (e.g. the same model after training steps) or its
        `nnx.state`; every array must have the shape, dtype and sharding of the engine's (a trainer
        passes its current parameters: its rollouts then sample the policy it trains). Call it while
        no request is running; raises EngineError otherwise or on a mismatch (nothing changes then).
        The prefix cache is emptied: its KV was computed with the previous weights. A draft model
        (speculative decoding) keeps its weights: its proposals are checked by the new ones.
        """
        state = nnx.state(weights) if isinstance(weights, nnx.Module) else weights
        with self._lock:
            if self._live_ids:
                raise EngineError(f"update_weights: {len(self._live_ids)} request(s) still running; wait for them")
            self.programs.update_state(state)
            # No request is live, so the engine thread neither looks up nor stores blocks meanwhile
            # (a request's blocks are stored before it stops being live).
            if self._prefix is not None:
                self._prefix.clear()
                self._stats["prefix_blocks_used"] = 0

    def stats(self) -> EngineStats:
        with self._lock:
            counts = dict(self._stats)
            return EngineStats(
                slots=self.slots,
                running=counts.get("running", 0),
                waiting=counts.get("waiting", 0),
                prompt_tokens=counts.get("prompt_tokens", 0),
                generated_tokens=counts.get("generated_tokens", 0),
                finished_requests=counts.get("finished", 0),
                aborted_requests=counts.get("aborted", 0),
                decode_steps=counts.get("decode_steps", 0),
                decode_rows=counts.get("decode_rows", 0),
                prefill_chunks=counts.get("prefill_chunks", 0),
                slot_moves=counts.get("slot_moves", 0),
                healthy=self._error is None and (self._thread.is_alive() or not self._accepting),
                accepting=self._accepting,
                prefix_cache_blocks=self.programs.prefix_blocks,
                prefix_cache_blocks_used=counts.get("prefix_blocks_used", 0),
                prefix_cache_blocks_evicted=counts.get("prefix_blocks_evicted", 0),
                prefix_cache_queried_tokens=counts.get("prefix_queried_tokens", 0),
                prefix_cache_hit_tokens=counts.get("prefix_hit_tokens", 0),
                shared_prefill_tokens=counts.get("shared_prefill_tokens", 0),
                speculative_steps=counts.get("speculative_steps", 0),
                speculative_row_steps=counts.get("speculative_row_steps", 0),
                speculative_proposed_tokens=counts.get("speculative_proposed", 0),
                speculative_accepted_tokens=counts.get("speculative_accepted", 0),
                speculative_skipped_steps=counts.get("speculative_skipped", 0),
                speculative_pauses=counts.get("speculative_pauses", 0),
                speculative_draft_catch_up_tokens=counts.get("speculative_draft_catch_up_tokens", 0),
            )

    def begin_shutdown(self, timeout: float) -> None:
        """Stop accepting requests; requests still running after `timeout` seconds are aborted."""
        with self._lock:
            self._accepting = False
        self._inbox.put(("shutdown", time.perf_counter() + max(0.0, timeout)))

    def shutdown(self, timeout: float = 0.0) -> None:
        """Stop accepting, let running requests finish for up to `timeout` s, abort the rest, stop the thread."""
        self.begin_shutdown(timeout)
        self._thread.join()

    close = shutdown

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ caller-side helpers
    def _make_request(
        self, prompt, tools, request_id, on_delta, logprobs, sampling: dict, speculate: bool = True
    ) -> Request:
        """Encode and validate (raises EngineError) in the caller's thread."""
        prompt_ids = self._encode(prompt, tools)
        vocab = self.model.config.vocab_size
        options = resolve_request(
            self.config, prompt_length=len(prompt_ids), max_len=self.max_len, vocab_size=vocab, **sampling
        )
        check_top_logprobs(logprobs)
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise EngineError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        grammar = None
        if options.constraint is not None:
            try:
                grammar = self._grammar_compiler().matcher(options.constraint)
            except GenerationError as e:
                raise EngineError(str(e), param=e.param) from None
        request_id = request_id or new_request_id()
        handle = RequestHandle(request_id, self.abort, buffered=on_delta is None)
        return Request(
            request_id, prompt_ids, options, logprobs, self.tokenizer, handle, on_delta, grammar, speculate=speculate
        )

    def _grammar_compiler(self) -> GrammarCompiler:
        if self._grammars is None:  # two threads may both build it: the same compiler (`grammar_compiler` caches)
            self._grammars = grammar_compiler(self.tokenizer, self.model.config.vocab_size, self.config.eos_token_ids)
        return self._grammars

    def _enqueue(self, requests: list[Request], enforce_queue_limit: bool) -> None:
        """Queue `requests` as one inbox command (the engine thread takes them up in one iteration)."""
        with self._lock:  # enqueued under the lock: a shutdown command can never overtake an accepted request
            if self._error is not None:
                raise EngineClosedError(f"the engine stopped after an error: {self._error}")
            if not self._accepting:
                raise EngineClosedError("the engine is shutting down")
            ids = [request.id for request in requests]
            taken = [i for i in ids if i in self._live_ids]
            if taken or len(set(ids)) < len(ids):
                raise EngineError(f"request id {(taken or ids)[0]!r} is already in use")
            if (
                enforce_queue_limit
                and self.max_queue is not None
                and len(self._live_ids) + len(requests) > self.slots + self.max_queue
            ):
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting for {self.slots} slots)")
            self._live_ids.update(ids)
            self._inbox.put(("submit", requests))

    def _encode(self, prompt, tools) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        items = list(prompt)
        if not items:
            return []  # refused by resolve_request with a clear message
        if all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in items):
            return [int(t) for t in items]
        if all(isinstance(m, Mapping) for m in items):
            try:
                text = self.tokenizer.apply_chat_template(items, tools=tools, add_generation_prompt=True)
            except Exception as e:  # template errors are the caller's input errors
                raise EngineError(f"cannot apply the chat template: {e}") from None
            return self.tokenizer.encode(text)
        raise EngineError("a prompt must be text, a list of chat messages, or a list of token ids")

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            while True:
                if not self._read_inbox():
                    break
                dispatched_before = len(self._pending)
                self._processed_early = 0
                self._admit()
                self._dispatch()
                # Read back everything dispatched in earlier iterations; this iteration's work runs meanwhile.
                in_flight_now = len(self._pending) - (dispatched_before - self._processed_early)
                keep = in_flight_now if self._has_running() else 0
                while len(self._pending) > keep:
                    self._process(self._pending.popleft())
                self._enforce_shutdown_deadline()
                self._publish_counts()
        except BaseException as e:  # a device or program failure: fail every request, refuse new ones
            logger.exception("the engine thread failed; every request in flight gets an error")
            with self._lock:
                self._error = e
                self._accepting = False
            self._fail_all(f"engine error: {type(e).__name__}: {e}")

    def _has_running(self) -> bool:
        return any(r is not None for r in self._slot_owner)

    def _read_inbox(self) -> bool:
        """Apply queued commands; block when idle. False when the engine should stop."""
        idle = not self._waiting and not self._has_running() and not self._pending
        while True:
            if idle and self._shutdown_deadline is not None:
                return False
            try:
                command = self._inbox.get(block=idle)
            except queue.Empty:
                return True
            kind = command[0]
            if kind == "submit":
                for request in command[1]:
                    self._requests[request.id] = request
                    self._waiting.append(request)
                idle = False
            elif kind == "abort":
                self._abort_now(command[1])
            elif kind == "shutdown":
                deadline = command[1]
                self._shutdown_deadline = min(deadline, self._shutdown_deadline or deadline)
            idle = idle and not self._waiting

    def _abort_now(self, request_id: str) -> None:
        request = self._requests.get(request_id)
        if request is None or request.finished:
            return
        if request.slot is None:
            self._waiting.remove(request)
        self._finish(request, request.end("abort"))

    def _admit(self) -> None:
        """Give waiting requests the lowest free slots (FIFO; their prompts go in from `_dispatch`),
        then close the gaps that finished requests left below occupied slots, so the requests fill
        slots 0..n-1 and a step runs only as many rows as are in use."""
        admitted = []
        for slot in range(self.slots):
            if not self._waiting:
                break
            if self._slot_owner[slot] is not None:
                continue
            request = self._waiting.popleft()
            request.slot = slot
            self._slot_owner[slot] = request
            self._prefilling.append(request)
            admitted.append(request)
            with self._lock:
                self._stats["prompt_tokens"] += len(request.prompt_ids)
        self._compact()
        for request in admitted:
            self._reuse_prefix(request)

    def _reuse_prefix(self, request: Request) -> None:
        """Copy the longest cached prefix of a request's prompt into its slot (it then prefills the rest)."""
        if self._prefix is None:
            return
        blocks = self._prefix.lookup(request.prompt_ids)
        if not blocks:
            return
        hit = len(blocks) * self._prefix.block_tokens
        self.programs.copy_in(request.slot, blocks, request.options, request.prompt_ids[:hit])
        request.prefilled = request.cached_tokens = hit
        request.row_started = True

    def _cache_prefix(self, request: Request) -> None:
        """Copy the blocks of a request's computed tokens that are not cached yet out of its slot into
        the prefix cache: its prompt (or the part prefilled so far) and what it generated, less the
        last token (whose keys no step has computed yet)."""
        if self._prefix is None or self._error is not None:
            return
        if request.slot is None or self._slot_owner[request.slot] is not request:
            return
        if request.prefilled < len(request.prompt_ids):
            tokens = request.prompt_ids[: request.prefilled]
        else:
            tokens = request.prompt_ids + request.token_ids[:-1]
        copies = self._prefix.store(tokens)
        if copies:
            self.programs.copy_out(request.slot, copies)

    def _compact(self) -> None:
        """Move the highest occupied slot into the lowest free one until no gap is left. A step
        already in flight keeps its own row -> request map (`StepOutputs.rows`), and the device
        runs the move after it, so its token is read from the old row and the move copies it."""
        while True:
            free = next((i for i, r in enumerate(self._slot_owner) if r is None), None)
            last = max((i for i, r in enumerate(self._slot_owner) if r is not None), default=-1)
            if free is None or free > last:
                return
            request = self._slot_owner[last]
            self.programs.move(last, free)
            self._slot_owner[free], self._slot_owner[last] = request, None
            request.slot = free
            with self._lock:
                self._stats["slot_moves"] += 1

    def _decode_rows(self) -> list[Request | None]:
        """Per slot, the request a step would decode a token for (None: idle or still prefilling)."""
        return [
            r
            if r is not None
            and not r.finished
            and r.prefilled == len(r.prompt_ids)
            and r.dispatched < r.options.max_new_tokens
            else None
            for r in self._slot_owner
        ]

    def _prefill_whole(self, requests: list[Request]) -> None:
        """Prefill the prompt of `requests` (all the same prompt) once, into each one's slot; each
        draws its own first token from the shared logits."""
        bitmasks = [None if request.grammar is None else self._bitmask([request]) for request in requests]
        self._pending.extend(self.programs.prefill_into_slots(requests[0].prompt_ids, requests, bitmasks))
        for request in requests:
            request.prefilled, request.dispatched = len(request.prompt_ids), 1
            self._prefilling.remove(request)
            self._cache_prefix(request)
        with self._lock:
            self._stats["shared_prefill_tokens"] += (len(requests) - 1) * len(requests[0].prompt_ids)

    def _dispatch(self) -> None:
        """Dispatch this iteration's step: a lone prompt prefilled whole when nothing decodes (every
        prompt, when chunking is off), then a mixed step (decode + the next chunks of the prompts
        going in, within the token budget) or a plain decode step."""
        if not self.programs.chunks:
            for requests in _same_prompt_groups(self._prefilling):
                self._prefill_whole(requests)
        elif len(self._prefilling) == 1 and self._prefilling[0].prefilled == 0 and not any(self._decode_rows()):
            self._prefill_whole([self._prefilling[0]])
        rows = self._decode_rows()
        shape, chunks = self._plan_chunks()
        if not chunks and not any(rows):
            return
        if not chunks and self.speculative is not None:
            if self._dispatch_speculative(rows):
                return
            rows = self._decode_rows()  # earlier steps may have been read back (requests ended)
            if not any(rows):
                return
        if not chunks:
            used = max((i for i, r in enumerate(rows) if r is not None), default=-1) + 1
            rows = rows[: self.programs.width_for(used)]
            self._pending.append(self.programs.decode_step(rows, self._step_bitmask))
        else:
            for request, _, _ in chunks:
                if not request.row_started:
                    self.programs.start_row(request.options, request.slot)
                    request.row_started = True
            self._pending.append(self.programs.mixed_step(rows, chunks, shape, self._step_bitmask))
            for request, ids, final in chunks:
                request.prefilled += len(ids)
                if final:
                    request.dispatched = 1
                    self._prefilling.remove(request)
                    self._cache_prefix(request)
        for r in rows:
            if r is not None:
                r.dispatched += 1
        with self._lock:
            self._stats["decode_steps"] += 1
            self._stats["decode_rows"] += len(rows)
            self._stats["prefill_chunks"] += len(chunks)

    def _dispatch_speculative(self, rows: list[Request | None]) -> bool:
        """Dispatch a speculative step if the back-off rule allows one and a row has proposals
        (module docstring); False: the caller dispatches a plain decode step."""
        decoding = [r for r in rows if r is not None]
        for request in decoding:
            request.paused_steps = max(0, request.paused_steps - 1)
        if len(decoding) > self.speculative_max_rows:
            with self._lock:
                self._stats["speculative_skipped"] += 1
            return False
        if any(r.grammar is not None for r in decoding) or not any(
            r.speculate and not r.paused_steps for r in decoding
        ):
            return False
        # Proposals continue each row's tokens: read back the steps in flight first.
        while self._pending:
            self._process(self._pending.popleft())
            self._processed_early += 1
        rows = self._decode_rows()
        used = max((i for i, r in enumerate(rows) if r is not None), default=-1) + 1
        if not used:
            return False
        if used > self.programs.speculative_widths[-1]:  # rows sit above the compiled speculative widths
            with self._lock:
                self._stats["speculative_skipped"] += 1
            return False
        rows = rows[: self.programs.width_for(used)]
        spec = self.speculative
        k = spec.num_speculative_tokens
        draft = spec.draft_model is not None
        proposals = None if draft else np.zeros((len(rows), k), np.int32)
        proposed = np.full(len(rows), -1, np.int32)
        for row, request in enumerate(rows):
            if request is None or not request.speculate or request.paused_steps:
                continue
            # No proposal past max_new_tokens: the step's own token would be the last one anyway.
            budget = min(k, request.options.max_new_tokens - len(request.token_ids) - 1)
            if draft:
                proposed[row] = budget if budget > 0 else -1
                continue
            found = (
                ngram_proposals(request.prompt_ids + request.token_ids, budget, spec.ngram_min, spec.ngram_max)
                if budget > 0
                else []
            )
            proposals[row, : len(found)] = found
            proposed[row] = len(found)
        if not (proposed > 0).any():
            for row, request in enumerate(rows):
                if proposed[row] == 0:  # a row without a match counts as a step with nothing accepted
                    self._record_acceptance(request, 0.0)
            return False
        if draft:
            self._draft_catch_up([r if p > 0 else None for r, p in zip(rows, proposed)])
        self._pending.append(self.programs.speculative_step(rows, proposals, proposed))
        decoded = [r for r in rows if r is not None]
        for request in decoded:
            request.dispatched += 1  # at least; `_process` adds the accepted proposals
        with self._lock:
            self._stats["decode_steps"] += 1
            self._stats["decode_rows"] += len(rows)
            self._stats["speculative_steps"] += 1
            self._stats["speculative_row_steps"] += len(decoded)
        return True

    def _draft_catch_up(self, rows: list[Request | None]) -> None:
        """Give the draft cache row of each request of `rows` every token its target row holds (its
        prompt and output but the last token), in as many catch-up steps as the row furthest behind
        needs (none when every draft is up to date), each of the shortest compiled chunk length that
        covers it (`EnginePrograms.draft_chunks`), else the longest."""
        chunks = self.programs.draft_chunks
        while True:
            behind = max(
                (len(r.prompt_ids) + len(r.token_ids) - 1 - r.draft_tokens for r in rows if r is not None), default=0
            )
            chunk = next((c for c in chunks if c >= behind), chunks[-1])
            ids = np.zeros((len(rows), chunk), np.int32)
            starts, counts = np.zeros(len(rows), np.int32), np.zeros(len(rows), np.int32)
            for row, request in enumerate(rows):
                if request is None:
                    continue
                held = len(request.prompt_ids) + len(request.token_ids) - 1  # by the target row
                missing = (request.prompt_ids + request.token_ids)[request.draft_tokens : held][:chunk]
                ids[row, : len(missing)] = missing
                starts[row], counts[row] = request.draft_tokens, len(missing)
                request.draft_tokens += len(missing)
            if not counts.any():
                return
            self.programs.draft_catch_up(ids, starts, counts)
            with self._lock:
                self._stats["speculative_draft_catch_up_tokens"] += int(counts.sum())

    def _record_acceptance(self, request: Request, accepted_fraction: float) -> None:
        """Update a speculating row's moving acceptance; pause it when it falls below the floor."""
        request.acceptance += ACCEPTANCE_WEIGHT * (accepted_fraction - request.acceptance)
        if request.acceptance < self.speculative_min_acceptance:
            request.paused_steps = PAUSE_STEPS
            request.acceptance = self.speculative_min_acceptance
            with self._lock:
                self._stats["speculative_pauses"] += 1

    def _plan_chunks(self) -> tuple[tuple[int, int] | None, list[tuple[Request, list[int], bool]]]:
        """The prompt chunks of this step, in the compiled shape `plan_chunk_shape` picks for the
        prompts going in (first come, first served). Returns the shape and (request, token ids,
        final) per chunk."""
        remaining = [len(r.prompt_ids) - r.prefilled for r in self._prefilling]
        if not remaining or not self.programs.chunks:
            return None, []
        count, chunk = best = plan_chunk_shape(remaining, self.programs.chunk_shapes)
        chunks = []
        for request, left in zip(list(self._prefilling)[:count], remaining):
            start = request.prefilled
            chunks.append((request, request.prompt_ids[start : start + chunk], left <= chunk))
        return best, chunks

    def _step_bitmask(self, rows: list[Request | None]):
        """The allowed tokens of a step's rows (None when no row is constrained), called by the
        programs once the step's forward is dispatched. A constrained row's bitmask needs every
        token drawn before this step: the earlier steps are read back here, while the forward runs."""
        if not any(r is not None and r.grammar is not None for r in rows):
            return None
        while self._pending:
            self._process(self._pending.popleft())
            self._processed_early += 1
        return self._bitmask(rows)

    def _bitmask(self, rows: list[Request | None]):
        # A request that ended meanwhile still has its row computed (the token is dropped): no constraint.
        matchers = [r.grammar if r is not None and not r.finished else None for r in rows]
        return fill_bitmask(matchers, self.model.config.vocab_size)

    def _process(self, outputs: StepOutputs) -> None:
        tokens, logprobs, accepted = outputs.fetch()
        if accepted is None:  # one token per row: the same indexing as a speculative step's first position
            tokens = None if tokens is None else tokens[:, None]
            logprobs = None if logprobs is None else tuple(x[:, None] for x in logprobs)
        for row, request in enumerate(outputs.rows):
            if request is None or request.finished:
                continue  # an empty slot, or a request that ended while this step was in flight
            count = 1
            if accepted is not None:
                count = int(accepted[row]) + 1
                request.dispatched += count - 1
                proposed = int(outputs.proposed[row])
                if proposed >= 0:
                    self._record_acceptance(request, (count - 1) / max(1, proposed))
                    with self._lock:
                        self._stats["speculative_proposed"] += proposed
                        self._stats["speculative_accepted"] += count - 1
            if accepted is not None and outputs.proposed[row] > 0 and self.speculative.draft_model is not None:
                # The step rolled the draft's cache row back with the target's: it holds every token
                # but the step's last.
                request.draft_tokens = len(request.prompt_ids) + len(request.token_ids) + count - 1
            for position in range(count):
                token = int(tokens[row, position])
                logprob = None
                if request.top_logprobs is not None:
                    chosen, top_ids, top_values = logprobs
                    k = request.top_logprobs
                    logprob = TokenLogprob(
                        token,
                        float(chosen[row, position]),
                        tuple(zip(top_ids[row, position, :k].tolist(), top_values[row, position, :k].tolist())),
                    )
                delta = request.add_token(token, logprob)
                with self._lock:
                    self._stats["generated_tokens"] += 1
                if delta.finish_reason is not None:
                    self._finish(request, delta)
                    break  # the step's later tokens are dropped
                self._deliver(request, delta)

    def _deliver(self, request: Request, delta: Delta) -> None:
        if request.on_delta is None:
            request.handle._deliver(delta)
            return
        try:
            request.on_delta(delta)
        except Exception:  # e.g. the server's event loop is gone: that request alone is lost
            logger.exception("on_delta of request %s failed; aborting it", request.id)
            if delta.finish_reason is None:
                self._inbox.put(("abort", request.id))

    def _finish(self, request: Request, delta: Delta) -> None:
        self._cache_prefix(request)
        if request.slot is not None and self._slot_owner[request.slot] is request:
            self._slot_owner[request.slot] = None
        if request in self._prefilling:
            self._prefilling.remove(request)
        self._requests.pop(request.id, None)
        with self._lock:
            self._live_ids.discard(request.id)
            self._stats["aborted" if delta.finish_reason == "abort" else "finished"] += 1
        self._publish_counts()  # before the caller hears of it: stats() never lags a finished request
        self._deliver(request, delta)
        request.handle._complete(request.completion(delta.error))

    def _enforce_shutdown_deadline(self) -> None:
        if self._shutdown_deadline is None or time.perf_counter() < self._shutdown_deadline:
            return
        for request in [*self._waiting, *(r for r in self._slot_owner if r is not None)]:
            if not request.finished:
                if request.slot is None:
                    self._waiting.remove(request)
                self._finish(request, request.end("abort", error="the server is shutting down"))

    def _publish_counts(self) -> None:
        prefix = None if self._prefix is None else self._prefix.stats()
        with self._lock:
            self._stats["waiting"] = len(self._waiting)
            self._stats["running"] = sum(r is not None for r in self._slot_owner)
            if prefix is not None:
                self._stats["prefix_blocks_used"] = prefix.blocks_used
                self._stats["prefix_blocks_evicted"] = prefix.blocks_evicted
                self._stats["prefix_queried_tokens"] = prefix.queried_tokens
                self._stats["prefix_hit_tokens"] = prefix.hit_tokens

    def _fail_all(self, message: str) -> None:
        for request in [*self._waiting, *self._requests.values()]:
            if not request.finished:
                try:
                    self._finish(request, request.end("error", error=message))
                except Exception:  # a failing callback must not stop the others from being told
                    pass
        self._waiting.clear()
        while True:  # requests submitted after the failure was noticed
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                break
            if command[0] == "submit":
                for request in command[1]:
                    if not request.finished:
                        self._finish(request, request.end("error", error=message))


def _same_prompt_groups(requests: Sequence[Request]) -> list[list[Request]]:
    """`requests` grouped by prompt (token ids), in order of first appearance."""
    groups: dict[tuple[int, ...], list[Request]] = {}
    for request in requests:
        groups.setdefault(tuple(request.prompt_ids), []).append(request)
    return list(groups.values())


def _engine_speculation(
    model, tokenizer, speculative, max_len: int, max_rows: int, min_acceptance: float
) -> SpeculativeOptions | None:
    """The engine's `SpeculativeOptions` (None: off); raises EngineError for what it cannot run."""
    try:
        options = resolve_speculative(speculative, model, getattr(tokenizer, "vocab_size", None))
    except GenerationError as e:
        raise EngineError(str(e), param=e.param) from None
    draft = None if options is None else options.draft_model
    if draft is not None:
        if draft.mesh != model.mesh:
            raise EngineError(
                "the draft model must be placed on the target's mesh (load it with mesh=model.mesh)",
                param="draft_model",
            )
        if draft.config.max_position_embeddings < max_len:
            raise EngineError(
                f"the draft model's context ({draft.config.max_position_embeddings} tokens) is shorter than "
                f"the engine's max_len ({max_len})",
                param="draft_model",
            )
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise EngineError(
            f"speculative_max_rows must be an integer >= 1, got {max_rows!r}", param="speculative_max_rows"
        )
    if not 0 <= min_acceptance <= 1:
        raise EngineError(
            f"speculative_min_acceptance must be in [0, 1], got {min_acceptance!r}", param="speculative_min_acceptance"
        )
    return options


def _prefix_cache_blocks(model, slots: int, max_len: int, blocks: int | None, gigabytes: float | None) -> int:
    """The prefix cache's size in blocks: `blocks`, or what `gigabytes` of keys and values hold, or
    by default as many tokens as the batch cache."""
    if blocks is not None and gigabytes is not None:
        raise EngineError("give the prefix cache's size in blocks or in GiB, not both")
    config = model.config
    block_bytes = (
        2
        * config.num_hidden_layers
        * DEFAULT_BLOCK_TOKENS
        * config.num_key_value_heads
        * config.head_dim
        * np.dtype(model.dtype).itemsize
    )
    if gigabytes is not None:
        if not gigabytes > 0:
            raise EngineError(f"prefix_cache_gb must be > 0, got {gigabytes}")
        blocks = int(gigabytes * 2**30 // block_bytes)
        if blocks < 1:
            raise EngineError(f"prefix_cache_gb={gigabytes} holds no block of {block_bytes} bytes")
    if blocks is None:
        return max(1, slots * max_len // DEFAULT_BLOCK_TOKENS)
    if blocks < 1:
        raise EngineError(f"prefix_cache_blocks must be >= 1, got {blocks}")
    return int(blocks)
