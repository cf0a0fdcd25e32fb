"""OpenAI request schemas (pydantic) and the checks the schemas cannot express.

Top-level request fields are strict: an unknown field is a 400 naming it (as OpenAI does), so a
typo such as `max_token` is not silently ignored. Fields OpenAI defines that do not change the
output (`user`, `metadata`, `store`, `service_tier`, ...) are accepted; fields that would change
it and that qwen-jax does not implement (`suffix`, ...) are a 400 when set to a non-neutral
value. Structured output: `response_format` (OpenAI's `json_object` and `json_schema`) and vLLM's
extension `structured_outputs` (`json`, `regex`, `choice`, `grammar`), on both endpoints
(`constraint`). Messages are lenient (extra keys ignored), because clients
send assistant messages back exactly as they received them (`refusal`, `annotations`, ...).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict

from qwen_jax.serve.limits import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS

MAX_N = 16

# Numbers and flags are strict: "5" or true where an integer is expected is a 400, not a 5 or a 1
# (an int is still a valid float).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]


class RequestError(Exception):
    """A request the server rejects: rendered in OpenAI's error envelope."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def envelope(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ----------------------------------------------------------------------------- messages and tools
class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class FunctionCall(_Lenient):
    name: str
    arguments: str | dict[str, Any]  # OpenAI sends a JSON string; a dict is accepted too


class ToolCall(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(_Lenient):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Lenient):
    include_usage: bool = False


class JsonSchemaFormat(_Lenient):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's extension: exactly one of these constrains the output."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


# ----------------------------------------------------------------------------- requests
class _SamplingFields(_Strict):
    """Fields shared by both endpoints (OpenAI's, plus the common top_k / min_p / repetition_penalty)."""

    model: str
    max_tokens: Int | None = Field(default=None, ge=1)
    temperature: Float | None = Field(default=None, ge=0, le=2)
    top_p: Float | None = Field(default=None, gt=0, le=1)
    top_k: Int | None = Field(default=None, ge=-1)  # 0 and -1 switch it off
    min_p: Float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: Float | None = Field(default=None, gt=0)
    stop: str | list[str] | None = None
    seed: Int | None = Field(default=None, ge=-(2**63), lt=2**64)
    n: Int = Field(default=1, ge=1, le=MAX_N)
    stream: Bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: Float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: Float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, Float] | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    def constraint(self) -> tuple[dict[str, Any], str | None]:
        """(the engine's structured-output keyword argument, e.g. {"json_schema": {...}}, or {};
        the request field it comes from, for error messages)."""
        given = []
        response_format = self.response_format
        if response_format is not None and response_format.type == "json_object":
            given.append(({"json_schema": {"type": "object"}}, "response_format"))
        elif response_format is not None and response_format.type == "json_schema":
            schema = None if response_format.json_schema is None else response_format.json_schema.schema_
            if schema is None:
                raise RequestError(
                    "response_format json_schema needs json_schema.schema", param="response_format.json_schema"
                )
            given.append(({"json_schema": schema}, "response_format"))
        outputs = self.structured_outputs
        if outputs is not None:
            fields = {"json_schema": outputs.json_, "regex": outputs.regex, "choice": outputs.choice}
            fields["grammar"] = outputs.grammar
            fields = {name: value for name, value in fields.items() if value is not None}
            if len(fields) != 1:
                raise RequestError(
                    "structured_outputs takes exactly one of json, regex, choice and grammar",
                    param="structured_outputs",
                )
            given.append((fields, "structured_outputs"))
        if len(given) > 1:
            raise RequestError("give response_format or structured_outputs, not both", param="structured_outputs")
        return given[0] if given else ({}, None)

    def check_unsupported(self) -> None:
        self.logit_bias_ids()
        self.constraint()
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(not s for s in stops):
            raise RequestError("stop strings must not be empty", param="stop")
        if len(stops) > MAX_STOP_STRINGS:
            raise RequestError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", param="stop")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in stops):
            raise RequestError(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters long", param="stop")
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed when stream is true", param="stream_options")

    def logit_bias_ids(self) -> dict[int, float] | None:
        """`logit_bias` with integer token ids (OpenAI sends them as JSON object keys, i.e. strings)."""
        if not self.logit_bias:
            return None
        bias = {}
        for key, value in self.logit_bias.items():
            try:
                token_id = int(key)
            except ValueError:
                raise RequestError(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
            if not -100 <= value <= 100:
                raise RequestError(
                    f"logit_bias value for token {token_id} must be between -100 and 100, got {value}",
                    param="logit_bias",
                )
            bias[token_id] = value
        return bias

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def top_k_value(self) -> int | None:
        return None if self.top_k is None else max(self.top_k, 0)


class ChatCompletionRequest(_SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    logprobs: Bool = False
    top_logprobs: Int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise RequestError(
                "max_tokens and max_completion_tokens are aliases; give one, or equal values",
                param="max_completion_tokens",
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise RequestError("tool_choice needs tools", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools]
            if self.tool_choice.function.name not in names:
                raise RequestError(
                    f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools {names}",
                    param="tool_choice",
                )
        for i, message in enumerate(self.messages):
            if isinstance(message.content, list) and not message.content:
                raise RequestError("message content must not be an empty list", param=f"messages.{i}.content")

    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages in the form the chat template expects (text content, tool-call arguments as dicts)."""
        out = []
        for i, message in enumerate(self.messages):
            content = message.content
            if isinstance(content, list):
                content = "".join(part.text for part in content)
            entry: dict[str, Any] = {
                "role": "system" if message.role == "developer" else message.role,
                "content": content if content is not None else "",
            }
            if message.role == "assistant" and message.tool_calls:
                entry["content"] = content
                entry["tool_calls"] = [self._template_call(call, i, j) for j, call in enumerate(message.tool_calls)]
            if message.name is not None:
                entry["name"] = message.name
            if message.tool_call_id is not None:
                entry["tool_call_id"] = message.tool_call_id
            out.append(entry)
        return out

    @staticmethod
    def _template_call(call: ToolCall, message_index: int, call_index: int) -> dict[str, Any]:
        arguments = call.function.arguments
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise RequestError(
                    "tool call arguments must be a JSON object",
                    param=f"messages.{message_index}.tool_calls.{call_index}.function.arguments",
                ) from None
        return {"type": "function", "id": call.id, "function": {"name": call.function.name, "arguments": arguments}}


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[Int] | list[list[Int]]
    logprobs: Int | None = Field(default=None, ge=0, le=20)
    echo: Bool = False
    suffix: str | None = None
    best_of: Int | None = Field(default=None, ge=1)

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.suffix:
            raise RequestError("suffix is not supported by qwen-jax", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError("best_of other than n is not supported by qwen-jax", param="best_of")
        if self.echo and self.logprobs is not None:
            raise RequestError("echo with logprobs is not supported by qwen-jax (no prompt logprobs)", param="echo")
        if isinstance(self.prompt, list) and not self.prompt:
            raise RequestError("prompt must not be empty", param="prompt")

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: strings or token-id lists."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        return list(prompt)


def validation_error(errors: list[dict[str, Any]]) -> RequestError:
    """The first invalid parameter as a one-line RequestError naming it.

    A value that matches no member of a union (e.g. `prompt`) yields one pydantic error per
    member; their common location is the parameter.
    """
    if not errors:
        return RequestError("invalid request")
    error = errors[0]
    location = [part for part in error.get("loc", ()) if part != "body"]
    if location:
        related = [[p for p in e.get("loc", ()) if p != "body"] for e in errors]
        related = [loc for loc in related if loc[:1] == location[:1]]
        common = []
        for parts in zip(*related):
            if len(set(parts)) > 1:
                break
            common.append(parts[0])
        location = common if len(related) > 1 else location
    param = ".".join(str(part) for part in location) or None
    kind = error.get("type", "")
    if kind == "json_invalid":
        return RequestError(
            f"the request body is not valid JSON: {error.get('ctx', {}).get('error', error.get('msg'))}",
            code="invalid_json",
        )
    if kind == "extra_forbidden":
        return RequestError(f"unrecognized request argument supplied: {param}", param=param)
    if kind == "missing":
        if not location:
            return RequestError("the request body is empty: send a JSON object", code="empty_body")
        return RequestError(f"missing required parameter: {param}", param=param)
    if not location:
        return RequestError(f"the request body must be a JSON object ({error.get('msg', 'invalid')})")
    return RequestError(f"invalid value for {param}: {error.get('msg', 'invalid')}", param=param)


def check_text(body: BaseModel) -> None:
    """A 400 naming the first field whose text is not valid Unicode (a lone surrogate such as
    `"\\ud800"`, which JSON can carry but UTF-8 cannot encode, so the tokenizer could not take it)."""
    field = _invalid_text_field(body.model_dump(exclude_none=True), [])
    if field is not None:
        raise RequestError(f"{field} is not valid Unicode text (it holds a lone surrogate)", param=field)


def _invalid_text_field(value: Any, path: list[str]) -> str | None:
    if isinstance(value, str):
        return None if _is_valid_unicode(value) else ".".join(path) or "body"
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and not _is_valid_unicode(key):
                return ".".join(path) or "body"
            found = _invalid_text_field(item, [*path, str(key)])
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _invalid_text_field(item, [*path, str(i)])
            if found is not None:
                return found
    return None


def _is_valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
