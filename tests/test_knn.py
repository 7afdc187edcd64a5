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


def _exact_distances(Q: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Every query's distance to every reference row, in float64 without BLAS."""
    diff = Q[:, None, :].astype(np.float64) - R[None, :, :].astype(np.float64)
    return np.sqrt((diff * diff).sum(axis=-1))


def test_blocks_merge_like_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Splitting the references into blocks finds the same neighbours as one pass.

    The distances come from a matrix product whose shape differs with the block size, and BLAS
    may sum a block of another shape in another order: the last bits of a distance may differ
    (seen: 1 of 42 at 1.4e-7 relative on another machine). So distances agree to a tolerance,
    and the neighbour at a rank must be the same wherever its distance is not a near-tie with
    the next or previous one (the exact float64 distances say which are).
    """
    import backdoorscan.kernels.knn as mod

    rtol = 1e-5
    k = 6
    rng = np.random.default_rng(3)
    R = rng.normal(size=(1000, 8)).astype(np.float32)
    Q = rng.normal(size=(7, 8)).astype(np.float32)
    whole_idx, whole_dist = knn(Q, R, k)
    monkeypatch.setattr(mod, "BLOCK", 97)  # 11 blocks, the last one short
    blocked_idx, blocked_dist = knn(Q, R, k)

    np.testing.assert_allclose(blocked_dist, whole_dist, rtol=rtol, atol=1e-6)
    exact = np.sort(_exact_distances(Q, R), axis=1)[:, : k + 1]
    np.testing.assert_allclose(whole_dist, exact[:, :k], rtol=rtol, atol=1e-6)
    # A rank is decided when its distance is clear of the one before and the one after
    # (rank k's "after" is the first neighbour left out).
    gap = np.diff(exact, axis=1) > 10 * rtol * exact[:, 1:]
    clear_before = np.concatenate([np.ones((len(Q), 1), bool), gap[:, : k - 1]], axis=1)
    decided = clear_before & gap[:, :k]
    assert decided.sum() >= 0.9 * decided.size  # the data has few near-ties: the check bites
    assert np.array_equal(whole_idx[decided], blocked_idx[decided])
    # The indices are global (each block's offset added), not positions within a block.
    found = np.take_along_axis(_exact_distances(Q, R), blocked_idx, axis=1)
    np.testing.assert_allclose(found, blocked_dist, rtol=rtol, atol=1e-6)
