"""Sampling options: the keyword arguments of every generation call, resolved once into `SamplingOptions`.

`qwen_jax.generate`, `stream`, `generate_ids`, `stream_ids` and the engine's `submit` /
`generate` / `stream` all take the same sampling keyword arguments (`SamplingKwargs`, e.g.
`generate(model, tokenizer, prompts, temperature=0.7, top_p=0.9, seed=1)`). Each call resolves
them once, with `resolve`, against its defaults (a `GenerationConfig`: the checkpoint's
generation_config.json, `generation_defaults`) into a frozen, validated `SamplingOptions`. One
validator checks every value and raises `GenerationError` naming the setting (`param`); the engine
reports the same errors as `EngineError`, which the server maps to OpenAI's error envelope.

Structured output (`json_schema`, `regex`, `choice`, `grammar`: at most one) resolves to a
`qwen_jax.generation.constraints.Constraint`; it is compiled against the tokenizer by the call
that runs the request (a schema the library cannot enforce is a `GenerationError` then).

Stop conditions are parsed here too, with one set of rules (`parse_stop`): `stop` holds strings
(the text is cut before the first one) and token ids; empty strings and other types are refused.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import numpy as np

from qwen_jax.config import GenerationConfig
from qwen_jax.errors import GenerationError
from qwen_jax.generation.constraints import Constraint, constraint_from
from qwen_jax.generation.sampler import History, RowParams, seed_key_data
from qwen_jax.model.causal_lm import Qwen2ForCausalLM

Prompt = str | Sequence[Mapping[str, Any]]  # text, or a chat conversation (list of messages)
Stop = str | int | Sequence[str | int]

SEED_MODULUS = 2**64
MAX_PENALTY = 2.0  # OpenAI's presence and frequency penalties lie in [-2, 2]
MAX_LOGIT_BIAS = 100.0  # OpenAI's logit_bias values lie in [-100, 100]


class SamplingKwargs(TypedDict, total=False):
    """The sampling keyword arguments of `generate`, `stream`, `generate_ids`, `stream_ids` and
    `Engine.submit` / `generate` / `stream`. A setting left out (or None) takes its default from
    the call's `GenerationConfig` (the checkpoint's generation_config.json).

    Attributes:
        max_new_tokens: most tokens to generate (a stop token or string may end a row sooner).
        temperature: softmax temperature; 0 is greedy decoding (the argmax after the penalties).
        top_k: keep the k most likely tokens (ties with the k-th too, as HF); 0 is off.
        top_p: keep the most likely tokens whose probability adds up to top_p (at least one); 1 is off.
        min_p: drop tokens less likely than min_p times the most likely one; 0 is off.
        repetition_penalty: HF's: divide the positive logits (multiply the negative ones) of every id
            in the prompt or generated so far; 1 is off.
        presence_penalty: OpenAI's, in [-2, 2]: subtracted once from the logit of every id generated so far.
        frequency_penalty: OpenAI's, in [-2, 2]: subtracted per occurrence of an id generated so far.
        logit_bias: OpenAI's: {token id: value in [-100, 100]} added to those logits.
        seed: the token at index i of a row is drawn with `fold_in(key(seed), i)`, so a row's tokens
            depend only on its own prompt, settings and seed. Batch calls (`generate`,
            `generate_ids`, `Engine.generate`) take one seed for every row or one per prompt.
        stop: stop strings (the text is cut before the first one) and stop token ids, one or a list.
        json_schema: the output is JSON matching this schema (a dict, its JSON text, or a Pydantic
            model class); `{"type": "object"}` asks for any JSON object. Structured output: see
            `qwen_jax.generation.constraints` (at most one of json_schema, regex, choice, grammar).
        regex: the output matches this regular expression (Rust `regex` syntax, no look-around).
        choice: the output is exactly one of these strings.
        grammar: the output matches this Lark (or GBNF) grammar.
    """

    max_new_tokens: int | None
    temperature: float | None
    top_k: int | None
    top_p: float | None
    min_p: float | None
    repetition_penalty: float | None
    presence_penalty: float | None
    frequency_penalty: float | None
    logit_bias: Mapping[int, float] | None
    seed: int | Sequence[int] | None
    stop: Stop | None
    json_schema: Mapping[str, Any] | str | type | None
    regex: str | None
    choice: Sequence[str] | None
    grammar: str | None


SAMPLING_KEYS = frozenset(SamplingKwargs.__annotations__)
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Resolved and validated sampling settings of one request (or of every row of a static batch).

    Build it with `resolve`; constructing it directly validates the values too (`GenerationError`).
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0  # 0: off (a top_k that keeps the whole vocabulary is resolved to 0)
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, value), sorted by id
    seed: int = 0  # in [0, 2**64)
    stop_token_ids: frozenset[int] = frozenset()  # the config's eos ids and the caller's stop ids
    stop_strings: tuple[str, ...] = ()
    constraint: Constraint | None = None  # structured output (json_schema, regex, choice or grammar)

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, low=1)
        _check_number("temperature", self.temperature, ">= 0 (0 = greedy)", lambda v: v >= 0)
        _check_int("top_k", self.top_k, low=0, note="(0 = off)")
        _check_number("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        _check_number("min_p", self.min_p, "in [0, 1]", lambda v: 0 <= v <= 1)
        _check_number("repetition_penalty", self.repetition_penalty, "> 0 (1 = off)", lambda v: v > 0)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise GenerationError(f"{name} must be a number between -2 and 2, got {value!r}", param=name)
        _check_seed(self.seed, low=0)
        for token_id, value in self.logit_bias:
            _check_bias(token_id, value)
        for stop in self.stop_strings:
            if not isinstance(stop, str) or not stop:
                raise GenerationError(f"stop strings must be non-empty strings, got {stop!r}", param="stop")
        # Plain Python numbers from here on (numpy scalars and ints given for floats are accepted above).
        for name in ("max_new_tokens", "top_k", "seed"):
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in _FLOAT_FIELDS:
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def adjusts_logits(self) -> bool:
        """Whether the logit bias or a penalty changes the logits (else the sampler skips them)."""
        return (
            self.repetition_penalty != 1
            or self.presence_penalty != 0
            or self.frequency_penalty != 0
            or bool(self.logit_bias)
        )

    @property
    def draw_settings(self) -> tuple[float, int, float]:
        """(temperature, top_k, top_p): what decides the sampler's path (`sampler.variant_for`)."""
        return self.temperature, self.top_k, self.top_p

    def replace(self, **changes: Any) -> SamplingOptions:
        """A copy with the given fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def resolve(
    config: GenerationConfig,
    *,
    vocab_size: int,
    stop_token_ids: Sequence[int] = (),
    **sampling: Any,
) -> SamplingOptions:
    """`SamplingOptions` from the defaults in `config` and the caller's `sampling` keyword
    arguments (`SamplingKwargs`; None means "the default"); `stop_token_ids` are more stop ids.

    Raises TypeError for an unknown keyword, GenerationError (naming the setting) for a bad
    value. `seed` must be one integer here (batch calls split a list of seeds first: `row_seeds`).
    """
    unknown = sorted(set(sampling) - SAMPLING_KEYS)
    if unknown:
        raise TypeError(
            f"unexpected keyword argument{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"(sampling options: {', '.join(sorted(SAMPLING_KEYS))})"
        )
    given = {name: value for name, value in sampling.items() if value is not None}
    seed = given.get("seed", config.seed)
    _check_seed(seed)
    top_k = given.get("top_k", config.top_k)
    if _is_int(top_k) and top_k >= vocab_size:
        top_k = 0  # keeps every token: off
    stop_ids, stop_strings = parse_stop(given.get("stop"))
    stop_ids += [_check_stop_id(i) for i in stop_token_ids]
    outside = sorted({i for i in stop_ids if not 0 <= i < vocab_size})
    if outside:
        raise GenerationError(f"stop token ids {outside} are outside the vocabulary [0, {vocab_size})", param="stop")
    return SamplingOptions(
        max_new_tokens=given.get("max_new_tokens", config.max_new_tokens),
        temperature=given.get("temperature", config.temperature),
        top_k=top_k,
        top_p=given.get("top_p", config.top_p),
        min_p=given.get("min_p", config.min_p),
        repetition_penalty=given.get("repetition_penalty", config.repetition_penalty),
        presence_penalty=given.get("presence_penalty", 0.0),
        frequency_penalty=given.get("frequency_penalty", 0.0),
        logit_bias=_logit_bias(given.get("logit_bias"), vocab_size),
        seed=seed % SEED_MODULUS,
        stop_token_ids=frozenset(stop_ids) | frozenset(config.eos_token_ids),
        stop_strings=tuple(stop_strings),
        constraint=constraint_from(
            json_schema=given.get("json_schema"),
            regex=given.get("regex"),
            choice=given.get("choice"),
            grammar=given.get("grammar"),
        ),
    )


def resolve_batch(
    config: GenerationConfig,
    rows: int,
    *,
    vocab_size: int,
    stop_token_ids: Sequence[int] = (),
    **sampling: Any,
) -> tuple[SamplingOptions, list[int]]:
    """`resolve` for a batch of `rows` prompts that share their settings: (the options, each row's
    seed). `seed` is one integer for every row, or one per row; unset, every row takes the config's."""
    seeds = row_seeds(sampling.pop("seed", None), rows)
    options = resolve(config, vocab_size=vocab_size, stop_token_ids=stop_token_ids, **sampling)
    return options, [options.seed if seed is None else seed % SEED_MODULUS for seed in seeds]


def row_seeds(seed: int | Sequence[int] | None, rows: int) -> list[int | None]:
    """One seed per row of a batch, validated: `seed` for every row (None: the default), or `seed[i]` for row i."""
    if seed is None or _is_int(seed):
        if seed is not None:
            _check_seed(seed)
        return [seed] * rows
    if not isinstance(seed, Sequence) or isinstance(seed, str):
        raise GenerationError(f"seed must be an integer or one integer per prompt, got {seed!r}", param="seed")
    if len(seed) != rows:
        raise GenerationError(f"{len(seed)} seeds for {rows} prompts: give one seed, or one per prompt", param="seed")
    for value in seed:
        _check_seed(value)
    return list(seed)


def parse_stop(stop: Stop | None) -> tuple[list[int], list[str]]:
    """(stop token ids, stop strings) from `stop`: a string, a token id, or a list of them.

    Empty strings, booleans and other types are refused (`GenerationError`, param "stop").
    """
    if stop is None:
        return [], []
    if isinstance(stop, (str, int)):
        stop = [stop]
    elif not isinstance(stop, Sequence):
        raise GenerationError(f"stop must be a string, a token id or a list of them, got {stop!r}", param="stop")
    ids, strings = [], []
    for item in stop:
        if isinstance(item, str):
            if not item:
                raise GenerationError("stop strings must not be empty", param="stop")
            strings.append(item)
        else:
            ids.append(_check_stop_id(item))
    return ids, strings


def generation_defaults(
    model: Qwen2ForCausalLM, tokenizer=None, config: GenerationConfig | None = None
) -> GenerationConfig:
    """The defaults a generation call resolves its options against: `config`, else the model's
    generation config (the checkpoint's generation_config.json, attached by `qwen_jax.load`), else
    greedy with the model config's eos ids; plus the tokenizer's eos id (it always stops) and its
    pad id where the config has none."""
    if config is None:
        config = model.generation_config or GenerationConfig.from_model_config(model.config)
    if tokenizer is None:
        return config
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in config.eos_token_ids:
        config = config.replace(eos_token_ids=(*config.eos_token_ids, eos))
    if config.pad_token_id is None:
        config = config.replace(pad_token_id=tokenizer.pad_token_id)
    return config


# ----------------------------------------------------------------------------- the sampler's inputs
def row_params(options: SamplingOptions, seeds: Sequence[int]) -> RowParams:
    """The sampler's settings (host arrays) for rows that share `options`, row r seeded with `seeds[r]`."""
    rows = len(seeds)

    def column(value, dtype):
        return np.full(rows, value, dtype)

    return RowParams(
        temperature=column(options.temperature, np.float32),
        top_k=column(options.top_k, np.int32),
        top_p=column(options.top_p, np.float32),
        min_p=column(options.min_p, np.float32),
        repetition_penalty=column(options.repetition_penalty, np.float32),
        presence_penalty=column(options.presence_penalty, np.float32),
        frequency_penalty=column(options.frequency_penalty, np.float32),
        key_data=np.stack([seed_key_data(seed) for seed in seeds]).reshape(rows, 2),
        token_index=column(0, np.int32),
    )


def initial_history(options: SamplingOptions, vocab_size: int, prompts: Sequence[Sequence[int]]) -> History:
    """The sampler's history (host arrays) of rows before their first token: each row's prompt ids
    seen (the repetition penalty reads them), nothing generated, the logit bias of `options`."""
    history = History.empty(len(prompts), vocab_size, np)
    for row, ids in enumerate(prompts):
        history.seen[row, list(ids)] = True
    for token_id, value in options.logit_bias:
        history.bias[:, token_id] = value
    return history


# ----------------------------------------------------------------------------- checks
def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(name: str, value, *, low: int, note: str = "") -> None:
    if not _is_int(value) or value < low:
        raise GenerationError(f"{name} must be >= {low}{' ' + note if note else ''}, got {value!r}", param=name)


def _check_number(name: str, value, rule: str, valid) -> None:
    if not _is_number(value) or not valid(value):
        raise GenerationError(f"{name} must be {rule}, got {value!r}", param=name)


def _check_seed(seed, low: int = -(2**63)) -> None:
    if not _is_int(seed) or not low <= seed < SEED_MODULUS:
        raise GenerationError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}", param="seed")


def _check_stop_id(token_id) -> int:
    if not _is_int(token_id):
        raise GenerationError(f"stop must hold strings or token ids, got {token_id!r}", param="stop")
    return int(token_id)


def _check_bias(token_id, value, vocab_size: int | None = None) -> None:
    if not _is_int(token_id) or token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
        where = f"[0, {vocab_size})" if vocab_size is not None else "[0, vocabulary size)"
        raise GenerationError(f"logit_bias token id {token_id!r} is not in the vocabulary {where}", param="logit_bias")
    if not _is_number(value) or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
        raise GenerationError(
            f"logit_bias value for token {token_id} must be a number between -100 and 100, got {value!r}",
            param="logit_bias",
        )


def _logit_bias(logit_bias, vocab_size: int) -> tuple[tuple[int, float], ...]:
    if not logit_bias:
        return ()
    if not isinstance(logit_bias, Mapping):
        raise GenerationError(
            f"logit_bias must map token ids to numbers, got {type(logit_bias).__name__}", param="logit_bias"
        )
    for token_id, value in logit_bias.items():
        _check_bias(token_id, value, vocab_size)
    return tuple(sorted((int(token_id), float(value)) for token_id, value in logit_bias.items()))
