"""Retraining without loading the model in the scanner (issue #12): a model file kept in the
confined worker (``sandbox/remote.py``) trains, predicts, copies, exports and saves through
requests, in PyTorch (state dict, TorchScript) and Keras, and the scanner never imports the
framework for it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backdoorscan.adapters.base import Retrainable
from backdoorscan.sandbox import Limits, ModelError, ModelWorker
from backdoorscan.sandbox.remote import RemoteModel, load_remote

TESTS = Path(__file__).resolve().parent


def _data(n: int = 120, d: int = 8, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.arange(n) % classes
    x = rng.normal(size=(n, d)).astype(np.float32) + y[:, None].astype(np.float32)
    return x, y.astype(np.int64)


def _check_round_trip(remote: RemoteModel, folder: Path, suffix: str, reinit: bool = True) -> Path:
    """Train a copy in the worker, check the copy moved and the original did not, save it."""
    x, y = _data()
    assert isinstance(remote, Retrainable)
    assert remote.can_fit, remote.fit_reason
    before = remote.predict_logits(x)
    twin = remote.clone()
    twin.fit(x, y, epochs=30, batch_size=32, lr=1e-2, seed=0)
    after = twin.predict_logits(x)
    assert after.shape == before.shape == (len(x), 3)
    # Trained on separable data: the copy learned it; the original is untouched.
    assert (after.argmax(1) == y).mean() > 0.8
    np.testing.assert_allclose(remote.predict_logits(x), before, rtol=1e-5, atol=1e-6)
    export = twin.to_onnx()
    assert export.features_name and export.num_classes == 3
    if reinit:
        twin.reinitialize(seed=1)
        assert not np.allclose(twin.predict_logits(x), after)
    else:  # the worker's one-line refusal, and the model is still usable
        with pytest.raises(ModelError, match="reset_parameters"):
            twin.reinitialize(seed=1)
        np.testing.assert_allclose(twin.predict_logits(x), after, rtol=1e-5, atol=1e-6)
    out = twin.save(folder / f"out{suffix}")
    assert out.is_file() and out.stat().st_size > 0
    twin.close()
    return out


def test_a_torch_state_dict_trains_and_saves_in_the_worker(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    torch.save(net.state_dict(), tmp_path / "m.pt")
    arch = tmp_path / "arch_mod.py"
    arch.write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), "
        "torch.nn.Linear(16, 3))\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        with ModelWorker(Limits(allow_read=[tmp_path], timeout=120)) as w:
            remote = load_remote(w, tmp_path / "m.pt", arch="arch_mod:make", input_shape=(8,))
            assert remote.framework == "torch"
            out = _check_round_trip(remote, tmp_path, ".pt")
            assert w.status is not None and w.status.seccomp.startswith("on")
    finally:
        sys.path.remove(str(tmp_path))
    state = torch.load(out, weights_only=True)  # tensors only: readable without pickles
    assert set(state) == set(net.state_dict())


def test_a_torchscript_file_trains_in_the_worker(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    torch.jit.save(torch.jit.script(net), str(tmp_path / "m.ts"))
    with ModelWorker(Limits(allow_read=[tmp_path], timeout=120)) as w:
        remote = load_remote(w, tmp_path / "m.ts", input_shape=(8,))
        # TorchScript keeps no reset_parameters: ExRe 'full' from scratch is refused, in a line.
        out = _check_round_trip(remote, tmp_path, ".ts", reinit=False)
    reloaded = torch.jit.load(str(out))
    assert reloaded(torch.zeros(2, 8)).shape == (2, 3)


def test_a_keras_file_trains_in_the_worker_and_the_scanner_never_imports_keras(
    tmp_path: Path,
) -> None:
    pytest.importorskip("keras")
    # A fresh process: this test process may have imported Keras for other tests.
    code = (
        "import keras, os\n"
        "m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation='relu'),"
        " keras.layers.Dense(3)])\n"
        f"m.save({str(tmp_path / 'm.keras')!r})\n"
    )
    env = {**os.environ, "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "torch")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
    check = (
        "import sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "from pathlib import Path\n"
        "import test_remote_model as t\n"
        "from backdoorscan.sandbox import Limits, ModelWorker\n"
        "from backdoorscan.sandbox.remote import load_remote\n"
        f"folder = Path({str(tmp_path)!r})\n"
        "with ModelWorker(Limits(allow_read=[folder], timeout=120)) as w:\n"
        "    remote = load_remote(w, folder / 'm.keras')\n"
        "    t._check_round_trip(remote, folder, '.keras')\n"
        "assert 'keras' not in sys.modules and 'torch' not in sys.modules, 'loaded here'\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    keras = pytest.importorskip("keras")
    reloaded = keras.saving.load_model(tmp_path / "out.keras")  # the archive is a whole model
    out = keras.ops.convert_to_numpy(reloaded.predict(np.zeros((2, 8), np.float32), verbose=0))
    assert out.shape == (2, 3)
