"""Tokenizer, chat template, streaming detokenizer and tool-call parser against HF transformers.

Two tokenizers are tested:
- a tiny byte-level BPE tokenizer built in a temp dir (always runs), compared with transformers'
  `PreTrainedTokenizerFast` loaded from the same files;
- the real Qwen2.5 tokenizer from `QWEN_JAX_TOKENIZER_DIR` (skipped when unset), compared with
  `transformers.AutoTokenizer`.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import jinja2
import pytest
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from qwen_jax.errors import CheckpointError, GenerationError
from qwen_jax.tokenizer import StreamDecoder, Tokenizer, parse_tool_calls

transformers = pytest.importorskip("transformers")

QWEN_TOKENIZER_DIR = os.environ.get("QWEN_JAX_TOKENIZER_DIR")
requires_qwen_tokenizer = pytest.mark.skipif(
    not QWEN_TOKENIZER_DIR,
    reason="QWEN_JAX_TOKENIZER_DIR is not set (a Qwen2.5 tokenizer dir, e.g. shared/reference/qwen2.5-tokenizer)",
)

MIXED_TEXTS = [
    "Hello world",
    "  leading spaces, trailing\ttabs\t\nand\r\nwindows newlines\n\n\n",
    "通义千问是阿里云研发的大语言模型。你好，世界！",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 🐍\n",
    "Emoji: 👍🏽 👨‍👩‍👧‍👦 🇯🇵 and accents: café naïve Ångström",
    "Mixed 中文 and English with numbers 1234567 and 3.14159, plus 日本語のテキスト and 한국어.",
    'Special strings in text: <|im_start|>user\nhi<|im_end|> <tool_call>{"a": 1}</tool_call><|endoftext|>',
    "",
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city, in °C — 天气",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": 'City name, e.g. "Paris" or 北京'},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "description": "Current time", "parameters": {"type": "object", "properties": {}}},
}

CONVERSATIONS = {
    "single_user_no_system": [{"role": "user", "content": "Hello! 你好"}],
    "system_and_user": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be helpful."},
        {"role": "user", "content": "Write a haiku about JAX."},
        {"role": "assistant", "content": "Arrays compile fast\nXLA hums on the chip 🚀\ngradients flow down"},
        {"role": "user", "content": "Now in Chinese."},
        {"role": "assistant", "content": "数组飞速编译"},
        {"role": "user", "content": "Thanks"},
    ],
    "tool_calls_and_responses": [
        {"role": "user", "content": "Weather in Paris and Beijing, and the time?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "北京", "unit": "celsius"}},
                },
                {"name": "get_time", "arguments": {}},  # bare form, without the "function" wrapper
            ],
        },
        {"role": "tool", "content": '{"temperature": 21}'},
        {"role": "tool", "content": '{"temperature": 30}'},
        {"role": "tool", "content": "12:00"},
        {"role": "assistant", "content": "Paris 21 °C, 北京 30 °C, noon."},
        {"role": "user", "content": "Thanks!"},
    ],
    "assistant_text_with_tool_call": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Paris?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny"},
    ],
    "none_valued_keys_dropped": [
        {"role": "user", "content": "hi", "name": None},
        {"role": "assistant", "content": "hello", "tool_calls": None},
        {"role": "user", "content": "bye"},
    ],
}
TOOL_SETS = {"no_tools": None, "tools": [WEATHER_TOOL, TIME_TOOL]}


def hf_chat(hf_tokenizer, messages, tools, add_generation_prompt):
    text = hf_tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    ids = hf_tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    return text, list(ids)


def assert_stream_equals_decode(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool) -> None:
    decoder = StreamDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    chunks = [decoder.push(token_id) for token_id in ids]
    chunks.append(decoder.flush())
    assert "".join(chunks) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert not any("\ufffd" in chunk for chunk in chunks), chunks


# --- a tiny byte-level BPE tokenizer, built in a temp dir -------------------------------------------

TINY_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_NOT_SPECIAL = ["<tool_call>", "</tool_call>"]

TINY_TEMPLATE = """\
{%- set ns = namespace(turns=0) -%}
{{- bos_token -}}
{%- if tools %}
<|im_start|>system
Tools:
    {% for tool in tools %}
{{ tool | tojson }}
{{ tool.function.parameters | tojson(indent=2, sort_keys=True) }}
{{ tool.function.name | tojson(ensure_ascii=True) }}
{{ tool.function | tojson(separators=(',', ':')) }}
{% endfor %}
<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role not in ['system', 'user', 'assistant', 'tool'] %}
{{- raise_exception('unknown role ' + message.role) }}
{%- endif %}
{%- if message.role == 'tool' and loop.first %}{% continue %}{% endif %}
{%- set ns.turns = ns.turns + 1 %}
<|im_start|>{{ message.role }}
{{ message.content }}
{%- if message.tool_calls is defined %}
{%- for call in message.tool_calls %}
<tool_call>
{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}
</tool_call>
{%- endfor %}
{%- endif %}
<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}
{%- if show_turns is defined %}turns={{ ns.turns }} eos={{ eos_token }}{% endif %}
"""


def _byte_level_merges() -> list[tuple[str, str]]:
    """Merges that build a few multi-byte pieces: ASCII words and the UTF-8 bytes of 世, 界, 👍."""
    byte_to_char = {b: c for b, c in zip(range(256), _bytes_to_unicode())}
    merges = [
        ("h", "e"),
        ("l", "l"),
        ("he", "ll"),
        ("hell", "o"),
        ("Ġ", "w"),
        ("o", "r"),
        ("Ġw", "or"),
        ("l", "d"),
        ("Ġwor", "ld"),
    ]
    for character in "世界👍":
        pieces = [byte_to_char[b] for b in character.encode("utf-8")]
        merged = pieces[0]
        for piece in pieces[1:-1]:  # leave the last byte unmerged so characters split over tokens
            merges.append((merged, piece))
            merged += piece
    return merges


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    vocab = {character: i for i, character in enumerate(_bytes_to_unicode())}
    merges = _byte_level_merges()
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in TINY_SPECIAL])
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in TINY_NOT_SPECIAL])
    backend.save(str(directory / "tokenizer.json"))
    added = {
        str(backend.token_to_id(token)): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": token in TINY_SPECIAL,
        }
        for token in TINY_SPECIAL + TINY_NOT_SPECIAL
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": "<|endoftext|>",
        "eos_token": {"content": "<|im_end|>", "special": True, "__type": "AddedToken"},
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "chat_template": TINY_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def tiny_hf(tiny_dir):
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(tiny_dir))


TINY_TEXTS = [
    "hello world",
    "hello 世界 👍👍 hello",
    "<|im_start|>hello<|im_end|><tool_call>x</tool_call><|endoftext|>",
    "",
]


@pytest.mark.parametrize("text", TINY_TEXTS)
def test_tiny_encode_decode_matches_hf(tiny, tiny_hf, text):
    ids = tiny.encode(text)
    assert ids == tiny_hf.encode(text, add_special_tokens=False)
    for skip in (True, False):
        assert tiny.decode(ids, skip_special_tokens=skip) == tiny_hf.decode(ids, skip_special_tokens=skip)
    assert tiny.decode(ids, skip_special_tokens=False) == text


def test_tiny_merges_are_used(tiny):
    # Guards the fixture: if merges did not apply, the streaming tests below would not split characters.
    assert tiny.encode("hello world") == [tiny.token_to_id("hello"), tiny.token_to_id("Ġworld")]
    assert len(tiny.encode("世")) == 2


def test_tiny_vocabulary_attributes_match_hf(tiny, tiny_hf):
    assert tiny.vocab_size == len(tiny_hf)
    assert tiny.eos_token_id == tiny_hf.eos_token_id == tiny.token_to_id("<|im_end|>")
    assert tiny.pad_token_id == tiny_hf.pad_token_id
    assert tiny.bos_token_id == tiny_hf.bos_token_id
    assert tiny.id_to_token(tiny.eos_token_id) == "<|im_end|>"
    assert tiny.token_to_id("not-a-token") is None
    assert tiny.special_token_ids == {i for i, added in tiny_hf.added_tokens_decoder.items() if added.special}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("tools", TOOL_SETS.values(), ids=TOOL_SETS.keys())
@pytest.mark.parametrize(
    "name", ["system_and_user", "multi_turn", "tool_calls_and_responses", "none_valued_keys_dropped"]
)
def test_tiny_chat_template_matches_hf(tiny, tiny_hf, name, tools, add_generation_prompt):
    messages = CONVERSATIONS[name]
    if name == "tool_calls_and_responses":  # the tiny template reads call.function only
        messages = [m for m in messages if m["role"] != "assistant" or "tool_calls" not in m] + [
            CONVERSATIONS["assistant_text_with_tool_call"][2]
        ]
    text, ids = hf_chat(tiny_hf, messages, tools, add_generation_prompt)
    assert tiny.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt) == text
    assert (
        tiny.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True)
        == ids
    )


def test_tiny_chat_template_variables_match_hf(tiny, tiny_hf):
    messages = CONVERSATIONS["multi_turn"]
    expected = tiny_hf.apply_chat_template(messages, tokenize=False, show_turns=True, eos_token="EOS")
    rendered = tiny.apply_chat_template(messages, add_generation_prompt=False, show_turns=True, eos_token="EOS")
    assert rendered == expected
    assert rendered.startswith("<|endoftext|>") and rendered.endswith("turns=6 eos=EOS")


def test_tiny_tojson_arguments(tiny):
    rendered = tiny.apply_chat_template([{"role": "user", "content": "x"}], tools=[WEATHER_TOOL])
    parameters = WEATHER_TOOL["function"]["parameters"]
    assert json.dumps(WEATHER_TOOL, ensure_ascii=False) in rendered  # HF's tojson: no HTML escaping, no ASCII
    assert json.dumps(parameters, ensure_ascii=False, indent=2, sort_keys=True) in rendered
    assert json.dumps(WEATHER_TOOL["function"], ensure_ascii=False, separators=(",", ":")) in rendered


def test_tiny_raise_exception_and_errors(tiny, tiny_hf, tmp_path):
    bad = [{"role": "narrator", "content": "x"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role narrator"):
        tiny_hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role narrator"):
        tiny.apply_chat_template(bad)
    with pytest.raises(ValueError, match="empty conversation"):
        tiny.apply_chat_template([])
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_unreadable_tokenizer_files_are_checkpoint_errors(tiny_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text("garbage")
    with pytest.raises(CheckpointError, match="cannot read tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text((tiny_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text("{")
    with pytest.raises(CheckpointError, match="cannot read tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[]")
    with pytest.raises(CheckpointError, match="tokenizer_config.json is not a JSON object"):
        Tokenizer.from_dir(tmp_path)


def test_tiny_template_and_vocabulary_errors_are_qwen_jax_errors(tiny):
    """What a checkpoint's tokenizer lacks is a CheckpointError (a ValueError), one line at the CLI."""
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(GenerationError, match="empty conversation"):
        tiny.apply_chat_template([])
    without_template = Tokenizer(tiny.backend, special_tokens=tiny.special_tokens)
    with pytest.raises(CheckpointError, match="has no chat template"):
        without_template.apply_chat_template(messages)
    named = Tokenizer(tiny.backend, chat_template={"a": "A", "b": "B"})
    with pytest.raises(CheckpointError, match=r"several chat templates and no default.*\['a', 'b'\]"):
        named.apply_chat_template(messages)
    assert named.apply_chat_template(messages, chat_template="b") == "B"
    with pytest.raises(CheckpointError, match="eos_token '<nope>' is not in the tokenizer's vocabulary"):
        Tokenizer(tiny.backend, special_tokens={"eos_token": "<nope>"})
    with pytest.raises(TypeError, match="chat messages must be dicts"):
        tiny.apply_chat_template(["x"])


def test_template_sandbox_and_helpers(tiny):
    messages = [{"role": "user", "content": "x"}]
    assert tiny.apply_chat_template(messages, chat_template="{{ strftime_now('%Y') }}") == str(datetime.now().year)
    with pytest.raises(jinja2.exceptions.SecurityError):
        tiny.apply_chat_template(messages, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        tiny.apply_chat_template(messages, chat_template="{{ messages.append(1) }}")
    with pytest.raises(jinja2.exceptions.SecurityError, match="underscore"):
        tiny.apply_chat_template(messages, chat_template="{% set ns = namespace(_x=1) %}")
    assert tiny.apply_chat_template(messages, chat_template="{{ dict(a=1) | tojson }}") == '{"a": 1}'


def test_special_flags_follow_config_like_hf(tiny_dir, tmp_path):
    """tokenizer_config.json's flags override tokenizer.json's; tokens the config names stay special."""
    (tmp_path / "tokenizer.json").write_bytes((tiny_dir / "tokenizer.json").read_bytes())
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    flags = {added["content"]: added for added in config["added_tokens_decoder"].values()}
    flags["<tool_call>"]["special"] = True  # promoted by the config only
    flags["<|im_start|>"]["special"] = False  # demoted, but named in additional_special_tokens
    flags["<|im_end|>"]["special"] = False  # demoted, but it is the eos_token
    config["additional_special_tokens"] = ["<|im_start|>"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tokenizer = Tokenizer.from_dir(tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    ids = tokenizer.encode("<tool_call>hello<|im_start|>world<|im_end|></tool_call><|endoftext|>")
    assert tokenizer.decode(ids) == hf.decode(ids, skip_special_tokens=True) == "helloworld</tool_call>"


def test_chat_template_file_takes_priority(tiny_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    tokenizer = Tokenizer.from_dir(tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    messages = CONVERSATIONS["system_and_user"]
    assert tokenizer.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False)
    assert tokenizer.apply_chat_template(messages) == "[You are a terse assistant.][What is 2+2?]"


def test_tiny_stream_decoder(tiny):
    text = "hello 世界👍 <|im_end|>hello world👍世<tool_call>界"
    ids = tiny.encode(text)
    for skip in (True, False):
        assert_stream_equals_decode(tiny, ids, skip)
    # A character cut off at the end of generation comes out of flush(), as decode gives it.
    truncated = tiny.encode("hello 👍")[:-1]
    decoder = StreamDecoder(tiny)
    assert "".join(decoder.push(i) for i in truncated) == "hello "
    assert decoder.flush() == tiny.decode(truncated)[len("hello ") :] == "\ufffd"


# --- tool-call parsing ------------------------------------------------------------------------------


def test_parse_tool_calls_well_formed():
    text = (
        'I\'ll check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"北京\\"}"}\n</tool_call>'
        '<tool_call>{"name": "get_time"}</tool_call>'
    )
    content, calls = parse_tool_calls(text)
    assert content == "I'll check both."
    assert calls == [
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "get_weather", "arguments": {"city": "北京"}},
        {"name": "get_time", "arguments": {}},
    ]


def test_parse_tool_calls_without_calls_returns_text_unchanged():
    assert parse_tool_calls("  plain answer\n") == ("  plain answer\n", [])


@pytest.mark.parametrize(
    "bad_block",
    [
        '<tool_call>\n{"name": "f", "arguments": {"x": 1}\n</tool_call>',  # missing brace
        "<tool_call>\nnot json at all\n</tool_call>",
        "<tool_call>\n[1, 2]\n</tool_call>",  # not an object
        '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',  # arguments not an object
        '<tool_call>\n{"name": "f", "arguments": "{oops"}\n</tool_call>',  # arguments string not JSON
        '<tool_call>\n{"name": "f", "arguments": {"x": 1}}',  # unclosed: generation cut off
    ],
)
def test_parse_tool_calls_malformed_kept_in_content(bad_block):
    good = '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>'
    assert parse_tool_calls("Answer: " + bad_block) == ("Answer: " + bad_block, [])
    content, calls = parse_tool_calls(good + "\n" + bad_block)
    assert calls == [{"name": "g", "arguments": {}}]
    assert content == bad_block


# --- the real Qwen2.5 tokenizer -------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen() -> Tokenizer:
    return Tokenizer.from_dir(QWEN_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def qwen_hf():
    return transformers.AutoTokenizer.from_pretrained(QWEN_TOKENIZER_DIR)


@requires_qwen_tokenizer
def test_qwen_known_encodings(qwen):
    assert qwen.encode("Hello world") == [9707, 1879]
    assert qwen.encode("<|im_start|>user\n") == [151644, 872, 198]
    assert (qwen.eos_token_id, qwen.pad_token_id, qwen.bos_token_id, qwen.vocab_size) == (151645, 151643, None, 151665)


@requires_qwen_tokenizer
def test_qwen_encode_matches_hf_and_round_trips(qwen, qwen_hf):
    assert qwen.vocab_size == len(qwen_hf)
    assert (qwen.eos_token_id, qwen.pad_token_id) == (qwen_hf.eos_token_id, qwen_hf.pad_token_id)
    batch = qwen.encode_batch(MIXED_TEXTS)
    for text, ids in zip(MIXED_TEXTS, batch):
        assert ids == qwen.encode(text) == qwen_hf.encode(text, add_special_tokens=False), text
        assert qwen.decode(ids, skip_special_tokens=False) == text
        assert qwen.decode(ids, skip_special_tokens=True) == qwen_hf.decode(ids, skip_special_tokens=True)


@requires_qwen_tokenizer
def test_qwen_skip_special_tokens_matches_hf(qwen, qwen_hf):
    hello = qwen.encode("Hello")
    all_added = list(range(151643, 151665))
    ids = [i for added in all_added for i in (added, *hello)]
    for skip in (True, False):
        assert qwen.decode(ids, skip_special_tokens=skip) == qwen_hf.decode(ids, skip_special_tokens=skip)
    kept = {qwen.id_to_token(i) for i in all_added if i not in qwen.special_token_ids}
    assert "<tool_call>" in kept and "<|fim_prefix|>" in kept and "<|im_end|>" not in kept


@requires_qwen_tokenizer
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("tools", TOOL_SETS.values(), ids=TOOL_SETS.keys())
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_qwen_chat_template_matches_hf(qwen, qwen_hf, name, tools, add_generation_prompt):
    messages = CONVERSATIONS[name]
    text, ids = hf_chat(qwen_hf, messages, tools, add_generation_prompt)
    assert qwen.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt) == text
    assert (
        qwen.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True)
        == ids
    )


@requires_qwen_tokenizer
def test_qwen_tools_as_python_functions_match_hf(qwen, qwen_hf):
    def get_weather(city: str, unit: str = "celsius") -> str:
        """Get the current weather.

        Args:
            city: The city name.
            unit: Temperature unit.
        """
        return city + unit

    messages = CONVERSATIONS["single_user_no_system"]
    assert qwen.apply_chat_template(messages, tools=[get_weather]) == qwen_hf.apply_chat_template(
        messages, tools=[get_weather], add_generation_prompt=True, tokenize=False
    )


@requires_qwen_tokenizer
def test_qwen_stream_decoder_equals_decode(qwen):
    text = "".join(MIXED_TEXTS) + "<|im_end|>"
    ids = qwen.encode(text)
    assert any("\ufffd" in qwen.decode([i]) for i in ids)  # some characters really are split over tokens
    for skip in (True, False):
        assert_stream_equals_decode(qwen, ids, skip)


@requires_qwen_tokenizer
def test_qwen_tool_call_round_trip(qwen):
    """The calls the template renders for an assistant turn parse back to the same calls."""
    messages = CONVERSATIONS["tool_calls_and_responses"][:2]
    rendered = qwen.apply_chat_template(messages, tools=[WEATHER_TOOL, TIME_TOOL], add_generation_prompt=False)
    assistant_turn = rendered.rsplit("<|im_start|>assistant", 1)[1].removesuffix("<|im_end|>\n")
    content, calls = parse_tool_calls(qwen.decode(qwen.encode(assistant_turn)))
    expected = [call.get("function", call) for call in messages[1]["tool_calls"]]
    assert content == "" and calls == [{"name": c["name"], "arguments": c["arguments"]} for c in expected]
