"""Run the HTTP application with uvicorn on a listening socket, stopping gracefully on SIGTERM / Ctrl-C."""

from __future__ import annotations

import signal
import socket

import uvicorn
from fastapi import FastAPI

from qwen_jax.engine.core import Engine


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
    app: FastAPI, listener: socket.socket, engine: Engine, *, shutdown_timeout: float, log_level: str
) -> None:
    """Serve `app` on `listener` until SIGTERM or Ctrl-C, then let running requests finish for up to
    `shutdown_timeout` seconds, abort the rest and stop `engine`."""
    config = uvicorn.Config(
        app,
        log_level=log_level,
        timeout_graceful_shutdown=shutdown_timeout + 5,
        lifespan="off",
        access_log=log_level in ("info", "debug"),
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
