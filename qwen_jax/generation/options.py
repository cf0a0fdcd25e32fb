"""Text generation with a preallocated KV cache: batched (one jitted loop) and streaming (one jitted step per token).

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
   token so text can be shown as it is produced. Both draw step `i`'s token with
   `fold_in(PRNGKey(seed), i)`, so they give the same tokens.

The model is split once per call (`nnx.split`); the jitted functions are pure functions of
(graphdef, state), compiled ahead of time and cached by argument shapes and shardings, which lets
`Timing` report compile time apart from prefill and decode time. The cache is donated to every call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from qwen_jax.config import GenerationConfig
from qwen_jax.errors import EngineError
from qwen_jax.generation.sampling import sampling_setup
from qwen_jax.model.causal_lm import Qwen2ForCausalLM

Prompt = str | Sequence[Mapping[str, Any]]  # text, or a chat conversation (list of messages)


def default_generation_config(model: Qwen2ForCausalLM) -> GenerationConfig:
    """The config `qwen_jax.load` attached to the model, else greedy with the model config's eos ids."""
    config = getattr(model, "generation_config", None)
    return config if config is not None else GenerationConfig.from_model_config(model.config)


def _resolve_config(model, config: GenerationConfig | None, stop_token_ids, **overrides) -> GenerationConfig:
    config = (config or default_generation_config(model)).replace(**overrides)
    if stop_token_ids:
        extra = tuple(int(i) for i in stop_token_ids if int(i) not in config.eos_token_ids)
        config = config.replace(eos_token_ids=config.eos_token_ids + extra)
    return config


def _with_tokenizer_eos(config: GenerationConfig, tokenizer) -> GenerationConfig:
    extra = tuple(i for i in (tokenizer.eos_token_id,) if i is not None and i not in config.eos_token_ids)
    pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
    return config.replace(eos_token_ids=config.eos_token_ids + extra, pad_token_id=pad)


MAX_TOP_LOGPROBS = 20  # as OpenAI: top_logprobs is 0..20


SEED_MODULUS = 2**64


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
        raise EngineError(
            f"the prompt has {prompt_length} tokens, but the context is {max_len} tokens "
            f"(at least one new token must fit)"
        )
    room = max_len - prompt_length
    if max_new_tokens is None:
        max_new_tokens = min(config.max_new_tokens, room)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise EngineError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if max_new_tokens > room:
        raise EngineError(
            f"the prompt ({prompt_length} tokens) plus max_new_tokens ({max_new_tokens}) is "
            f"{prompt_length + max_new_tokens} tokens, more than the context of {max_len} tokens "
            f"(at most {room} new tokens for this prompt)"
        )
    values = dict(
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        min_p=config.min_p,
        repetition_penalty=config.repetition_penalty,
    )
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
        raise EngineError(
            f"logit_bias must map token ids to numbers, got {type(logit_bias).__name__}", param="logit_bias"
        )
    pairs = {}
    for token_id, value in logit_bias.items():
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise EngineError(
                f"logit_bias token id {token_id!r} is not in the vocabulary [0, {vocab_size})", param="logit_bias"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise EngineError(
                f"logit_bias value for token {token_id} must be a number between -100 and 100, got {value!r}",
                param="logit_bias",
            )
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
