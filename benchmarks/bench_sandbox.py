"""The cost of isolation: the model worker's session proxy against ONNX Runtime in-process.

One MNIST-sized pass (60,000 x 1x28x28 float32 by default, batches of 256) through a small CNN
built with onnx.helper (two 3x3 convolutions with pooling, a 64-unit hidden layer, 10 logits),
once through an ``onnxruntime.InferenceSession`` made by the scanner's own
``runtime.make_session`` in this process, once through ``ModelWorker.session`` (every batch
crosses the socket to the worker and its outputs come back), interleaved, ``--repeats`` times
each; the same thread count for both. It checks that both give identical outputs and prints,
for each path, the median and fastest wall time and the median CPU time (this process, plus the
worker's from /proc for the proxy: less disturbed than wall time on a shared machine), their
ratios, and the one-off cost of starting and confining the worker.

    python benchmarks/bench_sandbox.py [--n 60000] [--batch-size 256] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np


def small_cnn(seed: int = 0) -> bytes:
    """A trained-looking (random) MNIST CNN with ``logits`` and ``features`` outputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        scale = 1.0 / np.sqrt(np.prod(shape[1:]))
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * scale).astype(np.float32), name
        )

    inits = [
        w("c1", 16, 1, 3, 3), w("c2", 32, 16, 3, 3), w("f1", 32 * 5 * 5, 64), w("f2", 64, 10),
        numpy_helper.from_array(np.zeros(64, np.float32), "b1"),
        numpy_helper.from_array(np.zeros(10, np.float32), "b2"),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "c1"], ["h1"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "c2"], ["h2"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["flat"]),
        helper.make_node("Gemm", ["flat", "f1", "b1"], ["h3"]),
        helper.make_node("Relu", ["h3"], ["features"]),
        helper.make_node("Gemm", ["features", "f2", "b2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mnist_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 64]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) of this process, or of process ``pid`` from /proc."""
    if pid is None:
        return time.process_time()
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_pass(
    session: object, x: np.ndarray, batch: int, worker: int | None = None
) -> tuple[float, float, np.ndarray]:
    """Wall and CPU seconds (this process plus ``worker``) for one pass over ``x``, and the
    features (so that both paths can be compared)."""
    feats = np.empty((len(x), 64), np.float32)
    cpu0 = cpu_seconds(None) + (cpu_seconds(worker) if worker else 0.0)
    start = time.perf_counter()
    for s in range(0, len(x), batch):
        _, f = session.run(["logits", "features"], {"x": x[s : s + batch]})  # type: ignore[attr-defined]
        feats[s : s + len(f)] = f
    wall = time.perf_counter() - start
    cpu = cpu_seconds(None) + (cpu_seconds(worker) if worker else 0.0) - cpu0
    return wall, cpu, feats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import onnxruntime as ort

    from backdoorscan.adapters.base import OnnxExport
    from backdoorscan.runtime import make_session
    from backdoorscan.sandbox import Limits, ModelWorker

    export = OnnxExport(small_cnn(), "x", (1, 28, 28), "float32", "features", 64, 10)
    x = np.random.default_rng(1).random((args.n, 1, 28, 28), dtype=np.float32)
    direct = make_session(export, "cpu", threads=args.threads)
    start = time.perf_counter()
    worker = ModelWorker(Limits(max_memory=1 << 30, timeout=600.0))
    with worker:
        proxy = worker.session(export, "cpu", threads=args.threads)
        startup = time.perf_counter() - start
        one_pass(direct, x[:2048], args.batch_size)  # warm-up, both
        one_pass(proxy, x[:2048], args.batch_size)
        t_direct, t_proxy, c_direct, c_proxy = [], [], [], []
        for _ in range(args.repeats):
            td, cd, fd = one_pass(direct, x, args.batch_size)
            tp, cp, fp = one_pass(proxy, x, args.batch_size, worker.pid)
            t_direct.append(td)
            t_proxy.append(tp)
            c_direct.append(cd)
            c_proxy.append(cp)
            np.testing.assert_array_equal(fd, fp)
        status = worker.status
    d, p = statistics.median(t_direct), statistics.median(t_proxy)
    dmin, pmin = min(t_direct), min(t_proxy)
    dcpu, pcpu = statistics.median(c_direct), statistics.median(c_proxy)
    mb = x.nbytes / 1e6
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; onnxruntime {ort.__version__}")
    print(f"pass: {args.n} x 1x28x28 float32 ({mb:.0f} MB), batch {args.batch_size}, "
          f"{args.threads} threads, median of {args.repeats}")  # fmt: skip
    print(f"isolation: {status.summary() if status else '?'}")
    print(f"direct ONNX Runtime: {d:.3f} s  ({args.n / d:,.0f} samples/s)")
    print(f"sandboxed proxy:     {p:.3f} s  ({args.n / p:,.0f} samples/s)")
    print(f"proxy / direct: {p / d:.3f}  (overhead {100 * (p - d) / d:+.1f} % of the pass)")
    print(
        f"fastest of each: direct {dmin:.3f} s, proxy {pmin:.3f} s, ratio {pmin / dmin:.3f} "
        f"(+{1000 * (pmin - dmin) / -(-args.n // args.batch_size):.2f} ms per batch)"
    )
    print(f"worker start + confinement + session: {startup:.2f} s (once per model)")
    print(f"worker peak RSS: {worker.peak_rss / 2**20:.0f} MiB")
    print(f"CPU time, median: direct {dcpu:.3f} s, proxy {pcpu:.3f} s (scanner + worker), "
          f"ratio {pcpu / dcpu:.3f}")  # fmt: skip
    print(f"all wall times: direct {[round(t, 3) for t in t_direct]}")
    print(f"                proxy  {[round(t, 3) for t in t_proxy]}")


if __name__ == "__main__":
    main()
