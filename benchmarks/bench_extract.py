"""Activation extraction: ONNX Runtime (the scanner's path) against PyTorch eager, side by side.

All contenders run the same trained model (a built scenario, see benchmarks/README.md: the
MNIST CNN or the Rotten Tomatoes text CNN) over the same samples at the same batch size, in one
process, interleaved, and return the penultimate activations; the script checks that they agree
and prints each one's throughput and its ratio to PyTorch:

- PyTorch eager under ``no_grad``;
- ONNX Runtime on the graph as exported;
- ONNX Runtime on the scanner's session (1-D convolutions run as 2-D ones, scanner/graph.py);
- the scanner's extraction with the input sketch built between batches, once with the BLAS
  library's threads left free and once held to one thread (what ``scan`` does: both pools
  spin on the same two cores otherwise).

    python benchmarks/scenarios.py build --only mnist_clean rt_text --threads 1
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

    import onnxruntime as ort
    from threadpoolctl import threadpool_limits

    export = prepare(folder / "model.onnx").export
    ds = conform(from_arrays(x, y), export.input_shape, export.input_dtype, export.num_classes)
    scanner_session = make_session(export, "cpu")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    plain_session = ort.InferenceSession(
        export.model_bytes, options, providers=["CPUExecutionProvider"]
    )

    def ort_pass(session: object, sketch_dim: int = 0) -> np.ndarray:
        return extract(
            export, ds, batch_size=args.batch_size, session=session, sketch_dim=sketch_dim
        ).features

    def sketch_blas_one() -> np.ndarray:
        with threadpool_limits(limits=1, user_api="blas"):
            return ort_pass(scanner_session, 64)

    contenders = {
        "PyTorch eager, no_grad": torch_pass,
        "ONNX Runtime, graph as exported": lambda: ort_pass(plain_session),
        "ONNX Runtime, scanner's session": lambda: ort_pass(scanner_session),
        "scanner's extraction + input sketch, BLAS threads free": lambda: ort_pass(
            scanner_session, 64
        ),
        "scanner's extraction + input sketch, BLAS one thread (scan)": sketch_blas_one,
    }
    ref = torch_pass()
    diff = max(float(np.abs(ref - fn()).max()) for fn in contenders.values())
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    best = {name: min(v) for name, v in times.items()}
    t_torch = best["PyTorch eager, no_grad"]
    print(
        f"scenario {args.scenario}, {len(x)} samples, batch {args.batch_size}; machine: "
        f"{platform.machine()}, torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"threads {args.threads}; best of {args.repeats}"
    )
    print(f"max |features diff| against PyTorch, over every contender = {diff:.2e}")
    print("| extractor | samples/s | ratio to PyTorch |")
    print("|---|---:|---:|")
    for name, t in best.items():
        print(f"| {name} | {len(x) / t:,.0f} | {t_torch / t:.2f} |")


if __name__ == "__main__":
    main()
