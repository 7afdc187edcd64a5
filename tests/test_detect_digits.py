"""Detection on real trained networks where the truth is known: scikit-learn's 8x8 digits."""

from __future__ import annotations

import json

import numpy as np
import pytest

import backdoorscan
from backdoorscan import DetectConfig


def _precision_recall(flagged: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    tp = int((flagged & truth).sum())
    return tp / max(int(flagged.sum()), 1), tp / max(int(truth.sum()), 1)


def test_backdoored_cnn_is_found_with_its_source(poisoned_digits: dict) -> None:
    report = backdoorscan.scan(poisoned_digits["model"], data=poisoned_digits["data"])
    precision, recall = _precision_recall(report.is_flagged(), poisoned_digits["poison"])
    assert report.poisoned_classes == [1]
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    target = next(c for c in report.classes if c.label == 1)
    assert target.suspected_source == 7
    assert target.transfer is not None and target.transfer >= 0.5
    assert report.exit_code == 1


def test_clean_cnn_scans_clean(clean_digits: dict) -> None:
    report = backdoorscan.scan(clean_digits["model"], data=clean_digits["data"])
    assert report.poisoned_classes == []
    assert len(report.flagged_indices) == 0
    assert report.exit_code == 0
    # Every class was analysed and the model was asked about its clusters.
    assert all(c.verdict == "clean" and c.transfer is not None for c in report.classes)


def test_in_memory_torch_module(poisoned_digits: dict) -> None:
    report = backdoorscan.scan(
        poisoned_digits["torch_model"], poisoned_digits["x"], poisoned_digits["y"]
    )
    precision, recall = _precision_recall(report.is_flagged(), poisoned_digits["poison"])
    assert report.poisoned_classes == [1] and precision >= 0.95 and recall >= 0.95


def test_size_rule_alone_flags_clean_classes(clean_digits: dict) -> None:
    """The paper's size rule by itself flags clean classes: why it is not the default."""
    cfg = DetectConfig(rule=("size",))
    report = backdoorscan.scan(clean_digits["model"], data=clean_digits["data"], config=cfg)
    assert len(report.poisoned_classes) >= 3


def test_same_seed_same_report(poisoned_digits: dict) -> None:
    a = backdoorscan.scan(poisoned_digits["model"], data=poisoned_digits["data"])
    b = backdoorscan.scan(poisoned_digits["model"], data=poisoned_digits["data"])
    assert np.array_equal(a.flagged_indices, b.flagged_indices)
    assert np.array_equal(a.scores, b.scores)


def _without(report: backdoorscan.Report, *keys: str) -> dict:
    doc = json.loads(report.to_json())
    doc.pop("timings_s"), doc.pop("invocation")
    for key in keys:
        doc["settings"].pop(key)
    return doc


def test_threads_do_not_change_the_report(poisoned_digits: dict) -> None:
    """Classes run on a thread each (n_jobs); the report is the same with one thread."""
    one, two = (
        backdoorscan.scan(
            poisoned_digits["model"], data=poisoned_digits["data"], config=DetectConfig(n_jobs=n)
        )
        for n in (1, 2)
    )
    assert _without(one, "n_jobs") == _without(two, "n_jobs")
    assert one.poisoned_classes == [1]


@pytest.mark.parametrize(
    "overrides",
    [
        # Neighbours searched among a sample of the data (800 of these 1,797 samples). Smaller
        # samples give poorer neighbours, whose median difference is partly a class-to-class
        # difference: a clean class 2 mode transfers at 0.42 with 400 (it crossed 0.5 in one
        # CI run), 0.52 with 300, 0.18 with 800 (measured on this model).
        {"transfer_reference": 800},
        {"fit_samples": 120},  # FastICA and k-means learn from a sample of each class
        {"transfer_screen": 0},  # every stamped sample asked, no first look
    ],
)
def test_sampling_shortcuts_keep_the_finding(poisoned_digits: dict, overrides: dict) -> None:
    report = backdoorscan.scan(
        poisoned_digits["model"], data=poisoned_digits["data"], config=DetectConfig(**overrides)
    )
    precision, recall = _precision_recall(report.is_flagged(), poisoned_digits["poison"])
    assert report.poisoned_classes == [1], overrides
    assert precision >= 0.95 and recall >= 0.95, (overrides, precision, recall)


def test_screen_asks_fewer_samples_and_changes_no_verdict(
    clean_digits: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first look (transfer_screen) spares the model most questions on a clean model."""
    from backdoorscan.scanner.transfer import TransferProbe

    asked: list[int] = []
    predict = TransferProbe.predict

    def counting(self: TransferProbe, xb: np.ndarray) -> np.ndarray:
        asked.append(len(xb))
        return predict(self, xb)

    monkeypatch.setattr(TransferProbe, "predict", counting)
    totals, reports = [], []
    for screen in (0, 10):
        asked.clear()
        cfg = DetectConfig(transfer_screen=screen, n_jobs=1)
        reports.append(
            backdoorscan.scan(clean_digits["model"], data=clean_digits["data"], config=cfg)
        )
        totals.append(sum(asked))
    assert [r.poisoned_classes for r in reports] == [[], []]
    assert totals[1] < 0.5 * totals[0], totals
