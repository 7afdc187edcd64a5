"""What repair measures an attack with: clean accuracy, and attack success on triggered samples.

The triggered samples are a given trigger test (test samples carrying the trigger, with their
TRUE labels) or, without one, held-out training samples of each poisoned class's suspected
source stamped with the trigger the scan's transfer test estimated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from backdoorscan.adapters.base import Adapter, OnnxExport
from backdoorscan.scanner.config import RunOptions
from backdoorscan.scanner.data import Dataset, conform, load_data
from backdoorscan.scanner.report import Report

__all__ = ["Yardstick", "yardstick"]


@dataclass
class Yardstick:
    """What repair measures on: clean samples with their labels, triggered samples with their
    TRUE labels (converted for the model), and what each set is, for the report."""

    clean_x: np.ndarray | None
    clean_y: np.ndarray | None
    clean_on: str
    trig_x: np.ndarray | None
    trig_y: np.ndarray | None
    trig_class: np.ndarray | None  # the poisoned class each triggered sample is stamped for
    asr_on: str
    flagged: list[int]

    def measure(self, adapter: Adapter, batch_size: int) -> dict[str, Any]:
        """Clean accuracy, attack success rate (a trigger test: the share of its samples not
        predicted as their true label; stamped held-out samples: the share sent to the class
        stamped for) and, per poisoned class, the share of triggered samples sent to it."""
        out: dict[str, Any] = {}
        if self.clean_x is not None and self.clean_y is not None:
            pred = _predict(adapter, self.clean_x, batch_size)
            out["clean_accuracy"] = float((pred == self.clean_y).mean())
        if self.trig_x is not None and self.trig_y is not None:
            pred = _predict(adapter, self.trig_x, batch_size)
            if self.trig_class is None:  # a trigger test: triggered samples, true labels
                out["asr"] = float((pred != self.trig_y).mean())
            else:  # stamped held-out samples: the share sent to the class stamped for
                out["asr"] = float((pred == self.trig_class).mean())
            per_class = {}
            for c in self.flagged:
                rows = self.trig_y != c
                if self.trig_class is not None:
                    rows &= self.trig_class == c
                per_class[int(c)] = float((pred[rows] == c).mean()) if rows.any() else 0.0
            out["asr_per_class"] = per_class
        return out


def _predict(adapter: Adapter, x: np.ndarray, batch_size: int) -> np.ndarray:
    logits = np.asarray(adapter.predict_logits(x, batch_size=batch_size))
    return logits.reshape(len(x), -1).argmax(axis=1)


def converted(
    source: str | Path | Dataset, export: OnnxExport, opts: RunOptions
) -> tuple[np.ndarray, np.ndarray]:
    """A test set's samples as the model takes them, and its labels."""
    ds = source if isinstance(source, Dataset) else load_data(source)
    conform(ds, export.input_shape, export.input_dtype, export.num_classes, **opts.normalisation)
    return ds.take(np.arange(len(ds))), np.asarray(ds.y)


def yardstick(
    report: Report,
    dataset: Dataset,
    export: OnnxExport,
    heldout: np.ndarray,
    test: str | Path | Dataset | None,
    trigger_test: str | Path | Dataset | None,
    opts: RunOptions,
    seed: int,
) -> Yardstick:
    """The clean and triggered samples repair measures on (given sets, else held-out ones)."""
    flagged = report.poisoned_classes
    if test is not None:
        clean_x, clean_y = converted(test, export, opts)
        clean_on = f"the test set ({len(clean_y)} samples)"
    elif len(heldout):
        clean_x, clean_y = dataset.take(heldout), dataset.y[heldout]
        clean_on = f"{len(heldout)} held-out training samples"
    else:
        clean_x = clean_y = None
        clean_on = ""
    if trigger_test is not None:
        trig_x, trig_y = converted(trigger_test, export, opts)
        return Yardstick(
            clean_x, clean_y, clean_on, trig_x, trig_y, None,
            f"the trigger test set ({len(trig_y)} samples)", flagged,
        )  # fmt: skip
    # Without a trigger test: held-out samples of each suspected source, stamped with the
    # trigger the scan estimated for the class.
    rng = np.random.default_rng(seed)
    xs, ys, cs = [], [], []
    for c in report.classes:
        if c.verdict != "poisoned" or c.trigger is None:
            continue
        sources = c.transfer_sources or (
            [c.suspected_source] if c.suspected_source is not None else []
        )
        pick = heldout[dataset.y[heldout] != c.label]
        if sources:
            pick = pick[np.isin(dataset.y[pick], sources)]
        if not len(pick):
            continue
        xs.append(c.trigger.stamp(dataset.take(pick), rng))
        ys.append(dataset.y[pick])
        cs.append(np.full(len(pick), c.label))
    if not xs:
        return Yardstick(clean_x, clean_y, clean_on, None, None, None, "", flagged)
    trig_y = np.concatenate(ys)
    return Yardstick(
        clean_x, clean_y, clean_on, np.concatenate(xs), trig_y, np.concatenate(cs),
        f"{len(trig_y)} held-out samples of the suspected source(s) stamped with the "
        "trigger the scan estimated", flagged,
    )  # fmt: skip
