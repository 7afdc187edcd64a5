"""Repair: relabel (or drop) the samples a scan flagged, retrain until the attack is gone, and
prove it by scanning the repaired model with the original training data.

``relabel`` (the paper's choice) gives each flagged sample its suspected source label and
continues training from the current weights, so that the model unlearns trigger -> target;
``remove`` drops the flagged samples instead. Which label a flagged sample gets:

- its class's suspected source (from ExRe where it confirmed the class, else from the transfer
  test), when one class dominates the cluster;
- where ExRe ``full`` ran and the poison came from many sources (the transfer test's trigger
  sends at least half of the other classes to this one, as in all-to-one attacks; without the
  transfer test, no class takes half of ExRe's answers), the label that the model retrained
  without the cluster gives that very sample;
- removal, for samples of a class with no suspected source, and, in the per-sample case, for
  samples that the excluding model still calls by their own label.

Retraining runs one epoch at a time, up to ``epochs``, and stops as soon as the attack success
rate is below ``max_asr`` with clean accuracy at most ``max_acc_drop`` below the original's and
the repaired model, scanned with the ORIGINAL training data, shows no poison. Attack success is
measured on ``trigger_test`` (the share of triggered samples not predicted as their true label)
or, without one, on held-out samples of the suspected source stamped with the trigger the scan
estimated (the share sent to the poisoned class: the estimate is not the exact trigger, and a
perturbation may confuse a model without being a backdoor); clean accuracy on ``test`` or on
the held-out samples. The rescan uses the original data because the relabelled data would hide
the backdoor from the scan (the poison no longer carries its target label), and it catches a
trigger that still works from a class the trigger test does not hold. A repair that does not
get there within its budget says "repair failed", keeps the best model it found, and exits 1.

A model whose framework cannot train (a bare ONNX file) is not retrained: the relabelled (or
reduced) data set is written instead, for the user to retrain with.
"""

from __future__ import annotations

import dataclasses
import io
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from backdoorscan._io import atomic_write_bytes
from backdoorscan.adapters.base import Adapter, OnnxExport, Retrainable
from backdoorscan.scanner.attack import yardstick
from backdoorscan.scanner.config import DetectConfig, ModelOptions, RunOptions, split_settings
from backdoorscan.scanner.data import Dataset, conform
from backdoorscan.scanner.exre import ExreConfig
from backdoorscan.scanner.pipeline import Prepared, exre_config, load_dataset, prepare, run
from backdoorscan.scanner.report import (
    EXIT_CLEAN,
    EXIT_FOUND,
    EXIT_NOTHING,
    RepairResult,
    Report,
)
from backdoorscan.scanner.scanlog import log_epoch, status

__all__ = ["STRATEGIES", "RepairConfig", "RepairPlan", "exit_code", "plan_repair", "repair"]

STRATEGIES = ("relabel", "remove")
# Below this share of a cluster for its top other class, ExRe's per-sample answers are used.
SINGLE_SOURCE_SHARE = 0.5
# Held-out samples (kept out of retraining) where no test set is given: this share of the
# clean samples, at least MIN_HOLDOUT (or a quarter of them), at most MAX_HOLDOUT.
MIN_HOLDOUT, MAX_HOLDOUT = 300, 2000


@dataclass
class RepairConfig:
    """How repair retrains and when it is done.

    ``epochs`` is the budget: retraining stops at the first epoch after which the attack
    success rate is below ``max_asr`` and clean accuracy is at most ``max_acc_drop`` below the
    original model's. ``holdout`` is the share of clean samples kept out of retraining to
    measure on when no test set is given.
    """

    strategy: str = "relabel"
    epochs: int = 20
    lr: float = 1e-3
    train_batch_size: int = 128
    max_asr: float = 0.05
    max_acc_drop: float = 0.01
    holdout: float = 0.1

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}"
            )
        if self.epochs < 1:
            raise ValueError("repair needs at least one epoch of retraining")
        if not 0 <= self.max_asr <= 1 or not 0 <= self.max_acc_drop <= 1:
            raise ValueError("max_asr and max_acc_drop must lie between 0 and 1")
        if not 0 < self.holdout < 0.5:
            raise ValueError("holdout must lie between 0 and 0.5")


@dataclass
class RepairPlan:
    """New labels for the data set (-1: removed) and what changed, per poisoned class."""

    original: np.ndarray
    labels: np.ndarray
    per_class: dict[int, dict[str, Any]]
    notes: list[str]

    @property
    def keep(self) -> np.ndarray:
        """Mask of the samples kept for retraining."""
        return self.labels >= 0

    @property
    def changed(self) -> np.ndarray:
        """Indices of the samples relabelled."""
        return np.flatnonzero(self.keep & (self.labels != self.original))

    @property
    def removed(self) -> np.ndarray:
        """Indices of the samples removed."""
        return np.flatnonzero(~self.keep)


def plan_repair(report: Report, labels: np.ndarray, strategy: str = "relabel") -> RepairPlan:
    """New labels for the data set (-1: removed) and what changed, per poisoned class."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    labels = np.asarray(labels)
    new = labels.copy()
    flagged = report.is_flagged()
    per_class: dict[int, dict[str, Any]] = {}
    notes: list[str] = []
    preds = report.exre.predictions if report.exre is not None else None
    for c in report.classes:
        if c.verdict != "poisoned":
            continue
        idx = np.flatnonzero(flagged & (labels == c.label))
        row: dict[str, Any] = {"flagged": len(idx), "relabelled": 0, "removed": 0}
        if strategy == "remove":
            new[idx] = -1
            row |= {"removed": len(idx), "how": "removed"}
            per_class[c.label] = row
            continue
        full = (c.exre or {}).get("full")
        # Many sources: the transfer test's trigger sends most other classes to this one
        # (an all-to-one attack; a trigger learnt from one source often works on a few
        # more); without the transfer test, ExRe full's answers are spread.
        if c.transfer_sources:
            many = len(c.transfer_sources) >= max(2, (len(report.classes) - 1) / 2)
        else:
            many = full is None or full.source_share < SINGLE_SOURCE_SHARE
        if preds is not None and full is not None and full.verdict == "poison" and many:
            target = preds[idx]
            bad = (target < 0) | (target == c.label)
            new[idx] = np.where(bad, -1, target)
            row |= {
                "relabelled": int((~bad).sum()),
                "removed": int(bad.sum()),
                "how": "per sample, from the model retrained without the cluster (ExRe full)",
                "to": _counts(target[~bad]),
            }
        elif c.suspected_source is not None:
            new[idx] = c.suspected_source
            row |= {
                "relabelled": len(idx),
                "how": "to the suspected source",
                "to": {int(c.suspected_source): len(idx)},
            }
        else:
            new[idx] = -1
            row |= {"removed": len(idx), "how": "removed: no suspected source"}
            notes.append(
                f"class {c.label} has no suspected source: its {len(idx)} flagged samples "
                "were removed instead of relabelled"
            )
        per_class[c.label] = row
    return RepairPlan(labels, new, per_class, notes)


def _counts(values: np.ndarray) -> dict[int, int]:
    keys, counts = np.unique(values, return_counts=True)
    return {int(k): int(n) for k, n in zip(keys, counts, strict=True)}


def exit_code(report: Report) -> int:
    """Exit code of ``repair``: 0 when the attack is gone and the rescan of the original data
    is clean (or a bare ONNX model's cleaned data set was written), 1 when the repair failed
    or a backdoor is still found, 3 when nothing was scanned."""
    info = report.repair
    if info is None:
        return report.exit_code
    if info.mode == "data":
        return EXIT_CLEAN
    if info.mode == "nothing scanned":
        return EXIT_NOTHING
    if info.mode == "failed":
        return EXIT_FOUND
    return report.exit_code


def _write_data(path: Path, ds: Dataset, plan: RepairPlan) -> Path:
    index = np.flatnonzero(plan.keep)
    buf = io.BytesIO()
    np.savez(
        buf,
        x=np.asarray(ds.x[index]),
        y=plan.labels[index].astype(np.int64),
        changed=plan.changed.astype(np.int64),
        removed=plan.removed.astype(np.int64),
        original_index=index.astype(np.int64),
    )
    return atomic_write_bytes(path, buf.getvalue())


def repair(
    model: Any,
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
    *,
    output: str | Path,
    data: str | Path | Dataset | None = None,
    labels: str | Path | None = None,
    report: Report | None = None,
    exre: str | ExreConfig | None = None,
    test: str | Path | Dataset | None = None,
    trigger_test: str | Path | Dataset | None = None,
    data_output: str | Path | None = None,
    options: RunOptions | None = None,
    model_options: ModelOptions | None = None,
    config: DetectConfig | None = None,
    repair_config: RepairConfig | None = None,
    **settings: Any,
) -> Report:
    """Scan (unless ``report`` is given), relabel or remove the flagged samples, retrain from
    the current weights until the attack is gone or the budget is spent, save the model (own
    format and ``<output stem>.onnx``), and scan it again with the original training data.

    Settings may be given by name as in :func:`~backdoorscan.scanner.pipeline.scan`, plus the
    fields of :class:`RepairConfig` (``strategy``, ``epochs``, ``lr``, ``train_batch_size``,
    ``max_asr``, ``max_acc_drop``, ``holdout``); an unknown name raises ``TypeError``.
    Returns the rescan's report with a ``repair`` section (``RepairResult``). A model that
    cannot be trained gets its cleaned data set written to ``output`` (``.npz``: x, y, changed,
    removed, original_index) instead.
    """
    names = {f.name for f in fields(RepairConfig)}
    rcfg = repair_config or RepairConfig()
    mine = {k: settings.pop(k) for k in list(settings) if k in names}
    if mine:
        rcfg = dataclasses.replace(rcfg, **mine)
    opts, mopts, cfg = split_settings("repair", settings, options, model_options, config)
    t0 = time.perf_counter()
    output = Path(output)
    for target in (output, Path(data_output) if data_output is not None else None):
        if target is not None and not (target.parent if str(target.parent) else Path(".")).is_dir():
            raise FileNotFoundError(f"output folder does not exist: {target.parent}")
    if report is not None and report.verdict != "backdoor":
        return _nothing_to_do(report, rcfg.strategy)
    dataset = load_dataset(data, labels, x=x, y=y, options=opts)
    # A model file is retrained in its worker (with --trust-model here); a bare ONNX model
    # cannot be retrained: its cleaned data set is written instead.
    onnx_file = isinstance(model, (str, Path)) and Path(model).suffix.lower() == ".onnx"
    try:
        with prepare(model, dataset, mopts, opts, retrain=not onnx_file) as prepared:
            return _repair(
                prepared, model, dataset, output, report, exre, test, trigger_test,
                data_output, opts, mopts, cfg, rcfg, t0,
            )  # fmt: skip
    finally:
        dataset.close()


def _repair(
    prepared: Prepared,
    model: Any,
    dataset: Dataset,
    output: Path,
    report: Report | None,
    exre: str | ExreConfig | None,
    test: str | Path | Dataset | None,
    trigger_test: str | Path | Dataset | None,
    data_output: str | Path | None,
    opts: RunOptions,
    mopts: ModelOptions,
    cfg: DetectConfig,
    rcfg: RepairConfig,
    t0: float,
) -> Report:
    """The repair itself, on a prepared model (see :func:`repair`)."""
    adapter = prepared.adapter
    trainable = adapter is not None and adapter.can_fit and isinstance(adapter, Retrainable)
    if trainable and output.suffix.lower() in (".onnx", ".npz"):
        raise ValueError(
            f"-o names the repaired {prepared.framework} model in its own format (e.g. "
            f"repaired.pt); the ONNX copy is written beside it, got {output.name}"
        )
    if report is None:
        report = run(prepared, dataset, opts, cfg, exre=exre_config(exre, cfg.seed))
    else:
        export = prepared.export
        conform(
            dataset, export.input_shape, export.input_dtype, export.num_classes,
            **opts.normalisation,
        )  # fmt: skip
    if report.verdict != "backdoor":
        return _nothing_to_do(report, rcfg.strategy)
    plan = plan_repair(report, dataset.y, rcfg.strategy)
    result = RepairResult(
        strategy=rcfg.strategy,
        mode="retrained",
        summary="",
        before=report.to_dict(include_scores=False),
        n_relabelled=len(plan.changed),
        n_removed=len(plan.removed),
        per_class=plan.per_class,
        settings=dataclasses.asdict(rcfg),
        notes=list(plan.notes),
    )
    change = f"{result.n_relabelled} samples relabelled, {result.n_removed} removed"
    if not trainable:
        return _write_cleaned(report, result, dataset, plan, output, prepared, change, rcfg)
    if not isinstance(model, (str, Path, Adapter)):
        adapter = adapter.clone()  # the caller's in-memory model is left as it was
    assert adapter is not None and isinstance(adapter, Retrainable)
    # Clean samples kept out of retraining, to measure on where no test set is given.
    rng = np.random.default_rng(cfg.seed)
    clean = np.flatnonzero(plan.keep & ~report.is_flagged())
    heldout = np.zeros(0, dtype=np.int64)
    if test is None or trigger_test is None:
        floor = min(MIN_HOLDOUT, len(clean) // 4)
        size = min(MAX_HOLDOUT, max(int(rcfg.holdout * len(clean)), floor))
        heldout = np.sort(rng.choice(clean, size=size, replace=False))
    stick = yardstick(
        report, dataset, prepared.export, heldout, test, trigger_test, opts, cfg.seed
    )
    train = np.setdiff1d(np.flatnonzero(plan.keep), heldout)
    train_x, train_y = dataset.take(train), plan.labels[train]
    before = stick.measure(adapter, opts.batch_size)
    curve = [{"epoch": 0, **_point(before)}]
    best, best_key, best_epoch = adapter.clone(), _rank(before, before, rcfg), 0
    t = time.perf_counter()
    def rescan(candidate: Retrainable) -> tuple[OnnxExport, Report]:
        """The proof: a model scanned with the ORIGINAL training data and labels (on the
        relabelled data the poison no longer carries its target label)."""
        made = candidate.to_onnx(mopts.layer)
        original = dataclasses.replace(dataset, notes=[])
        # A model kept in a worker is run there too (the export came from it).
        return made, run(Prepared(made, candidate, prepared.worker), original, opts, cfg)

    final: tuple[OnnxExport, Report] | None = None
    for epoch in range(1, rcfg.epochs + 1):
        status(f"repair: retraining, epoch {epoch} of at most {rcfg.epochs}...")
        adapter.fit(
            train_x, train_y, epochs=1, batch_size=rcfg.train_batch_size, lr=rcfg.lr,
            seed=cfg.seed + epoch - 1,
        )  # fmt: skip
        now = stick.measure(adapter, opts.batch_size)
        curve.append({"epoch": epoch, **_point(now)})
        log_epoch(epoch, rcfg.epochs, curve[-1])
        if _done(now, before, rcfg):
            # The targets are met; done only if the original data also scans clean (the
            # trigger may still work from another class than the trigger test's).
            final = rescan(adapter)
            curve[-1]["rescan"] = final[1].verdict
            if final[1].verdict != "backdoor":
                _free(best)
                best, best_epoch = adapter, epoch
                break
            final = None
        key = _rank(now, before, rcfg)
        if key > best_key:
            _free(best)
            best, best_key, best_epoch = adapter.clone(), key, epoch
    fit_s = time.perf_counter() - t
    adapter = best
    after_metrics = stick.measure(adapter, opts.batch_size)
    export, after = final if final is not None else rescan(adapter)
    saved = adapter.save(output)
    onnx_path = atomic_write_bytes(output.with_suffix(".onnx"), export.model_bytes)
    result.written = [str(saved), str(onnx_path)]
    if data_output is not None:
        result.written.append(str(_write_data(Path(data_output), dataset, plan)))
    measured = "asr" in before
    result.mode = "retrained" if final is not None or not measured else "failed"
    result.curve = curve
    result.metrics = {
        "measured": measured,
        "before": before,
        "after": after_metrics,
        "clean_accuracy_on": stick.clean_on,
        "asr_on": stick.asr_on,
        "best_epoch": best_epoch,
        "fit_s": round(fit_s, 3),
        "time_s": round(time.perf_counter() - t0, 3),
    }
    verdict = "no poison found" if after.verdict == "clean" else after.verdict
    if result.mode == "failed":
        result.summary = (
            f"repair failed: {change}; after {len(curve) - 1} epoch(s) the best model "
            f"(epoch {best_epoch}) has attack success {after_metrics.get('asr', float('nan')):.3f}"
            f" (needed < {rcfg.max_asr:g}) and clean accuracy "
            f"{_fmt(after_metrics.get('clean_accuracy'))} (original "
            f"{_fmt(before.get('clean_accuracy'))}, allowed drop {rcfg.max_acc_drop:g}); kept "
            f"the best model; rescan of the original data: {verdict}"
        )
    else:
        result.summary = (
            f"{change}; retrained {len(curve) - 1} epoch(s) from the current weights on "
            f"{len(train)} samples (kept epoch {best_epoch}); rescan of the original data: "
            + verdict
        )
        if not measured:
            result.notes.append(
                "attack success was not measured (no --trigger-test, and the scan estimated no "
                "trigger to stamp): the rescan of the original data is the only evidence"
            )
    after.repair = result
    after.notes.extend(result.notes)
    if isinstance(model, (str, Path)):
        after.model["repaired_from"] = str(model)
    after.model["path"] = str(saved)
    return after


def _free(model: Any) -> None:
    """Free a copy kept in a worker process (``RemoteModel.close``); nothing for others."""
    close = getattr(model, "close", None)
    if callable(close):
        close()


def _point(m: dict[str, Any]) -> dict[str, Any]:
    """One point of the repair curve."""
    return {k: m[k] for k in ("clean_accuracy", "asr") if k in m}


def _acc_ok(now: dict[str, Any], before: dict[str, Any], rcfg: RepairConfig) -> bool:
    if "clean_accuracy" not in now or "clean_accuracy" not in before:
        return True
    return now["clean_accuracy"] >= before["clean_accuracy"] - rcfg.max_acc_drop


def _done(now: dict[str, Any], before: dict[str, Any], rcfg: RepairConfig) -> bool:
    """The attack is gone (below ``max_asr``) and clean accuracy held."""
    return "asr" in now and now["asr"] < rcfg.max_asr and _acc_ok(now, before, rcfg)


def _rank(now: dict[str, Any], before: dict[str, Any], rcfg: RepairConfig) -> tuple:
    """Order of preference among the models seen: one that meets both targets, then the lowest
    attack success, then the highest accuracy."""
    return (
        _done(now, before, rcfg),
        -now.get("asr", 1.0),
        now.get("clean_accuracy", 0.0),
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _write_cleaned(
    report: Report,
    result: RepairResult,
    dataset: Dataset,
    plan: RepairPlan,
    output: Path,
    prepared: Prepared,
    change: str,
    rcfg: RepairConfig,
) -> Report:
    """A model that cannot be trained here: write the cleaned data set for the user."""
    path = output if output.suffix.lower() == ".npz" else output.with_suffix(".npz")
    _write_data(path, dataset, plan)
    adapter = prepared.adapter
    reason = (adapter.fit_reason if adapter is not None else "") or (
        f"a bare {prepared.framework} model has no training framework"
    )
    result.notes.append(
        f"this model cannot be retrained here ({reason}): retrain it on {path.name} "
        "(x, y; 'changed' and 'removed' index the original samples), starting from the "
        f"current weights for up to {rcfg.epochs} epoch(s), then scan it again with the "
        "original training data"
    )
    result.mode = "data"
    result.summary = f"{change}; model not retrained, cleaned data set written"
    result.written = [str(path)]
    result.metrics = {"measured": False, "note": "the model was not retrained: nothing measured"}
    report.repair = result
    report.notes.extend(result.notes)
    return report


def _nothing_to_do(report: Report, strategy: str) -> Report:
    """A clean (or empty) scan: nothing is retrained or written."""
    nothing = report.verdict == "nothing scanned"
    report.repair = RepairResult(
        strategy=strategy,
        mode="nothing scanned" if nothing else "clean",
        summary=(
            "nothing scanned, nothing repaired"
            if nothing
            else "no poison found: nothing to repair, no file written"
        ),
        metrics={"measured": False, "note": "nothing repaired, nothing measured"},
    )
    return report
