"""Tokenizer, chat template and tool-call parsing with Hugging Face semantics.

`Tokenizer` wraps a `tokenizers.Tokenizer` loaded from a checkpoint's `tokenizer.json` and renders
the checkpoint's jinja chat template the way `transformers`' `apply_chat_template` does, so a
conversation becomes the same token ids in qwen-jax as in HF transformers. `StreamDecoder` turns
generated ids into text incrementally without splitting multi-byte characters, and
`parse_tool_calls` turns Qwen's `<tool_call>{json}</tool_call>` blocks into structured calls.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer

from qwen_jax.errors import CheckpointError, GenerationError, UsageError

# The named special tokens HF passes to every chat template as variables (`special_tokens_map`).
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REPLACEMENT_CHARACTER = "\ufffd"

Message = Mapping[str, Any]


class Tokenizer:
    """A checkpoint's tokenizer: encode/decode via `tokenizers`, chat template via jinja2.

    Build it with `Tokenizer.from_dir(path)`. No BOS token is ever added (Qwen has none).
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        chat_template: str | dict[str, str] | None = None,
        special_tokens: Mapping[str, str] | None = None,
        special_token_ids: Iterable[int] | None = None,
        clean_up_tokenization_spaces: bool = False,
    ):
        """Wrap `backend`.

        Args:
            backend: the `tokenizers.Tokenizer` (from `tokenizer.json`).
            chat_template: a jinja template, or a dict of named templates (`"default"`, `"tool_use"`).
            special_tokens: named special tokens, e.g. `{"eos_token": "<|im_end|>", "pad_token": ...}`;
                they are also the template variables `eos_token`, `bos_token`, ... .
            special_token_ids: ids that `decode(skip_special_tokens=True)` removes; defaults to the
                backend's added tokens flagged `special`.
            clean_up_tokenization_spaces: HF's legacy space clean-up on decode (never applied to BPE,
                as in transformers).
        """
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens = {name: token for name, token in (special_tokens or {}).items() if token is not None}
        for name, token in self.special_tokens.items():
            if backend.token_to_id(token) is None:
                raise CheckpointError(f"{name} {token!r} is not in the tokenizer's vocabulary")
        if special_token_ids is None:
            special_token_ids = [i for i, added in backend.get_added_tokens_decoder().items() if added.special]
        self.special_token_ids = frozenset(int(i) for i in special_token_ids)
        self._clean_up_spaces = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"
        self._text_only_backend: BackendTokenizer | None = None  # built on first use of split_special_tokens
        self._text_only_lock = threading.Lock()

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load `tokenizer.json`, `tokenizer_config.json` and chat templates from a checkpoint directory.

        Chat template sources, as in transformers: `chat_template.jinja` and
        `additional_chat_templates/*.jinja` take priority over `tokenizer_config.json`'s `chat_template`.
        Which added tokens `decode(skip_special_tokens=True)` drops follows transformers: the
        `special` flags of `tokenizer_config.json`'s `added_tokens_decoder` where it has them, else
        `tokenizer.json`'s, plus every token the config names as a special token.
        """
        directory = Path(path)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {directory}: qwen-jax needs a fast (tokenizers) tokenizer")
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
            raise CheckpointError(f"{tokenizer_file}: cannot read tokenizer.json ({e})") from None
        config_file = directory / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{config_file}: cannot read tokenizer_config.json ({e})") from None
            if not isinstance(config, dict):
                raise CheckpointError(f"{config_file}: tokenizer_config.json is not a JSON object")

        special_tokens = {name: _token_content(config.get(name)) for name in _NAMED_SPECIAL_TOKENS}
        # As in transformers: tokenizer_config.json's flags override tokenizer.json's, and tokens the
        # config names (eos_token, ..., additional_special_tokens) are special whatever their flag.
        special_token_ids = {i for i, added in backend.get_added_tokens_decoder().items() if added.special}
        for token_id, added in config.get("added_tokens_decoder", {}).items():
            if "special" in added:
                (special_token_ids.add if added["special"] else special_token_ids.discard)(int(token_id))
        extra_special_tokens = config.get("extra_special_tokens") or []
        if isinstance(extra_special_tokens, Mapping):  # named extra tokens, e.g. {"image_token": "<image>"}
            extra_special_tokens = list(extra_special_tokens.values())
        named = [*special_tokens.values(), *config.get("additional_special_tokens", []), *extra_special_tokens]
        for token in map(_token_content, named):
            if token is not None and backend.token_to_id(token) is not None:
                special_token_ids.add(backend.token_to_id(token))

        return cls(
            backend,
            chat_template=_load_chat_template(directory, config),
            special_tokens={name: token for name, token in special_tokens.items() if token is not None},
            special_token_ids=special_token_ids,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        )

    # --- vocabulary -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, added tokens included (HF `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        """Id of `eos_token` from `tokenizer_config.json` (`<|im_end|>` for Qwen2.5 Instruct)."""
        return self._named_token_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        """Id of `pad_token` (`<|endoftext|>` for Qwen2.5)."""
        return self._named_token_id("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        """Id of `bos_token`; None for Qwen2.5."""
        return self._named_token_id("bos_token")

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string (e.g. `"<|im_end|>"`), or None if it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of an id (byte-level form for BPE pieces), or None if out of range."""
        return self.backend.id_to_token(token_id)

    def _named_token_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    # --- encode / decode ----------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = False, split_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it (e.g. `<|im_start|>`) become their ids.

        `add_special_tokens` runs the tokenizer's post-processor (a no-op for Qwen, which adds no BOS).
        `split_special_tokens` (as in transformers) encodes the text of tokens flagged special as plain
        text instead, so `"<|im_start|>"` becomes the ids of `<`, `|`, `im`, ... (added tokens not
        flagged special, such as `<tool_call>`, keep their ids).
        """
        backend = self._text_only() if split_special_tokens else self.backend
        return backend.encode(text, add_special_tokens=add_special_tokens).ids

    def _text_only(self) -> BackendTokenizer:
        """A copy of the backend that does not match special tokens (a separate object: the flag is
        per tokenizer, and flipping it on the shared one would race with other threads' encodes)."""
        with self._text_only_lock:
            if self._text_only_backend is None:
                backend = BackendTokenizer.from_str(self.backend.to_str())
                backend.encode_special_tokens = True
                self._text_only_backend = backend
            return self._text_only_backend

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        """`encode` for many texts at once (parallel in the Rust backend)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. `skip_special_tokens` drops the tokens the checkpoint flags special.

        For Qwen2.5 that is `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` and the vision tokens, while
        `<tool_call>`, `</tool_call>` and the FIM tokens are kept (they are not flagged special).
        """
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_token_ids]
        text = self.backend.decode(ids, skip_special_tokens=False)
        return _clean_up_tokenization(text) if self._clean_up_spaces else text

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        """`decode` for each sequence of `batch`."""
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    # --- chat template --------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any] | Callable[..., Any]] | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        *,
        chat_template: str | None = None,
        **extra: Any,
    ) -> str | list[int]:
        """Render a conversation with the checkpoint's chat template, as HF `apply_chat_template` does.

        Args:
            messages: dicts with `role` and `content`; assistant messages may carry `tool_calls`
                (`[{"type": "function", "function": {"name": ..., "arguments": {...}}}]` or the bare
                `{"name", "arguments"}` form), tool results use role `tool`. Keys whose value is None
                are dropped, as HF does.
            tools: JSON-schema dicts (`{"type": "function", "function": {...}}`), or Python functions
                with type hints and a Google-style docstring (converted by transformers, if installed).
            add_generation_prompt: end with the assistant header so the model answers next. Note the
                default is True here (HF's is False): this is the call made before generating.
            tokenize: return token ids instead of text.
            chat_template: a template to use instead of the checkpoint's (or the name of one of its
                named templates).
            **extra: further template variables (e.g. `enable_thinking`, `documents`); they override
                the special-token variables (`eos_token`, ...).

        Returns:
            The rendered text, or its token ids when `tokenize` is True.
        """
        if not messages:
            raise GenerationError("cannot apply the chat template to an empty conversation")
        template = self._select_chat_template(chat_template, tools)
        conversation = []
        for message in messages:
            if not isinstance(message, Mapping):
                raise TypeError(f"chat messages must be dicts with 'role' and 'content', got {message!r}")
            conversation.append({key: value for key, value in message.items() if value is not None})
        tool_schemas = None if tools is None else [_tool_schema(tool) for tool in tools]
        variables = {"documents": None, **self.special_tokens, **extra}
        text = _compile_chat_template(template).render(
            messages=conversation, tools=tool_schemas, add_generation_prompt=add_generation_prompt, **variables
        )
        return self.encode(text) if tokenize else text

    def _select_chat_template(self, chat_template: str | None, tools: object) -> str:
        templates = self.chat_template
        if isinstance(templates, dict):
            if chat_template is not None:
                return templates.get(chat_template, chat_template)
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise CheckpointError(
                f"several chat templates and no default: pass chat_template= one of {sorted(templates)}"
            )
        if chat_template is not None:
            return chat_template
        if templates is None:
            raise CheckpointError("the tokenizer has no chat template (tokenizer_config.json, chat_template.jinja)")
        return templates

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_token={self.special_tokens.get('eos_token')!r})"


class StreamDecoder:
    """Incremental detokenizer: feed generated ids one at a time, get text as soon as it is complete.

    Byte-level BPE splits a multi-byte UTF-8 character (CJK, emoji) over several tokens; decoding
    those alone gives U+FFFD. Text ending in U+FFFD is therefore held back until the character's
    remaining tokens arrive. Each `push` decodes only a short window of recent tokens (the tokens of
    the previous emission give the decoder its context), so the cost per token is constant.
    The concatenation of all `push` results and `flush()` equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window: context already emitted
        self._read_offset = 0  # tokens before this have been emitted as text

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (possibly empty)."""
        self.token_ids.append(int(token_id))
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        window_text = self._decode(self._prefix_offset, len(self.token_ids))
        if len(window_text) <= len(prefix_text) or window_text.endswith(_REPLACEMENT_CHARACTER):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        return window_text[len(prefix_text) :]

    def flush(self) -> str:
        """Return whatever is still held back (e.g. an incomplete character at the end of generation)."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        window_text = self._decode(self._prefix_offset, len(self.token_ids))
        self._prefix_offset = self._read_offset = len(self.token_ids)
        return window_text[len(prefix_text) :]

    def _decode(self, start: int, stop: int) -> str:
        return self.tokenizer.decode(self.token_ids[start:stop], skip_special_tokens=self.skip_special_tokens)


_TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Split generated text into its plain content and Qwen's `<tool_call>` blocks.

    Each block `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` becomes
    `{"name": str, "arguments": dict}` (arguments given as a JSON-encoded string are decoded too).
    A block whose body is not such a JSON object, and an unclosed `<tool_call>` (generation cut
    off), is left in the content unchanged, so nothing the model wrote is lost.

    Returns:
        `(content, calls)`: `content` is `text` without the parsed blocks (stripped of surrounding
        whitespace when blocks were removed), `calls` in the order they appear.
    """
    calls: list[dict[str, Any]] = []
    pieces: list[str] = []
    position = 0
    for match in _TOOL_CALL_BLOCK.finditer(text):
        call = _parse_tool_call_body(match.group(1))
        if call is None:
            continue
        pieces.append(text[position : match.start()])
        position = match.end()
        calls.append(call)
    if not calls:
        return text, []
    pieces.append(text[position:])
    return "".join(pieces).strip(), calls


def _parse_tool_call_body(body: str) -> dict[str, Any] | None:
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"name": call["name"], "arguments": arguments}


# --- loading helpers --------------------------------------------------------------------------


def _token_content(token: str | Mapping[str, Any] | None) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialised AddedToken dict."""
    if isinstance(token, Mapping):
        return token.get("content")
    return token


def _load_chat_template(directory: Path, config: Mapping[str, Any]) -> str | dict[str, str] | None:
    templates: dict[str, str] = {}
    configured = config.get("chat_template")
    if isinstance(configured, str):
        templates["default"] = configured
    elif isinstance(configured, list):  # older format: [{"name": ..., "template": ...}]
        templates.update({entry["name"]: entry["template"] for entry in configured})
    template_files = {}
    if (directory / "chat_template.jinja").is_file():
        template_files["default"] = directory / "chat_template.jinja"
    extra_dir = directory / "additional_chat_templates"
    if extra_dir.is_dir():
        template_files.update({file.name.removesuffix(".jinja"): file for file in extra_dir.glob("*.jinja")})
    if template_files:  # template files take priority over every template in tokenizer_config.json
        templates = {name: file.read_text(encoding="utf-8") for name, file in template_files.items()}
    if not templates:
        return None
    if set(templates) == {"default"}:
        return templates["default"]
    return templates


def _clean_up_tokenization(text: str) -> str:
    """HF's legacy `clean_up_tokenization` (for WordPiece-style vocabularies)."""
    for spaced, joined in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(spaced, joined)
    return text


# --- chat template environment (HF `apply_chat_template` semantics) ----------------------------


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters and sorts keys; HF templates expect plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore-prefixed attributes (they reach CPython internals)."""

    def __init__(*args: Any, **kwargs: Any):  # same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore-prefixed attribute {name!r}")


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without handing them the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (HF's assistant-mask marker) and renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Callable[[], str]) -> str:
        return caller()


@lru_cache(maxsize=16)
def _compile_chat_template(template: str) -> jinja2.Template:
    # Chat templates ship with checkpoints from the Hub: untrusted code, hence the sandbox.
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["namespace"] = _TemplateNamespace
    environment.globals["dict"] = _TemplateDict()
    return environment.from_string(template)


def _tool_schema(tool: Mapping[str, Any] | Callable[..., Any]) -> Mapping[str, Any]:
    if isinstance(tool, Mapping):
        return tool
    if inspect.isfunction(tool) or inspect.ismethod(tool):
        try:
            from transformers.utils import get_json_schema
        except ImportError as e:
            raise UsageError(
                "tools given as Python functions need transformers (pip install transformers); pass JSON-schema dicts"
            ) from e
        return get_json_schema(tool)
    raise TypeError(f"a tool must be a JSON-schema dict or a Python function, got {tool!r}")
