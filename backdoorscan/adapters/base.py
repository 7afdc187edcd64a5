"""The contract every framework adapter fulfils.

An adapter turns a model, as it came, into an ONNX graph with two outputs (``logits`` and
``features``), and, where its framework allows, retrains it and saves it back in its own format.
The scanner only ever sees the ONNX graph; repair and exclusionary reclassification call ``fit``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

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
    ``cache_key``: the export cache's key for it (``_cache.cached`` sets it, hit or miss), so
    that an export made where the cache cannot be written (the model worker) can be stored by
    the process that can; None for a model with no file to hash.
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
    cache_key: str | None = None


@dataclass(frozen=True)
class LayerInfo:
    """A candidate hidden layer: what ``--layer`` takes, its operator or module type, its
    per-sample shape (``None`` or a name where unknown), and whether the scan clusters it by
    default."""

    name: str
    op_type: str
    shape: tuple[int | str | None, ...]
    default: bool = False


def mark_default(
    rows: list[LayerInfo], producer: str | None, head: str | None, shape: tuple
) -> list[LayerInfo]:
    """Mark the row whose output is the default features, or insert ``input of HEAD`` before it.

    ``producer`` is the path whose output the head reads (None when the features come from a
    functional op); ``shape`` is the features' per-sample shape for an inserted row.
    """
    if producer is not None and any(r.name == producer for r in rows):
        return [LayerInfo(r.name, r.op_type, tuple(r.shape), r.name == producer) for r in rows]
    if head is None:
        return rows
    row = LayerInfo(f"input of {head}", "(features)", tuple(shape), default=True)
    at = next((i for i, r in enumerate(rows) if r.name == head), len(rows))
    return [*rows[:at], row, *rows[at:]]


@runtime_checkable
class Adapter(Protocol):
    """What every caller needs from a model, whatever its framework.

    ``can_fit`` says whether the adapter also fulfils :class:`Retrainable`; where it does not,
    ``fit_reason`` says why in words a user can act on (empty otherwise).
    """

    framework: str
    can_fit: bool
    fit_reason: str

    def to_onnx(self, layer: str | None = None) -> OnnxExport:
        """Export the model with its penultimate (or the named) layer as output ``features``."""
        ...

    def layers(self) -> list[LayerInfo]:
        """The hidden layers that can be clustered, in graph order; the default one marked."""
        ...

    def predict_logits(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """The model's logits for ``x`` (samples as the model takes them)."""
        ...

    def clone(self) -> Adapter:
        """An independent copy (same weights) that can be changed without touching this one."""
        ...

    def save(self, path: str | Path) -> Path:
        """Write the model in its original format, atomically; returns the path written."""
        ...


@runtime_checkable
class Retrainable(Adapter, Protocol):
    """What only adapters whose framework can train do (repair and ExRe 'full' need it)."""

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int = 1,
        batch_size: int = 128,
        lr: float = 1e-3,
        seed: int = 0,
    ) -> None:
        """Continue training the current weights on (x, y); raises AdapterError where impossible."""
        ...

    def reinitialize(self, seed: int = 0) -> None:
        """Draw fresh weights (seeded), as before training: ExRe 'full' retrains from scratch."""
        ...

    def clone(self) -> Retrainable:
        """An independent copy (same weights) that can be trained without touching this one."""
        ...
