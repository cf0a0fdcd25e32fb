"""GRPO prompts: records -> prompt token ids and reward columns, in the token cache -> batches of prompts.

A record holds a prompt (`{"prompt": text or chat messages, ...}`, `--prompt-column` renames it);
every other column is kept for the reward functions, whatever JSON value it holds. The prompt is
tokenized as the rollouts feed it to the engine: text as it is, messages through the chat template
with the assistant's generation prompt.

Prompts go through the token cache (`token_cache.py`) like SFT and DPO data: tokenized once,
by every process its own part, under a key that also holds the prompt token limit
(`seq_len - max_new_tokens`), and reused by reruns, `--resume` and the other processes. Each
cached example is the prompt's token ids (no loss mask: GRPO learns from completions), and its
record, kept beside the tokens as JSON text, holds the prompt itself (conversational prompts keep
their messages, which the rewards receive) and the other columns.

Batches (`PromptLoader`): `batch_size` prompts per step, shuffled per epoch with the run's seed
(the last partial batch is dropped), resumable like the SFT loader, independent of the number
of processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from qwen_jax.errors import ConfigError, DataError
from qwen_jax.train import multihost
from qwen_jax.train.config import TrainConfig
from qwen_jax.train.data import sources, token_cache
from qwen_jax.train.data.examples import DatasetStats, Example, invalid_text_field
from qwen_jax.train.data.loader import BatchCursor

Prompt = str | Sequence[Mapping[str, Any]]
"""A GRPO prompt: text (used as it is) or chat messages (rendered with the chat template)."""


class PromptTokenizer(Protocol):
    """What tokenizing prompts needs of a tokenizer (`qwen_jax.Tokenizer` has it)."""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        ...

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """The chat rendered with the checkpoint's template."""
        ...


def encode_prompt(tokenizer: PromptTokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: text as it is, messages through the chat template with the generation
    prompt. ValueError if it is neither, or the template rejects the messages."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
        try:
            text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)
        except Exception as e:  # no template, or one that rejects these messages: the data's problem
            raise ValueError(f"cannot apply the chat template to the prompt messages: {e}") from None
        return tokenizer.encode(text)
    raise ValueError(f"a GRPO prompt must be text or a list of chat messages, got {type(prompt).__name__}")


@dataclasses.dataclass(frozen=True)
class PromptColumns:
    """Which column of a GRPO record holds the prompt (the others go to the reward functions)."""

    prompt: str = "prompt"

    def canonical(self, record: Any) -> dict[str, Any]:
        """`{"prompt", "columns": the other columns}`; ValueError when the record has no prompt."""
        if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        if record.get(self.prompt) is None:
            raise ValueError(f"no {self.prompt!r} column (the GRPO prompt)")
        return {"prompt": record[self.prompt], "columns": {k: v for k, v in record.items() if k != self.prompt}}


def _json_value(value: Any) -> Any:
    """JSON's form of the values tables hold beside Python's own (numpy scalars and arrays)."""
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"a {type(value).__name__} value is not JSON data")


class PromptTokenization:
    """Canonical GRPO records -> one `Example` each: the prompt's token ids, the record as JSON text.

    max_prompt_tokens: the longest prompt that leaves room for the completion (`seq_len -
    max_new_tokens`); a longer one is a bad record."""

    def __init__(self, tokenizer: PromptTokenizer, *, seq_len: int, max_new_tokens: int):
        self.tokenizer, self.seq_len, self.max_new_tokens = tokenizer, seq_len, max_new_tokens
        self.max_prompt_tokens = seq_len - max_new_tokens

    def examples(self, record: dict[str, Any]) -> tuple[Example]:
        """The record's prompt as an example; ValueError naming what is wrong."""
        field = invalid_text_field(record["prompt"], "the prompt") or invalid_text_field(record["columns"], "")
        if field is not None:  # JSON text cannot hold it, and no tokenizer encodes it
            raise ValueError(f"{field} is not valid Unicode text (it holds a lone surrogate such as \\ud800)")
        ids = encode_prompt(self.tokenizer, record["prompt"])
        if len(ids) > self.max_prompt_tokens:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; with max_new_tokens {self.max_new_tokens} at most "
                f"{self.max_prompt_tokens} fit seq_len {self.seq_len}"
            )
        try:
            text = json.dumps(record, default=_json_value)
        except (TypeError, ValueError):
            for name, value in record["columns"].items():  # which column it is
                try:
                    json.dumps(value, default=_json_value)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"column {name!r} cannot be kept for the reward functions ({e})") from None
            raise
        return (Example(np.asarray(ids, np.int32), np.zeros(len(ids), bool), record=text),)


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """A GRPO record: its prompt, the prompt's token ids, and the other columns."""

    prompt: Any
    prompt_ids: list[int]
    columns: dict[str, Any]


class PromptLoader(BatchCursor):
    """Batches of `batch_size` prompts of a token cache, shuffled per epoch with `seed` (the last
    partial batch is dropped); resumable like the SFT loader (`advance`, `position`, `restore`).

    `columns`: the names of the columns besides the prompt, over all records."""

    def __init__(self, store: token_cache.TokenStore, batch_size: int, seed: int, *, shuffle: bool = True):
        if len(store) < batch_size:
            raise DataError(f"{len(store)} prompts are fewer than batch_size {batch_size}")
        self.store, self.batch_size, self.seed, self.shuffle = store, batch_size, seed, shuffle
        self.epoch, self.index = 0, 0
        names: dict[str, None] = {}  # ordered, as the records first name them
        for index in range(len(store)):
            names.update(dict.fromkeys(store.record(index)["columns"]))
        self.columns = tuple(names)

    def __len__(self) -> int:
        return len(self.store)

    def record(self, index: int) -> PromptRecord:
        """Prompt `index` of the data, in data order."""
        record = self.store.record(index)
        prompt_ids = self.store.example(index).tokens.tolist()
        return PromptRecord(record["prompt"], prompt_ids, record["columns"])

    def records(self) -> list[PromptRecord]:
        """Every prompt, in data order."""
        return [self.record(i) for i in range(len(self.store))]

    def batches_in_epoch(self, epoch: int) -> int:
        """Whole batches of `batch_size` prompts in an epoch."""
        return len(self.store) // self.batch_size

    def batch(self, epoch: int, index: int) -> list[PromptRecord]:
        """Batch `index` of `epoch`."""
        order = np.arange(len(self.store))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.store))
        return [self.record(int(i)) for i in order[index * self.batch_size : (index + 1) * self.batch_size]]


def open_prompts(
    spec: str,
    config: TrainConfig,
    tokenizer: PromptTokenizer,
    tokenizer_dir: str,
    *,
    batch_size: int,
    shuffle: bool,
    log: Callable[[str], None],
) -> tuple[PromptLoader, DatasetStats]:
    """Open the data source `spec` names, tokenize its prompts (or reuse OUT/data_cache), and load
    batches of `batch_size` prompts. Call on every process of a run."""
    with multihost.all_or_none(f"opening {spec}"):
        if len(config.column_mapping.prompt) != 1:
            raise ConfigError(f"GRPO reads one prompt column, got prompt_column {config.prompt_column!r}")
        source = sources.open_source(spec, config.data_split)
        tokenization = PromptTokenization(tokenizer, seq_len=config.seq_len, max_new_tokens=config.max_new_tokens)
    store, stats = token_cache.load(
        source,
        tokenization,
        PromptColumns(config.column_mapping.prompt[0]),
        os.path.join(config.out, "data_cache"),
        tokenizer_dir=tokenizer_dir,
        skip_bad_lines=config.skip_bad_lines,
        settings={"grpo_max_prompt_tokens": tokenization.max_prompt_tokens},
        progress=config.progress,
        log=log,
    )
    with multihost.all_or_none(f"batching {spec}"):
        try:
            loader = PromptLoader(store, batch_size, config.seed, shuffle=shuffle)
        except DataError as e:
            raise DataError(f"{spec}: {e}") from None
    return loader, stats
