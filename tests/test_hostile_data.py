"""Hostile and broken data files: each gives its exact exit code and a message naming the
problem; pickles never run; a data set larger than the memory limit streams from disk."""

from __future__ import annotations

import json
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import hostile
import numpy as np
import pytest

from backdoorscan.scanner import DetectConfig, scan
from backdoorscan.scanner.budget import MemoryBudgetError, estimate, parse_size
from backdoorscan.scanner.data import load_data

X, Y = hostile.digits()  # 300 samples x 64, 30 per class


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hostile.save(hostile.mlp(), tmp_path_factory.mktemp("model") / "mlp.onnx")


def _npz(**arrays: np.ndarray) -> Callable[[Path], list[object]]:
    def write(folder: Path) -> list[object]:
        np.savez(folder / "d.npz", **arrays)
        return ["--data", folder / "d.npz"]

    return write


def _with_value(value: float, flat_index: int) -> np.ndarray:
    x = X.copy()
    x.reshape(-1)[flat_index] = value
    return x


def _pair(x: object, y: object, x_name: str = "x.npy") -> Callable[[Path], list[object]]:
    def write(folder: Path) -> list[object]:
        np.save(folder / x_name, x)
        np.save(folder / "y.npy", y)
        return ["--data", folder / x_name, "--labels", folder / "y.npy"]

    return write


def _raw(name: str, payload: bytes, *extra: str) -> Callable[[Path], list[object]]:
    def write(folder: Path) -> list[object]:
        (folder / name).write_bytes(payload)
        return ["--data", folder / name, *extra]

    return write


def _truncated_npy(folder: Path) -> list[object]:
    np.save(folder / "x.npy", X)
    np.save(folder / "y.npy", Y)
    blob = (folder / "x.npy").read_bytes()
    (folder / "x.npy").write_bytes(blob[: len(blob) // 2])
    return ["--data", folder / "x.npy", "--labels", folder / "y.npy"]


def _lying_npz_header(folder: Path) -> list[object]:
    """An uncompressed .npz whose x member declares 10x more rows than it holds."""
    np.savez(folder / "d.npz", x=X, y=Y)
    blob = bytearray((folder / "d.npz").read_bytes())
    at = blob.index(b"'shape': (300, 64)")
    blob[at : at + 18] = b"'shape': (3000,64)"
    (folder / "d.npz").write_bytes(bytes(blob))
    return ["--data", folder / "d.npz"]


def _compressed(folder: Path) -> list[object]:
    np.savez_compressed(folder / "d.npz", x=X, y=Y)
    return ["--data", folder / "d.npz", "--max-memory", "50K"]


few = np.concatenate([np.repeat(np.arange(9), 30), np.full(5, 9)])

# (writer of the files into a fresh folder -> CLI options, exit code, phrases in stderr)
DATA_CASES: dict[str, tuple[Callable[[Path], list[object]], int, list[str]]] = {
    "missing y": (_npz(x=X), 2, ["d.npz has no array 'y'", "(it has: x)"]),
    "missing x": (_npz(images=X, y=Y), 2, ["has no array 'x'", "images, y"]),
    "NaN": (_npz(x=_with_value(np.nan, 64 * 7 + 3), y=Y), 2, ["sample 7 holds NaN or Inf"]),
    "Inf": (_npz(x=_with_value(np.inf, 64 * 250), y=Y), 2, ["sample 250 holds NaN or Inf"]),
    "NaN in a memory-mapped .npy": (
        _pair(_with_value(-np.inf, 64 * 299 + 63), Y),
        2,
        ["sample 299 holds NaN or Inf"],
    ),
    "label out of range": (
        _npz(x=X, y=np.where(np.arange(300) == 5, 10, Y)),
        2,
        ["labels go up to 10 but the model has 10 classes"],
    ),
    "negative label": (
        _npz(x=X, y=np.where(np.arange(300) == 5, -3, Y)),
        2,
        ["labels must be >= 0; found -3"],
    ),
    "float labels": (
        _npz(x=X, y=Y.astype(np.float64)),
        2,
        ["labels have float dtype float64; integer class indices are required"],
    ),
    "bool labels": (_npz(x=X, y=Y > 4), 2, ["labels have dtype bool"]),
    "one-hot labels": (
        _npz(x=X, y=np.eye(10, dtype=np.int64)[Y]),
        2,
        ["labels look one-hot encoded"],
    ),
    "2-D labels": (_npz(x=X, y=Y.reshape(30, 10)), 2, ["labels must be a 1-D array"]),
    "x and y of different lengths": (_npz(x=X, y=Y[:-1]), 2, ["300 samples but 299 labels"]),
    "x and y .npy of different lengths": (_pair(X[:200], Y), 2, ["200 samples but 300 labels"]),
    "wrong sample shape": (
        _npz(x=X[:, :60], y=Y),
        2,
        ["samples have shape (60,) but the model takes (64,)"],
    ),
    "complex samples": (_npz(x=X.astype(np.complex64), y=Y), 2, ["dtype complex64"]),
    "string samples": (_npz(x=X.astype(str), y=Y), 2, ["numbers are required"]),
    "zero samples": (_npz(x=X[:0], y=Y[:0]), 2, ["the data set holds no samples"]),
    "a single number as samples": (_npz(x=np.float32(1), y=Y), 2, ["one row per sample"]),
    "every class smaller than clustering needs": (
        _npz(x=X[:50], y=np.repeat(np.arange(10), 5)),
        3,
        [],
    ),
    "empty file": (_raw("d.npz", b""), 2, ["data file is empty"]),
    "random bytes as .npz": (
        _raw("d.npz", np.random.default_rng(0).bytes(999)),
        2,
        ["d.npz is not a numpy file: data must be .npy or .npz"],
    ),
    "truncated .npy": (_truncated_npy, 2, ["x.npy is not a readable numpy file"]),
    ".npz header declaring more data than it holds": (
        _lying_npz_header,
        2,
        ["d.npz[x] is damaged: its header declares 768000 bytes", "holds 76800"],
    ),
    ".npy samples without labels": (
        lambda f: _pair(X, Y)(f)[:2],
        2,
        ["x.npy holds samples only: pass the labels with --labels"],
    ),
    ".npz given as samples with --labels": (
        lambda f: [*_npz(x=X, y=Y)(f), "--labels", _pair(X, Y)(f)[3]],
        2,
        ["d.npz is an .npz archive; pass it with --data"],
    ),
    "compressed .npz over --max-memory": (
        _compressed,
        2,
        ["d.npz[x] is compressed and would be unpacked whole", "save it with np.savez"],
    ),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_broken_data(case: str, tmp_path: Path, model: Path) -> None:
    write, want_code, phrases = DATA_CASES[case]
    args = write(tmp_path)
    code, out, err = hostile.run_cli("scan", model, *args, "-q")
    assert code == want_code, (code, err)
    if want_code == 2:
        assert out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    for phrase in phrases:
        assert phrase in err, (phrase, err)


def test_missing_and_folder_paths(tmp_path: Path, model: Path) -> None:
    code, _, err = hostile.run_cli("scan", model, "--data", tmp_path / "nope.npz", "-q")
    assert code == 2 and "data file not found" in err, err
    # A folder is read as images, one sub-folder per class (#16): one without any is refused.
    code, _, err = hostile.run_cli("scan", model, "--data", tmp_path, "-q")
    assert code == 2 and "has no class sub-folders" in err, err


# -- pickles hidden in data files -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("objects.npy", hostile.object_array_npy),
        ("objects.npz", hostile.object_array_npz),
        ("pickle.npz", hostile.pickle_as_npz),
        ("pickle.npy", hostile.pickle_as_npz),
    ],
)
def test_pickled_data_is_refused_unopened(
    name: str, make: Callable[[Path, Path], Path], tmp_path: Path, model: Path
) -> None:
    marker = tmp_path / "PWNED"
    path = make(tmp_path / name, marker)
    np.save(tmp_path / "y.npy", np.arange(3))
    extra = ["--labels", tmp_path / "y.npy"] if name.endswith(".npy") else []
    code, _, err = hostile.run_cli("scan", model, "--data", path, *extra, "-q")
    assert not marker.exists(), "the pickle ran"
    assert code == 2
    assert name in err and "never unpickles a data file" in err, err


# -- classes too small to cluster -------------------------------------------------------------


def test_class_smaller_than_the_ica_dimension_is_skipped(tmp_path: Path, model: Path) -> None:
    """Class 9 has 5 samples (ICA reduces to 10 dims): reported skipped, the rest scanned."""
    x = X[: len(few)]
    np.savez(tmp_path / "d.npz", x=x, y=few)
    # The model is untrained (about a tenth of the labels): judged anyway, as this is about
    # skipping the small class.
    code, _, err = hostile.run_cli(
        "scan", model, "--data", tmp_path / "d.npz", "--format", "json", "-o", tmp_path / "r.json",
        "--min-agreement", "0",
    )  # fmt: skip
    assert code in (0, 1), err
    doc = json.loads((tmp_path / "r.json").read_text())
    by_label = {c["label"]: c for c in doc["classes"]}
    assert by_label[9]["verdict"] == "skipped" and "5 samples" in by_label[9]["reason"]
    assert all(by_label[c]["verdict"] != "skipped" for c in range(9))


def test_single_class_scans(tmp_path: Path, model: Path) -> None:
    """One class only: nothing to compare it with, but the scan runs and reports that class."""
    np.savez(tmp_path / "d.npz", x=X, y=np.zeros(300, np.int64))
    code, out, err = hostile.run_cli(
        "scan", model, "--data", tmp_path / "d.npz", "--format", "json", "--min-agreement", "0"
    )
    assert code in (0, 1), err
    doc = json.loads(out)
    assert [c["label"] for c in doc["classes"]] == [0]
    assert doc["classes"][0]["verdict"] in ("clean", "poisoned")


def test_detect_on_a_class_below_the_reduction_dimension() -> None:
    """With the size floor lowered, a 4-sample class (fewer than 10 ICA dims) still clusters."""
    from backdoorscan import detect

    rng = np.random.default_rng(1)
    labels = np.concatenate([np.zeros(40, np.int64), np.ones(4, np.int64)])
    feats = rng.normal(size=(44, 16)).astype(np.float32)
    report = detect(feats, labels, min_class_size=3)
    assert [c.verdict != "skipped" for c in report.classes] == [True, True]
    assert report.classes[1].n_samples == 4 and sum(report.classes[1].cluster_sizes) == 4


# -- a data set larger than the memory limit ------------------------------------------------

BIG_N, BIG_D = 8192, 2048  # 64 MiB of float32 samples
LIMIT = parse_size("24M")
SMALL_TRANSFER = DetectConfig(reduce="pca", transfer_queries=20, transfer_samples=100)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    folder = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    x = rng.random((BIG_N, BIG_D), dtype=np.float32)
    y = rng.integers(0, 10, BIG_N)
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y)
    np.savez(folder / "d.npz", x=x, y=y)
    hostile.save(hostile.mlp(d_in=BIG_D), folder / "wide.onnx")
    return folder, x, y


def test_npy_larger_than_the_limit_streams(
    big: tuple[Path, np.ndarray, np.ndarray], model: Path
) -> None:
    """64 MiB of samples under a 24 MiB limit: accepted, and the arrays the scan allocates
    (numpy's allocations, traced) stay under the limit."""
    folder, _, _ = big
    assert (folder / "x.npy").stat().st_size > 2 * LIMIT
    scan(model, X, Y, config=SMALL_TRANSFER)  # compiled kernels and caches loaded outside the trace
    tracemalloc.start()
    try:
        report = scan(
            folder / "wide.onnx",
            data=folder / "x.npy",
            labels=folder / "y.npy",
            max_memory=LIMIT,
            config=SMALL_TRANSFER,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.data["n_samples"] == BIG_N and len(report.analysed_classes) == 10
    assert peak < LIMIT, f"peak {peak / 2**20:.1f} MiB"


def test_uncompressed_npz_members_are_memory_mapped(
    big: tuple[Path, np.ndarray, np.ndarray],
) -> None:
    folder, x, y = big
    with zipfile.ZipFile(folder / "d.npz") as zf:
        assert zf.getinfo("x.npy").compress_type == zipfile.ZIP_STORED
    tracemalloc.start()
    try:
        ds = load_data(folder / "d.npz", max_bytes=LIMIT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(ds.x, np.memmap) and peak < LIMIT / 4
    assert ds.x.shape == x.shape and np.array_equal(ds.x[[0, 4097, -1]], x[[0, 4097, -1]])
    assert np.array_equal(ds.y, y)


def test_data_held_in_memory_counts_against_the_limit(
    big: tuple[Path, np.ndarray, np.ndarray],
) -> None:
    """The same samples passed as an in-memory array exceed the limit: refused before the
    model runs, with the way out named."""
    folder, x, y = big
    with pytest.raises(MemoryBudgetError, match=r"data in memory 64\.0 MiB.*stream from disk"):
        scan(folder / "wide.onnx", x, y, max_memory=LIMIT, config=SMALL_TRANSFER)


def test_estimate_grows_with_what_the_scan_allocates(
    big: tuple[Path, np.ndarray, np.ndarray],
) -> None:
    """Features N x D float32 and the sketch N x 64 are in the estimate, and batches scale."""
    from backdoorscan.adapters.onnx import OnnxAdapter
    from backdoorscan.scanner.data import conform, from_arrays

    folder, _, _ = big
    export = OnnxAdapter(hostile.mlp(d_in=BIG_D, hidden=100)).to_onnx()
    ds = load_data(folder / "x.npy", folder / "y.npy")
    conform(ds, export.input_shape, export.input_dtype, export.num_classes)
    small = estimate(export, ds, batch_size=1, config=DetectConfig())
    large = estimate(export, ds, batch_size=101, config=DetectConfig())
    assert small.parts["features"] == BIG_N * 100 * 4
    assert small.parts["sketch"] >= BIG_N * 64 * 4
    assert "data in memory" not in small.parts  # memory-mapped
    assert large.parts["batch inputs"] == 101 * small.parts["batch inputs"]
    in_memory = from_arrays(np.zeros((10, BIG_D), np.float32), np.arange(10))
    conform(in_memory, export.input_shape, export.input_dtype, export.num_classes)
    assert (
        estimate(export, in_memory, batch_size=1, config=DetectConfig()).parts["data in memory"]
        == 10 * BIG_D * 4
    )


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("2G", 2 << 30),
        ("512M", 512 << 20),
        ("800k", 800 << 10),
        ("1.5GiB", 3 << 29),
        ("4096", 4096),
    ],
)
def test_parse_size(text: str, want: int) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "2X", "-1G", "0", "G"])
def test_parse_size_rejects(text: str, model: Path) -> None:
    with pytest.raises(ValueError):
        parse_size(text)
    code, _, err = hostile.run_cli("scan", model, "--data", "x.npz", "--max-memory", text)
    assert code == 4 and "--max-memory" in err
