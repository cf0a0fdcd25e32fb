"""HF safetensors <-> Orbax conversion (`qwen-jax convert`, `qwen-jax export-hf`).

`hf_to_orbax(src, out)` turns an HF checkpoint directory or Hub id into a qwen-jax Orbax
checkpoint that `qwen_jax.load_model(out)` restores straight into a mesh's shardings;
`orbax_to_hf(src, out)` writes it back as HF safetensors that transformers loads. Both stream one
decoder layer at a time and replace `out` atomically.
"""

from qwen_jax.convert.common import ConversionError
from qwen_jax.convert.to_hf import ExportSummary, orbax_to_hf
from qwen_jax.convert.to_orbax import ConversionSummary, hf_to_orbax

__all__ = ["ConversionError", "ConversionSummary", "ExportSummary", "hf_to_orbax", "orbax_to_hf"]
