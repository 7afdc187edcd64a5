"""What the Ray engine costs on one machine: the same scan with ``engine="local"`` and with
``engine="ray"`` (a local Ray instance on this machine's cores), at 60,000 and 1,000,000
synthetic samples, each scan a fresh process.

The data: 32 float32 inputs around ten class means, in 8 ``.npz`` shards; 10 % of class 1
carries a trigger (input 31 set to 6) and is labelled 0. The model: a two-layer ONNX network
written here (a 64-unit ReLU layer, the features, then the logits) that reads the class from
the means and sends the trigger to class 0, so the scan has a poisoned class to confirm with
the transfer test. Both engines scan with ``trust_model`` (the Ray engine requires it), so the
comparison is the engine alone; ``ray-spill`` is the Ray scan with the extraction's outputs
spilled to files (``ray_spill_above=1``) and gathered memory-mapped. Printed per size: wall
time of each, the Ray instance's start apart, the scan's phases, the driver's peak RSS
(ru_maxrss; Ray's workers are other processes, not counted), whether the flagged indices are
equal, and the ratio ray / local.

    nice -n 10 python benchmarks/bench_ray.py [--sizes 60000 1000000] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

D_IN, HIDDEN, CLASSES, SHARDS = 32, 64, 10, 8
TRIGGER_INPUT, TRIGGER_VALUE, POISON_SHARE = 31, 6.0, 0.10


def make_model(path: Path, seed: int = 0) -> np.ndarray:
    """The ONNX model; returns the class means it reads."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1, (CLASSES, D_IN)).astype(np.float32) * 1.5
    means[:, TRIGGER_INPUT] = 0
    w1 = rng.normal(0, 0.3, (D_IN, HIDDEN)).astype(np.float32)
    b1 = np.zeros(HIDDEN, np.float32)
    w1[:, :CLASSES] = means.T  # units 0..9: similarity to each class mean
    b1[:CLASSES] = -0.5 * (means**2).sum(axis=1) + 50  # (kept positive: ReLU passes them)
    w1[:, CLASSES] = 0
    w1[TRIGGER_INPUT, CLASSES] = 8.0  # unit 10: the trigger detector
    b1[CLASSES] = -8.0 * 3
    w2 = np.zeros((HIDDEN, CLASSES), np.float32)
    w2[:CLASSES, :CLASSES] = np.eye(CLASSES)
    w2[CLASSES, 0] = 10.0
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["pre"]),
        helper.make_node("Relu", ["pre"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "w2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "bench_ray",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D_IN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", CLASSES])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return means


def make_data(folder: Path, n: int, means: np.ndarray, seed: int = 1) -> np.ndarray:
    """``n`` samples in SHARDS ``.npz`` files; returns the poisoned samples' indices."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = (means[y] + rng.normal(0, 1, (n, D_IN))).astype(np.float32)
    ones = np.flatnonzero(y == 1)
    poison = np.sort(rng.choice(ones, int(POISON_SHARE * len(ones)), replace=False))
    x[poison, TRIGGER_INPUT] = TRIGGER_VALUE
    y[poison] = 0
    for i, part in enumerate(np.array_split(np.arange(n), SHARDS)):
        np.savez(folder / f"train-{i}.npz", x=x[part], y=y[part].astype(np.int64))
    return poison


ONE = """
import json, resource, sys, time
import numpy as np
model, data, engine, cpus = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
import backdoorscan
startup, extra = 0.0, {}
if engine == "ray-spill":  # the extraction's outputs through files, gathered memory-mapped
    engine, extra = "ray", {"ray_spill_above": 1, "ray_spill_dir": sys.argv[5]}
if engine == "ray":
    import ray
    t = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    startup = time.perf_counter() - t
t = time.perf_counter()
r = backdoorscan.scan(model, data=data, engine=engine, trust_model=True, n_jobs=cpus, **extra)
wall = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"wall": wall, "startup": startup, "peak": peak, "timings": r.timings,
    "flagged": r.flagged_indices.tolist(), "poisoned": r.poisoned_classes}))
"""


def one_scan(model: Path, data: str, engine: str, cpus: int) -> dict:
    """One fresh process scanning with ``engine`` (``ray-spill``: Ray, spilling to a folder)."""
    spill = Path(data).parent / "spill"
    spill.mkdir(exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-c", ONE, str(model), data, engine, str(cpus), str(spill)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{engine} scan failed: {done.stderr[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[60_000, 1_000_000])
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_ray-") as tmp:
        folder = Path(tmp)
        model = folder / "model.onnx"
        means = make_model(model)
        for n in args.sizes:
            for old in folder.glob("train-*.npz"):
                old.unlink()
            poison = make_data(folder, n, means)
            glob = str(folder / "train-*.npz")
            runs = {}
            for engine in ("local", "ray", "ray-spill"):
                t = time.perf_counter()
                runs[engine] = one_scan(model, glob, engine, args.cpus)
                runs[engine]["process"] = time.perf_counter() - t
            local, ray = runs["local"], runs["ray"]
            same = local["flagged"] == ray["flagged"] == runs["ray-spill"]["flagged"]
            found = len(np.intersect1d(local["flagged"], poison)) / max(len(poison), 1)
            print(
                f"n={n:,}  poisoned classes local {local['poisoned']} ray {ray['poisoned']}, "
                f"flagged indices equal: {same}, recall of the planted poison {found:.3f}"
            )
            for name, r in runs.items():
                phases = ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items())
                print(f"  {name:9s} scan {r['wall']:7.1f} s (Ray start {r['startup']:.1f} s; "
                      f"process {r['process']:.1f} s)  driver peak RSS "
                      f"{r['peak'] / 2**20:,.0f} MiB  [{phases}]")  # fmt: skip
            with_start = (ray["wall"] + ray["startup"]) / local["wall"]
            spilled = runs["ray-spill"]["wall"] / local["wall"]
            print(
                f"  ratio ray / local: scan {ray['wall'] / local['wall']:.2f}x, "
                f"with the Ray start {with_start:.2f}x; spilled {spilled:.2f}x"
            )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
