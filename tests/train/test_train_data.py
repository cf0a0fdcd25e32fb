"""Training data (`qwen_jax.train.data`): loss masks, bad records, packing, the loader's order,
sources (JSONL, Parquet, `datasets`, Hub) and the token cache.

The chat loss-mask test uses the real Qwen2.5 tokenizer; the rest a tiny word-level tokenizer.
"""

import dataclasses
import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_fixtures import (  # noqa: F401 (fixtures)
    QWEN_TOKENIZER,
    TINY_MODEL,
    TRAIN_LINES,
    compilation_cache,
    tiny_model_dir,
    train_file,
)

from qwen_jax import Qwen2Config, create_model
from qwen_jax.errors import DataError
from qwen_jax.tokenizer import Tokenizer
from qwen_jax.train.data import sources, token_cache
from qwen_jax.train.data.examples import DatasetStats, Example, Tokenization, read_jsonl
from qwen_jax.train.data.loader import DataLoader
from qwen_jax.train.data.packing import concat, empty_rows, fit_to_length, pack
from qwen_jax.train.step import forward_losses


# --------------------------------------------------------------------------- examples and packing
@pytest.mark.skipif(not (QWEN_TOKENIZER / "tokenizer.json").exists(), reason="Qwen2.5 tokenizer files not found")
def test_chat_loss_mask_token_by_token():
    """Only assistant content and its <|im_end|> are learned, checked against pieces encoded apart."""
    tokenizer = Tokenizer.from_dir(QWEN_TOKENIZER)
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4, of course."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    example = Tokenization(tokenizer).example({"messages": messages})
    # The same conversation assembled from separately encoded pieces with the mask we expect.
    pieces = [
        (
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
            "<|im_start|>assistant\n",
            False,
        ),
        ("4, of course.<|im_end|>", True),
        ("\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n", False),
        ("6<|im_end|>", True),
        ("\n", False),
    ]
    tokens, mask = [], []
    for text, learned in pieces:
        ids = tokenizer.encode(text)
        tokens += ids
        mask += [learned] * len(ids)
    assert example.tokens.tolist() == tokens
    assert example.loss_mask.tolist() == mask
    assert (
        tokenizer.decode(example.tokens[example.loss_mask], skip_special_tokens=False)
        == "4, of course.<|im_end|>6<|im_end|>"
    )


def test_prompt_completion_and_text_masks(tiny_model_dir):
    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    tokenization = Tokenization(tokenizer)
    eos = tokenizer.eos_token_id
    example = tokenization.example({"prompt": "what color is the sky", "completion": "blue"})
    assert example.tokens.tolist() == tokenizer.encode("what color is the sky") + tokenizer.encode("blue") + [eos]
    assert example.loss_mask.tolist() == [False] * 5 + [True, True]
    example = tokenization.example({"text": "the cat sat"})
    assert example.tokens.tolist() == tokenizer.encode("the cat sat") + [eos]
    assert example.loss_mask.all()


def test_bad_data_lines(tiny_model_dir, tmp_path):
    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "the cat"}\n{"text": \n{"prompt": "the"}\n\n[1, 2]\n{"text": "a dog"}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: invalid JSON"):
        read_jsonl(path, tokenizer)
    stats = DatasetStats()
    examples = read_jsonl(path, tokenizer, skip_bad_lines=True, stats=stats)
    assert (len(examples), stats.skipped_lines) == (2, 3)
    path.write_text('{"text": "the"}\n{"prompt": "the", "completion": 3}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: 'prompt' and 'completion' must both be strings"):
        read_jsonl(path, tokenizer)
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: no assistant message"):
        read_jsonl(path, tokenizer)


def test_packed_batch_matches_unpacked_examples():
    config = Qwen2Config(**{**TINY_MODEL, "vocab_size": 48})
    model = create_model(config, dtype=jnp.float32, seed=1)
    losses_of = nnx.jit(lambda model, batch: forward_losses(model, batch))
    rng = np.random.default_rng(0)
    examples = []
    for length in (5, 9, 7, 3):
        mask = rng.random(length) < 0.7
        mask[-1] = True
        examples.append(Example(rng.integers(0, 48, length).astype(np.int32), mask))
    packed = pack(examples, seq_len=16)
    assert packed.rows == 2 and packed.segment_ids[:, -1].tolist() == [0, 0]  # 5+9 in one row, 7+3 in the next
    assert packed.positions[0, :14].tolist() == [*range(5), *range(9)]
    # Unpacked: every example alone at the start of its own (padded) row.
    alone = concat([pack([example], seq_len=16) for example in examples])

    def run(batch):
        return np.asarray(losses_of(model, {k: jnp.asarray(v) for k, v in dataclasses.asdict(batch).items()}))

    # Same shape [4, 16] for both, so the forward compiles once.
    packed_losses, alone_losses = run(concat([packed, empty_rows(2, 16)])), run(alone)
    for index, example in enumerate(examples):
        row, segment = divmod(index, 2)
        in_segment = packed.segment_ids[row] == segment + 1
        n = len(example.tokens)
        np.testing.assert_allclose(
            packed_losses[row][in_segment] * packed.weights[row][in_segment],
            alone_losses[index][:n] * alone.weights[index][:n],
            rtol=1e-5,
            atol=1e-5,
        )
    # Without segment ids the second example would attend to the first: the check can fail.
    crossed = concat([packed, empty_rows(2, 16)])
    crossed = dataclasses.replace(crossed, segment_ids=np.ones_like(crossed.segment_ids))
    assert not np.allclose(run(crossed)[0][5:14], packed_losses[0][5:14], atol=1e-3)


def test_loader_order_is_seeded_and_resumable(tiny_model_dir, train_file):
    examples = read_jsonl(train_file, Tokenizer.from_dir(tiny_model_dir))
    loader = DataLoader(examples, seq_len=32, batch_rows=1, seed=3)
    straight = [next(loader).input_ids for _ in range(8)]
    again = DataLoader(examples, seq_len=32, batch_rows=1, seed=3)
    [next(again) for _ in range(3)]
    position = again.position
    resumed = DataLoader(examples, seq_len=32, batch_rows=1, seed=3)
    resumed.restore(position)
    assert all(np.array_equal(a, next(resumed).input_ids) for a in straight[3:])
    other = DataLoader(examples, seq_len=32, batch_rows=1, seed=4)
    assert not all(np.array_equal(a, next(other).input_ids) for a in straight)
    with pytest.raises(DataError, match="no example has a target token within seq_len 1"):
        DataLoader(examples, seq_len=1, batch_rows=1)


# --------------------------------------------------------------------------- sources and the token cache
ALPACA = [
    {"instruction": "what color is the sky", "input": "", "output": "blue"},
    {"instruction": "the dog ran to", "input": "the park", "output": "the park"},
    {"instruction": "one two three", "input": "four", "output": "five six"},
]


def _examples(source, tokenizer, mapping=sources.ColumnMapping()) -> list[tuple[list, list]]:
    tokenization = Tokenization(tokenizer)
    return [
        (e.tokens.tolist(), e.loss_mask.tolist())
        for e in (tokenization.example(mapping.canonical(record)) for _, record in source.records())
    ]


def test_sources_give_the_examples_of_the_equivalent_jsonl(tiny_model_dir, train_file, tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    expected = [(e.tokens.tolist(), e.loss_mask.tolist()) for e in read_jsonl(train_file, tokenizer)]
    # Parquet needs one schema: every row has all columns (None where a JSONL line has no key),
    # so the records are given an explicit format each, as users of such tables would.
    table_rows = [
        {"prompt": r.get("prompt"), "completion": r.get("completion"), "text": r.get("text")} for r in TRAIN_LINES
    ]
    pq.write_table(pa.Table.from_pylist(table_rows[:4]), tmp_path / "a.parquet", row_group_size=3)
    os.makedirs(tmp_path / "shards")
    pq.write_table(pa.Table.from_pylist(table_rows[:4]), tmp_path / "shards" / "00.parquet", row_group_size=3)
    pq.write_table(pa.Table.from_pylist(table_rows[4:]), tmp_path / "shards" / "01.parquet")
    datasets.Dataset.from_list(table_rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(table_rows)}).save_to_disk(str(tmp_path / "dict"))

    def canonical(row):  # a table row as the JSONL line it came from
        return {k: v for k, v in row.items() if v is not None}

    class Rows(sources.ColumnMapping):
        def canonical(self, record):
            return super().canonical(canonical(record))

    for spec in (tmp_path / "shards", tmp_path / "saved", tmp_path / "dict"):
        source = sources.open_source(str(spec))
        assert _examples(source, tokenizer, Rows()) == expected, spec
    assert _examples(sources.open_source(str(tmp_path / "a.parquet")), tokenizer, Rows()) == expected[:4]
    # Every source splits into contiguous parts that concatenate to the whole, for any count
    # (JSONL parts are byte ranges: blank lines, multi-byte characters, no final newline).
    ragged = tmp_path / "ragged.jsonl"
    ragged.write_bytes(
        "\n".join(
            [json.dumps({"text": "ünïcödé " * n}, ensure_ascii=False) if n % 3 else "" for n in range(1, 12)]
        ).encode()
    )
    assert [loc for loc, _ in sources.open_source(str(ragged)).records()][-1] == f"{ragged}:11"
    for spec in (train_file, ragged, tmp_path / "shards", tmp_path / "saved"):
        source = sources.open_source(str(spec))
        whole = [location for location, _ in source.records()]
        for parts in (2, 3, 5, 7):
            assert [loc for p in range(parts) for loc, _ in source.records(p, parts)] == whole, (spec, parts)
    with pytest.raises(DataError, match="no split 'test'"):
        sources.open_source(str(tmp_path / "dict"), split="test")
    with pytest.raises(DataError, match="data file not found"):
        sources.open_source(str(tmp_path / "missing.jsonl"))

    # Column mapping: alpaca's instruction + input -> prompt, output -> completion.
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("".join(json.dumps(r) + "\n" for r in ALPACA))
    mapping = sources.ColumnMapping("prompt-completion", prompt=("instruction", "input"), completion="output")
    mapped = _examples(sources.open_source(str(alpaca)), tokenizer, mapping)
    plain = tmp_path / "plain.jsonl"
    plain.write_text(
        "".join(
            json.dumps({"prompt": "\n\n".join(filter(None, (r["instruction"], r["input"]))), "completion": r["output"]})
            + "\n"
            for r in ALPACA
        )
    )
    assert mapped == _examples(sources.open_source(str(plain)), tokenizer)

    # A Hub id goes to datasets.load_dataset with the split (no Hub access here: a local dataset stands in).
    calls = []

    def load_dataset(repo_id, split):
        calls.append((repo_id, split))
        return datasets.Dataset.from_list(ALPACA)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    hub = sources.open_source("tatsu-lab/alpaca", split="train")
    assert calls == [("tatsu-lab/alpaca", "train")] and _examples(hub, tokenizer, mapping) == mapped


def test_token_cache_is_reused_and_keyed_by_inputs(tiny_model_dir, train_file, tmp_path):
    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    tokenization = Tokenization(tokenizer)
    messages = []

    def load(path, skip_bad_lines=False):
        return token_cache.load(
            sources.open_source(str(path)),
            tokenization,
            sources.ColumnMapping(),
            str(tmp_path / "cache"),
            tokenizer_dir=tiny_model_dir,
            skip_bad_lines=skip_bad_lines,
            progress=False,
            log=messages.append,
        )

    store, stats = load(train_file)
    in_memory = read_jsonl(train_file, tokenizer)
    assert stats.examples == len(store) == len(in_memory)
    for i, example in enumerate(in_memory):
        assert store.example(i).tokens.tolist() == example.tokens.tolist()
        assert store.example(i).loss_mask.tolist() == example.loss_mask.tolist()
    load(train_file)
    assert "tokenized into" in messages[0] and "cached tokens" in messages[1]
    load(train_file, skip_bad_lines=True)  # other settings: another cache
    copy = tmp_path / "copy.jsonl"
    copy.write_text(open(train_file).read() + json.dumps({"text": "a dog"}) + "\n")  # other data: another cache
    assert len(load(copy)[0]) == len(store) + 1
    assert len(os.listdir(tmp_path / "cache")) == 3


def test_batches_built_from_row_subsets_equal_whole_batches(tiny_model_dir, train_file):
    """Whatever rows each process builds, together they are the batch one process would build;
    the last batch is padded with zero-weight rows, so every process runs the same steps."""
    examples = read_jsonl(train_file, Tokenizer.from_dir(tiny_model_dir))
    loader = DataLoader(examples, seq_len=16, batch_rows=3, seed=1)
    assert loader.truncated == 0 and loader.dropped == 0
    for epoch in range(2):
        for index in range(loader.batches_in_epoch(epoch)):
            whole = loader.batch(epoch, index)
            for rows in ([0, 1], [2], [0, 2], [1]):
                part = loader.batch(epoch, index, rows=rows)
                for name in ("input_ids", "positions", "segment_ids", "targets", "weights"):
                    np.testing.assert_array_equal(getattr(part, name), getattr(whole, name)[rows])
            assert loader.batch_tokens(epoch, index) == int(np.count_nonzero(whole.segment_ids))
    plan = loader.plan(0)
    assert plan.rows % 3 == 0 and plan.real_rows < plan.rows  # 6 examples in 4 rows of 16, padded to 6
    last = loader.batch(0, loader.batches_in_epoch(0) - 1)
    assert not last.weights[plan.real_rows - plan.rows :].any()
    # Truncation and dropping as fit_to_length does them.
    short = DataLoader(examples, seq_len=4, batch_rows=2)
    stats = DatasetStats()
    fitted = fit_to_length(examples, 4, stats)
    assert (short.truncated, short.dropped, len(short.kept)) == (stats.truncated, stats.dropped, len(fitted))
