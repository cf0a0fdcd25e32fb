"""Checkpoint sources: a local directory, or a Hugging Face Hub id downloaded to the local cache."""

from __future__ import annotations

import os
import re

from qwen_jax.hf import INDEX_FILE
from qwen_jax.outdir import SIDE_FILES
from qwen_jax.safetensors_io import CheckpointError

# Only safetensors and small JSON/tokenizer files are ever downloaded (never pickles).
HUB_PATTERNS = ("*.safetensors", INDEX_FILE, "config.json", *SIDE_FILES)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_source(src: str | os.PathLike) -> str:
    """A local checkpoint directory for `src`: itself, or a Hub snapshot for an `org/name` id."""
    src = os.fspath(src)
    if os.path.isdir(src):
        return src
    if os.path.exists(src):
        raise CheckpointError(f"{src}: not a checkpoint directory")
    if not _HUB_ID.fullmatch(src):
        raise CheckpointError(f"{src}: checkpoint directory not found")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{src}: not a local directory; install huggingface_hub to download Hub ids") from None
    try:
        return snapshot_download(src, allow_patterns=list(HUB_PATTERNS))
    except (OSError, ValueError) as e:  # hub errors (not found, offline, network) subclass these
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{src}: not a local directory, and not downloadable from the Hub ({reason})") from None
