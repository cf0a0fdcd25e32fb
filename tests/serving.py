"""Helpers for the engine and server tests: a byte-level test tokenizer, checkpoints, a live HTTP server."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

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

    def __init__(self, engine, model_name: str = "test-model", api_key: str | None = None):
        import uvicorn

        from qwen_jax.serve import create_app

        self.engine = engine
        self.app = create_app(engine, model_name=model_name, api_key=api_key)
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> "LiveServer":
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
