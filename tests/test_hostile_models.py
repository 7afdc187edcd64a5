"""Hostile and broken model files: each is refused with exit code 2 and a message naming the
problem, and no payload ever runs. The files are generated here (tests/hostile.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import hostile
import numpy as np
import pytest

Builder = Callable[[Path], Path]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 random samples of 64 values, 30 per class: what the hostile MLPs take."""
    x, y = hostile.digits()
    path = tmp_path_factory.mktemp("data") / "train.npz"
    np.savez(path, x=x, y=y)
    return path


def _ext_missing(folder: Path) -> Path:
    return hostile.external_data(folder / "model.onnx", "weights.bin")


def _ext_short(folder: Path) -> Path:
    (folder / "weights.bin").write_bytes(b"\0" * 100)
    return hostile.external_data(folder / "model.onnx", "weights.bin")


def _custom_in_branch(folder: Path) -> Path:
    """The If model with a custom-domain operator hidden inside one branch."""
    import onnx

    path = hostile.if_head(folder / "model.onnx")
    model = onnx.load(str(path))
    branch = model.graph.node[-1].attribute[0].g
    branch.node[0].domain = "com.attacker.ops"
    return hostile.save(model, path)


# (builder of the file in a fresh folder, extra options, expected exit code, expected phrases)
MODEL_CASES: dict[str, tuple[Builder, list[str], int, list[str]]] = {
    "truncated": (lambda f: hostile.truncated(f / "m.onnx"), [], 2, ["not a readable ONNX model"]),
    "random bytes": (lambda f: hostile.random_bytes(f / "m.onnx"), [], 2, ["not a readable ONNX"]),
    "random bytes, unknown suffix": (
        lambda f: hostile.random_bytes(f / "model.weights"),
        [],
        2,
        ["model.weights has the extension '.weights'", "supported: ONNX .onnx", ".safetensors"],
    ),
    "empty file": (lambda f: _touch(f / "m.onnx"), [], 2, ["model file is empty"]),
    "custom op domain": (
        lambda f: hostile.custom_domain(f / "m.onnx"),
        [],
        2,
        ["custom operator domain", "com.attacker.ops", "does not load custom-op libraries"],
    ),
    "custom op inside an If branch": (
        _custom_in_branch,
        ["--layer", "hidden"],
        2,
        ["custom operator domain", "com.attacker.ops"],
    ),
    "external data ../../etc/passwd": (
        lambda f: hostile.external_data(f / "m.onnx", "../../etc/passwd"),
        [],
        2,
        ["refusing external data", "points outside the model's folder"],
    ),
    "external data, absolute path": (
        lambda f: hostile.external_data(f / "m.onnx", "/etc/passwd"),
        [],
        2,
        ["refusing external data", "not a relative path inside the model's folder"],
    ),
    "external data through a symlink leading out": (
        lambda f: hostile.symlinked_external_data(f, Path("/etc/passwd")),
        [],
        2,
        ["refusing external data", "points outside the model's folder"],
    ),
    "external data file missing": (_ext_missing, [], 2, ["external data file", "is missing"]),
    "external data file too short": (
        _ext_short,
        [],
        2,
        ["cannot read the external data", "exceeds available data"],
    ),
    "If around the head": (
        lambda f: hostile.if_head(f / "m.onnx"),
        [],
        2,
        ["no linear head found", "walked back through If", "--layer"],
    ),
    "Loop around the head": (
        lambda f: hostile.loop_head(f / "m.onnx"),
        [],
        2,
        ["no linear head found", "walked back through Loop", "--layer"],
    ),
    "no linear head": (
        lambda f: hostile.no_linear_head(f / "m.onnx"),
        [],
        2,
        ["no linear head found", "ReduceMax"],
    ),
    "layer that does not exist": (
        lambda f: hostile.save(hostile.mlp(), f / "m.onnx"),
        ["--layer", "nope"],
        2,
        ["no tensor named 'nope'", "hidden"],
    ),
    "two inputs": (
        lambda f: hostile.two_inputs(f / "m.onnx"),
        [],
        2,
        ["2 data inputs", "input, mask", "exactly one input"],
    ),
    "huge declared activation, --max-memory 1G": (
        lambda f: hostile.huge_activation(f / "m.onnx", repeats=1 << 20),
        ["--max-memory", "1G"],
        2,
        ["the scan would need about", "over the memory limit of 1.0 GiB (--max-memory)"],
    ),
    "huge declared activation, no --max-memory": (
        lambda f: hostile.huge_activation(f / "m.onnx", repeats=1 << 20),
        [],
        2,
        ["the scan would need about", "GiB", "this machine's memory"],
    ),
    "model that makes NaN": (
        lambda f: hostile.nan_features(f / "m.onnx"),
        [],
        2,
        ["the model produced NaN or Inf activations"],
    ),
    "text model fed floats": (
        lambda f: hostile.token_model(f / "m.onnx", length=hostile.D_IN),
        [],
        2,
        ["model takes integer inputs (token ids)", "float32"],
    ),
}


def _touch(path: Path) -> Path:
    path.touch()
    return path


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_hostile_model_is_refused(case: str, tmp_path: Path, data: Path) -> None:
    build, extra, want_code, phrases = MODEL_CASES[case]
    model = build(tmp_path)
    code, out, err = hostile.run_cli("scan", model, "--data", data, "-q", *extra)
    assert code == want_code, (code, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    for phrase in phrases:
        assert phrase in err, (phrase, err)
    assert out == ""


@pytest.mark.parametrize("builder", [hostile.if_head, hostile.loop_head], ids=["If", "Loop"])
def test_head_inside_control_flow_scans_with_layer(
    builder: Builder, tmp_path: Path, data: Path
) -> None:
    """Refused by default (no head to find), the model scans once the layer is named.

    The model's weights are random (it fits about a tenth of the labels): --min-agreement 0
    lets the scan judge it anyway, as this test is about reaching the layer."""
    model = builder(tmp_path / "m.onnx")
    report = tmp_path / "r.json"
    code, _, err = hostile.run_cli(
        "scan", model, "--data", data, "--layer", "hidden", "--format", "json", "-o", report,
        "-q", "--min-agreement", "0",
    )  # fmt: skip
    assert code in (0, 1), err
    doc = json.loads(report.read_text())
    assert doc["model"]["layer"] == "hidden"
    assert doc["model"]["feature_dim"] == hostile.HIDDEN
    assert doc["data"]["n_samples"] == 300


def test_dead_hidden_layer_is_nothing_scanned(tmp_path: Path, data: Path) -> None:
    """Every sample has the same (all-zero) features: no class can be split, so nothing is
    scanned (exit 3) and each class says why; no crash on an empty candidate list."""
    model = hostile.dead_layer(tmp_path / "m.onnx")
    code, out, err = hostile.run_cli("scan", model, "--data", data, "--format", "json")
    assert code == 3, err
    doc = json.loads(out)
    assert doc["verdict"] == "nothing scanned"
    assert all("identical activations" in c["reason"] for c in doc["classes"])


def test_token_ids_outside_the_vocabulary(tmp_path: Path) -> None:
    """Ids past the embedding table make the runtime fail: one line, exit 2, samples named."""
    model = hostile.token_model(tmp_path / "m.onnx", vocab=50)
    rng = np.random.default_rng(0)
    x = rng.integers(1, 50, size=(200, 8), dtype=np.int64)
    x[150, 3] = 10_000
    np.savez(tmp_path / "d.npz", x=x, y=np.repeat(np.arange(10), 20))
    code, _, err = hostile.run_cli("scan", model, "--data", tmp_path / "d.npz", "-q")
    assert code == 2
    assert "the model failed on samples 0.." in err and "Gather" in err, err
    assert err.count("\n") == 1, err


# -- pickle payloads and other frameworks' files ------------------------------------------------

PICKLE_SUFFIXES = [".pt", ".pth", ".bin", ".pkl"]


@pytest.mark.parametrize("suffix", PICKLE_SUFFIXES)
@pytest.mark.parametrize("kind", ["plain pickle", "torch zip"])
@pytest.mark.parametrize("arch", [False, True], ids=["no-arch", "arch"])
def test_pickle_payload_never_runs(
    suffix: str, kind: str, arch: bool, tmp_path: Path, data: Path
) -> None:
    marker = tmp_path / "PWNED"
    make = hostile.pickle_payload if kind == "plain pickle" else hostile.torch_zip_payload
    model = make(tmp_path / f"weights{suffix}", marker)
    extra = ["--arch", "models_for_tests:mlp", "--input-shape", "64"] if arch else []
    code, _, err = hostile.run_cli("scan", model, "--data", data, "-q", *extra)
    assert not marker.exists(), "the payload ran"
    assert code == 2, err
    assert f"weights{suffix} holds pickled Python objects" in err, err
    assert "never loads" in err


@pytest.mark.parametrize("suffix", [".pt", ".ts"])
def test_torchscript_shaped_payload_never_runs(suffix: str, tmp_path: Path, data: Path) -> None:
    marker = tmp_path / "PWNED"
    model = hostile.torchscript_payload(tmp_path / f"script{suffix}", marker)
    code, _, err = hostile.run_cli("scan", model, "--data", data, "-q")
    assert not marker.exists(), "the payload ran"
    assert code == 2
    assert "is not a TorchScript archive torch can load" in err, err
    assert "exec" in err  # torch names the global it refused


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Keras' torch backend, on save
def test_keras_lambda_refused_by_safe_mode(tmp_path: Path, data: Path) -> None:
    marker = tmp_path / "PWNED"
    model = hostile.keras_lambda(tmp_path / "lambda.keras", marker)
    code, _, err = hostile.run_cli("scan", model, "--data", data, "-q")
    assert not marker.exists(), "the Lambda's bytecode ran"
    assert code == 2
    assert "refusing lambda.keras" in err and "safe mode" in err and "Lambda" in err, err


@pytest.mark.parametrize(
    ("name", "build", "phrase"),
    [
        ("not-keras.h5", hostile.h5_not_keras, "HDF5 file without a Keras model config"),
        ("random.h5", hostile.random_bytes, "is not an HDF5 file"),
        ("random.keras", hostile.random_bytes, "is not a Keras archive"),
        ("random.pt2", hostile.random_bytes, "is not a torch.export archive"),
        ("random.ts", hostile.random_bytes, "is not a TorchScript archive"),
        ("random.pt", hostile.random_bytes, "random.pt"),
    ],
)
def test_other_frameworks_broken_files(
    name: str, build: Builder, phrase: str, tmp_path: Path, data: Path
) -> None:
    code, _, err = hostile.run_cli("scan", build(tmp_path / name), "--data", data, "-q")
    assert code == 2
    assert phrase in err, err
    assert err.startswith("error: ")
