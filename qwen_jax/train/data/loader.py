"""Deterministic, resumable batches: which packed rows make up batch `index` of epoch `epoch`.

Order and resumption: epoch `e` uses the permutation `numpy.random.default_rng([seed, e])`;
`DataLoader.position` (epoch, batch index) is saved with every checkpoint, so a resumed run
continues with exactly the batches an uninterrupted run would have seen. The batches depend on
the data, `seq_len`, `batch_size` and the seed only: not on the number of processes or devices,
each of which builds just the rows it holds (`DataLoader.batch(..., rows=)`).

`open_loader` is the whole pipeline a run uses: a data source, tokenized once into the token
cache, packed into the loader's batches.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from qwen_jax.errors import DataError
from qwen_jax.train import multihost
from qwen_jax.train.config import TrainConfig
from qwen_jax.train.data import sources, token_cache
from qwen_jax.train.data.examples import DatasetStats, Example, Tokenization
from qwen_jax.train.data.packing import PackedBatch, empty_rows, fill_row


class ExampleStore(Protocol):
    """Random access to tokenized examples (`token_cache.TokenStore` on disk, `InMemoryStore`)."""

    lengths: np.ndarray  # int64 [examples]
    first_target: np.ndarray  # int32 [examples]: first position >= 1 whose token is learned, -1 if none

    def __len__(self) -> int: ...

    def example(self, index: int, max_tokens: int | None = None) -> Example:
        """Example `index`, cut to its first `max_tokens` tokens if given."""
        ...


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
        """Example `index`, cut to its first `max_tokens` tokens if given."""
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
        """Rows that hold examples (the rest, up to `rows`, are padding)."""
        return len(self.row_starts) - 1


class BatchCursor:
    """The position of a loader that goes through epochs of `batches_in_epoch(epoch)` batches:
    (epoch, batch index), advanced one batch at a time and saved with checkpoints."""

    epoch: int = 0
    index: int = 0

    def batches_in_epoch(self, epoch: int) -> int:
        raise NotImplementedError

    def advance(self) -> tuple[int, int]:
        """(epoch, index) of the next batch; moves the position past it."""
        if self.index >= self.batches_in_epoch(self.epoch):
            self.epoch, self.index = self.epoch + 1, 0
        position = (self.epoch, self.index)
        self.index += 1
        return position

    @property
    def position(self) -> dict[str, int]:
        """Where the next batch comes from; save it with a checkpoint."""
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, position: dict[str, int]) -> None:
        """Continue from a saved `position`."""
        self.epoch, self.index = int(position["epoch"]), int(position["index"])


class DataLoader(BatchCursor):
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
            raise DataError(f"no example has a target token within seq_len {seq_len}")
        self.truncated = int(np.count_nonzero(self.store.lengths > seq_len))
        self.dropped = len(self.store) - len(self.kept)
        self.epoch = 0
        self.index = 0
        self._plan: tuple[int, EpochPlan] | None = None

    def plan(self, epoch: int) -> EpochPlan:
        """The packing plan of `epoch` (computed once per epoch, greedily in the epoch's order)."""
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
        """Batches of `batch_rows` rows in `epoch` (the last one padded)."""
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
                fill_row(batch, r, [self.store.example(int(i), self.seq_len) for i in members])
        return batch

    def batch_tokens(self, epoch: int, index: int) -> int:
        """Tokens (not padding) in a whole batch, from the plan alone."""
        plan = self.plan(epoch)
        first, last = (min(i * self.batch_rows, plan.real_rows) for i in (index, index + 1))
        members = plan.order[plan.row_starts[first] : plan.row_starts[last]]
        return int(np.minimum(self.store.lengths[members], self.seq_len).sum())

    def __iter__(self):
        return self

    def __next__(self) -> PackedBatch:
        return self.batch(*self.advance())


def open_loader(
    spec: str,
    config: TrainConfig,
    tokenization: Tokenization,
    tokenizer_dir: str,
    *,
    shuffle: bool,
    log: Callable[[str], None],
) -> tuple[DataLoader, DatasetStats]:
    """Open the data source `spec` names, tokenize it (or reuse OUT/data_cache), and load packed
    batches of `config.batch_size` rows from it. Call on every process of a run."""
    with multihost.all_or_none(f"opening {spec}"):
        source = sources.open_source(spec, config.data_split)
    store, stats = token_cache.load(
        source,
        tokenization,
        config.column_mapping,
        os.path.join(config.out, "data_cache"),
        tokenizer_dir=tokenizer_dir,
        skip_bad_lines=config.skip_bad_lines,
        progress=config.progress,
        log=log,
    )
    with multihost.all_or_none(f"packing {spec}"):
        try:
            loader = DataLoader(store, config.seq_len, config.batch_size, seed=config.seed, shuffle=shuffle)
        except DataError as e:
            raise DataError(f"{spec}: {e}") from None
    return loader, stats
