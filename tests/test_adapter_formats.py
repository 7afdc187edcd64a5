"""Which files the adapters take, and how they refuse the rest.

safetensors state dicts scan through the command line like ``.pt`` ones (no pickle involved);
an unknown extension is refused with the list of formats instead of being read as ONNX; a
missing framework gives its install hint, never an internal error; the ONNX adapter fulfils the
whole Adapter contract; and no adapter module imports another framework's module.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

import backdoorscan  # noqa: E402
from backdoorscan import adapters  # noqa: E402
from backdoorscan.adapters import Adapter, AdapterError, LayerInfo, Retrainable  # noqa: E402
from backdoorscan.adapters.onnx import OnnxAdapter  # noqa: E402

PACKAGE = Path(backdoorscan.__file__).parent
DEMO_MODEL = PACKAGE / "data" / "demo.onnx"
ARCH = ["--arch", "digits_models:make_cnn", "--input-shape", "1,8,8"]
FORMATS_NAMED = ["ONNX .onnx", ".safetensors with --arch", "torch.export .pt2", "Keras .keras"]


def run_cli(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    """Run ``backdoorscan ARGS`` in this process through main(); (exit code, stdout, stderr)."""
    from backdoorscan.cli import main

    handler = signal.getsignal(signal.SIGTERM)  # main() installs its own
    try:
        with pytest.raises(SystemExit) as done:
            main([str(a) for a in args])
    finally:
        signal.signal(signal.SIGTERM, handler)
    out, err = capsys.readouterr()
    return int(done.value.code or 0), out, err


# --------------------------------------------------------------------------------------------
# safetensors


def test_safetensors_state_dict_scans_through_the_cli(
    poisoned_digits: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    st = pytest.importorskip("safetensors.torch")
    import digits_models as dm

    monkeypatch.setenv("BACKDOORSCAN_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "weights.safetensors"
    state = {k: v.contiguous() for k, v in poisoned_digits["torch_model"].state_dict().items()}
    st.save_file(state, str(weights))
    assert not zipfile.is_zipfile(weights)  # no torch.save archive, so no pickle inside
    out = tmp_path / "report.json"
    code, _, err = run_cli(
        capsys, "scan", weights, *ARCH, "--data", poisoned_digits["data"], "--format", "json",
        "-o", out, "-q",
    )  # fmt: skip
    assert code == 1, err
    report = json.loads(out.read_text())
    assert report["model"]["framework"] == "torch"
    assert report["poisoned_classes"] == [dm.TARGET]
    flagged = np.zeros(len(poisoned_digits["poison"]), bool)
    flagged[report["flagged_indices"]] = True
    truth = poisoned_digits["poison"]
    assert (flagged & truth).sum() >= 0.9 * truth.sum()
    # The layers command reads the same file, the default marked as for a .pt state dict.
    code, stdout, err = run_cli(capsys, "layers", weights, *ARCH)
    assert code == 0, err
    assert [line.split()[1:3] for line in stdout.splitlines() if line.startswith("*")] == [
        ["7", "ReLU"]
    ]


def test_safetensors_save_reload_and_refusals(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    import digits_models as dm

    torch.manual_seed(0)
    model = dm.make_cnn().eval()
    x = np.random.default_rng(0).random((5, 1, 8, 8)).astype(np.float32)
    adapter = adapters.from_object(model, input_shape=(1, 8, 8))
    saved = adapter.save(tmp_path / "out" / "cnn.safetensors")
    assert not zipfile.is_zipfile(saved)
    reloaded = adapters.load(saved, arch="digits_models:make_cnn", input_shape=(1, 8, 8))
    np.testing.assert_allclose(reloaded.predict_logits(x), adapter.predict_logits(x), atol=1e-6)
    with pytest.raises(AdapterError, match=r"is a state dict.*--arch"):
        adapters.load(saved)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(np.random.default_rng(1).bytes(512))
    with pytest.raises(AdapterError, match="not a safetensors file"):
        adapters.load(garbage, arch="digits_models:make_cnn")


# --------------------------------------------------------------------------------------------
# Unknown extensions


@pytest.mark.parametrize("name", ["model.weights", "model.dat", "model"])
def test_unknown_extension_lists_the_formats(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(DEMO_MODEL.read_bytes())  # a valid ONNX model under a foreign name
    with pytest.raises(AdapterError) as refused:
        adapters.load(path)
    message = str(refused.value)
    assert message.startswith(f"{name} has ")
    assert all(fmt in message for fmt in FORMATS_NAMED), message
    with pytest.raises(AdapterError, match="model file not found"):
        adapters.load(tmp_path / "missing.weights")
    renamed = path.rename(tmp_path / "model.onnx")  # the same bytes as .onnx are read as ONNX
    assert adapters.load(renamed).framework == "onnx"


def test_unknown_extension_is_a_clean_cli_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "model.weights"
    path.write_bytes(DEMO_MODEL.read_bytes())
    code, stdout, err = run_cli(capsys, "layers", path)
    assert code == 2 and stdout == ""
    assert err.startswith("error: model.weights has the extension '.weights'"), err
    assert err.count("\n") == 1 and "internal error" not in err


# --------------------------------------------------------------------------------------------
# Missing frameworks


def test_missing_torch_gives_the_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(b"not read: torch is missing first")
    monkeypatch.setitem(sys.modules, "torch", None)  # what `import torch` sees when absent
    with pytest.raises(AdapterError, match=r'pip install "backdoorscan\[torch\]"'):
        adapters.load(path, arch="digits_models:make_cnn")
    for name in ("weights.safetensors", "model.pt2", "model.ts"):
        other = tmp_path / name
        other.write_bytes(b"x")
        with pytest.raises(AdapterError, match=r"PyTorch models need torch"):
            adapters.load(other)
    # In this process (--trust-model), where torch is the missing module simulated above.
    code, stdout, err = run_cli(capsys, "layers", path, *ARCH, "--trust-model")
    assert code == 2 and stdout == "", err
    assert err.startswith("error: PyTorch models need torch") and "internal error" not in err
    assert 'pip install "backdoorscan[torch]"' in err


def test_missing_safetensors_gives_the_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch")
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(AdapterError, match=r'safetensors files need safetensors.*"backdoorscan\['):
        adapters.load(path, arch="digits_models:make_cnn")


def test_missing_keras_gives_the_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.keras"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("config.json", "{}")
    monkeypatch.setitem(sys.modules, "keras", None)
    with pytest.raises(AdapterError, match=r'pip install "backdoorscan\[keras,torch\]"'):
        adapters.load(path)


# --------------------------------------------------------------------------------------------
# The contract


def test_onnx_adapter_fulfils_the_contract() -> None:
    adapter = adapters.load(DEMO_MODEL)
    assert isinstance(adapter, Adapter) and isinstance(adapter, OnnxAdapter)
    assert not isinstance(adapter, Retrainable)
    assert not adapter.can_fit and "cannot be retrained" in adapter.fit_reason
    with pytest.raises(AdapterError, match="cannot be retrained"):
        adapter.fit(np.zeros((1, 1)), np.zeros(1))
    rows = adapter.layers()
    assert all(isinstance(r, LayerInfo) for r in rows)
    assert sum(r.default for r in rows) == 1
    data = np.load(PACKAGE / "data" / "demo.npz")
    x = data["x"][:37]
    export = adapter.to_onnx()
    from backdoorscan.adapters._check import session

    (reference,) = session(export.model_bytes).run(["logits"], {export.input_name: x})
    for batch_size in (1, 8, 256):  # batching does not change the numbers
        logits = adapter.predict_logits(x, batch_size=batch_size)
        assert logits.dtype == np.float32 and logits.shape == reference.shape
        np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-6)
    assert adapter.predict_logits(x[:0]).shape[0] == 0


def _imports(path: Path) -> set[str]:
    """Every backdoorscan module a source file imports (at any depth in the file)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("backdoorscan")}


def test_adapters_import_no_other_framework_and_onnx_graph_nothing() -> None:
    root = PACKAGE / "adapters"
    frameworks = {
        "backdoorscan.adapters.torch": [*sorted((root / "torch").glob("*.py"))],
        "backdoorscan.adapters.keras": [root / "keras.py"],
        "backdoorscan.adapters.onnx": [root / "onnx.py"],
    }
    for own, files in frameworks.items():
        others = [name for name in frameworks if name != own]
        for path in files:
            bad = [n for n in _imports(path) if any(n.startswith(o) for o in others)]
            assert not bad, (path, bad)
    shared = [root / "base.py", root / "_util.py", root / "_check.py", root / "_cache.py"]
    for path in shared:
        bad = [n for n in _imports(path) if any(n.startswith(o) for o in frameworks)]
        assert not bad, (path, bad)
    assert _imports(PACKAGE / "onnx_graph.py") == set()
