"""FastICA (parallel fixed-point algorithm, logcosh contrast, symmetric decorrelation).

Whitening is the top-k eigenproblem of the covariance in numpy (``pca.top_components``); the
fixed-point iterations run in one Numba kernel (a pass of plain loops per iteration, no BLAS
threads), its k x k symmetric decorrelation by Jacobi sweeps: the compiled code calls no
BLAS or LAPACK, whose numba bindings import scipy.linalg in every process that loads them.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .pca import _EPS, as_float_matrix, as_matrix, project, top_components


@njit(cache=True, nogil=True)
def _standard_normal(k: int, seed: int) -> np.ndarray:
    """A seeded k x k standard normal matrix: the initial unmixing of the whitened data."""
    np.random.seed(seed)
    W = np.empty((k, k))
    for i in range(k):
        for j in range(k):
            W[i, j] = np.random.normal(0.0, 1.0)
    return W


@njit(cache=True, nogil=True)
def _jacobi_eigh(A: np.ndarray, V: np.ndarray) -> None:
    """Eigen-decomposition of the small symmetric matrix A in place, by cyclic Jacobi sweeps:
    A ends (numerically) diagonal, holding the eigenvalues, and V (identity on entry) the
    eigenvectors as columns. Plain loops: no LAPACK, so loading the compiled kernel imports
    nothing more (numba's eigh goes through scipy.linalg, 0.3 s per process)."""
    k = A.shape[0]
    for _ in range(100):
        off = 0.0
        diag = 0.0
        for p in range(k):
            diag += A[p, p] * A[p, p]
            for q in range(p + 1, k):
                off += A[p, q] * A[p, q]
        if off <= 1e-32 * diag or off == 0.0:
            return
        for p in range(k - 1):
            for q in range(p + 1, k):
                apq = A[p, q]
                if apq == 0.0:
                    continue
                tau = (A[q, q] - A[p, p]) / (2.0 * apq)
                t = 1.0 / (abs(tau) + np.sqrt(1.0 + tau * tau))
                if tau < 0.0:
                    t = -t
                c = 1.0 / np.sqrt(1.0 + t * t)
                s = t * c
                for r in range(k):  # A <- A J
                    arp, arq = A[r, p], A[r, q]
                    A[r, p] = c * arp - s * arq
                    A[r, q] = s * arp + c * arq
                for r in range(k):  # A <- J^T A
                    apr, aqr = A[p, r], A[q, r]
                    A[p, r] = c * apr - s * aqr
                    A[q, r] = s * apr + c * aqr
                for r in range(k):  # V <- V J
                    vrp, vrq = V[r, p], V[r, q]
                    V[r, p] = c * vrp - s * vrq
                    V[r, q] = s * vrp + c * vrq


@njit(cache=True, nogil=True)
def _sym_decorrelation(W: np.ndarray) -> np.ndarray:
    """W <- (W W^T)^{-1/2} W, which makes the rows of W orthonormal without favouring any.

    k is about 10: loops and a Jacobi eigensolver, no BLAS or LAPACK call."""
    k, m = W.shape
    A = np.zeros((k, k))
    for i in range(k):
        for j in range(i, k):
            acc = 0.0
            for c in range(m):
                acc += W[i, c] * W[j, c]
            A[i, j] = acc
            A[j, i] = acc
    u = np.eye(k)
    _jacobi_eigh(A, u)
    top = 0.0
    for j in range(k):
        top = max(top, A[j, j])
    floor = max(top, 1e-300) * 1e-15
    inv = np.empty(k)
    for j in range(k):
        inv[j] = 1.0 / np.sqrt(max(A[j, j], floor))
    # (u diag(inv) u^T) W
    S = np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            acc = 0.0
            for e in range(k):
                acc += u[i, e] * inv[e] * u[j, e]
            S[i, j] = acc
    out = np.zeros((k, m))
    for i in range(k):
        for j in range(k):
            sij = S[i, j]
            for c in range(m):
                out[i, c] += sij * W[j, c]
    return out


@njit(cache=True, nogil=True)
def _tanh(x: float) -> float:
    """tanh through one exp: within 1 ulp in absolute terms and about 3x faster than libm's
    tanh, which Numba cannot vectorise."""
    e = np.exp(-2.0 * abs(x))
    t = (1.0 - e) / (1.0 + e)
    return t if x >= 0.0 else -t


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _fixed_point_sums(X1T: np.ndarray, W: np.ndarray, G: np.ndarray, E: np.ndarray, gp: np.ndarray):
    """One pass of the fixed-point update: G = tanh(W X1T), E = G X1T^T / n, gp = mean(1 - G^2).

    Plain loops over contiguous rows (reassociation lets LLVM vectorise the sums), so the
    kernel never hands these small products to a multi-threaded BLAS.
    """
    k, n = X1T.shape
    for j in range(k):
        for i in range(n):
            G[j, i] = 0.0
        for c in range(k):
            w = W[j, c]
            for i in range(n):
                G[j, i] += w * X1T[c, i]
        acc = 0.0
        for i in range(n):
            t = _tanh(G[j, i])
            G[j, i] = t
            acc += 1.0 - t * t
        gp[j] = acc / n
        for c in range(k):
            dot = 0.0
            for i in range(n):
                dot += G[j, i] * X1T[c, i]
            E[j, c] = dot / n


@njit(cache=True, nogil=True)
def _fastica_par(X1T: np.ndarray, W0: np.ndarray, max_iter: int, tol: float):
    """Parallel FastICA on whitened data X1T [k, n] (one row per component) from W0 [k, k].

    Returns (W [k, k], n_iter). Stops when max_j | |<w_j new, w_j old>| - 1 | < tol; n_iter is
    then the iteration count, and max_iter when the tolerance was not met.
    """
    k, n = X1T.shape
    W = _sym_decorrelation(W0)
    G = np.empty((k, n))
    E = np.empty((k, k))
    gp = np.empty(k)
    W1 = np.empty((k, k))
    n_iter = max_iter
    for it in range(max_iter):
        _fixed_point_sums(X1T, W, G, E, gp)
        for j in range(k):
            for col in range(k):
                W1[j, col] = E[j, col] - gp[j] * W[j, col]
        W_new = _sym_decorrelation(W1)
        lim = 0.0
        for j in range(k):
            dot = 0.0
            for col in range(k):
                dot += W_new[j, col] * W[j, col]
            lim = max(lim, abs(abs(dot) - 1.0))
        W = W_new
        if lim < tol:
            n_iter = it + 1
            break
    return W, n_iter


def fastica(
    X: np.ndarray,
    n_components: int = 10,
    *,
    max_iter: int = 200,
    tol: float = 1e-4,
    random_state: int = 0,
    whitening: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Unmix X into independent, unit-variance sources with FastICA (logcosh, alpha = 1).

    Returns (S [n, k] sources, unmixing [k, d] with S = (X - X.mean(0)) @ unmixing.T, n_iter).
    ``n_iter == max_iter`` means NOT converged (a run that meets ``tol`` on its very last
    allowed iteration also reads so). k = min(n_components, n, d, rank of X). Sources come in
    no particular order; each unmixing row has its largest-magnitude entry positive.
    ``whitening``, when the caller has them (a PCA of the same X), is the top eigenpairs
    (values [>= k], unit vectors [d, >= k], largest first) of the scatter of X less its
    column means; they are then not computed again, and a float32 X stays float32 in the
    products (no float64 copy). The iterations run on the k x n whitened data in float64.
    """
    # Without a given whitening the fit is float64 throughout (float32 products shift the
    # outcome of a FastICA that has not converged); with one, X's own dtype in the products.
    X = as_float_matrix(X) if whitening is not None else as_matrix(X)
    n, d = X.shape
    if n < 2:
        raise ValueError("fastica needs at least 2 samples")
    if n_components < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    seed = int(random_state)
    if not 0 <= seed < 2**32:
        raise ValueError(f"random_state must be an integer in [0, 2**32), got {random_state}")
    k = min(int(n_components), n, d)
    mean = X.mean(axis=0, dtype=np.float64)
    if whitening is None:
        w, V = top_components(X, k, mean)
    else:
        w, V = (np.asarray(a, dtype=np.float64) for a in whitening)
        if w.ndim != 1 or V.shape != (d, len(w)) or len(w) < k:
            raise ValueError(f"whitening must hold at least {k} eigenpairs of a {d}-wide X")
        w, V = w[:k], V[:, :k]
    if w[0] <= 0.0:
        raise ValueError("fastica: X has no variance")
    k = int(np.count_nonzero(w > w[0] * max(n, d) * _EPS))
    var = w[:k] / n
    K = np.ascontiguousarray((V[:, :k] / np.sqrt(var)).T)  # whitening: [k, d]
    X1T = np.ascontiguousarray(project(X, mean, K.T).T)  # whitened data, one row per component
    W, n_iter = _fastica_par(X1T, _standard_normal(k, seed), int(max_iter), float(tol))
    unmixing = W @ K
    rows = np.argmax(np.abs(unmixing), axis=1)
    signs = np.where(unmixing[np.arange(k), rows] < 0.0, -1.0, 1.0)
    unmixing = np.ascontiguousarray(unmixing * signs[:, None])
    S = project(X, mean, unmixing.T)
    return S, unmixing, int(n_iter)
