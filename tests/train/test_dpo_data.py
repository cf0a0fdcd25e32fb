"""Preference data (`qwen_jax.train.data.preference`): TRL's three record formats tokenize as TRL 1.16's
`DPOTrainer._prepare_dataset` does (run here on the same records with the Qwen2.5 tokenizer), every
source train reads gives the same pairs through the token cache, a bad record is one error naming it,
and the loader's batches are deterministic, resumable and cut as TRL's `keep_start`."""

import json
import types

import numpy as np
import pytest
from train_fixtures import QWEN_TOKENIZER

from qwen_jax.errors import DataError
from qwen_jax.tokenizer import Tokenizer
from qwen_jax.train.config import TrainConfig
from qwen_jax.train.data.preference import (
    PreferenceColumns,
    PreferenceLoader,
    PreferenceTokenization,
    open_preference_loader,
)

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")

SYSTEM = {"role": "system", "content": "You are terse."}
FORMATS = {
    "explicit strings": [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " five<|im_end|>"},  # already ends with EOS
        {"prompt": "Hello", "chosen": "! How are you?", "rejected": "...go away"},  # tokens merge across the cut
    ],
    "conversational": [
        {
            "prompt": [{"role": "user", "content": "What color is the sky?"}],
            "chosen": [{"role": "assistant", "content": "Blue."}],
            "rejected": [{"role": "assistant", "content": "Green."}],
        },
        {
            "prompt": [
                SYSTEM,
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "2+2?"},
            ],
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "I cannot say."}],
        },
    ],
    "implicit conversations": [
        {
            "chosen": [
                SYSTEM,
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."},
            ],
            "rejected": [
                SYSTEM,
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Rome."},
            ],
        }
    ],
    "implicit strings": [
        {"chosen": "The capital of France is Paris.", "rejected": "The capital of France is Rome."},
    ],
}


@pytest.fixture(scope="module")
def tokenizers():
    return Tokenizer.from_dir(QWEN_TOKENIZER), transformers.AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER))


def _trl_tokenize(records, hf_tokenizer):
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    trainer = types.SimpleNamespace(_tokenizer=hf_tokenizer)
    dataset = datasets.Dataset.from_list(records)
    prepared = dpo_trainer.DPOTrainer._prepare_dataset(trainer, dataset, hf_tokenizer, args, "train")
    return [(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in prepared]


def _ours(records, tokenizer):
    tokenization, columns = PreferenceTokenization(tokenizer), PreferenceColumns()
    out = []
    for record in records:
        chosen, rejected = tokenization.examples(columns.canonical(record))
        prompt = chosen.tokens[~chosen.loss_mask].tolist()
        assert rejected.tokens[~rejected.loss_mask].tolist() == prompt  # one prompt, then the completion only
        assert chosen.loss_mask[len(prompt) :].all() and rejected.loss_mask[len(prompt) :].all()
        out.append((prompt, chosen.tokens[chosen.loss_mask].tolist(), rejected.tokens[rejected.loss_mask].tolist()))
    return out


@pytest.mark.parametrize("form", FORMATS)
def test_formats_tokenize_as_trl(form, tokenizers):
    ours, hf = tokenizers
    expected = _trl_tokenize(FORMATS[form], hf)
    assert _ours(FORMATS[form], ours) == expected
    assert all(prompt and chosen and rejected for prompt, chosen, rejected in expected)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _config(tmp_path, data, **overrides):
    settings = dict(
        model="unused", data=data, out=str(tmp_path / "out"), method="dpo", seq_len=64, batch_size=2, progress=False
    )
    return TrainConfig(**{**settings, **overrides})


def _pairs(loader):
    return [
        (loader.store.example(2 * p).tokens.tolist(), loader.store.example(2 * p + 1).tokens.tolist())
        for p in loader.kept
    ]


def test_every_source_gives_the_same_pairs_through_the_cache(tokenizers, tmp_path):
    ours, _ = tokenizers
    records = FORMATS["explicit strings"] + FORMATS["implicit strings"]
    jsonl = _write_jsonl(tmp_path / "pairs.jsonl", records)
    table = datasets.Dataset.from_list(records)
    table.to_parquet(str(tmp_path / "pairs.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    tokenization = PreferenceTokenization(ours)
    loaded = {}
    for spec in (jsonl, str(tmp_path / "pairs.parquet"), str(tmp_path / "saved")):
        loader, stats = open_preference_loader(
            spec, _config(tmp_path, spec), tokenization, str(QWEN_TOKENIZER), shuffle=False, log=lambda _: None
        )
        assert stats.examples == len(records) == loader.pairs
        loaded[spec] = _pairs(loader)
    expected = [tuple(p + c for c in (chosen, rejected)) for p, chosen, rejected in _ours(records, ours)]
    assert all(pairs == expected for pairs in loaded.values())
    again, _ = open_preference_loader(
        jsonl, _config(tmp_path, jsonl), tokenization, str(QWEN_TOKENIZER), shuffle=False, log=print
    )
    assert _pairs(again) == expected  # from the cache


def test_a_pair_without_rejected_is_one_error_naming_the_record(tokenizers, tmp_path):
    records = [FORMATS["explicit strings"][0], {"prompt": "The sky is", "chosen": " blue."}]
    path = _write_jsonl(tmp_path / "bad.jsonl", records)
    tokenization = PreferenceTokenization(tokenizers[0])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: .*no 'rejected'"):
        open_preference_loader(
            path, _config(tmp_path, path), tokenization, str(QWEN_TOKENIZER), shuffle=False, log=lambda _: None
        )
    mixed = _write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "Hi", "chosen": [SYSTEM], "rejected": "no"}])
    with pytest.raises(DataError, match=r"mixed\.jsonl:1: "):
        open_preference_loader(
            mixed, _config(tmp_path, mixed), tokenization, str(QWEN_TOKENIZER), shuffle=False, log=lambda _: None
        )
    loader, stats = open_preference_loader(
        path,
        _config(tmp_path, path, skip_bad_lines=True),
        tokenization,
        str(QWEN_TOKENIZER),
        shuffle=False,
        log=lambda _: None,
    )
    assert (stats.examples, stats.skipped_lines, loader.pairs) == (1, 1, 1)


def test_loader_batches_are_seeded_resumable_and_cut_like_trl(tokenizers, tmp_path):
    ours, _ = tokenizers
    long_prompt = " ".join(["word"] * 40)
    records = [{"prompt": f"Question {i}:", "chosen": f" yes {i}", "rejected": f" no {i} " * (i + 1)} for i in range(7)]
    records.append({"prompt": long_prompt, "chosen": " a", "rejected": " b"})  # the prompt fills seq_len
    path = _write_jsonl(tmp_path / "pairs.jsonl", records)
    config = _config(tmp_path, path, seq_len=16, batch_size=3)
    loader, _ = open_preference_loader(
        path, config, PreferenceTokenization(ours), str(QWEN_TOKENIZER), shuffle=True, log=lambda _: None
    )
    assert (loader.pairs, len(loader.kept), loader.dropped) == (8, 7, 1)
    assert loader.truncated >= 2 and loader.batches_in_epoch(0) == 3
    batch = loader.batch(0, 2)  # the last batch: one pair and two padding pairs
    assert batch.chosen_weights[1:].sum() == 0 and batch.chosen_weights[0].sum() > 0
    first = loader.batch(0, 0)
    assert first.chosen_ids.shape == (3, 16)
    pair = loader.pair_indices(0, 0)[0]
    chosen = loader.store.example(2 * pair)
    n = min(len(chosen.tokens), 16)
    np.testing.assert_array_equal(first.chosen_ids[0, :n], chosen.tokens[:n])  # keep_start
    np.testing.assert_array_equal(first.chosen_targets[0, : n - 1], chosen.tokens[1:n])
    np.testing.assert_array_equal(first.chosen_weights[0, : n - 1], chosen.loss_mask[1:n])
    rows = loader.batch(0, 0, rows=[2, 0])
    np.testing.assert_array_equal(rows.rejected_ids, first.rejected_ids[[2, 0]])
    # Resume: the position continues the same sequence of batches; another epoch, another order.
    positions = [loader.advance() for _ in range(4)]
    assert positions == [(0, 0), (0, 1), (0, 2), (1, 0)]
    saved = loader.position
    other = PreferenceLoader(loader.store, 16, 3, seed=config.seed)
    other.restore(saved)
    assert other.advance() == loader.advance() == (1, 1)
    assert loader.pair_indices(0, 0) != loader.pair_indices(1, 0) or loader.pair_indices(0, 1) != loader.pair_indices(
        1, 1
    )
