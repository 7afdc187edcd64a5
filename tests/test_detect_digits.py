"""Detection on real trained networks where the truth is known: scikit-learn's 8x8 digits."""

from __future__ import annotations

import numpy as np

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
