"""Run the HTTP application with uvicorn on a listening socket, stopping gracefully on SIGTERM / Ctrl-C.

Connections are bounded with uvicorn's own settings (`limit_concurrency`, `timeout_keep_alive`),
plus a read timeout uvicorn lacks: a connection must deliver each whole request (headers and body)
within `read_timeout` seconds of opening or of its previous response, so clients that send a byte
now and then (slow loris) or nothing at all cannot hold connections open.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import socket

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from qwen_jax.engine.core import Engine
from qwen_jax.serve.limits import DEFAULT_KEEP_ALIVE_TIMEOUT, DEFAULT_LIMIT_CONCURRENCY, DEFAULT_READ_TIMEOUT


class ReadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request `read_timeout`
    seconds after it opened or after its previous response."""

    def __init__(self, *args, read_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout
        self._read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_read_deadline()

    def connection_lost(self, exc) -> None:
        self._disarm_read_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
            self._disarm_read_deadline()  # the request is in (or the connection is over)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_read_deadline()  # the next request on this keep-alive connection

    def _arm_read_deadline(self) -> None:
        self._disarm_read_deadline()
        self._read_deadline = self.loop.call_later(self.read_timeout, self._on_read_timeout)

    def _disarm_read_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _on_read_timeout(self) -> None:
        self._read_deadline = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.transport.close()


def server_config(
    app: FastAPI,
    *,
    log_level: str = "warning",
    limit_concurrency: int = DEFAULT_LIMIT_CONCURRENCY,
    keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    timeout_graceful_shutdown: float | None = None,
) -> uvicorn.Config:
    """uvicorn's configuration for `app` with the server's connection limits (`qwen_jax.serve.limits`).

    limit_concurrency: open connections plus running requests beyond which new requests get 503.
    keep_alive_timeout: seconds an idle keep-alive connection stays open.
    read_timeout: seconds a connection may take to send a whole request (headers and body).
    """
    return uvicorn.Config(
        app,
        log_level=log_level,
        http=functools.partial(ReadTimeoutProtocol, read_timeout=read_timeout),
        limit_concurrency=limit_concurrency,
        timeout_keep_alive=keep_alive_timeout,
        timeout_graceful_shutdown=timeout_graceful_shutdown,
        lifespan="off",
        access_log=log_level in ("info", "debug"),
    )


class GracefulServer(uvicorn.Server):
    """A uvicorn server whose exit signal also stops the engine accepting and starts its shutdown deadline."""

    def __init__(self, config: uvicorn.Config, engine: Engine, shutdown_timeout: float):
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout

    def handle_exit(self, sig: int, frame) -> None:
        self.engine.begin_shutdown(self.shutdown_timeout)
        super().handle_exit(sig, frame)


def run_server(
    app: FastAPI,
    listener: socket.socket,
    engine: Engine,
    *,
    shutdown_timeout: float,
    log_level: str,
    limit_concurrency: int = DEFAULT_LIMIT_CONCURRENCY,
    keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
) -> None:
    """Serve `app` on `listener` until SIGTERM or Ctrl-C, then let running requests finish for up to
    `shutdown_timeout` seconds, abort the rest and stop `engine`. The connection limits are
    `server_config`'s."""
    config = server_config(
        app,
        log_level=log_level,
        limit_concurrency=limit_concurrency,
        keep_alive_timeout=keep_alive_timeout,
        read_timeout=read_timeout,
        timeout_graceful_shutdown=shutdown_timeout + 5,
    )
    server = GracefulServer(config, engine, shutdown_timeout)
    # uvicorn re-raises the signal that stopped it once its own handler is removed: make SIGTERM's
    # next handler a no-op so a graceful stop exits 0 (SIGINT ends as KeyboardInterrupt, caught below).
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.shutdown(0.0)
