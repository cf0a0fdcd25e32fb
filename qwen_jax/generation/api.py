"""`qwen_jax.generate` and `qwen_jax.stream`: text in, text out, over the static-batch programs;
`generate_ids` and `stream_ids`: the token-id calls of `qwen_jax.generation.static` with `speculative=`.

Prompts are text or chat conversations (rendered with the tokenizer's chat template); the
sampling keyword arguments are those of every generation call (`SamplingKwargs`, resolved once
into `SamplingOptions` against the checkpoint's defaults); the ids come from
`qwen_jax.generation.static`, the text from the one text assembler (`qwen_jax.generation.text`),
which cuts it before the first stop string. Structured output (`json_schema=`, `regex=`,
`choice=`, `grammar=`) is compiled here with the tokenizer (`qwen_jax.generation.constraints`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from typing_extensions import Unpack

from qwen_jax.config import GenerationConfig
from qwen_jax.errors import GenerationError
from qwen_jax.generation.constraints import GrammarMatcher, grammar_compiler
from qwen_jax.generation.options import (
    Prompt,
    SamplingKwargs,
    SamplingOptions,
    generation_defaults,
    resolve_batch,
)
from qwen_jax.generation.speculative import SpeculativeOptions, SpeculativeTokenStream, resolve_speculative
from qwen_jax.generation.speculative import generate_batch as speculative_generate_batch
from qwen_jax.generation.static import Generation, TokenStream, _Stream, generate_batch, resolve_ids_options
from qwen_jax.generation.text import TextAssembler, cut_at_stop_strings
from qwen_jax.model.causal_lm import Qwen2ForCausalLM


def _encode_prompt(tokenizer, prompt: Prompt, tools=None) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    return tokenizer.encode(tokenizer.apply_chat_template(list(prompt), tools=tools, add_generation_prompt=True))


def _grammars(model, tokenizer, config: GenerationConfig, options: SamplingOptions, rows: int):
    """Each row's matcher of the options' constraint (None without one); GenerationError if unsupported."""
    if options.constraint is None:
        return None
    compiler = grammar_compiler(tokenizer, model.config.vocab_size, config.eos_token_ids)
    return [compiler.matcher(options.constraint) for _ in range(rows)]


def _refuse_constrained_speculation(grammars) -> None:
    """Speculative verification does not consult a grammar, so the two cannot be combined."""
    if grammars and any(g is not None for g in grammars):
        raise GenerationError(
            "speculative decoding cannot be combined with structured output (json_schema, regex, choice, grammar)",
            param="speculative",
        )


def generate(
    model: Qwen2ForCausalLM,
    tokenizer,
    prompts_or_conversations: Prompt | Sequence[Prompt],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    config: GenerationConfig | None = None,
    prefill_chunk: int | None = None,
    speculative: str | SpeculativeOptions | None = None,
    prefix_cache: bool = True,
    **sampling: Unpack[SamplingKwargs],
) -> Generation:
    """Generate continuations for a batch of prompts (strings) or conversations (lists of messages).

    Conversations are rendered with the tokenizer's chat template (with `tools`, if given) and an
    assistant header. Defaults come from `config`, else the checkpoint's generation_config.json
    (attached by `qwen_jax.load`); the tokenizer's eos token always stops generation.
    `prefill_chunk` as in `generate_ids`.

    Args:
        speculative: speculative decoding (`qwen_jax.generation.speculative`): "ngram" (prompt
            lookup, K=4) or `SpeculativeOptions` (method, K, n-gram sizes, draft model). Greedy
            output is that of plain decoding, sampled output follows the same distribution;
            `Generation.speculation` holds the acceptance statistics.
        prefix_cache: with one prompt or conversation, reuse the cache of the model's previous call
            when this prompt starts with its tokens (the next turn of a chat prefills only what is
            new: `qwen_jax.generation.conversation_cache`; `Generation.timing.cached_tokens` counts
            them), and keep this call's cache for the next one (with `speculative=`, the draft
            model's too). The tokens are those of a call without it. False: neither (and drop what
            was kept). A batch of several prompts neither reuses nor keeps one.
        **sampling: the sampling options (`qwen_jax.generation.options.SamplingKwargs`), e.g.
            `temperature=0.7, top_p=0.9, seed=1`: `stop` adds stop token ids (ints) and stop
            strings (the text is cut before the first one); `seed` is one seed for every prompt
            or one per prompt; `json_schema`, `regex`, `choice` or `grammar` constrain the output
            (structured output, `qwen_jax.generation.constraints`; a constraint the library cannot
            enforce raises GenerationError, a ValueError, naming the reason).
    """
    single = isinstance(prompts_or_conversations, str) or (
        bool(prompts_or_conversations) and isinstance(prompts_or_conversations[0], Mapping)
    )
    prompts = [prompts_or_conversations] if single else list(prompts_or_conversations)
    config = generation_defaults(model, tokenizer, config)
    options, seeds = resolve_batch(config, len(prompts), vocab_size=model.config.vocab_size, **sampling)
    grammars = _grammars(model, tokenizer, config, options, len(prompts))
    prompt_ids = [_encode_prompt(tokenizer, p, tools) for p in prompts]
    spec = resolve_speculative(speculative, model, tokenizer.vocab_size)
    if spec is None:
        result = generate_batch(
            model,
            prompt_ids,
            options,
            seeds,
            config.pad_token_id,
            prefill_chunk=prefill_chunk,
            grammars=grammars,
            prefix_cache=prefix_cache,
        )
    else:
        _refuse_constrained_speculation(grammars)
        result = speculative_generate_batch(
            model,
            prompt_ids,
            options,
            seeds,
            spec,
            config.pad_token_id,
            prefill_chunk=prefill_chunk,
            prefix_cache=prefix_cache,
        )
    texts = []
    for row, ids in enumerate(result.token_ids):
        text, ids, stopped = cut_at_stop_strings(tokenizer, ids, options.stop_strings)
        result.token_ids[row] = ids
        if stopped:
            result.finish_reasons[row] = "stop"
        texts.append(text)
    result.texts = texts
    return result


class TextStream(_Stream):
    """Iterator over text pieces for one prompt (UTF-8 safe); `result` is set when it ends.

    Text that could be the start of a stop string is held back until it is known not to be one.
    """

    def __init__(self, tokens: TokenStream | SpeculativeTokenStream, tokenizer, stop_strings: Sequence[str]):
        self._tokens = tokens
        self._text = TextAssembler(tokenizer, stop_strings)
        super().__init__()

    def _run(self) -> Iterator[str]:
        text = self._text
        try:
            for token_id in self._tokens:
                piece = text.push(token_id)
                if piece:
                    yield piece
                if text.stop_string is not None:
                    break
            piece = text.finish()
            if piece:
                yield piece
        finally:
            self._tokens.close()
            result = self._tokens.result
            if result is not None:
                if text.stop_string is not None:
                    result.finish_reasons[0] = "stop"
                result.texts = [text.text[: text.emitted]]
            self.result = result


def stream(
    model: Qwen2ForCausalLM,
    tokenizer,
    prompt_or_conversation: Prompt,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    config: GenerationConfig | None = None,
    prefill_chunk: int | None = None,
    speculative: str | SpeculativeOptions | None = None,
    prefix_cache: bool = True,
    **sampling: Unpack[SamplingKwargs],
) -> TextStream:
    """Streaming `generate` for one prompt or conversation: iterate to get text as it is decoded.

    `for piece in stream(...)` yields strings; their concatenation is the batch path's text (and
    the ids are those of `generate` with the same seed and settings, `speculative` and
    `prefix_cache` included: a chat's next turn reuses this one's cache as in `generate`).
    """
    config = generation_defaults(model, tokenizer, config)
    options, seeds = resolve_batch(config, 1, vocab_size=model.config.vocab_size, **sampling)
    grammar: GrammarMatcher | None = (_grammars(model, tokenizer, config, options, 1) or [None])[0]
    prompt_ids = _encode_prompt(tokenizer, prompt_or_conversation, tools)
    spec = resolve_speculative(speculative, model, tokenizer.vocab_size)
    options = options.replace(seed=seeds[0])
    if spec is None:
        tokens = TokenStream(
            model, prompt_ids, options, config.pad_token_id, False, prefill_chunk, grammar, prefix_cache=prefix_cache
        )
    else:
        _refuse_constrained_speculation([grammar])
        tokens = SpeculativeTokenStream(
            model, prompt_ids, options, spec, config.pad_token_id, False, prefill_chunk, prefix_cache
        )
    return TextStream(tokens, tokenizer, options.stop_strings)


def generate_ids(
    model: Qwen2ForCausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    stop_token_ids: Sequence[int] = (),
    config: GenerationConfig | None = None,
    return_logits: bool = False,
    prefill_chunk: int | None = None,
    prefix_cache: bool = True,
    speculative: str | SpeculativeOptions | None = None,
    **sampling: Unpack[SamplingKwargs],
) -> Generation:
    """Generate from a batch of token-id prompts (`qwen_jax.generation.static.generate_ids`).

    `speculative` as in `generate` (without a tokenizer, a draft model's vocabulary must be the
    target's size); the other arguments (`prefix_cache` included) as in
    `qwen_jax.generation.static.generate_ids`.
    """
    spec = resolve_speculative(speculative, model)
    config, options, seeds = resolve_ids_options(model, len(prompts), stop_token_ids, config, sampling)
    if spec is None:
        return generate_batch(
            model, prompts, options, seeds, config.pad_token_id, return_logits, prefill_chunk, prefix_cache=prefix_cache
        )
    return speculative_generate_batch(
        model, prompts, options, seeds, spec, config.pad_token_id, return_logits, prefill_chunk, prefix_cache
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
    speculative: str | SpeculativeOptions | None = None,
    **sampling: Unpack[SamplingKwargs],
) -> TokenStream | SpeculativeTokenStream:
    """Generate from one token-id prompt, yielding each id as soon as it is produced
    (`qwen_jax.generation.static.stream_ids`); `speculative` as in `generate_ids`, the ids are
    those `generate_ids` gives."""
    spec = resolve_speculative(speculative, model)
    config, options, seeds = resolve_ids_options(model, 1, stop_token_ids, config, sampling)
    options = options.replace(seed=seeds[0])
    if spec is None:
        return TokenStream(
            model, prompt_ids, options, config.pad_token_id, return_logits, prefill_chunk, prefix_cache=prefix_cache
        )
    return SpeculativeTokenStream(
        model, prompt_ids, options, spec, config.pad_token_id, return_logits, prefill_chunk, prefix_cache
    )
