"""The scanner: data, extraction, detection, the transfer test, ExRe, repair and the report.

Names are imported on first use, so that reading ``scanner.config`` (as the command line does
for its defaults) loads neither ONNX Runtime nor Numba.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backdoorscan.scanner.config import DetectConfig, ModelOptions, RunOptions
    from backdoorscan.scanner.data import DataError, Dataset
    from backdoorscan.scanner.detect import detect
    from backdoorscan.scanner.exre import ExreConfig, ExreError
    from backdoorscan.scanner.extract import ExtractionError
    from backdoorscan.scanner.pipeline import Prepared, Progress, load_dataset, prepare, run, scan
    from backdoorscan.scanner.report import Report

_EXPORTS = {
    "DataError": "data",
    "Dataset": "data",
    "DetectConfig": "config",
    "ExreConfig": "exre",
    "ExreError": "exre",
    "ExtractionError": "extract",
    "MemoryBudgetError": "budget",
    "ModelOptions": "config",
    "Prepared": "pipeline",
    "Progress": "pipeline",
    "Report": "report",
    "RunOptions": "config",
    "detect": "detect",
    "load_dataset": "pipeline",
    "prepare": "pipeline",
    "run": "pipeline",
    "scan": "pipeline",
}

__all__ = [
    "DataError",
    "Dataset",
    "DetectConfig",
    "ExreConfig",
    "ExreError",
    "ExtractionError",
    "MemoryBudgetError",
    "ModelOptions",
    "Prepared",
    "Progress",
    "Report",
    "RunOptions",
    "detect",
    "load_dataset",
    "prepare",
    "run",
    "scan",
]


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'backdoorscan.scanner' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"backdoorscan.scanner.{module}"), name)
    globals()[name] = value
    return value
