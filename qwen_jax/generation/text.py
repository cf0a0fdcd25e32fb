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

from collections.abc import Sequence

from qwen_jax.tokenizer import StreamDecoder


def _truncate_at_stop_string(tokenizer, token_ids: list[int], stop_strings: list[str]) -> tuple[str, list[int], bool]:
    """Text cut before the first stop string, and the fewest ids whose text reaches that stop string."""
    from qwen_jax.tokenizer import StreamDecoder

    decoder = StreamDecoder(tokenizer)
    text = ""
    for n, token_id in enumerate(token_ids, 1):
        text += decoder.push(token_id)
        cut = _find_stop(text, stop_strings)
        if cut is not None:
            return text[:cut], token_ids[:n], True
    text += decoder.flush()
    cut = _find_stop(text, stop_strings)
    return (text, token_ids, False) if cut is None else (text[:cut], token_ids, True)


def _find_stop(text: str, stop_strings: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(hits) if hits else None


def held_back_length(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of a stop string."""
    longest = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


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
