"""The refinement's neighbour search is bounded: a seeded sample of at most REFINE_REFERENCE
samples, the whole set below that size (issue #14)."""

from __future__ import annotations

import numpy as np
import pytest

from backdoorscan.kernels.knn import knn
from backdoorscan.scanner import transfer
from backdoorscan.scanner.config import DetectConfig
from backdoorscan.scanner.data import from_arrays
from backdoorscan.scanner.sketch import InputSketch


@pytest.fixture()
def planted() -> dict:
    """2,000 8 x 8 inputs in 4 classes; 60 class-0-like samples labelled 1 carry a patch."""
    rng = np.random.default_rng(3)
    n, side = 2000, 8
    y = np.arange(n) % 4
    protos = rng.random((4, side * side), dtype=np.float32)
    x = protos[y] * 0.6 + rng.random((n, side * side), dtype=np.float32) * 0.4
    cluster = np.flatnonzero(y == 1)[:60]
    patch = np.zeros(side * side, dtype=np.float32)
    patch[[45, 46, 53, 54]] = 1.0
    x[cluster] = np.maximum(protos[0] * 0.6 + rng.random((60, side * side)) * 0.4, patch)
    data = from_arrays(x.reshape(n, 1, side, side).astype(np.float32), y)
    sketch = InputSketch(n, 64, seed=0)
    sketch.add(0, data.batch(0, n))
    probe = transfer.TransferProbe(None, None, data, sketch.matrix, DetectConfig())
    return {"probe": probe, "cluster": cluster, "patch": patch, "n": n, "sketch": sketch.matrix}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_below_the_bound_every_sample_outside_the_cluster_is_searched(planted, monkeypatch):
    probe, cluster = planted["probe"], planted["cluster"]
    found = probe.trigger(cluster, seed=1)
    # the search before the bound: every sample outside the cluster
    queries = probe._queries(cluster, np.random.default_rng(1))
    outside = np.setdiff1d(np.arange(planted["n"]), cluster)
    nn, _ = knn(planted["sketch"][queries], planted["sketch"][outside], 10)
    whole = probe._estimate(queries, outside[nn])
    np.testing.assert_allclose(found.values, whole.values)
    assert _cosine(found.values.reshape(-1), planted["patch"]) > 0.9


def test_above_the_bound_a_seeded_sample_is_searched(planted, monkeypatch):
    probe, cluster = planted["probe"], planted["cluster"]
    monkeypatch.setattr(transfer, "REFINE_REFERENCE", 400)
    searched: list[int] = []

    def counting_knn(q: np.ndarray, ref: np.ndarray, k: int):
        searched.append(len(ref))
        return knn(q, ref, k)

    monkeypatch.setattr(transfer, "knn", counting_knn)
    first = probe.trigger(cluster, seed=1)
    again = transfer.TransferProbe(
        None, None, probe.data, planted["sketch"], DetectConfig()
    ).trigger(cluster, seed=1)
    assert searched and max(searched) <= 400
    assert searched[0] > 300  # the sample less the cluster's members in it
    np.testing.assert_array_equal(first.values, again.values)  # seeded: the same sample
    assert _cosine(first.values.reshape(-1), planted["patch"]) > 0.9
