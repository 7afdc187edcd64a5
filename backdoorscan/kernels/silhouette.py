"""Exact silhouette coefficients in O(n^2) time and O(n * n_labels) memory.

Each pair distance is computed once and added to both samples' per-cluster sums, so the n x n
distance matrix is never built. Above ``max_exact`` samples the score is taken on a seeded
random subset, as scikit-learn's ``sample_size`` does.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .pca import as_matrix


@njit(cache=True, nogil=True)
def _silhouette(X: np.ndarray, labels: np.ndarray, n_labels: int) -> np.ndarray:
    """Silhouette of every sample; labels must be 0..n_labels-1. Singleton clusters give 0."""
    n, d = X.shape
    sums = np.zeros((n, n_labels))
    counts = np.zeros(n_labels, np.int64)
    for i in range(n):
        counts[labels[i]] += 1
    for i in range(n):
        li = labels[i]
        for j in range(i + 1, n):
            s = 0.0
            for f in range(d):
                t = X[i, f] - X[j, f]
                s += t * t
            dist = np.sqrt(s)
            sums[i, labels[j]] += dist
            sums[j, li] += dist
    out = np.zeros(n)
    for i in range(n):
        li = labels[i]
        if counts[li] <= 1:
            continue
        a = sums[i, li] / (counts[li] - 1)
        b = np.inf
        for c in range(n_labels):
            if c != li and counts[c] > 0:
                b = min(b, sums[i, c] / counts[c])
        m = max(a, b)
        if m > 0.0:
            out[i] = (b - a) / m
    return out


def _encode(X: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate inputs and map labels to 0..L-1 (2 <= L <= n - 1, as scikit-learn requires)."""
    X = as_matrix(X)
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != X.shape[0]:
        raise ValueError(f"labels must have shape ({X.shape[0]},), got {labels.shape}")
    _, codes = np.unique(labels, return_inverse=True)
    n_labels = int(codes.max()) + 1 if codes.size else 0
    if not 2 <= n_labels <= X.shape[0] - 1:
        raise ValueError(
            f"Number of labels is {n_labels}. Valid values are 2 to n_samples - 1 (inclusive)"
        )
    return X, np.ascontiguousarray(codes.ravel(), dtype=np.int64), n_labels


def silhouette_samples(X: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Exact silhouette coefficient of every sample (Euclidean), float64 [n].

    Raises ValueError unless there are between 2 and n - 1 distinct labels.
    """
    X, codes, n_labels = _encode(X, labels)
    return _silhouette(X, codes, n_labels)


def silhouette_score(
    X: np.ndarray,
    labels: np.ndarray,
    *,
    sample_size: int | None = None,
    max_exact: int = 4000,
    random_state: int = 0,
) -> float:
    """Mean silhouette coefficient; exact when n <= max_exact and no sample_size is given.

    Otherwise computed within a seeded random subset of ``sample_size or max_exact`` samples
    (quadratic cost stays bounded). Raises ValueError for fewer than 2 distinct labels.
    """
    X = as_matrix(X)
    labels = np.asarray(labels)
    n = X.shape[0]
    size = sample_size if sample_size is not None else (max_exact if n > max_exact else n)
    if size < 2:
        raise ValueError(f"sample_size must be >= 2, got {size}")
    if size < n:
        rng = np.random.default_rng(random_state)
        idx = np.sort(rng.choice(n, size=size, replace=False))
        if labels.ndim == 1 and labels.shape[0] == n:
            X, labels = X[idx], labels[idx]
    return float(np.mean(silhouette_samples(X, labels)))
