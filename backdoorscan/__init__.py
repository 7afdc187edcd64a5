"""backdoorscan: find backdoor poisoning in a model's training data with Activation Clustering.

The public API: :func:`scan` a model with its training data, :func:`detect` on activations you
already have, :func:`repair` a model found poisoned, and the :class:`Report` they return.
The names are imported on first use, so that ``import backdoorscan.kernels`` or the command
line's ``--help`` do not load ONNX, ONNX Runtime or Numba.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from backdoorscan._version import __version__

# ONNX Runtime records a telemetry event per process (and may try to upload it) unless this
# is set before it is first imported, by whichever module imports it first.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

if TYPE_CHECKING:
    from backdoorscan.scanner.config import DetectConfig
    from backdoorscan.scanner.detect import detect
    from backdoorscan.scanner.exre import ExreConfig
    from backdoorscan.scanner.pipeline import scan
    from backdoorscan.scanner.repair import repair
    from backdoorscan.scanner.report import Report

# Public name -> the module that defines it.
_EXPORTS = {
    "DetectConfig": "backdoorscan.scanner.config",
    "ExreConfig": "backdoorscan.scanner.exre",
    "Report": "backdoorscan.scanner.report",
    "detect": "backdoorscan.scanner.detect",
    "repair": "backdoorscan.scanner.repair",
    "scan": "backdoorscan.scanner.pipeline",
}

__all__ = ["DetectConfig", "ExreConfig", "Report", "__version__", "detect", "repair", "scan"]


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'backdoorscan' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
