"""The scan pipeline, one step a function: load the data, prepare the model, run the scan.

``scan`` and ``repair`` both call these (repair runs :func:`run` twice: on the model as given
and on the repaired one, each time with the original training data)::

    dataset = load_dataset(data=..., options=run_options)
    prepared = prepare(model, dataset, model_options)
    report = run(prepared, dataset, run_options, detect_config)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from backdoorscan import adapters
from backdoorscan._io import sha256_file
from backdoorscan.adapters.base import Adapter, LayerInfo, OnnxExport
from backdoorscan.scanner.budget import ActivationSizes, check_memory, machine_memory
from backdoorscan.scanner.config import DetectConfig, ModelOptions, RunOptions, split_settings
from backdoorscan.scanner.data import (
    DataError,
    Dataset,
    check_input_file,
    conform,
    from_arrays,
    load_data,
    verify_unchanged,
)
from backdoorscan.scanner.detect import detect
from backdoorscan.scanner.exre import ExreConfig, run_exre
from backdoorscan.scanner.extract import Activations, extract, make_session
from backdoorscan.scanner.published import PublishedDataset, is_published, load_published
from backdoorscan.scanner.ray_engine import RayRun, check_trusted
from backdoorscan.scanner.report import Report
from backdoorscan.scanner.shards import is_glob, load_shards
from backdoorscan.scanner.transfer import TransferProbe

__all__ = ["Prepared", "Progress", "list_layers", "load_dataset", "prepare", "run", "scan"]


@dataclass
class Progress:
    """Callbacks for long work: ``start(total)`` before the pass over the data, ``step(n)``
    after each batch, ``classes(done, total)`` as the per-class analysis goes."""

    start: Callable[[int], None] | None = None
    step: Callable[[int], None] | None = None
    classes: Callable[[int, int], None] | None = None  # (classes done, classes in all)


@dataclass
class Prepared:
    """A model ready to scan: its ONNX export with a ``features`` output, and where it runs.

    A model file is loaded, exported and run in a confined worker process (``worker``; the
    scanner never parses it); an in-memory model, or a file with ``trust_model``, through its
    ``adapter`` in this process. ``source`` and ``sha256`` (taken before the file was read)
    name the file, None for an in-memory model. Use it as a context manager, or ``close()``
    it: that ends the worker.
    """

    export: OnnxExport
    adapter: Adapter | None = None
    worker: Any = None  # a backdoorscan.sandbox.ModelWorker
    source: Path | None = None
    sha256: str | None = None

    @property
    def framework(self) -> str:
        """The framework the model came from."""
        return self.adapter.framework if self.adapter is not None else self.export.framework

    @property
    def isolation(self) -> str:
        """How the model is isolated, in one line, for the report."""
        if self.worker is not None:
            status = self.worker.status
            return f"worker process: {status.summary()}" if status else "worker process"
        if self.source is not None:
            return "none: loaded in the scanner's process (--trust-model)"
        return "none: an in-memory model"

    def session(self, device: str, threads: int | None = None) -> Any:
        """An ONNX Runtime session (or the worker's proxy for one) running the export."""
        if self.worker is not None:
            return self.worker.session(self.export, device=device, threads=threads)
        return make_session(self.export, device, threads=threads)

    def close(self) -> None:
        """End the worker process, if there is one."""
        if self.worker is not None:
            self.worker.close()

    def __enter__(self) -> Prepared:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_dataset(
    data: str | Path | Dataset | None = None,
    labels: str | Path | None = None,
    *,
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
    options: RunOptions | None = None,
    model: Any = None,
) -> Dataset:
    """The training data, from a file (``.npz``, or ``.npy`` with ``labels``; a CSV, JSON Lines
    or Parquet table, or a folder of images, prepared for ``model``) or from arrays."""
    opts = options or RunOptions()
    if isinstance(data, Dataset):
        return data
    if data is not None:
        limit = opts.max_memory if opts.max_memory is not None else machine_memory()
        if labels is None and is_published(data):  # train.csv, images/CLASS/*.png
            return load_published(data, model, opts, max_bytes=limit)
        if labels is None and is_glob(data):  # several .npz shards: 'shards/train-*.npz'
            return load_shards(data, x_key=opts.x_key, y_key=opts.y_key, max_bytes=limit)
        files = _hashes(data=data, labels=labels)  # before the data is read, not after
        ds = load_data(data, labels, x_key=opts.x_key, y_key=opts.y_key, max_bytes=limit)
        ds.files = files
        return ds
    if x is not None and y is not None:
        return from_arrays(x, y)
    raise DataError("no data given: pass x and y, or a data file")


def prepare(
    model: Any,
    dataset: Dataset | None = None,
    options: ModelOptions | None = None,
    run_options: RunOptions | None = None,
    *,
    retrain: bool = False,
) -> Prepared:
    """Load a model (a path, an in-memory model or an adapter) and export it with features.

    A path is loaded in a confined worker process (``backdoorscan.sandbox``) unless
    ``run_options.trust_model`` is set. ``retrain`` (repair, ExRe 'full') also gives the
    prepared model an ``adapter`` that can be trained: a :class:`~backdoorscan.sandbox.remote.
    RemoteModel` kept in that worker, or the file's adapter here with ``trust_model``. Formats
    that do not record their input (TorchScript, in-memory modules) take the per-sample shape
    and dtype of ``dataset``.
    """
    opts = options or ModelOptions()
    ropts = run_options or RunOptions()
    kwargs = opts.loader_kwargs()
    if dataset is not None:
        if None not in dataset.x.shape[1:]:  # an image folder's size may wait for the model
            kwargs.setdefault("input_shape", tuple(dataset.x.shape[1:]))
        if dataset.x.dtype in (np.int64, np.int32):
            kwargs.setdefault("input_dtype", "int64")
        pad = getattr(dataset, "pad_id", None)
        if pad is not None and isinstance(model, (str, Path)) and Path(model).is_dir():
            kwargs.setdefault("pad_token_id", int(pad))  # the mask is ids != the tokenizer's pad
    if isinstance(model, Adapter):
        return Prepared(model.to_onnx(opts.layer), model)
    if not isinstance(model, (str, Path)):
        adapter = adapters.from_object(model, **kwargs)
        return Prepared(adapter.to_onnx(opts.layer), adapter)
    source = Path(model)
    sha = sha256_file(source) if source.is_file() else None  # before it is parsed
    from backdoorscan.scanner.scanlog import status

    status(f"loading {source.name} and exporting it to ONNX with its features...")
    if ropts.trust_model:
        adapter = adapters.load(source, **kwargs)
        return Prepared(adapter.to_onnx(opts.layer), adapter, None, source, sha)
    from backdoorscan.sandbox import export_cached
    from backdoorscan.sandbox.remote import load_remote

    worker = open_worker(source, ropts)
    try:
        export = export_cached(worker, source, opts.layer, **kwargs)
        remote = load_remote(worker, source, **kwargs) if retrain else None
    except BaseException:
        worker.close()
        raise
    return Prepared(export, remote, worker, source, sha)


def list_layers(
    model: str | Path, options: ModelOptions | None = None, run_options: RunOptions | None = None
) -> list[LayerInfo]:
    """The hidden layers of a model file that can be clustered (the default marked), read in
    a worker process unless ``run_options.trust_model``."""
    kwargs = (options or ModelOptions()).loader_kwargs()
    ropts = run_options or RunOptions()
    if ropts.trust_model:
        return adapters.load(model, **kwargs).layers()
    worker = open_worker(Path(model), ropts)
    try:
        return worker.layers(model, **kwargs)
    finally:
        worker.close()


def open_worker(source: Path, options: RunOptions) -> Any:
    """A started worker process for the model file ``source``: memory bounded by
    ``options.max_memory``, each request by ``options.timeout``, reading only the model's
    folder (and an --arch module's, which the worker finds on ``sys.path``)."""
    from backdoorscan.sandbox import Limits, ModelWorker

    limits = Limits(
        max_memory=options.max_memory,
        timeout=options.timeout,
        allow_read=[source.resolve().parent],
    )
    worker = ModelWorker(limits)
    worker.start()
    return worker


def run(
    prepared: Prepared,
    dataset: Dataset,
    options: RunOptions | None = None,
    config: DetectConfig | None = None,
    *,
    exre: ExreConfig | None = None,
    progress: Progress | None = None,
) -> Report:
    """Scan a prepared model with its training data: extraction, clustering, the transfer test,
    ExRe if asked; return the report."""
    opts = options or RunOptions()
    cfg = config or DetectConfig()
    export = prepared.export
    timings: dict[str, float] = {}
    norm = dict(opts.normalisation)
    if isinstance(dataset, PublishedDataset):
        dataset.fit_size(export.input_shape)
        # The data's own preprocessing (a model folder's, or /255 for images) where the
        # command line gives none.
        norm = {k: v if v is not None else dataset.normalisation.get(k) for k, v in norm.items()}
    conform(dataset, export.input_shape, export.input_dtype, export.num_classes, **norm)
    # Refused here, before the runtime allocates anything for a model that would not fit. A
    # model in a worker is not parsed here: its memory is bounded in its own process.
    sizes = ActivationSizes(feature_dim=export.feature_dim) if prepared.worker else None
    check_memory(
        export, dataset, batch_size=opts.batch_size, config=cfg, max_memory=opts.max_memory,
        sizes=sizes,
    )  # fmt: skip
    t = time.perf_counter()
    if progress is not None and progress.start is not None:
        progress.start(len(dataset))
    on_ray = None  # Ray runs the extraction, the classes and the model's transfer queries
    if opts.engine == "ray":
        check_trusted(prepared.source if prepared.worker else None, opts.trust_model)
        on_ray = RayRun(
            opts.ray_address, device=opts.device, concurrency=opts.ray_concurrency,
            spill_dir=opts.ray_spill_dir, spill_above=opts.ray_spill_above,
        )  # fmt: skip
    session = None if on_ray else prepared.session(opts.device, threads=cfg.n_jobs or None)
    # ONNX Runtime's thread pool and the BLAS library's would each take every core, and both
    # spin while they wait: interleaved (the input sketch between batches, the neighbour
    # searches between transfer probes) they starve each other, 2.4x slower on MNIST here
    # (benchmarks/RESULTS.md). The numpy work between model runs is small; one thread does it.
    with on_ray or nullcontext(), threadpool_limits(limits=1, user_api="blas"):
        step = progress.step if progress is not None else None
        if on_ray is not None:
            acts: Activations = on_ray.extract(
                export, dataset, batch_size=opts.batch_size, x_key=opts.x_key, y_key=opts.y_key,
                seed=cfg.seed, progress=step,
            )  # fmt: skip
        else:
            acts = extract(
                export, dataset, batch_size=opts.batch_size, progress=step, session=session,
                seed=cfg.seed,
            )  # fmt: skip
        timings["extract"] = time.perf_counter() - t
        if int(dataset.y.max()) >= acts.num_classes:
            raise DataError(
                f"labels go up to {int(dataset.y.max())} but the model has "
                f"{acts.num_classes} classes"
            )
        probe: Any = None
        if acts.sketch is not None and "transfer" in cfg.rule and on_ray is not None:
            probe = on_ray.probe(export, dataset, acts, cfg, opts.x_key, opts.y_key)
        elif acts.sketch is not None and "transfer" in cfg.rule:
            probe = TransferProbe(session, export, dataset, acts.sketch, cfg, acts.predictions)
        report = detect(
            acts.features,
            dataset.y,
            cfg,
            transfer=probe,
            progress=progress.classes if progress is not None else None,
            class_map=on_ray.class_map if on_ray is not None else None,
        )
    timings.update(report.timings)
    report.timings = timings
    report.provider = acts.provider
    report.samples = dataset.x  # as given, for the HTML report's mosaics
    report.model = {
        "framework": prepared.framework,
        "isolation": prepared.isolation,
        "layer": export.layer,
        "feature_dim": int(acts.features.shape[1]),
        "num_classes": acts.num_classes,
    }
    if prepared.source is not None:
        report.model |= {"path": str(prepared.source), "sha256": prepared.sha256}
    report.data |= {"source": dataset.source, "n_samples": len(dataset), **dataset.files}
    agree = float((acts.predictions == dataset.y).mean())
    report.data["model_agreement"] = round(agree, 6)
    report.notes.extend(export.notes + dataset.notes)
    if agree < cfg.min_agreement:
        report.not_meaningful = (
            f"the model predicts only {agree:.0%} of the training labels given (less than "
            f"--min-agreement {cfg.min_agreement:g}): is this the data it was trained on? "
            "Clusters of a model that did not learn its data say nothing about poison"
        )
    # The data scanned must be the data hashed: a file replaced or edited during the scan is an
    # error, not a report about other bytes.
    verify_unchanged(dataset)
    if isinstance(dataset, PublishedDataset):
        dataset.verify()
        report.data |= dataset.describe(report.flagged_indices)
    if exre is not None:
        from backdoorscan.scanner.scanlog import status

        status(f"ExRe ({exre.method}): reclassifying the candidate clusters...")
        run_exre(
            report,
            exre,
            labels=dataset.y,
            features=acts.features,
            sketch=acts.sketch,
            adapter=prepared.adapter,
            data=dataset,
            num_classes=acts.num_classes,
        )
    from backdoorscan.scanner.scanlog import log_scan

    log_scan(report)  # what each step decided, as log lines (--verbose)
    return report


def scan(
    model: Any,
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
    *,
    data: str | Path | Dataset | None = None,
    labels: str | Path | None = None,
    options: RunOptions | None = None,
    model_options: ModelOptions | None = None,
    config: DetectConfig | None = None,
    exre: str | ExreConfig | None = None,
    progress: Progress | None = None,
    **settings: Any,
) -> Report:
    """Scan a model and its training data for backdoor poisoning; return the report.

    ``model`` is a path (ONNX, PyTorch, Keras), an in-memory model or an adapter; the data
    comes as arrays ``x``, ``y`` or as a file (``data``, optionally ``labels``). Any field of
    :class:`RunOptions` (``device``, ``batch_size``, ``max_memory``, ...), :class:`ModelOptions`
    (``layer``, ``arch``, ``input_shape``, ...) or :class:`DetectConfig` (``seed``, ``rule``,
    ``n_jobs``, ...) may be given by name; an unknown name raises ``TypeError``. ``exre``
    (``auto``, ``full``, ``probe``, ``both`` or an :class:`ExreConfig`) adds exclusionary
    reclassification of the suspicious clusters.
    """
    opts, mopts, cfg = split_settings("scan", settings, options, model_options, config)
    t = time.perf_counter()
    ecfg = exre_config(exre, cfg.seed)
    if opts.engine == "ray":  # refused before the data or the model is read
        check_trusted(model, opts.trust_model)
        if isinstance(data, (str, Path)) and is_published(data):
            raise DataError(
                "--engine ray reads .npz data (one file or a glob of shards); scan a table or "
                "an image folder with the local engine"
            )
    dataset = load_dataset(data, labels, x=x, y=y, options=opts, model=model)
    # ExRe 'full' retrains the model: in its worker, or here with trust_model.
    retrain = ecfg is not None and ecfg.method in ("full", "both")
    try:
        with prepare(model, dataset, mopts, opts, retrain=retrain) as prepared:
            load_s = time.perf_counter() - t
            report = run(prepared, dataset, opts, cfg, exre=ecfg, progress=progress)
    finally:
        dataset.close()
    report.timings = {"load": load_s, **report.timings}
    return report


def exre_config(exre: str | ExreConfig | None, seed: int) -> ExreConfig | None:
    """An ExreConfig from a method name (seeded like the scan), or as given."""
    if exre is None or isinstance(exre, ExreConfig):
        return exre
    return ExreConfig(method=exre, seed=seed)


def _hashes(*, data: str | Path, labels: str | Path | None) -> dict[str, str]:
    """Path and sha256 of the data (and labels) file, for the report; anything but a regular
    file (a FIFO or a device would never end) is refused first, in one line."""
    out = {"path": str(data), "sha256": sha256_file(check_input_file(data, "data"))}
    if labels is not None:
        out["labels_sha256"] = sha256_file(check_input_file(labels, "labels"))
    return out
