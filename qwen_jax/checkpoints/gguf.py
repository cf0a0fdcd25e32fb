"""GGUF files (llama.cpp) of Qwen2.5: config, tokenizer and dequantized tensors from one file.

A GGUF carries no config.json and no tokenizer.json; both are rebuilt from its metadata:
`qwen2.*` keys give the architecture, `tokenizer.ggml.*` the byte-level BPE vocabulary, merges,
token types and special ids, `tokenizer.chat_template` the chat template. Tensors use llama.cpp
names (`blk.3.attn_q.weight` ...) and are stored `[out, in]` like HF's, each in its own type
(K-quant files mix them), and are dequantized with the `gguf` package (the optional extra
`qwen-jax[gguf]`; opening a GGUF without it raises `MissingExtraError`). llama.cpp does not permute
the Q/K projections of qwen2 models, so the HF layout applies unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from qwen_jax.checkpoints.outdir import write_json
from qwen_jax.checkpoints.params import param_specs
from qwen_jax.config import Qwen2Config
from qwen_jax.errors import CheckpointError
from qwen_jax.extras import require

GGUF_MAGIC = b"GGUF"
_LAYER_NAMES = {  # HF name inside model.layers.{i} -> llama.cpp name inside blk.{i}
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# Qwen2's pre-tokenizer split, as in its tokenizer.json (llama.cpp's pre-tokenizer "qwen2").
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp token types
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def is_gguf_file(path: str | os.PathLike) -> bool:
    """A regular file that starts with the GGUF magic."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def gguf_name(hf_name: str) -> str:
    """llama.cpp's tensor name for an HF Qwen2 tensor name."""
    module, _, kind = hf_name.rpartition(".")
    if module.startswith("model.layers."):
        index, _, inner = module[len("model.layers.") :].partition(".")
        return f"blk.{index}.{_LAYER_NAMES[inner]}.{kind}"
    return f"{_GLOBAL_NAMES[module]}.{kind}"


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # HF order (outermost first): [out, in] for matrices
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray  # memory-mapped: float32/float16 values, or raw blocks [rows, bytes per row]


class GGUFCheckpoint:
    """One GGUF file, opened memory-mapped; tensors are dequantized one at a time on request.

    The header is parsed here rather than by `gguf.GGUFReader`, which builds a numpy view per
    string and so takes long to open Qwen2.5's 151k-token vocabulary; tensors are dequantized with
    `gguf.quants.dequantize`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not is_gguf_file(self.path):
            raise CheckpointError(f"{self.path}: not a GGUF file")
        self._metadata, self.tensors = _parse(self.path)
        architecture = self.metadata("general.architecture")
        if architecture != "qwen2":
            raise CheckpointError(f"{self.path}: GGUF architecture {architecture!r}; qwen-jax reads qwen2 (Qwen2.5)")

    def metadata(self, key: str, default: Any = None) -> Any:
        return self._metadata.get(key, default)

    def _required(self, key: str) -> Any:
        value = self.metadata(key)
        if value is None:
            raise CheckpointError(f"{self.path}: GGUF metadata {key!r} missing")
        return value

    # ------------------------------------------------------------------ config
    def config_json(self) -> dict[str, Any]:
        """config.json contents (HF Qwen2 field names) described by the metadata."""
        embed = self.tensors.get("token_embd.weight")
        if embed is None:
            raise CheckpointError(f"{self.path}: GGUF tensor 'token_embd.weight' missing")
        hidden = int(self._required("qwen2.embedding_length"))
        config: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_act": "silu",
            "vocab_size": int(embed.shape[0]),
            "hidden_size": hidden,
            "intermediate_size": int(self._required("qwen2.feed_forward_length")),
            "num_hidden_layers": int(self._required("qwen2.block_count")),
            "num_attention_heads": int(self._required("qwen2.attention.head_count")),
            "num_key_value_heads": int(
                self.metadata("qwen2.attention.head_count_kv") or self._required("qwen2.attention.head_count")
            ),
            "max_position_embeddings": int(self._required("qwen2.context_length")),
            "rms_norm_eps": float(self._required("qwen2.attention.layer_norm_rms_epsilon")),
            "rope_theta": float(self.metadata("qwen2.rope.freq_base", 10000.0)),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "use_sliding_window": False,
            "bos_token_id": self.metadata("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.metadata("tokenizer.ggml.eos_token_id"),
            "torch_dtype": "float32",
        }
        scaling = self.metadata("qwen2.rope.scaling.type")
        if scaling not in (None, "none"):
            if scaling not in ("linear", "yarn"):
                raise CheckpointError(f"{self.path}: rope scaling {scaling!r} is not supported")
            config["rope_scaling"] = {
                "rope_type": scaling,
                "factor": float(self._required("qwen2.rope.scaling.factor")),
            }
            original = self.metadata("qwen2.rope.scaling.original_context_length")
            if original is not None:
                config["rope_scaling"]["original_max_position_embeddings"] = int(original)
        return config

    # ------------------------------------------------------------------ tokenizer
    def tokenizer_files(self) -> dict[str, Any]:
        """{file name: JSON contents} of tokenizer.json, tokenizer_config.json and generation_config.json."""
        model = self.metadata("tokenizer.ggml.model")
        if model != "gpt2":
            raise CheckpointError(f"{self.path}: tokenizer model {model!r}; Qwen2.5 GGUFs use byte-level BPE ('gpt2')")
        tokens = self._required("tokenizer.ggml.tokens")
        merges = self._required("tokenizer.ggml.merges")
        types = self.metadata("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise CheckpointError(f"{self.path}: {len(types)} token types for {len(tokens)} tokens")
        backend = build_bpe_tokenizer(tokens, merges, types)
        special_ids = {
            name: self.metadata(f"tokenizer.ggml.{key}")
            for name, key in (
                ("bos_token", "bos_token_id"),
                ("eos_token", "eos_token_id"),
                ("pad_token", "padding_token_id"),
            )
        }
        tokenizer_config: dict[str, Any] = {
            "add_bos_token": bool(self.metadata("tokenizer.ggml.add_bos_token", False)),
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": int(self._required("qwen2.context_length")),
            "tokenizer_class": "Qwen2Tokenizer",
        }
        for name, token_id in special_ids.items():
            tokenizer_config[name] = tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None
        template = self.metadata("tokenizer.chat_template")
        if template:
            tokenizer_config["chat_template"] = template
        generation = {"bos_token_id": special_ids["bos_token"], "eos_token_id": _eos_ids(self, tokens)}
        if special_ids["pad_token"] is not None:
            generation["pad_token_id"] = special_ids["pad_token"]
        return {
            "tokenizer.json": json.loads(backend.to_str()),
            "tokenizer_config.json": tokenizer_config,
            "generation_config.json": generation,
        }

    def write_side_files(self, directory: str) -> list[str]:
        """Write tokenizer.json, tokenizer_config.json and generation_config.json into `directory`."""
        files = self.tokenizer_files()
        for name, contents in files.items():
            write_json(os.path.join(directory, name), contents)
        return list(files)

    # ------------------------------------------------------------------ tensors
    def has(self, hf_name: str) -> bool:
        return gguf_name(hf_name) in self.tensors

    def shape(self, hf_name: str) -> tuple[int, ...]:
        """The HF shape (`[out, in]` for matrices)."""
        return self.tensors[gguf_name(hf_name)].shape

    def tensor_type(self, hf_name: str) -> str:
        return self.tensors[gguf_name(hf_name)].tensor_type.name

    def get(self, hf_name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor (or `rows` of a matrix) dequantized to float32, in HF layout."""
        gguf = _gguf()
        tensor = self.tensors[gguf_name(hf_name)]
        data = tensor.data if rows is None else tensor.data[rows[0] : rows[1]]
        try:
            array = gguf.quants.dequantize(data, tensor.tensor_type)
        except NotImplementedError:
            raise CheckpointError(
                f"{self.path}: tensor {tensor.name!r} has GGUF type {tensor.tensor_type.name}, "
                "which the gguf package cannot dequantize"
            ) from None
        array = np.asarray(array, np.float32)
        shape = self.shape(hf_name)
        if rows is not None:
            shape = (rows[1] - rows[0], *shape[1:])
        if array.shape != shape:
            raise CheckpointError(
                f"{self.path}: tensor {tensor.name!r} dequantized to {list(array.shape)}, expected {list(shape)}"
            )
        return array

    def type_counts(self) -> dict[str, int]:
        """How many tensors of each GGUF type the file holds (for `qwen-jax info`)."""
        counts: dict[str, int] = {}
        for tensor in self.tensors.values():
            counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
        return counts


def _eos_ids(checkpoint: GGUFCheckpoint, tokens: list[str]) -> int | list[int]:
    """The end-of-sequence ids generation stops on: the file's EOS plus `<|endoftext|>`/`<|im_end|>` if present."""
    ids = []
    eos = checkpoint.metadata("tokenizer.ggml.eos_token_id")
    if eos is not None:
        ids.append(int(eos))
    for token in ("<|endoftext|>", "<|im_end|>"):
        if token in tokens and tokens.index(token) not in ids:
            ids.append(tokens.index(token))
    return ids[0] if len(ids) == 1 else ids


def build_bpe_tokenizer(tokens: list[str], merges: list[str], token_types: list[int]) -> Tokenizer:
    """A `tokenizers.Tokenizer` equal to Qwen2's tokenizer.json from GGUF vocabulary metadata.

    Normal tokens form the BPE vocabulary; control tokens become special added tokens and
    user-defined ones (e.g. `<tool_call>`) non-special added tokens; unused padding entries
    (`[PAD151665]` ...) are not tokens at all.
    """
    vocab = {token: i for i, (token, kind) in enumerate(zip(tokens, token_types)) if kind == TOKEN_NORMAL}
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise CheckpointError(f"malformed BPE merge {merge!r} in GGUF metadata")
        pairs.append((left, right))
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=pairs,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    added = [
        (i, token, kind == TOKEN_CONTROL)
        for i, (token, kind) in enumerate(zip(tokens, token_types))
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
    ]
    for expected_id, token, special in added:
        entry = AddedToken(token, special=special, normalized=False, single_word=False, lstrip=False, rstrip=False)
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([entry])
        if tokenizer.token_to_id(token) != expected_id:
            raise CheckpointError(f"GGUF token {token!r} (id {expected_id}) is out of order in the vocabulary")
    return tokenizer


class GGUFReader:
    """Reads a GGUF file group by group (see `qwen_jax.checkpoints.assemble.CheckpointReader`).

    Every tensor arrives dequantized to float32 (quantized on loading when asked); row blocks of
    the embedding and lm_head dequantize only their own rows (GGUF quantizes each row on its own).
    The config and every tensor's presence and shape are validated on opening.
    """

    row_block_elements = None
    quantization = None
    dtypes = {np.dtype(np.float32)}

    def __init__(self, path: str | os.PathLike):
        self.source = os.fspath(path)
        self.file = GGUFCheckpoint(self.source)
        self.config_json = self.file.config_json()
        self.config = Qwen2Config.from_hf(self.config_json)
        expected = set()
        for spec in param_specs(self.config):
            for name in spec.hf_names(self.config.num_hidden_layers):
                expected.add(gguf_name(name))
                if not self.file.has(name):
                    raise CheckpointError(f"{self.source}: missing GGUF tensor {gguf_name(name)!r} ({name})")
                if self.file.shape(name) != spec.hf_shape:
                    raise CheckpointError(
                        f"{self.source}: GGUF tensor {gguf_name(name)!r} has shape "
                        f"{list(self.file.shape(name))}, the metadata implies {list(spec.hf_shape)}"
                    )
        for name in sorted(set(self.file.tensors) - expected):
            if name == "output.weight" and self.config.tie_word_embeddings:
                continue
            if not name.endswith("rope_freqs.weight"):
                raise CheckpointError(f"{self.source}: unexpected GGUF tensor {name!r} for a qwen2 model")

    def read_group(self, group, targets) -> dict[tuple[str, ...], np.ndarray]:
        if group.rows is not None:  # unstacked matrices keep the HF layout: slice the rows before dequantizing
            (spec,) = group.specs
            arrays = {group.key(spec): self.file.get(group.hf_name(spec), rows=group.rows)}
        else:
            arrays = group.read_hf_arrays(self.file.get)
        if targets is None:
            return arrays
        return {key: np.asarray(array).astype(targets[key].dtype, copy=False) for key, array in arrays.items()}


# --------------------------------------------------------------------------- the file format
# GGUF v2/v3: magic, version u32, tensor count u64, metadata count u64, metadata (key, type, value),
# tensor infos (name, dims innermost first, type, offset), padding to `general.alignment`, data.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    def __init__(self, buffer, path: str):
        self.buffer, self.offset, self.path = buffer, 0, path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.buffer):
            raise CheckpointError(f"{self.path}: truncated GGUF header")
        (value,) = struct.unpack_from(fmt, self.buffer, self.offset)
        self.offset += size
        return value

    def string(self) -> str:
        length = self.take("<Q")
        if self.offset + length > len(self.buffer):
            raise CheckpointError(f"{self.path}: truncated GGUF header")
        raw = bytes(self.buffer[self.offset : self.offset + length])
        self.offset += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: corrupted GGUF header (a string is not UTF-8)") from None

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind != _ARRAY:
            raise CheckpointError(f"{self.path}: corrupted GGUF header (unknown value type {kind})")
        item, count = self.take("<I"), self.take("<Q")
        if item in _NUMPY:
            dtype = np.dtype(_NUMPY[item])
            if self.offset + count * dtype.itemsize > len(self.buffer):
                raise CheckpointError(f"{self.path}: truncated GGUF header")
            array = np.frombuffer(self.buffer, dtype, count, self.offset)
            self.offset += count * dtype.itemsize
            return array.tolist()
        return [self.value(item) for _ in range(count)]


def _gguf():
    """The optional `gguf` package (tensor types, block sizes, dequantization)."""
    return require("gguf", extra="gguf", feature="reading GGUF files")


def _parse(path: str) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    gguf = _gguf()
    buffer = np.memmap(path, np.uint8, mode="r")
    cursor = _Cursor(buffer, path)
    cursor.take("<I")  # magic, checked by the caller
    version = cursor.take("<I")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version}; qwen-jax reads versions 2 and 3")
    tensor_count, metadata_count = cursor.take("<Q"), cursor.take("<Q")
    metadata = {}
    for _ in range(metadata_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.take("<I"))
    infos = []
    for _ in range(tensor_count):
        name = cursor.string()
        dims = [cursor.take("<Q") for _ in range(cursor.take("<I"))]
        type_id, offset = cursor.take("<I"), cursor.take("<Q")
        try:
            tensor_type = gguf.GGMLQuantizationType(type_id)
        except ValueError:
            raise CheckpointError(
                f"{path}: tensor {name!r} has unknown GGUF tensor type {type_id} (newer than the "
                "installed gguf package, or a corrupted file)"
            ) from None
        infos.append((name, tuple(reversed(dims)), tensor_type, offset))
    alignment = int(metadata.get("general.alignment", 32))
    start = -(-cursor.offset // alignment) * alignment
    tensors = {}
    for name, shape, tensor_type, offset in infos:
        block, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
        elements = int(np.prod(shape, dtype=np.int64))
        nbytes = elements // block * block_bytes
        begin = start + offset
        if begin + nbytes > len(buffer):
            raise CheckpointError(
                f"{path}: truncated GGUF: tensor {name!r} needs bytes up to {begin + nbytes}, the "
                f"file has {len(buffer)}"
            )
        raw = buffer[begin : begin + nbytes]
        if tensor_type.name in ("F32", "F16"):
            data = raw.view(np.float32 if tensor_type.name == "F32" else np.float16).reshape(shape)
        else:
            data = raw.reshape(gguf.quants.quant_shape_to_byte_shape(shape, tensor_type))
        tensors[name] = GGUFTensor(name, shape, tensor_type, data)
    return metadata, tensors
