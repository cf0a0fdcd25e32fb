"""`qwen-jax train` settings: one dataclass; every field is a YAML key and a command-line flag.

Precedence: built-in defaults < `--config train.yaml` < flags given on the command line.
YAML keys use the field names (`learning_rate: 3e-4`); flags use dashes (`--learning-rate 3e-4`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from qwen_jax.config import ATTENTION_BACKENDS
from qwen_jax.errors import ConfigError, QuantizationError
from qwen_jax.extras import require
from qwen_jax.ops.quant import QuantScheme
from qwen_jax.train.data.sources import FORMATS, ColumnMapping

SCHEDULES = ("cosine", "linear", "constant")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
# What `beta` and `loss_type` mean when left unset (None), per method.
METHOD_DEFAULTS = {"dpo": {"beta": 0.1, "loss_type": "sigmoid"}, "grpo": {"beta": 0.0, "loss_type": "dapo"}}
DTYPES = ("auto", "float32", "bfloat16")
REMAT = ("none", "full", "dots", "dots_no_batch")


def _field(default, help: str, *, choices=None, kind=None, item=None):
    """A setting; `kind=list` with `item`: a list of items (a YAML list; the flag takes one or more
    values and may repeat)."""
    metadata = {"help": help, "choices": choices, "kind": kind, "item": item}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run (checked on construction; ConfigError names a bad one)."""

    # ---- what to train on, where to write
    model: str = _field(
        None, "base model: HF, GPTQ or AWQ directory, or converted Orbax directory (required)", kind=str
    )
    data: str = _field(
        None,
        "training data (required): JSONL or Parquet file, directory of Parquet files or of "
        "`datasets` save_to_disk, or a Hugging Face Hub dataset id",
        kind=str,
    )
    out: str = _field(
        None, "output directory: checkpoints/, model/, metrics.jsonl, loss_curve.png (required)", kind=str
    )
    eval_data: str = _field(
        None, "optional evaluation data, any form --data takes (eval loss in the metrics)", kind=str
    )
    tokenizer: str = _field(None, "tokenizer directory (default: the model directory)", kind=str)
    export_hf: str = _field(None, "also write the final model (LoRA merged) as HF safetensors here", kind=str)
    skip_bad_lines: bool = _field(False, "skip and count malformed data lines instead of stopping")
    method: str = _field(
        "sft",
        "training objective: supervised (sft), preference (dpo) or RL with rewards (grpo)",
        choices=("sft", "dpo", "grpo"),
    )
    beta: float = _field(
        None,
        "dpo: inverse temperature of the implicit reward (default 0.1); "
        "grpo: KL weight against the reference (default 0.0)",
        kind=float,
    )
    loss_type: str = _field(
        None, "dpo: sigmoid|ipo|hinge|robust (default sigmoid); grpo: grpo|dr_grpo|dapo|bnpo (default dapo)", kind=str
    )
    # ---- data
    data_split: str = _field("train", "split of a Hub dataset id or of a `datasets` DatasetDict directory", kind=str)
    data_format: str = _field("auto", "example form (auto: per record, by which columns it has)", choices=FORMATS)
    messages_column: str = _field("messages", "column of the chat messages (role/content dicts)", kind=str)
    prompt_column: str = _field(
        "prompt", "prompt column(s); several (e.g. 'instruction,input') are joined by a blank line", kind=str
    )
    completion_column: str = _field("completion", "completion column (alpaca: output)", kind=str)
    text_column: str = _field("text", "plain-text column", kind=str)
    seq_len: int = _field(512, "tokens per packed row; longer examples keep their first seq_len tokens")
    batch_size: int = _field(8, "packed rows per optimizer step (global, over all devices)")
    grad_accum: int = _field(1, "micro-batches per step (batch_size must be a multiple); gradients are summed")
    epochs: int = _field(1, "epochs to run when steps is 0")
    steps: int = _field(0, "optimizer steps to run (0: run `epochs` epochs)")
    seed: int = _field(0, "seed of data order, LoRA init and dropout")
    # ---- GRPO (method grpo; batch_size counts prompts, each rolled out num_generations times)
    reward: tuple = _field(
        (),
        "grpo: reward function, repeatable: a built-in (math_accuracy, boxed_format, think_format, "
        "overlong_penalty), path/to/file.py:function or module:function",
        kind=list,
        item=str,
    )
    reward_weights: tuple = _field((), "grpo: weights of the reward functions (default 1 each)", kind=list, item=float)
    num_generations: int = _field(8, "grpo: completions sampled per prompt (a group)")
    max_new_tokens: int = _field(256, "grpo: tokens a completion may have (prompt + this must fit seq_len)")
    temperature: float = _field(1.0, "grpo: rollout sampling temperature (log-probabilities use it too)")
    top_p: float = _field(1.0, "grpo: rollout nucleus sampling (1: off)")
    top_k: int = _field(0, "grpo: rollout top-k sampling (0: off)")
    epsilon: float = _field(0.2, "grpo: lower clip of the importance ratio (1 - epsilon)")
    epsilon_high: float = _field(
        None, "grpo: upper clip (1 + epsilon_high; DAPO uses 0.28) [default: epsilon]", kind=float
    )
    scale_rewards: str = _field(
        "group",
        "grpo: divide advantages by the reward std of the group, of the batch, or not",
        choices=("group", "batch", "none"),
    )
    num_iterations: int = _field(
        1, "grpo: policy updates per rollout batch (old log-probabilities: the rollout's policy)"
    )
    mask_truncated_completions: bool = _field(False, "grpo: leave completions cut at max_new_tokens out of the loss")
    # ---- optimizer
    learning_rate: float = _field(1e-4, "peak learning rate")
    schedule: str = _field("cosine", "learning-rate decay after warmup", choices=SCHEDULES)
    warmup_steps: int = _field(0, "linear warmup steps from 0 to the peak learning rate")
    min_lr_ratio: float = _field(0.0, "final learning rate as a fraction of the peak (cosine/linear)")
    weight_decay: float = _field(0.0, "AdamW weight decay (never applied to norms and biases)")
    adam_b1: float = _field(0.9, "AdamW beta1")
    adam_b2: float = _field(0.999, "AdamW beta2")
    adam_eps: float = _field(1e-8, "AdamW epsilon")
    max_grad_norm: float = _field(1.0, "clip gradients to this global norm (0: no clipping)")
    # ---- LoRA
    lora_rank: int = _field(0, "LoRA rank; 0 trains all weights (full fine-tuning)")
    lora_alpha: float = _field(16.0, "LoRA alpha (adapter output is scaled by alpha / rank)")
    lora_dropout: float = _field(0.0, "dropout on the adapter inputs during training")
    lora_targets: str = _field(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "comma-separated projections that get adapters"
    )
    quantize: str = _field(
        "",
        "quantize the frozen base model's projections (int8 or int4) while loading: QLoRA-style, needs lora_rank > 0",
        kind=str,
    )
    # ---- DPO
    label_smoothing: float = _field(
        0.0, "dpo, robust loss: probability that a preference label is flipped, in [0, 0.5) (as TRL)"
    )
    precompute_ref_logprobs: bool = _field(
        False,
        "dpo: compute the reference log-probabilities once before training and cache them with the "
        "token cache (full fine-tuning then keeps no frozen copy of the model)",
    )
    # ---- numerics, memory, devices
    compute_dtype: str = _field("auto", "activation dtype (auto: float32 on CPU, bfloat16 on GPU/TPU)", choices=DTYPES)
    param_dtype: str = _field("float32", "master weight dtype (auto: same as compute)", choices=DTYPES)
    remat: str = _field("none", "rematerialisation policy of the decoder layers", choices=REMAT)
    attention: str = _field(
        "auto",
        "attention backend (auto: chunked flash attention on CPU past short sequences, cuDNN on GPU, splash on TPU)",
        choices=ATTENTION_BACKENDS,
    )
    mesh: str = _field("", "device mesh, e.g. 'data=2,fsdp=4,tensor=1' (default: all devices on fsdp)", kind=str)
    # ---- checkpoints, evaluation, logging
    save_every: int = _field(100, "save a train checkpoint every N steps (0: only at the end and on signals)")
    keep_checkpoints: int = _field(3, "train checkpoints to keep")
    resume: bool = _field(False, "continue from the latest train checkpoint in OUT/checkpoints, if any")
    export_only: bool = _field(
        False,
        "train no further: write OUT/model (and export_hf) from the latest train "
        "checkpoint, e.g. after a run whose final export failed",
    )
    eval_every: int = _field(0, "evaluate every N steps (0: only at the end); needs eval_data")
    peak_tflops: float = _field(0.0, "peak TFLOP/s per device for MFU (0: known accelerators only)")
    progress: bool = _field(True, "show a progress bar")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.metadata["kind"] is list:  # YAML and argparse give lists; a frozen setting is a tuple
                object.__setattr__(self, f.name, tuple(getattr(self, f.name) or ()))
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name}: {getattr(self, f.name)!r} is not one of {', '.join(choices)}")
        positive = ("seq_len", "batch_size", "grad_accum", "epochs", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "steps",
            "warmup_steps",
            "save_every",
            "eval_every",
            "lora_rank",
            "weight_decay",
            "max_grad_norm",
            "peak_tflops",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.column_mapping.prompt:
            raise ConfigError("prompt_column names no column")
        if self.eval_every and not self.eval_data:
            raise ConfigError("eval_every is set but there is no eval_data")
        if self.quantize:
            try:
                QuantScheme.parse(self.quantize)
            except QuantizationError as e:
                raise ConfigError(f"quantize: {e}") from None
            if not self.lora_rank:
                raise ConfigError("quantize needs LoRA (lora_rank > 0): quantized base weights are frozen")
        self._check_method()

    def _check_method(self) -> None:
        """The settings of the training method (`method`) are valid for it."""
        if self.method == "dpo":
            if self.setting("beta") <= 0:
                raise ConfigError(f"beta must be > 0 for dpo, got {self.beta}")
            if self.setting("loss_type") not in DPO_LOSS_TYPES:
                raise ConfigError(f"loss_type: {self.loss_type!r} is not one of {', '.join(DPO_LOSS_TYPES)} (dpo)")
            if not 0.0 <= self.label_smoothing < 0.5:
                raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
            if self.label_smoothing and self.setting("loss_type") != "robust":
                raise ConfigError("label_smoothing applies to the robust loss only (as in TRL): add --loss-type robust")
        elif self.method == "grpo":
            self._check_grpo()
        elif self.method == "sft":
            given = [name for name in ("beta", "loss_type") if getattr(self, name) is not None]
            given += ["label_smoothing"] * bool(self.label_smoothing)
            given += ["precompute_ref_logprobs"] * self.precompute_ref_logprobs
            if given:
                raise ConfigError(f"{', '.join(given)}: not a setting of method sft (choose --method dpo or grpo)")
        if self.method != "dpo" and self.precompute_ref_logprobs:
            raise ConfigError("precompute_ref_logprobs is a setting of method dpo")
        if self.method != "dpo" and self.label_smoothing:
            raise ConfigError("label_smoothing is a setting of method dpo (its robust loss)")

    def setting(self, name: str) -> Any:
        """A method setting (`beta`, `loss_type`) as given, or the method's default when unset."""
        value = getattr(self, name)
        return METHOD_DEFAULTS.get(self.method, {}).get(name) if value is None else value

    def _check_grpo(self) -> None:
        """The GRPO settings are valid."""
        for name in ("num_generations", "max_new_tokens", "num_iterations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_new_tokens >= self.seq_len:
            raise ConfigError(
                f"max_new_tokens {self.max_new_tokens} leaves no room for a prompt in seq_len {self.seq_len}"
            )
        if self.setting("loss_type") not in GRPO_LOSS_TYPES:
            raise ConfigError(f"loss_type: {self.loss_type!r} is not a GRPO loss ({', '.join(GRPO_LOSS_TYPES)})")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 (GRPO samples its rollouts), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0 or self.top_k < 0:
            raise ConfigError(f"top_p must be in (0, 1] and top_k >= 0, got {self.top_p} and {self.top_k}")
        if self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ConfigError("epsilon and epsilon_high must be >= 0")
        if self.setting("beta") < 0:
            raise ConfigError(f"beta must be >= 0 for grpo, got {self.beta}")
        if not self.reward:
            raise ConfigError(
                "method grpo needs at least one --reward (a built-in name, file.py:function or module:function)"
            )
        if self.reward_weights and len(self.reward_weights) != len(self.reward):
            raise ConfigError(
                f"reward_weights has {len(self.reward_weights)} value(s) for {len(self.reward)} reward function(s)"
            )

    def check_required(self) -> None:
        """ConfigError unless model, data and out are set (a config may be built up before they are)."""
        missing = [name for name in ("model", "data", "out") if not getattr(self, name)]
        if missing:
            raise ConfigError(f"missing required setting(s): {', '.join(missing)} (flags or YAML keys)")

    @property
    def column_mapping(self) -> ColumnMapping:
        """How the data's columns map onto the example forms (`data_format` and the *_column settings)."""
        prompt = tuple(c.strip() for c in self.prompt_column.split(",") if c.strip())
        return ColumnMapping(
            self.data_format, self.messages_column, "tools", prompt, self.completion_column, self.text_column
        )

    @property
    def lora_target_list(self) -> tuple[str, ...]:
        """The projections that get LoRA adapters, from the comma-separated `lora_targets`."""
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with `changes` applied (and checked)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every setting by field name (what checkpoints and train_config.yaml record)."""
        return dataclasses.asdict(self)


def _kind(f: dataclasses.Field) -> type:
    return f.metadata["kind"] or type(f.default)


def coerce(name: str, value: Any) -> Any:
    """A YAML value checked (and int->float widened) against the field's type."""
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}.get(name)
    if f is None:
        known = ", ".join(f.name for f in dataclasses.fields(TrainConfig))
        raise ConfigError(f"unknown setting {name!r}; known settings: {known}")
    kind = _kind(f)
    if value is None:
        return None
    if kind is list:
        items = value if isinstance(value, list) else [value]  # one value may stand for a list of one
        item = f.metadata["item"]
        try:
            return [item(v) if not isinstance(v, bool) else _bad(name, v) for v in items]
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a list of {item.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:  # PyYAML (YAML 1.1) reads `1e-4` as a string; only `1.0e-4` is a float
            return float(value)
        except ValueError:
            pass
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _bad(name: str, value: Any) -> Any:
    raise ConfigError(f"{name}: unexpected {type(value).__name__} {value!r}")


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The settings of a YAML file (a mapping of field names to values)."""
    yaml = require("yaml", extra="train", feature="reading a train config file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    try:
        return {key: coerce(key, value) for key, value in data.items()}
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (default: unset, so YAML values are not overridden)."""
    parser.add_argument("--config", metavar="YAML", help="YAML file of settings (keys are the flag names with _)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _kind(f)
        help_text = f"{f.metadata['help']} [default: {f.default}]"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind is list:
            item = f.metadata["item"]
            parser.add_argument(
                flag,
                dest=f.name,
                action="extend",
                nargs="+",
                type=item,
                default=None,
                metavar=item.__name__.upper(),
                help=help_text,
            )
        else:
            parser.add_argument(
                flag,
                dest=f.name,
                type=kind,
                default=None,
                choices=f.metadata["choices"],
                metavar=None if f.metadata["choices"] else f.name.upper(),
                help=help_text,
            )


def from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the YAML file, then the flags that were given."""
    settings = read_yaml(args.config) if getattr(args, "config", None) else {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            settings[f.name] = value
    config = TrainConfig(**settings)
    config.check_required()
    return config
