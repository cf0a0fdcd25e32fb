"""HF transformers checkpoints: the key map (kept apart from the model) and the loading path.

`load_model(path)` reads a local HF directory (config.json + `model.safetensors`, or sharded
`model-*.safetensors` with `model.safetensors.index.json`) and places every tensor straight into
its shards: stacked layer parameters are filled one layer at a time into a preallocated sharded
buffer, so the host never holds more than one HF tensor and the devices never hold a second
copy of the model.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from qwen_jax.config import Qwen2Config
from qwen_jax.model import Qwen2ForCausalLM, default_dtype, unstack_layers
from qwen_jax.safetensors_io import CheckpointError, SafetensorsFile
from qwen_jax.sharding import DEFAULT_RULES, ShardingRules, state_shardings

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# Buffers some exporters wrote into checkpoints; they are recomputed, never loaded.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """How one parameter of ours maps to HF tensor(s).

    `hf_name` contains `{i}` for stacked layer parameters (one HF tensor per layer).
    `from_hf`/`to_hf` convert one (per-layer) tensor between HF and our layout.
    """

    path: tuple[str, ...]
    hf_name: str
    hf_shape: tuple[int, ...]
    from_hf: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_name

    def hf_names(self, num_layers: int) -> list[str]:
        return [self.hf_name.format(i=i) for i in range(num_layers)] if self.stacked else [self.hf_name]


def _same(x):
    return x


def param_specs(config: Qwen2Config) -> list[ParamSpec]:
    """The complete key map for a config, in HF checkpoint order."""
    D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    N, K, H = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    layer = "model.layers.{i}."

    def proj_in(heads):  # HF [heads*H, D] <-> ours [D, heads, H]
        return (lambda w: w.T.reshape(D, heads, H), lambda k: k.reshape(D, heads * H).T)

    def bias(heads):  # HF [heads*H] <-> ours [heads, H]
        return (lambda b: b.reshape(heads, H), lambda b: b.reshape(heads * H))

    transpose = (lambda w: w.T, lambda k: k.T)
    o_proj = (lambda w: w.T.reshape(N, H, D), lambda k: k.reshape(N * H, D).T)
    same = (_same, _same)
    rows = [
        (("model", "embed_tokens", "embedding"), "model.embed_tokens.weight", (V, D), same),
    ]
    for sub, hf, heads in (("q_proj", "q_proj", N), ("k_proj", "k_proj", K), ("v_proj", "v_proj", K)):
        rows.append((("model", "layers", "self_attn", sub, "kernel"), f"{layer}self_attn.{hf}.weight",
                     (heads * H, D), proj_in(heads)))
        rows.append((("model", "layers", "self_attn", sub, "bias"), f"{layer}self_attn.{hf}.bias",
                     (heads * H,), bias(heads)))
    rows += [
        (("model", "layers", "self_attn", "o_proj", "kernel"), f"{layer}self_attn.o_proj.weight", (D, N * H), o_proj),
        (("model", "layers", "mlp", "gate_proj", "kernel"), f"{layer}mlp.gate_proj.weight", (F, D), transpose),
        (("model", "layers", "mlp", "up_proj", "kernel"), f"{layer}mlp.up_proj.weight", (F, D), transpose),
        (("model", "layers", "mlp", "down_proj", "kernel"), f"{layer}mlp.down_proj.weight", (D, F), transpose),
        (("model", "layers", "input_layernorm", "weight"), f"{layer}input_layernorm.weight", (D,), same),
        (("model", "layers", "post_attention_layernorm", "weight"), f"{layer}post_attention_layernorm.weight",
         (D,), same),
        (("model", "norm", "weight"), "model.norm.weight", (D,), same),
    ]
    if not config.tie_word_embeddings:
        rows.append((("lm_head", "weight"), "lm_head.weight", (V, D), same))
    return [ParamSpec(path, name, shape, f, t) for path, name, shape, (f, t) in rows]


# --------------------------------------------------------------------------- checkpoint files
class HFCheckpoint:
    """The safetensors files of an HF checkpoint directory, indexed by tensor name."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise CheckpointError(f"{self.directory}: checkpoint directory not found")
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}  # tensor name -> file path
        index = os.path.join(self.directory, INDEX_FILE)
        if os.path.exists(index):
            self._from_index(index)
        else:
            paths = self._safetensors_paths()
            for path in paths:
                st = self._open(path)
                for name in st.keys():
                    self.where[name] = path

    def _safetensors_paths(self) -> list[str]:
        single = os.path.join(self.directory, SINGLE_FILE)
        if os.path.exists(single):
            return [single]
        paths = sorted(glob.glob(os.path.join(self.directory, "*.safetensors")))
        if paths:
            return paths
        pickles = [p for pat in PICKLE_PATTERNS for p in glob.glob(os.path.join(self.directory, pat))]
        if pickles:
            raise CheckpointError(
                f"{self.directory}: only pickle checkpoints ({os.path.basename(pickles[0])}) found; qwen-jax never "
                "unpickles files. Convert to safetensors first (transformers: model.save_pretrained(dir, "
                "safe_serialization=True))"
            )
        raise CheckpointError(f"{self.directory}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file")

    def _from_index(self, index: str):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: unreadable safetensors index ({type(e).__name__}: {e})") from None
        for name, filename in weight_map.items():
            path = os.path.join(self.directory, filename)
            if not os.path.exists(path):
                raise CheckpointError(f"{index}: tensor {name!r} is in {filename}, which does not exist")
            self._open(path)
            if name not in self.files[path].entries:
                raise CheckpointError(f"{path}: index lists tensor {name!r} but the file does not contain it")
            self.where[name] = path

    def _open(self, path: str) -> SafetensorsFile:
        if path not in self.files:
            self.files[path] = SafetensorsFile(path)
        return self.files[path]

    def names(self) -> set[str]:
        return set(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[self.where[name]].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self.files[self.where[name]].get(name)

    def file_of(self, name: str) -> str:
        return self.where[name]

    def dtypes(self) -> set[np.dtype]:
        return {self.files[p].dtype(n) for n, p in self.where.items()}


def validate_checkpoint(ckpt: HFCheckpoint, config: Qwen2Config) -> list[ParamSpec]:
    """Every expected tensor present with the right shape, nothing unexpected; raise on the first problem."""
    specs = param_specs(config)
    expected: set[str] = set()
    for spec in specs:
        for name in spec.hf_names(config.num_hidden_layers):
            expected.add(name)
            if name not in ckpt.where:
                raise CheckpointError(f"{ckpt.directory}: missing tensor {name!r}")
            shape = ckpt.shape(name)
            if shape != spec.hf_shape:
                raise CheckpointError(
                    f"{ckpt.file_of(name)}: tensor {name!r} has shape {list(shape)}, config expects {list(spec.hf_shape)}"
                )
    for name in sorted(ckpt.names() - expected):
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied checkpoints may carry a redundant copy of the embedding
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        raise CheckpointError(f"{ckpt.file_of(name)}: unexpected tensor {name!r} for this config")
    return specs


# --------------------------------------------------------------------------- loading
def load_model(
    path: str | os.PathLike,
    *,
    dtype=None,
    param_dtype=None,
    mesh: Mesh | None = None,
    rules: ShardingRules = DEFAULT_RULES,
    scan_layers: bool = True,
) -> Qwen2ForCausalLM:
    """Load a local HF checkpoint directory (or a converted Orbax directory) into a model.

    dtype: compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU). param_dtype: storage
    dtype of the parameters (default: dtype). With `mesh`, each parameter is created directly in
    its shards according to `rules`. scan_layers=False gives one array per layer
    (`qwen_jax.model.unstack_layers`): faster memory-bound decode, compile time grows with depth.
    """
    model = _load_scanned(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)
    return model if scan_layers else unstack_layers(model)


def _load_scanned(path, *, dtype, param_dtype, mesh, rules) -> Qwen2ForCausalLM:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory not found")
    from qwen_jax import checkpoint  # Orbax directories (converted checkpoints)

    if checkpoint.is_orbax_checkpoint(path):
        return checkpoint.load_orbax_model(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)
    config = Qwen2Config.from_hf(path)
    ckpt = HFCheckpoint(path)
    specs = validate_checkpoint(ckpt, config)
    model = abstract_model(config, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)
    graphdef, abstract_state = nnx.split(model)
    shardings = leaf_shardings(abstract_state, mesh, rules)
    flat = dict(nnx.to_flat_state(abstract_state))
    for spec in specs:
        variable = flat[spec.path]
        value = _place(spec, ckpt, config, variable.shape, variable.dtype, shardings[spec.path])
        variable.set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def abstract_model(config: Qwen2Config, *, dtype=None, param_dtype=None, mesh=None, rules=DEFAULT_RULES):
    """The model with ShapeDtypeStruct leaves (nothing allocated)."""
    dtype = jnp.dtype(dtype or default_dtype())
    return nnx.eval_shape(lambda: Qwen2ForCausalLM(
        config, dtype=dtype, param_dtype=param_dtype or dtype, rngs=nnx.Rngs(0), mesh=mesh, rules=rules))


def leaf_shardings(abstract_state, mesh, rules) -> dict[tuple[str, ...], jax.sharding.Sharding]:
    """Target sharding of every parameter path (the first device when there is no mesh)."""
    if mesh is None:
        device = jax.devices()[0]
        return {path: jax.sharding.SingleDeviceSharding(device) for path, _ in nnx.to_flat_state(abstract_state)}
    return {path: v.get_value() for path, v in nnx.to_flat_state(state_shardings(abstract_state, mesh, rules))}


def _put(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """Place a host array into its shards, each device receiving only its slice."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _place(spec: ParamSpec, ckpt: HFCheckpoint, config: Qwen2Config, shape, dtype, sharding) -> jax.Array:
    def read(name):
        return np.asarray(spec.from_hf(ckpt.get(name))).astype(dtype)

    if not spec.stacked:
        return _put(read(spec.hf_name), sharding)
    layer_sharding = drop_leading_axis(sharding)
    buffer = sharded_zeros(tuple(shape), jnp.dtype(dtype), sharding)
    for i, name in enumerate(spec.hf_names(config.num_hidden_layers)):
        buffer = set_slice(buffer, _put(read(name), layer_sharding), i, True)
    return buffer


def drop_leading_axis(sharding):
    """The sharding of one layer's slice of a stacked parameter."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return sharding


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def sharded_zeros(shape, dtype, sharding):
    """A zero buffer created directly in its shards (filled slice by slice while loading)."""
    return jax.lax.with_sharding_constraint(jnp.zeros(shape, dtype), sharding)


@functools.partial(jax.jit, donate_argnums=0, static_argnums=3)
def set_slice(buffer: jax.Array, part: jax.Array, start, squeezed: bool) -> jax.Array:
    """Write a layer slice (`squeezed`: index `start` of the leading axis) or a block of rows
    (from row `start`) into a preallocated sharded `buffer`, in place."""
    part = part.astype(buffer.dtype)
    if squeezed:
        return jax.lax.dynamic_update_index_in_dim(buffer, part, start, 0)
    return jax.lax.dynamic_update_slice_in_dim(buffer, part, start, 0)


def iter_hf_tensors(model: Qwen2ForCausalLM) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, host array) for every tensor of an HF checkpoint of this model, one at a time."""
    config = model.config
    flat = dict(nnx.to_flat_state(nnx.state(model)))

    def host(array) -> np.ndarray:
        return np.asarray(jax.device_get(array))

    for spec in param_specs(config):
        if not spec.stacked:
            yield spec.hf_name, np.asarray(spec.to_hf(host(flat[spec.path].get_value())))
            continue
        for i, name in enumerate(spec.hf_names(config.num_hidden_layers)):
            if spec.path in flat:  # stacked layers
                layer = flat[spec.path].get_value()[i]
            else:  # unrolled layers (scan_layers=False)
                layer = flat[(*spec.path[:2], i, *spec.path[2:])].get_value()
            yield name, np.asarray(spec.to_hf(host(layer)))
