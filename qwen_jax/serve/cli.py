"""Serve a model over an OpenAI-compatible HTTP API (chat/completions, completions, models, health, metrics).

Requests share `--slots` decode rows through continuous batching. With --warmup (the default)
every program is compiled before the server listens, so nothing compiles while serving; the line
`qwen-jax serve: listening on http://HOST:PORT` on stderr says it is ready. SIGTERM (or Ctrl-C)
stops accepting connections, lets running requests finish for up to --shutdown-timeout seconds,
aborts the rest and exits with status 0.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from qwen_jax.cli.arguments import add_model_arguments, add_speculative_arguments, load_for_cli, speculative_for_cli
from qwen_jax.engine.core import DEFAULT_MIN_ACCEPTANCE, DEFAULT_SPECULATIVE_MAX_ROWS, Engine
from qwen_jax.engine.programs import default_compile_workers
from qwen_jax.errors import UsageError
from qwen_jax.extras import require_extra
from qwen_jax.serve.limits import (
    DEFAULT_KEEP_ALIVE_TIMEOUT,
    DEFAULT_LIMIT_CONCURRENCY,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_READ_TIMEOUT,
)

DEFAULT_MAX_QUEUE = 256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--slots", type=int, default=8, help="requests decoded together (default 8)")
    parser.add_argument(
        "--max-len", type=int, help="tokens per request, prompt + completion (default: min(model context, 4096))"
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help=f"requests that may wait for a slot; beyond it the server answers 503 (default {DEFAULT_MAX_QUEUE})",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help="prompt tokens prefilled per step (the token budget shared by the prompts going in), fused with "
        "the decode step of running requests (default 256 on CPU, 512 on GPU/TPU; 0: prefill each prompt whole, "
        "pausing decoding, and no prefix cache)",
    )
    parser.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="do not keep the KV of prompts and finished requests for reuse (prefix caching is on by default)",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--prefix-cache-gb", type=float, help="GiB of keys/values the prefix cache holds")
    size.add_argument(
        "--prefix-cache-blocks",
        type=int,
        help="blocks of 16 tokens the prefix cache holds (default: as many tokens as the slots, slots x max-len)",
    )
    add_speculative_arguments(parser)
    parser.add_argument(
        "--speculative-max-rows",
        type=int,
        default=DEFAULT_SPECULATIVE_MAX_ROWS,
        help="speculate only while at most this many requests decode: at higher load the batch keeps the "
        f"device busy and speculation slows serving down (default {DEFAULT_SPECULATIVE_MAX_ROWS})",
    )
    parser.add_argument(
        "--speculative-min-acceptance",
        type=float,
        default=DEFAULT_MIN_ACCEPTANCE,
        help="a request stops proposing for a while when the moving average of its accepted fraction falls "
        f"below this (default {DEFAULT_MIN_ACCEPTANCE:g}; 0: never)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("QWEN_JAX_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $QWEN_JAX_API_KEY, else none)",
    )
    parser.add_argument("--served-model-name", help="model id clients send and /v1/models lists (default: --model)")
    parser.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compile every program before listening (default: on)",
    )
    parser.add_argument(
        "--prime",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="after compiling, run every program once on scratch arrays before listening, so the "
        "first requests run at full speed (on CPU a program's first run is slower than later ones; "
        "it costs start-up time: benchmarks/serve.py measures both). Default: off",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds running requests may take to finish after SIGTERM (default 30)",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help=f"larger request bodies are refused with 413 before they are read (default {DEFAULT_MAX_REQUEST_BYTES})",
    )
    parser.add_argument(
        "--limit-concurrency",
        type=int,
        default=DEFAULT_LIMIT_CONCURRENCY,
        help="open connections plus running HTTP requests beyond which new requests get 503 "
        f"(default {DEFAULT_LIMIT_CONCURRENCY})",
    )
    parser.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=DEFAULT_KEEP_ALIVE_TIMEOUT,
        help=f"seconds an idle keep-alive connection stays open (default {DEFAULT_KEEP_ALIVE_TIMEOUT:g})",
    )
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=DEFAULT_READ_TIMEOUT,
        help="seconds a connection may take to send a whole request, headers and body, before it is closed "
        f"(default {DEFAULT_READ_TIMEOUT:g})",
    )
    parser.add_argument(
        "--allow-special-tokens-in-content",
        action="store_true",
        help="encode special-token text (e.g. '<|im_start|>') in chat messages and tool definitions as those "
        "tokens, as HF's apply_chat_template does; by default it is plain text, so a client cannot open a turn",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level (default warning)",
    )


def run(args: argparse.Namespace) -> int:
    require_extra("serve", feature="the HTTP server")
    # The server's modules import the serve extra's packages: loaded once they are known to be there.
    from qwen_jax.serve.app import create_app
    from qwen_jax.serve.server import run_server

    for name in ("slots", "max_queue"):
        value = getattr(args, name)
        if value < (1 if name == "slots" else 0):
            raise UsageError(f"--{name.replace('_', '-')} must be {'>= 1' if name == 'slots' else '>= 0'}, got {value}")
    if args.shutdown_timeout < 0:
        raise UsageError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    for name in ("max_request_bytes", "limit_concurrency", "keep_alive_timeout", "read_timeout"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.prime and not args.warmup:
        raise UsageError("--prime runs the compiled programs once: it needs --warmup")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    if (args.speculative == "draft") != (args.draft_model is not None):  # before loading anything
        if args.draft_model is None:
            raise UsageError("--speculative draft needs --draft-model PATH|HUB_ID")
        raise UsageError("--draft-model needs --speculative draft")
    listener = _listen(args.host, args.port)  # before loading: a busy port fails in a second, not a minute

    model, tokenizer = load_for_cli(args)
    engine = Engine(
        model,
        tokenizer,
        slots=args.slots,
        max_len=args.max_len,
        max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk,
        prefix_cache=args.prefix_cache,
        prefix_cache_blocks=args.prefix_cache_blocks,
        prefix_cache_gb=args.prefix_cache_gb,
        speculative=speculative_for_cli(args, model),
        speculative_max_rows=args.speculative_max_rows,
        speculative_min_acceptance=args.speculative_min_acceptance,
    )
    if args.warmup:
        print(
            f"qwen-jax serve: compiling {len(engine.programs.buckets)} prefill buckets, "
            f"{len(engine.programs.widths)} decode widths, {len(engine.programs.chunk_shapes)} mixed-step chunk "
            f"shapes{'' if args.speculative is None else ', speculative steps'}"
            f"{' (with the draft model)' if args.speculative == 'draft' else ''} and samplers on "
            f"{default_compile_workers()} threads...",
            file=sys.stderr,
            flush=True,
        )
        seconds = engine.warmup()
        print(f"qwen-jax serve: compiled in {seconds:.1f} s", file=sys.stderr, flush=True)
        if args.prime:
            print("qwen-jax serve: running each program once (--prime)...", file=sys.stderr, flush=True)
            print(f"qwen-jax serve: primed in {engine.programs.prime():.1f} s", file=sys.stderr, flush=True)

    app = create_app(
        engine,
        model_name=args.served_model_name or args.model,
        api_key=args.api_key,
        max_request_bytes=args.max_request_bytes,
        allow_special_tokens_in_content=args.allow_special_tokens_in_content,
    )
    host, port = listener.getsockname()[:2]
    print(
        f"qwen-jax serve: listening on http://{_url_host(host)}:{port} (model {args.served_model_name or args.model},"
        f" {args.slots} slots, max length {engine.max_len})",
        file=sys.stderr,
        flush=True,
    )
    run_server(
        app,
        listener,
        engine,
        shutdown_timeout=args.shutdown_timeout,
        log_level=args.log_level,
        limit_concurrency=args.limit_concurrency,
        keep_alive_timeout=args.keep_alive_timeout,
        read_timeout=args.read_timeout,
    )
    print("qwen-jax serve: stopped", file=sys.stderr, flush=True)
    return 0


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as e:
        listener.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    listener.listen(2048)
    listener.set_inheritable(True)
    return listener


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
