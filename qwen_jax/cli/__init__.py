"""The `qwen-jax` command line (`qwen_jax.cli.main`); `serve`, `train` and `convert` keep their
subcommands in their own packages."""

from qwen_jax.cli.main import main

__all__ = ["main"]
