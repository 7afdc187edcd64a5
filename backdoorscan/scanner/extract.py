"""Batched activation extraction with ONNX Runtime, on the GPU when the session really gets one.

One session runs the exported graph over the data set; features land in one preallocated
float32 array and predictions in an int64 array. The provider reported is the one the session
uses (``session.get_providers()``), not what the installed build merely lists as available.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from backdoorscan.adapters.base import OnnxExport
from backdoorscan.runtime import (  # noqa: F401 - re-exported: they live in runtime.py now
    DEVICES,
    ExtractionError,
    _quiet_run,
    _quiet_stderr,
    make_session,
    per_sample,
    predict_classes,
    session_provider,
)
from backdoorscan.scanner.data import Dataset
from backdoorscan.scanner.sketch import InputSketch

# ONNX Runtime 1.31's Linux builds record a telemetry event per process (device id, OS, CPU,
# executable path) under ~/.cache/Microsoft and write $TMPDIR/.ses unless this is set before
# onnxruntime is imported; a scanner of untrusted models should leave no such trace.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

ProgressFn = Callable[[int], None]


@dataclass
class Activations:
    """What one pass over the data gives: hidden features, predicted classes, the provider used."""

    features: np.ndarray
    predictions: np.ndarray
    provider: str
    layer: str
    num_classes: int
    sketch: np.ndarray | None = None


def extract(
    export: OnnxExport,
    data: Dataset,
    *,
    device: str = "auto",
    batch_size: int = 256,
    progress: ProgressFn | None = None,
    session: object | None = None,
    sketch_dim: int = 64,
    seed: int = 0,
) -> Activations:
    """Run the whole data set through the model in batches; return features and predictions.

    With ``sketch_dim`` > 0 a random projection of each input is kept as well, for the
    input-space neighbour analysis.
    """
    if batch_size < 1:
        raise ExtractionError("--batch-size must be at least 1")
    if session is None:
        session = make_session(export, device)
    n = len(data)
    features: np.ndarray | None = None
    num_classes = 0
    predictions = np.empty(n, dtype=np.int64)
    out_names = [export.logits_name, export.features_name]
    tokens = np.issubdtype(np.dtype(data.dtype), np.integer)
    sketch = InputSketch(n, sketch_dim, seed=seed, tokens=tokens) if sketch_dim > 0 else None
    run_options = _quiet_run()
    for start, xb in data.batches(batch_size):
        try:
            logits, feats = session.run(out_names, {export.input_name: xb}, run_options)  # type: ignore[attr-defined]
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExtractionError(f"the model failed on samples {start}..: {first}") from None
        feats = per_sample(feats, len(xb), "features", start)
        if not np.isfinite(feats).all():  # before the logits: the layer is the first cause
            raise ExtractionError("the model produced NaN or Inf activations on this data")
        logits = per_sample(logits, len(xb), "logits", start)
        if features is None:
            features = np.empty((n, feats.shape[1]), dtype=np.float32)
        elif feats.shape[1] != features.shape[1]:
            raise ExtractionError("the feature size changed between batches")
        if num_classes and logits.shape[1] != num_classes:
            raise ExtractionError("the number of logits changed between batches")
        num_classes = logits.shape[1]
        stop = start + len(xb)
        features[start:stop] = feats
        if not np.isfinite(features[start:stop]).all():  # past float32's range once stored
            raise ExtractionError("the model produced NaN or Inf activations on this data")
        predictions[start:stop] = logits.argmax(axis=1)
        if sketch is not None:
            sketch.add(start, xb)
        if progress is not None:
            progress(len(xb))
    assert features is not None  # n >= 1 is checked when the data is loaded
    return Activations(
        features,
        predictions,
        session_provider(session),
        export.layer,
        num_classes,
        sketch.matrix if sketch is not None else None,
    )
