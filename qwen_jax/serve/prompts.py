"""Client text -> prompt token ids, with the checks a trust boundary needs.

The server renders chat requests with the checkpoint's template and encodes the result, as HF's
`apply_chat_template` does, with two differences for text that comes from clients:

- Special-token text inside client strings (message content and names, tool definitions, the
  forced tool name) is encoded as plain text by default, so a user message holding
  `<|im_end|>\\n<|im_start|>system` cannot open a turn of its own. The template's own special tokens
  keep their ids. `allow_special_tokens_in_content=True` restores HF's behaviour (the text of a
  special token becomes that token wherever it appears), as `qwen_jax.generate` does.
- A prompt whose UTF-8 size already proves it longer than the context (every token covers at most
  `max_token_bytes` bytes) is refused before it is tokenized.

Both run on a worker thread (the caller's choice): tokenizing a long text takes long enough to
stall the event loop.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from qwen_jax.serve.protocol import RequestError
from qwen_jax.tokenizer import Tokenizer


class PromptEncoder:
    """Encodes server prompts for `tokenizer` (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, max_token_bytes: int, *, allow_special_tokens_in_content: bool = False):
        """max_token_bytes: the most UTF-8 bytes one token of the vocabulary stands for
        (`qwen_jax.serve.tokens.TokenStrings.longest_token_bytes`), which bounds a text's token count
        from below. allow_special_tokens_in_content: HF's encoding of client text (see the module)."""
        self.tokenizer = tokenizer
        self.max_token_bytes = max(1, max_token_bytes)
        self.allow_special_tokens_in_content = allow_special_tokens_in_content
        specials = sorted(
            {added.content for added in tokenizer.backend.get_added_tokens_decoder().values() if added.special},
            key=len,
            reverse=True,
        )
        self._special_ids = {token: tokenizer.token_to_id(token) for token in specials}
        self._specials = re.compile("|".join(map(re.escape, specials))) if specials else None

    def check_length(self, text: str, context: int, param: str) -> None:
        """Refuse `text` if it is certainly `context` tokens or longer, without tokenizing it."""
        at_least = math.ceil(len(text.encode("utf-8", errors="surrogatepass")) / self.max_token_bytes)
        if at_least >= context:
            raise RequestError(
                f"This model's maximum context length is {context} tokens. However, your {param} "
                f"resulted in at least {at_least} tokens. Please reduce the length of the {param}.",
                param=param,
                code="context_length_exceeded",
            )

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None,
        suffix: str,
        context: int,
    ) -> list[int]:
        """Token ids of the rendered conversation followed by `suffix` (a forced tool-call prefix)."""
        if (
            self.allow_special_tokens_in_content
            or self._specials is None
            or not self._holds_special([messages, tools, suffix])
        ):
            text = self._render(messages, tools) + suffix
            self.check_length(text, context, "messages")
            return self.tokenizer.encode(text)
        # Render with each client occurrence of a special token replaced by a marker that no text
        # holds; the special tokens left in the rendered text are the template's. Encode the text
        # between them with the markers turned back into plain text.
        nonce = secrets.token_hex(8)
        marker = {token: f"\ue000{nonce}:{i}\ue001" for i, token in enumerate(self._special_ids)}
        unmark = re.compile(f"\ue000{nonce}:(\\d+)\ue001")
        tokens = list(self._special_ids)

        def unhide(text: str) -> str:
            return unmark.sub(lambda m: tokens[int(m.group(1))], text)

        def hide(value):
            if isinstance(value, str):
                return self._specials.sub(lambda m: marker[m.group(0)], value)
            if isinstance(value, Mapping):
                return {hide(k): hide(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [hide(v) for v in value]
            return value

        text = self._render(hide(list(messages)), None if tools is None else hide(list(tools))) + hide(suffix)
        self.check_length(unhide(text), context, "messages")
        ids: list[int] = []
        position = 0
        for match in self._specials.finditer(text):
            ids += self._plain(unhide(text[position : match.start()]))
            ids.append(self._special_ids[match.group(0)])
            position = match.end()
        ids += self._plain(unhide(text[position:]))
        return ids

    def completion(self, prompt: str, context: int) -> list[int]:
        """Token ids of a raw completions prompt: the client writes the whole prompt, special tokens included."""
        self.check_length(prompt, context, "prompt")
        return self.tokenizer.encode(prompt)

    def _render(self, messages, tools) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
        except Exception as e:  # jinja errors raised by the checkpoint's template
            raise RequestError(f"cannot apply the chat template to these messages: {e}", param="messages") from None

    def _plain(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, split_special_tokens=True) if text else []

    def _holds_special(self, value) -> bool:
        if isinstance(value, str):
            return self._specials.search(value) is not None
        if isinstance(value, Mapping):
            return any(self._holds_special(k) or self._holds_special(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return any(self._holds_special(v) for v in value)
        return False
