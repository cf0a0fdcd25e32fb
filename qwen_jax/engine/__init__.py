"""Continuous-batching generation: `Engine` (see `qwen_jax.engine.core`), and the `qwen-jax serve` backend."""

from qwen_jax.engine.core import DEFAULT_MAX_LEN, Engine, EngineStats
from qwen_jax.engine.requests import Completion, Delta, RequestHandle, TokenLogprob
from qwen_jax.errors import EngineClosedError, EngineError, QueueFullError

__all__ = [
    "DEFAULT_MAX_LEN",
    "Engine",
    "EngineStats",
    "Completion",
    "Delta",
    "EngineClosedError",
    "EngineError",
    "QueueFullError",
    "RequestHandle",
    "TokenLogprob",
]
