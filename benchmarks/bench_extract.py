"""Activation extraction: ONNX Runtime (the scanner's path) against PyTorch eager, side by side.

Both run the same trained MNIST CNN (a built scenario, see benchmarks/README.md) over the same
samples at the same batch size, in one process, and return the penultimate activations; the
script checks that they agree and prints the throughput ratio.

    python benchmarks/scenarios.py build --only mnist_clean --threads 1
    python benchmarks/bench_extract.py [--scenario mnist_clean] [--n 20000] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    """Time both extractors and print a markdown row."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="mnist_clean")
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from scenarios import load_model

    from backdoorscan.scanner import prepare
    from backdoorscan.scanner.data import conform, from_arrays
    from backdoorscan.scanner.extract import extract, make_session

    folder = Path(__file__).parent / ".data" / "scenarios" / args.scenario
    arrays = np.load(folder / "train.npz")
    x, y = arrays["x"][: args.n], arrays["y"][: args.n]
    torch.set_num_threads(args.threads)
    model = load_model(folder).eval()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    captured: list[torch.Tensor] = []
    head.register_forward_pre_hook(lambda _m, inp: captured.append(inp[0]))

    def torch_pass() -> np.ndarray:
        out = np.empty((len(x), head.in_features), dtype=np.float32)
        with torch.no_grad():
            for s in range(0, len(x), args.batch_size):
                captured.clear()
                model(torch.from_numpy(x[s : s + args.batch_size]))
                out[s : s + args.batch_size] = captured[0].numpy()
        return out

    _, export = prepare(folder / "model.onnx")
    ds = conform(from_arrays(x, y), export.input_shape, export.input_dtype, export.num_classes)
    session = make_session(export, "cpu")

    def ort_pass() -> np.ndarray:
        return extract(
            export, ds, batch_size=args.batch_size, session=session, sketch_dim=0
        ).features

    ref, got = torch_pass(), ort_pass()
    diff = float(np.abs(ref - got).max())
    times: dict[str, list[float]] = {"torch": [], "ort": []}
    for _ in range(args.repeats):
        for name, fn in (("torch", torch_pass), ("ort", ort_pass)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    t_torch, t_ort = min(times["torch"]), min(times["ort"])
    print(f"machine: {platform.machine()}, torch {torch.__version__}, threads {args.threads}")
    print(f"max |features diff| = {diff:.2e}")
    print("| extractor | samples/s | ratio |")
    print("|---|---:|---:|")
    print(f"| PyTorch eager, no_grad | {len(x) / t_torch:,.0f} | 1.00 |")
    print(f"| ONNX Runtime (CPU) | {len(x) / t_ort:,.0f} | {t_torch / t_ort:.2f} |")


if __name__ == "__main__":
    main()
