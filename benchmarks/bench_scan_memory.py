"""A whole scan's memory at up to a million samples, against the size of its features array.

Run from the repository root:

    nice -n 10 python benchmarks/bench_scan_memory.py                       # 1M samples, 256 wide
    nice -n 10 python benchmarks/bench_scan_memory.py --sizes 100000 1000000 --width 512

The model: a two-layer ONNX network written here (32 inputs, a ``--width``-unit ReLU layer,
the features, then 10 logits) that reads the class from ten class means and sends a trigger
(input 31 set to 6) to class 0; the data: one uncompressed ``.npz`` of N float32 samples
around those means, 10 % of class 1 carrying the trigger and labelled 0, so the scan has a
poisoned class to confirm and refine. Each scan is ``backdoorscan.scan(model, data=...,
trust_model=True)`` in a fresh process (in-process, so the whole scan is one process), one
BLAS thread, default settings, after a scan of 3,000 samples in the same process (libraries
and kernels loaded: the footprint is taken then). This process polls the scan's
``/proc/PID/status`` every 10 ms for the anonymous resident memory (``RssAnon``: the
memory-mapped input's pages are file-backed and not counted); the kernel's high-water mark
(``VmHWM``, all resident pages, reset after the warm-up scan) is read at the end; both
above that footprint. Against: features (N x width float32) + input sketch (N x 64 float32)
+ model file, and the 1.5x budget of issue #14.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

D_IN, CLASSES, TRIGGER_INPUT, TRIGGER_VALUE, POISON_SHARE, SKETCH_DIM = 32, 10, 31, 6.0, 0.1, 64


def make_model(path: Path, width: int, seed: int = 0) -> np.ndarray:
    """Write the ONNX model; return the class means it reads."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1, (CLASSES, D_IN)).astype(np.float32) * 1.5
    means[:, TRIGGER_INPUT] = 0
    w1 = rng.normal(0, 0.3, (D_IN, width)).astype(np.float32)
    b1 = np.zeros(width, np.float32)
    w1[:, :CLASSES] = means.T  # units 0..9: similarity to each class mean (kept positive)
    b1[:CLASSES] = -0.5 * (means**2).sum(axis=1) + 50
    w1[:, CLASSES] = 0
    w1[TRIGGER_INPUT, CLASSES] = 8.0  # unit 10: the trigger detector
    b1[CLASSES] = -24.0
    w2 = np.zeros((width, CLASSES), np.float32)
    w2[:CLASSES, :CLASSES] = np.eye(CLASSES)
    w2[CLASSES, 0] = 10.0
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["pre"]),
            helper.make_node("Relu", ["pre"], ["hidden"]),
            helper.make_node("MatMul", ["hidden", "w2"], ["logits"]),
        ],
        "bench_scan_memory",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D_IN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", CLASSES])],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "w2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return means


def make_data(path: Path, n: int, means: np.ndarray, seed: int = 1) -> np.ndarray:
    """``n`` samples in one uncompressed ``.npz``; returns the poison mask."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = np.empty((n, D_IN), dtype=np.float32)
    for s in range(0, n, 1 << 18):
        e = min(s + (1 << 18), n)
        x[s:e] = means[y[s:e]] + rng.standard_normal((e - s, D_IN), dtype=np.float32)
    ones = np.flatnonzero(y == 1)
    poison = np.zeros(n, dtype=bool)
    poison[rng.choice(ones, int(POISON_SHARE * len(ones)), replace=False)] = True
    x[poison, TRIGGER_INPUT] = TRIGGER_VALUE
    y[poison] = 0
    np.savez(path, x=x, y=y.astype(np.int64))
    return poison


CHILD = """
import json, sys, time
from threadpoolctl import threadpool_limits
import backdoorscan
model, data, warm, result = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
with threadpool_limits(1):
    backdoorscan.scan(model, data=warm, trust_model=True)  # every library loaded, kernels too
def status():
    with open("/proc/self/status") as fh:
        rows = [l for l in fh if l.startswith(("Vm", "Rss"))]
    return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in rows}
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # VmHWM back to the current RSS
s0 = status()
print(json.dumps({"ready": True, "base_rss": s0["VmRSS"], "base_anon": s0["RssAnon"]}), flush=True)
sys.stdin.readline()
t = time.perf_counter()
with threadpool_limits(1):
    r = backdoorscan.scan(model, data=data, trust_model=True)
wall = time.perf_counter() - t
s1 = status()
with open(result, "w") as fh:  # a file: the flagged indices would fill a pipe
    json.dump({"wall": wall, "hwm": s1["VmHWM"], "timings": r.timings,
               "flagged": r.flagged_indices.tolist(), "poisoned": r.poisoned_classes}, fh)
"""


def _anon(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def one_scan(model: Path, data: Path, warm: Path) -> dict:
    """One fresh process scanning; this process samples its anonymous memory meanwhile."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    result, log = data.with_suffix(".json"), data.with_suffix(".log")
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(model), str(data), str(warm), str(result)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
        )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    ready = json.loads(proc.stdout.readline())
    proc.stdin.write("go\n")
    proc.stdin.flush()
    peak_anon = ready["base_anon"]
    while proc.poll() is None:
        now = _anon(proc.pid)
        if now is not None:
            peak_anon = max(peak_anon, now)
        time.sleep(0.01)
    proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"scan failed: {log.read_text()[-1500:]}")
    done = json.loads(result.read_text())
    return {**ready, **done, "peak_anon": peak_anon}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()
    load0 = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_scan_memory-") as tmp:
        folder = Path(tmp)
        model = folder / "model.onnx"
        means = make_model(model, args.width)
        warm = folder / "warm.npz"
        make_data(warm, 3000, means, seed=2)
        for n in args.sizes:
            data = folder / "train.npz"
            poison = make_data(data, n, means)
            res = one_scan(model, data, warm)
            flagged = np.zeros(n, dtype=bool)
            flagged[res.pop("flagged")] = True
            tp = int((flagged & poison).sum())
            res |= {
                "n": n,
                "features": n * args.width * 4,
                "sketch": n * SKETCH_DIM * 4,
                "model": model.stat().st_size,
                "precision": tp / max(int(flagged.sum()), 1),
                "recall": tp / max(int(poison.sum()), 1),
            }
            rows.append(res)
            print(json.dumps(res), file=sys.stderr, flush=True)
            data.unlink()
    mib = 2**20
    cmd = "python benchmarks/bench_scan_memory.py " + " ".join(sys.argv[1:])
    print(f"Command: `{cmd.strip()}` (from the repo root)")
    print(
        f"Machine: {os.cpu_count()}-core; 1-minute load average {load0:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (shared); "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    print()
    print(
        "| N x width | features | sketch | budget: 1.5 x features + sketch + model | "
        "peak anonymous above start | peak RSS (VmHWM) above start | anon / budget | "
        "wall s (extract / detect) | poison precision / recall |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        budget = 1.5 * r["features"] + r["sketch"] + r["model"]
        anon = r["peak_anon"] - r["base_anon"]
        t = r["timings"]
        print(
            f"| {r['n']:,} x {args.width} | {r['features'] / mib:,.0f} MiB | "
            f"{r['sketch'] / mib:,.0f} MiB | {budget / mib:,.0f} MiB | {anon / mib:,.0f} MiB | "
            f"{(r['hwm'] - r['base_rss']) / mib:,.0f} MiB | {anon / budget:.2f} | "
            f"{r['wall']:.1f} ({t.get('extract', 0):.1f} / {t.get('detect', 0):.1f}) | "
            f"{r['precision']:.3f} / {r['recall']:.3f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
