"""The PyTorch adapter: exports that match PyTorch, refusal of unsafe files, training, caching."""

from __future__ import annotations

import json
import os
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parent))

import models_for_tests as models  # noqa: E402

from backdoorscan.adapters import Adapter, AdapterError, from_object  # noqa: E402
from backdoorscan.adapters import load as load_any  # noqa: E402
from backdoorscan.adapters import torch as ta  # noqa: E402
from backdoorscan.adapters._check import session  # noqa: E402
from backdoorscan.adapters.torch import _export as torch_export  # noqa: E402

IMG = (1, 12, 12)
# The tests write TorchScript files to load; torch deprecates writing them, not reading them.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path_factory.mktemp("onnx-cache")
    monkeypatch.setenv("BACKDOORSCAN_CACHE_DIR", str(d))
    return d


def _images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *IMG)).astype(np.float32)


def _run(export, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sess = session(export.model_bytes)
    assert [o.name for o in sess.get_outputs()] == ["logits", "features"]
    logits, feats = sess.run(["logits", "features"], {export.input_name: x})
    return logits, feats


def _eager(model, x: np.ndarray, features) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's own logits and features, computed here independently of the adapter."""
    model.eval()
    with torch.no_grad():
        t = torch.from_numpy(x)
        return model(t).numpy(), features(model, t).flatten(1).numpy()


def _cnn_penultimate(m, t):
    return m.fc1(m.pool(m.conv(t).relu()).flatten(1)).relu()


def _assert_matches(export, model, features, n: int = 5) -> None:
    """ONNX Runtime at a batch size other than the traced 8 gives PyTorch's numbers."""
    x = _images(n) if export.input_shape == IMG else _flat(n)
    logits, feats = _run(export, x)
    ref_logits, ref_feats = _eager(model, x, features)
    assert logits.shape == ref_logits.shape and feats.shape == ref_feats.shape
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4)
    np.testing.assert_allclose(feats, ref_feats, atol=1e-4)
    assert export.feature_dim == ref_feats.shape[1]
    assert export.num_classes == ref_logits.shape[1]
    assert any("numerical check" in note for note in export.notes)


def _flat(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 64)).astype(np.float32)


def _save_state(model, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


# -- exports -------------------------------------------------------------------------------


def test_state_dict_cnn_exports_penultimate_features(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.cnn()
    path = _save_state(model, tmp_path / "cnn.pt")
    adapter = load_any(path, arch="models_for_tests:cnn", input_shape=IMG)
    assert isinstance(adapter, Adapter)
    assert adapter.framework == "torch" and adapter.can_fit
    export = adapter.to_onnx()
    assert export.layer == "input of fc2"
    assert export.input_shape == IMG and export.input_dtype == "float32"
    graph = onnx.load_from_string(export.model_bytes).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    _assert_matches(export, model, _cnn_penultimate)


def test_state_dict_mlp_with_arch_kwargs_infers_input_shape(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.mlp(hidden=20)
    path = _save_state(model, tmp_path / "mlp.pth")
    adapter = ta.load(path, arch="models_for_tests:mlp", arch_kwargs={"hidden": 20})
    assert adapter.input_shape == (64,)  # read off the first nn.Linear
    export = adapter.to_onnx()
    assert export.layer == "input of 4" and export.feature_dim == 20
    _assert_matches(export, model, lambda m, t: m[3](m[2](m[1](m[0](t)))))


def test_named_layer_in_residual_network(tmp_path: Path) -> None:
    model = models.resnet()
    path = _save_state(model, tmp_path / "resnet.pt")
    adapter = ta.load(path, arch="models_for_tests:resnet", input_shape=IMG)
    default = adapter.to_onnx()
    assert default.layer == "input of fc" and default.feature_dim == 6  # after global pooling
    _assert_matches(default, model, lambda m, t: m.pool(m.layer1(m.stem(t).relu())))
    block = adapter.to_onnx(layer="layer1.1")
    assert block.layer == "layer1.1" and block.feature_dim == 6 * 12 * 12
    _assert_matches(block, model, lambda m, t: m.layer1(m.stem(t).relu()))
    shapes = {row.name: row.shape for row in adapter.layers()}
    assert shapes["layer1.1"] == (6, 12, 12) and shapes["fc"] == (10,)


def test_named_layer_in_cnn_and_unknown_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.cnn()
    adapter = ta.from_module(model, input_shape=IMG)
    export = adapter.to_onnx(layer="pool")
    assert export.feature_dim == 4 * 5 * 5
    _assert_matches(export, model, lambda m, t: m.pool(m.conv(t).relu()))
    with pytest.raises(AdapterError, match=r"no module at path 'fc9'.*fc1 \(Linear\)"):
        adapter.to_onnx(layer="fc9")


def test_torchscript_archive(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.cnn().eval()
    path = tmp_path / "cnn.ts"
    torch.jit.script(model).save(str(path))
    adapter = load_any(path, input_shape=IMG)
    assert adapter.kind == "script" and adapter.can_fit
    export = adapter.to_onnx()
    assert export.layer == "input of fc2"
    _assert_matches(export, model, _cnn_penultimate)
    pooled = adapter.to_onnx(layer="pool")  # module scopes survive in the TorchScript export
    _assert_matches(pooled, model, lambda m, t: m.pool(m.conv(t).relu()))


def test_torchscript_without_input_shape_says_what_to_pass(tmp_path: Path) -> None:
    path = tmp_path / "cnn.ts"
    torch.jit.script(models.cnn().eval()).save(str(path))
    with pytest.raises(AdapterError, match="--input-shape"):
        ta.load(path).to_onnx()


@pytest.mark.parametrize("dynamic", [True, False])
def test_torch_export_archive(tmp_path: Path, dynamic: bool) -> None:
    torch.manual_seed(0)
    model = models.cnn().eval()
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    program = torch.export.export(model, (torch.rand(4, *IMG),), dynamic_shapes=shapes)
    path = tmp_path / "cnn.pt2"
    torch.export.save(program, str(path))
    adapter = load_any(path)
    assert adapter.kind == "program" and adapter.input_shape == IMG  # read from the archive
    assert not adapter.can_fit
    with pytest.raises(AdapterError, match="inference graph"):
        adapter.fit(_images(4), np.zeros(4, np.int64))
    export = adapter.to_onnx()
    assert export.layer == "input of fc2"
    # Even the archive traced at a fixed batch of 4 runs at 5: its graph is batch-agnostic.
    _assert_matches(export, model, _cnn_penultimate)
    # fc2 reads fc1's output through a functional relu: the default gets a row of its own.
    rows = adapter.layers()
    assert [row.name for row in rows] == ["conv", "pool", "fc1", "input of fc2", "fc2"]
    assert [row.name for row in rows if row.default] == ["input of fc2"]
    np.testing.assert_allclose(
        adapter.predict_logits(_images(7)), _eager(model, _images(7), _cnn_penultimate)[0],
        atol=1e-5,
    )  # fmt: skip


def test_integer_token_inputs() -> None:
    torch.manual_seed(0)
    model = models.TextNet().eval()
    export = ta.from_module(model, input_shape=(12,), input_dtype="int64").to_onnx()
    assert export.input_dtype == "int64" and export.layer == "input of out"
    ids = np.random.default_rng(2).integers(0, 50, size=(5, 12))  # the full vocabulary
    logits, feats = _run(export, ids)
    with torch.no_grad():
        t = torch.from_numpy(ids)
        np.testing.assert_allclose(logits, model(t).numpy(), atol=1e-5)
        hidden = model.fc1(model.emb(t).mean(1)).relu()
        np.testing.assert_allclose(feats, hidden.numpy(), atol=1e-5)


# -- models that cannot be scanned as they are ---------------------------------------------


def test_refuses_model_with_two_inputs() -> None:
    with pytest.raises(AdapterError, match=r"2 inputs \(x, mask\).*single input"):
        ta.from_module(models.TwoInputs(), input_shape=(8,)).to_onnx()


def test_refuses_model_without_linear_head_and_lists_layers() -> None:
    with pytest.raises(AdapterError, match=r"no nn\.Linear.*--layer.*3 \(AdaptiveAvgPool2d\)"):
        ta.from_module(models.no_head(), input_shape=IMG).to_onnx()
    # Naming a layer makes the same model scannable.
    export = ta.from_module(models.no_head(), input_shape=IMG).to_onnx(layer="1")
    assert export.feature_dim == 6 * 10 * 10 and export.num_classes == 10


def test_refuses_tuple_output() -> None:
    with pytest.raises(AdapterError, match="returns a tuple of 2"):
        ta.from_module(models.TupleOut(), input_shape=(64,)).to_onnx()


def test_refuses_graph_with_hard_coded_batch() -> None:
    with pytest.raises(AdapterError, match="batch size 3 after tracing with 8"):
        ta.from_module(models.FixedBatch(), input_shape=(64,)).to_onnx()


def test_checkpoint_layouts_load_by_content(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.mlp().eval()
    x = _flat(6)
    expected = _eager(model, x, lambda m, t: t)[0]
    nested = tmp_path / "run.ckpt"  # a training checkpoint: weights under "state_dict"
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, nested)
    prefixed = tmp_path / "dp.bin"  # saved from DataParallel: every key starts with "module."
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, prefixed)
    script = tmp_path / "scripted.pt"  # TorchScript under a state-dict suffix
    torch.jit.script(model).save(str(script))
    for path in (nested, prefixed, script):
        adapter = load_any(path, arch="models_for_tests:mlp", input_shape=(64,))
        np.testing.assert_allclose(adapter.predict_logits(x), expected, atol=1e-6)
    assert load_any(script, input_shape=(64,)).kind == "script"


def test_state_dict_without_arch_asks_for_arch(tmp_path: Path) -> None:
    path = _save_state(models.cnn(), tmp_path / "weights.pt")
    with pytest.raises(AdapterError, match=r"--arch module:callable.*--input-shape"):
        ta.load(path)


def test_state_dict_that_does_not_fit_arch(tmp_path: Path) -> None:
    path = _save_state(models.mlp(), tmp_path / "weights.pt")
    with pytest.raises(AdapterError, match="do not fit --arch models_for_tests:cnn"):
        ta.load(path, arch="models_for_tests:cnn", input_shape=IMG)


# -- untrusted files -----------------------------------------------------------------------


def test_refuses_whole_pickled_model(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(models.cnn(), path)
    with pytest.raises(AdapterError, match=r"torch\.save\(model\.state_dict\(\), path\)"):
        ta.load(path, arch="models_for_tests:cnn", input_shape=IMG)


class _Payload:
    """Unpickling this creates a file: proof that a pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".pkl"])
@pytest.mark.parametrize("container", ["pickle", "torch.save"])
def test_malicious_pickle_is_refused_without_running(
    tmp_path: Path, suffix: str, container: str
) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"model{suffix}"
    if container == "pickle":
        path.write_bytes(pickle.dumps({"fc.weight": _Payload(marker)}))
    else:
        torch.save({"fc.weight": _Payload(marker)}, path)
    with pytest.raises(AdapterError, match="never loads"):
        load_any(path, arch="models_for_tests:cnn", input_shape=IMG)
    assert not marker.exists()


@pytest.fixture(scope="module")
def clean_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    program = torch.export.export(
        models.cnn().eval(),
        (torch.rand(4, *IMG),),
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    path = tmp_path_factory.mktemp("pt2") / "clean.pt2"
    torch.export.save(program, str(path))
    return path


def _tamper(src: Path, dst: Path, edit, extra: tuple[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            rel = info.filename.split("/", 1)[1]
            zout.writestr(info.filename, edit(rel, zin.read(info.filename)))
        if extra:
            zout.writestr(f"{root}/{extra[0]}", extra[1])
    return dst


def _expr_payload(marker: Path) -> bytes:
    return f"__import__('os').system('touch {marker}') or Symbol(".encode()


@pytest.mark.parametrize(
    "attack",
    ["sample_inputs", "shape_expression", "guard_code", "graph_target", "pickled_weight", "aoti"],
)
def test_malicious_torch_export_archive_is_refused(
    tmp_path: Path, clean_pt2: Path, attack: str
) -> None:
    marker = tmp_path / "pwned"
    extra = None

    def edit(rel: str, data: bytes) -> bytes:
        if attack == "sample_inputs" and rel.startswith("data/sample_inputs/"):
            return pickle.dumps(_Payload(marker))
        if rel.startswith("models/") and attack == "shape_expression":
            return data.replace(b"Symbol(", _expr_payload(marker), 1)
        if rel.startswith("models/") and attack == "guard_code":
            program = json.loads(data)
            program["guards_code"] = [f"__import__('os').system('touch {marker}')"]
            return json.dumps(program).encode()
        if rel.startswith("models/") and attack == "graph_target":
            return data.replace(b"torch.ops.aten.relu.default", b"torch.serialization.load", 1)
        if rel.endswith("weights_config.json") and attack == "pickled_weight":
            return data.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
        return data

    if attack == "aoti":
        extra = ("data/aotinductor/model/model.so", b"\x7fELF")
    path = _tamper(clean_pt2, tmp_path / "model.pt2", edit, extra)
    with pytest.raises(AdapterError, match=r"refusing model\.pt2"):
        ta.load(path)
    assert not marker.exists()
    # The untouched archive loads: the refusal is about the tampering.
    assert ta.load(clean_pt2).kind == "program"


def test_wrong_suffix_content(tmp_path: Path) -> None:
    path = _save_state(models.cnn(), tmp_path / "weights.pt2")
    with pytest.raises(AdapterError, match=r"not a torch\.export archive"):
        ta.load(path)


# -- training, saving, caching -------------------------------------------------------------


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def _accuracy(adapter, x: np.ndarray, y: np.ndarray) -> float:
    return float((adapter.predict_logits(x).argmax(1) == y).mean())


def test_fit_save_reload_and_fit_again(tmp_path: Path) -> None:
    x, y = _digits()
    torch.manual_seed(0)
    path = _save_state(models.mlp(), tmp_path / "mlp.pt")
    original = path.read_bytes()
    adapter = ta.load(path, arch="models_for_tests:mlp")
    untrained = _accuracy(adapter, x, y)
    adapter.fit(x, y, epochs=1, batch_size=32, seed=0)
    after_one = _accuracy(adapter, x, y)
    assert after_one > untrained
    saved = adapter.save(tmp_path / "out" / "mlp.pt")
    assert path.read_bytes() == original  # the input file is never modified
    assert sorted(p.name for p in saved.parent.iterdir()) == ["mlp.pt"]  # no temp files left
    state = torch.load(saved, weights_only=True)  # tensors only
    assert all(isinstance(v, torch.Tensor) for v in state.values())

    reloaded = ta.load(saved, arch="models_for_tests:mlp")
    assert _accuracy(reloaded, x, y) == pytest.approx(after_one)
    twin = reloaded.clone()
    twin.fit(x, y, epochs=1, batch_size=32, seed=1)
    assert _accuracy(twin, x, y) > after_one
    assert _accuracy(reloaded, x, y) == pytest.approx(after_one)  # the clone is independent


def test_fit_is_seeded_and_takes_optimizer_and_loss() -> None:
    x, y = _digits()
    x, y = x[:300], y[:300]
    calls = []

    def loss_fn(logits, target):
        calls.append(len(target))
        return torch.nn.functional.cross_entropy(logits, target)

    results = []
    for _ in range(2):
        torch.manual_seed(0)
        adapter = ta.from_module(models.mlp())
        adapter.fit(
            x, y, batch_size=100, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), loss_fn=loss_fn
        )
        results.append(adapter.predict_logits(x))
        assert not adapter.module.training
    np.testing.assert_array_equal(results[0], results[1])
    assert calls == [100, 100, 100] * 2
    with pytest.raises(AdapterError, match="unknown fit options: momentum"):
        adapter.fit(x, y, momentum=0.9)


def test_torchscript_fit_and_save(tmp_path: Path) -> None:
    x, y = _digits()
    torch.manual_seed(0)
    path = tmp_path / "mlp.ts"
    torch.jit.script(models.mlp()).save(str(path))
    adapter = ta.load(path, input_shape=(64,))
    before = _accuracy(adapter, x, y)
    adapter.fit(x, y, epochs=1, batch_size=32)
    after = _accuracy(adapter, x, y)
    assert after > before
    reloaded = ta.load(adapter.save(tmp_path / "fitted.ts"), input_shape=(64,))
    assert _accuracy(reloaded, x, y) == pytest.approx(after)


def test_export_cache_skips_second_export(
    tmp_path: Path, _cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = torch_export.export_onnx

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_export, "export_onnx", counting)
    torch.manual_seed(0)
    path = _save_state(models.cnn(), tmp_path / "cnn.pt")
    first = ta.load(path, arch="models_for_tests:cnn", input_shape=IMG).to_onnx()
    second = ta.load(path, arch="models_for_tests:cnn", input_shape=IMG).to_onnx()
    assert len(calls) == 1
    assert second.model_bytes == first.model_bytes and second.layer == first.layer
    assert second.feature_dim == first.feature_dim == 16
    assert any("export cache" in note for note in second.notes)
    assert len(list(_cache_dir.glob("*.onnx"))) == 1
    ta.load(path, arch="models_for_tests:cnn", input_shape=IMG).to_onnx(layer="fc1")
    assert len(calls) == 2  # another layer is another export
    # Weights changed by fit no longer match the file: no stale export from the cache.
    adapter = ta.load(path, arch="models_for_tests:cnn", input_shape=IMG)
    adapter.fit(_images(16), np.arange(16) % 10)
    adapter.to_onnx()
    assert len(calls) == 3
    # In-memory models are never cached.
    in_memory = models.mlp()
    from_object(in_memory).to_onnx()
    from_object(in_memory).to_onnx()
    assert len(calls) == 5
    assert os.listdir(_cache_dir) and all(n.endswith(".onnx") for n in os.listdir(_cache_dir))
