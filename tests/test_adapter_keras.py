"""The Keras adapter (torch backend): exports that match Keras, safe loading, training, caching."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
# Keras' torch backend converts through np.array without the copy keyword (its issue, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy")
sys.path.insert(0, str(Path(__file__).parent))

import models_for_tests as models  # noqa: E402

from backdoorscan.adapters import Adapter, AdapterError, Retrainable, from_object  # noqa: E402
from backdoorscan.adapters import keras as ka  # noqa: E402
from backdoorscan.adapters import load as load_any  # noqa: E402
from backdoorscan.adapters._check import session  # noqa: E402


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path_factory.mktemp("onnx-cache")
    monkeypatch.setenv("BACKDOORSCAN_CACHE_DIR", str(d))
    return d


def _run(export, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sess = session(export.model_bytes)
    assert [o.name for o in sess.get_outputs()] == ["logits", "features"]
    return tuple(sess.run(["logits", "features"], {export.input_name: x}))


def _assert_matches(export, model, feature_layer: str, feature_is_input: bool) -> None:
    """ONNX Runtime at batch 5 (traced at 8) equals Keras, features computed here independently."""
    x = np.random.default_rng(1).random((5, *export.input_shape)).astype(np.float32)
    logits, feats = _run(export, x)
    layer = model.get_layer(feature_layer)
    tap = keras.Model(model.inputs, layer.input if feature_is_input else layer.output)
    ref_feats = np.asarray(tap.predict(x, verbose=0)).reshape(len(x), -1)
    ref_logits = np.asarray(model.predict(x, verbose=0))
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4)
    np.testing.assert_allclose(feats, ref_feats, atol=1e-4)
    assert export.feature_dim == ref_feats.shape[1]
    assert export.num_classes == ref_logits.shape[1]
    assert any("numerical check" in note for note in export.notes)


def test_sequential_model(tmp_path: Path) -> None:
    model = models.keras_sequential()
    path = tmp_path / "seq.keras"
    model.save(path)
    adapter = load_any(path)
    assert isinstance(adapter, Adapter)
    assert adapter.framework == "keras" and adapter.can_fit
    export = adapter.to_onnx()
    assert export.layer == "input of fc2" and export.input_shape == (8, 8, 1)
    _assert_matches(export, model, "fc2", feature_is_input=True)
    conv = adapter.to_onnx(layer="conv")  # a 4-D NHWC output, flattened per sample
    assert conv.feature_dim == 6 * 6 * 4
    _assert_matches(conv, model, "conv", feature_is_input=False)
    first = adapter.layers()[0]
    assert (first.name, first.op_type, first.shape) == ("conv", "Conv2D", (6, 6, 4))


def test_functional_model(tmp_path: Path) -> None:
    model = models.keras_functional(softmax=True)
    path = tmp_path / "fun.keras"
    model.save(path)
    adapter = ka.load(path)
    export = adapter.to_onnx()
    assert export.layer == "input of head" and export.feature_dim == 24
    _assert_matches(export, model, "head", feature_is_input=True)
    assert any("softmax" in note for note in export.notes)
    merged = adapter.to_onnx(layer="merge")
    _assert_matches(merged, model, "merge", feature_is_input=False)
    with pytest.raises(AdapterError, match=r"no layer named 'nope'.*merge \(Concatenate\)"):
        adapter.to_onnx(layer="nope")


def test_legacy_h5_loads(tmp_path: Path) -> None:
    model = models.keras_sequential(seed=3)
    path = tmp_path / "seq.h5"
    model.save(path)
    export = ka.load(path).to_onnx()
    _assert_matches(export, model, "fc2", feature_is_input=True)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_lambda_layer_is_refused_by_safe_mode(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "pwned"

    # A lambda (so Keras stores its bytecode) that leaves a file behind whenever it runs, which
    # it does as soon as Keras rebuilds the layer graph on load.
    payload = eval(f"lambda t: (open({str(marker)!r}, 'w').close(), t * 2)[1]")

    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Lambda(payload), keras.layers.Dense(2)]
    )
    path = tmp_path / f"lambda{suffix}"
    model.save(path)
    marker.unlink(missing_ok=True)
    with pytest.raises(AdapterError, match="safe mode"):
        ka.load(path)
    assert not marker.exists()


def test_files_that_are_not_keras(tmp_path: Path) -> None:
    import h5py

    weights_only = tmp_path / "arrays.h5"
    with h5py.File(weights_only, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(AdapterError, match="without a Keras model config"):
        ka.load(weights_only)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(AdapterError, match="not an HDF5 file"):
        load_any(junk)
    fake = tmp_path / "fake.keras"
    fake.write_bytes(b"PK but not really")
    with pytest.raises(AdapterError, match="not a Keras archive"):
        load_any(fake)


def test_models_that_cannot_be_scanned() -> None:
    a, b = keras.Input((4,)), keras.Input((4,))
    two = keras.Model([a, b], keras.layers.Dense(3)(keras.layers.Add()([a, b])))
    with pytest.raises(AdapterError, match="takes 2 inputs"):
        from_object(two).to_onnx()  # an nn.Module on the torch backend: still the Keras adapter
    inp = keras.Input((8, 8, 1))
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(keras.layers.Conv2D(10, 3)(inp))
    with pytest.raises(AdapterError, match=r"no Dense layer.*--layer.*gap"):
        from_object(keras.Model(inp, pooled)).to_onnx()
    x = keras.Input((6,))
    pair = keras.Model(x, [keras.layers.Dense(3)(x), keras.layers.Dense(2)(x)])
    with pytest.raises(AdapterError, match="2 outputs"):
        from_object(pair).to_onnx()


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def _accuracy(adapter, x: np.ndarray, y: np.ndarray) -> float:
    return float((adapter.predict_logits(x).argmax(1) == y).mean())


def test_fit_save_reload_and_fit_again(tmp_path: Path) -> None:
    x, y = _digits()
    x, y = x[:600], y[:600]
    # A softmax head: fit must read it off the last layer and use from_logits=False.
    model = models.keras_functional(softmax=True)
    assert not ka._outputs_logits(keras, model)
    assert ka._outputs_logits(keras, models.keras_functional(softmax=False))
    adapter = ka.from_model(model)
    untrained = _accuracy(adapter, x, y)
    adapter.fit(x, y, epochs=1, batch_size=32, seed=0)
    after_one = _accuracy(adapter, x, y)
    assert after_one > untrained
    saved = adapter.save(tmp_path / "out" / "fitted.keras")
    assert sorted(p.name for p in saved.parent.iterdir()) == ["fitted.keras"]  # no temp left
    reloaded = ka.load(saved)
    assert _accuracy(reloaded, x, y) == pytest.approx(after_one)
    twin = reloaded.clone()
    twin.fit(x, y, epochs=1, batch_size=32, seed=1)
    assert _accuracy(twin, x, y) > after_one
    assert _accuracy(reloaded, x, y) == pytest.approx(after_one)  # the clone is independent
    with pytest.raises(AdapterError, match=r"saved as \.keras"):
        adapter.save(tmp_path / "fitted.h5")


def test_reinitialize_draws_fresh_seeded_weights_that_train() -> None:
    x, y = _digits()
    x, y = x[:600], y[:600]
    adapter = ka.from_model(models.keras_functional(softmax=False))
    assert isinstance(adapter, Retrainable)
    adapter.fit(x, y, epochs=3, batch_size=32, seed=0)
    trained = [w.copy() for w in adapter.model.get_weights()]
    trained_accuracy = _accuracy(adapter, x, y)
    adapter.reinitialize(seed=3)
    fresh = adapter.model.get_weights()
    kernels = [i for i, w in enumerate(trained) if w.ndim == 2]
    assert all(not np.allclose(fresh[i], trained[i]) for i in kernels)
    reset_accuracy = _accuracy(adapter, x, y)
    assert reset_accuracy < trained_accuracy
    twin = ka.from_model(models.keras_functional(softmax=False))
    twin.reinitialize(seed=3)  # the same seed draws the same weights
    for a, b in zip(twin.model.get_weights(), fresh, strict=True):
        np.testing.assert_array_equal(a, b)
    adapter.fit(x, y, epochs=1, batch_size=32, seed=0)
    assert _accuracy(adapter, x, y) > reset_accuracy


def test_export_cache_skips_second_export(
    tmp_path: Path, _cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = ka.KerasAdapter._export

    def counting(self, layer):
        calls.append(layer)
        return real(self, layer)

    monkeypatch.setattr(ka.KerasAdapter, "_export", counting)
    path = tmp_path / "fun.keras"
    models.keras_functional().save(path)
    first = ka.load(path).to_onnx()
    second = ka.load(path).to_onnx()
    assert calls == [None]
    assert second.model_bytes == first.model_bytes and second.feature_dim == 24
    assert any("export cache" in note for note in second.notes)
    ka.load(path).to_onnx(layer="hidden")
    assert calls == [None, "hidden"]
    assert len(list(_cache_dir.glob("*.onnx"))) == 2
