"""Generation with a preallocated KV cache: `generate` / `stream` (text, `api`), `generate_ids` /
`stream_ids` (token ids, a static batch, `static`), sampling options (`options`), the sampler
(`sampler`) and stop strings (`text`)."""

from qwen_jax.generation.api import generate, stream
from qwen_jax.generation.static import Generation, Timing, generate_ids, stream_ids

__all__ = ["Generation", "Timing", "generate", "generate_ids", "stream", "stream_ids"]
