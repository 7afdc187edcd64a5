"""``detect()`` against the scikit-learn pipeline, one thread each, CPU time and peak memory.

Run from the repository root:

    python benchmarks/bench_detect.py                          # the default grid, markdown out
    python benchmarks/bench_detect.py --cells 10k:512,100k:64  # some cells
    python benchmarks/bench_detect.py --task pca               # PCA(10) alone on one class
    python benchmarks/bench_detect.py --write                  # also replace "## Detect" in
                                                               # benchmarks/RESULTS.md

Data (generated, seeded, float32): ReLU of a 16-dim Gaussian code through a random linear map
plus noise, 10 classes; in classes 3 and 7 a planted cluster of 10 % of the class (a shift of 3
in four code directions). Contenders, each in its own fresh process (so the peak memory is the
kernel's high-water mark, VmHWM, reset after the data is made), interleaved per repeat, all
libraries held to one thread (OMP/OPENBLAS/MKL_NUM_THREADS=1 and threadpoolctl):

- ``detect``: ``detect(X, y, rule=("size", "separation"), n_jobs=1)`` (no transfer test: no
  model), PCA and FastICA to 10 dimensions, k-means k = 2 and 3 with 10 starts, silhouette;
- ``sklearn``: per class the same steps in scikit-learn: ``PCA(10)`` and ``FastICA(10,
  whiten="unit-variance")`` on the class, ``KMeans(k, n_init=10)`` for k = 2, 3 on every row,
  ``silhouette_score(sample_size=2000)``, and the same size + separation rule on the clusters.

Both contenders first run once on a small slice (numba kernels loaded, scikit-learn warm), so
the figure is the steady cost. "same answer" is the adjusted Rand index between the two
contenders' flagged sets (1.00: the same samples flagged), and each one's ARI against the
planted truth. ``--task pca``: the backdoorscan PCA kernel against ``PCA(10)`` on one class of
n x d (and ``--old-pca FILE``, a previous version of ``kernels/pca.py``, as a third contender).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

N_CLASSES, POISONED, SHARE, SEED = 10, (3, 7), 0.10, 0
SIZE_THRESHOLD, SEPARATION_THRESHOLD = 0.35, 5.0
DEFAULT_CELLS = "10k:64,10k:512,10k:2048,100k:64,100k:512,100k:2048,1m:64,1m:512"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def make_data(n: int, d: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features float32 [n, d], labels [n], truth (planted cluster) [n]; made in blocks so that
    the peak stays near the features array."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % N_CLASSES)
    truth = np.zeros(n, dtype=bool)
    for c in POISONED:
        idx = np.flatnonzero(y == c)
        truth[rng.choice(idx, size=round(SHARE * len(idx)), replace=False)] = True
    loadings = (rng.normal(size=(16, d)) / 4).astype(np.float32)
    bias = rng.normal(scale=0.5, size=d).astype(np.float32)
    X = np.empty((n, d), dtype=np.float32)
    block = max(1, 2**24 // d)
    for start in range(0, n, block):
        stop = min(start + block, n)
        code = rng.standard_normal((stop - start, 16), dtype=np.float32)
        code[truth[start:stop], :4] += 3.0
        part = code @ loadings
        part += rng.standard_normal(part.shape, dtype=np.float32) * np.float32(0.5)
        part += bias
        np.maximum(part, 0.0, out=X[start:stop])
    return X, y, truth


def make_class(n: int, d: int, seed: int = SEED) -> np.ndarray:
    """One class of n x d (10 % planted cluster), for the PCA task."""
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < SHARE
    code = rng.standard_normal((n, 16), dtype=np.float32)
    code[truth, :4] += 3.0
    X = code @ (rng.normal(size=(16, d)) / 4).astype(np.float32)
    X += rng.standard_normal(X.shape, dtype=np.float32) * np.float32(0.5)
    return np.maximum(X, 0.0, out=X)


# ------------------------------------------------------------------------------ contenders


def run_detect(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    from backdoorscan import detect

    report = detect(X, y, rule=("size", "separation"), n_jobs=1, seed=SEED)
    return report.is_flagged()


def _separation(z: np.ndarray, members: np.ndarray) -> float:
    a, b = z[members], z[~members]
    if len(a) < 2 or len(b) < 2:
        return 0.0
    u = a.mean(axis=0) - b.mean(axis=0)
    norm = np.linalg.norm(u)
    if norm == 0:
        return 0.0
    ta, tb = a @ (u / norm), b @ (u / norm)
    pooled = np.sqrt((ta.var() + tb.var()) / 2)
    return float((ta.mean() - tb.mean()) / pooled) if pooled > 0 else float("inf")


def run_sklearn(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Activation Clustering with scikit-learn, per class; flags the best separated cluster
    that passes size and separation (detect's fallback rule)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA, FastICA
    from sklearn.metrics import silhouette_score

    flagged = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        f = X[idx]
        best: tuple[float, np.ndarray] | None = None
        for reducer in (
            PCA(10, random_state=SEED),
            FastICA(10, whiten="unit-variance", random_state=SEED, max_iter=200),
        ):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ConvergenceWarning
                z = reducer.fit_transform(f)
            for k in (2, 3):
                labels = KMeans(k, n_init=10, random_state=SEED).fit(z).labels_
                silhouette_score(z, labels, sample_size=min(len(z), 2000), random_state=SEED)
                for j in range(k):
                    members = labels == j
                    share = members.mean()
                    if 0 < share < SIZE_THRESHOLD:
                        sep = _separation(z, members)
                        if sep >= SEPARATION_THRESHOLD and (best is None or sep > best[0]):
                            best = (sep, members)
        if best is not None:
            flagged[idx[best[1]]] = True
    return flagged


def _load_pca(path: str | None):
    if path is None:
        from backdoorscan.kernels import pca

        return lambda X: pca(X, 10)[0]
    spec = importlib.util.spec_from_file_location("old_pca", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda X: module.pca(X, 10)[0]


def _sklearn_pca(X: np.ndarray) -> np.ndarray:
    from sklearn.decomposition import PCA

    return PCA(10, random_state=SEED).fit_transform(X)


# ----------------------------------------------------------------------------- the child


def _status(field: str) -> int:
    """A VmXXX line of /proc/self/status, in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(spec: dict) -> None:
    """Run one contender once on one cell in this fresh process; print JSON."""
    from threadpoolctl import threadpool_limits

    n, d, who = spec["n"], spec["d"], spec["contender"]
    if spec["task"] == "pca":
        X = make_class(n, d)
        fn = (
            _sklearn_pca
            if who == "sklearn"
            else _load_pca(spec.get("old_pca") if who == "old" else None)
        )
        args: tuple = (X,)
        small: tuple = (X[: min(n, 500)],)
    else:
        X, y, truth = make_data(n, d)
        fn = run_sklearn if who == "sklearn" else run_detect
        args = (X, y)
        small = (X[: min(n, 3000)], y[: min(n, 3000)])
    with threadpool_limits(1):
        fn(*small)  # warm: kernels loaded, libraries imported
        base = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
        t, c = time.perf_counter(), time.process_time()
        out = fn(*args)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        peak = _status("VmHWM")
    result = {
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_above_mib": (peak - base) / 2**20,
        "base_mib": base / 2**20,
        "features_mib": X.nbytes / 2**20,
        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if spec["task"] == "pca":
        np.save(spec["out"], np.asarray(out, dtype=np.float64))
    else:
        np.save(spec["out"], np.stack([out, truth]))
    print(json.dumps(result))


def _spawn(spec: dict, timeout: float) -> dict | None:
    env = dict(os.environ, **ONE_THREAD)
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{spec}: {e.stderr[-2000:]}") from None
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- grid


def _parse_cells(text: str) -> list[tuple[int, int]]:
    mult = {"k": 1_000, "m": 1_000_000}
    cells = []
    for item in text.split(","):
        n, d = item.strip().lower().split(":")
        cells.append((int(float(n[:-1]) * mult[n[-1]]) if n[-1] in mult else int(n), int(d)))
    return cells


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"


def _subspace_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest absolute correlation of matched projections (same order: PCA's)."""
    k = min(a.shape[1], b.shape[1])
    return float(min(abs(np.corrcoef(a[:, j], b[:, j])[0, 1]) for j in range(k)))


def run_grid(args: argparse.Namespace) -> tuple[list[str], list[dict]]:
    from sklearn.metrics import adjusted_rand_score

    contenders = ["detect", "sklearn"] if args.task == "detect" else ["ours", "sklearn"]
    if args.task == "pca" and args.old_pca:
        contenders.append("old")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-detect-") as tmp:
        for n, d in _parse_cells(args.cells):
            runs: dict[str, list[dict]] = {c: [] for c in contenders}
            outs: dict[str, np.ndarray] = {}
            skipped: dict[str, str] = {}
            load = os.getloadavg()[0]
            for _ in range(args.repeats):
                for who in contenders:
                    if who in skipped:
                        continue
                    path = os.path.join(tmp, f"{who}.npy")
                    spec = {"task": args.task, "contender": who, "n": n, "d": d, "out": path,
                            "old_pca": args.old_pca}  # fmt: skip
                    res = _spawn(spec, args.timeout)
                    if res is None:
                        skipped[who] = f"over {args.timeout:.0f} s"
                        continue
                    runs[who].append(res)
                    outs[who] = np.load(path)
            row: dict = {"n": n, "d": d, "load": load, "skipped": skipped}
            for who in contenders:
                if runs[who]:
                    row[who] = {
                        key: statistics.median(r[key] for r in runs[who]) for key in runs[who][0]
                    }
            if args.task == "detect" and len(outs) == 2:
                a, b = outs["detect"], outs["sklearn"]
                row["ari"] = adjusted_rand_score(a[0], b[0])
                row["ari_truth"] = {k: adjusted_rand_score(v[1], v[0]) for k, v in outs.items()}
            elif args.task == "pca":
                row["agree"] = {
                    k: _subspace_agreement(v, outs["sklearn"])
                    for k, v in outs.items()
                    if k != "sklearn"
                }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return contenders, rows


def _machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(x.split(":", 1)[1].strip() for x in out.splitlines() if "Model name" in x)
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()}-core {platform.machine()}, {model}, {mem:.0f} GiB"


def _versions() -> str:
    import numba
    import sklearn

    return (
        f"Python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}, "
        f"scikit-learn {sklearn.__version__}"
    )


def report(args: argparse.Namespace, contenders: list[str], rows: list[dict], load0: float) -> str:
    cmd = "python benchmarks/bench_detect.py " + " ".join(sys.argv[1:])
    a, b = contenders[0], contenders[1]
    lines = [
        f"Command: `{cmd.strip()}` (from the repo root)",
        f"Machine: {_machine()}; 1-minute load average {load0:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (shared with other work); {_versions()}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"Median of {args.repeats} fresh process(es) per contender, interleaved; one thread each.",
        "",
    ]
    if args.task == "detect":
        lines += [
            "| N x D | features | detect CPU s | sklearn CPU s | sklearn / detect (CPU) | "
            "detect peak above start | sklearn peak above start | detect peak / features | "
            "ARI detect vs sklearn | ARI vs truth, detect / sklearn | load |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    else:
        extra = " | old CPU s | old peak" if "old" in contenders else ""
        lines += [
            "| n x d | class | ours CPU s | sklearn CPU s | sklearn / ours | ours peak above start "
            f"| sklearn peak above start{extra} | min abs corr. with sklearn | load |",
            "|---|---:|---:|---:|---:|---:|---:" + ("|---:|---:" if extra else "") + "|---:|---:|",
        ]
    for r in rows:
        cell = f"{_label(r['n'])} x {r['d']}"
        ra, rb = r.get(a), r.get(b)
        feat = (ra or rb or {}).get("features_mib", 0.0)

        def cpu(x):
            return f"{x['cpu_s']:.2f}" if x else "skipped"

        def mem(x):
            return f"{x['peak_above_mib']:,.0f} MiB" if x else "-"

        ratio = f"{rb['cpu_s'] / ra['cpu_s']:.2f}" if ra and rb else "-"
        if args.task == "detect":
            ari = f"{r['ari']:.3f}" if "ari" in r else "-"
            at = r.get("ari_truth", {})
            truth = " / ".join(f"{at[k]:.3f}" if k in at else "-" for k in contenders)
            over = f"{ra['peak_above_mib'] / feat:.2f}" if ra else "-"
            lines.append(
                f"| {cell} | {feat:,.0f} MiB | {cpu(ra)} | {cpu(rb)} | {ratio} | {mem(ra)} | "
                f"{mem(rb)} | {over} | {ari} | {truth} | {r['load']:.1f} |"
            )
        else:
            old = r.get("old")
            extra = f" | {cpu(old)} | {mem(old)}" if "old" in contenders else ""
            agree = " / ".join(f"{r['agree'][k]:.5f}" for k in r.get("agree", {}))
            lines.append(
                f"| {cell} | {feat:,.0f} MiB | {cpu(ra)} | {cpu(rb)} | {ratio} | {mem(ra)} | "
                f"{mem(rb)}{extra} | {agree} | {r['load']:.1f} |"
            )
        if r["skipped"]:
            lines.append(f"|   ({', '.join(f'{k} {v}' for k, v in r['skipped'].items())}) |")
    return "\n".join(lines)


def write_section(text: str, title: str, path: Path = ROOT / "benchmarks" / "RESULTS.md") -> None:
    """Replace (or append) one "## " or "### " section of RESULTS.md, leaving the rest alone."""
    lines = path.read_text().splitlines()
    level = title.split(" ")[0]
    start = next((i for i, line in enumerate(lines) if line.strip() == title), None)
    body = [title, "", *text.splitlines()]
    if start is None:
        lines += ["", *body]
    else:
        end = next(
            (
                i
                for i in range(start + 1, len(lines))
                if lines[i].startswith("#") and len(lines[i].split(" ")[0]) <= len(level)
            ),
            len(lines),
        )
        lines[start:end] = [*body, *([""] if end < len(lines) else [])]
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("detect", "pca"), default="detect")
    parser.add_argument("--cells", default=DEFAULT_CELLS, help="N:D pairs, e.g. 10k:512,1m:64")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per child run")
    parser.add_argument("--old-pca", help="a previous kernels/pca.py, as a third contender")
    parser.add_argument("--write", help="replace this '## ...' section of RESULTS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return
    load0 = os.getloadavg()[0]
    contenders, rows = run_grid(args)
    text = report(args, contenders, rows, load0)
    print(text)
    if args.write:
        write_section(text, args.write)


if __name__ == "__main__":
    main()
