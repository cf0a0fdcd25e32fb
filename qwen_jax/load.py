"""`qwen_jax.load`: a checkpoint directory -> (model, tokenizer), ready for `qwen_jax.generate`."""

from __future__ import annotations

import os

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
    scan_layers: bool = False,
) -> tuple[Qwen2ForCausalLM, "Tokenizer"]:  # noqa: F821 (imported lazily)
    """Load an HF checkpoint (local directory or Hub id) or a directory converted by `qwen-jax convert`.

    dtype: compute and parameter dtype (default: float32 on CPU, bfloat16 on GPU/TPU).
    mesh: place the parameters in shards on this mesh (`qwen_jax.make_mesh()` puts every device on
      `tensor`: tensor parallel, the inference default); None keeps them on one device.
    scan_layers: False (the default for inference) gives each layer its own weight arrays, which a
      decode step reads directly; a scanned step copies each layer's slice out of the stacked
      arrays first (2.5x slower batch-1 decode on CPU, see the README). True compiles faster
      (compile time independent of depth). See `hf.load_model`.
    The checkpoint's generation_config.json becomes `model.generation_config`, the defaults of
    `qwen_jax.generate`.
    """
    from qwen_jax import hf
    from qwen_jax.hub import resolve_source
    from qwen_jax.tokenizer import Tokenizer

    path = resolve_source(path)
    model = hf.load_model(path, dtype=dtype, mesh=mesh, rules=rules, scan_layers=scan_layers)
    tokenizer = Tokenizer.from_dir(path)
    model.generation_config = GenerationConfig.from_pretrained(path, model.config)
    return model, tokenizer
