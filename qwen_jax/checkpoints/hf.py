"""HF transformers safetensors checkpoints: the reader and the HF names of a model's tensors.

`HFReader(path)` reads a local HF directory (config.json + `model.safetensors`, or sharded
`model-*.safetensors` with `model.safetensors.index.json`) for `qwen_jax.load_model`, which places
every tensor straight into its shards (see `qwen_jax.checkpoints.assemble.assemble_model`). The key map
between HF names and our parameters lives in `qwen_jax.checkpoints.params.param_specs`.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import numpy as np

from qwen_jax.checkpoints.orbax import model_groups
from qwen_jax.checkpoints.params import ParamGroup, ParamSpec, hf_tensors, param_specs
from qwen_jax.checkpoints.safetensors import SafetensorsFile
from qwen_jax.config import Qwen2Config
from qwen_jax.errors import CheckpointError
from qwen_jax.model.causal_lm import Qwen2ForCausalLM

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# Buffers some exporters wrote into checkpoints; they are recomputed, never loaded.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


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
                    f"{ckpt.file_of(name)}: tensor {name!r} has shape {list(shape)}, "
                    f"config expects {list(spec.hf_shape)}"
                )
    for name in sorted(ckpt.names() - expected):
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied checkpoints may carry a redundant copy of the embedding
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        raise CheckpointError(f"{ckpt.file_of(name)}: unexpected tensor {name!r} for this config")
    return specs


# --------------------------------------------------------------------------- the reader
class HFReader:
    """Reads an HF safetensors checkpoint group by group (see `qwen_jax.checkpoints.assemble.CheckpointReader`).

    The whole checkpoint (config, every tensor's presence and shape) is validated on opening.
    """

    row_block_elements = None  # HF files are not grouped: any grouping reads them
    quantization = None  # float weights (quantized on loading when asked)

    def __init__(self, directory: str | os.PathLike):
        self.source = os.fspath(directory)
        self.config = Qwen2Config.from_hf(self.source)
        self.checkpoint = HFCheckpoint(self.source)
        validate_checkpoint(self.checkpoint, self.config)

    def read_group(self, group: ParamGroup, targets) -> dict[tuple[str, ...], np.ndarray]:
        arrays = group.read_hf_arrays(self.checkpoint.get)
        if targets is None:
            return arrays
        return {key: np.asarray(array).astype(targets[key].dtype, copy=False) for key, array in arrays.items()}

    @property
    def dtypes(self) -> set[np.dtype]:
        return self.checkpoint.dtypes()


def iter_hf_tensors(model: Qwen2ForCausalLM) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, host array) for every tensor of an HF checkpoint of this model, one at a time.

    Quantized kernels are dequantized to float32.
    """
    for group, arrays in model_groups(model, row_block_elements=2**62):  # whole tensors, no row blocks
        yield from hf_tensors(group, arrays)
