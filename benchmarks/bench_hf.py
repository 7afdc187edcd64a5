"""Extraction at 224 x 224 x 3 (issue #16): a ResNet-18 saved as a Hugging Face folder, ONNX
Runtime (the scanner's path) against PyTorch eager on the same model, side by side.

The model is transformers' ``ResNetForImageClassification`` with ResNet-18's shape (basic
blocks, depths 2-2-2-2, widths 64-128-256-512, 11.7 M parameters; random weights: speed does not
depend on them), saved with ``save_pretrained`` and exported by ``adapters/hf.py``. Contenders,
on the same batches of the same images, interleaved, each ``--repeats`` times (best kept):

- ``torch eager``: the PyTorch model under ``no_grad``, logits and the head's input;
- ``onnxruntime``: the scanner's ONNX export (the head's input as ``features``) in this process;
- ``scan path``: what ``backdoorscan scan FOLDER --data images/`` does for extraction: the PNG
  folder decoded and resized by ``ImageRows`` (read-ahead on) and the export run in the
  confined model worker (``prepare`` + ``extract``), samples per second end to end.

Printed: samples/s of each, the ratio to PyTorch, the estimated time of a 50,000-image scan's
extraction, peak RSS of this process (ru_maxrss; the worker's is its own).

    python benchmarks/bench_hf.py [--n 256] [--batch-size 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(folder: Path) -> None:
    """Save a ResNet-18-shaped transformers classifier (10 classes) with its preprocessor."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(
        num_channels=3, embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
        layer_type="basic", num_labels=10,
    )  # fmt: skip
    model = ResNetForImageClassification(config).eval()
    model.save_pretrained(folder)
    pre = {
        "do_resize": True, "size": {"height": 224, "width": 224}, "resample": 2,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    }  # fmt: skip
    import json

    (folder / "preprocessor_config.json").write_text(json.dumps(pre))


def write_images(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` 256 x 256 noise PNGs in 10 class folders (resized to 224 by the scan)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        path = root / f"c{i % 10}" / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(path)
    return root


def main() -> None:
    """Time the contenders and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from backdoorscan.adapters import hf
    from backdoorscan.scanner.config import RunOptions
    from backdoorscan.scanner.extract import extract, make_session
    from backdoorscan.scanner.pipeline import load_dataset, prepare
    from backdoorscan.scanner.published import PublishedDataset

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_hf_"))
    folder = tmp / "resnet18"
    build(folder)
    images = write_images(tmp / "images", args.n)
    adapter = hf.load(folder)
    t = time.perf_counter()
    export = adapter.to_onnx()
    export_s = time.perf_counter() - t
    opts = RunOptions(batch_size=args.batch_size)
    ds = load_dataset(images, options=opts, model=folder)
    assert isinstance(ds, PublishedDataset)
    norm = {k: ds.normalisation.get(k) for k in ("scale", "mean", "std")}
    from backdoorscan.scanner.data import conform

    conform(ds, export.input_shape, export.input_dtype, export.num_classes, **norm)
    batches = [ds.batch(s, min(s + args.batch_size, len(ds))) for s in range(0, len(ds), 32)]
    module = adapter.module
    head = [m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1]
    captured: list = []
    head.register_forward_pre_hook(lambda _m, inp: captured.append(inp[0]))
    session = make_session(export, "cpu", threads=args.threads)

    def eager() -> np.ndarray:
        captured.clear()
        with torch.no_grad():
            for xb in batches:
                module(torch.from_numpy(xb))
        return torch.cat(captured).numpy()

    def ort() -> np.ndarray:
        outs = [session.run([export.features_name], {export.input_name: xb})[0] for xb in batches]
        return np.concatenate(outs)

    def scan_path() -> tuple[np.ndarray, float, float]:
        t0 = time.perf_counter()
        with prepare(str(folder), ds, run_options=opts) as prepared:
            fresh = load_dataset(images, options=opts, model=folder)
            conform(fresh, export.input_shape, export.input_dtype, export.num_classes, **norm)
            sess = prepared.session("cpu", threads=args.threads)
            t1 = time.perf_counter()
            acts = extract(prepared.export, fresh, batch_size=args.batch_size, session=sess)
            t2 = time.perf_counter()
            fresh.close()
            return acts.features, t1 - t0, t2 - t1

    timings: dict[str, float] = {"torch eager": np.inf, "onnxruntime": np.inf}
    results: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for name, fn in (("torch eager", eager), ("onnxruntime", ort)):
            t = time.perf_counter()
            results[name] = fn()
            timings[name] = min(timings[name], time.perf_counter() - t)
    results["scan path"], start_s, timings["scan path: PNG decode + worker"] = scan_path()
    ref = results["torch eager"]
    for name in ("onnxruntime", "scan path"):
        diff = float(np.abs(results[name] - ref).max() / (1 + np.abs(ref).max()))
        print(f"{name}: max |diff| / (1 + max |ref|) against torch = {diff:.1e}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\nResNet-18 (transformers, 11.7 M params) at 224x224x3, n={args.n}, batch "
        f"{args.batch_size}, {args.threads} threads, {platform.processor() or platform.machine()}"
        f", export {export_s:.1f} s in process, worker start + export {start_s:.1f} s (once per "
        f"scan, not in the rates), peak RSS {peak:.0f} MiB\n"
    )
    print("| contender | samples/s | vs torch eager | 50,000 images |")
    print("|---|---:|---:|---:|")
    base = args.n / timings["torch eager"]
    for name, secs in timings.items():
        rate = args.n / secs
        est = 50_000 / rate
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {est / 60:.0f} min |")
    ds.close()


if __name__ == "__main__":
    main()
