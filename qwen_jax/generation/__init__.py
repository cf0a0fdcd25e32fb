"""Generation with a preallocated KV cache: `generate` / `stream` (text, `api`), `generate_ids` /
`stream_ids` (token ids, a static batch, `static`), the sampling options of every generation call
(`options`), the one sampler (`sampler`) and the one text assembler with stop strings (`text`)."""

from qwen_jax.generation.api import generate, stream
from qwen_jax.generation.options import SamplingKwargs, SamplingOptions
from qwen_jax.generation.static import Generation, Timing, generate_ids, stream_ids

__all__ = [
    "Generation",
    "SamplingKwargs",
    "SamplingOptions",
    "Timing",
    "generate",
    "generate_ids",
    "stream",
    "stream_ids",
]
