"""Generation against HF transformers: greedy tokens, cached-step logits, streaming, buckets, CLI."""

import io
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
from conftest import build_hf_model, save_hf_checkpoint

from qwen_jax import make_mesh
from qwen_jax.compilation import compile_counts
from qwen_jax.config import GenerationConfig
from qwen_jax.errors import GenerationError
from qwen_jax.generation.api import generate, stream
from qwen_jax.generation.static import generate_ids, stream_ids
from qwen_jax.load import load_model

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 40))]  # different lengths, one bucket
NEW_TOKENS = 36


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """Untied lm_head + GQA (4 query heads, 2 kv heads), no eos: (torch model, jax model, dir)."""
    torch_model = build_hf_model(seed=0, tie_word_embeddings=False, eos_token_id=None)
    path = save_hf_checkpoint(torch_model, tmp_path_factory.mktemp("untied"))
    return torch_model, load_model(path, dtype="float32"), path


def _hf_greedy(torch_model, prompts, new_tokens, pad_id=0, **kwargs):
    """HF generate(do_sample=False) on left-padded prompts with an attention mask."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    out = torch_model.generate(
        ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens, pad_token_id=pad_id, **kwargs
    )
    return out[:, width:].tolist()


def test_greedy_batch_matches_hf(untied):
    torch_model, model, _ = untied
    expected = _hf_greedy(torch_model, PROMPTS, NEW_TOKENS, eos_token_id=None)
    result = generate_ids(model, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0)
    assert result.token_ids == expected
    assert result.finish_reasons == ["length"] * len(PROMPTS)
    assert result.timing.prompt_tokens == sum(map(len, PROMPTS))


def test_greedy_tied_checkpoint_matches_hf(hf_checkpoint):
    torch_model, path = hf_checkpoint(seed=1, eos_token_id=None, num_key_value_heads=1)  # tied, MQA
    model = load_model(path, dtype="float32")
    expected = _hf_greedy(torch_model, PROMPTS[:2], NEW_TOKENS, eos_token_id=None)
    assert generate_ids(model, PROMPTS[:2], max_new_tokens=NEW_TOKENS, temperature=0).token_ids == expected


def test_stops_at_eos_like_hf(untied):
    torch_model, model, _ = untied
    free_run = _hf_greedy(torch_model, PROMPTS, NEW_TOKENS, eos_token_id=None)
    eos = free_run[0][6]  # a token row 0 produces mid-way: it must stop there, other rows wherever it appears
    expected = _hf_greedy(torch_model, PROMPTS, NEW_TOKENS, eos_token_id=eos)
    result = generate_ids(model, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0, stop_token_ids=[eos])
    for got, want in zip(result.token_ids, expected):
        cut = want.index(eos) + 1 if eos in want else len(want)
        assert got == want[:cut]
    assert len(result.token_ids[0]) <= 7 and result.finish_reasons[0] == "stop"


def test_repetition_penalty_matches_hf(untied):
    torch_model, model, _ = untied
    expected = _hf_greedy(torch_model, PROMPTS[:1], NEW_TOKENS, eos_token_id=None, repetition_penalty=1.5)
    result = generate_ids(model, PROMPTS[:1], max_new_tokens=NEW_TOKENS, temperature=0, repetition_penalty=1.5)
    assert result.token_ids == expected
    assert expected != _hf_greedy(torch_model, PROMPTS[:1], NEW_TOKENS, eos_token_id=None)  # the penalty matters


def test_cached_step_logits_equal_full_forward(untied):
    _, model, _ = untied
    result = generate_ids(model, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0, return_logits=True)
    for prompt, generated, step_logits in zip(PROMPTS, result.token_ids, result.logits):
        sequence = np.asarray([prompt + generated], np.int32)
        full = np.asarray(model(sequence))[0]
        # Step i's logits predict generated[i] from everything before it.
        expected = full[len(prompt) - 1 : len(prompt) - 1 + len(generated)]
        np.testing.assert_allclose(step_logits, expected, atol=1e-4, rtol=0)


def test_prompt_lengths_in_one_bucket_compile_once(untied):
    _, model, _ = untied
    # prefix_cache=False: these prompts extend each other, and a reused prefix would change the shapes.
    generate_ids(model, [[1, 2, 3]], max_new_tokens=8, temperature=0, prefix_cache=False)
    before = compile_counts()
    for length in (5, 9, 16):
        generate_ids(model, [list(range(3, 3 + length))], max_new_tokens=8, temperature=0, prefix_cache=False)
    assert compile_counts() == before
    # 17 tokens: the next bucket
    generate_ids(model, [list(range(3, 20))], max_new_tokens=8, temperature=0, prefix_cache=False)
    assert compile_counts()["generation.prefill"] == before["generation.prefill"] + 1


SAMPLING = dict(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.1)


def test_sampling_is_seeded(untied):
    _, model, _ = untied
    runs = [
        generate_ids(model, PROMPTS, max_new_tokens=NEW_TOKENS, seed=seed, **SAMPLING).token_ids for seed in (3, 3, 4)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_one_seed_for_every_row_or_one_per_prompt(untied):
    """A row's tokens depend only on its own prompt, settings and seed: in a batch with one seed every
    row draws as it would alone with that seed; a list gives each prompt its own."""
    _, model, _ = untied
    alone = {
        (row, seed): generate_ids(model, [PROMPTS[row]], max_new_tokens=NEW_TOKENS, seed=seed, **SAMPLING).token_ids[0]
        for row in range(len(PROMPTS))
        for seed in (3, 4)
    }
    shared = generate_ids(model, PROMPTS, max_new_tokens=NEW_TOKENS, seed=3, **SAMPLING).token_ids
    assert shared == [alone[row, 3] for row in range(len(PROMPTS))]
    per_prompt = generate_ids(model, PROMPTS, max_new_tokens=NEW_TOKENS, seed=[4, 3, 4], **SAMPLING).token_ids
    assert per_prompt == [alone[0, 4], alone[1, 3], alone[2, 4]]
    assert alone[0, 3] != alone[0, 4]  # the seed matters
    with pytest.raises(GenerationError, match="2 seeds for 3 prompts"):
        generate_ids(model, PROMPTS, max_new_tokens=4, seed=[1, 2], **SAMPLING)


def test_options_are_checked_before_anything_runs(untied):
    _, model, _ = untied
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        generate_ids(model, PROMPTS, max_new_tokens=4, temprature=0.5)
    with pytest.raises(GenerationError, match="stop strings need the text") as info:
        generate_ids(model, PROMPTS, max_new_tokens=4, stop=["the end"])
    assert info.value.param == "stop"
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        stream_ids(model, PROMPTS[0], max_new_tokens=4, stop=[10_000])
    eos = generate_ids(model, PROMPTS[:1], max_new_tokens=8, temperature=0).token_ids[0][3]
    by_stop = generate_ids(model, PROMPTS[:1], max_new_tokens=8, temperature=0, stop=eos)  # ids are fine
    assert by_stop.token_ids[0][-1] == eos and by_stop.finish_reasons == ["stop"]


def test_temperature_to_zero_is_greedy(untied):
    _, model, _ = untied
    greedy = generate_ids(model, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0).token_ids
    # Far below the gap between the top two logits (as small as 5e-5 at some steps of this tiny model, where
    # 1e-4 would make it a coin flip): the draw must then be the argmax.
    cold = generate_ids(model, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=1e-6, seed=5).token_ids
    assert cold == greedy
    filtered = generate_ids(model, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0, top_k=3, top_p=0.5)
    assert filtered.token_ids == greedy


def test_streaming_ids_equal_batch(untied):
    _, model, _ = untied
    batch = generate_ids(model, PROMPTS[2:], max_new_tokens=NEW_TOKENS, seed=11, **SAMPLING)
    streamed = stream_ids(model, PROMPTS[2], max_new_tokens=NEW_TOKENS, seed=11, **SAMPLING)
    assert list(streamed) == batch.token_ids[0]
    assert streamed.result.token_ids == batch.token_ids
    assert streamed.result.timing.decode_tokens == len(batch.token_ids[0]) - 1


def test_generation_on_a_tensor_parallel_mesh_equals_one_device(untied):
    _, model, path = untied
    mesh = make_mesh(data=1, fsdp=1, tensor=2, devices=jax.devices()[:2])
    sharded = load_model(path, dtype="float32", mesh=mesh)
    expected = generate_ids(model, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0).token_ids
    assert generate_ids(sharded, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0).token_ids == expected


def test_generation_config_from_checkpoint_files():
    reference = os.path.join(
        os.path.dirname(__file__), "..", "..", "..", "shared", "reference", "generation_config.instruct.json"
    )
    with (
        open(reference)
        if os.path.exists(reference)
        else io.StringIO(
            json.dumps(
                {
                    "do_sample": True,
                    "eos_token_id": [151645, 151643],
                    "pad_token_id": 151643,
                    "repetition_penalty": 1.05,
                    "temperature": 0.7,
                    "top_p": 0.8,
                    "top_k": 20,
                }
            )
        ) as f
    ):
        config = GenerationConfig.from_hf(json.load(f))
    assert config.eos_token_ids == (151645, 151643)
    assert (config.temperature, config.top_k, config.top_p, config.repetition_penalty) == (0.7, 20, 0.8, 1.05)
    assert GenerationConfig.from_hf({"do_sample": False, "temperature": 0.7}).temperature == 0.0


def test_clear_errors(untied):
    _, model, _ = untied
    context = model.config.max_position_embeddings
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate_ids(model, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(GenerationError, match="more than the model's context"):
        generate_ids(model, [[1] * (context + 1)], max_new_tokens=4)
    with pytest.raises(GenerationError, match="overflows the context"):
        generate_ids(model, [[1] * (context - 3)], max_new_tokens=4)
    with pytest.raises(GenerationError, match="max_new_tokens must be >= 1"):
        generate_ids(model, [[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        generate_ids(model, [[1, 2]], max_new_tokens=4, temperature=-1)


# ----------------------------------------------------------------------------- with the Qwen2.5 tokenizer
def _tokenizer_dir():
    default = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "reference", "qwen2.5-tokenizer")
    path = os.environ.get("QWEN_JAX_TOKENIZER_DIR") or (default if os.path.isdir(default) else None)
    if path is None:
        pytest.skip("QWEN_JAX_TOKENIZER_DIR is not set and ../shared/reference/qwen2.5-tokenizer does not exist")
    return path


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """A tiny random model over the real Qwen2.5 vocabulary, with the real tokenizer files beside it."""
    tokenizer_dir = _tokenizer_dir()
    torch_model = build_hf_model(
        seed=2,
        vocab_size=151665,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        max_position_embeddings=512,
        bos_token_id=151643,
        eos_token_id=151645,
    )
    path = save_hf_checkpoint(torch_model, tmp_path_factory.mktemp("chat"))
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), path)
    from qwen_jax.load import load

    model, tokenizer = load(path)
    return torch_model, model, tokenizer, path


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bonjour, 你好 👋"}]


def test_text_generation_matches_hf_and_streaming(chat_checkpoint):
    torch_model, model, tokenizer, _ = chat_checkpoint
    result = generate(model, tokenizer, [CONVERSATION, "def fib(n):"], max_new_tokens=24, temperature=0)
    prompts = [tokenizer.apply_chat_template(CONVERSATION, tokenize=True), tokenizer.encode("def fib(n):")]
    expected = _hf_greedy(torch_model, prompts, 24, pad_id=151643, eos_token_id=[151645, 151643])
    for got, want in zip(result.token_ids, expected):
        stop = next((i + 1 for i, t in enumerate(want) if t in (151645, 151643)), len(want))
        assert got == want[:stop]
    assert result.texts == [tokenizer.decode(ids) for ids in result.token_ids]
    pieces = stream(model, tokenizer, CONVERSATION, max_new_tokens=24, temperature=0)
    assert "".join(pieces) == result.texts[0]
    assert pieces.result.token_ids[0] == result.token_ids[0]


def test_stop_strings_cut_batch_and_stream_alike(chat_checkpoint):
    _, model, tokenizer, _ = chat_checkpoint
    full = generate(model, tokenizer, "Once upon a time", max_new_tokens=24, temperature=0).texts[0]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3, f"generated text too short to test stop strings: {full!r}"
    cut = generate(model, tokenizer, "Once upon a time", max_new_tokens=24, temperature=0, stop=[stop])
    assert cut.texts[0] == full[: full.index(stop)] and cut.finish_reasons == ["stop"]
    streamed = "".join(stream(model, tokenizer, "Once upon a time", max_new_tokens=24, temperature=0, stop=stop))
    assert streamed == cut.texts[0]


def test_cli_generate_json(chat_checkpoint, capsys):
    from qwen_jax.cli import main

    _, model, tokenizer, path = chat_checkpoint
    assert (
        main(
            ["generate", "--model", path, "--prompt", "Hello", "--chat", "--greedy", "--max-new-tokens", "16", "--json"]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    expected = generate(model, tokenizer, [{"role": "user", "content": "Hello"}], max_new_tokens=16, temperature=0)
    assert out["token_ids"] == expected.token_ids[0] and out["text"] == expected.texts[0]
    assert out["prompt_tokens"] == expected.prompt_lengths[0]
    assert out["prefill_tokens_per_s"] > 0 and out["decode_tokens_per_s"] >= 0
    # --prefill-chunk: the prompt in calls of 4 tokens (every chunk after the first reads the cache).
    assert (
        main(
            [
                "generate",
                "--model",
                path,
                "--prompt",
                "Hello",
                "--chat",
                "--greedy",
                "--max-new-tokens",
                "16",
                "--json",
                "--prefill-chunk",
                "4",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["token_ids"] == expected.token_ids[0]


def test_cli_generate_streams_and_reports_errors(chat_checkpoint, capsys):
    from qwen_jax.cli import main

    _, model, tokenizer, path = chat_checkpoint
    assert main(["generate", "--model", path, "--prompt", "Hi", "--greedy", "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out == generate(model, tokenizer, "Hi", max_new_tokens=8, temperature=0).texts[0] + "\n"
    assert "decode" in captured.err and "tok/s" in captured.err
    assert main(["generate", "--model", path, "--prompt", "Hi", "--max-new-tokens", "600"]) == 2
    assert "overflows the context" in capsys.readouterr().err


def test_cli_chat_session(chat_checkpoint, capsys, monkeypatch):
    from qwen_jax.cli import main

    _, model, tokenizer, path = chat_checkpoint
    script = "Hello there\nAnd then?\n/reset\nAnd then?\n/exit\nnever read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert main(["chat", "--model", path, "--greedy", "--max-new-tokens", "10"]) == 0
    out = capsys.readouterr().out

    def answer(history):
        return generate(model, tokenizer, history, max_new_tokens=10, temperature=0).texts[0]

    first = answer([{"role": "user", "content": "Hello there"}])
    second = answer(
        [
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "And then?"},
        ]
    )
    after_reset = answer([{"role": "user", "content": "And then?"}])
    assert out == f"{first}\n{second}\n{after_reset}\n"


def test_cli_chat_reuses_the_previous_turn(chat_checkpoint, capsys, monkeypatch):
    from qwen_jax.cli import main

    _, model, tokenizer, path = chat_checkpoint
    system = "You are a terse assistant. " * 4  # a system prompt longer than the reuse minimum
    outputs, stats = [], []
    for flags in ([], ["--no-prefix-cache"]):
        monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nAnd then?\n"))
        command = ["chat", "--model", path, "--system", system, "--greedy", "--max-new-tokens", "10", "--stats"]
        assert main(command + flags) == 0
        captured = capsys.readouterr()
        outputs.append(captured.out)
        stats.append([line for line in captured.err.splitlines() if line.startswith("prompt ")])
    assert outputs[0] == outputs[1]  # the same answers with and without reuse
    first, second = stats[0]
    assert "cached" not in first and " cached)" in second, stats[0]
    cached = int(second.split("(")[1].split(" cached")[0])
    first_prompt = int(first.split()[1])
    assert first_prompt - 1 <= cached < int(second.split()[1])  # the first turn's prompt at least (and its answer)
    assert not any("cached" in line for line in stats[1])
