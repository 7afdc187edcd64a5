"""backdoorscan: find backdoor poisoning in a model's training data with Activation Clustering.

The public API: :func:`scan` a model with its training data, :func:`detect` on activations you
already have, and the :class:`Report` both return.
"""

from __future__ import annotations

__version__ = "0.1.0"

from backdoorscan.scanner import DetectConfig, detect, scan
from backdoorscan.scanner.report import Report

__all__ = ["DetectConfig", "Report", "__version__", "detect", "scan"]
