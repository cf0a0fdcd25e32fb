"""The server's limits on what one client may send, and the middleware enforcing the request-body limit.

A server facing untrusted clients bounds every resource a request can claim: the size of its
body (checked here, before the body is parsed), the stop strings it asks the engine to match
(`qwen_jax.serve.protocol`), the connections and the time a client may take to send a request
(uvicorn's settings, `qwen_jax.serve.server`). This module imports no optional package, so the
command line can show the defaults without the serve extra.
"""

from __future__ import annotations

import json

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_LIMIT_CONCURRENCY = 1024  # open connections + running HTTP requests; beyond it uvicorn answers 503
DEFAULT_KEEP_ALIVE_TIMEOUT = 5.0  # seconds an idle keep-alive connection stays open (uvicorn's default)
DEFAULT_READ_TIMEOUT = 30.0  # seconds a connection may take to send a whole request (headers and body)
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256

_JSON_METHODS = {"POST", "PUT", "PATCH"}


class RequestBodyLimit:
    """Pure ASGI middleware: reads a request's body up to `max_bytes` before the application sees it.

    A body declared (Content-Length) or found larger than `max_bytes` is a 413: the rest is read and
    dropped, never kept, so memory stays bounded and the client gets the answer. On /v1 a POST whose
    Content-Type is not JSON is a 415 and an empty one a 400, so those get a message saying what is
    wrong instead of a schema error.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in _JSON_METHODS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", ()))
        declared = headers.get(b"content-length", b"").strip()
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(receive, send, more_body=True)
        on_api = scope["path"].startswith("/v1")
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        if on_api and content_type and not _is_json(content_type):
            return await _reject(
                send,
                415,
                f"the request body must be JSON sent with 'Content-Type: application/json' (got {content_type!r})",
                code="unsupported_media_type",
            )
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None  # nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large(receive, send, more_body=message.get("more_body", False))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if on_api and not body:
            return await _reject(send, 400, "the request body is empty: send a JSON object", code="empty_body")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect when the client goes away

        return await self.app(scope, replay, send)

    async def _too_large(self, receive, send, *, more_body: bool) -> None:
        # Read the rest of the body, keeping none of it, before answering: a client still sending
        # would otherwise see its connection reset instead of the 413. The server's read timeout
        # bounds how long this may take.
        while more_body:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            more_body = message.get("more_body", False)
        await _reject(
            send,
            413,
            f"the request body is larger than this server's limit of {self.max_bytes} bytes",
            code="request_too_large",
        )


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _reject(send, status: int, message: str, *, code: str) -> None:
    """An OpenAI error envelope (as `qwen_jax.serve.protocol.RequestError.envelope`); the connection closes."""
    error = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    payload = json.dumps(error).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
