"""`qwen-jax serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over `qwen_jax.Engine`."""

from qwen_jax.serve.app import create_app

__all__ = ["create_app"]
