"""What both conversion directions share: the output dtype (`--dtype`)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from qwen_jax.errors import ConversionError

DTYPE_CHOICES = ("auto", "bfloat16", "float32", "float16")
_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}


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
