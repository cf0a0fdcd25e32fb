"""Where training examples come from, and how their columns map onto the three example forms.

`open_source(spec, split)` accepts the data the way users keep it:

- a JSONL file (one JSON object per line; errors name `file:line`);
- a Parquet file, or a directory of `*.parquet` files (read in name order);
- a directory written by HF `datasets` (`Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
  `split` picks the split of a DatasetDict);
- a Hugging Face Hub dataset id (`tatsu-lab/alpaca`), loaded with `datasets.load_dataset(id, split=split)`.

Every source yields `(location, record)` pairs in one fixed order, and can yield just the
contiguous part `shard` of `num_shards` of them: concatenating the parts in shard order gives the
whole sequence, whatever `num_shards` is, so each process of a run can tokenize its own part.
Records are dicts; `ColumnMapping.canonical` turns one into the `messages` / `prompt`+`completion`
/ `text` form that `examples.Tokenization` reads. Tables are read in batches and never loaded whole.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from collections.abc import Iterator
from typing import Any, Protocol

from qwen_jax.errors import DataError
from qwen_jax.extras import require

FORMATS = ("auto", "messages", "prompt-completion", "text")
_TABLE_BATCH = 1024
# Local-looking paths never fall through to the Hub: a typo in `data/train.jsonl` is "not found".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".csv", ".txt")


class Source(Protocol):
    """Records in one fixed order, whole or in contiguous shards (see the module docstring)."""

    name: str

    def identity(self) -> dict[str, Any]:
        """What identifies the content (files with sizes and modification times, or a fingerprint)."""

    def records(self, shard: int = 0, num_shards: int = 1) -> Iterator[tuple[str, Any]]:
        """`(location, record)` of shard `shard`; a record that cannot be parsed is a ValueError instance."""


# --------------------------------------------------------------------------- column mapping
@dataclasses.dataclass(frozen=True)
class ColumnMapping:
    """Which columns hold what. `format` 'auto' picks per record by the columns it has.

    `prompt` may name several columns: their non-empty values are joined by a blank line
    (alpaca: `prompt=("instruction", "input")`, `completion="output"`).
    """

    format: str = "auto"
    messages: str = "messages"
    tools: str = "tools"
    prompt: tuple[str, ...] = ("prompt",)
    completion: str = "completion"
    text: str = "text"

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"data format {self.format!r} is not one of {', '.join(FORMATS)}")

    def canonical(self, record: Any) -> dict[str, Any]:
        """The record as `{"messages", "tools"}`, `{"prompt", "completion"}` or `{"text"}`; ValueError if unusable."""
        if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        form = self.format if self.format != "auto" else self._detect(record)
        if form == "messages":
            if self.messages not in record:
                raise ValueError(f"no {self.messages!r} column")
            return {"messages": record[self.messages], "tools": record.get(self.tools)}
        if form == "prompt-completion":
            return {"prompt": self._prompt(record), "completion": record.get(self.completion)}
        if self.text not in record:
            raise ValueError(f"no {self.text!r} column")
        return {"text": record[self.text]}

    def _detect(self, record: dict) -> str:
        if self.messages in record:
            return "messages"
        if self.completion in record or any(name in record for name in self.prompt):
            return "prompt-completion"
        if self.text in record:
            return "text"
        raise ValueError(
            f"expected a {self.messages!r}, {'/'.join(self.prompt)!r}+{self.completion!r} or "
            f"{self.text!r} field, got keys {sorted(record)}"
        )

    def _prompt(self, record: dict) -> Any:
        if len(self.prompt) == 1:
            return record.get(self.prompt[0])
        values = [record.get(name) for name in self.prompt]
        if any(v is not None and not isinstance(v, str) for v in values):
            raise ValueError(f"prompt columns {', '.join(self.prompt)} must hold strings")
        return "\n\n".join(v for v in values if v)


# --------------------------------------------------------------------------- sources
def _shard_range(total: int, shard: int, num_shards: int) -> tuple[int, int]:
    return total * shard // num_shards, total * (shard + 1) // num_shards


def _file_identity(paths: list[str]) -> list[list]:
    return [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in paths]


class JsonlSource:
    """A JSONL file. A line belongs to the shard holding its first byte (shards are byte ranges),
    so a process reads only its part of the file after counting the newlines before it."""

    def __init__(self, path: str):
        self.path = self.name = path

    def identity(self) -> dict[str, Any]:
        """The file with its size and modification time."""
        return {"jsonl": _file_identity([self.path])}

    def records(self, shard: int = 0, num_shards: int = 1) -> Iterator[tuple[str, Any]]:
        """`("FILE:LINE", parsed JSON or a ValueError)` of the non-blank lines of the shard."""
        start, stop = _shard_range(os.path.getsize(self.path), shard, num_shards)
        with open(self.path, "rb") as f:
            if start > 0:
                f.seek(start - 1)
                if f.read(1) != b"\n":
                    f.readline()  # the rest of a line that began in the previous shard
            line_number = _count_newlines(self.path, f.tell()) + 1
            while f.tell() < stop:
                line = f.readline()
                if not line:
                    break
                if line.strip():
                    yield f"{self.path}:{line_number}", _parse_json_line(line)
                line_number += 1


def _count_newlines(path: str, end: int) -> int:
    count, chunk = 0, 1 << 23
    with open(path, "rb") as f:
        while f.tell() < end:
            count += f.read(min(chunk, end - f.tell())).count(b"\n")
    return count


def _parse_json_line(line: bytes) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return ValueError(f"invalid JSON ({e.msg})")
    except UnicodeDecodeError:
        return ValueError("invalid JSON (not UTF-8 text)")


class ParquetSource:
    """One Parquet file or a directory of them; read one row group batch at a time."""

    def __init__(self, path: str):
        pq = require("pyarrow.parquet", extra="train", feature="reading Parquet data")
        self.name = path
        self.files = sorted(glob.glob(os.path.join(path, "*.parquet"))) if os.path.isdir(path) else [path]
        try:
            self._files = [pq.ParquetFile(f) for f in self.files]
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged file
            raise DataError(f"{path}: unreadable Parquet ({e})") from None

    def identity(self) -> dict[str, Any]:
        """The files with their sizes and modification times."""
        return {"parquet": _file_identity(self.files)}

    def records(self, shard: int = 0, num_shards: int = 1) -> Iterator[tuple[str, Any]]:
        """`("FILE: row N", row dict)` of the shard's rows, reading only the row groups it overlaps."""
        total = sum(f.metadata.num_rows for f in self._files)
        start, stop = _shard_range(total, shard, num_shards)
        file_start = 0  # global index of the current file's first row
        for path, parquet in zip(self.files, self._files):
            group_start = file_start
            for group in range(parquet.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                if group_start + rows > start and group_start < stop:  # the group overlaps the shard
                    index = group_start
                    for batch in parquet.iter_batches(batch_size=_TABLE_BATCH, row_groups=[group]):
                        for record in batch.to_pylist():
                            if start <= index < stop:
                                yield f"{path}: row {index - file_start}", record
                            index += 1
                group_start += rows
            file_start = group_start


class DatasetsSource:
    """An HF `datasets.Dataset` (memory-mapped Arrow): a `save_to_disk` directory or a Hub dataset."""

    def __init__(self, name: str, dataset, identity: dict[str, Any]):
        self.name, self.dataset, self._identity = name, dataset, identity

    def identity(self) -> dict[str, Any]:
        """The directory's files, or the Hub dataset's id, split and fingerprint."""
        return self._identity

    def records(self, shard: int = 0, num_shards: int = 1) -> Iterator[tuple[str, Any]]:
        """`("NAME: row N", row dict)` of the shard's rows, a batch of rows at a time."""
        start, stop = _shard_range(len(self.dataset), shard, num_shards)
        for first in range(start, stop, _TABLE_BATCH):
            columns = self.dataset[first : min(first + _TABLE_BATCH, stop)]
            for i, values in enumerate(zip(*columns.values()), start=first):
                yield f"{self.name}: row {i}", dict(zip(columns, values))


def _datasets_dir(path: str, split: str) -> DatasetsSource:
    datasets = require("datasets", extra="train", feature="reading a `datasets` directory")

    try:
        loaded = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(f"{path}: unreadable datasets directory ({e})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r} (splits: {', '.join(loaded)}); choose one with --data-split")
        loaded = loaded[split]
    files = sorted(glob.glob(os.path.join(path, "**", "*"), recursive=True))
    return DatasetsSource(
        path, loaded, {"datasets_dir": _file_identity([f for f in files if os.path.isfile(f)]), "split": split}
    )


def _hub_dataset(repo_id: str, split: str) -> DatasetsSource:
    datasets = require("datasets", extra="train", feature="reading a Hugging Face Hub dataset")

    try:
        dataset = datasets.load_dataset(repo_id, split=split)
    except Exception as e:  # not found, offline, unknown split: datasets raises many kinds
        raise DataError(
            f"{repo_id}: could not load it as a Hugging Face Hub dataset, split {split!r} "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
        ) from None
    # The fingerprint changes with the dataset's files (datasets' own cache key).
    return DatasetsSource(
        f"{repo_id}[{split}]", dataset, {"hub": repo_id, "split": split, "fingerprint": dataset._fingerprint}
    )


def open_source(spec: str, split: str = "train") -> Source:
    """The source `spec` names (see the module docstring); DataError if there is none."""
    if os.path.isfile(spec):
        if spec.endswith(".parquet"):
            return ParquetSource(spec)
        return JsonlSource(spec)
    if os.path.isdir(spec):
        if any(
            os.path.exists(os.path.join(spec, marker))
            for marker in ("dataset_info.json", "state.json", "dataset_dict.json")
        ):
            return _datasets_dir(spec, split)
        if glob.glob(os.path.join(spec, "*.parquet")):
            return ParquetSource(spec)
        raise DataError(
            f"{spec}: a directory, but neither a `datasets` save_to_disk directory nor one of *.parquet files"
        )
    if spec.startswith((".", "/", "~")) or spec.endswith(_LOCAL_SUFFIXES) or not _HUB_ID.match(spec):
        raise DataError(f"{spec}: data file not found")
    return _hub_dataset(spec, split)
