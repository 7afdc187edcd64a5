"""Framework-free helpers the adapters share: a silencer for exporters, short lists in messages.

Nothing here imports a training framework, so the Keras adapter can use what the PyTorch one
uses (Keras' torch-backend export goes through torch.onnx) without importing it.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import warnings
from collections.abc import Iterator
from typing import Any

from backdoorscan.adapters.base import AdapterError

# Loggers of the exporters the adapters drive (named, so silencing them imports nothing).
EXPORT_LOGGERS = ("torch", "torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' warnings, deprecation notes, log lines and progress prints."""
    loggers = [logging.getLogger(n) for n in EXPORT_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def few(items: list[str], n: int = 5) -> str:
    """The first ``n`` items joined for a message, with how many more there are."""
    if not items:
        return "none"
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def require(module: str, *, extra: str, what: str) -> Any:
    """Import an optional dependency, or raise AdapterError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise AdapterError(
            f"{what} need {module.split('.')[0]}, which is not installed: "
            f'pip install "backdoorscan[{extra}]" ({e})'
        ) from None
