"""Principal component analysis: the top ``k`` eigenpairs of the scatter matrix, no full copies.

Plain numpy (BLAS does the work, so there is nothing for Numba to speed up). Float32 input
stays float32 in the matrix products (accumulated in float64 between blocks), float64 stays
float64; the data is centred on the fly, block by block or through a rank-one correction,
never copied whole. Two solvers, chosen by the width d:

- d <= ``COVARIANCE_MAX_D``: the d x d scatter matrix summed over blocks of rows (one pass over
  the data, n d^2 / 2 multiply-adds), then its top k eigenpairs (a full ``eigh`` when d is
  small, else subspace iteration on the small matrix);
- wider: randomized subspace iteration on the data itself (Halko, Martinsson and Tropp 2011),
  k + 10 vectors, two passes per iteration until the top-k subspace stops moving (at most
  ``MAX_POWER_ITER`` iterations): linear in d.

The helpers here also serve the whitening step of :func:`fastica`.
"""

from __future__ import annotations

import numpy as np

_EPS = np.finfo(np.float64).eps
BLOCK_BYTES = 1 << 23  # rows per block: about 8 MiB of the input
COVARIANCE_MAX_D = 1024
EIGH_MAX_D = 384
OVERSAMPLE = 10
MAX_POWER_ITER = 15
SUBSPACE_TOL = 1e-7  # 1 - cos of the largest angle between successive top-k subspaces
RITZ_TOL = 1e-9  # residual of the top-k Ritz pairs, relative to the largest eigenvalue


def as_matrix(X: np.ndarray, name: str = "X") -> np.ndarray:
    """Return ``X`` as a finite, C-contiguous float64 matrix: the one layout kernels compile for."""
    X = np.ascontiguousarray(X, dtype=np.float64)
    _check(X, name)
    return X


def as_float_matrix(X: np.ndarray, name: str = "X") -> np.ndarray:
    """``X`` as a finite float32 or float64 matrix, without a copy when it already is one
    (other dtypes become float64). The finiteness check runs block by block."""
    X = np.asarray(X)
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
    _check(X, name)
    return X


def _check(X: np.ndarray, name: str) -> None:
    if X.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {X.shape}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {X.shape})")
    for block in _blocks(X):
        if not np.isfinite(block).all():
            raise ValueError(f"{name} holds NaN or infinite values")


def all_finite(X: np.ndarray) -> bool:
    """Whether every entry of ``X`` is finite, checked block by block (no N x D temporary)."""
    X = np.asarray(X)
    if X.ndim != 2 or X.dtype.kind not in "fc":
        return bool(np.isfinite(X).all())
    return all(np.isfinite(block).all() for block in _blocks(X))


def _blocks(X: np.ndarray):
    """Views of consecutive blocks of rows, each about ``BLOCK_BYTES``."""
    step = max(1, BLOCK_BYTES // max(1, X.shape[1] * X.itemsize))
    for start in range(0, X.shape[0], step):
        yield X[start : start + step]


def column_stats(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean (float64) and whether the column varies at all (max - min > 1e-12),
    in buffered reductions: no float64 copy of X."""
    mean = X.mean(axis=0, dtype=np.float64)
    spread = X.max(axis=0).astype(np.float64) - X.min(axis=0)
    return mean, spread > 1e-12


def _flip_signs(V: np.ndarray) -> np.ndarray:
    """Make the largest-magnitude entry of every column positive, so results do not depend on
    the sign LAPACK happens to return."""
    rows = np.argmax(np.abs(V), axis=0)
    signs = np.sign(V[rows, np.arange(V.shape[1])])
    signs[signs == 0] = 1.0
    return V * signs


def _scatter(X: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """(X - mean)^T (X - mean) in float64, summed over centred blocks of rows (each block's
    product in X's dtype)."""
    d = X.shape[1]
    C = np.zeros((d, d))
    m = mean.astype(X.dtype)
    for block in _blocks(X):
        with np.errstate(over="ignore", invalid="ignore"):
            b = block - m
            P = b.T @ b
        if not np.isfinite(P).all():  # X's dtype overflowed (values near its limit): float64
            b = block.astype(np.float64) - mean
            P = b.T @ b
        C += P
    return C


def top_eigh_sym(M: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` eigenpairs of a symmetric positive semi-definite float64 matrix, largest first.

    A full ``eigh`` up to ``EIGH_MAX_D``; above, subspace iteration with Rayleigh-Ritz on
    2k + 10 vectors until every top-k residual is below ``RITZ_TOL`` times the largest
    eigenvalue (a few hundred products at most).
    """
    d = M.shape[0]
    if d <= EIGH_MAX_D or 4 * k >= d:
        w, V = np.linalg.eigh(M)
        return w[::-1][:k].copy(), np.ascontiguousarray(V[:, ::-1][:, :k])
    width = min(d, 2 * k + OVERSAMPLE)
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, width)))
    for _ in range(500):
        Y = M @ Q
        theta, S = np.linalg.eigh(Q.T @ Y)
        theta, S = theta[::-1], S[:, ::-1]
        X = Q @ S[:, :k]
        R = Y @ S[:, :k] - X * theta[:k]
        if np.linalg.norm(R, axis=0).max() <= RITZ_TOL * max(theta[0], 1e-300):
            break
        Q, _ = np.linalg.qr(Y @ S)
    return theta[:k].copy(), np.ascontiguousarray(X)


def _matmul_centred(X: np.ndarray, mean: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """(X - mean) @ Q in float64, as X @ Q in X's dtype less the rank-one term mean @ Q (in
    float64 where X's dtype overflows: values near its limit)."""
    with np.errstate(over="ignore", invalid="ignore"):
        Y = X @ Q.astype(X.dtype)
    if not np.isfinite(Y).all():
        Y = X.astype(np.float64) @ Q
    return Y.astype(np.float64) - mean @ Q


def _randomized(
    X: np.ndarray, mean: np.ndarray, k: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` eigenpairs of the scatter of X - mean by randomized subspace iteration.

    Each iteration: Y = Xc V (one pass), Q = orth(Y), Z = Xc^T Q (a second pass); the left
    singular vectors of Z span the new V and its singular values are the Ritz values. Stops
    when the top-k subspace moves less than ``SUBSPACE_TOL`` between iterations.
    """
    n, d = X.shape
    width = min(k + OVERSAMPLE, n, d)
    V = np.random.default_rng(seed).standard_normal((d, width))
    ones_mean = mean[:, None]
    prev = None
    for _ in range(MAX_POWER_ITER):
        Q, _ = np.linalg.qr(_matmul_centred(X, mean, V))
        with np.errstate(over="ignore", invalid="ignore"):
            XtQ = X.T @ Q.astype(X.dtype)
        if not np.isfinite(XtQ).all():  # X's dtype overflowed: float64
            XtQ = X.T.astype(np.float64) @ Q
        Z = XtQ.astype(np.float64) - ones_mean * Q.sum(axis=0)
        V, s, _ = np.linalg.svd(Z, full_matrices=False)
        top = V[:, :k]
        if prev is not None:
            cos = np.linalg.svd(prev.T @ top, compute_uv=False)
            if 1.0 - cos.min() < SUBSPACE_TOL:
                break
        prev = top
    return s[:k] ** 2, np.ascontiguousarray(V[:, :k])


def top_components(
    X: np.ndarray, k: int, mean: np.ndarray | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` eigenpairs of the scatter matrix (X - mean)^T (X - mean), largest first.

    Returns (eigenvalues [k] >= 0, unit eigenvectors [d, k] with each largest-magnitude
    entry positive). ``mean`` defaults to the column means. X is never copied whole.
    """
    X = as_float_matrix(X)
    d = X.shape[1]
    if mean is None:
        mean = X.mean(axis=0, dtype=np.float64)
    if d <= COVARIANCE_MAX_D:
        w, V = top_eigh_sym(_scatter(X, mean), k, seed)
    else:
        w, V = _randomized(X, mean, k, seed)
    w[w < 0.0] = 0.0
    return w, np.ascontiguousarray(_flip_signs(V))


def top_eigh(Xc: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` eigenpairs of the scatter matrix ``Xc.T @ Xc`` of centered data, largest first
    (see :func:`top_components`)."""
    return top_components(Xc, k, mean=np.zeros(Xc.shape[1]))


def project(X: np.ndarray, mean: np.ndarray, V: np.ndarray) -> np.ndarray:
    """(X - mean) @ V in float64 [n, k], without a copy of X: X's dtype in the product, the
    mean as a rank-one correction."""
    return np.ascontiguousarray(_matmul_centred(X, mean, V))


def pca(
    X: np.ndarray,
    n_components: int = 10,
    *,
    whiten: bool = False,
    mean: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Project centered ``X`` on its top principal axes.

    Returns (Z [n, k] projections, components [k, d], explained_variance [k]) with
    k = min(n_components, n, d); variances use the n - 1 denominator (as scikit-learn). Each
    component's largest-magnitude loading is positive. ``whiten`` scales every projection to
    unit variance (zero-variance projections stay zero). Float32 input is computed in float32
    (results in float64); ``mean``, when the caller has the column means already, saves a pass.
    """
    X = as_float_matrix(X)
    n, d = X.shape
    if n < 2:
        raise ValueError("pca needs at least 2 samples")
    if n_components < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    k = min(int(n_components), n, d)
    if mean is None:
        mean = X.mean(axis=0, dtype=np.float64)
    w, V = top_components(X, k, mean)
    explained_variance = w / (n - 1)
    Z = project(X, mean, V)
    if whiten:
        scale = np.sqrt(explained_variance)
        live = scale > 0.0
        Z[:, live] /= scale[live]
        Z[:, ~live] = 0.0
    return Z, np.ascontiguousarray(V.T), explained_variance
