"""Generation with a preallocated KV cache: `generate` / `stream` (text, `api`), `generate_ids` /
`stream_ids` (token ids, a static batch, `static`; with `speculative=` from `api`), the sampling
options of every generation call (`options`), the one sampler (`sampler`), the one text assembler
with stop strings (`text`) and speculative decoding (`speculative`)."""

from qwen_jax.generation.api import generate, generate_ids, stream, stream_ids
from qwen_jax.generation.options import SamplingKwargs, SamplingOptions
from qwen_jax.generation.speculative import SpeculativeOptions
from qwen_jax.generation.static import Generation, SpeculationStats, Timing

__all__ = [
    "Generation",
    "SamplingKwargs",
    "SamplingOptions",
    "SpeculationStats",
    "SpeculativeOptions",
    "Timing",
    "generate",
    "generate_ids",
    "stream",
    "stream_ids",
]
