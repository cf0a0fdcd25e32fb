"""Checkpoint sources: a local directory or GGUF file, or a Hugging Face Hub id downloaded to the local cache."""

from __future__ import annotations

import os
import re

import huggingface_hub

from qwen_jax.checkpoints.gguf import is_gguf_file
from qwen_jax.checkpoints.hf import INDEX_FILE
from qwen_jax.checkpoints.outdir import SIDE_FILES
from qwen_jax.errors import CheckpointError

# Only safetensors and small JSON/tokenizer files are ever downloaded (never pickles); GPTQ
# checkpoints may keep their settings in quantize_config.json.
HUB_PATTERNS = ("*.safetensors", INDEX_FILE, "config.json", "quantize_config.json", *SIDE_FILES)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_GGUF = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)/(?P<file>[\w./-]+\.gguf)")


def resolve_source(src: str | os.PathLike) -> str:
    """A local checkpoint for `src`: itself (a directory or GGUF file), a Hub snapshot for an
    `org/name` id, or the downloaded file for `org/name/file.gguf`."""
    src = os.fspath(src)
    if os.path.isdir(src) or is_gguf_file(src):
        return src
    if os.path.exists(src):
        raise CheckpointError(f"{src}: not a checkpoint directory or GGUF file")
    gguf = _HUB_GGUF.fullmatch(src)
    if not gguf and not _HUB_ID.fullmatch(src):
        raise CheckpointError(f"{src}: checkpoint directory not found")
    try:
        if gguf:
            return huggingface_hub.hf_hub_download(gguf.group("repo"), gguf.group("file"))
        return huggingface_hub.snapshot_download(src, allow_patterns=list(HUB_PATTERNS))
    except (OSError, ValueError) as e:  # hub errors (not found, offline, network) subclass these
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{src}: not a local directory, and not downloadable from the Hub ({reason})") from None
