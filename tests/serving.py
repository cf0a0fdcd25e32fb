"""Helpers for the engine and server tests: a byte-level test tokenizer, checkpoints, a live HTTP server."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import pytest
from conftest import build_hf_model, save_hf_checkpoint

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BYTE_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 256, 257, 258


def write_byte_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer (one token per byte, no merges) + ChatML, in HF layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from qwen_jax.serve.tokens import _byte_decoder

    tokenizer = Tokenizer(models.BPE(vocab=dict(_byte_decoder()), merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(BYTE_SPECIAL_TOKENS)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def byte_checkpoint(directory: Path, seed: int = 0, **overrides) -> str:
    """A tiny random checkpoint whose vocabulary is the byte tokenizer's (259 tokens, no eos in config)."""
    model = build_hf_model(seed=seed, vocab_size=259, eos_token_id=None, bos_token_id=None, **overrides)
    path = save_hf_checkpoint(model, directory)
    write_byte_tokenizer(Path(path))
    return path


def real_tokenizer_dir() -> str | None:
    directory = os.environ.get("QWEN_JAX_TOKENIZER_DIR")
    return directory if directory and os.path.isfile(os.path.join(directory, "tokenizer.json")) else None


class LiveServer:
    """`create_app(engine)` served by uvicorn on 127.0.0.1 (ephemeral port) in a background thread."""

    def __init__(
        self, engine, model_name: str = "test-model", api_key: str | None = None, app_options=None, **server_options
    ):
        """app_options: more keywords of `create_app`; server_options: keywords of `server_config`."""
        import uvicorn

        from qwen_jax.serve.app import create_app
        from qwen_jax.serve.server import server_config

        self.engine = engine
        self.app = create_app(engine, model_name=model_name, api_key=api_key, **(app_options or {}))
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(server_config(self.app, **server_options))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self, **kwargs):
        from openai import OpenAI

        kwargs.setdefault("api_key", "unused")
        return OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=120, **kwargs)


@contextlib.contextmanager
def raw_connection(port: int):
    connection = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        yield connection
    finally:
        connection.close()


def wait_until(condition, timeout: float = 30.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


ENGINE_SLOTS = 8
ENGINE_MAX_LEN = 64
ENGINE_CHUNK = 16  # prompt tokens per mixed step: most test prompts go in over several steps


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """(model, tokenizer): a tiny random checkpoint with the byte tokenizer.

    A large init scale gives varied greedy text (small random models tend to repeat one token).
    """
    import qwen_jax

    path = byte_checkpoint(
        tmp_path_factory.mktemp("tiny_serving") / "ckpt", tie_word_embeddings=False, initializer_range=0.3
    )
    return qwen_jax.load(path)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model):
    """An Engine (8 slots, 64 tokens, 16-token prefill chunks) over `tiny_model`, compiled once for the session."""
    from qwen_jax.engine.core import Engine

    model, tokenizer = tiny_model
    engine = Engine(
        model, tokenizer, slots=ENGINE_SLOTS, max_len=ENGINE_MAX_LEN, prefill_chunk=ENGINE_CHUNK, warmup=True
    )
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def tiny_engine_uncached(tiny_model, tiny_engine):
    """`tiny_engine` without a prefix cache (it shares `tiny_engine`'s compiled programs)."""
    from qwen_jax.engine.core import Engine

    model, tokenizer = tiny_model
    engine = Engine(
        model, tokenizer, slots=ENGINE_SLOTS, max_len=ENGINE_MAX_LEN, prefill_chunk=ENGINE_CHUNK, prefix_cache=False
    )
    yield engine
    engine.shutdown()


def bigram_checkpoint(directory: Path, tokenizer_dir: str, answer: str) -> str:
    """A tiny checkpoint on the real Qwen2.5 vocabulary whose greedy answer to any chat prompt is `answer`.

    Attention and MLP outputs are zeroed, so the logits depend only on the current token, and the
    untied head maps each token of `answer` (whose ids must all differ) to the next one, starting
    from the "\\n" that ends the assistant header.
    """
    import shutil

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    chain = [tokenizer.encode("\n")[0], *tokenizer.encode(answer)]
    if len(set(chain)) != len(chain):
        raise ValueError("the answer's tokens (and the header's newline) must all differ")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=151645,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_()
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = model.lm_head.weight
        head.normal_(std=0.01)
        embed = model.model.embed_tokens.weight
        for current, following in zip(chain, chain[1:]):
            head[following] += 5 * embed[current] / embed[current].norm()
    path = save_hf_checkpoint(model, directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if os.path.isfile(os.path.join(tokenizer_dir, name)):
            shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(path, name))
    return path


class HttpResult:
    def __init__(self, status: int, body: bytes):
        self.status_code = status
        self.text = body.decode("utf-8", errors="replace")

    def json(self):
        return json.loads(self.text)


def http(
    method: str, url: str, body: bytes | str | dict | None = None, headers: dict | None = None, timeout: float = 60
) -> HttpResult:
    """One plain HTTP request (stdlib only); error statuses are returned, not raised."""
    import urllib.error
    import urllib.request

    if isinstance(body, dict) or isinstance(body, list):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    request = urllib.request.Request(
        url, data=body, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return HttpResult(response.status, response.read())
    except urllib.error.HTTPError as e:
        return HttpResult(e.code, e.read())


STRUCTURED_MAX_LEN = 512


@pytest.fixture(scope="session")
def structured_model():
    """(model, tokenizer): a tiny random model (float32) over the real Qwen2.5 vocabulary with the real
    tokenizer, for structured output (random weights: unconstrained text is never valid JSON)."""
    shared = Path(__file__).resolve().parents[2] / "shared" / "reference" / "qwen2.5-tokenizer"
    directory = real_tokenizer_dir() or (str(shared) if (shared / "tokenizer.json").is_file() else None)
    if directory is None:
        pytest.skip("QWEN_JAX_TOKENIZER_DIR is not set and ../shared/reference/qwen2.5-tokenizer does not exist")
    pytest.importorskip("llguidance")
    from qwen_jax import Qwen2Config, create_model
    from qwen_jax.tokenizer import Tokenizer

    config = Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=STRUCTURED_MAX_LEN,
    )
    return create_model(config, dtype="float32", param_dtype="float32", seed=0), Tokenizer.from_dir(directory)


@pytest.fixture(scope="session")
def structured_engine(structured_model):
    """An Engine (4 slots, 16-token prefill chunks) over `structured_model`, shared by the engine and server tests."""
    from qwen_jax.engine.core import Engine

    model, tokenizer = structured_model
    engine = Engine(model, tokenizer, slots=4, max_len=STRUCTURED_MAX_LEN, prefill_chunk=16)
    yield engine
    engine.shutdown()


@contextlib.contextmanager
def count_compiles() -> Iterator[list[float]]:
    """The XLA compilations while the block runs, as a list of their durations (empty: none)."""
    compiles: list[float] = []

    def listener(name, duration, **_):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
