"""Every error qwen-jax raises on purpose, in one hierarchy.

    QwenJaxError
    ├── ConfigError              a config.json / preset / rope-scaling setting that cannot be used
    ├── CheckpointError          a checkpoint that cannot be read (missing, corrupted, wrong tensors)
    │   └── OutputError          an output that cannot be written (disk full, read-only, exists)
    │       └── ConversionError  a conversion (`qwen-jax convert` / `export-hf`) that cannot be done
    ├── QuantizationError        a quantization scheme or quantized tensor that cannot be used
    ├── GenerationError          a request that cannot be generated (prompt beyond the context, ...)
    │   ├── EngineError          ... refused by the engine, naming the request field at fault
    │   ├── QueueFullError       the engine's waiting queue is full: try again later
    │   └── EngineClosedError    the engine is shutting down or stopped
    ├── DataError                a training record or data source that cannot be read
    └── UsageError               an argument, option or environment that cannot work here
        ├── AttentionBackendError  an attention backend that cannot run on this platform / dtype
        ├── MeshError            a device mesh that cannot be built here (bad spec, too few devices)
        ├── LaunchError          a multi-process launch that cannot start
        └── MissingExtraError    a feature whose optional dependencies are not installed

Every message is one line naming the problem; the command line prints it as
`qwen-jax COMMAND: error: MESSAGE` and exits with status 2. The classes that describe bad
values also derive from `ValueError` (the engine's availability errors from `RuntimeError`,
`MissingExtraError` from `ImportError`), so code written against the built-in exceptions keeps working.
"""

from __future__ import annotations


class QwenJaxError(Exception):
    """Base class of every error qwen-jax raises on purpose (one-line message)."""


class ConfigError(QwenJaxError, ValueError):
    """A model configuration that qwen-jax cannot use (one-line message)."""


class CheckpointError(QwenJaxError, ValueError):
    """A checkpoint that cannot be read: missing, corrupted, or not what config.json describes."""


class OutputError(CheckpointError):
    """An output that cannot be written (disk full, read-only file system, existing directory)."""


class ConversionError(OutputError):
    """A checkpoint conversion that cannot be done (unsupported dtype, nothing to convert, ...)."""


class QuantizationError(QwenJaxError, ValueError):
    """A quantization scheme or quantized tensor that cannot be used (one-line message)."""


class GenerationError(QwenJaxError, ValueError):
    """A request that cannot be generated (empty prompt, prompt or output beyond the context, bad settings).

    `param`: the setting at fault, where one is (e.g. "temperature"; the server reports it in
    OpenAI's error envelope).
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class EngineError(GenerationError):
    """A request the engine cannot serve (bad parameters, prompt + max tokens beyond the context)."""


class QueueFullError(GenerationError, RuntimeError):
    """The engine's waiting queue is full (`max_queue`): try again later."""


class EngineClosedError(GenerationError, RuntimeError):
    """The engine is shutting down or stopped: it accepts no new requests."""


class DataError(QwenJaxError, ValueError):
    """A training record or data source that cannot be used (names the file and line or row)."""


class UsageError(QwenJaxError):
    """An argument, option or environment setting that cannot work (one line, exit status 2)."""


class AttentionBackendError(UsageError, ValueError):
    """An attention backend that cannot run here (platform, dtype or head size)."""


class MeshError(UsageError, ValueError):
    """A device mesh that cannot be built here (a malformed spec, sizes the devices cannot hold)."""


class LaunchError(UsageError):
    """A multi-process launch that cannot start (coordinator, process count or id missing or wrong)."""


class MissingExtraError(UsageError, ImportError):
    """A feature used without its optional dependencies; the message names the pip command."""
