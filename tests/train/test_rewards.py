"""GRPO reward functions: built-ins, loading by name, TRL's calling convention and bad functions."""

import math
import textwrap

import numpy as np
import pytest
from trl.rewards import get_soft_overlong_punishment

from qwen_jax.errors import ConfigError, DataError
from qwen_jax.train.rewards import (
    Reward,
    check_columns,
    final_answer,
    load_rewards,
    math_accuracy,
    score,
    weighted_sum,
)


def test_final_answer_takes_the_last_boxed_else_the_last_number():
    assert final_answer(r"so \boxed{3} no, \boxed{\frac{1}{2}} is it") == r"\frac{1}{2}"
    assert final_answer("first 12, then 1,234.5 apples") == "1234.5"
    assert final_answer("no answer") is None


def test_math_accuracy_compares_mathematically():
    completions = [
        r"it is \boxed{0.5}",
        "the total is 72",
        "maybe 71",
        "nothing",
        [{"role": "assistant", "content": "= 4"}],
    ]
    answers = [r"\frac{1}{2}", "Natalia sold ... #### 72", "72", "3", "4"]
    assert math_accuracy([""] * 5, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_builtin_formats_and_overlong_penalty_match_trl():
    rewards = load_rewards(["boxed_format", "think_format", "overlong_penalty"])
    completions = [r"<think>hm</think> \boxed{2}", "plain", "<think>x</think>"]
    ids = [[1] * 10, [1] * 18, [1] * 21]
    scores = score(rewards, ["p"] * 3, completions, {}, ids, max_completion_length=20)
    np.testing.assert_array_equal(scores[:, 0], [1, 0, 0])
    np.testing.assert_array_equal(scores[:, 1], [1, 0, 0])
    trl_overlong = get_soft_overlong_punishment(max_completion_len=20, soft_punish_cache=4)
    np.testing.assert_allclose(scores[:, 2], trl_overlong(completion_ids=ids), atol=1e-6)


def test_user_functions_from_a_file_and_a_module_with_weights_and_none(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(
        textwrap.dedent(
            """
            def length(prompts, completions, **kwargs):
                return [float(len(c)) for c in completions]

            def only_even(prompts, completions, index, **kwargs):
                return [1.0 if i % 2 == 0 else None for i in index]
            """
        )
    )
    rewards = load_rewards(
        [f"{path}:length", f"{path}:only_even", "qwen_jax.train.rewards:boxed_format"], [0.5, 2.0, 1.0]
    )
    assert [r.name for r in rewards] == ["length", "only_even", "boxed_format"]
    per_function = score(rewards, ["p", "p"], ["ab", "abcd"], {"index": [0, 1]}, [[1], [2]], 8)
    np.testing.assert_array_equal(per_function[:, 1], [1.0, np.nan])
    np.testing.assert_allclose(weighted_sum(per_function, [0.5, 2.0, 1.0]), [3.0, 2.0])
    all_none = weighted_sum(np.full((1, 2), np.nan, np.float32), [1.0, 1.0])
    assert math.isnan(all_none[0])


def test_bad_reward_functions_are_named(tmp_path):
    with pytest.raises(ConfigError, match="not a built-in"):
        load_rewards(["nonsense"])
    with pytest.raises(ConfigError, match="not found"):
        load_rewards([f"{tmp_path}/missing.py:f"])
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        load_rewards(["qwen_jax.train.rewards:nope"])
    with pytest.raises(ConfigError, match="2 weight"):
        load_rewards(["boxed_format"], [1.0, 2.0])

    def raises(prompts, completions, **kwargs):
        raise KeyError("boom")

    def short(prompts, completions, **kwargs):
        return [1.0]

    def text(prompts, completions, **kwargs):
        return ["good"] * len(completions)

    for function, message in [
        (raises, "'raises' raised KeyError"),
        (short, "'short' returned 1 values for 2 completions"),
        (text, "'text' returned 'good'"),
    ]:
        with pytest.raises(DataError, match=message):
            score([Reward(function.__name__, function)], ["p", "p"], ["a", "b"], {}, [[1], [2]], 8)
    with pytest.raises(DataError, match="'math_accuracy' needs the column 'answer'.*columns: prompt, solution"):
        check_columns(load_rewards(["math_accuracy"]), ["prompt", "solution"])
