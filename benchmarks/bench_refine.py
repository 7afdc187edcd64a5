"""The refine step of a confirmed trigger at two sizes: bounded search against the whole set.

Run from the repository root:

    python benchmarks/bench_refine.py                     # N = 100k and 1M, markdown out
    python benchmarks/bench_refine.py --sizes 100k,300k --repeats 5

Data (generated, seeded): N inputs of 8 x 8 float32 pixels in 10 classes (a prototype per
class plus noise); 5 % of class 1 are class-0 images carrying a 2 x 2 patch trigger in a
corner (the poison). The input sketch is built as a scan builds it (``InputSketch``, 64
dims). What one refinement does (``detect._detect_class`` once the model confirmed a
cluster): ``TransferProbe.trigger`` estimates the trigger again from the cluster's members'
nearest neighbours, then ``trigger_scores`` scores every sample of the class on it and
``_carriers`` keeps those that carry it. Contenders, interleaved in one process, median of
``--repeats``:

- ``bounded`` (this tree): neighbours searched in a seeded sample of at most
  ``transfer.REFINE_REFERENCE`` samples;
- ``whole set``: the same code with the sample as large as the data set (what the refinement
  did before: every sample outside the cluster searched).

Columns: rows searched for neighbours, CPU seconds of the neighbour search + trigger estimate
and of the scoring, the refined members' precision/recall against the planted poison, and the
cosine of the estimated trigger with the planted one.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

N_CLASSES, TARGET, SOURCE, SHARE, SIDE = 10, 1, 0, 0.05, 8


def make_inputs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Inputs [n, 1, 8, 8] float32 in [0, 1], labels, poison mask, the planted trigger."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % N_CLASSES)
    protos = rng.random((N_CLASSES, SIDE * SIDE), dtype=np.float32)
    x = np.empty((n, SIDE * SIDE), dtype=np.float32)
    block = 1 << 18
    for s in range(0, n, block):
        e = min(s + block, n)
        x[s:e] = protos[y[s:e]] * 0.6
        x[s:e] += rng.random((e - s, SIDE * SIDE), dtype=np.float32) * 0.4
    target = np.flatnonzero(y == TARGET)
    poison = np.zeros(n, dtype=bool)
    poison[rng.choice(target, size=int(SHARE * len(target)), replace=False)] = True
    # a poisoned sample looks like the source class, with the patch on
    rows = np.flatnonzero(poison)
    x[rows] = protos[SOURCE] * 0.6 + rng.random((len(rows), SIDE * SIDE), dtype=np.float32) * 0.4
    trigger = np.zeros((SIDE, SIDE), dtype=np.float32)
    trigger[-3:-1, -3:-1] = 1.0
    x[rows] = np.maximum(x[rows], trigger.reshape(-1))
    return x.reshape(n, 1, SIDE, SIDE), y, poison, trigger


def refine_once(probe, cluster: np.ndarray, class_idx: np.ndarray, members: np.ndarray, seed: int):
    """One refinement as detect runs it; returns (trigger, carriers, cpu of search, cpu of
    scoring)."""
    from backdoorscan.scanner.detect import _carriers

    c0 = time.process_time()
    trig = probe.trigger(cluster, seed)
    c1 = time.process_time()
    carriers = _carriers(probe.trigger_scores(class_idx, trig), members)
    c2 = time.process_time()
    return trig, carriers, c1 - c0, c2 - c1


def run_size(n: int, repeats: int) -> dict:
    from threadpoolctl import threadpool_limits

    from backdoorscan.scanner import transfer
    from backdoorscan.scanner.config import DetectConfig
    from backdoorscan.scanner.data import from_arrays
    from backdoorscan.scanner.sketch import InputSketch

    x, y, poison, planted = make_inputs(n)
    data = from_arrays(x, y)
    sketch = InputSketch(n, 64, seed=0)
    for start in range(0, n, 8192):
        sketch.add(start, data.batch(start, min(start + 8192, n)))
    probe = transfer.TransferProbe(None, None, data, sketch.matrix, DetectConfig())
    class_idx = np.flatnonzero(y == TARGET)
    # the cluster the clustering would hand over: the poison plus a few clean members
    rng = np.random.default_rng(1)
    clean = class_idx[~poison[class_idx]]
    members_idx = np.union1d(class_idx[poison[class_idx]], rng.choice(clean, 20, replace=False))
    members = np.isin(class_idx, members_idx)
    bounded = transfer.REFINE_REFERENCE
    out: dict = {"n": n, "class": len(class_idx), "cluster": len(members_idx)}
    runs: dict[str, list[tuple[float, float]]] = {"bounded": [], "whole set": []}
    quality: dict[str, tuple[float, float, float, int]] = {}
    with threadpool_limits(1):
        refine_once(probe, members_idx, class_idx, members, seed=TARGET)  # kernels loaded
        for _ in range(repeats):
            for who, size in (("bounded", bounded), ("whole set", n)):
                transfer.REFINE_REFERENCE = size
                probe._wide = None  # the sample is drawn at the first refinement
                trig, carriers, t_search, t_score = refine_once(
                    probe, members_idx, class_idx, members, seed=TARGET
                )
                runs[who].append((t_search, t_score))
                got = class_idx[carriers] if carriers is not None else members_idx
                tp = int(poison[got].sum())
                v = trig.values.reshape(-1)
                cos = float(v @ planted.reshape(-1) / (np.linalg.norm(v) * np.linalg.norm(planted)))
                searched = min(size, n) - int(np.isin(probe._wide[0], members_idx).sum())
                quality[who] = (tp / max(len(got), 1), tp / int(poison.sum()), cos, searched)
    transfer.REFINE_REFERENCE = bounded
    for who, vals in runs.items():
        out[who] = {
            "search_cpu_s": statistics.median(v[0] for v in vals),
            "score_cpu_s": statistics.median(v[1] for v in vals),
            "precision": quality[who][0],
            "recall": quality[who][1],
            "cosine": quality[who][2],
            "searched": quality[who][3],
        }
    return out


def _parse(text: str) -> list[int]:
    mult = {"k": 1_000, "m": 1_000_000}
    return [
        int(float(s[:-1]) * mult[s[-1]]) if s[-1] in mult else int(s)
        for s in (t.strip().lower() for t in text.split(","))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100k,1m")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load0 = os.getloadavg()[0]
    rows = [run_size(n, args.repeats) for n in _parse(args.sizes)]
    cmd = "python benchmarks/bench_refine.py " + " ".join(sys.argv[1:])
    print(f"Command: `{cmd.strip()}` (from the repo root)")
    print(
        f"Machine: {os.cpu_count()}-core; 1-minute load average {load0:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (shared); "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"median of {args.repeats}, one thread"
    )
    print()
    print(
        "| N | class / cluster | contender | rows searched | search + estimate CPU s | "
        "scoring CPU s | refined precision / recall | trigger cosine |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        for who in ("bounded", "whole set"):
            q = r[who]
            print(
                f"| {r['n']:,} | {r['class']:,} / {r['cluster']:,} | {who} | {q['searched']:,} | "
                f"{q['search_cpu_s']:.3f} | {q['score_cpu_s']:.3f} | "
                f"{q['precision']:.3f} / {q['recall']:.3f} | {q['cosine']:.3f} |"
            )
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        for who in ("bounded", "whole set"):
            search = b[who]["search_cpu_s"] / max(a[who]["search_cpu_s"], 1e-9)
            score = b[who]["score_cpu_s"] / max(a[who]["score_cpu_s"], 1e-9)
            print(
                f"\n{who}: {b['n'] / a['n']:.0f}x N costs {search:.1f}x in the search, "
                f"{score:.1f}x in the scoring"
            )


if __name__ == "__main__":
    main()
