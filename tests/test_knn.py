"""The neighbour search of the transfer test, held against scikit-learn's exact search."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from backdoorscan.kernels.knn import knn


@pytest.mark.parametrize(("n_ref", "k"), [(50, 5), (40000, 10)])
def test_matches_exact_search(n_ref: int, k: int) -> None:
    rng = np.random.default_rng(0)
    R = rng.normal(size=(n_ref, 16)).astype(np.float32)
    Q = rng.normal(size=(30, 16)).astype(np.float32)
    idx, dist = knn(Q, R, k)
    ref_dist, ref_idx = NearestNeighbors(n_neighbors=k).fit(R).kneighbors(Q)
    assert np.array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=1e-4)


def test_k_larger_than_reference_is_clipped() -> None:
    idx, _ = knn(np.zeros((2, 3)), np.arange(9.0).reshape(3, 3), 10)
    assert idx.shape == (2, 3) and idx[0].tolist() == [0, 1, 2]


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="equal widths"):
        knn(np.zeros((2, 3)), np.zeros((4, 5)))


def test_ties_keep_the_lower_index() -> None:
    R = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
    idx, dist = knn(np.zeros((1, 2)), R, 4)
    assert idx[0].tolist() == [1, 3, 0, 2]
    np.testing.assert_allclose(dist[0], [0.0, 0.0, 1.0, 1.0])


def test_blocks_merge_like_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    import backdoorscan.kernels.knn as mod

    rng = np.random.default_rng(3)
    R = rng.normal(size=(1000, 8)).astype(np.float32)
    Q = rng.normal(size=(7, 8)).astype(np.float32)
    whole = knn(Q, R, 6)
    monkeypatch.setattr(mod, "BLOCK", 97)
    blocked = knn(Q, R, 6)
    assert np.array_equal(whole[0], blocked[0])
    np.testing.assert_allclose(whole[1], blocked[1])
