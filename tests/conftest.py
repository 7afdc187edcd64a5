"""Shared fixtures: digits CNNs (clean and backdoored) trained and exported once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import digits_models as dm


def _write_case(root: Path, name: str, n_poison: int, seed: int) -> dict:
    pytest.importorskip("torch")
    import torch

    torch.set_num_threads(1)
    x, y, poison = dm.digits_data(n_poison, seed=seed)
    model = dm.train(dm.make_cnn(), x, y, seed=seed)
    folder = root / name
    folder.mkdir()
    (folder / "model.onnx").write_bytes(dm.to_onnx_bytes(model))
    np.savez(folder / "train.npz", x=x, y=y)
    return {
        "dir": folder,
        "model": folder / "model.onnx",
        "data": folder / "train.npz",
        "x": x,
        "y": y,
        "poison": poison,
        "torch_model": model,
    }


@pytest.fixture(scope="session")
def poisoned_digits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A CNN trained on digits plus 50 triggered 7s labelled 1, exported as plain ONNX."""
    return _write_case(tmp_path_factory.mktemp("digits"), "poisoned", 50, seed=0)


@pytest.fixture(scope="session")
def clean_digits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same CNN trained on clean digits."""
    return _write_case(tmp_path_factory.mktemp("digits"), "clean", 0, seed=1)
