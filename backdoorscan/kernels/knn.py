"""Brute-force k nearest neighbours of a few query rows among many reference rows (Euclidean).

Used to ask, in input space, which class a suspicious cluster's members resemble once the
cluster itself is left out. Queries are few (hundreds), references many (the data set).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def _knn(
    Q: np.ndarray, R: np.ndarray, r_norms: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    nq, nr = Q.shape[0], R.shape[0]
    idx = np.empty((nq, k), dtype=np.int64)
    dist = np.empty((nq, k), dtype=np.float64)
    for i in prange(nq):
        q = Q[i]
        qn = 0.0
        for t in range(Q.shape[1]):
            qn += q[t] * q[t]
        best_d = np.full(k, np.inf)
        best_i = np.full(k, -1, dtype=np.int64)
        worst = 0  # position of the largest distance kept so far
        for j in range(nr):
            dot = 0.0
            for t in range(Q.shape[1]):
                dot += q[t] * R[j, t]
            d = qn + r_norms[j] - 2.0 * dot
            if d < best_d[worst]:
                best_d[worst] = d
                best_i[worst] = j
                worst = 0
                for m in range(1, k):
                    if best_d[m] > best_d[worst]:
                        worst = m
        order = np.argsort(best_d)
        for m in range(k):
            idx[i, m] = best_i[order[m]]
            dist[i, m] = np.sqrt(max(best_d[order[m]], 0.0))
    return idx, dist


def knn(Q: np.ndarray, R: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Indices into ``R`` and distances of the ``k`` nearest rows of ``R`` for each row of ``Q``."""
    Q = np.ascontiguousarray(Q, dtype=np.float64)
    R = np.ascontiguousarray(R, dtype=np.float64)
    if Q.ndim != 2 or R.ndim != 2 or Q.shape[1] != R.shape[1]:
        raise ValueError(f"Q and R must be 2-D with equal widths, got {Q.shape} and {R.shape}")
    k = int(min(k, R.shape[0]))
    if k < 1:
        raise ValueError("need at least one reference row")
    return _knn(Q, R, np.einsum("ij,ij->i", R, R), k)
