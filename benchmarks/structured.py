"""Structured output: the grammar libraries compared, and the cost of constrained decoding.

    python benchmarks/structured.py libraries     # llguidance vs xgrammar on the real Qwen2.5 tokenizer
    python benchmarks/structured.py decode        # constrained vs free decoding, 1 and 8 rows, 0.5B random

`libraries` measures, for each test schema: grammar compile time (first compile, and the matcher
creation from a cached grammar), the mean and worst per-token mask time along a valid JSON
document, and which schemas each library refuses, with its message. The tokenizer is the real
Qwen2.5 tokenizer (QWEN_JAX_TOKENIZER_DIR, or --tokenizer).

`decode` runs the engine on the 0.5B configuration with random weights: the same requests with
and without a JSON schema (`LONG_TEXT`), at 1 and 8 concurrent rows, alternating, and reports
generated tokens per second (medians).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from importlib.metadata import version

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
SCHEMAS = {
    "person (min/max, format, enum, array bounds, optional)": PERSON,
    "nested objects + anyOf": {
        "type": "object",
        "properties": {
            "id": {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"}]},
            "owner": PERSON,
            "location": {
                "type": "object",
                "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90}, "lon": {"type": "number"}},
                "required": ["lat", "lon"],
                "additionalProperties": False,
            },
        },
        "required": ["id", "owner", "location"],
        "additionalProperties": False,
    },
    "dates and uuid formats": {
        "type": "object",
        "properties": {
            "when": {"type": "string", "format": "date-time"},
            "day": {"type": "string", "format": "date"},
            "uid": {"type": "string", "format": "uuid"},
        },
        "required": ["when", "day", "uid"],
    },
    "any JSON object": {"type": "object"},
}
# One-line JSON as json.dumps writes it: no free whitespace (a model could loop on it).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Values that conform: the mask is measured along their tokens.
DOCUMENTS = {
    "person (min/max, format, enum, array bounds, optional)": {
        "name": "Ada Lovelace",
        "age": 36,
        "email": "ada@example.com",
        "tags": ["a", "c"],
    },
    "nested objects + anyOf": {
        "id": "abc-12",
        "owner": {"name": "Bob", "age": 7},
        "location": {"lat": 48.85, "lon": 2.35},
    },
    "dates and uuid formats": {
        "when": "2024-01-02T03:04:05Z",
        "day": "2024-01-02",
        "uid": "123e4567-e89b-12d3-a456-426614174000",
    },
    "any JSON object": {"x": [1, 2, {"y": None}], "z": "text"},
}
# Schemas a library might refuse (the error message is part of the comparison).
HARD_SCHEMAS = {
    "pattern with lookahead": {"type": "string", "pattern": "^(?=a)a+$"},
    "unknown format": {"type": "string", "format": "ipv4-cidr"},
    "$ref recursion": {
        "type": "object",
        "properties": {"child": {"$ref": "#"}, "v": {"type": "integer"}},
        "required": ["v"],
    },
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "not a schema": {"type": "frobnicate"},
}


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench_llguidance(tokenizer_json: str, eos: int, token_ids: dict[str, list[int]]) -> dict:
    import llguidance
    import llguidance.numpy as llnp

    tokenizer, tok_s = _timed(lambda: llguidance.LLTokenizer(tokenizer_json, eos_token=eos))
    rows = {"tokenizer_s": tok_s}
    for name, schema in SCHEMAS.items():
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        matcher, compile_s = _timed(lambda g=grammar: llguidance.LLMatcher(tokenizer, g))
        assert not matcher.is_error(), matcher.get_error()
        _, second_s = _timed(lambda g=grammar: llguidance.LLMatcher(tokenizer, g))
        mask = llnp.allocate_token_bitmask(1, tokenizer.vocab_size)
        times = []
        for token in token_ids[name]:
            _, t = _timed(lambda m=matcher, b=mask: llnp.fill_next_token_bitmask(m, b))
            times.append(t)
            assert (mask[0, token // 32] >> (token % 32)) & 1, f"valid token {token} masked off"
            assert matcher.consume_token(token), matcher.get_error()
        assert matcher.is_accepting()
        rows[name] = (compile_s, second_s, statistics.mean(times), max(times))
    refusals = {}
    for name, schema in HARD_SCHEMAS.items():
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
            error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        except ValueError as e:
            error = str(e)
        refusals[name] = error or "accepted"
    rows["refusals"] = refusals
    return rows


def bench_xgrammar(tokenizer_dir: str, eos: int, vocab_size: int, token_ids: dict[str, list[int]]) -> dict:
    import transformers
    import xgrammar

    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    info, tok_s = _timed(lambda: xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size))
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    rows = {"tokenizer_s": tok_s}
    for name, schema in SCHEMAS.items():
        compiled, compile_s = _timed(lambda s=schema: compiler.compile_json_schema(json.dumps(s), any_whitespace=False))
        _, second_s = _timed(lambda c=compiled: xgrammar.GrammarMatcher(c))
        matcher = xgrammar.GrammarMatcher(compiled)
        mask = xgrammar.allocate_token_bitmask(1, info.vocab_size)
        times = []
        for token in token_ids[name]:
            _, t = _timed(lambda m=matcher, b=mask: m.fill_next_token_bitmask(b))
            times.append(t)
            assert (int(mask[0, token // 32]) >> (token % 32)) & 1, f"valid token {token} masked off"
            assert matcher.accept_token(token)
        rows[name] = (compile_s, second_s, statistics.mean(times), max(times))
    refusals = {}
    for name, schema in HARD_SCHEMAS.items():
        try:
            compiler.compile_json_schema(json.dumps(schema))
            refusals[name] = "accepted"
        except Exception as e:  # xgrammar raises RuntimeError / ValueError / its own errors
            refusals[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    rows["refusals"] = refusals
    return rows


def libraries(args) -> None:
    from tokenizers import Tokenizer

    path = os.path.join(args.tokenizer, "tokenizer.json")
    with open(path) as f:
        tokenizer_json = f.read()
    backend = Tokenizer.from_str(tokenizer_json)
    eos = backend.token_to_id("<|im_end|>")
    token_ids = {name: backend.encode(json.dumps(doc)).ids for name, doc in DOCUMENTS.items()}
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"# llguidance {version('llguidance')}, xgrammar {version('xgrammar')}")
    results = {
        "llguidance": bench_llguidance(tokenizer_json, eos, token_ids),
        "xgrammar": bench_xgrammar(args.tokenizer, eos, args.model_vocab, token_ids),
    }
    for library, rows in results.items():
        print(f"\n## {library}: tokenizer set-up {rows['tokenizer_s'] * 1e3:.0f} ms")
        print("| schema | compile ms | matcher from compiled ms | mask mean us | mask max us |")
        print("|---|---:|---:|---:|---:|")
        for name in SCHEMAS:
            compile_s, second_s, mean_s, max_s = rows[name]
            print(f"| {name} | {compile_s * 1e3:.1f} | {second_s * 1e3:.2f} | {mean_s * 1e6:.0f} | {max_s * 1e6:.0f} |")
        print("\n| schema | result |\n|---|---|")
        for name, message in rows["refusals"].items():
            lines = [line.strip() for line in message.splitlines() if line.strip()]
            reason = next((line for line in lines if line.startswith("error:")), lines[0])  # the regex error's cause
            print(f"| {name} | {reason[:200]} |")


# Decoding benchmark constraint: a long JSON string that cannot end within the run, so constrained and
# free requests generate the same number of tokens (and a string's mask allows most of the vocabulary:
# the costliest case for the host).
LONG_TEXT = {
    "type": "object",
    "properties": {"text": {"type": "string", "minLength": 5000}},
    "required": ["text"],
}


def decode(args) -> None:
    import jax

    from qwen_jax import Qwen2Config, create_model
    from qwen_jax.engine.core import Engine
    from qwen_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(args.tokenizer)
    model = create_model(Qwen2Config.preset("0.5B"), dtype="float32", param_dtype="float32", seed=0)
    print(f"# {jax.devices()[0].device_kind}, 0.5B float32 random weights, {args.new_tokens} new tokens per request")
    print("| rows | free tok/s | json_schema tok/s | constrained slower by |")
    print("|---:|---:|---:|---:|")
    for rows in args.rows:
        engine = Engine(model, tokenizer, slots=rows, max_len=args.max_len)
        prompts = [f"Reply with JSON, request {i}." for i in range(rows)]

        def run(constrained: bool, engine=engine, prompts=prompts) -> float:
            extra = {"json_schema": LONG_TEXT} if constrained else {}
            start = time.perf_counter()
            outputs = engine.generate(prompts, progress=False, max_new_tokens=args.new_tokens, temperature=0, **extra)
            elapsed = time.perf_counter() - start
            return sum(len(o.token_ids) for o in outputs) / elapsed

        run(False), run(True)  # compile and first runs
        free, constrained = [], []
        for _ in range(args.repeats):  # alternating, so a change in the machine's load hits both
            free.append(run(False))
            constrained.append(run(True))
        free_rate, constrained_rate = statistics.median(free), statistics.median(constrained)
        slower = (free_rate / constrained_rate - 1) * 100
        print(f"| {rows} | {free_rate:.1f} | {constrained_rate:.1f} | {slower:+.1f} % |")
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["libraries", "decode"])
    parser.add_argument("--tokenizer", default=os.environ.get("QWEN_JAX_TOKENIZER_DIR"))
    parser.add_argument("--model-vocab", type=int, default=151936, help="the model's (padded) vocabulary")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not args.tokenizer:
        parser.error("--tokenizer (or QWEN_JAX_TOKENIZER_DIR) is required")
    {"libraries": libraries, "decode": decode}[args.what](args)


if __name__ == "__main__":
    main()
