"""`python -m qwen_jax.cli`: the `qwen-jax` command."""

import sys

from qwen_jax.cli.main import main

sys.exit(main())
