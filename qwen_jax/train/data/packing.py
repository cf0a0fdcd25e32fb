"""Packing: examples laid end to end into fixed-length rows that keep them apart.

Examples are laid end to end in rows of `seq_len` tokens in the given order; an example that
does not fit in the current row starts a new one. Each example keeps its own segment id (1, 2,
...; 0 is padding) and positions restarting at 0, so attention never crosses examples and the
model sees each one as if alone. Truncation policy: an example longer than `seq_len` keeps its
first `seq_len` tokens (counted in `DatasetStats.truncated`); one left with no loss token after
truncation is dropped (counted in `dropped`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from qwen_jax.train.data.examples import DatasetStats, Example


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
        """Number of rows."""
        return self.input_ids.shape[0]

    def select(self, rows: slice | np.ndarray) -> PackedBatch:
        """The given rows (a slice or indices, in that order)."""
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
        fill_row(batch, r, row)
    return batch


def fill_row(batch: PackedBatch, r: int, row: Sequence[Example]) -> None:
    """Lay the examples of `row` end to end into row `r` of `batch`, segment ids 1, 2, ..."""
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
    """The rows of `batches`, one after another."""
    return PackedBatch(
        *(np.concatenate([getattr(b, f.name) for b in batches]) for f in dataclasses.fields(PackedBatch))
    )
