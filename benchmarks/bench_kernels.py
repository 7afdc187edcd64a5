"""Benchmark the Numba clustering core against scikit-learn on class-sized activations.

Run from the repository root:

    python benchmarks/bench_kernels.py              # print the markdown report
    python benchmarks/bench_kernels.py --write      # also replace "## Kernels" in RESULTS.md

Data: 6,000 x 128 float32 "activations" (ReLU of a low-rank Gaussian code plus noise, about
half zeros) with a planted 10 % cluster; each pipeline reduces to 10 dimensions and runs
k-means with k = 2 and 10 starts. COLD is import plus first call in a fresh process: for Numba
once with an empty NUMBA_CACHE_DIR (compilation included) and once more with the cache that
first process wrote. WARM is the median of several in-process repeats after one warm-up call.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

N_SAMPLES, N_FEATURES, POISON_FRACTION = 6000, 128, 0.10
N_COMPONENTS, N_CLUSTERS, N_INIT, SEED = 10, 2, 10, 0
SILHOUETTE_N = 4000


def make_activations(
    n: int = N_SAMPLES, d: int = N_FEATURES, poison_fraction: float = POISON_FRACTION, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """ReLU-like float32 features [n, d] and the truth (1 = planted cluster)."""
    rng = np.random.default_rng(seed)
    latent = 16
    code = rng.normal(size=(n, latent))
    truth = np.zeros(n, dtype=np.int64)
    truth[rng.permutation(n)[: round(poison_fraction * n)]] = 1
    code[truth == 1, :4] += 2.5  # the planted cluster: a shift in a few latent directions
    loadings = rng.normal(size=(latent, d)) / np.sqrt(latent)
    pre = code @ loadings + rng.normal(scale=0.5, size=(n, d)) + rng.normal(scale=0.5, size=d)
    return np.maximum(pre, 0.0).astype(np.float32), truth


# ------------------------------------------------------------------------------ contenders
# Each returns (labels or score, extra info); imports happen inside so that a fresh process
# pays for them in the COLD figure.


def numba_ica_kmeans(X: np.ndarray, seed: int = SEED) -> tuple[np.ndarray, dict]:
    from backdoorscan.kernels import fastica, kmeans

    S, _, n_iter = fastica(X, N_COMPONENTS, random_state=seed)
    labels = kmeans(S, N_CLUSTERS, n_init=N_INIT, random_state=seed)[0]
    return labels, {"ica_iter": n_iter}


def sklearn_ica_kmeans(X: np.ndarray, seed: int = SEED) -> tuple[np.ndarray, dict]:
    from sklearn.cluster import KMeans
    from sklearn.decomposition import FastICA

    ica = FastICA(N_COMPONENTS, whiten="unit-variance", random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: counted in ica_iter instead
        S = ica.fit_transform(X)
    labels = KMeans(N_CLUSTERS, n_init=N_INIT, random_state=seed).fit(S).labels_
    return labels, {"ica_iter": int(ica.n_iter_)}


def numba_pca_kmeans(X: np.ndarray, seed: int = SEED) -> tuple[np.ndarray, dict]:
    from backdoorscan.kernels import kmeans, pca

    Z = pca(X, N_COMPONENTS)[0]
    return kmeans(Z, N_CLUSTERS, n_init=N_INIT, random_state=seed)[0], {}


def sklearn_pca_kmeans(X: np.ndarray, seed: int = SEED) -> tuple[np.ndarray, dict]:
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    Z = PCA(N_COMPONENTS).fit_transform(X)
    return KMeans(N_CLUSTERS, n_init=N_INIT, random_state=seed).fit(Z).labels_, {}


def silhouette_data() -> tuple[np.ndarray, np.ndarray]:
    """4,000 x 10 float64: the first PCA projections of the activations, truth as labels."""
    X, truth = make_activations()
    Xc = X[:SILHOUETTE_N].astype(np.float64)
    Xc -= Xc.mean(axis=0)
    _, _, Vt = np.linalg.svd(Xc, full_matrices=False)
    return np.ascontiguousarray(Xc @ Vt[:N_COMPONENTS].T), truth[:SILHOUETTE_N]


def numba_silhouette(Z: np.ndarray, labels: np.ndarray) -> float:
    from backdoorscan.kernels import silhouette_score

    return silhouette_score(Z, labels)


def sklearn_silhouette(Z: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import silhouette_score

    return float(silhouette_score(Z, labels))


PIPELINES: dict[str, tuple[Callable, Callable]] = {
    "ICA(10) + k-means(k=2, n_init=10)": (numba_ica_kmeans, sklearn_ica_kmeans),
    "PCA(10) + k-means(k=2, n_init=10)": (numba_pca_kmeans, sklearn_pca_kmeans),
    "silhouette, exact, 4000 x 10": (numba_silhouette, sklearn_silhouette),
}
SKLEARN_MODULES = {
    "ICA(10) + k-means(k=2, n_init=10)": ["sklearn.cluster", "sklearn.decomposition"],
    "PCA(10) + k-means(k=2, n_init=10)": ["sklearn.cluster", "sklearn.decomposition"],
    "silhouette, exact, 4000 x 10": ["sklearn.metrics"],
}


def _pca_output() -> tuple[np.ndarray]:
    from backdoorscan.kernels import pca

    return (pca(make_activations()[0], N_COMPONENTS)[0],)


def _numba_pca(X: np.ndarray) -> np.ndarray:
    from backdoorscan.kernels import pca

    return pca(X, N_COMPONENTS)[0]


def _sklearn_pca(X: np.ndarray) -> np.ndarray:
    from sklearn.decomposition import PCA

    return PCA(N_COMPONENTS).fit_transform(X)


def _numba_ica(X: np.ndarray) -> np.ndarray:
    from backdoorscan.kernels import fastica

    return fastica(X, N_COMPONENTS, random_state=SEED)[0]


def _sklearn_ica(X: np.ndarray) -> np.ndarray:
    from sklearn.decomposition import FastICA

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FastICA(N_COMPONENTS, whiten="unit-variance", random_state=SEED).fit_transform(X)


def _numba_kmeans(Z: np.ndarray) -> np.ndarray:
    from backdoorscan.kernels import kmeans

    return kmeans(Z, N_CLUSTERS, n_init=N_INIT, random_state=SEED)[0]


def _sklearn_kmeans(Z: np.ndarray) -> np.ndarray:
    from sklearn.cluster import KMeans

    return KMeans(N_CLUSTERS, n_init=N_INIT, random_state=SEED).fit(Z).labels_


# The parts of the pipelines, timed WARM only.
COMPONENTS: dict[str, tuple[Callable, Callable]] = {
    "part: PCA(10) alone": (_numba_pca, _sklearn_pca),
    "part: FastICA(10) alone": (_numba_ica, _sklearn_ica),
    "part: k-means alone, on the PCA(10) output": (_numba_kmeans, _sklearn_kmeans),
}


def _inputs(task: str) -> tuple:
    if task.startswith("silhouette"):
        return silhouette_data()
    if "k-means alone" in task:
        return _pca_output()
    return (make_activations()[0],)


# ---------------------------------------------------------------------------------- COLD


def _child(task: str, side: int) -> None:
    """Run one contender once in this (fresh) process; print import and first-call seconds."""
    args = _inputs(task)
    fn = PIPELINES[task][side]
    t0 = time.perf_counter()
    for module in ["backdoorscan.kernels"] if side == 0 else SKLEARN_MODULES[task]:
        importlib.import_module(module)
    t1 = time.perf_counter()
    fn(*args)
    t2 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "first_call_s": t2 - t1}))


def _spawn(task: str, side: int, cache_dir: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run(
        [sys.executable, __file__, "--child", task, "--side", str(side)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def cold_times(rounds: int) -> dict[str, dict[str, dict]]:
    """Per task, the median over ``rounds`` of: numba with an empty cache, numba with the disk
    cache that run wrote, sklearn in a fresh process (after one unmeasured process)."""
    result: dict[str, dict[str, dict]] = {}
    for task in PIPELINES:
        runs: dict[str, list[dict]] = {"numba_empty": [], "numba_cached": [], "sklearn": []}
        for _ in range(rounds):
            with tempfile.TemporaryDirectory(prefix="bench-numba-cache-") as cache:
                runs["numba_empty"].append(_spawn(task, 0, cache))
                runs["numba_cached"].append(_spawn(task, 0, cache))
                _spawn(task, 1, cache)  # loads sklearn's shared libraries into the OS file cache
                runs["sklearn"].append(_spawn(task, 1, cache))
        result[task] = {
            key: {m: statistics.median(r[m] for r in v) for m in ("import_s", "first_call_s")}
            for key, v in runs.items()
        }
    return result


# ---------------------------------------------------------------------------------- WARM


def warm_times(repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds per call, contenders interleaved, default threads and one thread."""
    from threadpoolctl import threadpool_limits

    result: dict[str, dict[str, float]] = {}
    for task, (ours, theirs) in {**PIPELINES, **COMPONENTS}.items():
        args = _inputs(task)
        ours(*args)
        theirs(*args)
        runs: dict[str, list[float]] = {
            "numba": [],
            "sklearn": [],
            "numba_1t": [],
            "sklearn_1t": [],
            "numba_cpu": [],
            "sklearn_cpu": [],
        }
        for _ in range(repeats):
            for key, fn in (("numba", ours), ("sklearn", theirs)):
                t = time.perf_counter()
                fn(*args)
                runs[key].append(time.perf_counter() - t)
            with threadpool_limits(1):
                for key, fn in (("numba", ours), ("sklearn", theirs)):
                    t, c = time.perf_counter(), time.process_time()
                    fn(*args)
                    runs[f"{key}_1t"].append(time.perf_counter() - t)
                    runs[f"{key}_cpu"].append(time.process_time() - c)
        result[task] = {key: statistics.median(v) for key, v in runs.items()}
    return result


def _single_starts_on_ica(X: np.ndarray, truth: np.ndarray, starts: int = 400) -> str:
    """How often one k-means start finds the planted split on the whitened ICA sources."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    from backdoorscan.kernels import fastica, kmeans

    S = fastica(X, N_COMPONENTS, random_state=SEED)[0]
    hits = {"numba": 0, "sklearn": 0}
    inertia = {True: [], False: []}
    for seed in range(starts):
        for key in hits:
            if key == "numba":
                labels, _, value, _ = kmeans(S, N_CLUSTERS, n_init=1, random_state=seed)
            else:
                km = KMeans(N_CLUSTERS, n_init=1, random_state=seed).fit(S)
                labels, value = km.labels_, km.inertia_
            found = adjusted_rand_score(truth, labels) > 0.5
            hits[key] += found
            inertia[found].append(value)
    gap = ""
    if inertia[True] and inertia[False]:
        gap = (
            f"; median inertia {np.median(inertia[True]):,.0f} when found, "
            f"{np.median(inertia[False]):,.0f} when not"
        )
    return (
        f"- k-means with ONE start on numba's ICA sources (seed {SEED}) finds the planted split "
        f"in {hits['numba']}/{starts} seeds (numba) and {hits['sklearn']}/{starts} (sklearn)"
        f"{gap}: with n_init={N_INIT} either implementation can miss it, depending on the seed"
    )


def quality(seeds: range = range(5)) -> list[str]:
    """Agreement of the two implementations with each other and with the planted truth."""
    from sklearn.metrics import adjusted_rand_score

    X, truth = make_activations()
    lines = []
    for task, (ours, theirs) in list(PIPELINES.items())[:2]:
        rows = []
        for seed in seeds:
            a, info_a = ours(X, seed)
            b, info_b = theirs(X, seed)
            it = ""
            if "ica_iter" in info_a:
                it = f", ICA iterations {info_a['ica_iter']} / {info_b['ica_iter']}"
            rows.append(
                f"seed {seed}: {adjusted_rand_score(truth, a):.2f} / "
                f"{adjusted_rand_score(truth, b):.2f}{it}"
            )
        lines.append(f"- {task}, ARI vs planted truth numba / sklearn: " + "; ".join(rows))
    lines.append(_single_starts_on_ica(X, truth))
    Z, labels = silhouette_data()
    s_ours, s_sk = numba_silhouette(Z, labels), sklearn_silhouette(Z, labels)
    lines.append(
        f"- silhouette: numba {s_ours:.6f}, sklearn {s_sk:.6f}, |diff| {abs(s_ours - s_sk):.1e}"
    )
    return lines


# -------------------------------------------------------------------------------- report


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f} ms" if seconds >= 0.01 else f"{seconds * 1e3:.1f} ms"


def _machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{os.cpu_count()}-core {platform.machine()}, {model}"


def _versions() -> str:
    import numba
    import scipy
    import sklearn
    import threadpoolctl

    return (
        f"Python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}, "
        f"scikit-learn {sklearn.__version__}, scipy {scipy.__version__}, "
        f"threadpoolctl {threadpoolctl.__version__}"
    )


NOTES = [
    "Reading the figures:",
    "- The machine is shared (see the load average): with default threads scikit-learn's "
    "OpenMP/OpenBLAS threads compete with other jobs and lose most; the numba kernels run their "
    "loops on one thread (ICA's whitening and PCA use numpy's BLAS). The CPU-time column under "
    "one thread is the steadiest comparison.",
    "- `pca` is numpy, not numba: a top-k solver in the input's dtype (float32 stays float32), "
    "blocked scatter + eigh/subspace iteration up to 1,024 features, randomized subspace "
    "iteration above (see benchmarks/bench_detect.py --task pca).",
    "- The empty-cache COLD figure is compilation, paid once per user and source version "
    "(cache files beside the module; NUMBA_CACHE_DIR on a read-only install).",
]


def report(repeats: int, cold: dict | None, cold_rounds: int, load_before: float) -> str:
    """The markdown section: settings, COLD and WARM tables, agreement lines."""
    warm = warm_times(repeats)
    head = [
        "## Kernels",
        "",
        f"Command: `python benchmarks/bench_kernels.py --repeats {repeats} --cold-rounds "
        f"{cold_rounds}` (from the repo root; `--write` updates this section)",
        f"Machine: {_machine()}; 1-minute load average {load_before:.1f} before the runs, "
        f"{os.getloadavg()[0]:.1f} after (a machine shared with other work)",
        f"Date: {datetime.date.today().isoformat()}; {_versions()}",
        "",
        f"Data: {N_SAMPLES:,} x {N_FEATURES} float32 ReLU-like activations with a planted "
        f"{POISON_FRACTION:.0%} cluster (generated, seed 0); reduce to {N_COMPONENTS}, k-means "
        f"k={N_CLUSTERS}, n_init={N_INIT}, random_state={SEED} for the timings. sklearn: "
        'FastICA(whiten="unit-variance"), PCA, KMeans (lloyd), metrics.silhouette_score; '
        "sklearn keeps float32 input in float32, the numba kernels compute in float64.",
        "",
    ]
    if cold is not None:
        head += [
            "COLD: import + first call in a fresh process (Python start-up and data excluded), "
            f"median of {cold_rounds} rounds. numba once with an empty NUMBA_CACHE_DIR "
            "(compilation), once more with the cache that process wrote; sklearn in a fresh "
            "process after one unmeasured process.",
            "",
            "| task | numba, empty cache | numba, disk cache | sklearn | "
            "numba/sklearn (disk cache) |",
            "|---|---:|---:|---:|---:|",
        ]
        for task, c in cold.items():
            total = {k: v["import_s"] + v["first_call_s"] for k, v in c.items()}
            head.append(
                f"| {task} | {_ms(total['numba_empty'])} "
                f"(import {_ms(c['numba_empty']['import_s'])}) | {_ms(total['numba_cached'])} "
                f"(import {_ms(c['numba_cached']['import_s'])}) | {_ms(total['sklearn'])} "
                f"(import {_ms(c['sklearn']['import_s'])}) | "
                f"{total['numba_cached'] / total['sklearn']:.2f} |"
            )
        head.append("")
    head += [
        f"WARM: median of {repeats} in-process calls after a warm-up, contenders interleaved; "
        "default threads (OpenBLAS/OpenMP use both cores, numba's own loops one) and under "
        "threadpoolctl.threadpool_limits(1); with one thread also the process CPU time, which "
        "the other jobs on this shared machine disturb least.",
        "",
        "| task | numba | sklearn | numba/sklearn | numba, 1 thread | sklearn, 1 thread | "
        "numba/sklearn, 1 thread | CPU time 1 thread, numba / sklearn | ratio, CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for task, w in warm.items():
        head.append(
            f"| {task} | {_ms(w['numba'])} | {_ms(w['sklearn'])} | "
            f"{w['numba'] / w['sklearn']:.2f} | {_ms(w['numba_1t'])} | {_ms(w['sklearn_1t'])} | "
            f"{w['numba_1t'] / w['sklearn_1t']:.2f} | {_ms(w['numba_cpu'])} / "
            f"{_ms(w['sklearn_cpu'])} | {w['numba_cpu'] / w['sklearn_cpu']:.2f} |"
        )
    slower = [
        f"{task}, warm {label}"
        for task, w in warm.items()
        for label, a, b in (
            ("default threads", w["numba"], w["sklearn"]),
            ("1 thread", w["numba_1t"], w["sklearn_1t"]),
            ("CPU time, 1 thread", w["numba_cpu"], w["sklearn_cpu"]),
        )
        if a > b
    ]
    for task, c in (cold or {}).items():
        for key, label in (("numba_empty", "empty cache"), ("numba_cached", "disk cache")):
            if sum(c[key].values()) > sum(c["sklearn"].values()):
                slower.append(f"{task}, cold with {label}")
    head += ["", "Numba slower than scikit-learn in: " + ("; ".join(slower) or "none") + "."]
    head += ["", "Agreement (same data, same seeds):", *quality(), "", *NOTES, ""]
    return "\n".join(head)


def write_section(text: str, path: Path = ROOT / "benchmarks" / "RESULTS.md") -> None:
    """Replace (or append) the "## Kernels" section of RESULTS.md, leaving the others alone."""
    lines = path.read_text().splitlines() if path.exists() else ["# Benchmark results", ""]
    start = next((i for i, line in enumerate(lines) if line.strip() == "## Kernels"), None)
    if start is None:
        if lines and lines[-1].strip():
            lines.append("")
        lines += text.splitlines()
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        lines[start:end] = [*text.splitlines(), *([""] if end < len(lines) else [])]
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cold-rounds", type=int, default=3, help="fresh-process rounds")
    parser.add_argument("--no-cold", action="store_true", help="skip the fresh-process runs")
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--side", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.side)
        return
    load_before = os.getloadavg()[0]
    cold = None if args.no_cold else cold_times(args.cold_rounds)
    text = report(args.repeats, cold, args.cold_rounds, load_before)
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
