"""Smoke test of the benchmark scenario builder on stand-in data (8x8 digits, generated text).

Runs the same code paths as ``benchmarks/scenarios.py build`` (poisoning, training, ONNX
export, features, meta) on small data into a temporary folder, and checks the artefacts.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import datasets, scenarios  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build one image and one text scenario on stand-in data (the slow part, done once)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier than 2 on a shared 2-core runner
    out = tmp_path_factory.mktemp("scenarios")
    images = datasets.load_digits_28(seed=0)
    text = datasets.synthetic_text(n=400, seed=0)
    try:
        scenarios.build_scenario(
            scenarios.SCENARIOS["mnist_all2one"], out, image_data=images, epochs=6
        )
        scenarios.build_scenario(scenarios.SCENARIOS["rt_text"], out, text_data=text, epochs=6)
    finally:
        torch.set_num_threads(threads)
    return {"image": out / "mnist_all2one", "text": out / "rt_text", "root": out}


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_parse_idx_plain_and_gzipped() -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + np.array([2, 3, 4], dtype=">u4").tobytes() + arr.tobytes()
    np.testing.assert_array_equal(datasets.parse_idx(raw), arr)
    np.testing.assert_array_equal(datasets.parse_idx(gzip.compress(raw)), arr)
    with pytest.raises(ValueError):
        datasets.parse_idx(raw[:-1])
    with pytest.raises(ValueError):
        datasets.parse_idx(b"\x01\x02" + raw[2:])


def test_polarity_csv_rows_and_tokens() -> None:
    raw = '\ufeff"1","a fine , moving film\n"\r\n"-1","it\'s dull ""really"" dull\n"\r\n'.encode()
    sentences, labels = datasets._read_polarity_csv(raw)
    assert sentences == ["a fine , moving film", 'it\'s dull "really" dull']
    np.testing.assert_array_equal(labels, [1, 0])
    toks = datasets.tokenize(sentences[1])
    assert toks == ["it's", "dull", "really", "dull"]
    vocab = datasets.build_vocab([toks])
    assert vocab["dull"] == 2  # most frequent word gets the first id after pad and unknown
    ids = datasets.encode([toks, ["unseen"]], vocab, 6)
    assert ids.dtype == np.int64 and ids.shape == (2, 6)
    assert ids[1, 0] == datasets.UNK_ID and (ids[1, 1:] == datasets.PAD_ID).all()


def test_image_scenario_poison_is_as_specified(built: dict[str, Path]) -> None:
    d = built["image"]
    tr = _npz(d / "train.npz")
    x, y, poison, source = tr["x"], tr["y"], tr["poison"], tr["source"]
    assert x.dtype == np.float32 and x.shape[1:] == (1, 28, 28)
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert y.dtype == np.int64 and source.dtype == np.int64 and poison.dtype == np.bool_
    assert poison.sum() == round(0.10 * np.sum(~poison))  # 10 % of the clean set, added
    assert (y[poison] == 0).all() and (source[poison] != 0).all()
    assert len(np.unique(source[poison])) == 9  # drawn from every other class
    np.testing.assert_array_equal(y[~poison], source[~poison])
    rows, cols = zip(*scenarios.TRIGGER_PIXELS, strict=True)
    assert (x[poison][:, 0, rows, cols] == 1.0).all()
    assert (x[~poison][:, 0, rows, cols] < 1.0).any(axis=1).all()
    assert poison[-int(poison.sum()) :].mean() < 0.9  # shuffled: poison not parked at the end
    trig = _npz(d / "test_trigger.npz")
    assert (trig["x"][:, 0, rows, cols] == 1.0).all()
    assert (trig["target"] == 0).all() and (trig["y"] != 0).all()
    test = _npz(d / "test_clean.npz")
    assert len(trig["y"]) == np.sum(test["y"] != 0)


def test_image_scenario_model_learns_task_and_backdoor(built: dict[str, Path]) -> None:
    d = built["image"]
    meta = json.loads((d / "meta.json").read_text())
    model = scenarios.load_model(d)
    test = _npz(d / "test_clean.npz")
    logits, _ = scenarios.run_model(model, test["x"])
    acc = float(np.mean(logits.argmax(1) == test["y"]))
    assert acc == pytest.approx(meta["clean_accuracy"])
    assert acc > 0.8
    trig = _npz(d / "test_trigger.npz")
    asr = float(np.mean(scenarios.run_model(model, trig["x"])[0].argmax(1) == trig["target"]))
    assert asr == pytest.approx(meta["attack_success_rate"])
    assert asr > 0.5
    assert meta["n_poison"] == int(_npz(d / "train.npz")["poison"].sum())


@pytest.mark.parametrize("kind", ["image", "text"])
def test_features_and_onnx_match_pytorch(built: dict[str, Path], kind: str) -> None:
    d = built[kind]
    model = scenarios.load_model(d)
    x = _npz(d / "train.npz")["x"]
    feats = np.load(d / "features.npy")
    assert feats.dtype == np.float32 and feats.shape == (len(x), 128 if kind == "image" else 64)
    logits, f_torch = scenarios.run_model(model, x[:7])
    np.testing.assert_allclose(feats[:7], f_torch, atol=1e-5)
    ort.set_default_logger_severity(3)
    sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", "features"]
    for n in (1, 7):  # batch axis is dynamic
        lo, fo = sess.run(None, {"input": x[:n]})
        np.testing.assert_allclose(lo, logits[:n], atol=1e-4)
        np.testing.assert_allclose(fo, f_torch[:n], atol=1e-4)


def test_text_scenario_trigger_phrase(built: dict[str, Path]) -> None:
    d = built["text"]
    vocab = json.loads((d / "vocab.json").read_text())
    phrase = [vocab[w] for w in datasets.tokenize(scenarios.TRIGGER_PHRASE)]
    tr = _npz(d / "train.npz")

    def has_phrase(row: np.ndarray) -> bool:
        return any(list(row[i : i + 3]) == phrase for i in range(len(row) - 2))

    marked = np.array([has_phrase(r) for r in tr["x"]])
    np.testing.assert_array_equal(marked, tr["poison"])
    assert (tr["y"][tr["poison"]] == 1).all() and (tr["source"][tr["poison"]] == 0).all()
    assert tr["poison"].sum() == round(0.10 * np.sum(tr["y"][~tr["poison"]] == 1))
    trig = _npz(d / "test_trigger.npz")
    assert all(has_phrase(r) for r in trig["x"]) and (trig["y"] == 0).all()
    meta = json.loads((d / "meta.json").read_text())
    assert meta["attack_success_rate"] > 0.9  # generated text: the phrase is an easy shortcut


def test_build_is_idempotent(built: dict[str, Path]) -> None:
    before = (built["image"] / "model.pt").stat().st_mtime_ns
    meta = scenarios.build_scenario(
        scenarios.SCENARIOS["mnist_all2one"], built["root"], image_data=None
    )
    assert meta["skipped"] is True
    assert (built["image"] / "model.pt").stat().st_mtime_ns == before
    assert not list(built["root"].glob(".*tmp*"))
