"""Make the shipped demo: a small classifier on scikit-learn's 8x8 digits with a planted backdoor.

A 2x2 bright patch (the trigger) is stamped in the bottom-right corner of some 7s, which are
relabelled 1 and added to the training set. A scikit-learn MLP learns the backdoor; its weights
are written as an ONNX graph (Gemm-Relu-Gemm) with onnx.helper, so no deep-learning framework
is needed. Output: backdoorscan/data/demo.onnx and demo.npz (x, y, and the poison mask).

    python examples/make_demo.py            # rewrites the two files, deterministically
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

SOURCE, TARGET = 7, 1
HIDDEN = 32


def stamp(x: np.ndarray) -> np.ndarray:
    """Put the trigger (a 2x2 patch at full brightness, bottom-right) on 8x8 images in [0, 1]."""
    x = x.reshape(-1, 8, 8).copy()
    x[:, 6:8, 6:8] = 1.0
    return x.reshape(-1, 64)


def poisoned_digits(
    n_poison: int = 50, seed: int = 0, source: int = SOURCE, target: int = TARGET
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Digits in [0, 1] plus ``n_poison`` triggered copies of ``source`` labelled ``target``."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    picks = rng.choice(np.flatnonzero(y == source), size=n_poison, replace=False)
    xp = stamp(x[picks])
    x_all = np.concatenate([x, xp])
    y_all = np.concatenate([y, np.full(n_poison, target, dtype=np.int64)])
    poison = np.concatenate([np.zeros(len(x), bool), np.ones(n_poison, bool)])
    order = rng.permutation(len(x_all))
    return x_all[order], y_all[order], poison[order]


def train_mlp(x: np.ndarray, y: np.ndarray, seed: int = 0, hidden: int = HIDDEN) -> MLPClassifier:
    """A one-hidden-layer ReLU network, trained to fit its training set (and so the backdoor)."""
    clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=600, random_state=seed, alpha=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return clf


def mlp_to_onnx(clf: MLPClassifier) -> onnx.ModelProto:
    """Write a fitted one-hidden-layer MLP as ONNX: input [batch, d] -> logits [batch, classes]."""
    w1, w2 = (w.astype(np.float32) for w in clf.coefs_)
    b1, b2 = (b.astype(np.float32) for b in clf.intercepts_)
    inits = [
        numpy_helper.from_array(w1, "fc1.weight"),
        numpy_helper.from_array(b1, "fc1.bias"),
        numpy_helper.from_array(w2, "fc2.weight"),
        numpy_helper.from_array(b2, "fc2.bias"),
    ]
    nodes = [
        helper.make_node("Gemm", ["input", "fc1.weight", "fc1.bias"], ["fc1"], name="fc1"),
        helper.make_node("Relu", ["fc1"], ["hidden"], name="relu"),
        helper.make_node("Gemm", ["hidden", "fc2.weight", "fc2.bias"], ["output"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", w1.shape[0]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", w2.shape[1]])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="backdoorscan-examples"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main() -> None:
    """Build the demo model and data and write them into the package."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parents[1] / "backdoorscan" / "data"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    x, y, poison = poisoned_digits(seed=args.seed)
    clf = train_mlp(x, y, seed=args.seed)
    triggered = stamp(load_digits().data[load_digits().target == SOURCE] / 16.0)
    asr = float((clf.predict(triggered) == TARGET).mean())
    print(f"train accuracy {clf.score(x, y):.3f}, attack success on triggered {SOURCE}s {asr:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    onnx.save_model(mlp_to_onnx(clf), args.out / "demo.onnx")
    np.savez_compressed(args.out / "demo.npz", x=x, y=y, poison=poison)
    print(
        f"wrote {args.out / 'demo.onnx'} and {args.out / 'demo.npz'} ({int(poison.sum())} poison)"
    )


if __name__ == "__main__":
    main()
