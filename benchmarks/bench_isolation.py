"""What the worker process costs a whole scan: `backdoorscan scan` on an MNIST scenario, model
isolated in its worker (the default) against loaded in the scanner's process (--trust-model).

Each scan is a fresh process, as a review or a CI job runs it; the two ways alternate, and the
median wall time of each and their ratio are printed, with each way's peak resident memory as
the kernel counts it (the largest of the scanner and its worker).

    python benchmarks/scenarios.py build --only mnist_l2l1_10 --threads 1
    python benchmarks/bench_isolation.py [--scenario DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent / ".data" / "scenarios" / "mnist_l2l1_10"
WRAPPER = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "wall = time.perf_counter() - t\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
    "print(json.dumps([r.returncode, wall, peak, r.stderr[-300:]]))\n"
)


def one_scan(scenario: Path, trusted: bool, out: Path) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak RSS bytes) of one fresh `backdoorscan scan`."""
    cmd = [
        sys.executable, "-m", "backdoorscan", "scan", str(scenario / "model.onnx"),
        "--data", str(scenario / "train.npz"), "--format", "json", "-o", str(out), "-q",
    ]  # fmt: skip
    if trusted:
        cmd.append("--trust-model")
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, check=True
    )
    code, wall, peak, err = json.loads(done.stdout)
    if code not in (0, 1):
        raise SystemExit(f"scan failed ({code}): {err}")
    return code, wall, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", type=Path, default=DEFAULT)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not (args.scenario / "model.onnx").exists():
        raise SystemExit(f"no scenario at {args.scenario}: build it first (see the docstring)")
    out = Path(os.environ.get("TMPDIR", "/tmp")) / "bench_isolation.json"
    one_scan(args.scenario, True, out)  # warm the page cache and the kernel cache once
    runs: dict[str, list[tuple[int, float, int]]] = {"isolated": [], "trusted": []}
    for _ in range(args.repeats):
        for name in ("isolated", "trusted"):
            runs[name].append(one_scan(args.scenario, name == "trusted", out))
    verdicts = {name: {r[0] for r in rs} for name, rs in runs.items()}
    print(f"scenario {args.scenario.name}, {args.repeats} alternating runs each, "
          f"load average {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d %H:%M')}")  # fmt: skip
    for name, rs in runs.items():
        walls = [r[1] for r in rs]
        print(
            f"  {name:<9} wall median {statistics.median(walls):6.2f} s "
            f"({', '.join(f'{w:.2f}' for w in walls)}), peak RSS "
            f"{max(r[2] for r in rs) / 2**20:.0f} MiB, exit {sorted(verdicts[name])}"
        )
    ratio = statistics.median(r[1] for r in runs["isolated"]) / statistics.median(
        r[1] for r in runs["trusted"]
    )
    print(f"  isolated / trusted wall: {ratio:.3f} (cost of isolation {100 * (ratio - 1):+.1f} %)")


if __name__ == "__main__":
    main()
