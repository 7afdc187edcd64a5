"""The scan on Ray: ``scan(..., engine="ray")``, ``--engine ray``.

What runs where (:class:`RayRun` holds Ray up for one scan):

- **Extraction actors** (Ray Data ``map_batches`` over :class:`_Extractor`, ``concurrency``
  actors, one CPU each, one GPU each where the cluster has them and ``device`` allows): each
  builds one ONNX Runtime session from the export's bytes (sessions cannot be pickled; the
  export is an ONNX graph, never the model file), opens the data files itself (the driver
  sends only ``(start, stop)`` ranges) and returns the features, predicted classes and input
  sketch of its batches: through the object store when the scan's outputs are smaller than
  ``spill_above`` bytes, else written to a spill folder, one file per batch, that the driver
  gathers into memory-mapped arrays and deletes (the folder goes when the scan ends, on error
  or interrupt too).
- **Per-class tasks** (:func:`_class_task`, one CPU each) run
  :func:`~backdoorscan.scanner.detect.detect_class`, the local scan's own per-class analysis
  and kernels, on the class's rows; :func:`~backdoorscan.scanner.detect.detect` on the driver
  hands the classes out (its ``class_map``) and assembles the report.
- **Model actors** (:class:`_ModelActor`, one per node) serve the transfer test's model
  queries: each holds one session, the data, the input sketch and the
  :class:`~backdoorscan.scanner.transfer.TransferProbe` that the tasks call through
  :class:`RemoteProbe`. No process loads the model twice; the driver runs no session.
- **The driver** keeps the labels, the gathered features (it cuts them by class and takes the
  class medians), the predictions and the report.

The batches are the local engine's (``batch_size`` rows from sample 0), each projected with
the same seeded sketch, and every class is seeded as in the local scan, so the report equals
the single-machine scan's. Actors and tasks run outside the model worker's seccomp and
Landlock confinement: a model file is scanned on Ray only with ``trust_model`` (see
SECURITY.md). Ray is imported here only, inside functions: ``import backdoorscan`` never
imports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backdoorscan.adapters.base import OnnxExport
from backdoorscan.runtime import ExtractionError, _quiet_run, make_session, per_sample
from backdoorscan.scanner.config import DetectConfig
from backdoorscan.scanner.data import Dataset, from_arrays
from backdoorscan.scanner.detect import ClassOutcome, ClassWork, detect_class
from backdoorscan.scanner.extract import Activations
from backdoorscan.scanner.sketch import InputSketch
from backdoorscan.scanner.transfer import TransferProbe, TransferResult, Trigger

__all__ = ["RayEngineError", "RayRun", "RemoteProbe", "check_trusted", "data_spec", "ray_extract"]

# The extraction's outputs (features, predictions, sketch) of a scan at least this large go
# through a spill folder rather than Ray's object store.
SPILL_ABOVE = 1 << 30
# The most samples one extraction actor call runs (in the local engine's batches).
ROWS_PER_CALL = 32768
# Threads of the model actor: the class tasks' transfer queries it serves at once.
MODEL_ACTOR_THREADS = 4


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
    labels: list[str | None] = field(default_factory=list)  # each shard's .npy labels, or None
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
        else:
            from backdoorscan.scanner.shards import open_shards

            pairs = list(zip(self.paths, self.labels or [None] * len(self.paths), strict=True))
            ds = open_shards(pairs, x_key=self.x_key, y_key=self.y_key)
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
    data: list[str] = []
    labels: list[str | None] = []
    for src in dataset.sources:  # each shard's samples file, then its labels file if any
        if src.role == "data":
            data.append(str(src.path))
            labels.append(None)
        else:
            labels[-1] = str(src.path)
    return DataSpec(data, labels, x_key, y_key, conversion=conversion)


class _Extractor:
    """A Ray Data actor: one ONNX Runtime session and the data, opened once; each call runs
    the ``(start, stop)`` ranges of its batch and returns one row per sample, or when
    spilling writes them to one file of the spill folder and returns one row naming it."""

    def __init__(
        self, export: OnnxExport, spec: DataSpec, device: str, sketch: dict, spill: str | None
    ) -> None:
        self.export = export
        self.spill = spill
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
        if len(np.unique(result["classes"])) > 1:
            raise ExtractionError("the number of logits changed between batches")
        from backdoorscan.runtime import session_provider

        result["provider"] = np.array([session_provider(self.session)] * len(result["index"]))
        if self.spill is None:
            return result
        # Spilled: the rows go to a file; one row per batch travels, naming it.
        idx = result["index"]
        path = os.path.join(self.spill, f"rows-{int(idx[0]):012d}-{int(idx[-1]) + 1:012d}.npz")
        np.savez(path, **{k: result[k] for k in ("index", "features", "pred", "sketch")})
        return {
            "path": np.array([path]),
            "classes": result["classes"][:1],
            "provider": result["provider"][:1],
        }

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


class _ModelActor:
    """The transfer test's model queries for the per-class tasks: one session, the data and
    the input sketch, opened once; :class:`RemoteProbe` calls its methods."""

    def __init__(
        self,
        export: OnnxExport,
        spec: DataSpec,
        device: str,
        sketch: np.ndarray,
        predictions: np.ndarray,
        config: DetectConfig,
    ) -> None:
        self.session = make_session(export, device, threads=1)
        self.data = spec.open()
        self.probe = TransferProbe(self.session, export, self.data, sketch, config, predictions)

    def transfer(self, cluster: np.ndarray, label: int, seed: int) -> TransferResult:
        """The probe's transfer test of a cluster."""
        with _one_blas_thread():
            return self.probe(cluster, label, seed)

    def trigger(self, cluster: np.ndarray, seed: int) -> Trigger | None:
        """The probe's sharper trigger estimate."""
        with _one_blas_thread():
            return self.probe.trigger(cluster, seed)

    def trigger_scores(self, indices: np.ndarray, trigger: Trigger) -> np.ndarray:
        """How strongly each sample at ``indices`` carries ``trigger``."""
        with _one_blas_thread():
            return self.probe.trigger_scores(indices, trigger)


class RemoteProbe:
    """The transfer test for :func:`detect_class` in a Ray task (a
    :class:`~backdoorscan.scanner.detect.TransferTest`): each call is answered by one of the
    model actors, all alike (one per node), picked by the class's seed or the first sample."""

    def __init__(self, actors: Sequence[Any]) -> None:
        self.actors = list(actors)

    def _actor(self, key: int) -> Any:
        return self.actors[key % len(self.actors)]

    def __call__(self, indices: np.ndarray, label: int, seed: int) -> TransferResult:
        import ray

        return ray.get(self._actor(seed).transfer.remote(indices, label, seed))

    def trigger(self, indices: np.ndarray, seed: int) -> Trigger | None:
        """The cluster's shared perturbation, sharply estimated (None if there is none)."""
        import ray

        return ray.get(self._actor(seed).trigger.remote(indices, seed))

    def trigger_scores(self, indices: np.ndarray, trigger: Trigger) -> np.ndarray:
        """How strongly each sample at ``indices`` carries ``trigger``."""
        import ray

        key = int(indices[0]) if len(indices) else 0
        return ray.get(self._actor(key).trigger_scores.remote(indices, trigger))


def _one_blas_thread() -> Any:
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _class_task(work: ClassWork, label: int, indices: np.ndarray, features: np.ndarray) -> Any:
    """A Ray task: one class's analysis, as the local scan runs it."""
    with _one_blas_thread():
        return detect_class(work, label, indices, features)


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


class RayRun:
    """Ray, up for one scan: entered, Ray is initialised unless it already is (``address``: a
    cluster such as ``auto``; None: a local instance on this machine's cores); left (on error
    or interrupt too), the model actors are ended, Ray shut down if it was started here, and the
    spill folder removed.

    ``spill_dir``: where the spill folder is made (None: the system's temporary folder; on a
    cluster, a path every node sees); ``spill_above``: outputs of at least this many bytes are
    spilled (0: always; None: never).
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        device: str = "cpu",
        concurrency: int | None = None,
        spill_dir: str | Path | None = None,
        spill_above: int | None = SPILL_ABOVE,
    ) -> None:
        self.address = address
        self.device = device
        self.concurrency = concurrency
        self.spill_dir = spill_dir
        self.spill_above = spill_above
        self.ray: Any = None
        self.started = False
        self.folder: Path | None = None
        self._actors: list[Any] = []
        self._specs: dict[int, DataSpec] = {}

    def __enter__(self) -> RayRun:
        self.ray = _import_ray()
        if not self.ray.is_initialized():
            self.ray.init(
                address=self.address, include_dashboard=False, log_to_driver=False,
                configure_logging=False,
            )  # fmt: skip
            self.started = True
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for actor in self._actors:
                with contextlib.suppress(Exception):  # already gone
                    self.ray.kill(actor)
            self._actors.clear()
            if self.started:
                self.ray.shutdown()
                self.started = False
        finally:
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)
                self.folder = None

    def spec(self, dataset: Dataset, x_key: str = "x", y_key: str = "y") -> DataSpec:
        """The dataset's :class:`DataSpec` (its arrays put in the object store once)."""
        if id(dataset) not in self._specs:
            self._specs[id(dataset)] = data_spec(dataset, x_key, y_key)
        return self._specs[id(dataset)]

    def extract(
        self,
        export: OnnxExport,
        dataset: Dataset,
        *,
        batch_size: int = 256,
        x_key: str = "x",
        y_key: str = "y",
        sketch_dim: int = 64,
        seed: int = 0,
        progress: Callable[[int], None] | None = None,
    ) -> Activations:
        """Features, predictions and the input sketch from the extraction actors: the arrays
        :func:`~backdoorscan.scanner.extract.extract` gives for the same batches and seed."""
        if batch_size < 1:
            raise ExtractionError("--batch-size must be at least 1")
        n = len(dataset)
        spill = None
        row_bytes = 4 * ((export.feature_dim or 0) + sketch_dim) + 8
        if self.spill_above is not None and n * row_bytes >= self.spill_above:
            if self.folder is None:
                try:
                    made = tempfile.mkdtemp(prefix="backdoorscan-ray-", dir=self.spill_dir)
                except OSError as exc:
                    where = self.spill_dir or tempfile.gettempdir()
                    raise RayEngineError(
                        f"cannot make a spill folder in {where}: {exc.strerror or exc}"
                    ) from None
                self.folder = Path(made)
            spill = self.folder
        return _extract(
            self.ray, export, dataset, batch_size, self.device, self.concurrency,
            self.spec(dataset, x_key, y_key), sketch_dim, seed, progress, spill,
        )  # fmt: skip

    def probe(
        self,
        export: OnnxExport,
        dataset: Dataset,
        acts: Activations,
        config: DetectConfig,
        x_key: str = "x",
        y_key: str = "y",
    ) -> RemoteProbe:
        """The transfer test, served by model actors started here, one per node (spread), each
        with one session. They reserve no CPU: they work while the class tasks that call them
        wait."""
        ray = self.ray
        gpus = int(ray.cluster_resources().get("GPU", 0))
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        actor_class = ray.remote(
            num_cpus=0, num_gpus=1 if gpus and self.device != "cpu" else 0,
            max_concurrency=MODEL_ACTOR_THREADS, scheduling_strategy="SPREAD",
        )(_ModelActor)  # fmt: skip
        args = (
            export, self.spec(dataset, x_key, y_key), self.device,
            ray.put(np.asarray(acts.sketch)), ray.put(np.asarray(acts.predictions)), config,
        )  # fmt: skip
        actors = [actor_class.remote(*args) for _ in range(max(1, nodes))]
        self._actors.extend(actors)
        return RemoteProbe(actors)

    def class_map(
        self, work: ClassWork, features: np.ndarray, pairs: Sequence[tuple[int, np.ndarray]]
    ) -> Iterator[ClassOutcome]:
        """``detect(..., class_map=)``: each class a Ray task, at most two per CPU in flight
        (their rows in the object store), outcomes in class order."""
        ray = self.ray
        task = ray.remote(num_cpus=1)(_class_task)
        work_ref = ray.put(work)
        window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        pending: deque[Any] = deque()
        try:
            for label, idx in pairs:
                rows = np.ascontiguousarray(features[idx])
                pending.append(task.remote(work_ref, label, idx, rows))
                while len(pending) >= window:
                    yield self._outcome(pending.popleft())
            while pending:
                yield self._outcome(pending.popleft())
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def _outcome(self, ref: Any) -> ClassOutcome:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            raise RayEngineError(f"a per-class task failed on Ray: {_first_line(exc)}") from None


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
    spill_dir: str | Path | None = None,
    spill_above: int | None = SPILL_ABOVE,
) -> Activations:
    """The extraction alone on Ray (:meth:`RayRun.extract`), Ray started for it when it is not
    yet running."""
    with RayRun(
        address, device=device, concurrency=concurrency, spill_dir=spill_dir,
        spill_above=spill_above,
    ) as run:  # fmt: skip
        return run.extract(
            export, dataset, batch_size=batch_size, x_key=x_key, y_key=y_key,
            sketch_dim=sketch_dim, seed=seed, progress=progress,
        )  # fmt: skip


def _rows(batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """The per-sample columns of one output batch: as sent, or read back from (and then
    deleting) the spill files it names."""
    if "path" not in batch:
        yield batch
        return
    for path in batch["path"]:
        with np.load(str(path), allow_pickle=False) as z:
            part = {k: z[k] for k in ("index", "features", "pred", "sketch")}
        os.unlink(str(path))
        yield part


def _alloc(shape: tuple[int, int], spill: Path | None, name: str) -> np.ndarray:
    """A float32 array: in memory, or memory-mapped from a file of the spill folder that is
    unlinked at once (the mapping keeps it until the array goes)."""
    if spill is None:
        return np.empty(shape, dtype=np.float32)
    path = spill / f"{name}.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    os.unlink(path)
    return out


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
    spill: Path | None,
) -> Activations:
    n = len(dataset)
    ranges = [{"start": s, "stop": min(s + batch_size, n)} for s in range(0, n, batch_size)]
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = concurrency or max(1, min(cpus, len(ranges)))
    # Each actor call runs several of the local engine's batches (a block per call, about
    # eight per actor, at most ROWS_PER_CALL rows): one Ray Data task per batch costs more
    # than a small model's batch itself.
    per_call = -(-len(ranges) // (8 * actors))
    per_call = max(1, min(per_call, ROWS_PER_CALL // batch_size))
    num_gpus = 1 if gpus and device != "cpu" else 0
    items = ray.data.from_items(ranges, override_num_blocks=-(-len(ranges) // per_call))
    sketch_args = {"dim": sketch_dim, "seed": seed}
    mapped = items.map_batches(
        _Extractor,
        fn_constructor_args=(export, spec, device, sketch_args, spill and str(spill)),
        batch_size=per_call,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
        num_gpus=num_gpus,
    )
    features: np.ndarray | None = None
    predictions = np.empty(n, dtype=np.int64)
    sketch = _alloc((n, sketch_dim), spill, "sketch") if sketch_dim > 0 else None
    num_classes = 0
    provider = ""
    seen = np.zeros(n, dtype=bool)
    try:
        for batch in mapped.iter_batches(batch_size=None, batch_format="numpy"):
            classes = np.unique(batch["classes"])
            if len(classes) > 1 or (num_classes and int(classes[0]) != num_classes):
                raise ExtractionError("the number of logits changed between batches")
            num_classes = int(classes[0])
            provider = str(batch["provider"][0])
            for part in _rows(batch):
                idx, feats = part["index"], part["features"]
                if features is None:
                    features = _alloc((n, feats.shape[1]), spill, "features")
                elif feats.shape[1] != features.shape[1]:
                    raise ExtractionError("the feature size changed between batches")
                features[idx] = feats
                predictions[idx] = part["pred"]
                if sketch is not None:
                    sketch[idx] = part["sketch"]
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
