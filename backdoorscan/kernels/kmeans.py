"""k-means: greedy k-means++ seeding, Lloyd iterations, several seeded restarts, all in Numba.

A single k-means start on class activations can land in a poor split; ``n_init`` restarts
keep the lowest inertia. Conventions follow scikit-learn's ``KMeans(algorithm="lloyd")``:
tolerance relative to the mean per-feature variance, a final assignment after the loop, and
empty clusters re-seeded from the points farthest from their centers.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .pca import as_matrix


@njit(cache=True, nogil=True)
def _sq_dist(X: np.ndarray, i: int, C: np.ndarray, c: int) -> float:
    """Squared Euclidean distance between row i of X and row c of C."""
    s = 0.0
    for f in range(X.shape[1]):
        t = X[i, f] - C[c, f]
        s += t * t
    return s


@njit(cache=True, nogil=True)
def _first_at_least(cums: np.ndarray, value: float) -> int:
    """Index of the first entry of the non-decreasing ``cums`` that is >= value (n - 1 if none)."""
    lo, hi = 0, cums.shape[0] - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cums[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True)
def _kmeans_plusplus(X: np.ndarray, n_clusters: int) -> np.ndarray:
    """Greedy k-means++ seeding (2 + log k trials per center) from numba's seeded RNG state.

    Plain loops instead of numpy's cumsum/searchsorted keep the compile time down.
    """
    n, d = X.shape
    centers = np.empty((n_clusters, d))
    n_trials = 2 + int(np.log(n_clusters))
    first = np.random.randint(0, n)
    closest = np.empty(n)
    pot = 0.0
    for f in range(d):
        centers[0, f] = X[first, f]
    for i in range(n):
        closest[i] = _sq_dist(X, i, centers, 0)
        pot += closest[i]
    cums = np.empty(n)
    trial = np.empty(n)
    best = np.empty(n)
    for c in range(1, n_clusters):
        acc = 0.0
        for i in range(n):
            acc += closest[i]
            cums[i] = acc
        best_pot = np.inf
        best_id = 0
        for _ in range(n_trials):
            cand = _first_at_least(cums, np.random.random() * pot)
            cand_pot = 0.0
            for i in range(n):
                s = min(closest[i], _sq_dist(X, i, X, cand))
                trial[i] = s
                cand_pot += s
            if cand_pot < best_pot:
                best_pot = cand_pot
                best_id = cand
                best, trial = trial, best
        for f in range(d):
            centers[c, f] = X[best_id, f]
        closest, best = best, closest
        pot = best_pot
    return centers


@njit(cache=True, nogil=True)
def _assign(X: np.ndarray, centers: np.ndarray, labels: np.ndarray, dist: np.ndarray) -> None:
    """Label every sample with its nearest center (lowest index on ties); dist gets the squared
    distance."""
    n = X.shape[0]
    k = centers.shape[0]
    for i in range(n):
        best = _sq_dist(X, i, centers, 0)
        lab = 0
        for c in range(1, k):
            s = _sq_dist(X, i, centers, c)
            if s < best:
                best = s
                lab = c
        labels[i] = lab
        dist[i] = best


@njit(cache=True, nogil=True)
def _relocate_empty(
    X: np.ndarray, labels: np.ndarray, dist: np.ndarray, sums: np.ndarray, counts: np.ndarray
) -> None:
    """Move the samples farthest from their centers into empty clusters (sums and counts are
    per-cluster sums before division); a sample whose cluster would become empty is skipped."""
    k = counts.shape[0]
    n_empty = 0
    for c in range(k):
        if counts[c] == 0:
            n_empty += 1
    if n_empty == 0:
        return
    empty = np.empty(n_empty, np.int64)
    e = 0
    for c in range(k):
        if counts[c] == 0:
            empty[e] = c
            e += 1
    far = dist.copy()  # a linear scan per empty cluster: cheaper to compile than a sort
    n = far.shape[0]
    for e in range(n_empty):
        pick = -1
        pick_dist = -1.0
        for i in range(n):
            if far[i] > pick_dist and counts[labels[i]] > 1:
                pick_dist = far[i]
                pick = i
        if pick < 0:
            break
        far[pick] = -np.inf
        old = labels[pick]
        c = empty[e]
        for f in range(X.shape[1]):
            sums[old, f] -= X[pick, f]
            sums[c, f] = X[pick, f]
        counts[old] -= 1
        counts[c] = 1


@njit(cache=True, nogil=True)
def _lloyd(X: np.ndarray, centers_init: np.ndarray, max_iter: int, tol_abs: float):
    """Lloyd iterations from given centers; returns (labels, centers, inertia, n_iter).

    Stops when the labels no longer change or the centers' total squared shift is <= tol_abs,
    then assigns once more so that labels, centers and inertia agree.
    """
    n, d = X.shape
    k = centers_init.shape[0]
    centers = np.empty((k, d))
    for c in range(k):
        for f in range(d):
            centers[c, f] = centers_init[c, f]
    sums = np.empty((k, d))
    counts = np.empty(k, np.int64)
    labels = np.empty(n, np.int64)
    labels_old = np.empty(n, np.int64)
    for i in range(n):
        labels_old[i] = -1
    dist = np.empty(n)
    n_iter = 0
    for it in range(max_iter):
        _assign(X, centers, labels, dist)
        for c in range(k):
            counts[c] = 0
            for f in range(d):
                sums[c, f] = 0.0
        for i in range(n):
            c = labels[i]
            counts[c] += 1
            for f in range(d):
                sums[c, f] += X[i, f]
        _relocate_empty(X, labels, dist, sums, counts)
        shift = 0.0
        for c in range(k):
            for f in range(d):
                new = sums[c, f] / counts[c] if counts[c] > 0 else centers[c, f]
                t = new - centers[c, f]
                shift += t * t
                centers[c, f] = new
        n_iter = it + 1
        same = True
        for i in range(n):
            if labels[i] != labels_old[i]:
                same = False
            labels_old[i] = labels[i]
        if same or shift <= tol_abs:
            break
    _assign(X, centers, labels, dist)
    inertia = 0.0
    for i in range(n):
        inertia += dist[i]
    return labels, centers, inertia, n_iter


@njit(cache=True, nogil=True)
def _kmeans_restarts(
    X: np.ndarray, n_clusters: int, n_init: int, max_iter: int, tol_abs: float, seed: int
):
    """``n_init`` seeded k-means++/Lloyd runs; returns the one with the lowest inertia."""
    np.random.seed(seed)
    best_labels = np.zeros(X.shape[0], np.int64)
    best_centers = np.zeros((n_clusters, X.shape[1]))
    best_inertia = np.inf
    best_iter = 0
    for _ in range(n_init):
        init = _kmeans_plusplus(X, n_clusters)
        labels, centers, inertia, n_iter = _lloyd(X, init, max_iter, tol_abs)
        if inertia < best_inertia:
            best_labels = labels
            best_centers = centers
            best_inertia = inertia
            best_iter = n_iter
    return best_labels, best_centers, best_inertia, best_iter


def kmeans(
    X: np.ndarray,
    n_clusters: int = 2,
    *,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    random_state: int = 0,
) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Cluster X with k-means (k-means++ seeding, Lloyd), keeping the best of ``n_init`` starts.

    Returns (labels int64 [n], centers [k, d], inertia, n_iter of the best run). Converged when
    the centers' total squared shift <= tol * mean per-feature variance (scikit-learn's rule).
    With fewer distinct points than clusters some labels stay unused.
    """
    X = as_matrix(X)
    n = X.shape[0]
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    if n < n_clusters:
        raise ValueError(f"n_samples={n} should be >= n_clusters={n_clusters}")
    if n_init < 1 or max_iter < 1:
        raise ValueError("n_init and max_iter must be >= 1")
    seed = int(random_state)
    if not 0 <= seed < 2**32:
        raise ValueError(f"random_state must be an integer in [0, 2**32), got {random_state}")
    mean = X.mean(axis=0)
    Xc = np.ascontiguousarray(X - mean)  # centering keeps the distance sums well conditioned
    tol_abs = float(np.mean(np.var(Xc, axis=0)) * tol)
    labels, centers, inertia, n_iter = _kmeans_restarts(
        Xc, int(n_clusters), int(n_init), int(max_iter), tol_abs, seed
    )
    return labels, centers + mean, float(inertia), int(n_iter)
