"""Principal component analysis by eigendecomposition of the covariance (or Gram) matrix.

Plain numpy: one symmetric eigendecomposition does the work, so there is nothing for Numba to
speed up. The helpers here also serve the whitening step of :func:`fastica`.
"""

from __future__ import annotations

import numpy as np

_EPS = np.finfo(np.float64).eps


def as_matrix(X: np.ndarray, name: str = "X") -> np.ndarray:
    """Return ``X`` as a finite, C-contiguous float64 matrix: the one layout kernels compile for."""
    X = np.ascontiguousarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {X.shape}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {X.shape})")
    if not np.isfinite(X).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return X


def _flip_signs(V: np.ndarray) -> np.ndarray:
    """Make the largest-magnitude entry of every column positive, so results do not depend on
    the sign LAPACK happens to return."""
    rows = np.argmax(np.abs(V), axis=0)
    signs = np.sign(V[rows, np.arange(V.shape[1])])
    signs[signs == 0] = 1.0
    return V * signs


def top_eigh(Xc: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` eigenpairs of the scatter matrix ``Xc.T @ Xc`` of centered data, largest first.

    Works on the d x d scatter when d <= n and on the n x n Gram matrix otherwise, so a class of
    a few hundred samples with thousands of features stays cheap. Returns (eigenvalues [k] >= 0,
    unit eigenvectors [d, k]); directions of (numerically) zero variance found through the Gram
    matrix come back as zero vectors with eigenvalue 0.
    """
    n, d = Xc.shape
    if d <= n:
        w, V = np.linalg.eigh(Xc.T @ Xc)
        w = w[::-1][:k].copy()
        V = V[:, ::-1][:, :k]
        w[w < 0.0] = 0.0
    else:
        w, U = np.linalg.eigh(Xc @ Xc.T)
        w = w[::-1][:k].copy()
        U = U[:, ::-1][:, :k]
        w[w < 0.0] = 0.0
        V = Xc.T @ U
        norms = np.linalg.norm(V, axis=0)
        null = w <= (w[0] if w.size else 0.0) * max(n, d) * _EPS
        V[:, ~null] /= norms[~null]
        V[:, null] = 0.0
        w[null] = 0.0
    return w, np.ascontiguousarray(_flip_signs(V))


def pca(
    X: np.ndarray, n_components: int = 10, *, whiten: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Project centered ``X`` on its top principal axes.

    Returns (Z [n, k] projections, components [k, d], explained_variance [k]) with
    k = min(n_components, n, d); variances use the n - 1 denominator (as scikit-learn). Each
    component's largest-magnitude loading is positive. ``whiten`` scales every projection to
    unit variance (zero-variance projections stay zero).
    """
    X = as_matrix(X)
    n, d = X.shape
    if n < 2:
        raise ValueError("pca needs at least 2 samples")
    if n_components < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    k = min(int(n_components), n, d)
    Xc = X - X.mean(axis=0)
    w, V = top_eigh(Xc, k)
    explained_variance = w / (n - 1)
    Z = Xc @ V
    if whiten:
        scale = np.sqrt(explained_variance)
        live = scale > 0.0
        Z[:, live] /= scale[live]
        Z[:, ~live] = 0.0
    return np.ascontiguousarray(Z), np.ascontiguousarray(V.T), explained_variance
