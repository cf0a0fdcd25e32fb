"""Loading: `load_model` picks the reader for a checkpoint's format; `load` adds the tokenizer.

Formats: an HF safetensors directory (`qwen_jax.checkpoints.hf.HFReader`), a GPTQ or AWQ safetensors
directory (`qwen_jax.checkpoints.gptq_awq.PrequantizedReader`), a GGUF file
(`qwen_jax.checkpoints.gguf.GGUFReader`), or a qwen-jax Orbax directory written by `qwen-jax convert` /
`qwen-jax train` (`qwen_jax.checkpoints.orbax.OrbaxReader`). Every reader yields the parameter groups
of `qwen_jax.checkpoints.params`, which `qwen_jax.checkpoints.assemble.assemble_model` places
straight into their shards.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

import jax.numpy as jnp
from jax.sharding import Mesh

from qwen_jax.checkpoints.assemble import CheckpointReader, assemble_model
from qwen_jax.checkpoints.gguf import GGUFCheckpoint, GGUFReader, is_gguf_file
from qwen_jax.checkpoints.gptq_awq import PrequantizedReader, read_prequantized_config
from qwen_jax.checkpoints.hf import HFReader
from qwen_jax.checkpoints.hub import resolve_source
from qwen_jax.checkpoints.orbax import OrbaxReader, is_orbax_checkpoint
from qwen_jax.config import GenerationConfig, read_config_json
from qwen_jax.errors import CheckpointError
from qwen_jax.model.causal_lm import Qwen2ForCausalLM, default_dtype, unstack_layers
from qwen_jax.ops.attention.selection import check_backend
from qwen_jax.ops.quant import QuantScheme
from qwen_jax.sharding import DEFAULT_RULES, ShardingRules, platform_of
from qwen_jax.tokenizer import Tokenizer


def open_checkpoint(path: str | os.PathLike) -> CheckpointReader:
    """The reader for a local checkpoint (directory or GGUF file), chosen by what it holds."""
    path = os.fspath(path)
    if is_gguf_file(path):
        return GGUFReader(path)
    if not os.path.isdir(path):
        raise CheckpointError(
            f"{path}: checkpoint directory not found"
            if not os.path.exists(path)
            else f"{path}: not a checkpoint directory or GGUF file"
        )
    if is_orbax_checkpoint(path):
        return OrbaxReader(path)
    if read_prequantized_config(read_config_json(path), path) is not None:
        return PrequantizedReader(path)
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
    quantize: str | QuantScheme | None = None,
    attention: str = "auto",
    rope_scaling=None,
) -> Qwen2ForCausalLM:
    """Load a checkpoint into a model: a local HF, GPTQ or AWQ directory, a GGUF file, a converted
    Orbax directory, or a Hub id (`Qwen/Qwen2.5-0.5B-Instruct`, `org/repo/file.gguf`).

    dtype: compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU). param_dtype: storage
    dtype of the float parameters (default: dtype). With `mesh`, each parameter is created
    directly in its shards according to `rules`. scan_layers=False gives one array per layer
    (`qwen_jax.model.causal_lm.unstack_layers`): faster memory-bound decode (on CPU the decoder kernels are
    then stored out-major, which XLA:CPU's decode products read faster), compile time grows with depth.
    progress: a progress bar over the bytes loaded (None: only when stderr is a terminal).
    quantize: 'int8' (per output channel) or 'int4' (groups of 128 inputs) weight-only
    quantization of the decoder projections (`qwen_jax.ops.quant`); the embedding, norms and lm_head
    stay float. GPTQ/AWQ checkpoints and quantized Orbax directories load quantized as they are
    by default (GPTQ act-order kernels are dequantized: pass `quantize` to re-quantize them).
    attention: the attention backend (`qwen_jax.ops.attention`: auto, xla, chunked, cudnn, splash);
      one that cannot run here is refused before any weight is read.
    rope_scaling: override the checkpoint's rope scaling, e.g. 'yarn:4' for Qwen2.5's documented
      128K context, without editing config.json (`Qwen2Config.with_rope_scaling`).
    """
    check_backend(attention, dtype=jnp.dtype(dtype or default_dtype()), head_dim=None, platform=platform_of(mesh))
    reader = open_checkpoint(resolve_source(path))
    model = assemble_model(
        reader, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules, progress=progress, quantize=quantize
    )
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
    quantize: str | QuantScheme | None = None,
    attention: str = "auto",
    rope_scaling=None,
) -> tuple[Qwen2ForCausalLM, Tokenizer]:
    """Load a checkpoint (see `load_model` for the formats) and its tokenizer.

    dtype: compute and parameter dtype (default: float32 on CPU, bfloat16 on GPU/TPU).
    mesh: place the parameters in shards on this mesh (`qwen_jax.make_mesh()` puts every device on
      `tensor`: tensor parallel, the inference default); None keeps them on one device.
    scan_layers: False (the default for inference) gives each layer its own weight arrays, which a
      decode step reads directly; a scanned step copies each layer's slice out of the stacked
      arrays first, which slows memory-bound batch-1 decode (benchmarks/generate.py measures it). True compiles faster
      (compile time independent of depth). See `load_model`.
    quantize: 'int8' or 'int4' weight-only quantization (see `load_model`).
    attention, rope_scaling: the attention backend and a rope scaling override ('yarn:4'), as in
      `load_model`.
    The checkpoint's generation_config.json becomes `model.generation_config`, the defaults of
    `qwen_jax.generate`. A GGUF file's tokenizer and generation settings come from its metadata.
    """
    path = resolve_source(path)
    model = load_model(
        path,
        dtype=dtype,
        mesh=mesh,
        rules=rules,
        scan_layers=scan_layers,
        progress=progress,
        quantize=quantize,
        attention=attention,
        rope_scaling=rope_scaling,
    )
    with side_files_dir(path) as directory:
        tokenizer = Tokenizer.from_dir(directory)
        model.generation_config = GenerationConfig.from_pretrained(directory, model.config)
    return model, tokenizer


@contextlib.contextmanager
def side_files_dir(path: str) -> Iterator[str]:
    """A directory holding the checkpoint's tokenizer and generation files (built from a GGUF's metadata)."""
    if not is_gguf_file(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="qwen-jax-gguf-") as directory:
        GGUFCheckpoint(path).write_side_files(directory)
        yield directory
