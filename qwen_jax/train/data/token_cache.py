"""Tokenize a data source once, into memory-mapped files next to the run's output.

Layout of `OUT/data_cache/<key>/`::

    meta.json                       what was tokenized, counts, the part directories
    parts-of-<P>/<p>/tokens.bin     int32 token ids of part p, examples end to end
                     loss_mask.bin  uint8, 1 where the token is learned
                     offsets.npy    int64 [examples + 1] of the part
                     first_target.npy   int32: first position >= 1 whose token is learned (-1: none)
                     records.bin    (only when the examples carry records, GRPO's prompts) UTF-8 JSON
                                    text of each example's record, end to end
                     record_offsets.npy int64 [examples + 1] into records.bin

The key hashes the tokenizer files, the source's identity (files with sizes and modification
times, or the Hub dataset's fingerprint), the column mapping, `skip_bad_lines` and any other
settings the tokenization depends on: a rerun or a `--resume` with the same inputs reuses the
cache, and any change builds a new one. `meta.json` is written last, so a cache without it
(a preparation that was interrupted) is built again; so is one whose files do not match its
`meta.json` (truncated or missing files).

In a run of P processes each process tokenizes the contiguous part p of the source (see
`sources.Source.records`); the parts concatenated are the whole source in order, so the examples
(and therefore the batches) do not depend on P, and a cache built with P processes serves a run
with any other count. Training reads examples straight from the memory-mapped files: the data
never has to fit in memory, only a few bytes of bookkeeping per example.

Tools: HF `datasets` reads what it is best at (Parquet via pyarrow, `save_to_disk` directories,
the Hub), as memory-mapped Arrow. grain is not used: its per-process sharding splits examples
between processes, which would make the batches depend on the process count, while packing here
needs one global plan every process computes alike; with tokens cached, building a batch is a few
memory-mapped slices, so grain's worker processes would have nothing to overlap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from qwen_jax.errors import DataError
from qwen_jax.train import multihost
from qwen_jax.train.data.examples import DatasetStats, Example
from qwen_jax.train.data.sources import Source

CACHE_VERSION = 1


class RecordMapping(Protocol):
    """Maps a source record onto the canonical form a tokenization reads (a dataclass: its fields
    are part of the cache key); `sources.ColumnMapping` for SFT, `preference.PreferenceColumns`."""

    def canonical(self, record: Any) -> dict[str, Any]:
        """The record in canonical form; ValueError if it is unusable."""
        ...


class RecordTokenization(Protocol):
    """Tokenizes a canonical record into the examples it stores, in order (SFT: one; DPO: the
    chosen and the rejected sequence of a pair)."""

    def examples(self, record: dict[str, Any]) -> Sequence[Example]:
        """The record's examples; ValueError naming what is wrong."""
        ...


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
_FLUSH_TOKENS = 1 << 20


def tokenizer_digest(directory: str) -> str:
    """SHA-256 over the files that decide tokenization and the chat template."""
    digest = hashlib.sha256()
    extra = os.path.join(directory, "additional_chat_templates")
    extras = sorted(os.listdir(extra)) if os.path.isdir(extra) else []
    names = [*_TOKENIZER_FILES, *(os.path.join("additional_chat_templates", n) for n in extras)]
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            digest.update(name.encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def cache_key(
    tokenizer_dir: str,
    source: Source,
    mapping: RecordMapping,
    skip_bad_lines: bool,
    settings: dict[str, Any] | None = None,
) -> str:
    """The cache directory's name: a hash of everything that decides the tokens (see the module docstring).

    settings: what else the tokenization depends on (JSON values; GRPO: the prompt token limit)."""
    identity = {
        "version": CACHE_VERSION,
        "tokenizer": tokenizer_digest(tokenizer_dir),
        "source": source.identity(),
        "mapping": dataclasses.asdict(mapping),
        "skip_bad_lines": skip_bad_lines,
    }
    if settings is not None:  # absent for SFT and DPO, whose keys stay those of earlier caches
        identity["settings"] = settings
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


class TokenStore:
    """The tokenized examples of a cache directory, memory-mapped (the `loader.ExampleStore` interface)."""

    def __init__(self, directory: str):
        with open(os.path.join(directory, "meta.json"), encoding="utf-8") as f:
            self.meta = json.load(f)
        self.directory = directory
        self.has_records = bool(self.meta.get("records", False))
        self._tokens, self._masks, self._offsets = [], [], []
        self._records, self._record_offsets = [], []
        firsts = []
        for part in self.meta["parts"]:
            path = os.path.join(directory, part)
            offsets = np.load(os.path.join(path, "offsets.npy"))
            self._offsets.append(offsets)
            self._tokens.append(_memmap(os.path.join(path, "tokens.bin"), np.int32, offsets[-1]))
            self._masks.append(_memmap(os.path.join(path, "loss_mask.bin"), np.uint8, offsets[-1]))
            firsts.append(np.load(os.path.join(path, "first_target.npy")))
            if self.has_records and len(offsets) > 1:
                record_offsets = np.load(os.path.join(path, "record_offsets.npy"))
                self._record_offsets.append(record_offsets)
                self._records.append(_memmap(os.path.join(path, "records.bin"), np.uint8, record_offsets[-1]))
            else:  # a part without examples
                self._record_offsets.append(np.zeros(len(offsets), np.int64))
                self._records.append(np.zeros(0, np.uint8))
        counts = [len(o) - 1 for o in self._offsets]
        self._part_starts = np.cumsum([0, *counts])
        self.lengths = np.concatenate([np.diff(o) for o in self._offsets]) if counts else np.zeros(0, np.int64)
        self.first_target = np.concatenate(firsts) if firsts else np.zeros(0, np.int32)

    def __len__(self) -> int:
        return int(self._part_starts[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        part = int(np.searchsorted(self._part_starts, index, side="right")) - 1
        return part, int(index - self._part_starts[part])

    def example(self, index: int, max_tokens: int | None = None) -> Example:
        """Example `index`, cut to its first `max_tokens` tokens if given (read from the memory map)."""
        part, local = self._locate(index)
        start, stop = self._offsets[part][local], self._offsets[part][local + 1]
        if max_tokens is not None:
            stop = min(stop, start + max_tokens)
        return Example(np.asarray(self._tokens[part][start:stop]), self._masks[part][start:stop].astype(bool))

    def record(self, index: int) -> Any:
        """The parsed JSON record stored with example `index` (`Example.record`), None if it has none."""
        if not self.has_records:
            return None
        part, local = self._locate(index)
        start, stop = self._record_offsets[part][local], self._record_offsets[part][local + 1]
        if start == stop:
            return None
        try:
            return json.loads(bytes(self._records[part][start:stop]))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(
                f"the token cache {self.directory} is damaged (record {index}); delete it to tokenize again"
            ) from None


def _memmap(path: str, dtype, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(int(count),))


def first_target(loss_mask: np.ndarray) -> int:
    """The first position >= 1 whose token is learned, or -1 (position 0 is never a target)."""
    learned = np.flatnonzero(loss_mask[1:])
    return int(learned[0]) + 1 if len(learned) else -1


def _write_part(
    directory: str,
    source: Source,
    tokenization: RecordTokenization,
    mapping: RecordMapping,
    skip_bad_lines: bool,
    shard: int,
    num_shards: int,
    progress: bool,
) -> DatasetStats:
    """Tokenize shard `shard` of the source into `directory` (written under a temporary name, then renamed)."""
    temporary = directory + ".partial"
    try:
        return _write_part_into(
            temporary, directory, source, tokenization, mapping, skip_bad_lines, shard, num_shards, progress
        )
    except BaseException:
        # A failed preparation leaves no trace: its temporary part and the directories made for it.
        shutil.rmtree(temporary, ignore_errors=True)
        for parent in (os.path.dirname(directory), os.path.dirname(os.path.dirname(directory))):
            try:
                os.rmdir(parent)  # only when empty: another process's part or a complete cache stays
            except OSError:
                break
        raise


def _write_part_into(
    temporary: str,
    directory: str,
    source: Source,
    tokenization: RecordTokenization,
    mapping: RecordMapping,
    skip_bad_lines: bool,
    shard: int,
    num_shards: int,
    progress: bool,
) -> DatasetStats:
    stats = DatasetStats()
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    offsets, firsts, record_offsets = [0], [], [0]
    pending_tokens, pending_masks, pending_records = [], [], []
    with (
        open(os.path.join(temporary, "tokens.bin"), "wb") as tokens_file,
        open(os.path.join(temporary, "loss_mask.bin"), "wb") as mask_file,
        open(os.path.join(temporary, "records.bin"), "wb") as records_file,
    ):

        def flush():
            if pending_tokens:
                np.concatenate(pending_tokens).astype(np.int32).tofile(tokens_file)
                np.concatenate(pending_masks).astype(np.uint8).tofile(mask_file)
                records_file.write(b"".join(pending_records))
                pending_tokens.clear()
                pending_masks.clear()
                pending_records.clear()

        records = source.records(shard, num_shards)
        for location, record in tqdm(
            records, desc="tokenize", unit=" examples", disable=not progress, dynamic_ncols=True
        ):
            try:
                if isinstance(record, Exception):
                    raise record
                examples = tokenization.examples(mapping.canonical(record))
            except (ValueError, TypeError) as e:
                if not skip_bad_lines:
                    raise DataError(f"{location}: {e} (use --skip-bad-lines to skip such records)") from None
                stats.skipped_lines += 1
                continue
            for example in examples:
                pending_tokens.append(example.tokens)
                pending_masks.append(example.loss_mask)
                offsets.append(offsets[-1] + len(example.tokens))
                firsts.append(first_target(example.loss_mask))
                record = b"" if example.record is None else example.record.encode("utf-8")
                pending_records.append(record)
                record_offsets.append(record_offsets[-1] + len(record))
            if offsets[-1] - offsets[-1 - len(pending_tokens)] >= _FLUSH_TOKENS:
                flush()
        flush()
    np.save(os.path.join(temporary, "offsets.npy"), np.asarray(offsets, np.int64))
    np.save(os.path.join(temporary, "first_target.npy"), np.asarray(firsts, np.int32))
    if record_offsets[-1]:
        np.save(os.path.join(temporary, "record_offsets.npy"), np.asarray(record_offsets, np.int64))
    else:  # examples without records (SFT, DPO) keep the layout they always had
        os.remove(os.path.join(temporary, "records.bin"))
    stats.examples = len(firsts)
    with open(os.path.join(temporary, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(stats), f)
    shutil.rmtree(directory, ignore_errors=True)
    os.rename(temporary, directory)
    return stats


def load(
    source: Source,
    tokenization: RecordTokenization,
    mapping: RecordMapping,
    cache_root: str,
    *,
    tokenizer_dir: str,
    skip_bad_lines: bool = False,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[TokenStore, DatasetStats]:
    """The source's tokenized examples: from the cache when it holds them, else tokenized now
    (by every process, each its own part) and cached. Call on every process.

    settings: what else the tokenization depends on, part of the cache key (see `cache_key`).
    A cache whose files do not match its `meta.json` is removed and built again.

    Each step is local work followed by an agreement (`multihost.all_or_none`), so an error on one
    process (a bad record in its part) ends every process with the same error.
    """
    with multihost.all_or_none(f"looking up the token cache of {source.name}"):
        key = cache_key(tokenizer_dir, source, mapping, skip_bad_lines, settings)
        directory = os.path.join(os.path.abspath(cache_root), key)
        meta_path = os.path.join(directory, "meta.json")
        cached = False
        if multihost.is_primary() and os.path.exists(meta_path):
            problem = damage(directory)
            if problem is None:
                cached = True
            else:  # rebuilt like a cache that was never finished
                log(f"data: the token cache {directory} is damaged ({problem}); tokenizing again")
                os.remove(meta_path)
    if jax.process_count() > 1:  # every process follows the primary's view of the cache
        cached = bool(multihost_utils.broadcast_one_to_all(np.int32(cached)))
    if not cached:
        shard, num_shards = jax.process_index(), jax.process_count()
        parts = [f"parts-of-{num_shards}/{p}" for p in range(num_shards)]
        with multihost.all_or_none(f"tokenizing {source.name}"):
            _write_part(
                os.path.join(directory, parts[shard]),
                source,
                tokenization,
                mapping,
                skip_bad_lines,
                shard,
                num_shards,
                progress and multihost.is_primary(),
            )
        with multihost.all_or_none("writing the token cache"):
            if multihost.is_primary():
                _write_meta(directory, source, mapping, parts)
    with multihost.all_or_none(f"reading the token cache of {source.name}"):
        store = TokenStore(directory)
        if len(store) == 0:
            raise DataError(f"{source.name}: no usable examples")
    log(f"data: {'cached tokens' if cached else 'tokenized into'} {directory}")
    return store, DatasetStats(examples=store.meta["examples"], skipped_lines=store.meta["skipped_lines"])


def _write_meta(directory: str, source: Source, mapping: RecordMapping, parts: list[str]) -> None:
    """The cache's table of contents, written last (atomically): its presence means the cache is complete."""
    totals = DatasetStats()
    for part in parts:
        with open(os.path.join(directory, part, "stats.json"), encoding="utf-8") as f:
            for name, value in json.load(f).items():
                setattr(totals, name, getattr(totals, name) + value)
    meta = {
        "version": CACHE_VERSION,
        "source": source.name,
        "identity": source.identity(),
        "mapping": dataclasses.asdict(mapping),
        "parts": parts,
        "examples": totals.examples,
        "skipped_lines": totals.skipped_lines,
        "records": any(os.path.exists(os.path.join(directory, part, "records.bin")) for part in parts),
    }
    meta_path = os.path.join(directory, "meta.json")
    with open(meta_path + ".partial", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, default=str)
    os.replace(meta_path + ".partial", meta_path)


def damage(directory: str) -> str | None:
    """What is wrong with the cache in `directory` whose `meta.json` exists (a file missing, or
    shorter or longer than `meta.json` and the offsets say), or None when it is whole."""
    try:
        with open(os.path.join(directory, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        examples = 0
        for part in meta["parts"]:
            path = os.path.join(directory, part)
            offsets = np.load(os.path.join(path, "offsets.npy"))
            count = len(offsets) - 1
            examples += count
            sizes = {
                "tokens.bin": 4 * int(offsets[-1]),
                "loss_mask.bin": int(offsets[-1]),
                "first_target.npy": None,
            }
            if meta.get("records") and count:
                record_offsets = np.load(os.path.join(path, "record_offsets.npy"))
                if len(record_offsets) != len(offsets):
                    return f"{part}/record_offsets.npy holds {len(record_offsets) - 1} records, not {count}"
                sizes["records.bin"] = int(record_offsets[-1])
            for name, size in sizes.items():
                file = os.path.join(path, name)
                if size is None:
                    if len(np.load(file)) != count:
                        return f"{part}/{name} does not hold {count} entries"
                elif os.path.getsize(file) != size:
                    return f"{part}/{name} has {os.path.getsize(file)} bytes, not {size}"
        if examples != meta["examples"]:
            return f"its parts hold {examples} examples, meta.json says {meta['examples']}"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:  # missing or unreadable files
        return f"{type(e).__name__}: {e}"
    return None
