"""Reward functions for GRPO: TRL's signature, the built-in ones, loading them by name, and scoring.

A reward function is called once per rollout batch as TRL calls it:

    fn(prompts, completions, completion_ids=..., max_completion_length=..., **columns) -> list[float | None]

`prompts` and `completions` are lists (one entry per completion; a prompt repeats for each of its
generations). For a plain-text prompt a completion is its text; for a conversational prompt (a
list of messages) it is `[{"role": "assistant", "content": text}]`. `completion_ids` are the
generated token ids; every other column of the data is passed by its name (e.g. `answer`), one
value per completion. `None` means "not applicable": it is left out of means and of the group
baseline (TRL's nan-aware handling), and a completion every function returned `None` for gets no
advantage. Functions that take `**kwargs` receive everything; a function that names a keyword the
data does not have is refused before it runs, naming the column.

`--reward` takes a built-in name (`BUILTIN_REWARDS`), `path/to/file.py:function` or
`package.module:function`; `--reward-weights` weighs their sum (default 1 each).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from qwen_jax.errors import ConfigError, DataError
from qwen_jax.extras import require

RewardFunction = Callable[..., list]
"""`fn(prompts, completions, **kwargs) -> list[float | None]` (see the module docstring)."""

# Keyword arguments every reward function may take besides the data's columns.
TRAINER_KWARGS = ("completion_ids", "max_completion_length")

_BOXED = re.compile(r"\\boxed\{")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_THINK_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*\S.*$", re.DOTALL)


def completion_text(completion: str | Sequence[Mapping[str, Any]]) -> str:
    """The text of a completion: itself, or the content of its (last) assistant message."""
    if isinstance(completion, str):
        return completion
    return str(completion[-1].get("content", "")) if completion else ""


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (nested braces balanced), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[start:index]
    return None


def final_answer(text: str) -> str | None:
    """A completion's final answer: the last `\\boxed{}` content, else the last number, else None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def math_accuracy(prompts: list, completions: list, answer: list, **kwargs: Any) -> list[float | None]:
    """1.0 where the completion's final answer (`final_answer`) equals the `answer` column
    mathematically (math-verify: 1/2 = 0.5 = \\frac{1}{2}), else 0.0; None where the answer
    itself cannot be parsed (TRL's accuracy reward does the same)."""
    math_verify = require("math_verify", extra="rl", feature="the math_accuracy reward")
    scores: list[float | None] = []
    for completion, gold in zip(completions, answer):
        gold_parsed = math_verify.parse(_as_math(str(gold)))
        if not gold_parsed:
            scores.append(None)
            continue
        predicted = final_answer(completion_text(completion))
        if predicted is None:
            scores.append(0.0)
            continue
        scores.append(1.0 if math_verify.verify(gold_parsed, math_verify.parse(_as_math(predicted))) else 0.0)
    return scores


def _as_math(text: str) -> str:
    """GSM8K answers end in `#### 72`; everything else is wrapped as inline LaTeX for math-verify."""
    text = text.split("####")[-1].strip()
    return text if text.startswith("$") else f"${text}$"


def boxed_format(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """1.0 where the completion puts an answer in `\\boxed{...}`, else 0.0."""
    return [0.0 if last_boxed(completion_text(c)) in (None, "") else 1.0 for c in completions]


def think_format(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """1.0 where the completion is `<think>...</think>` followed by an answer, else 0.0 (regex)."""
    return [1.0 if _THINK_FORMAT.match(completion_text(c)) else 0.0 for c in completions]


def overlong_penalty(
    prompts: list,
    completions: list,
    completion_ids: list,
    max_completion_length: int,
    soft_cache: int | None = None,
    **kwargs: Any,
) -> list[float]:
    """DAPO's soft overlong punishment: 0 up to `max_completion_length - soft_cache` tokens, then a
    linear ramp down to -1 at `max_completion_length` (soft_cache: a fifth of it by default)."""
    cache = soft_cache if soft_cache is not None else max(max_completion_length // 5, 1)
    free = max_completion_length - cache
    scores = []
    for ids in completion_ids:
        length = len(ids)
        scores.append(0.0 if length <= free else -1.0 if length > max_completion_length else (free - length) / cache)
    return scores


BUILTIN_REWARDS: dict[str, RewardFunction] = {
    "math_accuracy": math_accuracy,
    "boxed_format": boxed_format,
    "think_format": think_format,
    "overlong_penalty": overlong_penalty,
}


@dataclasses.dataclass(frozen=True)
class Reward:
    """A reward function, the name its metrics carry (`rewards/<name>/mean`) and its weight."""

    name: str
    function: RewardFunction
    weight: float = 1.0

    def needed_columns(self) -> tuple[str, ...]:
        """Keyword parameters without a default that are not trainer-provided: data columns it needs."""
        try:
            parameters = list(inspect.signature(self.function).parameters.values())
        except (TypeError, ValueError):  # builtins and some callables have no signature
            return ()
        named = [p for p in parameters[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        return tuple(p.name for p in named if p.default is p.empty and p.name not in TRAINER_KWARGS)


def load_function(spec: str) -> tuple[str, RewardFunction]:
    """`--reward` value -> (name, function): a built-in name, `path.py:function` or `module:function`."""
    if spec in BUILTIN_REWARDS:
        return spec, BUILTIN_REWARDS[spec]
    where, sep, attribute = spec.rpartition(":")
    if not sep or not where or not attribute:
        raise ConfigError(
            f"reward {spec!r}: not a built-in ({', '.join(BUILTIN_REWARDS)}) nor path.py:function or module:function"
        )
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise ConfigError(f"reward {spec!r}: file {where} not found")
        module_spec = importlib.util.spec_from_file_location(f"qwen_jax_reward_{abs(hash(where))}", where)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise ConfigError(f"reward {spec!r}: importing {where} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ConfigError(f"reward {spec!r}: cannot import module {where}: {e}") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(f"reward {spec!r}: {where} has no function {attribute!r}")
    return attribute, function


def load_rewards(specs: Sequence[str], weights: Sequence[float] | None = None) -> list[Reward]:
    """The reward functions `--reward` names, with `--reward-weights` (default: 1 each)."""
    if not specs:
        raise ConfigError("GRPO needs at least one reward function (--reward NAME|path.py:function|module:function)")
    if weights is not None and len(weights) != len(specs):
        raise ConfigError(f"reward_weights has {len(weights)} weight(s) for {len(specs)} reward function(s)")
    loaded = [load_function(spec) for spec in specs]
    names = [name for name, _ in loaded]
    duplicates = {name for name in names if names.count(name) > 1}
    if duplicates:
        raise ConfigError(f"reward functions with the same name: {', '.join(sorted(duplicates))}")
    weights = weights if weights is not None else [1.0] * len(specs)
    return [Reward(name, function, float(w)) for (name, function), w in zip(loaded, weights)]


def check_columns(rewards: Sequence[Reward], columns: Sequence[str]) -> None:
    """DataError naming the first data column a reward function needs that the records lack."""
    for reward in rewards:
        for column in reward.needed_columns():
            if column not in columns:
                raise DataError(
                    f"reward function {reward.name!r} needs the column {column!r}, which the data does not have "
                    f"(columns: {', '.join(columns) or 'none'})"
                )


def score(
    rewards: Sequence[Reward],
    prompts: list,
    completions: list,
    columns: Mapping[str, list],
    completion_ids: list[list[int]],
    max_completion_length: int,
) -> np.ndarray:
    """Every reward function on a rollout batch: `[completions, functions]` float32, NaN for None."""
    kwargs = {**columns, "completion_ids": completion_ids, "max_completion_length": max_completion_length}
    out = np.full((len(completions), len(rewards)), np.nan, np.float32)
    for column, reward in enumerate(rewards):
        try:
            values = reward.function(prompts, completions, **kwargs)
        except Exception as e:
            raise DataError(f"reward function {reward.name!r} raised {type(e).__name__}: {e}") from e
        try:
            values = list(values)
        except TypeError:
            raise DataError(
                f"reward function {reward.name!r} returned {type(values).__name__}, not a list of floats"
            ) from None
        if len(values) != len(completions):
            raise DataError(
                f"reward function {reward.name!r} returned {len(values)} values for {len(completions)} completions"
            )
        for row, value in enumerate(values):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or math.isnan(value):
                raise DataError(f"reward function {reward.name!r} returned {value!r}; expected a float or None")
            out[row, column] = value
    return out


def weighted_sum(per_function: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """TRL's total reward: the weighted nan-sum over functions; NaN where every function gave None."""
    total = np.nansum(per_function * np.asarray(weights, np.float32)[None, :], axis=1)
    total[np.isnan(per_function).all(axis=1)] = np.nan
    return total


def nan_mean(values: np.ndarray) -> float:
    """Mean over the non-NaN values (NaN when there are none), without numpy's empty-slice warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values))
