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

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from qwen_jax.config import GenerationConfig
from qwen_jax.generation.options import (
    Prompt,
    _split_stop,
    _with_tokenizer_eos,
    default_generation_config,
)
from qwen_jax.generation.static import (
    Generation,
    TokenStream,
    _Stream,
    generate_ids,
    stream_ids,
)
from qwen_jax.generation.text import (
    _find_stop,
    _truncate_at_stop_string,
    held_back_length,
)
from qwen_jax.model.causal_lm import Qwen2ForCausalLM


# ----------------------------------------------------------------------------- text API
def _encode_prompt(tokenizer, prompt: Prompt, tools=None) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    return tokenizer.encode(tokenizer.apply_chat_template(list(prompt), tools=tools, add_generation_prompt=True))


def generate(
    model: Qwen2ForCausalLM,
    tokenizer,
    prompts_or_conversations: Prompt | Sequence[Prompt],
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: str | int | Sequence[str | int] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    config: GenerationConfig | None = None,
    prefill_chunk: int | None = None,
) -> Generation:
    """Generate continuations for a batch of prompts (strings) or conversations (lists of messages).

    Conversations are rendered with the tokenizer's chat template (with `tools`, if given) and an
    assistant header. `stop` adds stop token ids (ints) and stop strings (the text is cut before
    the first one). Defaults come from `config`, else the checkpoint's generation_config.json
    (attached by `qwen_jax.load`); the tokenizer's eos token always stops generation.
    `prefill_chunk` as in `generate_ids`.
    """
    single = isinstance(prompts_or_conversations, str) or (
        bool(prompts_or_conversations) and isinstance(prompts_or_conversations[0], Mapping)
    )
    prompts = [prompts_or_conversations] if single else list(prompts_or_conversations)
    stop_ids, stop_strings = _split_stop(stop)
    config = _with_tokenizer_eos(config or default_generation_config(model), tokenizer)
    prompt_ids = [_encode_prompt(tokenizer, p, tools) for p in prompts]
    result = generate_ids(
        model,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop_token_ids=stop_ids,
        config=config,
        prefill_chunk=prefill_chunk,
    )
    texts = []
    for row, ids in enumerate(result.token_ids):
        text, ids, stopped = _truncate_at_stop_string(tokenizer, ids, stop_strings)
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

    def __init__(self, tokens: TokenStream, tokenizer, stop_strings: list[str]):
        from qwen_jax.tokenizer import StreamDecoder

        self._tokens = tokens
        self._decoder = StreamDecoder(tokenizer)
        self._stop_strings = stop_strings
        super().__init__()

    def _run(self) -> Iterator[str]:
        text, emitted, stopped = "", 0, False
        try:
            for token_id in self._tokens:
                text += self._decoder.push(token_id)
                cut = _find_stop(text, self._stop_strings)
                if cut is not None:
                    text, stopped = text[:cut], True
                    break
                safe = len(text) - held_back_length(text, self._stop_strings)
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
            if not stopped:
                text += self._decoder.flush()
                cut = _find_stop(text, self._stop_strings)
                if cut is not None:
                    text, stopped = text[:cut], True
            if len(text) > emitted:
                yield text[emitted:]
                emitted = len(text)
        finally:
            self._tokens.close()
            result = self._tokens.result
            if result is not None:
                if stopped:
                    result.finish_reasons[0] = "stop"
                result.texts = [text[:emitted]]
            self.result = result


def stream(
    model: Qwen2ForCausalLM,
    tokenizer,
    prompt_or_conversation: Prompt,
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: str | int | Sequence[str | int] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    config: GenerationConfig | None = None,
    prefill_chunk: int | None = None,
) -> TextStream:
    """Streaming `generate` for one prompt or conversation: iterate to get text as it is decoded.

    `for piece in stream(...)` yields strings; their concatenation is the batch path's text.
    """
    stop_ids, stop_strings = _split_stop(stop)
    config = _with_tokenizer_eos(config or default_generation_config(model), tokenizer)
    prompt_ids = _encode_prompt(tokenizer, prompt_or_conversation, tools)
    tokens = stream_ids(
        model,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop_token_ids=stop_ids,
        config=config,
        prefill_chunk=prefill_chunk,
    )
    return TextStream(tokens, tokenizer, stop_strings)
