"""Token ids -> the strings and bytes OpenAI's logprobs objects carry."""

from __future__ import annotations

import functools
from typing import Any

from qwen_jax.engine.requests import TokenLogprob


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character byte-level BPE uses for each byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


class TokenStrings:
    """Raw bytes and display text of single tokens (cached), and OpenAI logprobs entries."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._byte_level = type(tokenizer.backend.decoder).__name__ == "ByteLevel"
        self.token_bytes = functools.lru_cache(maxsize=65536)(self._token_bytes)

    def _token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes a token contributes (a piece of a multi-byte character for some tokens)."""
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        decoder = _byte_decoder()
        if self._byte_level and all(ch in decoder for ch in piece):
            return bytes(decoder[ch] for ch in piece)
        if self._byte_level:  # added tokens (e.g. <|im_end|>) are stored as plain text
            return piece.encode("utf-8")
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def longest_token_bytes(self) -> int:
        """The most UTF-8 bytes any one token of the vocabulary stands for."""
        return max((len(self._token_bytes(i)) for i in range(self.tokenizer.vocab_size)), default=1)

    def token_text(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def chat_logprob(self, entry: TokenLogprob) -> dict[str, Any]:
        """An entry of `choices[].logprobs.content` (chat completions)."""
        return {
            **self._one(entry.token_id, entry.logprob),
            "top_logprobs": [self._one(token_id, logprob) for token_id, logprob in entry.top],
        }

    def _one(self, token_id: int, logprob: float) -> dict[str, Any]:
        raw = self.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    def completion_logprobs(self, entries: list[TokenLogprob], text_offset: int) -> dict[str, Any]:
        """`choices[].logprobs` of the legacy completions endpoint."""
        tokens, offsets = [], []
        for entry in entries:
            tokens.append(self.token_text(entry.token_id))
            offsets.append(text_offset)
            text_offset += len(tokens[-1])
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self.token_text(t): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }
