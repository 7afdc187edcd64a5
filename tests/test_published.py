"""Models and data as they are published (issue #16): a Hugging Face BERT folder with its
training CSV, a class-per-folder PNG set with a safetensors state dict and --arch, through the
command line as a reviewer runs it; the poison is known, so the flagged rows are scored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

TESTS = Path(__file__).resolve().parent


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The command line in a fresh interpreter; tests/ on its path for --arch digits_models."""
    cmd = [sys.executable, "-c", "from backdoorscan.cli import main; main()", *map(str, args)]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def built(maker: str, root: Path, **kw: object) -> dict:
    """``hf_models.<maker>(root, **kw)`` run in a fresh interpreter (one thread), so that
    training a transformers model leaves nothing behind in this test process (a repair test
    run after it in the same process retrained differently); arrays come back through an
    .npz, the rest through JSON."""
    code = (
        "import json, sys, numpy as np, torch\n"
        "torch.set_num_threads(1)\n"
        "import hf_models as hm\n"
        "root, kw = sys.argv[1], json.loads(sys.argv[2])\n"
        f"r = hm.{maker}(__import__('pathlib').Path(root), **kw)\n"
        "arrays = {k: v for k, v in r.items() if isinstance(v, np.ndarray)}\n"
        "np.savez(root + '/_case.npz', **arrays)\n"
        "def plain(v):\n"
        "    if isinstance(v, (int, float)):\n"
        "        return v\n"
        "    return [str(x) for x in v] if isinstance(v, list) else str(v)\n"
        "rest = {k: plain(v) for k, v in r.items() if k not in arrays}\n"
        "print(json.dumps(rest))\n"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(root), json.dumps(kw)],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    case: dict = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("model", "data"):
        case[key] = Path(case[key])
    with np.load(root / "_case.npz") as arrays:
        case.update({k: arrays[k] for k in arrays.files})
    return case


def f1(flagged: np.ndarray, truth: np.ndarray) -> float:
    tp = int((flagged & truth).sum())
    if tp == 0:
        return 0.0
    precision, recall = tp / flagged.sum(), tp / truth.sum()
    return float(2 * precision * recall / (precision + recall))


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> dict:
    # Seeds 0, 1 and 2 all give F1 1.000 with their clean twins clean, since a confirmed
    # token trigger takes every sentence carrying it (detect._carriers, exact): before, k-means
    # isolated only 3-37 of the 40 poisoned rows and the flags stopped there (F1 0.14-0.43 or
    # nothing flagged; seeds measured by hand). Training is deterministic (a fixed
    # vocabulary, seeded, one thread), so the test sees the same model every run.
    kw = {"epochs": 6, "lr": 1e-3, "seed": 2}
    return {
        "poisoned": built("make_text_folder", tmp_path_factory.mktemp("bert_poisoned"), **kw),
        "clean": built(
            "make_text_folder", tmp_path_factory.mktemp("bert_clean"), n_poison=0, **kw
        ),
    }


def _scan_json(model: Path, data: Path, out: Path, *extra: str) -> tuple[int, dict, str]:
    proc = run("scan", model, "--data", data, "--format", "json", "-o", out, "-q", *extra)
    report = json.loads(out.read_text()) if out.exists() else {}
    return proc.returncode, report, proc.stderr


def test_bert_folder_with_csv_finds_the_trigger_word(bert: dict, tmp_path: Path) -> None:
    case = bert["poisoned"]
    assert case["accuracy"] > 0.95
    code, report, err = _scan_json(case["model"], case["data"], tmp_path / "r.json")
    assert code == 1, err
    assert report["model"]["framework"] == "transformers"
    assert report["model"]["isolation"].startswith("worker process")
    assert report["model"]["layer"] == "input of model.classifier"  # the pooled [CLS] vector
    assert report["data"]["class_names"] == ["neg", "pos"]
    rows = [int(name.rsplit(" ", 1)[1]) for name in report["data"]["flagged_samples"]]
    assert rows == report["flagged_indices"]  # CSV rows in file order, header left out
    flagged = np.zeros(len(case["poison"]), bool)
    flagged[rows] = True
    assert f1(flagged, case["poison"]) >= 0.9
    assert report["poisoned_classes"] == [1]
    assert any("label2id" in n for n in report["notes"])


def test_bert_clean_twin_is_clean(bert: dict, tmp_path: Path) -> None:
    case = bert["clean"]
    code, report, err = _scan_json(case["model"], case["data"], tmp_path / "r.json")
    assert code == 0, err
    assert report["flagged_indices"] == []


def test_jsonl_and_parquet_read_as_the_csv(bert: dict, tmp_path: Path) -> None:
    """The same rows as JSON Lines and Parquet give the same tokens and labels."""
    import csv

    from backdoorscan.scanner.config import RunOptions
    from backdoorscan.scanner.published import load_published

    case = bert["poisoned"]
    with open(case["data"], newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    parquet = tmp_path / "train.parquet"
    table = pa.table({"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]})
    pq.write_table(table, parquet, row_group_size=100)
    base = load_published(case["data"], case["model"], RunOptions())
    for path in (jsonl, parquet):
        ds = load_published(path, case["model"], RunOptions())
        try:
            np.testing.assert_array_equal(ds.x, base.x)
            np.testing.assert_array_equal(ds.y, base.y)
            assert ds.names is not None and ds.names(3) == f"{path.name} row 3"
        finally:
            ds.close()
    base.close()


def _png_digits(root: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """Digits [N,1,8,8] in [0,1] as 8-bit greyscale PNGs, images/CLASS/NNNNN.png."""
    from PIL import Image

    folder = root / "images"
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        path = folder / str(int(label)) / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(img[0] * 255).astype(np.uint8), mode="L").save(path)
    return folder


def _safetensors(model: object, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("which", ["poisoned", "clean"])
def test_image_folder_with_arch_state_dict(
    which: str, poisoned_digits: dict, clean_digits: dict, tmp_path: Path
) -> None:
    """A PNG class-per-folder set (a 2x2 patch trigger on 7s labelled 1) and the CNN's weights
    as safetensors with --arch: the stamped images are flagged by path; the twin is clean."""
    case = poisoned_digits if which == "poisoned" else clean_digits
    images = _png_digits(tmp_path, case["x"], case["y"])
    weights = _safetensors(case["torch_model"], tmp_path / "cnn.safetensors")
    code, report, err = _scan_json(
        weights, images, tmp_path / "r.json", "--arch", "digits_models:make_cnn",
        "--input-shape", "1,8,8",
    )  # fmt: skip
    assert report["data"]["n_samples"] == len(case["y"])
    assert report["data"]["model_agreement"] > 0.95  # PNG rounding and /255 keep the inputs
    if which == "clean":
        assert code == 0, err
        assert report["data"]["flagged_samples"] == []
        return
    assert code == 1, err
    flagged = np.zeros(len(case["y"]), bool)
    for name in report["data"]["flagged_samples"]:
        flagged[int(Path(name).stem)] = True
    assert f1(flagged, case["poison"]) >= 0.9
    assert report["poisoned_classes"] == [1]


def test_vit_folder_exports_and_scans_in_the_worker(tmp_path: Path) -> None:
    """A tiny ViT folder with its preprocessor config scans a PNG folder: preprocessing from
    the folder, classes through its label2id, the head's input as features, in the worker."""
    case = built("make_image_folder", tmp_path, n_per_class=60, n_poison=0, epochs=10)
    code, report, err = _scan_json(case["model"], case["data"], tmp_path / "r.json")
    assert code in (0, 1), err
    assert report["model"]["framework"] == "transformers"
    assert report["model"]["isolation"].startswith("worker process")
    assert report["model"]["layer"] == "input of model.classifier"
    assert report["data"]["class_names"] == ["horizontal", "vertical"]
    assert report["data"]["model_agreement"] >= case["accuracy"] - 0.02
    assert any("resized to 16x16" in n for n in report["notes"])


# -- hostile and malformed inputs: one line, exit 2 ---------------------------------------


def _one_line_error(proc: subprocess.CompletedProcess[str], words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert words in lines[0], lines[0]


def test_pickled_weights_refused(bert: dict, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_bytes((bert["clean"]["model"] / "config.json").read_bytes())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((bert["clean"]["model"] / name).read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    _one_line_error(run("scan", folder, "--data", bert["clean"]["data"]), "pytorch_model.bin")


def test_remote_code_refused(bert: dict, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    cfg = json.loads((bert["clean"]["model"] / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForSequenceClassification": "evil.Model"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes(
        (bert["clean"]["model"] / "model.safetensors").read_bytes()
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((bert["clean"]["model"] / name).read_bytes())
    _one_line_error(run("scan", folder, "--data", bert["clean"]["data"]), "auto_map")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("sentence,label\nhello,pos\n", "no column 'text'"),
        ("text,label\nhello,maybe\n", "label2id does not name"),
        ('text,label\n"unterminated,pos\n', "CSV"),
    ],
)
def test_bad_tables_one_line(bert: dict, tmp_path: Path, content: str, words: str) -> None:
    data = tmp_path / "bad.csv"
    data.write_text(content)
    _one_line_error(run("scan", bert["clean"]["model"], "--data", data), words)


def test_hostile_images_one_line(poisoned_digits: dict, tmp_path: Path) -> None:
    """A file that is no image, and a PNG declaring a huge size, each refused in one line."""
    import struct
    import zlib

    weights = _safetensors(poisoned_digits["torch_model"], tmp_path / "cnn.safetensors")
    images = _png_digits(tmp_path, poisoned_digits["x"][:40], poisoned_digits["y"][:40])
    args = ("--arch", "digits_models:make_cnn", "--input-shape", "1,8,8")
    fake = images / "0" / "zz_fake.png"
    fake.write_bytes(b"not an image at all")
    _one_line_error(run("scan", weights, "--data", images, *args), "zz_fake.png")

    # A 100000 x 100000 PNG header: refused before a pixel is decoded.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    fake.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )  # fmt: skip
    _one_line_error(run("scan", weights, "--data", images, *args), "pixels")


def test_table_rows_in_pieces(tmp_path: Path) -> None:
    """read_columns reads rows i..j of each format: what a shard reader would ask for."""
    from backdoorscan.scanner.tables import label_indices, read_columns

    path = tmp_path / "t.csv"
    path.write_text('text,label\n"a, quoted\nfield",b\nx,a\ny,b\nz,a\n', encoding="utf-8")
    with open(path, "rb") as fh:
        texts, labels = read_columns(fh, path.name, ("text", "label"), start=1, stop=3)
        assert texts == ["x", "y"] and labels == ["a", "b"]
        texts, _ = read_columns(fh, path.name, ("text", "label"))
        assert texts[0] == "a, quoted\nfield" and len(texts) == 4
    y, names, note = label_indices(["b", "a", "b"], "t")
    assert y.tolist() == [1, 0, 1] and names == ["a", "b"] and "sorted order" in (note or "")
    y, names, note = label_indices(["1", "0", 2], "t")
    assert y.tolist() == [1, 0, 2] and names is None and note is None


def test_image_rows_read_ahead_and_paths_column(tmp_path: Path) -> None:
    """Batches read in order (served by the read-ahead) equal images read one by one; a
    table's image-path column reads the same images, and a path out of its folder is refused."""
    from PIL import Image

    from backdoorscan.scanner.config import RunOptions
    from backdoorscan.scanner.datafiles import DataError
    from backdoorscan.scanner.published import load_published

    rng = np.random.default_rng(0)
    rows = []
    for i in range(10):
        path = tmp_path / "imgs" / f"c{i % 2}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)
        rows.append(f"imgs/c{i % 2}/{i}.png,{i % 2}\n")
    opts = RunOptions(image_size=8)
    folder = load_published(tmp_path / "imgs", None, opts)
    try:
        assert folder.x.shape == (10, 3, 8, 8)
        whole = np.concatenate([folder.batch(s, min(s + 3, 10)) for s in range(0, 10, 3)])
        singles = np.stack([folder.x[i] for i in range(10)])
        np.testing.assert_array_equal(whole, singles)
        assert folder.names is not None and folder.names(0) == "c0/0.png"
        assert folder.normalisation["scale"] == pytest.approx(1 / 255)
    finally:
        folder.close()
    table = tmp_path / "images.csv"
    table.write_text("text,label\n" + "".join(rows))
    listed = load_published(table, None, opts)
    try:
        assert listed.names is not None
        assert listed.names(4) == "images.csv row 4 (imgs/c0/4.png)"
        in_folder = [folder.names(i) for i in range(10)].index("c0/4.png")
        np.testing.assert_array_equal(listed.x[4], singles[in_folder])
    finally:
        listed.close()
    (tmp_path / "outside.png").write_bytes((tmp_path / "imgs" / "c0" / "0.png").read_bytes())
    sub = tmp_path / "sub"
    sub.mkdir()
    escape = sub / "t.csv"
    escape.write_text("text,label\n../outside.png,0\n")
    with pytest.raises(DataError, match="outside the data folder"):
        load_published(escape, None, opts)


def test_exre_probe_on_token_ids(bert: dict) -> None:
    """Exclusionary reclassification (probe) on the tokenised CSV: the trigger-word cluster
    is judged poison, the flagged rows are the poisoned ones."""
    from backdoorscan.scanner.pipeline import scan

    case = bert["poisoned"]
    report = scan(str(case["model"]), data=str(case["data"]), exre="probe")
    flagged = report.is_flagged()
    assert f1(flagged, case["poison"]) >= 0.9
    poisoned = next(c for c in report.classes if c.label == 1)
    assert poisoned.exre is not None and poisoned.exre["probe"].verdict == "poison"
