"""The OpenAI-compatible HTTP API (FastAPI) over an `Engine`.

Endpoints: POST /v1/chat/completions, POST /v1/completions (JSON or server-sent events),
GET /v1/models, GET /health, GET /metrics. The engine runs on its own thread; each request gets
an `asyncio.Queue` that the engine thread feeds with `loop.call_soon_threadsafe`, so the event
loop never blocks on the model. A client that disconnects aborts its requests (their slots are
freed at once). Errors use OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen_jax.engine.core import Engine
from qwen_jax.engine.requests import Delta
from qwen_jax.errors import EngineClosedError, EngineError, GenerationError, MissingExtraError, QueueFullError
from qwen_jax.generation.constraints import KINDS, available, tool_call_grammar
from qwen_jax.serve.limits import DEFAULT_MAX_REQUEST_BYTES, RequestBodyLimit
from qwen_jax.serve.metrics import RequestTimer, ServerMetrics
from qwen_jax.serve.prompts import PromptEncoder
from qwen_jax.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    check_text,
    validation_error,
)
from qwen_jax.serve.tokens import TokenStrings
from qwen_jax.serve.tools import CLOSE_TAG, OPEN_TAG, ToolCallStream, forced_prefix
from qwen_jax.tokenizer import parse_tool_calls

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy completions endpoint


def create_app(
    engine: Engine,
    *,
    model_name: str,
    api_key: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    allow_special_tokens_in_content: bool = False,
) -> FastAPI:
    """The FastAPI application serving `engine` under the model id `model_name`.

    api_key: when set, every /v1 request must send `Authorization: Bearer <api_key>`.
    max_request_bytes: larger request bodies are refused (413) before they are parsed.
    allow_special_tokens_in_content: encode special-token text in chat messages and tool
        definitions as those tokens, as HF's `apply_chat_template` does (by default it is plain
        text: a client cannot open a turn of its own; `qwen_jax.serve.prompts`).
    """
    app = FastAPI(title="qwen-jax", docs_url=None, redoc_url=None, openapi_url=None)
    server = _Server(engine, model_name, allow_special_tokens_in_content)
    app.state.server = server
    app.add_middleware(RequestBodyLimit, max_bytes=max_request_bytes)  # inside the API-key check: counted
    app.add_middleware(_HttpMiddleware, metrics=server.metrics, api_key=api_key)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return _error_response(validation_error(list(exc.errors())))

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(RequestError(str(exc.detail), status=exc.status_code, type=kind))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        return _error_response(
            RequestError(f"internal error: {type(exc).__name__}: {exc}", status=500, type="server_error")
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await server.chat(body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await server.complete(body, request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/health")
    async def health():
        stats = engine.stats()
        if not stats.healthy:
            return JSONResponse({"status": "error"}, status_code=503)
        if not stats.accepting:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok", "slots": stats.slots, "running": stats.running, "waiting": stats.waiting}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _error_response(error: RequestError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status == 503 else None
    return JSONResponse(error.envelope(), status_code=error.status, headers=headers)


class _HttpMiddleware:
    """Pure ASGI middleware (streaming-safe): API-key check on /v1 and per-status request counts."""

    def __init__(self, app, metrics: ServerMetrics, api_key: str | None):
        self.app, self.metrics, self.api_key = app, metrics, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        counted = path if path in _KNOWN_PATHS else "other"
        if self.api_key is not None and path.startswith("/v1") and not self._authorized(scope):
            self.metrics.http_requests.labels(path=counted, status="401").inc()
            error = RequestError(
                "invalid or missing API key (send 'Authorization: Bearer <key>')", status=401, code="invalid_api_key"
            )
            return await _error_response(error)(scope, receive, send)
        status = []

        async def send_counting(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            self.metrics.http_requests.labels(path=counted, status=str(status[0] if status else 499)).inc()

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())
        return False


_KNOWN_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}


class _Choice:
    """One generation (choice) of a request: its engine handle, timer and streaming state."""

    def __init__(self, index: int, handle, timer: RequestTimer, tool_stream: ToolCallStream | None, prefix: str):
        self.index = index
        self.handle = handle
        self.timer = timer
        self.tool_stream = tool_stream
        self.prefix = prefix  # forced tool-call text, part of the answer but not generated
        self.text = ""
        self.token_ids: list[int] = []
        self.cached_tokens = 0  # prompt tokens the engine took from its prefix cache
        self.logprobs: list = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.calls_sent = 0  # tool calls streamed so far
        self.streamed = 0  # characters of text streamed so far (completions' text_offset)


class _Server:
    def __init__(self, engine, model_name: str, allow_special_tokens_in_content: bool):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.created = int(time.time())
        self.metrics = ServerMetrics(engine)
        self.token_strings = TokenStrings(engine.tokenizer)
        self.prompts = PromptEncoder(
            engine.tokenizer,
            self.token_strings.longest_token_bytes(),
            allow_special_tokens_in_content=allow_special_tokens_in_content,
        )

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "qwen-jax",
            "max_model_len": self.engine.max_len,
        }

    # ------------------------------------------------------------------ endpoints
    async def chat(self, body: ChatCompletionRequest, request: Request):
        arrived = time.perf_counter()
        self._check_model(body.model)
        body.check_unsupported()
        check_text(body)
        use_tools = bool(body.tools) and body.tool_choice != "none"
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if use_tools else None
        messages = body.template_messages()
        constraint, constraint_param = body.constraint()
        tool_grammar = self._tool_grammar(body) if use_tools else None
        if tool_grammar is not None:
            if constraint:
                raise RequestError(
                    f"{constraint_param} cannot be combined with constrained tool calls "
                    "(tool_choice 'required', a named function, or strict tools)",
                    param=constraint_param,
                )
            constraint, constraint_param = {"grammar": tool_grammar}, "tools"
        # The forced tool-call prefix is for an unconstrained model (no structured-output extra).
        prefix = forced_prefix(body.tool_choice) if use_tools and tool_grammar is None else ""
        # Rendering and tokenizing a long conversation would stall every other request on the event loop.
        prompt_ids = await asyncio.to_thread(self.prompts.chat, messages, tools, prefix, self.engine.max_len)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        choices, queue = self._submit(
            body,
            prompt_ids,
            max_tokens=body.completion_limit(),
            logprobs=logprobs,
            arrived=arrived,
            prompt_param="messages",
            tool_prefix=prefix if use_tools else None,
            constraint=constraint,
            constraint_param=constraint_param,
        )
        kind = _ChatFormat(self, body, use_tools)
        if body.stream:
            return _sse(self._stream(kind, body, request, choices, queue, len(prompt_ids)))
        return await self._respond(kind, request, choices, queue, len(prompt_ids))

    async def complete(self, body: CompletionRequest, request: Request):
        arrived = time.perf_counter()
        self._check_model(body.model)
        body.check_unsupported()
        check_text(body)
        prompts = await asyncio.to_thread(self._encode_prompts, body.prompts())
        constraint, constraint_param = body.constraint()
        choices, queue = [], None
        try:
            for ids in prompts:
                batch, queue = self._submit(
                    body,
                    ids,
                    max_tokens=body.max_tokens,
                    logprobs=body.logprobs,
                    arrived=arrived,
                    prompt_param="prompt",
                    queue=queue,
                    first_index=len(choices),
                    default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS,
                    constraint=constraint,
                    constraint_param=constraint_param,
                )
                choices += batch
        except BaseException:
            self._abort(choices)
            raise
        echo = [self.tokenizer.decode(ids) if body.echo else "" for ids in prompts for _ in range(body.n)]
        kind = _CompletionFormat(self, body, echo)
        prompt_tokens = sum(map(len, prompts))
        if body.stream:
            return _sse(self._stream(kind, body, request, choices, queue, prompt_tokens))
        return await self._respond(kind, request, choices, queue, prompt_tokens)

    # ------------------------------------------------------------------ submission
    def _encode_prompts(self, prompts: list[str | list[int]]) -> list[list[int]]:
        return [p if isinstance(p, list) else self.prompts.completion(p, self.engine.max_len) for p in prompts]

    def _tool_grammar(self, body: ChatCompletionRequest) -> str | None:
        """The grammar constraining this request's tool calls (structured output,
        `qwen_jax.generation.constraints`): for tool_choice "required" or a named function, tool
        calls only, their arguments matching `parameters`; for "auto" with a `strict` tool, free
        text or calls, a strict tool's arguments matching its `parameters`. None when the calls are
        not constrained: "auto" without strict tools, or "required" / a named function without the
        structured-output extra (then a forced prefix starts the call)."""
        choice = body.tool_choice
        named = choice is not None and not isinstance(choice, str)
        required = choice == "required" or named
        strict = any(tool.function.strict for tool in body.tools)
        if not strict and (not required or not available()):
            return None
        tools = [t for t in body.tools if not named or t.function.name == choice.function.name]
        calls = [
            {"name": t.function.name, "parameters": t.function.parameters if (required or t.function.strict) else None}
            for t in tools
        ]
        tags = {tag: self.tokenizer.token_to_id(tag) for tag in (OPEN_TAG, CLOSE_TAG)}
        try:
            return tool_call_grammar(
                calls,
                required=required,
                single=body.parallel_tool_calls is False,
                token_ids=tags if all(i is not None for i in tags.values()) else None,
            )
        except GenerationError as e:
            raise RequestError(str(e), param="tools") from None

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise RequestError(
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                status=404,
                param="model",
                code="model_not_found",
                type="not_found_error",
            )

    def _submit(
        self,
        body,
        prompt_ids: list[int],
        *,
        max_tokens: int | None,
        logprobs: int | None,
        arrived: float,
        prompt_param: str,
        queue: asyncio.Queue | None = None,
        tool_prefix: str | None = None,
        first_index: int = 0,
        default_max_tokens: int | None = None,
        constraint: dict[str, Any] | None = None,
        constraint_param: str | None = None,
    ) -> tuple[list[_Choice], asyncio.Queue]:
        """Submit body.n engine requests for one prompt; returns their choices and the (shared) delta queue.

        Without max_tokens a choice may fill the context (chat), or gets `default_max_tokens` capped
        to the context (completions). tool_prefix: None without tool parsing, else the forced
        tool-call text already appended to the prompt ("" for none). constraint: the structured-output
        keyword of `Engine.submit` (e.g. {"json_schema": ...}), from the request field `constraint_param`.
        """
        context = self.engine.max_len
        length = len(prompt_ids)
        if length >= context:
            raise RequestError(
                f"This model's maximum context length is {context} tokens. However, your "
                f"{prompt_param} resulted in {length} tokens. Please reduce the length of the "
                f"{prompt_param}.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = min(default_max_tokens or context, context - length)
        elif length + max_tokens > context:
            raise RequestError(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{length + max_tokens} tokens ({length} in the {prompt_param}, {max_tokens} for the "
                f"completion). Please reduce the length of the {prompt_param} or the completion.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        loop = asyncio.get_running_loop()
        if queue is None:
            queue = asyncio.Queue()

        def on_delta(delta: Delta) -> None:  # runs on the engine thread
            loop.call_soon_threadsafe(queue.put_nowait, delta)

        base_seed = body.seed if body.seed is not None else secrets.randbits(63)
        logit_bias = body.logit_bias_ids()
        choices: list[_Choice] = []
        try:
            for i in range(body.n):
                handle = self.engine.submit(
                    prompt_ids,
                    max_new_tokens=max_tokens,
                    temperature=body.temperature,
                    top_k=body.top_k_value(),
                    top_p=body.top_p,
                    min_p=body.min_p,
                    repetition_penalty=body.repetition_penalty,
                    presence_penalty=body.presence_penalty,
                    frequency_penalty=body.frequency_penalty,
                    logit_bias=logit_bias,
                    seed=(base_seed + i) % 2**64,
                    stop=body.stop_strings(),
                    logprobs=logprobs,
                    on_delta=on_delta,
                    **(constraint or {}),
                )
                choices.append(
                    _Choice(
                        first_index + i,
                        handle,
                        RequestTimer(self.metrics, arrived),
                        None if tool_prefix is None else ToolCallStream(),
                        tool_prefix or "",
                    )
                )
        except QueueFullError as e:
            self._abort(choices)
            raise RequestError(str(e), status=503, type="server_error", code="queue_full") from None
        except EngineClosedError as e:
            self._abort(choices)
            raise RequestError(str(e), status=503, type="server_error", code="shutting_down") from None
        except EngineError as e:
            self._abort(choices)
            raise RequestError(str(e), param=constraint_param if e.param in KINDS else e.param) from None
        except MissingExtraError as e:  # structured output on a server installed without its extra
            self._abort(choices)
            raise RequestError(str(e), param=constraint_param) from None
        if tool_prefix:
            for choice in choices:  # the forced prefix opens a block: the parser must see it
                choice.tool_stream.feed(tool_prefix)
        return choices, queue

    @staticmethod
    def _abort(choices: list[_Choice]) -> None:
        """Abort the unfinished choices; each is counted in /metrics with finish reason "abort"."""
        for choice in choices:
            if choice.finish_reason is None:
                choice.handle.abort()
                choice.finish_reason = "abort"
                choice.timer.finished("abort")

    # ------------------------------------------------------------------ responses
    async def _deltas(
        self, request: Request, choices: list[_Choice], queue: asyncio.Queue
    ) -> AsyncIterator[tuple[_Choice, Delta]]:
        """(choice, delta) as the engine produces them, until every choice finished; aborts on disconnect."""
        by_id = {choice.handle.request_id: choice for choice in choices}
        remaining = len(choices)
        disconnect = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            while remaining:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, disconnect}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    raise _ClientGone()
                delta = getter.result()
                choice = by_id[delta.request_id]
                choice.timer.tokens(len(delta.token_ids))
                choice.token_ids += delta.token_ids
                choice.cached_tokens = delta.cached_tokens
                if delta.logprobs:
                    choice.logprobs += delta.logprobs
                if delta.finish_reason is not None:
                    choice.finish_reason, choice.error = delta.finish_reason, delta.error
                    choice.timer.finished(delta.finish_reason)
                    remaining -= 1
                yield choice, delta
        finally:
            disconnect.cancel()
            self._abort(choices)

    async def _respond(self, kind, request: Request, choices: list[_Choice], queue, prompt_tokens: int):
        try:
            async for choice, delta in self._deltas(request, choices, queue):
                choice.text += delta.text
        except _ClientGone:
            return Response(status_code=499)
        errors = [c.error for c in choices if c.error]
        if errors:
            status = 503 if any(c.finish_reason == "abort" for c in choices) else 500
            raise RequestError(errors[0], status=status, type="server_error")
        completion_tokens = sum(len(c.token_ids) for c in choices)
        return {
            "id": kind.id,
            "object": kind.object,
            "created": kind.created,
            "model": self.model_name,
            "choices": [kind.final_choice(c) for c in choices],
            "usage": _usage(prompt_tokens, completion_tokens, _cached_tokens(choices, kind.body.n)),
        }

    async def _stream(
        self, kind, body, request: Request, choices: list[_Choice], queue, prompt_tokens: int
    ) -> AsyncIterator[str]:
        try:
            for choice in choices:
                for chunk in kind.opening(choice):
                    yield _event(chunk)
            async for choice, delta in self._deltas(request, choices, queue):
                if delta.error:
                    yield _event(RequestError(delta.error, status=503, type="server_error").envelope())
                    self._abort(choices)
                    break
                for chunk in kind.chunks(choice, delta):
                    yield _event(chunk)
            else:
                if body.stream_options is not None and body.stream_options.include_usage:
                    usage = _usage(
                        prompt_tokens, sum(len(c.token_ids) for c in choices), _cached_tokens(choices, body.n)
                    )
                    yield _event({**kind.envelope(), "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        except _ClientGone:
            return


class _ClientGone(Exception):
    """The client closed the connection."""


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _cached_tokens(choices: list[_Choice], n: int) -> int:
    """Prompt tokens read from the prefix cache, counted once per prompt (as `prompt_tokens` is): the
    choices of a prompt are `n` consecutive ones, and the most any of them found counts."""
    return sum(max(c.cached_tokens for c in choices[i : i + n]) for i in range(0, len(choices), max(1, n)))


def _finish_reason(choice: _Choice, tool_calls: bool) -> str:
    if tool_calls and choice.finish_reason == "stop":
        return "tool_calls"
    return choice.finish_reason if choice.finish_reason in ("stop", "length") else "stop"


class _ChatFormat:
    """chat.completion / chat.completion.chunk objects."""

    object = "chat.completion"

    def __init__(self, server: _Server, body: ChatCompletionRequest, use_tools: bool):
        self.server, self.body, self.use_tools = server, body, use_tools
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.single_call = body.parallel_tool_calls is False

    def envelope(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.server.model_name,
        }

    def _chunk(self, choice: _Choice, delta: dict[str, Any], finish_reason=None, logprobs=None) -> dict[str, Any]:
        return {
            **self.envelope(),
            "choices": [{"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
        }

    def _logprobs(self, entries) -> dict[str, Any] | None:
        if not self.body.logprobs:
            return None
        strings = self.server.token_strings
        return {"content": [strings.chat_logprob(e) for e in entries or []], "refusal": None}

    def opening(self, choice: _Choice) -> list[dict[str, Any]]:
        return [self._chunk(choice, {"role": "assistant", "content": ""})]

    def chunks(self, choice: _Choice, delta: Delta) -> list[dict[str, Any]]:
        out = []
        logprobs = self._logprobs(delta.logprobs) if delta.logprobs else None
        events = [("content", delta.text)] if choice.tool_stream is None else choice.tool_stream.feed(delta.text)
        if delta.finish_reason is not None and choice.tool_stream is not None:
            events += choice.tool_stream.finish()
        calls_sent = choice.calls_sent
        for kind, value in events:
            if kind == "content" and value:
                out.append(self._chunk(choice, {"content": value}, logprobs=logprobs))
                logprobs = None
            elif kind == "tool_call" and not (self.single_call and calls_sent):
                out.append(self._chunk(choice, {"tool_calls": [_tool_call(value, calls_sent, streaming=True)]}))
                calls_sent += 1
        choice.calls_sent = calls_sent
        if logprobs is not None:  # tokens whose text is held back still report their logprobs
            out.append(self._chunk(choice, {}, logprobs=logprobs))
        if delta.finish_reason is not None:
            out.append(self._chunk(choice, {}, finish_reason=_finish_reason(choice, calls_sent > 0)))
        return out

    def final_choice(self, choice: _Choice) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": choice.text}
        calls = []
        if self.use_tools:
            content, calls = parse_tool_calls(choice.prefix + choice.text)
            if calls:
                calls = calls[:1] if self.single_call else calls
                message["content"] = content or None
                message["tool_calls"] = [_tool_call(call, i) for i, call in enumerate(calls)]
            else:
                message["content"] = choice.prefix + choice.text
        return {
            "index": choice.index,
            "message": message,
            "logprobs": self._logprobs(choice.logprobs),
            "finish_reason": _finish_reason(choice, bool(calls)),
        }


def _tool_call(call: dict[str, Any], index: int, streaming: bool = False) -> dict[str, Any]:
    out = {
        "id": "call_" + secrets.token_hex(12),
        "type": "function",
        "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)},
    }
    return {"index": index, **out} if streaming else out


class _CompletionFormat:
    """text_completion objects (the legacy completions endpoint)."""

    object = "text_completion"

    def __init__(self, server: _Server, body: CompletionRequest, echo: list[str]):
        self.server, self.body, self.echo = server, body, echo
        self.id = "cmpl-" + secrets.token_hex(12)
        self.created = int(time.time())

    def envelope(self) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.server.model_name}

    def _logprobs(self, entries, text_offset: int) -> dict[str, Any] | None:
        if self.body.logprobs is None:
            return None
        return self.server.token_strings.completion_logprobs(entries or [], text_offset)

    def opening(self, choice: _Choice) -> list[dict[str, Any]]:
        echo = self.echo[choice.index]
        choice.streamed = len(echo)
        if not echo:
            return []
        return [
            {
                **self.envelope(),
                "choices": [{"index": choice.index, "text": echo, "logprobs": None, "finish_reason": None}],
            }
        ]

    def chunks(self, choice: _Choice, delta: Delta) -> list[dict[str, Any]]:
        finish = _finish_reason(choice, False) if delta.finish_reason is not None else None
        if not delta.text and not delta.logprobs and finish is None:
            return []
        logprobs = self._logprobs(delta.logprobs, choice.streamed) if delta.logprobs or finish is None else None
        choice.streamed += len(delta.text)
        return [
            {
                **self.envelope(),
                "choices": [{"index": choice.index, "text": delta.text, "logprobs": logprobs, "finish_reason": finish}],
            }
        ]

    def final_choice(self, choice: _Choice) -> dict[str, Any]:
        echo = self.echo[choice.index]
        return {
            "index": choice.index,
            "text": echo + choice.text,
            "logprobs": self._logprobs(choice.logprobs, len(echo)),
            "finish_reason": _finish_reason(choice, False),
        }
