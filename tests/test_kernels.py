"""The compiled clustering core against scikit-learn, on data whose structure is known."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.decomposition import PCA, FastICA
from sklearn.metrics import adjusted_rand_score
from sklearn.metrics import silhouette_samples as sk_silhouette_samples

import backdoorscan.kernels as package
from backdoorscan.kernels import fastica, kmeans, pca, silhouette_samples, silhouette_score
from backdoorscan.kernels.kmeans import _lloyd

# --------------------------------------------------------------------------------------- ICA


@pytest.fixture(scope="module")
def mixed_sources() -> tuple[np.ndarray, np.ndarray]:
    """Four non-Gaussian sources mixed linearly into eight observed dimensions (no noise)."""
    rng = np.random.default_rng(42)
    n = 3000
    t = np.arange(n)
    sources = np.column_stack(
        [
            rng.uniform(-1.0, 1.0, n),
            rng.laplace(size=n),
            np.sign(np.sin(t * 0.031)),
            rng.exponential(size=n) - 1.0,
        ]
    )
    mixing = rng.normal(size=(8, 4))
    return sources @ mixing.T + rng.normal(size=8), sources


def _matched_abs_corr(estimated: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Absolute correlation of each true source with its Hungarian-matched estimate."""
    k = truth.shape[1]
    corr = np.abs(np.corrcoef(estimated.T, truth.T)[: estimated.shape[1], estimated.shape[1] :])
    rows, cols = linear_sum_assignment(-corr)
    assert len(cols) == k
    return corr[rows, cols]


def test_fastica_recovers_sources_like_sklearn(mixed_sources):
    X, truth = mixed_sources
    S, unmixing, n_iter = fastica(X, 4, random_state=0)
    assert S.shape == (3000, 4) and unmixing.shape == (4, 8)
    assert n_iter < 200  # converged
    assert _matched_abs_corr(S, truth).min() >= 0.99
    sk = FastICA(n_components=4, whiten="unit-variance", random_state=0).fit_transform(X)
    assert _matched_abs_corr(sk, truth).min() >= 0.99
    # the same sources as scikit-learn's, up to order and sign
    assert _matched_abs_corr(S, sk).min() >= 0.99
    # the unmixing maps centered X to S, and the sources have unit variance
    np.testing.assert_allclose(S, (X - X.mean(axis=0)) @ unmixing.T, atol=1e-10)
    np.testing.assert_allclose(S.std(axis=0), 1.0, atol=1e-8)


def test_fastica_is_deterministic_and_seed_independent_in_outcome(mixed_sources):
    X, truth = mixed_sources
    a = fastica(X, 4, random_state=3)
    b = fastica(X, 4, random_state=3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]
    c = fastica(X, 4, random_state=11)
    assert _matched_abs_corr(c[0], truth).min() >= 0.99  # another start, the same sources


def test_fastica_reports_non_convergence_and_clips_to_rank(mixed_sources):
    X, _ = mixed_sources
    _, _, n_iter = fastica(X, 4, max_iter=2, tol=1e-12)
    assert n_iter == 2  # n_iter == max_iter: not converged
    S, unmixing, _ = fastica(X, 10)  # X has rank 4: only 4 sources exist
    assert S.shape == (3000, 4) and unmixing.shape == (4, 8)


def test_fastica_float32_input(mixed_sources):
    X, truth = mixed_sources
    S, _, _ = fastica(X.astype(np.float32), 4)
    assert S.dtype == np.float64
    assert _matched_abs_corr(S, truth).min() >= 0.99


# --------------------------------------------------------------------------------------- PCA


def _align_signs(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Flip the columns of A to agree in sign with B."""
    return A * np.where(np.sum(A * B, axis=0) < 0, -1.0, 1.0)


@pytest.mark.parametrize("shape", [(500, 12), (40, 100)])
@pytest.mark.parametrize("whiten", [False, True])
def test_pca_matches_sklearn(shape, whiten):
    rng = np.random.default_rng(1)
    n, d = shape
    # distinct variances so that every axis is well defined
    X = rng.normal(size=(n, d)) * np.linspace(5.0, 0.5, d) @ rng.normal(size=(d, d))
    X += rng.normal(size=d)
    Z, components, ev = pca(X, 10, whiten=whiten)
    ref = PCA(n_components=10, whiten=whiten).fit(X)
    Zs = ref.transform(X)
    np.testing.assert_allclose(_align_signs(Z, Zs), Zs, atol=1e-6)
    np.testing.assert_allclose(ev, ref.explained_variance_, rtol=1e-8)
    np.testing.assert_allclose(
        _align_signs(components.T, ref.components_.T).T, ref.components_, atol=1e-6
    )
    # sign convention: largest-magnitude loading is positive
    rows = np.argmax(np.abs(components), axis=1)
    assert (components[np.arange(components.shape[0]), rows] > 0).all()


def test_pca_clips_components_to_samples():
    X = np.random.default_rng(2).normal(size=(5, 30))
    Z, components, ev = pca(X, 10)
    assert Z.shape == (5, 5) and components.shape == (5, 30) and ev.shape == (5,)
    assert ev[-1] < 1e-10 * ev[0]  # 5 centered samples span only 4 directions
    ref = PCA(n_components=4).fit(X)
    np.testing.assert_allclose(ev[:4], ref.explained_variance_, rtol=1e-8)


# ----------------------------------------------------------------------------------- k-means


def test_kmeans_separable_blobs_match_sklearn_and_truth():
    X, y = make_blobs(n_samples=2000, n_features=6, centers=4, cluster_std=1.0, random_state=5)
    labels, centers, inertia, n_iter = kmeans(X, 4, random_state=0)
    assert labels.dtype == np.int64 and labels.shape == (2000,) and centers.shape == (4, 6)
    assert 1 <= n_iter < 300
    ref = KMeans(n_clusters=4, n_init=10, random_state=0).fit(X)
    assert adjusted_rand_score(y, labels) >= 0.99
    assert adjusted_rand_score(ref.labels_, labels) >= 0.99
    assert inertia == pytest.approx(ref.inertia_, rel=1e-4)
    # inertia is what the labels and centers say
    assert inertia == pytest.approx(((X - centers[labels]) ** 2).sum(), rel=1e-12)


@pytest.fixture(scope="module")
def elongated_with_small_cluster() -> tuple[np.ndarray, np.ndarray]:
    """An elongated majority (900) and a tight 10 % cluster: splitting the majority in half is a
    local minimum that a single k-means++ start often lands in."""
    rng = np.random.default_rng(7)
    big = rng.normal(size=(900, 2)) * [2.5, 1.0]
    small = rng.normal(scale=0.5, size=(100, 2)) + np.array([0.0, 8.0])
    return np.vstack([big, small]), np.r_[np.zeros(900), np.ones(100)]


def test_kmeans_restarts_escape_a_bad_single_start(elongated_with_small_cluster):
    X, y = elongated_with_small_cluster
    single = np.array([kmeans(X, 2, n_init=1, random_state=s)[2] for s in range(20)])
    labels, _, best, _ = kmeans(X, 2, n_init=10, random_state=0)
    assert (single > 1.05 * best).sum() >= 3  # some single starts land badly
    assert best <= single.min() * (1 + 1e-12)
    assert adjusted_rand_score(y, labels) >= 0.99  # the best split isolates the small cluster
    ref = KMeans(n_clusters=2, n_init=10, random_state=0).fit(X)
    assert best == pytest.approx(ref.inertia_, rel=1e-4)
    for seed in range(1, 4):
        assert kmeans(X, 2, n_init=10, random_state=seed)[2] == pytest.approx(best, rel=1e-9)


def test_kmeans_is_deterministic_for_a_seed(elongated_with_small_cluster):
    X, _ = elongated_with_small_cluster
    a = kmeans(X, 3, n_init=3, random_state=9)
    b = kmeans(X, 3, n_init=3, random_state=9)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2:] == b[2:]


def test_lloyd_reseeds_an_empty_cluster_like_sklearn():
    X = np.random.default_rng(3).normal(size=(300, 3))
    init = np.array([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [100.0, 100.0, 100.0]])  # last gets nobody
    labels, centers, inertia, n_iter = _lloyd(X, init, 300, 1e-8)
    assert np.bincount(labels, minlength=3).min() > 0
    assert np.isfinite(centers).all()
    ref = KMeans(n_clusters=3, init=init, n_init=1).fit(X)
    assert inertia == pytest.approx(ref.inertia_, rel=1e-9)
    assert adjusted_rand_score(ref.labels_, labels) == 1.0
    assert n_iter == ref.n_iter_


def test_kmeans_more_clusters_than_distinct_points_does_not_crash():
    X = np.repeat(np.array([[0.0, 0.0], [1.0, 1.0]]), 50, axis=0)
    labels, centers, inertia, _ = kmeans(X, 3)
    assert inertia == 0.0
    assert labels.min() >= 0 and labels.max() < 3 and np.isfinite(centers).all()
    assert len(set(labels[:50])) == 1 and len(set(labels[50:])) == 1 and labels[0] != labels[50]


def test_kmeans_rejects_too_few_samples():
    with pytest.raises(ValueError):
        kmeans(np.zeros((2, 3)), 3)


# -------------------------------------------------------------------------------- silhouette


def _label_sets() -> list[tuple[np.ndarray, np.ndarray]]:
    X2, y2 = make_blobs(n_samples=300, n_features=4, centers=2, random_state=0)
    X3, y3 = make_blobs(n_samples=400, n_features=5, centers=3, cluster_std=2.5, random_state=1)
    y_single = y3.copy()
    y_single[17] = 99  # a singleton cluster
    noisy = np.random.default_rng(4).integers(0, 3, size=400) * 10 - 5  # arbitrary values
    return [(X2, y2), (X3, y3), (X3, y_single), (X3, noisy)]


@pytest.mark.parametrize("case", range(4))
def test_silhouette_matches_sklearn(case):
    X, y = _label_sets()[case]
    ours = silhouette_samples(X, y)
    ref = sk_silhouette_samples(X, y)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert silhouette_score(X, y) == pytest.approx(ref.mean(), abs=1e-5)
    if case == 2:
        assert ours[17] == 0.0


def test_silhouette_sampled_is_close_and_deterministic():
    X, y = make_blobs(n_samples=6000, n_features=5, centers=3, cluster_std=3.0, random_state=2)
    exact = silhouette_score(X, y, max_exact=6000)
    assert exact == pytest.approx(float(np.mean(silhouette_samples(X, y))))
    sampled = silhouette_score(X, y)  # n > max_exact: 4000-sample subset
    assert sampled != exact
    assert sampled == pytest.approx(exact, abs=0.01)
    assert silhouette_score(X, y) == sampled
    small = silhouette_score(X, y, sample_size=1000, random_state=5)
    assert small == silhouette_score(X, y, sample_size=1000, random_state=5)
    assert small == pytest.approx(exact, abs=0.03)


def test_silhouette_rejects_a_single_label():
    X = np.random.default_rng(0).normal(size=(50, 3))
    with pytest.raises(ValueError):
        silhouette_score(X, np.zeros(50, dtype=int))
    with pytest.raises(ValueError):
        silhouette_samples(X, np.arange(50))  # every sample its own cluster


def test_kernels_import_only_numpy_and_numba():
    """The package boundary: kernels/ depends on numpy and numba alone (and the standard
    library: the compile notice writes to sys.stderr)."""
    import sys

    allowed = {"numpy", "numba", "__future__", *sys.stdlib_module_names}
    for path in Path(package.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


# ----------------------------------------------------------------------- detect's BLAS limit


def test_detect_holds_blas_to_one_thread_around_the_class_work(monkeypatch):
    """detect() called straight from Python (no scan() around it) runs its classes on threads;
    BLAS must be held to one thread inside, or each class thread's products start a BLAS pool
    of their own."""
    from threadpoolctl import threadpool_info

    from backdoorscan import detect
    from backdoorscan.scanner import detect as detect_module

    seen: list[int] = []
    reduce = detect_module.reduce_features

    def spy(*args, **kwargs):
        seen.extend(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
        return reduce(*args, **kwargs)

    monkeypatch.setattr(detect_module, "reduce_features", spy)
    rng = np.random.default_rng(0)
    detect(rng.normal(size=(200, 16)), np.arange(200) % 2, rule=("size", "separation"))
    assert seen and set(seen) == {1}


# ------------------------------------------------------------- PCA: top-k solvers in float32


def _clear_spectrum(n: int, d: int, seed: int = 0) -> np.ndarray:
    """float32 data with 10 well separated variances over a noise floor, off-centre."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(d, 10)))
    scales = np.geomspace(20.0, 3.0, 10)
    X = (rng.normal(size=(n, 10)) * scales) @ basis.T + rng.normal(scale=0.3, size=(n, d))
    return (X + rng.normal(size=d) * 5.0).astype(np.float32)


@pytest.mark.parametrize("d", [100, 600, 1500])  # full eigh, subspace iteration, randomized
def test_pca_float32_top_k_matches_sklearn(d):
    X = _clear_spectrum(3000, d)
    Z, components, ev = pca(X, 10)
    ref = PCA(n_components=10, svd_solver="full").fit(X.astype(np.float64))
    corr = np.abs(np.sum(components * ref.components_, axis=1))
    assert corr.min() > 0.999
    np.testing.assert_allclose(ev, ref.explained_variance_, rtol=1e-3)
    Zs = ref.transform(X.astype(np.float64))
    np.testing.assert_allclose(_align_signs(Z, Zs), Zs, atol=1e-3 * np.abs(Zs).max())


def test_pca_never_copies_the_data_whole():
    """Peak of numpy allocations (tracemalloc sees them) during pca of a float32 class: blocks,
    d x d and n x k arrays. Doubling n must not add a copy of the data (a full copy of X, or a
    float64 or centred one, would add at least X.nbytes)."""
    import tracemalloc

    for d in (600, 1500):
        peaks = []
        for n in (10000, 20000):
            X = _clear_spectrum(n, d)
            tracemalloc.start()
            pca(X, 10)
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
        half = 10000 * d * 4
        assert peaks[1] - peaks[0] < 0.25 * half, (d, peaks, half)
        assert peaks[1] < 2 * half, (d, peaks, half)


# --------------------------------------------------------------------- FastICA's Jacobi step


def test_sym_decorrelation_matches_the_eigh_formula():
    from backdoorscan.kernels.ica import _sym_decorrelation

    rng = np.random.default_rng(5)
    for k in (1, 2, 10, 16):
        W = rng.normal(size=(k, k))
        s, u = np.linalg.eigh(W @ W.T)
        expected = (u / np.sqrt(s)) @ u.T @ W
        got = _sym_decorrelation(W)
        np.testing.assert_allclose(got, expected, atol=1e-10)
        np.testing.assert_allclose(got @ got.T, np.eye(k), atol=1e-10)


def test_fastica_loads_without_lapack_in_the_kernel():
    """The compiled FastICA kernel calls no LAPACK routine (numba's eigh binds scipy's)."""
    import inspect

    from backdoorscan.kernels import ica

    assert "linalg" not in inspect.getsource(ica._fastica_par)
    assert "linalg" not in inspect.getsource(ica._sym_decorrelation)


# ----------------------------------------------------------------- the compile notice


def test_compile_notice_once_with_an_empty_cache_and_never_when_warm(tmp_path):
    import os
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from backdoorscan.kernels import silhouette_samples\n"
        "X = np.random.default_rng(0).normal(size=(40, 3))\n"
        "silhouette_samples(X, np.arange(40) % 2)\n"
        "silhouette_samples(X, np.arange(40) % 3)\n"
    )
    root = Path(package.__file__).parents[2]
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), PYTHONPATH=str(root))
    notice = "compiling the clustering kernels (first run only: Numba caches them on disk)..."
    runs = [
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        for _ in range(2)
    ]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    assert runs[0].stderr.count(notice) == 1
    assert notice not in runs[1].stderr


# ------------------------------------------------------------------------- column medians


def test_column_medians_equal_numpy_on_rows_masks_ties_and_signed_zeros():
    from backdoorscan.kernels import column_medians

    rng = np.random.default_rng(5)
    for trial in range(60):
        n, d = int(rng.integers(1, 120)), int(rng.integers(1, 70))
        dtype = (np.float32, np.float64)[trial % 2]
        X = (rng.standard_normal((n, d)) * 10.0 ** rng.integers(-6, 6)).astype(dtype)
        X[rng.random((n, d)) < 0.3] = 0.0  # ReLU-like ties
        X[rng.random((n, d)) < 0.1] = -0.0
        mask = rng.random(n) < 0.6
        if not mask.any():
            continue
        want = np.median(X[mask].astype(np.float64), axis=0)
        np.testing.assert_array_equal(column_medians(X, mask), want)
        np.testing.assert_array_equal(column_medians(X, np.flatnonzero(mask)), want)
        np.testing.assert_array_equal(column_medians(X), np.median(X.astype(np.float64), axis=0))
    with pytest.raises(ValueError):
        column_medians(np.zeros((3, 2)), np.zeros(3, dtype=bool))


def test_fastica_with_pca_whitening_recovers_the_same_sources(mixed_sources):
    """Whitening from a PCA of the same X (the detector reuses it) unmixes as well."""
    X, truth = mixed_sources
    _, components, variance = pca(X, 4)
    S, unmixing, _ = fastica(X, 4, whitening=(variance * (len(X) - 1), components.T))
    assert _matched_abs_corr(S, truth).min() > 0.99
    S0, _, _ = fastica(X, 4)
    assert _matched_abs_corr(S, S0).min() > 0.999
    np.testing.assert_allclose(S, (X - X.mean(axis=0)) @ unmixing.T, atol=1e-8)
    with pytest.raises(ValueError):
        fastica(X, 4, whitening=(variance[:2], components.T[:, :2]))
