"""What both conversion directions share: atomic output directories, side files, dtypes, write errors."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Iterator

import ml_dtypes
import numpy as np

from qwen_jax.hub import SIDE_FILES
from qwen_jax.safetensors_io import CheckpointError

DTYPE_CHOICES = ("auto", "bfloat16", "float32", "float16")
_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}

# Files copied alongside the weights in both directions (and fetched from the Hub).
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


class ConversionError(CheckpointError):
    """A conversion cannot proceed or its output cannot be written (reported as one line, exit 2)."""


def dtype_name(dtype: np.dtype) -> str:
    return np.dtype(dtype).name


def resolve_dtype(requested: str | None, stored: set[np.dtype]) -> np.dtype:
    """The output dtype: as requested, or for 'auto' the input's own float dtype.

    'auto' with mixed input dtypes widens to float32, which holds every bfloat16/float16 value exactly.
    """
    requested = requested or "auto"
    if requested not in DTYPE_CHOICES:
        raise ConversionError(f"unsupported dtype {requested!r}; choose from {', '.join(DTYPE_CHOICES)}")
    if requested != "auto":
        return _DTYPES[requested]
    floats = {np.dtype(d) for d in stored}
    if len(floats) == 1 and dtype_name(next(iter(floats))) in _DTYPES:
        return next(iter(floats))
    return _DTYPES["float32"]


def with_dtype(config_json: dict[str, Any], dtype: np.dtype) -> dict[str, Any]:
    """config.json contents announcing the stored dtype (transformers 4 writes `torch_dtype`, 5 writes `dtype`)."""
    out = dict(config_json)
    keys = [key for key in ("torch_dtype", "dtype") if key in out] or ["torch_dtype"]
    for key in keys:
        out[key] = dtype_name(dtype)
    return out


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


def write_error(out: str, error: BaseException) -> ConversionError:
    """A one-line ConversionError for a failed write (OSError, or tensorstore's ValueError)."""
    if isinstance(error, OSError):
        reason = error.strerror or str(error)
    else:
        match = _OS_ERROR_CODE.search(str(error))
        reason = os.strerror(int(match.group(1))) if match else (str(error).strip().splitlines() or ["?"])[0]
    return ConversionError(f"{out}: cannot write the output ({reason})")


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, force: bool, protect: tuple[str, ...] = ()) -> Iterator[str]:
    """Yield a fresh sibling directory of `out` that replaces `out` only if the block succeeds.

    An existing `out` is refused unless `force`; on any failure the sibling is removed, so `out`
    is either complete or untouched. `protect` lists paths (the input) that `out` must not be.
    """
    out = os.path.abspath(os.fspath(out))
    if any(os.path.realpath(out) == os.path.realpath(p) for p in protect):
        raise ConversionError(f"{out}: output would overwrite the input")
    if os.path.lexists(out) and not force:
        raise ConversionError(f"{out}: already exists (pass --force to replace it)")
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
