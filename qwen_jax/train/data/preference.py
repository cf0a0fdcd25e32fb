"""Preference pairs for DPO: records -> (chosen, rejected) token sequences -> resumable batches.

A record holds a prompt and two completions, in one of TRL's three forms:

- explicit prompt, strings: `{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}`;
- conversational: `{"prompt": [messages], "chosen": [assistant message(s)], "rejected": [...]}`
  (an optional `tools` column is passed to the chat template);
- implicit prompt: `{"chosen": [...], "rejected": [...]}` without `prompt`, the two sharing a
  prefix (whole messages of conversations, or the characters of strings) that becomes the prompt.

Tokenized as TRL's `DPOTrainer` does: conversational records with the chat template (the prompt
with the generation prompt; prompt + completion as a whole conversation), strings as plain text
with the EOS token appended to each completion (unless it ends with it). The completion starts
where the tokenized prompt and the tokenized prompt + completion stop agreeing (TRL's
`common_prefix_length`), the earlier of the two completions deciding. Each pair becomes two
examples of the token cache (`token_cache.py`), chosen then rejected, each the prompt followed by
its completion with the loss mask on the completion only.

Batches (`PreferenceLoader`): `batch_size` pairs per step, one row of `seq_len` tokens per
sequence (right-padded; a longer sequence keeps its first `seq_len` tokens, as TRL's
`truncation_mode="keep_start"`; a pair whose prompt fills `seq_len` is dropped). Pair order is
seeded per epoch and resumable exactly like the SFT loader's, and independent of the number of
processes and devices.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from qwen_jax.errors import DataError
from qwen_jax.train import multihost
from qwen_jax.train.config import TrainConfig
from qwen_jax.train.data import sources, token_cache
from qwen_jax.train.data.examples import DatasetStats, Example
from qwen_jax.train.data.loader import BatchCursor


class PreferenceTokenizer(Protocol):
    """What tokenizing preference pairs needs of a tokenizer (`qwen_jax.Tokenizer` has it)."""

    eos_token_id: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        ...

    def id_to_token(self, token_id: int) -> str | None:
        """The token's string."""
        ...

    def apply_chat_template(
        self, messages, tools=None, add_generation_prompt: bool = True, tokenize: bool = False
    ) -> str | list[int]:
        """The chat rendered with the checkpoint's template (text when `tokenize` is False)."""
        ...


@dataclasses.dataclass(frozen=True)
class PreferenceColumns:
    """The columns of a preference record (TRL's names by default)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    tools: str = "tools"

    def canonical(self, record: Any) -> dict[str, Any]:
        """`{"prompt" (None: implicit), "chosen", "rejected", "tools"}`; ValueError naming a missing column."""
        if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        missing = [name for name in (self.chosen, self.rejected) if record.get(name) is None]
        if missing:
            raise ValueError(
                f"a preference pair needs {self.chosen!r} and {self.rejected!r}; no {' or '.join(map(repr, missing))} "
                f"in this record (keys {sorted(record)})"
            )
        return {
            "prompt": record.get(self.prompt),
            "chosen": record[self.chosen],
            "rejected": record[self.rejected],
            "tools": record.get(self.tools),
        }


def is_conversational(value: Any) -> bool:
    """A list of role/content messages (TRL's test: the first item is a dict with `role` and `content`)."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def extract_prompt(chosen: Sequence, rejected: Sequence) -> tuple[Sequence, Sequence, Sequence]:
    """(prompt, chosen, rejected) of an implicit-prompt pair: the longest shared prefix (messages of
    conversations, characters of strings, a trailing space left to the completions) is the prompt;
    TRL's `extract_prompt`."""
    index = 0
    for index in range(min(len(chosen), len(rejected))):
        if chosen[index] != rejected[index]:
            if chosen[index - 1] == " ":  # the space before the completion belongs to it
                index -= 1
            break
    return chosen[:index], chosen[index:], rejected[index:]


def common_prefix_length(ids: Sequence[int], other: Sequence[int]) -> int:
    """Number of leading tokens the two sequences share."""
    n = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        n += 1
    return n


class PreferenceTokenization:
    """Turns canonical preference records into (chosen, rejected) `Example`s (see the module docstring)."""

    def __init__(self, tokenizer: PreferenceTokenizer):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.eos_text = None if self.eos is None else tokenizer.id_to_token(self.eos)

    def examples(self, record: dict[str, Any]) -> tuple[Example, Example]:
        """The pair's chosen and rejected sequences; ValueError naming what is wrong."""
        prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
        if prompt is None:
            if type(chosen) is not type(rejected) or not isinstance(chosen, (str, list)):
                raise ValueError("'chosen' and 'rejected' must both be strings or both be lists of messages")
            prompt, chosen, rejected = extract_prompt(chosen, rejected)
        if is_conversational(prompt) or is_conversational(chosen):
            prompt_ids, chosen_ids, rejected_ids = self._conversation(prompt, chosen, rejected, record["tools"])
        else:
            for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
                if not isinstance(value, str):
                    raise ValueError(f"{name!r} must be a string like the others, got {type(value).__name__}")
            prompt_ids, chosen_ids, rejected_ids = self._text(prompt, chosen, rejected)
        start = min(common_prefix_length(prompt_ids, chosen_ids), common_prefix_length(prompt_ids, rejected_ids))
        return self._example(chosen_ids, start), self._example(rejected_ids, start)

    @staticmethod
    def _example(ids: list[int], completion_start: int) -> Example:
        mask = np.zeros(len(ids), bool)
        mask[completion_start:] = True
        return Example(np.asarray(ids, np.int32), mask)

    def _text(self, prompt: str, chosen: str, rejected: str) -> tuple[list[int], list[int], list[int]]:
        if self.eos_text is None:
            raise ValueError("the tokenizer has no EOS token to end completions with")
        encode = self.tokenizer.encode
        ends = [c if c.endswith(self.eos_text) else c + self.eos_text for c in (chosen, rejected)]
        return encode(prompt), encode(prompt + ends[0]), encode(prompt + ends[1])

    def _conversation(self, prompt: Any, chosen: Any, rejected: Any, tools: Any):
        for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in value
            ):
                raise ValueError(f"{name!r} must be a list of messages with a 'role' (the pair is conversational)")
            if name != "prompt" and not value:
                raise ValueError(f"{name!r} holds no message")
        if isinstance(tools, str):  # tables often keep the tool schemas as JSON text (TRL reads it too)
            try:
                tools = json.loads(tools)
            except json.JSONDecodeError as e:
                raise ValueError(f"'tools' is not valid JSON ({e.msg})") from None
        if tools is not None and not isinstance(tools, list):
            raise ValueError("'tools' must be a list")
        render = self.tokenizer.apply_chat_template
        encode = self.tokenizer.encode
        prompt_ids = encode(render(prompt, tools=tools, add_generation_prompt=True, tokenize=False))
        chosen_ids = encode(render(prompt + chosen, tools=tools, add_generation_prompt=False, tokenize=False))
        rejected_ids = encode(render(prompt + rejected, tools=tools, add_generation_prompt=False, tokenize=False))
        return prompt_ids, chosen_ids, rejected_ids


# --------------------------------------------------------------------------- batches
@dataclasses.dataclass(frozen=True)
class PreferenceBatch:
    """Preference pairs, one row per pair, all `[pairs, seq_len]`: the prompt followed by the chosen
    (`chosen_*`) or the rejected (`rejected_*`) completion, right-padded with token 0.

    `*_targets[p, t]` is the token after position t, `*_weights[p, t]` is 1 where that token is a
    completion token (its log-probability counts), else 0. A padding pair has zero weights.
    `ref_*_logps`: the reference's log-probability of each target (precomputed), or None.
    """

    chosen_ids: np.ndarray  # int32
    chosen_targets: np.ndarray  # int32
    chosen_weights: np.ndarray  # float32
    rejected_ids: np.ndarray
    rejected_targets: np.ndarray
    rejected_weights: np.ndarray
    ref_chosen_logps: np.ndarray | None = None  # float32
    ref_rejected_logps: np.ndarray | None = None

    @property
    def rows(self) -> int:
        """Number of pairs."""
        return self.chosen_ids.shape[0]

    def select(self, rows: slice | np.ndarray) -> PreferenceBatch:
        """The given pairs (a slice or indices, in that order)."""
        return PreferenceBatch(
            *(None if getattr(self, f.name) is None else getattr(self, f.name)[rows] for f in dataclasses.fields(self))
        )


class PreferenceLoader(BatchCursor):
    """Deterministic batches of `batch_pairs` preference pairs; `position` is (epoch, batch index).

    `store` holds the tokenized pairs as consecutive examples (chosen, rejected). Each epoch
    visits the kept pairs in the order `default_rng([seed, epoch])` draws (or in data order when
    `shuffle` is False); the last batch is padded with empty pairs. `reference` (optional, set by
    `set_reference`) gives the reference's per-token log-probabilities of every example.
    """

    def __init__(self, store, seq_len: int, batch_pairs: int, *, seed: int = 0, shuffle: bool = True):
        if len(store) % 2:
            raise DataError("a preference token cache must hold pairs of examples")
        self.store, self.seq_len, self.batch_rows = store, seq_len, batch_pairs
        self.seed, self.shuffle = seed, shuffle
        first = store.first_target.reshape(-1, 2)
        self.kept = np.flatnonzero(np.all((first > 0) & (first < seq_len), axis=1))
        if not len(self.kept):
            raise DataError(f"no preference pair has completion tokens within seq_len {seq_len}")
        lengths = store.lengths.reshape(-1, 2)
        self.truncated = int(np.count_nonzero(np.any(lengths > seq_len, axis=1)))
        self.dropped = len(first) - len(self.kept)
        self.reference: Callable[[int, int], np.ndarray] | None = None
        self.epoch = 0
        self.index = 0

    @property
    def pairs(self) -> int:
        """Pairs in the data (kept or not)."""
        return len(self.store) // 2

    def order(self, epoch: int) -> np.ndarray:
        """The kept pairs in `epoch`'s order."""
        if not self.shuffle:
            return self.kept
        return self.kept[np.random.default_rng([self.seed, epoch]).permutation(len(self.kept))]

    def batches_in_epoch(self, epoch: int) -> int:
        """Batches of `batch_rows` pairs in an epoch (the last one padded)."""
        return -(-len(self.kept) // self.batch_rows)

    def set_reference(self, reference: Callable[[int, int], np.ndarray]) -> None:
        """Batches carry precomputed reference log-probabilities: `reference(example, length)` gives
        the per-target log-probabilities of an example's first `length` positions."""
        self.reference = reference

    def pair_indices(self, epoch: int, index: int, rows: Sequence[int] | None = None) -> list[int | None]:
        """The pairs (None: padding) of the given rows of batch `index` of `epoch`."""
        order = self.order(epoch)
        rows = range(self.batch_rows) if rows is None else rows
        out = []
        for row in rows:
            position = index * self.batch_rows + int(row)
            out.append(int(order[position]) if position < len(order) else None)
        return out

    def batch(self, epoch: int, index: int, rows: Sequence[int] | None = None) -> PreferenceBatch:
        """Batch `index` of `epoch`, or only its rows `rows` (indices within the batch, in that order)."""
        pairs = self.pair_indices(epoch, index, rows)
        shape = (len(pairs), self.seq_len)
        fields: dict[str, np.ndarray | None] = {}
        for side, offset in (("chosen", 0), ("rejected", 1)):
            ids, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
            weights = np.zeros(shape, np.float32)
            ref = np.zeros(shape, np.float32) if self.reference is not None else None
            for r, pair in enumerate(pairs):
                if pair is None:
                    continue
                example = self.store.example(2 * pair + offset, self.seq_len)
                n = len(example.tokens)
                ids[r, :n] = example.tokens
                targets[r, : n - 1] = example.tokens[1:]
                weights[r, : n - 1] = example.loss_mask[1:]
                if ref is not None:
                    ref[r, : n - 1] = self.reference(2 * pair + offset, n - 1) * example.loss_mask[1:]
            fields.update({f"{side}_ids": ids, f"{side}_targets": targets, f"{side}_weights": weights})
            fields[f"ref_{side}_logps"] = ref
        return PreferenceBatch(**fields)

    def batch_tokens(self, epoch: int, index: int) -> int:
        """Tokens (not padding) in a whole batch: both sequences of each pair."""
        pairs = [p for p in self.pair_indices(epoch, index) if p is not None]
        examples = np.asarray([[2 * p, 2 * p + 1] for p in pairs], np.int64).reshape(-1)
        return int(np.minimum(self.store.lengths[examples], self.seq_len).sum())


def open_preference_loader(
    spec: str,
    config: TrainConfig,
    tokenization: PreferenceTokenization,
    tokenizer_dir: str,
    *,
    shuffle: bool,
    log: Callable[[str], None],
) -> tuple[PreferenceLoader, DatasetStats]:
    """Open the data source `spec` names, tokenize its pairs (or reuse OUT/data_cache), and load
    batches of `config.batch_size` pairs. Call on every process of a run."""
    with multihost.all_or_none(f"opening {spec}"):
        source = sources.open_source(spec, config.data_split)
    store, stats = token_cache.load(
        source,
        tokenization,
        PreferenceColumns(),
        os.path.join(config.out, "data_cache"),
        tokenizer_dir=tokenizer_dir,
        skip_bad_lines=config.skip_bad_lines,
        progress=config.progress,
        log=log,
    )
    stats = dataclasses.replace(stats, examples=stats.examples // 2)  # pairs
    with multihost.all_or_none(f"batching {spec}"):
        try:
            loader = PreferenceLoader(store, config.seq_len, config.batch_size, seed=config.seed, shuffle=shuffle)
        except DataError as e:
            raise DataError(f"{spec}: {e}") from None
    return loader, stats
