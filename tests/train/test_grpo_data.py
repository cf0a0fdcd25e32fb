"""GRPO prompt data (`qwen_jax.train.data.prompts`) through the token cache: every source train reads
gives the prompt token ids HF's tokenizer gives (text as it is, messages through the chat template
with the generation prompt) and the records' other columns as they are, so the rewards score what
they score on the raw records; a second run reads the cache without tokenizing; a cache that was
left unfinished or whose files were damaged is built again; bad records are one error naming the
record and the field."""

import datetime
import json
import os

import numpy as np
import pytest
from train_fixtures import QWEN_TOKENIZER

from qwen_jax.errors import DataError
from qwen_jax.tokenizer import Tokenizer
from qwen_jax.train.config import TrainConfig
from qwen_jax.train.data import token_cache
from qwen_jax.train.data.prompts import PromptTokenization, open_prompts
from qwen_jax.train.rewards import load_rewards, score

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

RECORDS = [
    {"prompt": "What is 2 + 3? Answer in \\boxed{}.", "answer": "5", "meta": {"level": 1, "tags": ["add"]}},
    {
        "prompt": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 7 * 6?"},
        ],
        "answer": "42",
        "meta": {"level": 2, "tags": ["mul", "table"]},
    },
    {"prompt": "Compute 10 - 4.", "answer": "6", "meta": {"level": 1, "tags": []}},
    {"prompt": [{"role": "user", "content": "Halve 18."}], "answer": "9", "meta": {"level": 4, "tags": ["div"]}},
]
REWARD_FILE = '''
def level_and_role(prompts, completions, meta, **kwargs):
    """Reads a nested column and the prompt's form (messages stay messages)."""
    return [m["level"] + len(m["tags"]) + (0.5 if isinstance(p, list) else 0.0) for p, m in zip(prompts, meta)]
'''


@pytest.fixture(scope="module")
def tokenizers():
    return Tokenizer.from_dir(str(QWEN_TOKENIZER)), transformers.AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER))


def _config(tmp_path, data, **overrides) -> TrainConfig:
    settings = dict(
        method="grpo",
        reward=["math_accuracy"],
        model="unused",
        data=data,
        out=str(tmp_path / "out"),
        seq_len=64,
        max_new_tokens=16,
        batch_size=2,
        progress=False,
    )
    return TrainConfig(**{**settings, **overrides})


def _open(tokenizer, tmp_path, data, log=None, **overrides):
    config = _config(tmp_path, data, **overrides)
    return open_prompts(
        data,
        config,
        tokenizer,
        str(QWEN_TOKENIZER),
        batch_size=config.batch_size,
        shuffle=True,
        log=log or (lambda _: None),
    )


def _write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _hf_prompt_ids(hf, prompt) -> list[int]:
    if isinstance(prompt, str):
        return hf.encode(prompt, add_special_tokens=False)
    return list(hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))


def test_every_source_gives_the_prompts_and_columns_of_the_records(tokenizers, tmp_path):
    ours, hf = tokenizers
    texts, chats = [RECORDS[0], RECORDS[2]], [RECORDS[1], RECORDS[3]]  # a table column holds one type
    datasets.Dataset.from_list(texts).to_parquet(str(tmp_path / "prompts.parquet"))
    datasets.Dataset.from_list(chats).save_to_disk(str(tmp_path / "saved"))
    sources = {
        _write_jsonl(tmp_path / "prompts.jsonl", RECORDS): RECORDS,
        str(tmp_path / "prompts.parquet"): texts,
        str(tmp_path / "saved"): chats,
    }
    reward_file = tmp_path / "rewards.py"
    reward_file.write_text(REWARD_FILE)
    rewards = load_rewards(["math_accuracy", f"{reward_file}:level_and_role"])
    completions = {r["answer"]: c for r, c in zip(RECORDS, ["so \\boxed{5}", "42", "it is 7", "\\boxed{9}"])}

    def scores(prompts, columns):
        answers = [c["answer"] for c in columns]
        shown = [
            [{"role": "assistant", "content": completions[a]}] if isinstance(p, list) else completions[a]
            for p, a in zip(prompts, answers)
        ]
        named = {"answer": answers, "meta": [c["meta"] for c in columns]}
        return score(rewards, prompts, shown, named, [[1]] * len(prompts), 16)

    for spec, raw in sources.items():
        expected_ids = [_hf_prompt_ids(hf, r["prompt"]) for r in raw]
        assert all(expected_ids) and len(set(map(tuple, expected_ids))) == len(raw)
        loader, stats = _open(ours, tmp_path, spec)
        assert (stats.examples, stats.skipped_lines, len(loader)) == (len(raw), 0, len(raw)), spec
        assert loader.columns == ("answer", "meta")
        records = loader.records()
        assert [r.prompt_ids for r in records] == expected_ids, spec
        assert [r.prompt for r in records] == [r["prompt"] for r in raw], spec
        assert [r.columns for r in records] == [{k: v for k, v in r.items() if k != "prompt"} for r in raw], spec
        # The rewards score the cached records as they score the records themselves (the in-memory path).
        in_memory = scores([r["prompt"] for r in raw], [{k: v for k, v in r.items() if k != "prompt"} for r in raw])
        assert not np.isnan(in_memory).any() and len(set(in_memory[:, 1])) == len(raw)
        np.testing.assert_array_equal(scores([r.prompt for r in records], [r.columns for r in records]), in_memory)
        # Batches: the seeded permutation of the records, whole batches only.
        order = np.random.default_rng([0, 0]).permutation(len(raw))
        assert loader.batches_in_epoch(0) == len(raw) // 2
        assert [r.prompt_ids for r in loader.batch(0, 0)] == [expected_ids[i] for i in order[:2]]


def test_second_run_reads_the_cache_and_a_damaged_cache_is_rebuilt(tokenizers, tmp_path, monkeypatch):
    ours, _ = tokenizers
    data = _write_jsonl(tmp_path / "prompts.jsonl", RECORDS)
    messages = []
    first, _ = _open(ours, tmp_path, data, log=messages.append)
    expected = first.records()
    (directory,) = [str(p) for p in (tmp_path / "out" / "data_cache").iterdir()]
    assert messages[-1] == f"data: tokenized into {directory}"

    tokenized = []
    examples = PromptTokenization.examples
    monkeypatch.setattr(PromptTokenization, "examples", lambda self, r: tokenized.append(r) or examples(self, r))
    again, _ = _open(ours, tmp_path, data, log=messages.append)
    assert messages[-1] == f"data: cached tokens {directory}" and not tokenized
    assert again.records() == expected
    # --eval-data-like settings that decide the prompts (their token limit) make another cache.
    _open(ours, tmp_path, data, max_new_tokens=8)
    assert len(tokenized) == 4 and len(os.listdir(tmp_path / "out" / "data_cache")) == 2

    part = os.path.join(directory, "parts-of-1", "0")
    damages = {
        "tokens.bin": lambda path: open(path, "r+b").truncate(8),
        "records.bin": lambda path: open(path, "r+b").truncate(os.path.getsize(path) - 1),
        "record_offsets.npy": os.remove,
        "meta.json": os.remove,  # an interrupted preparation: no meta.json, a part left behind
    }
    for name, damage in damages.items():
        tokenized.clear()
        damage(os.path.join(part if name != "meta.json" else directory, name))
        if name == "meta.json":
            os.rename(part, part + ".partial")
        loader, _ = _open(ours, tmp_path, data, log=messages.append)
        assert len(tokenized) == 4, name
        if name != "meta.json":
            assert f"the token cache {directory} is damaged" in messages[-2] and name in messages[-2], messages[-2:]
        assert messages[-1] == f"data: tokenized into {directory}", name
        assert loader.records() == expected, name
        assert token_cache.damage(directory) is None and not os.path.exists(part + ".partial")


def test_bad_records_name_the_record_and_the_field(tokenizers, tmp_path):
    ours, _ = tokenizers
    good = RECORDS[0]
    cases = {
        "long": ({"prompt": "one two three " * 20, "answer": "1"}, r"long\.jsonl:2: the prompt has \d+ tokens; with "),
        "no_prompt": ({"question": "2+2?", "answer": "4"}, r"no_prompt\.jsonl:2: no 'prompt' column"),
        "number": ({"prompt": 7, "answer": "4"}, r"number\.jsonl:2: a GRPO prompt must be text or a list"),
        "surrogate": ({"prompt": "hi", "answer": "\ud800"}, r"surrogate\.jsonl:2: answer is not valid Unicode"),
    }
    for name, (bad, message) in cases.items():
        data = _write_jsonl(tmp_path / f"{name}.jsonl", [good, bad, good])
        with pytest.raises(DataError, match=message):
            _open(ours, tmp_path, data)
        loader, stats = _open(ours, tmp_path, data, skip_bad_lines=True)
        assert (stats.examples, stats.skipped_lines, len(loader)) == (2, 1, 2), name
    assert not any(p.name.endswith(".partial") for p in (tmp_path / "out" / "data_cache").rglob("*"))
    # A column JSON cannot hold (a Parquet timestamp) is named with its row.
    when = datetime.datetime(2024, 1, 1)
    datasets.Dataset.from_list([{**good, "when": when}]).to_parquet(str(tmp_path / "dated.parquet"))
    with pytest.raises(DataError, match=r"dated\.parquet: row 0: column 'when' cannot be kept for the reward"):
        _open(ours, tmp_path, str(tmp_path / "dated.parquet"), batch_size=1)
    # --prompt-column renames the prompt column; the renamed one is the one that must be there.
    renamed = _write_jsonl(tmp_path / "renamed.jsonl", [{"question": "2+2?", "answer": "4"}])
    loader, _ = _open(ours, tmp_path, renamed, prompt_column="question", batch_size=1)
    assert loader.records()[0].prompt == "2+2?" and loader.columns == ("answer",)
    with pytest.raises(DataError, match=r"renamed\.jsonl:1: no 'query' column"):
        _open(ours, tmp_path, renamed, prompt_column="query", batch_size=1)
