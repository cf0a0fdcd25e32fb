"""A strict, lazy safetensors reader (memory-mapped, one tensor at a time).

Validates the header up front so that a corrupted or truncated file is reported with its name
before any tensor is read. Never unpickles anything.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np

from qwen_jax.errors import CheckpointError

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """Header parsed and validated on open; `get(name)` memory-maps one tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes)")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > min(_MAX_HEADER, size - 8):
                    raise CheckpointError(f"{self.path}: corrupted or truncated safetensors header")
                raw = f.read(header_len)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror or e})") from None
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{self.path}: corrupted safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupted safetensors header")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_len
        data_len = size - self.data_start
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: corrupted header entry for tensor {name!r}") from None
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or begin < 0:
                raise CheckpointError(f"{self.path}: tensor {name!r} has inconsistent size in the header")
            if end > data_len:
                raise CheckpointError(
                    f"{self.path}: truncated: tensor {name!r} needs {end} data bytes, file has {data_len}"
                )
            self.entries[name] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.entries[name][0]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped array (no copy until used)."""
        dtype, shape, begin, end = self.entries[name]
        if end == begin:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_start + begin, shape=shape)


def write_safetensors(
    path: str | os.PathLike, tensors: Iterator[tuple[str, np.ndarray]] | dict, metadata: dict[str, str] | None = None
) -> None:
    """Write tensors (name -> array), streaming them to disk one at a time.

    The header needs every shape and dtype first, so `tensors` may be a dict or a list of
    (name, array) pairs whose arrays are lazily materialised (e.g. memmaps).
    """
    items = list(tensors.items() if isinstance(tensors, dict) else tensors)
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, array in items:
        dtype = np.dtype(array.dtype)
        if dtype not in DTYPE_NAMES:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {dtype}")
        nbytes = int(np.prod(array.shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, array in items:
            f.write(np.ascontiguousarray(array).tobytes())
