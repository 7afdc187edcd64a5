"""What retraining in the worker process costs a repair: `backdoorscan repair` of a PyTorch state
dict (the digits CNN of the tests, 50 poisoned 7s labelled 1) retrained in its confined worker
(the default) against loaded in the scanner's process (--trust-model).

Each repair is a fresh process; the two ways alternate; the median wall time of each, their
ratio, the peak resident memory (largest of the scanner and its worker, as the kernel counts
it) and the repaired model's attack success on held-out triggered 7s are printed.

    python benchmarks/bench_repair_isolation.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bench_isolation import WRAPPER  # noqa: E402  (runs a command, prints code, wall, peak)


def build(folder: Path) -> None:
    """The poisoned digits CNN as a state dict, its training data, test and trigger sets."""
    import digits_models as dm
    import numpy as np
    import torch

    x, y, poison = dm.digits_data(50, seed=0)
    rng = np.random.default_rng(1)
    test = np.sort(rng.choice(np.flatnonzero(~poison), size=300, replace=False))
    train = np.setdiff1d(np.arange(len(y)), test)
    model = dm.train(dm.make_cnn(), x[train], y[train], epochs=15, seed=0)
    torch.save(model.state_dict(), folder / "model.pt")
    np.savez(folder / "train.npz", x=x[train], y=y[train])
    np.savez(folder / "test.npz", x=x[test], y=y[test])
    sevens = y[test] == dm.SOURCE
    np.savez(folder / "trigger.npz", x=dm.stamp(x[test][sevens]), y=y[test][sevens])


def one_repair(folder: Path, trusted: bool) -> tuple[int, float, int, float]:
    """(exit code, wall seconds, peak RSS bytes, attack success after) of one fresh repair."""
    out = folder / ("trusted.pt" if trusted else "isolated.pt")
    report = folder / "report.json"
    cmd = [
        sys.executable, "-m", "backdoorscan", "repair", str(folder / "model.pt"),
        "--arch", "digits_models:make_cnn", "--input-shape", "1,8,8",
        "--data", str(folder / "train.npz"), "--test", str(folder / "test.npz"),
        "--trigger-test", str(folder / "trigger.npz"), "--clusters", "2",
        "-o", str(out), "--format", "json", "--report", str(report), "-q",
    ]  # fmt: skip
    if trusted:
        cmd.append("--trust-model")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, env=env
    )
    code, wall, peak, err = json.loads(proc.stdout)
    if code not in (0, 1):
        raise SystemExit(f"repair failed ({code}): {err}")
    doc = json.loads(report.read_text())
    return code, wall, peak, float(doc["repair"]["metrics"]["after"].get("asr", float("nan")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build(folder)
        runs: dict[bool, list[tuple[int, float, int, float]]] = {False: [], True: []}
        for i in range(args.repeats):
            for trusted in (False, True) if i % 2 == 0 else (True, False):
                runs[trusted].append(one_repair(folder, trusted))
    rows = {}
    for trusted, name in ((False, "worker (default)"), (True, "--trust-model")):
        walls = [r[1] for r in runs[trusted]]
        rows[trusted] = statistics.median(walls)
        print(
            f"{name:18s} wall median {rows[trusted]:6.2f} s  (all: "
            f"{', '.join(f'{w:.2f}' for w in walls)})  peak RSS "
            f"{max(r[2] for r in runs[trusted]) / 2**20:6.0f} MiB  exit "
            f"{sorted({r[0] for r in runs[trusted]})}  ASR after "
            f"{', '.join(f'{r[3]:.3f}' for r in runs[trusted])}"
        )
    print(f"worker / trusted wall ratio: {rows[False] / rows[True]:.2f}")


if __name__ == "__main__":
    main()
