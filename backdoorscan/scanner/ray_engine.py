"""The extraction pass on Ray: ``scan(..., engine="ray")``, ``--engine ray``.

What runs where:

- **Ray actors** (Ray Data ``map_batches`` over :class:`_Extractor`, ``concurrency`` actors,
  one CPU each, one GPU each where the cluster has them and ``device`` allows): each builds
  one ONNX Runtime session from the export's bytes (sessions cannot be pickled; the export is
  an ONNX graph, never the model file), opens the data files itself (no central copy of the
  samples: the driver sends only ``(start, stop)`` ranges) and returns features, predicted
  classes and the input sketch of its batches.
- **The driver** (this process) gathers them into arrays in the global sample order, then
  runs the per-class detection and the transfer test's model queries locally, on a session of
  the same export (:func:`backdoorscan.scanner.pipeline.run`).

The batches are the local engine's (``batch_size`` rows from sample 0), each projected with
the same seeded sketch, so the features, and hence the report, equal the single-machine
scan's. The actors run outside the model worker's seccomp and Landlock confinement: a model
file is scanned on Ray only with ``trust_model`` (see SECURITY.md). Ray is imported here
only, inside functions: ``import backdoorscan`` never imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backdoorscan.adapters.base import OnnxExport
from backdoorscan.runtime import ExtractionError, _quiet_run, make_session, per_sample
from backdoorscan.scanner.data import Dataset, from_arrays, load_data
from backdoorscan.scanner.extract import Activations
from backdoorscan.scanner.sketch import InputSketch

__all__ = ["RayEngineError", "check_trusted", "data_spec", "ray_extract"]


class RayEngineError(ExtractionError):
    """The Ray engine cannot run this scan (Ray missing, an untrusted model file, a failure)."""


TRUST_MESSAGE = (
    "--engine ray runs the model's ONNX export in Ray actors, outside the model worker's "
    "confinement: pass --trust-model (only for a model you trust), or scan an in-memory model"
)


def check_trusted(model: Any, trust_model: bool) -> None:
    """Refuse a model file without ``trust_model`` before anything loads it (one line)."""
    if isinstance(model, (str, Path)) and not trust_model:
        raise RayEngineError(TRUST_MESSAGE)


@dataclass
class DataSpec:
    """How an actor opens the data itself: the files (or arrays put in the object store) and
    the per-batch conversion :func:`conform` set on the driver's dataset."""

    paths: list[str] = field(default_factory=list)
    labels: str | None = None
    x_key: str = "x"
    y_key: str = "y"
    arrays: Any = None  # (x, y) object references, for in-memory data
    conversion: dict[str, Any] = field(default_factory=dict)

    def open(self) -> Dataset:
        """The dataset, opened in this process, with the driver's conversion."""
        if self.arrays is not None:
            import ray

            x, y = (ray.get(r) if isinstance(r, ray.ObjectRef) else r for r in self.arrays)
            ds = from_arrays(x, y)
        elif self.labels is not None:
            ds = load_data(self.paths[0], self.labels)
        else:
            from backdoorscan.scanner.shards import open_shards

            ds = open_shards(self.paths, x_key=self.x_key, y_key=self.y_key)
        for name, value in self.conversion.items():
            setattr(ds, name, value)
        return ds


def data_spec(dataset: Dataset, x_key: str = "x", y_key: str = "y") -> DataSpec:
    """The :class:`DataSpec` of a conformed dataset: its files, or its arrays put in Ray's
    object store (call with Ray initialised)."""
    conversion = {
        name: getattr(dataset, name) for name in ("scale", "mean", "std", "dtype", "layout")
    }
    if not dataset.sources:
        import ray

        return DataSpec(arrays=(ray.put(dataset.x), ray.put(dataset.y)), conversion=conversion)
    data = [str(s.path) for s in dataset.sources if s.role == "data"]
    labels = next((str(s.path) for s in dataset.sources if s.role == "labels"), None)
    return DataSpec(data, labels, x_key, y_key, conversion=conversion)


class _Extractor:
    """A Ray Data actor: one ONNX Runtime session and the data, opened once; each call runs
    the ``(start, stop)`` ranges of its batch and returns one row per sample."""

    def __init__(self, export: OnnxExport, spec: DataSpec, device: str, sketch: dict) -> None:
        self.export = export
        self.session = make_session(export, device, threads=1)
        self.data = spec.open()
        self.sketch_dim = int(sketch["dim"])
        tokens = np.issubdtype(np.dtype(self.data.dtype), np.integer)
        self.sketch = InputSketch(0, self.sketch_dim, seed=sketch["seed"], tokens=tokens)
        self.run_options = _quiet_run()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from threadpoolctl import threadpool_limits

        out: dict[str, list[np.ndarray]] = {k: [] for k in ("index", "features", "pred")}
        out |= {"sketch": [], "classes": []}
        with threadpool_limits(limits=1, user_api="blas"):  # as the local engine does
            for start, stop in zip(batch["start"], batch["stop"], strict=True):
                self._run(int(start), int(stop), out)
        result = {k: np.concatenate(v) for k, v in out.items()}
        from backdoorscan.runtime import session_provider

        result["provider"] = np.array([session_provider(self.session)] * len(result["index"]))
        return result

    def _run(self, start: int, stop: int, out: dict[str, list[np.ndarray]]) -> None:
        """One batch, checked as :func:`backdoorscan.scanner.extract.extract` checks it."""
        export = self.export
        xb = self.data.batch(start, stop)
        try:
            logits, feats = self.session.run(
                [export.logits_name, export.features_name], {export.input_name: xb},
                self.run_options,
            )  # fmt: skip
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExtractionError(f"the model failed on samples {start}..: {first}") from None
        feats = per_sample(feats, len(xb), "features", start)
        if not np.isfinite(feats).all():
            raise ExtractionError("the model produced NaN or Inf activations on this data")
        logits = per_sample(logits, len(xb), "logits", start)
        out["index"].append(np.arange(start, stop, dtype=np.int64))
        out["features"].append(np.asarray(feats, dtype=np.float32))
        out["pred"].append(logits.argmax(axis=1).astype(np.int64))
        out["classes"].append(np.full(len(xb), logits.shape[1], dtype=np.int64))
        if self.sketch_dim > 0:
            self.sketch.matrix = np.empty((len(xb), self.sketch_dim), dtype=np.float32)
            self.sketch.add(0, xb)
            out["sketch"].append(self.sketch.matrix)
        else:
            out["sketch"].append(np.zeros((len(xb), 1), dtype=np.float32))


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise RayEngineError(
            'engine "ray" needs Ray Data: pip install "backdoorscan[ray]"'
        ) from None
    return ray


def _first_line(exc: BaseException) -> str:
    """The cause of an error raised in an actor (Ray wraps it in its own exception)."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(" ")]
    return lines[-1] if lines else type(cause).__name__


def ray_extract(
    export: OnnxExport,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str = "cpu",
    address: str | None = None,
    concurrency: int | None = None,
    x_key: str = "x",
    y_key: str = "y",
    sketch_dim: int = 64,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Activations:
    """Extract features, predictions and the input sketch on Ray; the same arrays as
    :func:`backdoorscan.scanner.extract.extract` gives for the same batches and seed.

    Ray is initialised here when it is not yet (``address``: a cluster, None: a local
    instance on this machine's cores), and shut down again after if it was started here.
    """
    if batch_size < 1:
        raise ExtractionError("--batch-size must be at least 1")
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(
            address=address, include_dashboard=False, log_to_driver=False,
            configure_logging=False,
        )  # fmt: skip
    try:
        return _extract(
            ray, export, dataset, batch_size, device, concurrency, data_spec(dataset, x_key, y_key),
            sketch_dim, seed, progress,
        )  # fmt: skip
    finally:
        if started:
            ray.shutdown()


def _extract(
    ray: Any,
    export: OnnxExport,
    dataset: Dataset,
    batch_size: int,
    device: str,
    concurrency: int | None,
    spec: DataSpec,
    sketch_dim: int,
    seed: int,
    progress: Callable[[int], None] | None,
) -> Activations:
    n = len(dataset)
    ranges = [{"start": s, "stop": min(s + batch_size, n)} for s in range(0, n, batch_size)]
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = concurrency or max(1, min(cpus, len(ranges)))
    num_gpus = 1 if gpus and device != "cpu" else 0
    items = ray.data.from_items(ranges, override_num_blocks=len(ranges))
    mapped = items.map_batches(
        _Extractor,
        fn_constructor_args=(export, spec, device, {"dim": sketch_dim, "seed": seed}),
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
        num_gpus=num_gpus,
    )
    features: np.ndarray | None = None
    predictions = np.empty(n, dtype=np.int64)
    sketch = np.empty((n, sketch_dim), dtype=np.float32) if sketch_dim > 0 else None
    num_classes = 0
    provider = ""
    seen = np.zeros(n, dtype=bool)
    try:
        for batch in mapped.iter_batches(batch_size=None, batch_format="numpy"):
            idx = batch["index"]
            feats = batch["features"]
            if features is None:
                features = np.empty((n, feats.shape[1]), dtype=np.float32)
            elif feats.shape[1] != features.shape[1]:
                raise ExtractionError("the feature size changed between batches")
            classes = np.unique(batch["classes"])
            if len(classes) > 1 or (num_classes and int(classes[0]) != num_classes):
                raise ExtractionError("the number of logits changed between batches")
            num_classes = int(classes[0])
            features[idx] = feats
            predictions[idx] = batch["pred"]
            if sketch is not None:
                sketch[idx] = batch["sketch"]
            provider = str(batch["provider"][0])
            seen[idx] = True
            if progress is not None:
                progress(len(idx))
    except ExtractionError:
        raise
    except Exception as exc:  # an actor's error comes wrapped in Ray's exception types
        raise RayEngineError(f"the Ray extraction failed: {_first_line(exc)}") from None
    if features is None or not seen.all():
        raise RayEngineError(f"the Ray extraction returned {int(seen.sum())} of {n} samples")
    return Activations(features, predictions, provider, export.layer, num_classes, sketch)
