"""Generated ids to text, cut before the first stop string: the one text assembler.

`TextAssembler` turns ids into text token by token (`StreamDecoder`: only complete UTF-8
characters), cuts it before the first stop string, and holds back text that could still become
one. `qwen_jax.generate` (`cut_at_stop_strings`, per row of a batch), `qwen_jax.stream`
(`TextStream`) and the engine (`qwen_jax.engine.requests`) all assemble their text with it.
"""

from __future__ import annotations

from collections.abc import Sequence

from qwen_jax.tokenizer import StreamDecoder


def held_back_length(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of a stop string."""
    longest = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class TextAssembler:
    """Generated ids -> text, cut before the first stop string.

    `push(id)` returns the text that is now safe to show: complete characters that cannot be
    the start of a stop string. `stop_string` is the stop string found (None before one is);
    `finish()` releases what was held back. `text` is everything assembled so far, `emitted` how
    much of it `push` and `finish` have returned.
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


def cut_at_stop_strings(
    tokenizer, token_ids: Sequence[int], stop_strings: Sequence[str]
) -> tuple[str, list[int], bool]:
    """(the text of `token_ids` cut before the first stop string, the fewest ids whose text reaches
    that stop string (all of them when none occurs), whether a stop string occurred)."""
    assembler = TextAssembler(tokenizer, stop_strings)
    ids = list(token_ids)
    for count, token_id in enumerate(ids, 1):
        assembler.push(token_id)
        if assembler.stop_string is not None:
            ids = ids[:count]
            break
    assembler.finish()
    return assembler.text, ids, assembler.stop_string is not None
