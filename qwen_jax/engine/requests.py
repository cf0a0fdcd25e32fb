"""Host-side request state: validated options, incremental text with stop strings, outputs.

Everything here runs on the host (the engine thread or the caller's thread); nothing touches a
device. A request's text is assembled token by token with `StreamDecoder` (UTF-8 safe), cut
before the first stop string, and text that could still become a stop string is held back.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
import uuid
from typing import Callable, Iterator, Mapping, Sequence

from qwen_jax.generation import GenerationConfig, GenerationError, held_back_length
from qwen_jax.sampling import sampling_setup
from qwen_jax.tokenizer import StreamDecoder

MAX_TOP_LOGPROBS = 20  # as OpenAI: top_logprobs is 0..20
SEED_MODULUS = 2**64


class EngineError(GenerationError):
    """A request the engine cannot serve (bad parameters, prompt + max tokens beyond the context).

    `param`: the request field at fault, where one is (the server reports it in OpenAI's envelope).
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFullError(RuntimeError):
    """The waiting queue is full (`max_queue`): try again later."""


class EngineClosedError(RuntimeError):
    """The engine is shutting down or stopped: it accepts no new requests."""


@dataclasses.dataclass(frozen=True)
class RequestOptions:
    """Validated per-request settings (see `resolve_options`)."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    seed: int  # in [0, 2**64)
    stop_token_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    logprobs: int | None  # None: no logprobs; k: the chosen token's logprob and the k most likely
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every id generated so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence of an id generated so far
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, value added to its logit)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def resolve_options(
    config: GenerationConfig,
    *,
    prompt_length: int,
    max_len: int,
    vocab_size: int,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: str | int | Sequence[str | int] | None = None,
    stop_token_ids: Sequence[int] = (),
    logprobs: int | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    logit_bias: Mapping[int, float] | None = None,
) -> RequestOptions:
    """Fill unset settings from `config` and check every value; raises EngineError naming the problem.

    `max_new_tokens=None` takes the config's default, capped to what the context leaves;
    an explicit value that overflows the context is an error that states both numbers.
    `presence_penalty` / `frequency_penalty` (OpenAI's, each in [-2, 2]) act on generated ids only;
    `logit_bias` maps token ids to values in [-100, 100] added to their logits.
    """
    if prompt_length < 1:
        raise EngineError("the prompt is empty: at least one token is needed to generate from")
    if prompt_length >= max_len:
        raise EngineError(f"the prompt has {prompt_length} tokens, but the context is {max_len} tokens "
                          f"(at least one new token must fit)")
    room = max_len - prompt_length
    if max_new_tokens is None:
        max_new_tokens = min(config.max_new_tokens, room)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise EngineError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if max_new_tokens > room:
        raise EngineError(f"the prompt ({prompt_length} tokens) plus max_new_tokens ({max_new_tokens}) is "
                          f"{prompt_length + max_new_tokens} tokens, more than the context of {max_len} tokens "
                          f"(at most {room} new tokens for this prompt)")
    values = dict(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, min_p=config.min_p,
                  repetition_penalty=config.repetition_penalty)
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty)
    values.update({k: v for k, v in given.items() if v is not None})
    try:
        sampling_setup(**values, vocab_size=vocab_size)  # the same checks as qwen_jax.generate
    except ValueError as e:
        raise EngineError(str(e)) from None
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise EngineError(f"top logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {logprobs}")
    penalties = {}
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        value = 0.0 if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
            raise EngineError(f"{name} must be a number between -2 and 2, got {value!r}", param=name)
        penalties[name] = float(value)
    bias = _logit_bias(logit_bias, vocab_size)
    seed = config.seed if seed is None else seed
    if not isinstance(seed, int) or isinstance(seed, bool) or not -(2**63) <= seed < SEED_MODULUS:
        raise EngineError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
    stop_ids, stop_strings = _split_stop(stop)
    stop_ids = set(stop_ids) | {int(i) for i in stop_token_ids} | set(config.eos_token_ids)
    bad = sorted(i for i in stop_ids if not 0 <= i < vocab_size)
    if bad:
        raise EngineError(f"stop token ids {bad} are outside the vocabulary [0, {vocab_size})")
    return RequestOptions(
        max_new_tokens=max_new_tokens,
        temperature=float(values["temperature"]),
        top_k=int(values["top_k"]) if int(values["top_k"]) < vocab_size else 0,  # keeping every token: off
        top_p=float(values["top_p"]),
        min_p=float(values["min_p"]),
        repetition_penalty=float(values["repetition_penalty"]),
        seed=seed % SEED_MODULUS,
        stop_token_ids=frozenset(stop_ids),
        stop_strings=tuple(stop_strings),
        logprobs=logprobs,
        logit_bias=bias,
        **penalties,
    )


def _logit_bias(logit_bias, vocab_size: int) -> tuple[tuple[int, float], ...]:
    if not logit_bias:
        return ()
    if not isinstance(logit_bias, Mapping):
        raise EngineError(f"logit_bias must map token ids to numbers, got {type(logit_bias).__name__}",
                          param="logit_bias")
    pairs = {}
    for token_id, value in logit_bias.items():
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise EngineError(f"logit_bias token id {token_id!r} is not in the vocabulary [0, {vocab_size})",
                              param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise EngineError(f"logit_bias value for token {token_id} must be a number between -100 and 100, "
                              f"got {value!r}", param="logit_bias")
        pairs[token_id] = float(value)
    return tuple(sorted(pairs.items()))


def _split_stop(stop) -> tuple[list[int], list[str]]:
    if stop is None:
        return [], []
    if isinstance(stop, (str, int)):
        stop = [stop]
    ids, strings = [], []
    for item in stop:
        if isinstance(item, str):
            if not item:
                raise EngineError("stop strings must not be empty")
            strings.append(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            ids.append(item)
        else:
            raise EngineError(f"stop must hold strings or token ids, got {item!r}")
    return ids, strings


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

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


# ----------------------------------------------------------------------------- text with stop strings
class TextAssembler:
    """Generated ids -> text, cut before the first stop string.

    `push(id)` returns the text that is now safe to show: complete characters that cannot be
    the start of a stop string. `stopped` tells whether a stop string was found; `finish()`
    releases what was held back.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        self._decoder = StreamDecoder(tokenizer)
        self._stop_strings = tuple(stop_strings)
        self._longest_stop = max((len(s) for s in self._stop_strings), default=0)
        self.text = ""
        self.emitted = 0
        self.stop_string: str | None = None

    def push(self, token_id: int) -> str:
        if self.stop_string is not None:
            return ""
        self._extend(self._decoder.push(token_id))
        return self._release(final=self.stop_string is not None)

    def finish(self) -> str:
        if self.stop_string is None:
            self._extend(self._decoder.flush())
        return self._release(final=True)

    def _extend(self, piece: str) -> None:
        if not piece:
            return
        # Only the tail can hold a new match: a stop string ending in `piece` starts at most this far back.
        search_from = max(0, len(self.text) - self._longest_stop + 1)
        self.text += piece
        best = None
        for stop in self._stop_strings:
            at = self.text.find(stop, search_from)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        if best is not None:
            self.text = self.text[: best[0]]
            self.stop_string = best[1]

    def _release(self, final: bool) -> str:
        safe = len(self.text) if final else len(self.text) - held_back_length(self.text, self._stop_strings)
        if safe <= self.emitted:
            return ""
        out = self.text[self.emitted : safe]
        self.emitted = safe
        return out


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

    def __init__(self, request_id: str, prompt_ids: list[int], options: RequestOptions, tokenizer,
                 handle: RequestHandle, on_delta: Callable[[Delta], None] | None):
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.options = options
        self.handle = handle
        self.on_delta = on_delta
        self.text = TextAssembler(tokenizer, options.stop_strings)
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if options.logprobs is not None else None
        self.slot: int | None = None
        self.dispatched = 0  # tokens whose computation has been dispatched to the device
        self.prefilled = 0  # prompt tokens whose prefill has been dispatched
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

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
        if self.text.stop_string is not None:
            self.finish_reason, self.stop_reason = "stop", self.text.stop_string
        elif token_id in self.options.stop_token_ids:
            self.finish_reason, self.stop_reason = "stop", token_id
        elif len(self.token_ids) >= self.options.max_new_tokens:
            self.finish_reason = "length"
        if self.finished:
            text += self.text.finish()
        return Delta(self.id, text, [token_id], None if logprob is None else [logprob], self.finish_reason,
                     self.stop_reason, prompt_tokens=len(self.prompt_ids), completion_tokens=len(self.token_ids))

    def end(self, reason: str, error: str | None = None) -> Delta:
        """Finish without a new token (abort, error, shutdown)."""
        self.finish_reason = reason
        return Delta(self.id, self.text.finish(), [], None, reason, error=error, prompt_tokens=len(self.prompt_ids),
                     completion_tokens=len(self.token_ids))

    def completion(self, error: str | None = None) -> Completion:
        ttft = None if self.first_token_at is None else self.first_token_at - self.submitted_at
        return Completion(self.id, self.text.text, list(self.token_ids), self.finish_reason, len(self.prompt_ids),
                          self.logprobs, self.stop_reason, error, ttft, time.perf_counter() - self.submitted_at)
