"""Optional dependencies: each feature beyond load / generate / convert has a pip extra.

    serve   fastapi, uvicorn, prometheus-client      `qwen-jax serve`, `qwen_jax.serve`
    train   optax, pyyaml, tensorboardX, matplotlib,  `qwen-jax train`, `qwen_jax.train`
            datasets, pyarrow
    gguf    gguf                                     reading GGUF files

`require(module, extra=...)` imports an optional module, or raises `MissingExtraError` naming the
pip command that installs it; modules of those features call it instead of importing the package
at their top, so that `import qwen_jax` and `qwen-jax --help` work with the core install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from qwen_jax.errors import MissingExtraError

EXTRAS = {
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
    "train": ("optax", "yaml", "tensorboardX", "matplotlib", "datasets", "pyarrow"),
    "gguf": ("gguf",),
}


def require(module: str, *, extra: str, feature: str | None = None) -> ModuleType:
    """`importlib.import_module(module)`, or `MissingExtraError` naming `pip install 'qwen-jax[extra]'`.

    feature: what needs it, for the message (default: the extra's name).
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; the extras are {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = e.name or module.split(".")[0]
        raise MissingExtraError(
            f"{feature or extra} needs the optional package {missing!r}, which is not installed: "
            f"pip install 'qwen-jax[{extra}]'"
        ) from None
