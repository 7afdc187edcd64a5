"""Neighbour search of the transfer test: backdoorscan's knn against two plain alternatives.

The transfer test asks, for 100 members of a candidate cluster, their 10 nearest inputs (64-dim
sketches) among a reference set: 8,192 sampled inputs during screening, the whole data set
(about 66,000 on MNIST) for a confirmed trigger. Contenders, interleaved in one process, on the
same seeded data:

- ``backdoorscan``: BLAS dot products per block, one compiled pass keeping the k best per row;
- ``argpartition``: the same blocks, float64 distances and ``np.argpartition`` per block (what
  the scanner did before);
- ``scikit-learn``: ``NearestNeighbors(algorithm="brute")`` fit on the reference set, then
  ``kneighbors``.

All three must return the same neighbours. BLAS and OpenMP are held to one thread (a scan
holds BLAS to one; the compiled pass has one).

    python benchmarks/bench_knn.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from backdoorscan.kernels.knn import BLOCK, knn


def knn_argpartition(Q: np.ndarray, R: np.ndarray, k: int) -> np.ndarray:
    """The previous implementation: float64 distances per block, argpartition, lexsort merge."""
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
    return best_i


def knn_sklearn(Q: np.ndarray, R: np.ndarray, k: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    return NearestNeighbors(n_neighbors=k, algorithm="brute").fit(R).kneighbors(Q)[1]


def main() -> None:
    """Time the three contenders on the screening and the confirmation sizes; print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    contenders: dict[str, Callable[[np.ndarray, np.ndarray, int], np.ndarray]] = {
        "backdoorscan": lambda Q, R, k: knn(Q, R, k)[0],
        "argpartition": knn_argpartition,
        "scikit-learn": knn_sklearn,
    }
    print(f"{platform.machine()}, BLAS and OpenMP 1 thread, median of {args.repeats}, k = {args.k}")
    print(
        "| reference rows | backdoorscan ms | argpartition ms | scikit-learn ms "
        "| argpartition / backdoorscan | scikit-learn / backdoorscan |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    with threadpool_limits(limits=1):  # BLAS and OpenMP (scikit-learn's own loops)
        knn(np.zeros((2, 4), np.float32), np.ones((5, 4), np.float32), 2)  # compile or load
        for n_ref in (8192, 66000):
            R = rng.normal(size=(n_ref, 64)).astype(np.float32)
            Q = (R[rng.choice(n_ref, args.queries, replace=False)] + 0.1).astype(np.float32)
            answers = {name: fn(Q, R, args.k) for name, fn in contenders.items()}
            first = answers["backdoorscan"]
            assert all(np.array_equal(first, a) for a in answers.values()), "results differ"
            times: dict[str, list[float]] = {name: [] for name in contenders}
            for _ in range(args.repeats):
                for name, fn in contenders.items():
                    t = time.perf_counter()
                    fn(Q, R, args.k)
                    times[name].append(time.perf_counter() - t)
            ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
            b = ms["backdoorscan"]
            print(
                f"| {n_ref:,} | {b:.2f} | {ms['argpartition']:.2f} | {ms['scikit-learn']:.2f} "
                f"| {ms['argpartition'] / b:.1f} | {ms['scikit-learn'] / b:.1f} |"
            )


if __name__ == "__main__":
    main()
