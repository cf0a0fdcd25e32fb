"""`qwen-jax serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over `qwen_jax.Engine`.

`qwen_jax.serve.app.create_app(engine, model_name=...)` builds the ASGI application and
`qwen_jax.serve.server.run_server` runs it with uvicorn. Both need the serve extra
(`pip install 'qwen-jax[serve]'`); this package imports neither, so that `import qwen_jax` and
`qwen-jax --help` work with the core install (`qwen_jax.serve.cli` checks the extra first).
"""
