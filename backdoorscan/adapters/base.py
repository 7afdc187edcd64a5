"""The contract every framework adapter fulfils.

An adapter turns a model, as it came, into an ONNX graph with two outputs (``logits`` and
``features``), and, where its framework allows, retrains it and saves it back in its own format.
The scanner only ever sees the ONNX graph; repair and exclusionary reclassification call ``fit``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

LOGITS = "logits"
FEATURES = "features"


class AdapterError(ValueError):
    """A model could not be loaded, exported or trained; the message says why and what to do."""


@dataclass
class OnnxExport:
    """An ONNX model with ``logits`` and ``features`` outputs, ready for extraction.

    ``model_bytes`` is the serialized ``onnx.ModelProto``; ``input_name`` the one data input;
    ``input_shape`` its per-sample shape (batch dimension removed, ``None`` where dynamic);
    ``input_dtype`` a numpy dtype name; ``layer`` the tensor or module the features come from.
    """

    model_bytes: bytes
    input_name: str
    input_shape: tuple[int | None, ...]
    input_dtype: str
    layer: str
    feature_dim: int | None = None
    num_classes: int | None = None
    notes: list[str] = field(default_factory=list)
    framework: str = "onnx"
    logits_name: str = LOGITS
    features_name: str = FEATURES


@runtime_checkable
class Adapter(Protocol):
    """What the scanner and repair need from a framework."""

    framework: str
    can_fit: bool

    def to_onnx(self, layer: str | None = None) -> OnnxExport:
        """Export the model with its penultimate (or the named) layer as output ``features``."""
        ...

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int = 1,
        batch_size: int = 128,
        lr: float = 1e-3,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        """Continue training the loaded weights on (x, y); raises AdapterError where impossible."""
        ...

    def clone(self) -> Adapter:
        """An independent copy (same weights) that can be trained without touching this one."""
        ...

    def save(self, path: str | Path) -> Path:
        """Write the model in its original format, atomically; returns the path written."""
        ...
