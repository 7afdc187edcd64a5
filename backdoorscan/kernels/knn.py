"""Brute-force k nearest neighbours of a few query rows among many reference rows (Euclidean).

Used to ask, in input space, what a suspicious cluster's members look like once the cluster
itself is left out. Queries are few (a hundred), references many (the data set): the dot
products come from one matrix product per block of references (BLAS does that work), and a
small compiled loop turns each row of products into distances and keeps the k best in one
pass (k is about 10: a sorted insertion list beats a partial sort of the whole row).
"""

from __future__ import annotations

import numpy as np
from numba import njit

BLOCK = 16384


@njit(cache=True, nogil=True)
def _merge_topk(
    dots: np.ndarray,
    q_norms: np.ndarray,
    r_norms: np.ndarray,
    offset: int,
    best_d: np.ndarray,
    best_i: np.ndarray,
) -> None:
    """Fold one block of reference rows into each query's sorted list of the k best.

    ``dots[q, j]`` is query q's dot product with reference row ``offset + j``; squared
    distances are formed in float64. Rows are visited in index order and a new row must be
    strictly nearer to displace one, so ties keep the lower index.
    """
    k = best_d.shape[1]
    for q in range(dots.shape[0]):
        qn = q_norms[q]
        worst = best_d[q, k - 1]
        for j in range(dots.shape[1]):
            d = qn + r_norms[j] - 2.0 * np.float64(dots[q, j])
            if d < worst:
                pos = k - 1
                while pos > 0 and best_d[q, pos - 1] > d:
                    best_d[q, pos] = best_d[q, pos - 1]
                    best_i[q, pos] = best_i[q, pos - 1]
                    pos -= 1
                best_d[q, pos] = d
                best_i[q, pos] = offset + j
                worst = best_d[q, k - 1]


def knn(Q: np.ndarray, R: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Indices into ``R`` and distances of the ``k`` nearest rows of ``R`` for each row of ``Q``.

    Rows come back nearest first; ties are broken by the lower index.
    """
    Q = np.ascontiguousarray(Q, dtype=np.float32)
    R = np.ascontiguousarray(R, dtype=np.float32)
    if Q.ndim != 2 or R.ndim != 2 or Q.shape[1] != R.shape[1]:
        raise ValueError(f"Q and R must be 2-D with equal widths, got {Q.shape} and {R.shape}")
    k = int(min(k, R.shape[0]))
    if k < 1:
        raise ValueError("need at least one reference row")
    q_norms = np.einsum("ij,ij->i", Q, Q, dtype=np.float64)
    best_d = np.full((len(Q), k), np.inf)
    best_i = np.zeros((len(Q), k), dtype=np.int64)
    for start in range(0, len(R), BLOCK):
        block = R[start : start + BLOCK]
        r_norms = np.einsum("ij,ij->i", block, block, dtype=np.float64)
        _merge_topk(Q @ block.T, q_norms, r_norms, start, best_d, best_i)
    return best_i, np.sqrt(np.maximum(best_d, 0.0))
