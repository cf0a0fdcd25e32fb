"""Loading: `load_model` picks the reader for a checkpoint's format; `load` adds the tokenizer.

Formats: an HF safetensors directory (`qwen_jax.hf.HFReader`) or a qwen-jax Orbax directory
written by `qwen-jax convert` / `qwen-jax train` (`qwen_jax.checkpoint.OrbaxReader`). Every reader
yields the parameter groups of `qwen_jax.layout`, which `layout.assemble_model` places straight
into their shards.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from jax.sharding import Mesh

from qwen_jax.attention import check_backend, platform_of
from qwen_jax.generation import GenerationConfig
from qwen_jax.layout import CheckpointReader, assemble_model, is_orbax_checkpoint
from qwen_jax.model import Qwen2ForCausalLM, default_dtype, unstack_layers
from qwen_jax.safetensors_io import CheckpointError
from qwen_jax.sharding import DEFAULT_RULES, ShardingRules


def open_checkpoint(path: str | os.PathLike) -> CheckpointReader:
    """The reader for a local checkpoint directory, chosen by what the directory holds."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory not found")
    if is_orbax_checkpoint(path):
        from qwen_jax.checkpoint import OrbaxReader

        return OrbaxReader(path)
    from qwen_jax.hf import HFReader

    return HFReader(path)


def load_model(
    path: str | os.PathLike,
    *,
    dtype=None,
    param_dtype=None,
    mesh: Mesh | None = None,
    rules: ShardingRules = DEFAULT_RULES,
    scan_layers: bool = True,
    progress: bool | None = None,
    attention: str = "auto",
    rope_scaling=None,
) -> Qwen2ForCausalLM:
    """Load a local HF checkpoint directory or a converted Orbax directory into a model.

    dtype: compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU). param_dtype: storage
    dtype of the parameters (default: dtype). With `mesh`, each parameter is created directly in
    its shards according to `rules`. scan_layers=False gives one array per layer
    (`qwen_jax.model.unstack_layers`): faster memory-bound decode, compile time grows with depth.
    progress: a progress bar over the bytes loaded (None: only when stderr is a terminal).
    attention: the attention backend (`qwen_jax.attention`: auto, xla, chunked, cudnn, splash);
      one that cannot run here is refused before any weight is read.
    rope_scaling: override the checkpoint's rope scaling, e.g. 'yarn:4' for Qwen2.5's documented
      128K context, without editing config.json (`Qwen2Config.with_rope_scaling`).
    """
    check_backend(attention, dtype=jnp.dtype(dtype or default_dtype()), head_dim=None, platform=platform_of(mesh))
    reader = open_checkpoint(path)
    model = assemble_model(reader, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules, progress=progress)
    model.config = model.config.with_rope_scaling(rope_scaling)
    model.attention = attention
    return model if scan_layers else unstack_layers(model)


def load(
    path: str | os.PathLike,
    *,
    dtype=None,
    mesh: Mesh | None = None,
    rules: ShardingRules = DEFAULT_RULES,
    scan_layers: bool = False,
    progress: bool | None = None,
    attention: str = "auto",
    rope_scaling=None,
) -> tuple[Qwen2ForCausalLM, "Tokenizer"]:  # noqa: F821 (imported lazily)
    """Load an HF checkpoint (local directory or Hub id) or a directory converted by `qwen-jax convert`.

    dtype: compute and parameter dtype (default: float32 on CPU, bfloat16 on GPU/TPU).
    mesh: place the parameters in shards on this mesh (`qwen_jax.make_mesh()` puts every device on
      `tensor`: tensor parallel, the inference default); None keeps them on one device.
    scan_layers: False (the default for inference) gives each layer its own weight arrays, which a
      decode step reads directly; a scanned step copies each layer's slice out of the stacked
      arrays first (2.5x slower batch-1 decode on CPU, see the README). True compiles faster
      (compile time independent of depth). See `load_model`.
    attention, rope_scaling: the attention backend and a rope scaling override ('yarn:4'), as in
      `load_model`.
    The checkpoint's generation_config.json becomes `model.generation_config`, the defaults of
    `qwen_jax.generate`.
    """
    from qwen_jax.hub import resolve_source
    from qwen_jax.tokenizer import Tokenizer

    path = resolve_source(path)
    model = load_model(path, dtype=dtype, mesh=mesh, rules=rules, scan_layers=scan_layers, progress=progress,
                       attention=attention, rope_scaling=rope_scaling)
    tokenizer = Tokenizer.from_dir(path)
    model.generation_config = GenerationConfig.from_pretrained(path, model.config)
    return model, tokenizer
