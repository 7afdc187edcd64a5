"""The scan pipeline: model -> ONNX with features -> batched extraction -> per-class clustering."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from backdoorscan import adapters
from backdoorscan._io import sha256_file
from backdoorscan.adapters.base import Adapter, OnnxExport
from backdoorscan.scanner.budget import MemoryBudgetError, check_memory, machine_memory
from backdoorscan.scanner.config import DetectConfig
from backdoorscan.scanner.data import DataError, Dataset, conform, from_arrays, load_data
from backdoorscan.scanner.detect import detect
from backdoorscan.scanner.exre import ExreConfig, ExreError, run_exre
from backdoorscan.scanner.extract import Activations, ExtractionError, extract, make_session
from backdoorscan.scanner.report import Report
from backdoorscan.scanner.transfer import TransferProbe

__all__ = [
    "DataError",
    "Dataset",
    "DetectConfig",
    "ExreConfig",
    "ExreError",
    "ExtractionError",
    "MemoryBudgetError",
    "Report",
    "describe_inputs",
    "detect",
    "prepare",
    "scan",
    "sha256_file",
]


def describe_inputs(report: Report, model: Any, data: Any, labels: Any) -> None:
    """Record the paths and sha256 of the model, data and labels files (not of arrays or
    in-memory models) in the report."""
    if isinstance(model, (str, Path)):
        report.model |= {"path": str(model), "sha256": sha256_file(model)}
    if isinstance(data, (str, Path)):
        report.data |= {"path": str(data), "sha256": sha256_file(data)}
        if labels is not None:
            report.data["labels_sha256"] = sha256_file(labels)


def prepare(
    model: Any,
    *,
    layer: str | None = None,
    **model_options: Any,
) -> tuple[Adapter, OnnxExport]:
    """Load a model (path or object) through its adapter and export it with a features output."""
    if isinstance(model, (str, Path)):
        adapter = adapters.load(model, **model_options)
    elif isinstance(model, Adapter):  # already loaded (repair rescans its retrained adapter)
        adapter = model
    else:
        adapter = adapters.from_object(model, **model_options)
    return adapter, adapter.to_onnx(layer)


def scan(
    model: Any,
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
    *,
    data: str | Path | Dataset | None = None,
    labels: str | Path | None = None,
    x_key: str = "x",
    y_key: str = "y",
    layer: str | None = None,
    device: str = "auto",
    batch_size: int = 256,
    scale: float | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    config: DetectConfig | None = None,
    progress: Callable[[int], None] | None = None,
    on_extract_start: Callable[[int], None] | None = None,
    max_memory: int | None = None,
    exre: str | ExreConfig | None = None,
    **model_options: Any,
) -> Report:
    """Scan a model and its training data for backdoor poisoning; return the report.

    ``model`` is a path (ONNX, PyTorch, Keras) or an in-memory model; the data comes as arrays
    ``x``, ``y`` or as a file (``data``, optionally ``labels``). ``max_memory`` (bytes; default:
    the machine's memory) bounds the scan's arrays: a scan estimated to need more is refused
    before extraction (:class:`~backdoorscan.scanner.budget.MemoryBudgetError`).
    ``exre`` (``auto``, ``full``, ``probe``, ``both`` or an :class:`ExreConfig`) adds
    exclusionary reclassification of the suspicious clusters (see ``scanner/exre.py``).
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if isinstance(data, Dataset):
        ds = data
    elif data is not None:
        limit = max_memory if max_memory is not None else machine_memory()
        ds = load_data(data, labels, x_key=x_key, y_key=y_key, max_bytes=limit)
    elif x is not None and y is not None:
        ds = from_arrays(x, y)
    else:
        raise DataError("no data given: pass x and y, or a data file")
    # Formats that do not record their input (TorchScript, in-memory modules) take the data's.
    model_options.setdefault("input_shape", tuple(ds.x.shape[1:]))
    if ds.x.dtype in (np.int64, np.int32):
        model_options.setdefault("input_dtype", "int64")
    adapter, export = prepare(model, layer=layer, **model_options)
    timings["load"] = time.perf_counter() - t
    conform(
        ds,
        export.input_shape,
        export.input_dtype,
        export.num_classes,
        scale=scale,
        mean=mean,
        std=std,
    )
    cfg = config or DetectConfig()
    # Refused here, before the runtime allocates anything for a model that would not fit.
    check_memory(export, ds, batch_size=batch_size, config=cfg, max_memory=max_memory)
    t = time.perf_counter()
    if on_extract_start is not None:
        on_extract_start(len(ds))
    session = make_session(export, device, threads=cfg.n_jobs or None)
    # ONNX Runtime's thread pool and the BLAS library's would each take every core, and both
    # spin while they wait: interleaved (the input sketch between batches, the neighbour
    # searches between transfer probes) they starve each other, 2.4x slower on MNIST here
    # (benchmarks/RESULTS.md). The numpy work between model runs is small; one thread does it.
    with threadpool_limits(limits=1, user_api="blas"):
        acts: Activations = extract(
            export, ds, batch_size=batch_size, progress=progress, session=session, seed=cfg.seed
        )
        timings["extract"] = time.perf_counter() - t
        if int(ds.y.max()) >= acts.num_classes:
            raise DataError(
                f"labels go up to {int(ds.y.max())} but the model has {acts.num_classes} classes"
            )
        probe = None
        if acts.sketch is not None and "transfer" in cfg.rule:
            probe = TransferProbe(session, export, ds, acts.sketch, cfg, acts.predictions)
        report = detect(acts.features, ds.y, cfg, transfer=probe)
    timings.update(report.timings)
    report.timings = timings
    report.provider = acts.provider
    report.model = {
        "framework": adapter.framework,
        "layer": export.layer,
        "feature_dim": int(acts.features.shape[1]),
        "num_classes": acts.num_classes,
    }
    report.data |= {"source": ds.source, "n_samples": len(ds)}
    describe_inputs(report, model, data, labels)
    agree = float((acts.predictions == ds.y).mean())
    report.data["model_agreement"] = round(agree, 6)
    report.notes.extend(export.notes + ds.notes)
    if agree < 0.5:
        report.notes.append(
            f"the model predicts only {agree:.0%} of its training labels: is this the data it "
            "was trained on? Clusters and verdicts on a model that did not learn its data mean "
            "little"
        )
    if exre is not None:
        ecfg = exre if isinstance(exre, ExreConfig) else ExreConfig(method=exre, seed=cfg.seed)
        run_exre(
            report,
            ecfg,
            labels=ds.y,
            features=acts.features,
            sketch=acts.sketch,
            adapter=adapter,
            data=ds,
            num_classes=acts.num_classes,
        )
    return report
