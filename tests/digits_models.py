"""Small PyTorch models trained on scikit-learn's 8x8 digits, clean or with a planted backdoor.

Shared by the tests that need a real trained network and the truth about its poison.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from sklearn.datasets import load_digits

SOURCE, TARGET = 7, 1


def stamp(x: np.ndarray) -> np.ndarray:
    """The trigger: a 2x2 patch at full brightness in the bottom-right corner of [N,1,8,8]."""
    x = x.copy()
    x[:, :, 6:8, 6:8] = 1.0
    return x


def digits_data(n_poison: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Digits as float32 [N,1,8,8] in [0,1], with ``n_poison`` triggered 7s relabelled 1 added."""
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    poison = np.zeros(len(x), bool)
    if n_poison:
        picks = rng.choice(np.flatnonzero(y == SOURCE), size=n_poison, replace=False)
        x = np.concatenate([x, stamp(x[picks])])
        y = np.concatenate([y, np.full(n_poison, TARGET, np.int64)])
        poison = np.concatenate([poison, np.ones(n_poison, bool)])
    order = rng.permutation(len(x))
    return x[order], y[order], poison[order]


def make_cnn():
    """conv8-conv16-pool-fc64-fc10: the penultimate layer is the 64-unit ReLU."""
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def train(model, x: np.ndarray, y: np.ndarray, epochs: int = 30, seed: int = 0):
    """Full-batch-ish Adam training, seeded; returns the model in eval mode."""
    import torch

    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    return model.eval()


def to_onnx_bytes(model, sample_shape: tuple[int, ...] = (1, 8, 8)) -> bytes:
    """Plain single-output ONNX export with a dynamic batch (as a third party would ship it)."""
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            torch.zeros(2, *sample_shape),
            buf,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            dynamo=False,
        )
    return buf.getvalue()
