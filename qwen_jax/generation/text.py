"""Generated ids to text, cut before the first stop string: the one text assembler.

`TextAssembler` turns ids into text token by token (`StreamDecoder`: only complete UTF-8
characters), cuts it before the first stop string, and holds back text that could still become
one. `qwen_jax.generate` (`cut_at_stop_strings`, per row of a batch), `qwen_jax.stream`
(`TextStream`) and the engine (`qwen_jax.engine.requests`) all assemble their text with it.
"""

from __future__ import annotations

from collections.abc import Sequence

from qwen_jax.tokenizer import StreamDecoder


class StopStringMatcher:
    """An Aho-Corasick automaton over stop strings, fed one character at a time.

    Per character it costs amortized O(1) whatever the number and length of the stop strings, where
    testing every stop string's prefixes against the end of the text costs O(length^2) per string per
    token. After `feed`, `held_back` is the length of the longest end of the text fed so far that is
    a proper prefix of a stop string (while no stop string has ended).
    """

    def __init__(self, stop_strings: Sequence[str]):
        self._stop_strings = tuple(stop_strings)
        self._goto: list[dict[str, int]] = [{}]
        self._depth = [0]
        terminal = [-1]  # index of the (first) stop string equal to this node's prefix, else -1
        for index, stop in enumerate(self._stop_strings):
            node = 0
            for ch in stop:
                child = self._goto[node].get(ch)
                if child is None:
                    child = len(self._goto)
                    self._goto[node][ch] = child
                    self._goto.append({})
                    self._depth.append(self._depth[node] + 1)
                    terminal.append(-1)
                node = child
            if terminal[node] < 0:
                terminal[node] = index
        # fail[v]: the node of the longest proper suffix of v's prefix that is also a prefix in the trie;
        # longest[v]: the longest stop string ending at v's prefix (via fail links), -1 for none.
        self._fail = [0] * len(self._goto)
        self._longest = list(terminal)
        order = list(self._goto[0].values())
        for node in order:  # breadth first: a node's fail target is always computed before it
            for ch, child in self._goto[node].items():
                order.append(child)
                fallback = self._fail[node]
                while fallback and ch not in self._goto[fallback]:
                    fallback = self._fail[fallback]
                target = self._goto[fallback].get(ch, 0)
                self._fail[child] = target if target != child else 0
                if self._longest[child] < 0:
                    self._longest[child] = self._longest[self._fail[child]]
        self._state = 0

    @property
    def held_back(self) -> int:
        return self._depth[self._state]

    def feed(self, text: str, offset: int) -> tuple[int, str] | None:
        """Feed `text`, which starts at position `offset` of the whole text; returns (start, stop string)
        of the stop string that starts first among those ending inside `text` (ties: the one listed
        first), or None."""
        goto, fail, longest = self._goto, self._fail, self._longest
        state, best = self._state, None
        for i, ch in enumerate(text):
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            index = longest[state]
            if index >= 0:
                start = offset + i + 1 - len(self._stop_strings[index])
                if best is None or (start, index) < best:
                    best = (start, index)
        self._state = state
        return None if best is None else (best[0], self._stop_strings[best[1]])


class TextAssembler:
    """Generated ids -> text, cut before the first stop string.

    `push(id)` returns the text that is now safe to show: complete characters that cannot be
    the start of a stop string. `stop_string` is the stop string found (None before one is);
    `finish()` releases what was held back. `text` is everything assembled so far, `emitted` how
    much of it `push` and `finish` have returned.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        self._decoder = StreamDecoder(tokenizer)
        self._matcher = StopStringMatcher(stop_strings) if stop_strings else None
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
        offset = len(self.text)
        self.text += piece
        found = self._matcher.feed(piece, offset) if self._matcher is not None else None
        if found is not None:
            self.text = self.text[: found[0]]
            self.stop_string = found[1]

    def _release(self, final: bool) -> str:
        held_back = 0 if final or self._matcher is None else self._matcher.held_back
        safe = len(self.text) - held_back
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
