"""`qwen_jax.load`: a checkpoint directory -> (model, tokenizer), ready for `qwen_jax.generate`."""

from __future__ import annotations

import os

import jax
from jax.sharding import Mesh

from qwen_jax.generation import GenerationConfig
from qwen_jax.model import Qwen2ForCausalLM
from qwen_jax.sharding import DEFAULT_RULES, ShardingRules


def load(
    path: str | os.PathLike,
    *,
    dtype=None,
    mesh: Mesh | None = None,
    rules: ShardingRules = DEFAULT_RULES,
    scan_layers: bool | None = None,
) -> tuple[Qwen2ForCausalLM, "Tokenizer"]:  # noqa: F821 (imported lazily)
    """Load an HF checkpoint (local directory or Hub id) or a directory converted by `qwen-jax convert`.

    dtype: compute and parameter dtype (default: float32 on CPU, bfloat16 on GPU/TPU).
    mesh: place the parameters in shards on this mesh (`qwen_jax.make_mesh()` puts every device on
      `tensor`: tensor parallel, the inference default); None keeps them on one device.
    scan_layers: None picks unrolled layers on CPU, where they measured faster for decode (each
      layer reads its own weights instead of a slice copied out of the stacked arrays), and
      scanned layers elsewhere (compile time independent of depth). See `hf.load_model`.
    The checkpoint's generation_config.json becomes `model.generation_config`, the defaults of
    `qwen_jax.generate`.
    """
    from qwen_jax import hf
    from qwen_jax.tokenizer import Tokenizer

    from qwen_jax.hub import resolve_source

    path = resolve_source(path)
    if scan_layers is None:
        scan_layers = jax.default_backend() != "cpu"
    model = hf.load_model(path, dtype=dtype, mesh=mesh, rules=rules, scan_layers=scan_layers)
    tokenizer = Tokenizer.from_dir(path)
    model.generation_config = GenerationConfig.from_pretrained(path, model.config)
    return model, tokenizer
