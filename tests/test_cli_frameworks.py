"""The command line on PyTorch and Keras models: a planted backdoor found in every model format.

The digits CNN of ``digits_models`` (50 triggered 7s relabelled 1) is saved as a state dict, as
TorchScript and as a torch.export archive, and a Keras CNN is trained on the same poisoned data;
each file is scanned through ``backdoorscan.cli.main`` (what the console script runs, so the exit
codes are the documented ones), and the JSON report's flagged indices are checked against the
known poison. Also: a clean model exits 0, ``export`` writes a working ONNX, ``layers`` marks the
default, a pickled whole model is refused without running it, in-memory models scan from Python.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
torch = pytest.importorskip("torch")
TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

import digits_models as dm  # noqa: E402

import backdoorscan  # noqa: E402
from backdoorscan.cli import main  # noqa: E402

ARCH = ["--arch", "digits_models:make_cnn", "--input-shape", "1,8,8"]
# Keras' torch backend converts through np.array without the copy keyword (its issue, not ours);
# the TorchScript file is written here to be read back, and torch deprecates writing it.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated"),
]


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private export cache for this module, so that runs never see each other's exports."""
    folder = tmp_path_factory.mktemp("onnx-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BACKDOORSCAN_CACHE_DIR", str(folder))
        yield folder


def run_cli(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    """Run ``backdoorscan ARGS`` in this process through main(); (exit code, stdout, stderr)."""
    handler = signal.getsignal(signal.SIGTERM)  # main() installs its own
    try:
        with pytest.raises(SystemExit) as done:
            main([str(a) for a in args])
    finally:
        signal.signal(signal.SIGTERM, handler)
    out, err = capsys.readouterr()
    return int(done.value.code or 0), out, err


def precision_recall(flagged: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    tp = int((flagged & truth).sum())
    return tp / max(int(flagged.sum()), 1), tp / max(int(truth.sum()), 1)


def flagged_mask(report: dict, n: int) -> np.ndarray:
    mask = np.zeros(n, bool)
    mask[report["flagged_indices"]] = True
    return mask


def keras_cnn() -> Any:
    """The digits CNN in Keras (NHWC): conv8-conv16-pool-dense64 ("hidden")-dense10."""
    import keras

    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            layers.Conv2D(8, 3, padding="same", activation="relu"),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(64, activation="relu", name="hidden"),
            layers.Dense(10, name="logits"),
        ]
    )


@pytest.fixture(scope="module")
def torch_files(poisoned_digits: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The poisoned digits CNN as a state dict, a TorchScript archive and a torch.export archive."""
    folder = tmp_path_factory.mktemp("torch-files")
    model = poisoned_digits["torch_model"].eval()
    example = torch.from_numpy(poisoned_digits["x"][:4])
    torch.save(model.state_dict(), folder / "weights.pt")
    torch.jit.script(model).save(str(folder / "model.ts"))
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(folder / "model.pt2"))
    nhwc = folder / "train_nhwc.npz"
    np.savez(nhwc, x=poisoned_digits["x"].transpose(0, 2, 3, 1), y=poisoned_digits["y"])
    return {
        "state_dict": [folder / "weights.pt", *ARCH],
        "torchscript": [folder / "model.ts"],
        "torch.export": [folder / "model.pt2"],
        "nhwc_data": nhwc,
    }


@pytest.fixture(scope="module")
def keras_case(poisoned_digits: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A Keras CNN trained on the same poisoned digits (NHWC), saved as a .keras archive."""
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras_cnn()
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = poisoned_digits["x"].transpose(0, 2, 3, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: a second thread only spins on a shared machine
    try:
        model.fit(x, poisoned_digits["y"], epochs=10, batch_size=64, shuffle=True, verbose=0)
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("keras-files") / "model.keras"
    model.save(path)
    return {"model": model, "path": path, "x": x}


FORMATS = ["state_dict", "torchscript", "torch.export", "keras"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_planted_backdoor_is_found_in_every_format(
    fmt: str,
    request: pytest.FixtureRequest,
    poisoned_digits: dict,
    capsys: pytest.CaptureFixture,
    tmp_path: Path,
) -> None:
    data = poisoned_digits["data"]  # NCHW; the Keras model takes NHWC and the scan converts it
    if fmt == "keras":
        model_args = [request.getfixturevalue("keras_case")["path"]]
    else:
        files = request.getfixturevalue("torch_files")
        model_args = files[fmt]
        if fmt == "torch.export":  # the archive records NCHW; NHWC data is converted to it
            data = files["nhwc_data"]
    out = tmp_path / "report.json"
    code, stdout, err = run_cli(
        capsys, "scan", *model_args, "--data", data, "--format", "json", "-o", out, "-q"
    )
    assert code == 1, err
    assert stdout == ""  # --quiet with -o: the report goes to the file only
    report = json.loads(out.read_text())
    truth = poisoned_digits["poison"]
    precision, recall = precision_recall(flagged_mask(report, len(truth)), truth)
    assert report["verdict"] == "backdoor" and report["poisoned_classes"] == [dm.TARGET]
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    target = next(c for c in report["classes"] if c["label"] == dm.TARGET)
    assert target["suspected_source"] == dm.SOURCE
    framework = "keras" if fmt == "keras" else "torch"
    assert report["model"]["framework"] == framework
    assert report["model"]["feature_dim"] == 64  # the penultimate layer, not the logits
    assert report["data"]["model_agreement"] > 0.95


def test_clean_model_exits_zero(
    clean_digits: dict, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    weights = tmp_path / "clean.pt"
    torch.save(clean_digits["torch_model"].state_dict(), weights)
    code, stdout, err = run_cli(capsys, "scan", weights, *ARCH, "--data", clean_digits["data"])
    assert code == 0, err
    first = stdout.splitlines()[0]
    assert first.startswith("No poison found in the") and "(10 classes)" in first


def test_export_writes_a_working_onnx_and_reuses_the_cache(
    torch_files: dict,
    poisoned_digits: dict,
    cache_dir: Path,
    capsys: pytest.CaptureFixture,
    tmp_path: Path,
) -> None:
    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    weights = torch_files["state_dict"]
    args = ["export", *weights, "--layer", "6", "-o", out]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    assert stdout.startswith(f"wrote {out}") and "features from '6' (64 values)" in stdout
    ort.set_default_logger_severity(3)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", "features"]
    x = poisoned_digits["x"][:37]  # a batch size the export never saw
    logits, features = sess.run(None, {sess.get_inputs()[0].name: x})
    model = poisoned_digits["torch_model"]
    with torch.no_grad():
        ref_logits = model(torch.from_numpy(x)).numpy()
        ref_features = model[:7](torch.from_numpy(x)).numpy()  # module "6": Linear(256, 64)
    assert logits.shape == (37, 10) and features.shape == (37, 64)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4)
    np.testing.assert_allclose(features, ref_features, atol=1e-4)
    # The same export again comes from the cache, which lives where the docs say.
    assert any(cache_dir.glob("*.onnx"))
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "loaded from the export cache" in stdout


def test_wrong_input_layout_is_one_line_error(
    torch_files: dict, capsys: pytest.CaptureFixture
) -> None:
    """TorchScript records no input shape: NHWC data for an NCHW model asks for --input-shape."""
    args = ["scan", *torch_files["torchscript"], "--data", torch_files["nhwc_data"]]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 2 and stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the model failed on a sample batch")
    assert "expected input[8, 8, 8, 1] to have 1 channels" in lines[0]
    assert "--input-shape" in lines[0]
    code, _, err = run_cli(capsys, *args, "--input-shape", "1,8,8")
    assert code == 1, err  # with the shape given, the same data scans (converted to NCHW)


def _marked(stdout: str) -> list[tuple[str, str, str]]:
    rows = [line for line in stdout.splitlines() if line.startswith("*")]
    return [tuple(line[1:].split()) for line in rows]


def test_layers_lists_modules_and_marks_the_default(
    torch_files: dict, keras_case: dict, capsys: pytest.CaptureFixture
) -> None:
    code, stdout, err = run_cli(capsys, "layers", *torch_files["state_dict"])
    assert code == 0, err
    names = [line[1:].split()[0] for line in stdout.splitlines()]
    assert names == [str(i) for i in range(9)]  # make_cnn's Sequential, in order
    assert _marked(stdout) == [("7", "ReLU", "64")]  # the ReLU whose output the head reads
    code, stdout, err = run_cli(capsys, "layers", keras_case["path"])
    assert code == 0, err
    assert _marked(stdout) == [("hidden", "Dense", "64")]


class _Payload:
    """Unpickling this creates a file: proof that a pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_pickled_whole_model_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    model = dm.make_cnn()
    model.payload = _Payload(marker)  # pickled with the module, runs when it is unpickled
    path = tmp_path / "model.pt"
    torch.save(model, path)
    data = tmp_path / "train.npz"
    np.savez(data, x=np.zeros((4, 1, 8, 8), np.float32), y=np.zeros(4, np.int64))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "backdoorscan.cli", "scan", str(path), *ARCH, "--data", str(data)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.pt holds pickled Python objects")
    assert "torch.save(model.state_dict(), path)" in lines[0]
    assert not marker.exists()
    # The control: a full unpickle of the same file does run the payload.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_in_memory_models_scan_from_python(poisoned_digits: dict, keras_case: dict) -> None:
    truth, y = poisoned_digits["poison"], poisoned_digits["y"]
    cases = [
        ("torch", poisoned_digits["torch_model"], poisoned_digits["x"]),
        ("keras", keras_case["model"], keras_case["x"]),
    ]
    for framework, model, x in cases:
        report = backdoorscan.scan(model, x, y)
        precision, recall = precision_recall(report.is_flagged(), truth)
        assert report.model["framework"] == framework
        assert report.poisoned_classes == [dm.TARGET], framework
        assert precision >= 0.9 and recall >= 0.9, (framework, precision, recall)
        assert report.exit_code == 1
