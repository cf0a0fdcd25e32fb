"""Structured output: grammars that constrain which tokens a row may generate (llguidance).

A request asks for output that matches a JSON schema, a regular expression, one of a few fixed
strings, or a Lark / GBNF grammar (`Constraint`, built by `constraint_from` from the `json_schema=`,
`regex=`, `choice=` and `grammar=` keywords of every generation call). Before each token, the
host computes the row's allowed tokens as a packed bitmask (`[rows, ceil(vocab / 32)]` int32, bit
`t % 32` of word `t // 32` set when token t is allowed: llguidance's and vLLM's layout), and the
sampler sets the logits of every other token to -inf inside the compiled sampling step
(`qwen_jax.generation.sampler.sample_rows`); a row without a constraint gets an all-ones row, so
constrained and free rows share one batch and one compiled program. After the token is drawn,
the row's matcher consumes it (`GrammarMatcher.advance`). Once the grammar is complete only the
end-of-sequence tokens are allowed, so a constrained row ends with finish reason "stop"; a row
cut by `max_new_tokens` ends with "length" and its output may be incomplete (as OpenAI's).

llguidance was chosen over xgrammar (benchmarks/structured.py, results in benchmarks/RESULTS.md):
it refuses the JSON-schema features it cannot enforce with a message naming them, where xgrammar
ignores some (lookahead patterns, unknown formats, uniqueItems) and lets non-conforming output
through; it has no dependencies (xgrammar requires torch and triton). It is the optional extra
`structured`.

JSON is generated on one line as `json.dumps` writes it (", " and ": " separators, no other
whitespace): free whitespace would let a model pad its output with blanks until `max_new_tokens`.

Grammars are compiled once per (kind, spec) and tokenizer (`GrammarCompiler`, an LRU cache of
compiled matchers); each request gets a cheap copy of the compiled matcher.
The tokenizer's llguidance view covers the model's whole (padded) vocabulary: ids past the
tokenizer's vocabulary are never allowed.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import re
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from qwen_jax.errors import GenerationError
from qwen_jax.extras import require

KINDS = ("json_schema", "regex", "choice", "grammar")
MAX_REASON = 500  # characters of the library's error kept in ours
CACHE_SIZE = 256  # compiled grammars kept per tokenizer (least recently used dropped first)
# One-line JSON as `json.dumps` writes it; see the module docstring.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT: Mapping[str, Any] = {"type": "object"}
TOOL_CALL_END = "}\n"  # closes a tool call's JSON before </tool_call>


_FEATURE = "structured output (json_schema, regex, choice, grammar)"


def available() -> bool:
    """Whether the structured-output extra (llguidance) is installed."""
    return importlib.util.find_spec("llguidance") is not None


def _llguidance():
    return require("llguidance", extra="structured", feature=_FEATURE)


@dataclasses.dataclass(frozen=True)
class Constraint:
    """What a request's output must match: `kind` (one of `KINDS`) and `spec`, its canonical text
    (the JSON schema as JSON, properties in their order, the regular expression, the choices as a JSON list,
    the grammar). Hashable: the compiled-grammar cache is keyed on it."""

    kind: str
    spec: str

    def grammar(self) -> str:
        """The llguidance grammar of this constraint (not compiled yet)."""
        llguidance = _llguidance()
        try:
            if self.kind == "json_schema":
                return llguidance.LLMatcher.grammar_from_json_schema(self.spec, overrides=JSON_OPTIONS)
            if self.kind == "regex":
                return llguidance.LLMatcher.grammar_from_regex(self.spec)
            if self.kind == "choice":
                return llguidance.grammar_from("choice", self.spec)
            return llguidance.grammar_from("grammar", self.spec)
        except ValueError as e:
            raise GenerationError(f"invalid {self.kind}: {e}", param=self.kind) from None


def json_schema_of(schema: Any) -> dict:
    """A JSON schema as a dict, from a dict, a JSON string, or a Pydantic model class (`model_json_schema()`)."""
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        schema = schema.model_json_schema()
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise GenerationError(f"json_schema is not valid JSON: {e}", param="json_schema") from None
    if isinstance(schema, bool):  # JSON Schema's `true`: any value
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, Mapping):
        raise GenerationError(
            f"json_schema must be a JSON schema (a dict, its JSON text or a Pydantic model class), "
            f"got {type(schema).__name__}",
            param="json_schema",
        )
    return dict(schema)


def constraint_from(
    *,
    json_schema: Any = None,
    regex: str | None = None,
    choice: Sequence[str] | None = None,
    grammar: str | None = None,
) -> Constraint | None:
    """The `Constraint` of a request's `json_schema=` / `regex=` / `choice=` / `grammar=` keywords
    (at most one; None when none is given). Checks the types here; whether the library can enforce
    the constraint is checked when it is compiled (`GrammarCompiler.matcher`)."""
    given = dict(json_schema=json_schema, regex=regex, choice=choice, grammar=grammar)
    given = {kind: value for kind, value in given.items() if value is not None}
    if len(given) > 1:
        raise GenerationError(
            f"give at most one of json_schema, regex, choice and grammar (got {', '.join(given)})",
            param=next(iter(given)),
        )
    if not given:
        return None
    kind, value = next(iter(given.items()))
    if kind == "json_schema":
        return Constraint(kind, json.dumps(json_schema_of(value)))
    if kind == "choice":
        if isinstance(value, str) or not isinstance(value, Sequence) or not value:
            raise GenerationError("choice must be a non-empty list of strings", param="choice")
        if not all(isinstance(c, str) and c for c in value):
            raise GenerationError(f"choice must hold non-empty strings, got {list(value)!r}", param="choice")
        return Constraint(kind, json.dumps(list(value)))
    if not isinstance(value, str) or not value:
        raise GenerationError(f"{kind} must be a non-empty string, got {value!r}", param=kind)
    return Constraint(kind, value)


# ----------------------------------------------------------------------------- tool calls
def tool_call_grammar(
    tools: Sequence[Mapping[str, Any]],
    *,
    required: bool,
    single: bool = False,
    token_ids: Mapping[str, int] | None = None,
) -> str:
    """A Lark grammar for Qwen2.5's tool calls, each one
    `<tool_call>\\n{"name": NAME, "arguments": ARGUMENTS}\\n</tool_call>`, several separated by a
    newline (one with `single`).

    tools: `{"name": ..., "parameters": schema}`, one per function that may be called; ARGUMENTS
        match `parameters`, or are any JSON object where it is None.
    required: the output is tool calls only (OpenAI's tool_choice "required" or a named function);
        else it is free text or tool calls.
    token_ids: the ids of "<tool_call>" and "</tool_call>" when they are single tokens of the
        vocabulary (Qwen2.5's): the grammar then names them by id, as the model generates them;
        None: the tags are plain text.
    """
    if not tools:
        raise GenerationError("tool calls need at least one tool", param="tools")
    if token_ids is not None:
        open_tag, close_tag = f"<[{token_ids['<tool_call>']}]>", f"<[{token_ids['</tool_call>']}]>"
    else:
        open_tag, close_tag = json.dumps("<tool_call>"), json.dumps("</tool_call>")
    rules = []
    for index, tool in enumerate(tools):
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise GenerationError("every tool needs a function name", param="tools")
        schema = json_schema_of(tool.get("parameters") or ANY_JSON_OBJECT)
        schema = {**schema, "x-guidance": JSON_OPTIONS}
        head = json.dumps(f'\n{{"name": {json.dumps(name)}, "arguments": ')  # a Lark string literal
        rules.append(f"call_{index}: {open_tag} {head} args_{index} {json.dumps(TOOL_CALL_END)} {close_tag}")
        rules.append(f"args_{index}: %json {json.dumps(schema)}")
    calls = "calls: call" if single else f"calls: call ({json.dumps(chr(10))} call)*"
    call = f"call: {' | '.join(f'call_{index}' for index in range(len(tools)))}"
    start = "start: calls" if required else "start: calls | TEXT\nTEXT: /(?s:.+)/"
    return "\n".join([start, calls, call, *rules]) + "\n"


# ----------------------------------------------------------------------------- compilation and matching
class GrammarMatcher:
    """One row's grammar state: which tokens may come next (`fill`), and the tokens drawn (`advance`)."""

    def __init__(self, matcher: Any, constraint: Constraint):
        self._matcher = matcher
        self.constraint = constraint

    def fill(self, bitmask: np.ndarray, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (int32, `[rows, words]`)."""
        require("llguidance.numpy", extra="structured", feature=_FEATURE).fill_next_token_bitmask(
            self._matcher, bitmask, row
        )

    def advance(self, token_id: int) -> bool:
        """Consume a drawn token; False when the grammar does not allow it (`error` says why)."""
        return bool(self._matcher.consume_token(int(token_id)))

    @property
    def error(self) -> str:
        """The matcher's error ("" when none)."""
        return self._matcher.get_error()

    @property
    def complete(self) -> bool:
        """Whether the output so far matches the whole grammar (it may end here)."""
        return bool(self._matcher.is_accepting())


def fill_bitmask(matchers: Sequence[GrammarMatcher | None], vocab_size: int) -> np.ndarray:
    """The packed bitmask `[len(matchers), ceil(vocab_size / 32)]` int32 of a batch: row r from
    `matchers[r]`, all ones (every token allowed) where it is None."""
    bitmask = np.full((len(matchers), bitmask_words(vocab_size)), -1, np.int32)
    for row, matcher in enumerate(matchers):
        if matcher is not None:
            matcher.fill(bitmask, row)
    return bitmask


def bitmask_words(vocab_size: int) -> int:
    """int32 words of a packed bitmask row over `vocab_size` tokens."""
    return -(-vocab_size // 32)


class GrammarCompiler:
    """Compiles constraints for one tokenizer and model vocabulary, keeping the compiled grammars
    (an LRU cache of `CACHE_SIZE`); thread safe. Get it with `grammar_compiler`."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Iterable[int]):
        if tokenizer.vocab_size > vocab_size:
            raise GenerationError(
                f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocabulary of {vocab_size}"
            )
        llguidance = _llguidance()
        eos = sorted({int(i) for i in eos_token_ids})
        if not eos:
            raise GenerationError("structured output needs an end-of-sequence token to end the output")
        self.vocab_size = vocab_size
        self._tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=eos)
        self._compiled: collections.OrderedDict[Constraint, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, constraint: Constraint) -> GrammarMatcher:
        """A fresh matcher for `constraint`, compiled on first use; GenerationError (param: the
        constraint's kind) when the library cannot enforce it, naming the reason."""
        with self._lock:
            compiled = self._compiled.get(constraint)
            if compiled is not None:
                self._compiled.move_to_end(constraint)
        if compiled is None:
            compiled = self._compile(constraint)
            with self._lock:
                self._compiled[constraint] = compiled
                while len(self._compiled) > CACHE_SIZE:
                    self._compiled.popitem(last=False)
        return GrammarMatcher(compiled.deep_copy(), constraint)

    def _compile(self, constraint: Constraint):
        llguidance = _llguidance()
        matcher = llguidance.LLMatcher(self._tokenizer, constraint.grammar(), log_level=0)
        if matcher.is_error():
            reason = _reason(matcher.get_error())
            raise GenerationError(f"unsupported {constraint.kind}: {reason}", param=constraint.kind)
        return matcher

    @property
    def cached(self) -> int:
        """How many compiled grammars the cache holds."""
        with self._lock:
            return len(self._compiled)


_GRAMMAR_ECHO = re.compile(r"^\s*(\d+ \|.*|[\s^]*)$")  # llguidance's excerpt of the grammar and its carets


def _reason(message: str) -> str:
    """llguidance's error as one line: its messages, without the grammar excerpts it quotes."""
    lines = []
    for line in message.split("<state>")[0].splitlines():
        if not _GRAMMAR_ECHO.match(line):
            lines.append(line.strip())
    return " ".join(lines)[:MAX_REASON] or message.strip()


_COMPILERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMPILERS_LOCK = threading.Lock()


def grammar_compiler(tokenizer, vocab_size: int, eos_token_ids: Iterable[int]) -> GrammarCompiler:
    """The `GrammarCompiler` of `tokenizer` for a model vocabulary and its end-of-sequence ids,
    built once per tokenizer (llguidance's view of the vocabulary is costly to build)."""
    key = (int(vocab_size), tuple(sorted({int(i) for i in eos_token_ids})))
    with _COMPILERS_LOCK:
        compilers = _COMPILERS.setdefault(tokenizer, {})
        compiler = compilers.get(key)
        if compiler is None:
            compiler = compilers[key] = GrammarCompiler(tokenizer, *key)
    return compiler
