"""Optional dependencies: each feature beyond load / generate / convert has a pip extra.

    serve   fastapi, uvicorn, prometheus-client      `qwen-jax serve`, `qwen_jax.serve`
    train   optax, pyyaml, tensorboardX, matplotlib,  `qwen-jax train`, `qwen_jax.train`
            datasets, pyarrow
    gguf    gguf                                     reading GGUF files
    structured  llguidance                           structured output (json_schema, regex, choice, grammar)
    rl      math-verify                              the GRPO reward `math_accuracy`

`require(module, extra=...)` imports an optional module, or raises `MissingExtraError` naming the
pip command that installs it; modules of those features call it instead of importing the package
at their top, so that `import qwen_jax` and `qwen-jax --help` work with the core install.
`require_extra(extra)` checks a whole extra at once, before a command line loads the modules of its
feature (which import the packages directly: `qwen_jax.serve.cli.run` does this).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from qwen_jax.errors import MissingExtraError

# extra -> the top-level modules its packages provide (what `import` names, not what pip names).
EXTRAS = {
    # pydantic and starlette come with fastapi; qwen_jax.serve imports them too.
    "serve": ("fastapi", "uvicorn", "prometheus_client", "pydantic", "starlette"),
    "train": ("optax", "yaml", "tensorboardX", "matplotlib", "datasets", "pyarrow"),
    "gguf": ("gguf",),
    "structured": ("llguidance",),
    "rl": ("math_verify",),
}


def require(module: str, *, extra: str, feature: str | None = None) -> ModuleType:
    """`importlib.import_module(module)`, or `MissingExtraError` naming `pip install 'qwen-jax[extra]'`.

    feature: what needs it, for the message (default: the extra's name). Only a module that is not
    installed becomes `MissingExtraError`; an installed package that fails to import raises as it is.
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; the extras are {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or module
        if missing.split(".")[0] == "qwen_jax":  # a module of this package: a bug, not a missing extra
            raise
        raise MissingExtraError(
            f"{feature or extra} needs the optional package {missing.split('.')[0]!r}, which is not installed: "
            f"pip install 'qwen-jax[{extra}]'"
        ) from None


def require_extra(extra: str, *, feature: str | None = None) -> None:
    """Import every package of `extra` (see `require`): one clear error before anything needs them."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; the extras are {', '.join(EXTRAS)}")
    for module in EXTRAS[extra]:
        require(module, extra=extra, feature=feature)
