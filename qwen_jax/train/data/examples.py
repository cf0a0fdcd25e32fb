"""Training examples: records -> token ids with a loss mask.

Records come from JSONL, Parquet, `datasets` directories or the Hub (`sources.py`, which also maps
other column names onto these forms); training tokenizes them once into a cache (`token_cache.py`).
Each example has one of three forms:

- `{"messages": [...], "tools": [...]?}`: a chat, rendered with the checkpoint's chat template.
  Loss on the assistant turns only: the tokens after each `<|im_start|>assistant` header up to
  and including its `<|im_end|>` (the model must learn to stop), nothing else.
- `{"prompt": "...", "completion": "..."}`: loss on the completion tokens and the EOS appended.
- `{"text": "..."}`: loss on every token; EOS appended.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from qwen_jax.errors import DataError
from qwen_jax.train.data.sources import ColumnMapping, JsonlSource

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class TokenizerLike(Protocol):
    """What tokenizing examples needs of a tokenizer (`qwen_jax.Tokenizer` has it)."""

    eos_token_id: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        ...

    def apply_chat_template(
        self, messages, tools=None, add_generation_prompt: bool = True, tokenize: bool = False
    ) -> str | list[int]:
        """The chat rendered with the checkpoint's template (text when `tokenize` is False)."""
        ...


@dataclasses.dataclass(frozen=True)
class Example:
    """Token ids and which of them are prediction targets (`loss_mask[i]`: token i is learned); optionally
    the JSON text of what else of the record training needs (`record`, stored by the token cache)."""

    tokens: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # bool [n]
    record: str | None = None  # JSON text the token cache keeps beside the tokens (GRPO: prompt and columns)

    def __post_init__(self):
        if self.tokens.shape != self.loss_mask.shape:
            raise ValueError("tokens and loss_mask differ in length")


@dataclasses.dataclass
class DatasetStats:
    """Counts of what reading and fitting the data did: examples kept, bad records skipped, truncated, dropped."""

    examples: int = 0
    skipped_lines: int = 0
    truncated: int = 0
    dropped: int = 0


# --------------------------------------------------------------------------- tokenising
class Tokenization:
    """Turns parsed JSON examples into `Example`s with a tokenizer."""

    def __init__(self, tokenizer: TokenizerLike):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        # ChatML markers, needed only for chat data (None when the tokenizer lacks them).
        self._im_start = _single_id(tokenizer, IM_START)
        self._im_end = _single_id(tokenizer, IM_END)
        self._assistant = tuple(tokenizer.encode("assistant"))
        self._newline = tuple(tokenizer.encode("\n"))

    def example(self, record: Any) -> Example:
        """Tokenise one parsed JSON line; raises ValueError naming what is wrong."""
        if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        field = invalid_text_field(record, "")
        if field is not None:
            raise ValueError(f"{field} is not valid Unicode text (it holds a lone surrogate such as \\ud800)")
        if "messages" in record:
            return self._chat(record["messages"], record.get("tools"))
        if "prompt" in record or "completion" in record:
            prompt, completion = record.get("prompt"), record.get("completion")
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise ValueError("'prompt' and 'completion' must both be strings")
            return self._pieces([(prompt, False), (completion, True)])
        if "text" in record:
            if not isinstance(record["text"], str):
                raise ValueError("'text' must be a string")
            return self._pieces([(record["text"], True)])
        raise ValueError(f"expected a 'messages', 'prompt'/'completion' or 'text' field, got keys {sorted(record)}")

    def examples(self, record: Any) -> tuple[Example]:
        """The one example of a record (the token cache's interface; see `example`)."""
        return (self.example(record),)

    def _pieces(self, pieces: Sequence[tuple[str, bool]]) -> Example:
        if self.eos is None:
            raise ValueError("the tokenizer has no EOS token to end examples with")
        tokens, mask = [], []
        for text, learned in pieces:
            ids = self.tokenizer.encode(text)
            tokens += ids
            mask += [learned] * len(ids)
        tokens.append(self.eos)
        mask.append(True)
        return Example(np.asarray(tokens, np.int32), np.asarray(mask, bool))

    def _chat(self, messages: Any, tools: Any) -> Example:
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ValueError(f"messages[{i}] must be an object with a string 'role'")
            content = message.get("content")
            if content is not None and not isinstance(content, str):
                raise ValueError(f"messages[{i}].content must be a string")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("no assistant message: nothing to learn from this conversation")
        if self._im_start is None or self._im_end is None:
            raise ValueError(f"chat data needs a ChatML tokenizer with single {IM_START} and {IM_END} tokens")
        if tools is not None and not isinstance(tools, list):
            raise ValueError("'tools' must be a list")
        text = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=False, tokenize=False)
        tokens = self.tokenizer.encode(text)
        return Example(np.asarray(tokens, np.int32), self.assistant_mask(tokens))

    def assistant_mask(self, tokens: Sequence[int]) -> np.ndarray:
        """True on assistant content and its closing `<|im_end|>`; False on headers and other turns."""
        mask = np.zeros(len(tokens), bool)
        header = (self._im_start, *self._assistant)
        i = 0
        while i < len(tokens):
            if tuple(tokens[i : i + len(header)]) != header:
                i += 1
                continue
            start = i + len(header)
            if tuple(tokens[start : start + len(self._newline)]) == self._newline:
                start += len(self._newline)  # the header's newline belongs to the prompt
            end = start
            while end < len(tokens) and tokens[end] != self._im_end:
                end += 1
            mask[start : end + 1] = True  # includes <|im_end|> (absent only if the text was cut)
            i = end + 1
        return mask


def _single_id(tokenizer: TokenizerLike, token: str) -> int | None:
    ids = tokenizer.encode(token)
    return ids[0] if len(ids) == 1 else None


def read_jsonl(
    path: str | os.PathLike,
    tokenizer: TokenizerLike,
    *,
    skip_bad_lines: bool = False,
    stats: DatasetStats | None = None,
) -> list[Example]:
    """Read and tokenise every line of a JSONL file into memory (blank lines are ignored).

    A malformed line raises DataError('FILE:LINE: reason'), or with `skip_bad_lines` is skipped
    and counted in `stats.skipped_lines`. (Training goes through `token_cache`, which does the
    same for every source format without holding the data in memory.)
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: data file not found")
    stats = stats if stats is not None else DatasetStats()
    tokenization, mapping = Tokenization(tokenizer), ColumnMapping()
    examples = []
    for location, record in JsonlSource(path).records():
        try:
            if isinstance(record, Exception):
                raise record
            examples.append(tokenization.example(mapping.canonical(record)))
        except (ValueError, TypeError) as e:
            if not skip_bad_lines:
                raise DataError(f"{location}: {e} (use --skip-bad-lines to skip such lines)") from None
            stats.skipped_lines += 1
    if not examples:
        raise DataError(f"{path}: no usable examples")
    stats.examples += len(examples)
    return examples


def invalid_text_field(value: Any, path: str) -> str | None:
    """The path (`messages[0].content`) of the first string in `value` that UTF-8 cannot encode, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        inner = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
        if isinstance(key, str) and invalid_text_field(key, path) is not None:
            return f"a key of {path or 'the record'}"
        found = invalid_text_field(item, inner)
        if found is not None:
            return found
    return None
