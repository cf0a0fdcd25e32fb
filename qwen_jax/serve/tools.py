"""Tool calls in generated text: forced prefixes for `tool_choice`, and a streaming parser.

Qwen2.5 writes a call as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
(see its chat template). Non-streaming responses use `qwen_jax.parse_tool_calls` on the whole
text; `ToolCallStream` does the same incrementally, so content streams as it is generated and
each call is sent as soon as its block closes.
"""

from __future__ import annotations

import json
from typing import Any

from qwen_jax.tokenizer import parse_tool_calls

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"


def forced_prefix(tool_choice) -> str:
    """Text appended after the assistant header to make the model call a tool.

    "required": open a tool-call block; a named function: also write its name, so the model only
    writes the arguments. Nothing for "auto"/"none".
    """
    if tool_choice == "required":
        return OPEN_TAG + "\n"
    if tool_choice is not None and not isinstance(tool_choice, str):
        return OPEN_TAG + '\n{"name": ' + json.dumps(tool_choice.function.name) + ', "arguments": '
    return ""


class ToolCallStream:
    """Incremental split of generated text into content pieces and parsed tool calls.

    `feed(text)` returns events `("content", str)` or `("tool_call", {"name", "arguments"})`.
    Text that could be the start of `<tool_call>` is held back until it is known not to be; a
    block whose body does not parse, or that is still open at `finish()`, is returned as content,
    so nothing the model wrote is lost (as `parse_tool_calls`). Whitespace between calls is dropped.
    """

    def __init__(self):
        self._buffer = ""
        self._in_call = False
        self.calls = 0

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self._buffer += text
        events: list[tuple[str, Any]] = []
        while True:
            if self._in_call:
                end = self._buffer.find(CLOSE_TAG)
                if end < 0:
                    return events
                block = OPEN_TAG + self._buffer[:end] + CLOSE_TAG
                self._buffer = self._buffer[end + len(CLOSE_TAG) :]
                self._in_call = False
                _, calls = parse_tool_calls(block)
                if calls:
                    self.calls += 1
                    events.append(("tool_call", calls[0]))
                else:
                    events.append(("content", block))
                continue
            start = self._buffer.find(OPEN_TAG)
            if start >= 0:
                self._emit_content(events, self._buffer[:start])
                self._buffer = self._buffer[start + len(OPEN_TAG) :]
                self._in_call = True
                continue
            safe = len(self._buffer) - _partial_tag_length(self._buffer)
            self._emit_content(events, self._buffer[:safe])
            self._buffer = self._buffer[safe:]
            return events

    def finish(self) -> list[tuple[str, Any]]:
        rest = (OPEN_TAG if self._in_call else "") + self._buffer
        self._buffer, self._in_call = "", False
        events: list[tuple[str, Any]] = []
        self._emit_content(events, rest)
        return events

    def _emit_content(self, events, text: str) -> None:
        if text and not (self.calls and not text.strip()):
            events.append(("content", text))


def _partial_tag_length(text: str) -> int:
    for n in range(min(len(OPEN_TAG) - 1, len(text)), 0, -1):
        if text.endswith(OPEN_TAG[:n]):
            return n
    return 0
