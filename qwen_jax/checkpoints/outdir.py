"""Output directories that appear complete or not at all, and the small files written beside weights."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from qwen_jax.errors import OutputError

# Files a checkpoint directory may carry besides its weights (copied along by converters and the
# trainer, fetched from the Hub).
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


def copy_side_files(src_dir: str, out_dir: str) -> list[str]:
    """Copy the tokenizer and generation files that exist in `src_dir`; return their names."""
    copied = []
    for name in SIDE_FILES:
        path = os.path.join(src_dir, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(out_dir, name))
            copied.append(name)
    return copied


def bytes_on_disk(directory: str | os.PathLike) -> int:
    """Total size of the files under `directory`."""
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(directory) for name in names)


def write_error(out: str, error: BaseException) -> OutputError:
    """A one-line OutputError for a failed write (OSError, or tensorstore's ValueError)."""
    return OutputError(f"{out}: cannot write the output ({write_failure_reason(error)})")


def write_failure_reason(error: BaseException) -> str:
    """Why a write failed, in a few words: the OS's message (e.g. "No space left on device"), also
    when tensorstore reports it inside a long ValueError as `os_error_code=28`."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    match = _OS_ERROR_CODE.search(str(error))
    return os.strerror(int(match.group(1))) if match else (str(error).strip().splitlines() or ["?"])[0]


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, force: bool, protect: tuple[str, ...] = ()) -> Iterator[str]:
    """Yield a fresh sibling directory of `out` that replaces `out` only if the block succeeds.

    An existing `out` is refused unless `force`; on any failure the sibling is removed, so `out`
    is either complete or untouched. `protect` lists paths (the input) that `out` must not be.
    """
    out = os.path.abspath(os.fspath(out))
    if any(os.path.realpath(out) == os.path.realpath(p) for p in protect):
        raise OutputError(f"{out}: output would overwrite the input")
    if os.path.lexists(out) and not force:
        raise OutputError(f"{out}: already exists (pass --force to replace it)")
    parent, name = os.path.split(out)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    except OSError as e:
        raise write_error(out, e) from None
    try:
        yield staging
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace(staging: str, out: str) -> None:
    """Move `staging` to `out`; an existing `out` is moved aside first and deleted only afterwards."""
    parent, name = os.path.split(out)
    old = None
    try:
        if os.path.lexists(out):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.replace(out, os.path.join(old, name))
        os.replace(staging, out)
    except OSError as e:
        if old is not None and not os.path.lexists(out) and os.path.lexists(os.path.join(old, name)):
            os.replace(os.path.join(old, name), out)  # put the previous output back
        raise write_error(out, e) from None
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def quiet_orbax_logging() -> Iterator[None]:
    """Silence Orbax's own error logging (tracebacks from its threads) while a CLI reports the one-line error."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
