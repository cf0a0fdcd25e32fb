"""Training data: examples -> token ids with a loss mask -> packed fixed-length batches.

Examples come from JSONL, Parquet, `datasets` directories or the Hub (`sources.py`, which also
maps other column names onto these forms) and are tokenized once into a cache (`token_cache.py`).
Each example has one of three forms:

- `{"messages": [...], "tools": [...]?}`: a chat, rendered with the checkpoint's chat template.
  Loss on the assistant turns only: the tokens after each `<|im_start|>assistant` header up to
  and including its `<|im_end|>` (the model must learn to stop), nothing else.
- `{"prompt": "...", "completion": "..."}`: loss on the completion tokens and the EOS appended.
- `{"text": "..."}`: loss on every token; EOS appended.

Packing: examples are laid end to end in rows of `seq_len` tokens in the (seeded, per-epoch)
shuffled order; an example that does not fit in the current row starts a new one. Each example
keeps its own segment id (1, 2, ...; 0 is padding) and positions restarting at 0, so attention
never crosses examples and the model sees each one as if alone. Truncation policy: an example
longer than `seq_len` keeps its first `seq_len` tokens (counted in `DatasetStats.truncated`);
one left with no loss token after truncation is dropped (counted in `dropped`).

Order and resumption: epoch `e` uses the permutation `numpy.random.default_rng([seed, e])`;
`DataLoader.position` (epoch, batch index) is saved with every checkpoint, so a resumed run
continues with exactly the batches an uninterrupted run would have seen. The batches depend on
the data, `seq_len`, `batch_size` and the seed only: not on the number of processes or devices,
each of which builds just the rows it holds (`DataLoader.batch(..., rows=)`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from qwen_jax.errors import DataError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class TokenizerLike(Protocol):
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def apply_chat_template(
        self, messages, tools=None, add_generation_prompt: bool = True, tokenize: bool = False
    ) -> str | list[int]: ...


@dataclasses.dataclass(frozen=True)
class Example:
    """Token ids and which of them are prediction targets (`loss_mask[i]`: token i is learned)."""

    tokens: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # bool [n]

    def __post_init__(self):
        if self.tokens.shape != self.loss_mask.shape:
            raise ValueError("tokens and loss_mask differ in length")


@dataclasses.dataclass
class DatasetStats:
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
    from qwen_jax.train.sources import ColumnMapping, JsonlSource

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


# --------------------------------------------------------------------------- packing
@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """Model inputs and targets, all `[rows, seq_len]`.

    `targets[r, t]` is the token to predict after position t and `weights[r, t]` is 1 where that
    prediction counts in the loss (same segment, a learned token), else 0.
    """

    input_ids: np.ndarray  # int32
    positions: np.ndarray  # int32, restart at 0 in every segment
    segment_ids: np.ndarray  # int32, 1.. per example, 0 for padding
    targets: np.ndarray  # int32
    weights: np.ndarray  # float32

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: slice | np.ndarray) -> PackedBatch:
        return PackedBatch(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))


def fit_to_length(examples: Sequence[Example], seq_len: int, stats: DatasetStats | None = None) -> list[Example]:
    """Apply the truncation policy: keep the first `seq_len` tokens; drop examples left with no target.

    A token counts as a target only when a token precedes it in its own segment, so the first
    token of an example is never learned.
    """
    stats = stats if stats is not None else DatasetStats()
    kept = []
    for example in examples:
        if len(example.tokens) > seq_len:
            stats.truncated += 1
            example = Example(example.tokens[:seq_len], example.loss_mask[:seq_len])
        if not example.loss_mask[1:].any():
            stats.dropped += 1
            continue
        kept.append(example)
    return kept


def pack(examples: Sequence[Example], seq_len: int) -> PackedBatch:
    """Lay examples (each at most `seq_len` long) end to end into rows, in the given order."""
    rows: list[list[Example]] = []
    used = seq_len  # forces a first row
    for example in examples:
        n = len(example.tokens)
        if n > seq_len:
            raise ValueError(f"example of {n} tokens exceeds seq_len {seq_len}; call fit_to_length first")
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(example)
        used += n
    batch = empty_rows(len(rows), seq_len)
    for r, row in enumerate(rows):
        _fill_row(batch, r, row)
    return batch


def _fill_row(batch: PackedBatch, r: int, row: Sequence[Example]) -> None:
    offset = 0
    for segment, example in enumerate(row, start=1):
        n = len(example.tokens)
        span = slice(offset, offset + n)
        batch.input_ids[r, span] = example.tokens
        batch.positions[r, span] = np.arange(n)
        batch.segment_ids[r, span] = segment
        # Position t predicts token t+1 of the same example.
        batch.targets[r, offset : offset + n - 1] = example.tokens[1:]
        batch.weights[r, offset : offset + n - 1] = example.loss_mask[1:]
        offset += n


def empty_rows(rows: int, seq_len: int) -> PackedBatch:
    """Padding rows (segment 0, zero weight) that fill the last batch of an epoch."""
    shape = (rows, seq_len)
    return PackedBatch(*(np.zeros(shape, np.int32) for _ in range(4)), np.zeros(shape, np.float32))


def concat(batches: Sequence[PackedBatch]) -> PackedBatch:
    return PackedBatch(
        *(np.concatenate([getattr(b, f.name) for b in batches]) for f in dataclasses.fields(PackedBatch))
    )


# --------------------------------------------------------------------------- loading
class ExampleStore(Protocol):
    """Random access to tokenized examples (`token_cache.TokenStore` on disk, `InMemoryStore`)."""

    lengths: np.ndarray  # int64 [examples]
    first_target: np.ndarray  # int32 [examples]: first position >= 1 whose token is learned, -1 if none

    def __len__(self) -> int: ...

    def example(self, index: int, max_tokens: int | None = None) -> Example: ...


class InMemoryStore:
    """An ExampleStore over a list of examples."""

    def __init__(self, examples: Sequence[Example]):
        self.examples = list(examples)
        self.lengths = np.asarray([len(e.tokens) for e in self.examples], np.int64)
        learned = [np.flatnonzero(e.loss_mask[1:]) for e in self.examples]
        self.first_target = np.asarray([int(t[0]) + 1 if len(t) else -1 for t in learned], np.int32)

    def __len__(self) -> int:
        return len(self.examples)

    def example(self, index: int, max_tokens: int | None = None) -> Example:
        example = self.examples[index]
        if max_tokens is not None and len(example.tokens) > max_tokens:
            return Example(example.tokens[:max_tokens], example.loss_mask[:max_tokens])
        return example


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """Which examples fill which packed rows in one epoch (`rows` is padded to whole batches)."""

    order: np.ndarray  # example indices in the epoch's order
    row_starts: np.ndarray  # [real rows + 1]: row r holds order[row_starts[r]:row_starts[r + 1]]
    rows: int

    @property
    def real_rows(self) -> int:
        return len(self.row_starts) - 1


class DataLoader:
    """Deterministic packed batches of `batch_rows` rows; `position` is (epoch, batch index).

    Examples are truncated to their first `seq_len` tokens, and dropped when no learned token is
    left (the `truncated` / `dropped` counts). Each epoch shuffles the kept examples with
    `default_rng([seed, epoch])` (or keeps their order when `shuffle` is False), packs them, and
    pads the last batch with empty rows. Only the packing plan (a few integers per example) is
    computed for a whole epoch; a batch's rows are built when asked for, and `batch(..., rows=)`
    builds just some of them (the rows of one process's devices), so the global batches are the
    same whichever process builds which rows.
    """

    def __init__(
        self,
        examples: Sequence[Example] | ExampleStore,
        seq_len: int,
        batch_rows: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
    ):
        self.store = examples if hasattr(examples, "first_target") else InMemoryStore(examples)
        self.seq_len = seq_len
        self.batch_rows = batch_rows
        self.seed = seed
        self.shuffle = shuffle
        first_target = self.store.first_target
        self.kept = np.flatnonzero((first_target > 0) & (first_target < seq_len))
        if not len(self.kept):
            raise ValueError("no examples to load")
        self.truncated = int(np.count_nonzero(self.store.lengths > seq_len))
        self.dropped = len(self.store) - len(self.kept)
        self.epoch = 0
        self.index = 0
        self._plan: tuple[int, EpochPlan] | None = None

    def plan(self, epoch: int) -> EpochPlan:
        if self._plan is None or self._plan[0] != epoch:
            order = (
                self.kept[np.random.default_rng([self.seed, epoch]).permutation(len(self.kept))]
                if self.shuffle
                else self.kept
            )
            lengths = np.minimum(self.store.lengths[order], self.seq_len)
            starts, used = [], self.seq_len
            for i, n in enumerate(lengths.tolist()):  # greedy: a new row when the example does not fit
                if used + n > self.seq_len:
                    starts.append(i)
                    used = 0
                used += n
            starts.append(len(order))
            real_rows = len(starts) - 1
            rows = -(-real_rows // self.batch_rows) * self.batch_rows
            self._plan = (epoch, EpochPlan(order, np.asarray(starts, np.int64), rows))
        return self._plan[1]

    def batches_in_epoch(self, epoch: int) -> int:
        return self.plan(epoch).rows // self.batch_rows

    def batch(self, epoch: int, index: int, rows: Sequence[int] | None = None) -> PackedBatch:
        """Batch `index` of `epoch`, or only its rows `rows` (indices within the batch, in that order)."""
        plan = self.plan(epoch)
        rows = range(self.batch_rows) if rows is None else rows
        batch = empty_rows(len(rows), self.seq_len)
        for r, row in enumerate(rows):
            global_row = index * self.batch_rows + int(row)
            if global_row < plan.real_rows:  # beyond: a padding row, left empty
                members = plan.order[plan.row_starts[global_row] : plan.row_starts[global_row + 1]]
                _fill_row(batch, r, [self.store.example(int(i), self.seq_len) for i in members])
        return batch

    def batch_tokens(self, epoch: int, index: int) -> int:
        """Tokens (not padding) in a whole batch, from the plan alone."""
        plan = self.plan(epoch)
        first, last = (min(i * self.batch_rows, plan.real_rows) for i in (index, index + 1))
        members = plan.order[plan.row_starts[first] : plan.row_starts[last]]
        return int(np.minimum(self.store.lengths[members], self.seq_len).sum())

    def advance(self) -> tuple[int, int]:
        """(epoch, index) of the next batch; moves the position past it."""
        if self.index >= self.batches_in_epoch(self.epoch):
            self.epoch, self.index = self.epoch + 1, 0
        position = (self.epoch, self.index)
        self.index += 1
        return position

    def __iter__(self):
        return self

    def __next__(self) -> PackedBatch:
        return self.batch(*self.advance())

    @property
    def position(self) -> dict[str, int]:
        """Where the next batch comes from; save it with a checkpoint."""
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, position: dict[str, int]) -> None:
        self.epoch, self.index = int(position["epoch"]), int(position["index"])
