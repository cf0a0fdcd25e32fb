"""Sampling options: one keyword set resolved against the defaults, one validator, one stop-string parser."""

import dataclasses

import pytest

from qwen_jax.config import GenerationConfig
from qwen_jax.errors import GenerationError
from qwen_jax.generation.options import (
    SAMPLING_KEYS,
    SamplingKwargs,
    generation_defaults,
    initial_history,
    parse_stop,
    resolve,
    resolve_batch,
    row_params,
)
from qwen_jax.generation.sampler import seed_key_data

VOCAB = 300
CONFIG = GenerationConfig(
    max_new_tokens=50, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05, seed=5, eos_token_ids=(2, 7)
)


def test_defaults_come_from_the_config_and_overrides_win():
    options = resolve(CONFIG, vocab_size=VOCAB)
    assert (options.max_new_tokens, options.temperature, options.top_k, options.top_p) == (50, 0.7, 20, 0.8)
    assert (options.repetition_penalty, options.seed, options.stop_token_ids) == (1.05, 5, {2, 7})
    assert (options.presence_penalty, options.frequency_penalty, options.logit_bias, options.stop_strings) == (
        0.0,
        0.0,
        (),
        (),
    )
    given = resolve(CONFIG, vocab_size=VOCAB, temperature=0, top_p=None, seed=-1, stop=["END", 9], max_new_tokens=3)
    assert given.greedy and given.top_p == 0.8  # None: the default
    assert given.seed == 2**64 - 1 and given.max_new_tokens == 3
    assert given.stop_token_ids == {2, 7, 9} and given.stop_strings == ("END",)
    assert resolve(CONFIG, vocab_size=VOCAB, top_k=VOCAB).top_k == 0  # keeps every token: off
    assert resolve(CONFIG, vocab_size=VOCAB, stop_token_ids=[11]).stop_token_ids == {2, 7, 11}
    biased = resolve(CONFIG, vocab_size=VOCAB, logit_bias={9: -100, 3: 2.5}, presence_penalty=1, frequency_penalty=-2)
    assert biased.logit_bias == ((3, 2.5), (9, -100.0)) and biased.adjusts_logits
    assert isinstance(biased.presence_penalty, float) and biased.presence_penalty == 1.0
    plain = resolve(GenerationConfig(), vocab_size=VOCAB)
    assert plain.greedy and not plain.adjusts_logits and plain.draw_settings == (0.0, 0, 1.0)


def test_options_are_frozen_and_validated_on_change():
    options = resolve(CONFIG, vocab_size=VOCAB)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.temperature = 1.0
    assert options.replace(temperature=1.5).temperature == 1.5
    with pytest.raises(GenerationError, match="temperature"):
        options.replace(temperature=-0.5)


def test_the_keyword_set_is_defined_once():
    assert SAMPLING_KEYS == set(SamplingKwargs.__annotations__)
    assert SAMPLING_KEYS == {
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "seed",
        "stop",
        "json_schema",
        "regex",
        "choice",
        "grammar",
    }
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'tempreature' \(sampling options: "):
        resolve(CONFIG, vocab_size=VOCAB, tempreature=0.5)


@pytest.mark.parametrize(
    "bad, param, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens", "max_new_tokens must be >= 1"),
        (dict(max_new_tokens=2.5), "max_new_tokens", "max_new_tokens must be >= 1"),
        (dict(temperature="hot"), "temperature", "temperature must be >= 0"),
        (dict(top_k=True), "top_k", "top_k must be >= 0"),
        (dict(min_p=-0.1), "min_p", "min_p must be in"),
        (dict(repetition_penalty=-1), "repetition_penalty", "repetition_penalty must be > 0"),
        (dict(presence_penalty=3), "presence_penalty", "presence_penalty must be a number between -2 and 2, got 3"),
        (dict(frequency_penalty="high"), "frequency_penalty", "frequency_penalty must be a number"),
        (dict(seed=2**64), "seed", r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
        (dict(seed=1.5), "seed", "seed must be an integer"),
        (dict(logit_bias={VOCAB: 1.0}), "logit_bias", f"logit_bias token id {VOCAB} is not in the vocabulary"),
        (dict(logit_bias={5: 200}), "logit_bias", "logit_bias value for token 5 must be a number between -100 and 100"),
        (dict(logit_bias=[(5, 1.0)]), "logit_bias", "logit_bias must map token ids to numbers"),
        (dict(stop=[VOCAB]), "stop", r"stop token ids \[300\] are outside the vocabulary"),
    ],
)
def test_one_validator_names_the_setting(bad, param, message):
    with pytest.raises(GenerationError, match=message) as info:
        resolve(CONFIG, vocab_size=VOCAB, **bad)
    assert info.value.param == param


def test_stop_parsing_has_one_set_of_rules():
    assert parse_stop(None) == ([], [])
    assert parse_stop("END") == ([], ["END"])
    assert parse_stop(7) == ([7], [])
    assert parse_stop(["a", 3, "b"]) == ([3], ["a", "b"])
    for bad, message in [
        ([""], "stop strings must not be empty"),
        ("", "stop strings must not be empty"),
        ([True], "stop must hold strings or token ids"),
        ([1.5], "stop must hold strings or token ids"),
        ({"a"}, "stop must be a string, a token id or a list of them"),
    ]:
        with pytest.raises(GenerationError, match=message) as info:
            parse_stop(bad)
        assert info.value.param == "stop"


def test_batch_seeds_one_for_all_or_one_per_prompt():
    options, seeds = resolve_batch(CONFIG, 3, vocab_size=VOCAB)
    assert seeds == [5, 5, 5] == [options.seed] * 3
    assert resolve_batch(CONFIG, 3, vocab_size=VOCAB, seed=9)[1] == [9, 9, 9]
    assert resolve_batch(CONFIG, 3, vocab_size=VOCAB, seed=[1, -1, 2**63])[1] == [1, 2**64 - 1, 2**63]
    with pytest.raises(GenerationError, match="2 seeds for 3 prompts") as info:
        resolve_batch(CONFIG, 3, vocab_size=VOCAB, seed=[1, 2])
    assert info.value.param == "seed"
    with pytest.raises(GenerationError, match="seed must be an integer"):
        resolve_batch(CONFIG, 2, vocab_size=VOCAB, seed=[1, "x"])
    with pytest.raises(GenerationError, match="seed must be an integer"):
        resolve(CONFIG, vocab_size=VOCAB, seed=[1, 2])  # a single request takes one seed


def test_sampler_inputs_from_options():
    options = resolve(CONFIG, vocab_size=VOCAB, logit_bias={4: -3.0}, min_p=0.1)
    params = row_params(options, [1, 2**40 + 7])
    assert params.temperature.tolist() == pytest.approx([0.7, 0.7]) and params.top_k.tolist() == [20, 20]
    assert params.key_data.tolist() == [seed_key_data(1).tolist(), seed_key_data(2**40 + 7).tolist()]
    assert params.token_index.tolist() == [0, 0] and params.min_p.tolist() == pytest.approx([0.1, 0.1])
    history = initial_history(options, VOCAB, [[1, 2], [3]])
    assert history.seen[0, [1, 2]].all() and history.seen[0].sum() == 2 and history.seen[1].sum() == 1
    assert (history.bias[:, 4] == -3.0).all() and history.bias.sum() == -6.0 and not history.counts.any()


class _Tokenizer:
    eos_token_id = 9
    pad_token_id = 8


class _Model:
    """What `generation_defaults` reads of a `Qwen2ForCausalLM`: its config and its declared generation config."""

    config = dataclasses.make_dataclass("C", [("eos_token_ids", tuple), ("pad_token_id", object)])((3,), None)
    generation_config = None


def test_generation_defaults_add_the_tokenizer_eos():
    model = _Model()
    assert generation_defaults(model).eos_token_ids == (3,)  # no generation config: the model config's eos
    with_tokenizer = generation_defaults(model, _Tokenizer())
    assert with_tokenizer.eos_token_ids == (3, 9) and with_tokenizer.pad_token_id == 8
    model.generation_config = CONFIG
    assert generation_defaults(model, _Tokenizer()).eos_token_ids == (2, 7, 9)
    given = GenerationConfig(eos_token_ids=(9,), pad_token_id=1)
    assert generation_defaults(model, _Tokenizer(), given) == given
