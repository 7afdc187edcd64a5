"""Brute-force k nearest neighbours of a few query rows among many reference rows (Euclidean).

Used to ask, in input space, what a suspicious cluster's members look like once the cluster
itself is left out. Queries are few (a hundred), references many (the data set): the
distances come from one matrix product per block of references (BLAS does the work, which
beats a compiled loop here), and a partial sort keeps the k best of each block.
"""

from __future__ import annotations

import numpy as np

BLOCK = 16384


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
    q_norms = np.einsum("ij,ij->i", Q, Q, dtype=np.float64)[:, None]
    best_d = np.full((len(Q), 0), np.inf)
    best_i = np.zeros((len(Q), 0), dtype=np.int64)
    for start in range(0, len(R), BLOCK):
        block = R[start : start + BLOCK]
        r_norms = np.einsum("ij,ij->i", block, block, dtype=np.float64)[None, :]
        d = q_norms + r_norms - 2.0 * (Q @ block.T).astype(np.float64)
        kk = min(k, d.shape[1])
        part = np.argpartition(d, kk - 1, axis=1)[:, :kk]
        best_d = np.concatenate([best_d, np.take_along_axis(d, part, axis=1)], axis=1)
        best_i = np.concatenate([best_i, part + start], axis=1)
        order = np.lexsort((best_i, best_d), axis=1)[:, :k]
        best_d = np.take_along_axis(best_d, order, axis=1)
        best_i = np.take_along_axis(best_i, order, axis=1)
    return best_i, np.sqrt(np.maximum(best_d, 0.0))
