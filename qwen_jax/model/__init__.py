"""The Qwen2.5 architecture in Flax NNX: `Qwen2ForCausalLM`, its layers, `Linear`, `KVCache`.

Modules: `causal_lm` (the model, `create_model`, `unstack_layers`), `modules` (norm, MLP,
attention layer, decoder layer), `linear` (`Linear` over a float kernel or a `QuantizedKernel`,
with an optional `LoRA`), `kv_cache` (the `KVCache` contract), `mixed` (the engine's fused
decode + prefill step), `rope`, `quantize` (in-memory quantization of a model) and `lora`
(adapters on a model).
"""

from qwen_jax.model.causal_lm import (
    Qwen2ForCausalLM,
    create_model,
    default_dtype,
    unstack_layers,
)
from qwen_jax.model.kv_cache import KVCache
from qwen_jax.model.linear import Linear

__all__ = ["KVCache", "Linear", "Qwen2ForCausalLM", "create_model", "default_dtype", "unstack_layers"]
