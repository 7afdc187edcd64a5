"""ONNX Runtime sessions for exported models: the one place that builds them, for the scanner
and for the model worker alike.

A bottom module: it imports ``backdoorscan.onnx_graph`` (and ``adapters.base`` for type hints
only), so that the scanner and the sandbox both use it without importing each other. The
provider reported is the one the session uses (``session.get_providers()``), not what the
installed build merely lists as available.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from backdoorscan.onnx_graph import conv1d_as_conv2d

if TYPE_CHECKING:
    from backdoorscan.adapters.base import OnnxExport

# ONNX Runtime 1.31's Linux builds record a telemetry event per process (device id, OS, CPU,
# executable path) under ~/.cache/Microsoft and write $TMPDIR/.ses unless this is set before
# onnxruntime is imported; a scanner of untrusted models should leave no such trace.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

DEVICES = ("auto", "cpu", "cuda")

__all__ = [
    "DEVICES",
    "ExtractionError",
    "make_session",
    "per_sample",
    "predict_classes",
    "session_provider",
]


class ExtractionError(RuntimeError):
    """The model could not be run on the data; the message says why."""


def session_options(
    *, threads: int | None = None, spin: bool = True, optimized: bool = True
) -> object:
    """The SessionOptions every session here is made with: quiet logs, ``threads`` intra-op
    threads (None: ONNX Runtime's default), spinning idle threads unless ``spin`` is False,
    graph optimisations unless ``optimized`` is False."""
    import onnxruntime as ort

    # The GPU build logs library-load errors on machines without CUDA; only errors that
    # stop the session matter here, and those raise.
    ort.set_default_logger_severity(3)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def cpu_session(model_bytes: bytes, *, optimized: bool = True) -> object:
    """A CPU session of a graph as it is (the adapters check their exports with it)."""
    import onnxruntime as ort

    options = session_options(optimized=optimized)
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def make_session(
    export: OnnxExport, device: str = "auto", *, threads: int | None = None, spin: bool = True
) -> object:
    """An InferenceSession for ``export`` on ``device``; raises if CUDA is asked and absent.

    ``spin=False`` makes the session's idle intra-op (and inter-op) threads park instead of
    busy-waiting for the next run: ONNX Runtime's default suits back-to-back runs, but where
    each batch arrives after a round trip to another process (the model worker answering the
    scanner) the threads would spin through every round trip, on cores the other side needs.
    """
    if device not in DEVICES:
        raise ExtractionError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    import onnxruntime as ort

    options = session_options(threads=threads, spin=spin)
    available = ort.get_available_providers()
    providers = ["CPUExecutionProvider"]
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise ExtractionError(
            "--device cuda asked for, but this onnxruntime build has no CUDA provider "
            "(install onnxruntime-gpu)"
        )
    try:
        model_bytes = conv1d_as_conv2d(export.model_bytes)
    except Exception:  # a graph the rewrite cannot read: ONNX Runtime says why, below
        model_bytes = export.model_bytes
    try:
        with _quiet_stderr():
            session = ort.InferenceSession(model_bytes, options, providers=providers)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExtractionError(f"ONNX Runtime cannot load the model: {msg}") from None
    used = session.get_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in used:
        raise ExtractionError(
            "--device cuda asked for, but the CUDA provider did not load (no GPU, or the "
            "CUDA/cuDNN libraries are missing); use --device auto to fall back to the CPU"
        )
    return session


class _quiet_stderr:  # noqa: N801 - used as a context manager, reads like a function
    """Silence C-level stderr while CUDA libraries fail to load on GPU-less machines."""

    def __enter__(self) -> None:
        self._saved = None
        try:
            self._saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except OSError:
            self._saved = None

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)


def predict_classes(
    session: object, export: OnnxExport, x: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """The model's predicted class for each of the converted samples ``x``, in batches."""
    out = [np.zeros(0, dtype=np.int64)]
    for s in range(0, len(x), batch_size):
        xb = x[s : s + batch_size]
        (logits,) = session.run([export.logits_name], {export.input_name: xb})  # type: ignore[attr-defined]
        out.append(per_sample(logits, len(xb), "logits", s).argmax(axis=1))
    return np.concatenate(out)


def session_provider(session: object) -> str:
    """The provider that runs the graph: the first one the session really holds."""
    return session.get_providers()[0]  # type: ignore[attr-defined]


def _quiet_run() -> object:
    """Run options that keep ONNX Runtime from logging a failing kernel: the error is raised
    and reported in one line instead."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


def per_sample(out: object, n: int, what: str, start: int = 0) -> np.ndarray:
    """A model output as ``[n, values]`` numbers; a hostile graph may return anything.

    Logits must be finite floating-point scores: the predicted classes are their argmax, and
    the argmax of NaN, of Inf or of integer outputs (class indices, say) means nothing.
    ``start`` is the index of the batch's first sample, for the message.
    """
    arr = np.asarray(out)
    if arr.dtype.kind not in "biuf":
        raise ExtractionError(f"the model's {what} output has dtype {arr.dtype}, not numbers")
    if arr.size == 0 or arr.size % n:
        raise ExtractionError(
            f"the model's {what} output has shape {arr.shape} for a batch of {n} samples; "
            "expected one row of values per sample"
        )
    arr = arr.reshape(n, -1)
    if what == "logits" and arr.dtype.kind != "f":
        raise ExtractionError(
            f"the model's logits output has dtype {arr.dtype}, not floating point: "
            "backdoorscan needs the class scores (logits or probabilities), not class indices"
        )
    if what == "logits" and not np.isfinite(arr).all():
        row = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        kind = "NaN" if np.isnan(arr[row]).any() else "infinite"
        raise ExtractionError(
            f"the model gave {kind} logits for sample {start + row}: class scores that are not "
            "finite numbers cannot be scanned"
        )
    return arr
