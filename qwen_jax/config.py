"""Qwen2.5 configuration: a frozen dataclass with every field that changes the computation.

`Qwen2Config.from_hf` reads config.json as written by transformers 4.x (`rope_theta`,
`rope_scaling` with `"type"` or `"rope_type"`) and 5.x (`rope_parameters`, `layer_types`);
`to_hf` writes a config.json that both generations of transformers read.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from collections.abc import Mapping
from typing import Any

from qwen_jax.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)
SUPPORTED_MODEL_TYPES = ("qwen2",)
ROPE_TYPES = ("default", "linear", "dynamic", "yarn")
# The sizes config.json must give (the other settings have Qwen2's defaults).
_REQUIRED_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# Sizes a model cannot be built with unless they are >= 1 (checked when a config is constructed).
_POSITIVE_SIZES = (*_REQUIRED_SIZES, "num_key_value_heads", "max_position_embeddings")

# Attention backends (`qwen_jax.ops.attention`); here so command lines can list them without importing jax.
ATTENTION_BACKENDS = ("auto", "xla", "chunked", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """rope_scaling / rope_parameters beyond the base frequency (HF field names)."""

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None  # yarn
    attention_factor: float | None = None  # yarn: None -> 0.1 * ln(factor) + 1
    beta_fast: float | None = None  # yarn: None -> 32
    beta_slow: float | None = None  # yarn: None -> 1
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def to_hf(self) -> dict[str, Any] | None:
        if self.rope_type == "default":
            return None
        out: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in out or value is None or value == field.default:
                continue
            out[field.name] = value
        return out


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling = RopeScaling()
    tie_word_embeddings: bool = True
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    # Per-layer "full_attention" / "sliding_attention"; derived from the fields above when None.
    layer_types: tuple[str, ...] | None = None
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"

    def __post_init__(self):
        for name in _POSITIVE_SIZES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.rope_scaling.rope_type not in ROPE_TYPES:
            raise ConfigError(f"unsupported rope type {self.rope_scaling.rope_type!r}; supported: {ROPE_TYPES}")
        if self.layer_types is None:
            window_on = self.use_sliding_window and self.sliding_window is not None
            types = tuple(
                "sliding_attention" if window_on and i >= self.max_window_layers else "full_attention"
                for i in range(self.num_hidden_layers)
            )
            object.__setattr__(self, "layer_types", types)
        elif len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ConfigError("layer_types asks for sliding_attention but sliding_window is not set")

    # ----------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def context_length(self) -> int:
        """The longest sequence (prompt + generated tokens) the model is meant to handle:
        `max_position_embeddings`, or the original length times the rope scaling factor
        (Qwen2.5's YaRN factor 4 over 32,768 gives 131,072)."""
        scaling = self.rope_scaling
        if scaling.rope_type == "default":
            return self.max_position_embeddings
        original = scaling.original_max_position_embeddings or self.max_position_embeddings
        return max(self.max_position_embeddings, int(original * scaling.factor))

    def with_rope_scaling(self, spec: str | dict[str, Any] | RopeScaling | None) -> Qwen2Config:
        """This config with its rope scaling replaced, as Qwen tells users to do in config.json.

        spec: 'yarn:4' (factor 4 over the checkpoint's original length), 'linear:2', 'dynamic:2',
        'none' (plain rope), an HF `rope_scaling` dict, or a `RopeScaling`. None keeps the config.
        """
        if spec is None:
            return self
        original = self.rope_scaling.original_max_position_embeddings or self.max_position_embeddings
        return self.replace(rope_scaling=parse_rope_scaling(spec, original))

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Sliding window per layer; 0 means full attention."""
        return tuple(self.sliding_window if t == "sliding_attention" else 0 for t in self.layer_types)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def replace(self, **changes) -> Qwen2Config:
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = None
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- HF I/O
    @classmethod
    def from_hf(cls, config: dict[str, Any] | str | os.PathLike) -> Qwen2Config:
        """Build from a config.json dict, a config.json path, or a checkpoint directory."""
        if not isinstance(config, dict):
            config = read_config_json(config)
        architectures = config.get("architectures") or []
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES or (
            architectures and not set(architectures) & set(SUPPORTED_ARCHITECTURES)
        ):
            raise ConfigError(
                f"unsupported architecture {architectures or model_type!r} (model_type={model_type!r}); "
                f"qwen-jax implements {SUPPORTED_ARCHITECTURES[0]} (model_type 'qwen2')"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported hidden_act {config['hidden_act']!r}; Qwen2 uses 'silu'")
        for key in _REQUIRED_SIZES + (("num_key_value_heads",) if config.get("num_key_value_heads") else ()):
            value = config.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                given = "it is missing" if key not in config else f"got {value!r}"
                raise ConfigError(f"config.json: {key} must be a positive integer; {given}")
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        if config.get("head_dim") not in (None, hidden // heads):
            raise ConfigError(f"head_dim {config['head_dim']} != hidden_size // num_attention_heads")
        rope_theta, rope_scaling = _parse_rope(config)
        eos = config.get("eos_token_id")
        dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
        layer_types = config.get("layer_types")
        use_window = bool(config.get("use_sliding_window", False))
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=hidden,
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            max_position_embeddings=config.get("max_position_embeddings", 32768),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            use_sliding_window=use_window,
            # HF drops the window when use_sliding_window is false.
            sliding_window=config.get("sliding_window") if use_window else None,
            max_window_layers=config.get("max_window_layers", 28),
            layer_types=tuple(layer_types) if layer_types and use_window else None,
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=config.get("pad_token_id"),
            torch_dtype=str(dtype).replace("torch.", ""),
        )

    def to_hf(self) -> dict[str, Any]:
        """config.json contents (transformers 4.x layout, which 5.x also reads)."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        out = {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf(),
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": self.use_sliding_window,
            "sliding_window": self.sliding_window,
            "max_window_layers": self.max_window_layers,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "torch_dtype": self.torch_dtype,
        }
        if self.use_sliding_window:
            out["layer_types"] = list(self.layer_types)
        if self.pad_token_id is not None:
            out["pad_token_id"] = self.pad_token_id
        return out

    # ----------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str) -> Qwen2Config:
        """Architecture of a published Qwen2.5 size: '0.5B', '1.5B', '3B', '7B', '14B', '32B', '72B'."""
        key = name.upper().removeprefix("QWEN2.5-").removesuffix("-INSTRUCT")
        if key not in _PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(_PRESETS)}")
        return cls(**_PRESETS[key])

    @classmethod
    def qwen2_5_0_5b(cls) -> Qwen2Config:
        return cls.preset("0.5B")

    @classmethod
    def qwen2_5_1_5b(cls) -> Qwen2Config:
        return cls.preset("1.5B")

    @classmethod
    def qwen2_5_3b(cls) -> Qwen2Config:
        return cls.preset("3B")

    @classmethod
    def qwen2_5_7b(cls) -> Qwen2Config:
        return cls.preset("7B")

    @classmethod
    def qwen2_5_14b(cls) -> Qwen2Config:
        return cls.preset("14B")

    @classmethod
    def qwen2_5_32b(cls) -> Qwen2Config:
        return cls.preset("32B")

    @classmethod
    def qwen2_5_72b(cls) -> Qwen2Config:
        return cls.preset("72B")


def _preset(hidden, layers, heads, kv_heads, mlp, vocab, tied, eps=1e-6):
    return dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=mlp,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        rms_norm_eps=eps,
    )


# Instruct checkpoints (see shared/reference/qwen2.5-configs.json).
_PRESETS = {
    "0.5B": _preset(896, 24, 14, 2, 4864, 151936, True),
    "1.5B": _preset(1536, 28, 12, 2, 8960, 151936, True),
    "3B": _preset(2048, 36, 16, 2, 11008, 151936, True),
    "7B": _preset(3584, 28, 28, 4, 18944, 152064, False),
    "14B": _preset(5120, 48, 40, 8, 13824, 152064, False),
    "32B": _preset(5120, 64, 40, 8, 27648, 152064, False),
    "72B": _preset(8192, 80, 64, 8, 29568, 152064, False),
}
PRESET_NAMES = tuple(_PRESETS)


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{path}: config.json not found")
    return _read_json_object(path)


def _read_json_object(path: str) -> dict[str, Any]:
    """A JSON file holding one object; what cannot be read is a ConfigError naming the file."""
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read {name} ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {name} is not a JSON object")
    return data


def parse_rope_scaling(spec: str | dict[str, Any] | RopeScaling, original_max_position_embeddings: int) -> RopeScaling:
    """A rope scaling from a command-line spec (`TYPE:FACTOR`, or 'none'), an HF dict or a RopeScaling.

    YaRN's original length defaults to `original_max_position_embeddings` (the checkpoint's).
    """
    if isinstance(spec, RopeScaling):
        return spec
    if isinstance(spec, dict):
        return _parse_rope({"rope_scaling": spec, "max_position_embeddings": original_max_position_embeddings})[1]
    text = str(spec).strip().lower()
    if text in ("none", "default"):
        return RopeScaling()
    rope_type, sep, factor = text.partition(":")
    try:
        value = float(factor)
    except ValueError:
        value = 0.0
    if not sep or rope_type not in ROPE_TYPES[1:] or value < 1.0:
        raise ConfigError(
            f"bad rope scaling {spec!r}: expected TYPE:FACTOR with TYPE one of "
            f"{', '.join(ROPE_TYPES[1:])} and FACTOR >= 1 (e.g. 'yarn:4'), or 'none'"
        )
    original = original_max_position_embeddings if rope_type == "yarn" else None
    return RopeScaling(rope_type=rope_type, factor=value, original_max_position_embeddings=original)


def _parse_rope(config: dict[str, Any]) -> tuple[float, RopeScaling]:
    """Normalise the three rope spellings found in the wild."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    if params:  # transformers 5.x
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        scaling = params
    else:
        theta = config.get("rope_theta", 10000.0)
        scaling = config.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        return theta, RopeScaling()
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"unsupported rope_scaling type {rope_type!r}; supported: {ROPE_TYPES}")
    if "factor" not in scaling:
        raise ConfigError(f"rope_scaling of type {rope_type!r} needs a 'factor'")
    original = scaling.get("original_max_position_embeddings")
    if rope_type == "yarn" and original is None:
        original = config.get("max_position_embeddings")
    truncate = scaling.get("truncate")
    return theta, RopeScaling(
        rope_type=rope_type,
        factor=float(scaling["factor"]),
        original_max_position_embeddings=original,
        attention_factor=scaling.get("attention_factor"),
        beta_fast=scaling.get("beta_fast"),
        beta_slow=scaling.get("beta_slow"),
        mscale=scaling.get("mscale"),
        mscale_all_dim=scaling.get("mscale_all_dim"),
        truncate=True if truncate is None else bool(truncate),
    )


GENERATION_CONFIG_FILE = "generation_config.json"


# ----------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Sampling defaults. `temperature == 0` is greedy decoding.

    `GenerationConfig.from_pretrained(dir)` reads the checkpoint's generation_config.json with HF
    semantics (`do_sample: false` -> greedy; HF's top_k default of 50 when sampling).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def replace(self, **changes) -> GenerationConfig:
        """A copy with the given fields changed; None values are ignored (keep the default)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "eos_token_ids" in changes:
            changes["eos_token_ids"] = tuple(int(i) for i in changes["eos_token_ids"])
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, generation_config: Mapping[str, Any], model_config: Qwen2Config | None = None) -> GenerationConfig:
        """From a generation_config.json dict; eos ids are the union of it and the model config's."""
        do_sample = bool(generation_config.get("do_sample", False))
        eos = _as_ids(generation_config.get("eos_token_id"))
        if model_config is not None:
            eos += tuple(i for i in model_config.eos_token_ids if i not in eos)
        pad = generation_config.get("pad_token_id")
        if pad is None and model_config is not None:
            pad = model_config.pad_token_id
        return cls(
            max_new_tokens=int(generation_config.get("max_new_tokens") or cls.max_new_tokens),
            temperature=float(generation_config.get("temperature", 1.0)) if do_sample else 0.0,
            top_k=int(generation_config.get("top_k", 50) or 0) if do_sample else 0,
            top_p=float(generation_config.get("top_p", 1.0) or 1.0),
            min_p=float(generation_config.get("min_p") or 0.0),
            repetition_penalty=float(generation_config.get("repetition_penalty", 1.0) or 1.0),
            eos_token_ids=eos,
            pad_token_id=pad,
        )

    @classmethod
    def from_model_config(cls, model_config: Qwen2Config) -> GenerationConfig:
        """Greedy, stopping on the model config's eos ids (for checkpoints without generation_config.json)."""
        return cls(eos_token_ids=model_config.eos_token_ids, pad_token_id=model_config.pad_token_id)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, model_config: Qwen2Config | None = None) -> GenerationConfig:
        """generation_config.json of a checkpoint directory, or the model-config defaults without one."""
        file = os.path.join(os.fspath(path), GENERATION_CONFIG_FILE)
        if os.path.isfile(file):
            return cls.from_hf(_read_json_object(file), model_config)
        if model_config is None:
            return cls()
        return cls.from_model_config(model_config)


def _as_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(i) for i in value)
