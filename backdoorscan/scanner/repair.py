"""Repair: relabel (or drop) the samples a scan flagged, retrain, save, and scan again.

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

A model whose framework cannot train (a bare ONNX file) is not retrained: the relabelled (or
reduced) data set is written instead, for the user to retrain with.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from backdoorscan import adapters
from backdoorscan._io import atomic_write_bytes
from backdoorscan.adapters.base import Adapter, OnnxExport
from backdoorscan.scanner.data import DataError, Dataset, conform, from_arrays, load_data
from backdoorscan.scanner.report import EXIT_CLEAN, EXIT_NOTHING, Report

__all__ = ["STRATEGIES", "exit_code", "measure", "plan_repair", "repair"]

STRATEGIES = ("relabel", "remove")
# Below this share of a cluster for its top other class, ExRe's per-sample answers are used.
SINGLE_SOURCE_SHARE = 0.5


def plan_repair(report: Report, labels: np.ndarray, strategy: str = "relabel") -> dict[str, Any]:
    """New labels for the data set (-1: removed) and what changed, per poisoned class."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    labels = np.asarray(labels)
    new = labels.copy()
    flagged = report.is_flagged()
    per_class: dict[int, dict[str, Any]] = {}
    notes: list[str] = []
    preds = report.exre_predictions
    for c in report.classes:
        if c.verdict != "poisoned":
            continue
        idx = np.flatnonzero(flagged & (labels == c.label))
        row: dict[str, Any] = {"flagged": len(idx), "relabelled": 0, "removed": 0}
        if strategy == "remove":
            new[idx] = -1
            row |= {"removed": len(idx), "how": "removed"}
        else:
            full = (c.exre or {}).get("full") or {}
            # Many sources: the transfer test's trigger sends most other classes to this one
            # (an all-to-one attack; a trigger learnt from one source often works on a few
            # more); without the transfer test, ExRe full's answers are spread.
            if c.transfer_sources:
                many = len(c.transfer_sources) >= max(2, (len(report.classes) - 1) / 2)
            else:
                many = float(full.get("source_share") or 0.0) < SINGLE_SOURCE_SHARE
            spread = preds is not None and full.get("verdict") == "poison" and many
            if spread and preds is not None:
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
    keep = new >= 0
    changed = np.flatnonzero(keep & (new != labels))
    removed = np.flatnonzero(~keep)
    return {
        "labels": new,
        "keep": keep,
        "changed": changed,
        "removed": removed,
        "per_class": per_class,
        "notes": notes,
    }


def _counts(values: np.ndarray) -> dict[int, int]:
    keys, counts = np.unique(values, return_counts=True)
    return {int(k): int(n) for k, n in zip(keys, counts, strict=True)}


def _session_predict(export: OnnxExport, session: object, ds: Dataset) -> np.ndarray:
    out = []
    for _, xb in ds.batches(512):
        (logits,) = session.run([export.logits_name], {export.input_name: xb})  # type: ignore[attr-defined]
        out.append(np.asarray(logits).reshape(len(xb), -1).argmax(axis=1))
    return np.concatenate(out)


def measure(
    export: OnnxExport,
    test: str | Path | Dataset | None,
    trigger_test: str | Path | Dataset | None,
    flagged_classes: list[int],
    *,
    device: str = "auto",
    scale: float | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> dict[str, Any]:
    """Clean accuracy on ``test``; on ``trigger_test`` (triggered samples, TRUE labels) the
    attack success rate (share not predicted as the true label) and, per flagged class, the
    share sent to that class."""
    from backdoorscan.scanner.extract import make_session

    out: dict[str, Any] = {}
    session = make_session(export, device)

    def load(source: str | Path | Dataset) -> Dataset:
        ds = source if isinstance(source, Dataset) else load_data(source)
        return conform(
            ds, export.input_shape, export.input_dtype, export.num_classes,
            scale=scale, mean=mean, std=std,
        )  # fmt: skip

    if test is not None:
        ds = load(test)
        out["clean_accuracy"] = float((_session_predict(export, session, ds) == ds.y).mean())
        out["n_test"] = len(ds)
    if trigger_test is not None:
        ds = load(trigger_test)
        pred = _session_predict(export, session, ds)
        out["asr"] = float((pred != ds.y).mean())
        out["n_trigger_test"] = len(ds)
        out["asr_per_class"] = {
            int(c): float((pred[ds.y != c] == c).mean()) if (ds.y != c).any() else 0.0
            for c in flagged_classes
        }
    return out


def exit_code(report: Report) -> int:
    """Exit code of ``repair``: 0 when the rescan is clean or the cleaned data was written,
    1 when a backdoor is still found, 3 when nothing was scanned."""
    info = report.repair or {}
    if info.get("mode") == "data":
        return EXIT_CLEAN
    if info.get("mode") == "nothing scanned":
        return EXIT_NOTHING
    return report.exit_code


def _load_adapter(model: Any, layer: str | None, ds: Dataset, options: dict[str, Any]) -> Adapter:
    options = dict(options)
    options.setdefault("input_shape", tuple(ds.x.shape[1:]))
    if ds.x.dtype in (np.int64, np.int32):
        options.setdefault("input_dtype", "int64")
    if isinstance(model, (str, Path)):
        return adapters.load(model, **options)
    if isinstance(model, Adapter):
        return model
    return adapters.from_object(model, **options)


class _Exported:
    """An adapter whose ONNX export is already made: scan() reuses it instead of exporting
    again (an in-memory model is exported anew on every call)."""

    def __init__(self, adapter: Adapter, export: OnnxExport) -> None:
        self._adapter = adapter
        self._export = export

    def to_onnx(self, layer: str | None = None) -> OnnxExport:
        return self._export

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adapter, name)


def _write_data(path: Path, ds: Dataset, plan: dict[str, Any]) -> Path:
    import io

    keep = plan["keep"]
    index = np.flatnonzero(keep)
    buf = io.BytesIO()
    np.savez(
        buf,
        x=np.asarray(ds.x[index]),
        y=plan["labels"][index].astype(np.int64),
        changed=plan["changed"].astype(np.int64),
        removed=plan["removed"].astype(np.int64),
        original_index=index.astype(np.int64),
    )
    return atomic_write_bytes(path, buf.getvalue())


def repair(
    model: Any,
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
    *,
    output: str | Path,
    data: str | Path | None = None,
    labels: str | Path | None = None,
    x_key: str = "x",
    y_key: str = "y",
    strategy: str = "relabel",
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    report: Report | None = None,
    exre: Any = None,
    test: str | Path | Dataset | None = None,
    trigger_test: str | Path | Dataset | None = None,
    data_output: str | Path | None = None,
    layer: str | None = None,
    device: str = "auto",
    scale: float | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    config: Any = None,
    **model_options: Any,
) -> Report:
    """Scan (unless ``report`` is given), relabel or remove the flagged samples, retrain from the
    current weights, save the model (own format and ``<output stem>.onnx``), and scan again.

    Returns the rescan's report with a ``repair`` section holding the first scan, the changes
    and the measured effect. A model that cannot be trained gets its cleaned data set written to
    ``output`` (``.npz``: x, y, changed, removed, original_index) instead.
    """
    from backdoorscan.scanner import describe_inputs, scan

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    if epochs < 1:
        raise ValueError("repair needs at least one epoch of retraining")
    t0 = time.perf_counter()
    output = Path(output)
    for target in (output, Path(data_output) if data_output is not None else None):
        if target is not None and not (target.parent if str(target.parent) else Path(".")).is_dir():
            raise FileNotFoundError(f"output folder does not exist: {target.parent}")
    if data is not None:
        ds = load_data(data, labels, x_key=x_key, y_key=y_key)
    elif x is not None and y is not None:
        ds = from_arrays(x, y)
    else:
        raise DataError("no data given: pass x and y, or a data file")
    adapter = _load_adapter(model, layer, ds, model_options)
    trainable = bool(adapter.can_fit)
    if report is not None and report.verdict != "backdoor":
        return _nothing_to_do(report, strategy)
    if trainable and not isinstance(model, (str, Path)):
        adapter = adapter.clone()  # the caller's in-memory model is left as it was
    if trainable and output.suffix.lower() in (".onnx", ".npz"):
        raise ValueError(
            f"-o names the repaired {adapter.framework} model in its own format (e.g. "
            f"repaired.pt); the ONNX copy is written beside it, got {output.name}"
        )
    norm = {"scale": scale, "mean": mean, "std": std}
    export = adapter.to_onnx(layer)
    if report is None:
        report = scan(
            _Exported(adapter, export),
            data=ds,
            layer=layer,
            device=device,
            config=config,
            exre=exre,
            **norm,
        )
        describe_inputs(report, model, data, labels)
    else:
        conform(ds, export.input_shape, export.input_dtype, export.num_classes, **norm)
    if report.verdict != "backdoor":
        return _nothing_to_do(report, strategy)
    info: dict[str, Any] = {"strategy": strategy, "before": report.to_dict(include_scores=False)}
    plan = plan_repair(report, ds.y, strategy)
    flagged_classes = report.poisoned_classes
    measured = test is not None or trigger_test is not None
    metrics: dict[str, Any] = {"measured": measured}
    if measured:
        metrics["before"] = measure(
            export, test, trigger_test, flagged_classes, device=device, **norm
        )
    else:
        metrics["note"] = (
            "clean accuracy and attack success not measured (pass --test and --trigger-test)"
        )
    n_changed, n_removed = len(plan["changed"]), len(plan["removed"])
    change = f"{n_changed} samples relabelled, {n_removed} removed"
    info |= {
        "n_relabelled": n_changed,
        "n_removed": n_removed,
        "per_class": plan["per_class"],
        "written": [],
    }
    notes = list(plan["notes"])
    if not trainable:
        path = output if output.suffix.lower() == ".npz" else output.with_suffix(".npz")
        _write_data(path, ds, plan)
        reason = getattr(adapter, "fit_reason", "") or f"a {adapter.framework} model"
        notes.append(
            f"this model cannot be retrained here ({reason}): retrain it on {path.name} "
            "(x, y; 'changed' and 'removed' index the original samples), starting from the "
            f"current weights for about {epochs} epoch(s), then scan it again"
        )
        metrics.setdefault("note", "the model was not retrained: nothing measured after")
        info |= {
            "mode": "data",
            "summary": f"{change}; model not retrained, cleaned data set written",
            "written": [str(path)],
            "metrics": metrics,
            "notes": notes,
        }
        report.repair = info
        report.notes.extend(notes)
        return report
    keep = plan["keep"]
    kept_idx = np.flatnonzero(keep)
    new_labels = plan["labels"][kept_idx]
    t = time.perf_counter()
    adapter.fit(
        ds.take(kept_idx), new_labels, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed
    )
    fit_s = time.perf_counter() - t
    saved = adapter.save(output)
    repaired_export = adapter.to_onnx(layer)
    onnx_path = output.with_suffix(".onnx")
    atomic_write_bytes(onnx_path, repaired_export.model_bytes)
    info["written"] = [str(saved), str(onnx_path)]
    repaired = from_arrays(np.asarray(ds.x[kept_idx]), new_labels, source=f"{ds.source} (repaired)")
    if data_output is not None:
        info["written"].append(str(_write_data(Path(data_output), ds, plan)))
    after = scan(
        _Exported(adapter, repaired_export),
        data=repaired,
        layer=layer,
        device=device,
        config=config,
        **norm,
    )
    if measured:
        metrics["after"] = measure(
            repaired_export, test, trigger_test, flagged_classes, device=device, **norm
        )
    info |= {
        "mode": "retrained",
        "summary": (
            f"{change}; retrained {epochs} epoch(s) from the current weights on "
            f"{len(kept_idx)} samples; rescan: "
            + ("no backdoor found" if after.verdict == "clean" else after.verdict)
        ),
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "metrics": metrics,
        "notes": notes,
        "fit_s": round(fit_s, 3),
        "time_s": round(time.perf_counter() - t0, 3),
    }
    after.repair = info
    after.notes.extend(notes)
    if isinstance(model, (str, Path)):
        after.model["repaired_from"] = str(model)
    after.model["path"] = str(saved)
    return after


def _nothing_to_do(report: Report, strategy: str) -> Report:
    """A clean (or empty) scan: nothing is retrained or written."""
    nothing = report.verdict == "nothing scanned"
    report.repair = {
        "strategy": strategy,
        "mode": "nothing scanned" if nothing else "clean",
        "summary": (
            "nothing scanned, nothing repaired"
            if nothing
            else "no backdoor found: nothing to repair, no file written"
        ),
        "metrics": {"measured": False, "note": "nothing repaired, nothing measured"},
    }
    return report
