"""Host-side request state: options resolved for a request, incremental text with stop strings, outputs.

Everything here runs on the host (the engine thread or the caller's thread); nothing touches a
device. A request's options are the generation calls' `SamplingOptions`, fitted to the engine's
context (`resolve_request`). Its text is assembled token by token by the one text assembler
(`qwen_jax.generation.text.TextAssembler`: UTF-8 safe, cut before the first stop string, text
that could still become a stop string held back).
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from qwen_jax.config import GenerationConfig
from qwen_jax.errors import EngineError, GenerationError
from qwen_jax.generation.constraints import GrammarMatcher
from qwen_jax.generation.options import SamplingOptions, resolve
from qwen_jax.generation.text import TextAssembler

MAX_TOP_LOGPROBS = 20  # as OpenAI: top_logprobs is 0..20


def resolve_request(
    config: GenerationConfig, *, prompt_length: int, max_len: int, vocab_size: int, **sampling: Any
) -> SamplingOptions:
    """`qwen_jax.generation.options.resolve` for one engine request of `prompt_length` tokens in
    slots of `max_len` tokens; raises EngineError naming the problem (and the setting, `param`).

    `max_new_tokens` unset takes the config's default, capped to what the context leaves; an
    explicit value that overflows the context is an error that states both numbers.
    """
    if prompt_length < 1:
        raise EngineError("the prompt is empty: at least one token is needed to generate from")
    if prompt_length >= max_len:
        raise EngineError(
            f"the prompt has {prompt_length} tokens, but the context is {max_len} tokens "
            f"(at least one new token must fit)"
        )
    room = max_len - prompt_length
    if sampling.get("max_new_tokens") is None:
        sampling = {**sampling, "max_new_tokens": min(config.max_new_tokens, room)}
    try:
        options = resolve(config, vocab_size=vocab_size, **sampling)
    except GenerationError as e:
        raise EngineError(str(e), param=e.param) from None
    if options.max_new_tokens > room:
        raise EngineError(
            f"the prompt ({prompt_length} tokens) plus max_new_tokens ({options.max_new_tokens}) is "
            f"{prompt_length + options.max_new_tokens} tokens, more than the context of {max_len} tokens "
            f"(at most {room} new tokens for this prompt)",
            param="max_new_tokens",
        )
    return options


def check_top_logprobs(logprobs: int | None) -> None:
    """`logprobs=k`: the chosen token's log-probability and the k most likely, 0 <= k <= MAX_TOP_LOGPROBS."""
    if logprobs is None:
        return
    if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise EngineError(f"top logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {logprobs!r}", param="logprobs")


# ----------------------------------------------------------------------------- outputs
@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of a generated token under the model (raw logits, before sampling filters)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclasses.dataclass
class Delta:
    """What a request produced since its previous delta; the last one has `finish_reason` set.

    `text` is new text (stop strings cut, incomplete characters and possible stop-string starts
    held back); `token_ids` are the ids generated in this delta (they need not align with `text`).
    """

    request_id: str
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # generated so far, this delta included
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache (not prefilled)


@dataclasses.dataclass
class Completion:
    """A finished request."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    time_to_first_token_s: float | None = None
    latency_s: float = 0.0
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache (not prefilled)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


# ----------------------------------------------------------------------------- request state
_request_counter = itertools.count()


def new_request_id() -> str:
    return f"req-{next(_request_counter)}-{uuid.uuid4().hex[:8]}"


class RequestHandle:
    """A submitted request: iterate for its `Delta`s, `result()` for its `Completion`, `abort()` to stop it.

    Deltas are buffered here unless the request was submitted with `on_delta`, in which case the
    engine thread calls that function with each delta instead (it must return quickly).
    """

    def __init__(self, request_id: str, abort: Callable[[str], bool], buffered: bool):
        self.request_id = request_id
        self._abort = abort
        self._deltas: queue.SimpleQueue | None = queue.SimpleQueue() if buffered else None
        self._done = threading.Event()
        self._completion: Completion | None = None

    def __iter__(self) -> Iterator[Delta]:
        if self._deltas is None:
            raise RuntimeError("this request delivers its deltas to on_delta; iterate only without it")
        while True:
            delta = self._deltas.get()
            yield delta
            if delta.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the request to finish (or be aborted) and return its Completion."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        return self._completion

    def abort(self) -> bool:
        """Stop the request and free its slot; False when it had already finished."""
        return self._abort(self.request_id)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _deliver(self, delta: Delta) -> None:
        if self._deltas is not None:
            self._deltas.put(delta)

    def _complete(self, completion: Completion) -> None:
        self._completion = completion
        self._done.set()


class Request:
    """Engine-side state of one request (owned by the engine thread once submitted)."""

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        options: SamplingOptions,
        top_logprobs: int | None,
        tokenizer,
        handle: RequestHandle,
        on_delta: Callable[[Delta], None] | None,
        grammar: GrammarMatcher | None = None,
        speculate: bool = True,
    ):
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.options = options
        self.top_logprobs = top_logprobs  # None: no logprobs; k: the chosen token's and the k most likely
        self.handle = handle
        self.on_delta = on_delta
        self.text = TextAssembler(tokenizer, options.stop_strings)
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if top_logprobs is not None else None
        self.slot: int | None = None
        self.dispatched = 0  # tokens whose computation has been dispatched to the device
        self.prefilled = 0  # prompt tokens whose prefill has been dispatched
        self.row_started = False  # its slot's cache row and sampling state are set up for chunked prefill
        self.cached_tokens = 0  # prompt tokens copied from the prefix cache
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.grammar = grammar  # structured output: the matcher of the request's constraint
        # Speculative decoding (an engine built with `speculative=`; see `Engine` for the back-off rule).
        self.speculate = speculate and grammar is None  # False: the request never proposes tokens
        self.acceptance = 1.0  # moving average of the fraction of its proposals accepted per step
        self.paused_steps = 0  # decode steps left before it proposes again (its acceptance fell below the floor)
        self.draft_tokens = 0  # tokens of prompt + output its slot's draft cache row holds (a draft model)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add_token(self, token_id: int, logprob: TokenLogprob | None) -> Delta:
        """Record one generated token; the returned delta has finish_reason set if it ended the request."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.token_ids.append(token_id)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        text = self.text.push(token_id)
        error = None
        if self.grammar is not None and not self.grammar.advance(token_id):
            # Cannot happen for a token drawn under the grammar's own bitmask; kept as a clear failure.
            error = f"the generated token {token_id} does not match the request's {self.grammar.constraint.kind}"
            self.finish_reason = "error"
        elif self.text.stop_string is not None:
            self.finish_reason, self.stop_reason = "stop", self.text.stop_string
        elif token_id in self.options.stop_token_ids:
            self.finish_reason, self.stop_reason = "stop", token_id
        elif len(self.token_ids) >= self.options.max_new_tokens:
            self.finish_reason = "length"
        if self.finished:
            text += self.text.finish()
        return Delta(
            self.id,
            text,
            [token_id],
            None if logprob is None else [logprob],
            self.finish_reason,
            self.stop_reason,
            error=error,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.token_ids),
            cached_tokens=self.cached_tokens,
        )

    def end(self, reason: str, error: str | None = None) -> Delta:
        """Finish without a new token (abort, error, shutdown)."""
        self.finish_reason = reason
        return Delta(
            self.id,
            self.text.finish(),
            [],
            None,
            reason,
            error=error,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.token_ids),
            cached_tokens=self.cached_tokens,
        )

    def completion(self, error: str | None = None) -> Completion:
        ttft = None if self.first_token_at is None else self.first_token_at - self.submitted_at
        return Completion(
            self.id,
            self.text.text,
            list(self.token_ids),
            self.finish_reason,
            len(self.prompt_ids),
            self.logprobs,
            self.stop_reason,
            error,
            ttft,
            time.perf_counter() - self.submitted_at,
            self.cached_tokens,
        )
