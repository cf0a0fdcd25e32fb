"""qwen-jax: Qwen2.5 in JAX/Flax NNX, numerically identical to HF transformers, sharded on a mesh."""

from qwen_jax.config import GenerationConfig, Qwen2Config, RopeScaling
from qwen_jax.engine.core import Engine
from qwen_jax.errors import ConfigError
from qwen_jax.generation.api import generate, stream
from qwen_jax.load import load, load_model
from qwen_jax.model.causal_lm import Qwen2ForCausalLM, create_model, default_dtype
from qwen_jax.model.kv_cache import KVCache
from qwen_jax.model.quantize import dequantize_model, quantize_model
from qwen_jax.ops.quant import QuantScheme
from qwen_jax.sharding import DEFAULT_RULES, ShardingRules, make_mesh
from qwen_jax.tokenizer import StreamDecoder, Tokenizer, parse_tool_calls
from qwen_jax.version import __version__

__all__ = [
    "ConfigError",
    "Qwen2Config",
    "RopeScaling",
    "KVCache",
    "Qwen2ForCausalLM",
    "create_model",
    "default_dtype",
    "load_model",
    "load",
    "quantize_model",
    "dequantize_model",
    "QuantScheme",
    "generate",
    "stream",
    "GenerationConfig",
    "Engine",
    "DEFAULT_RULES",
    "ShardingRules",
    "make_mesh",
    "Tokenizer",
    "StreamDecoder",
    "parse_tool_calls",
    "__version__",
]
