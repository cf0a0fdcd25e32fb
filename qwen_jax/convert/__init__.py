"""Checkpoint conversion (`qwen-jax convert`, `qwen-jax export-hf`).

`hf_to_orbax(src, out, quantize=None)` turns an HF, GPTQ or AWQ checkpoint directory, a GGUF file
or a Hub id into a qwen-jax Orbax checkpoint (optionally int8/int4 quantized) that
`qwen_jax.load_model(out)` restores straight into a mesh's shardings; `orbax_to_hf(src, out)`
writes it back as HF safetensors that transformers loads (quantized kernels dequantized). Both
stream one decoder layer at a time and replace `out` atomically.
"""

from qwen_jax.convert.to_hf import ExportSummary, orbax_to_hf
from qwen_jax.convert.to_orbax import ConversionSummary, hf_to_orbax
from qwen_jax.errors import ConversionError

__all__ = ["ConversionError", "ConversionSummary", "ExportSummary", "hf_to_orbax", "orbax_to_hf"]
