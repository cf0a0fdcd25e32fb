"""qwen-jax: Qwen2.5 in JAX/Flax NNX, numerically identical to HF transformers, sharded on a mesh."""

from qwen_jax.config import ConfigError, Qwen2Config, RopeScaling
from qwen_jax.generation import GenerationConfig, generate, stream
from qwen_jax.engine import Engine
from qwen_jax.load import load, load_model
from qwen_jax.model import KVCache, Qwen2ForCausalLM, create_model, default_dtype
from qwen_jax.quant import QuantScheme, dequantize_model, quantize_model
from qwen_jax.tokenizer import StreamDecoder, Tokenizer, parse_tool_calls
from qwen_jax.sharding import DEFAULT_RULES, ShardingRules, make_mesh

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "Qwen2Config", "RopeScaling", "KVCache", "Qwen2ForCausalLM", "create_model",
    "default_dtype", "load_model", "load", "quantize_model", "dequantize_model", "QuantScheme", "generate", "stream",
    "GenerationConfig", "Engine", "DEFAULT_RULES", "ShardingRules", "make_mesh", "Tokenizer", "StreamDecoder",
    "parse_tool_calls", "__version__",
]
