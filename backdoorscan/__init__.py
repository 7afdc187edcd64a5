"""backdoorscan: find backdoor poisoning in a model's training data with Activation Clustering.

The public API: :func:`scan` a model with its training data, :func:`detect` on activations you
already have, :func:`repair` a model found poisoned, and the :class:`Report` they return.
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

# ONNX Runtime records a telemetry event per process (and may try to upload it) unless this
# is set before it is first imported, by whichever module imports it first.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from backdoorscan.scanner import DetectConfig, ExreConfig, detect, scan
from backdoorscan.scanner.repair import repair
from backdoorscan.scanner.report import Report

__all__ = ["DetectConfig", "ExreConfig", "Report", "__version__", "detect", "repair", "scan"]
