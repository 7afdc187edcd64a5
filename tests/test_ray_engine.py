"""Issue #17: data as several shard files, and the extraction on Ray with the same answer.

The shipped demo is split into three ``.npz`` shards; scanned with the local engine and with
``engine="ray"`` (on a local Ray instance this module starts once, two CPUs), the flagged
indices and the per-class figures must be equal, and equal to the unsharded scan's: the
indices are global. Tests that need Ray are skipped where it is not installed.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import backdoorscan
from backdoorscan.cli import DEMO_DIR
from backdoorscan.scanner.data import DataError
from backdoorscan.scanner.pipeline import Prepared, Progress
from backdoorscan.scanner.ray_engine import RayEngineError
from backdoorscan.scanner.transfer import TransferProbe

DEMO_MODEL, DEMO_DATA = DEMO_DIR / "demo.onnx", DEMO_DIR / "demo.npz"
FIGURES = ("label", "n_samples", "verdict", "cluster_sizes", "transfer", "n_flagged")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo in three shards of unequal size; returns their glob."""
    folder = tmp_path_factory.mktemp("shards")
    with np.load(DEMO_DATA) as z:
        x, y = z["x"], z["y"]
    for i, (lo, hi) in enumerate([(0, 500), (500, 1300), (1300, len(y))]):
        np.savez(folder / f"train-{i}.npz", x=x[lo:hi], y=y[lo:hi])
    return folder / "train-*.npz"


@pytest.fixture(scope="module")
def npy_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo as ``.npy`` pairs of very uneven sizes (one shard of a single sample, one
    ending inside a batch); returns a glob matching the samples' and the labels' files."""
    folder = tmp_path_factory.mktemp("npy-shards")
    with np.load(DEMO_DATA) as z:
        x, y = z["x"], z["y"]
    cuts = [0, 1, 700, 1033, len(y)]
    for i, (lo, hi) in enumerate(itertools.pairwise(cuts)):
        np.save(folder / f"part-{i}-x.npy", x[lo:hi])
        np.save(folder / f"part-{i}-y.npy", y[lo:hi])
    return folder / "part-*.npy"


@pytest.fixture(scope="module")
def local_ray() -> object:
    """One local Ray instance for the module (starting Ray takes seconds)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def unsharded() -> backdoorscan.Report:
    return backdoorscan.scan(str(DEMO_MODEL), data=str(DEMO_DATA))


def figures(report: backdoorscan.Report) -> list[tuple[object, ...]]:
    return [tuple(getattr(c, f) for f in FIGURES) for c in report.classes]


def test_local_scan_of_shards_equals_the_unsharded_scan(
    shards: Path, unsharded: backdoorscan.Report
) -> None:
    report = backdoorscan.scan(str(DEMO_MODEL), data=str(shards))
    assert report.poisoned_classes == [1]
    np.testing.assert_array_equal(report.flagged_indices, unsharded.flagged_indices)
    assert figures(report) == figures(unsharded)
    assert report.data["n_samples"] == len(np.load(DEMO_DATA)["y"])
    assert report.data["path"] == str(shards)


def test_ray_scan_equals_the_local_scan(
    local_ray: object,
    npy_shards: Path,
    unsharded: backdoorscan.Report,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """``.npy`` pairs of uneven sizes, the extraction spilled to files: the flagged indices are
    the unsharded data's, and the spill folder is left empty."""
    shards = npy_shards
    local = backdoorscan.scan(str(DEMO_MODEL), data=str(shards), trust_model=True)

    def not_here(*args: object, **kwargs: object) -> None:
        raise AssertionError("run on the driver")

    # The classes, the transfer test and every model query run in Ray's workers: the driver's
    # own per-class analysis, probe and session may not be called.
    monkeypatch.setattr("backdoorscan.scanner.detect._detect_class", not_here)
    monkeypatch.setattr(TransferProbe, "__call__", not_here)
    monkeypatch.setattr(Prepared, "session", not_here)
    seen: list[str] = []

    def look(n: int) -> None:  # what the spill folder holds while the batches come in
        seen.extend(p.name for p in tmp_path.rglob("rows-*"))

    on_ray = backdoorscan.scan(
        str(DEMO_MODEL), data=str(shards), engine="ray", trust_model=True,
        ray_spill_dir=str(tmp_path), ray_spill_above=1, progress=Progress(step=look),
    )  # fmt: skip
    monkeypatch.undo()
    assert seen and list(tmp_path.iterdir()) == []
    assert on_ray.poisoned_classes == local.poisoned_classes == [1]
    np.testing.assert_array_equal(on_ray.flagged_indices, local.flagged_indices)
    np.testing.assert_array_equal(on_ray.flagged_indices, unsharded.flagged_indices)
    assert figures(on_ray) == figures(local) == figures(unsharded)
    assert on_ray.data["model_agreement"] == local.data["model_agreement"]
    np.testing.assert_allclose(on_ray.scores, local.scores, rtol=1e-12)
    for mine, theirs in zip(on_ray.classes, local.classes, strict=True):
        assert mine.transfer_rates == pytest.approx(theirs.transfer_rates)
        assert (mine.separation, mine.silhouette) == pytest.approx(
            (theirs.separation, theirs.silhouette)
        )


def test_ray_extraction_gives_the_local_arrays(local_ray: object, shards: Path) -> None:
    """Bit for bit: features, predictions and the input sketch, in the global order, through
    the object store (the Ray scan test spills them to files)."""
    from backdoorscan.scanner.data import conform
    from backdoorscan.scanner.extract import extract
    from backdoorscan.scanner.pipeline import load_dataset, prepare
    from backdoorscan.scanner.ray_engine import ray_extract

    ds = load_dataset(str(shards))
    try:
        export = prepare(backdoorscan.adapters.load(DEMO_MODEL)).export
        conform(ds, export.input_shape, export.input_dtype, export.num_classes)
        here = extract(export, ds, batch_size=300, device="cpu", seed=3)
        there = ray_extract(
            export, ds, batch_size=300, device="cpu", seed=3, concurrency=2, spill_above=None
        )
    finally:
        ds.close()
    np.testing.assert_array_equal(there.features, here.features)
    np.testing.assert_array_equal(there.predictions, here.predictions)
    np.testing.assert_array_equal(there.sketch, here.sketch)
    assert there.num_classes == here.num_classes


def test_an_interrupted_ray_extraction_leaves_no_spill_files(
    local_ray: object, shards: Path, tmp_path: Path
) -> None:
    from backdoorscan.scanner.pipeline import load_dataset, prepare
    from backdoorscan.scanner.ray_engine import ray_extract

    def interrupt(n: int) -> None:
        raise KeyboardInterrupt

    ds = load_dataset(str(shards))
    try:
        export = prepare(backdoorscan.adapters.load(DEMO_MODEL)).export
        with pytest.raises(RayEngineError, match="cannot make a spill folder in"):
            ray_extract(export, ds, spill_dir=tmp_path / "missing", spill_above=1)
        with pytest.raises(KeyboardInterrupt):
            ray_extract(
                export, ds, batch_size=300, device="cpu", progress=interrupt, spill_dir=tmp_path,
                spill_above=1,
            )  # fmt: skip
    finally:
        ds.close()
    assert list(tmp_path.iterdir()) == []


def test_ray_engine_refuses_an_untrusted_model_file(shards: Path) -> None:
    with pytest.raises(RayEngineError, match="--trust-model"):
        backdoorscan.scan(str(DEMO_MODEL), data=str(shards), engine="ray")


def test_npy_shards_pair_by_name(tmp_path: Path, npy_shards: Path) -> None:
    from backdoorscan.scanner.shards import shard_paths

    pairs = shard_paths(npy_shards)
    assert [(d.name, lab.name if lab else None) for d, lab in pairs] == [
        (f"part-{i}-x.npy", f"part-{i}-y.npy") for i in range(4)
    ]
    assert shard_paths(str(npy_shards).replace("*", "*-x")) == pairs
    np.save(tmp_path / "a-0-x.npy", np.zeros((5, 64), np.float32))
    with pytest.raises(DataError, match=r"no labels file a-0-y\.npy"):
        shard_paths(tmp_path / "a-*.npy")
    np.save(tmp_path / "a-0-y.npy", np.zeros(5, np.int64))
    np.save(tmp_path / "a-1-y.npy", np.zeros(5, np.int64))
    with pytest.raises(DataError, match=r"a-1-y\.npy has no samples file"):
        shard_paths(tmp_path / "a-*.npy")
    np.save(tmp_path / "b-0.npy", np.zeros(5, np.int64))
    with pytest.raises(DataError, match=r"b-0\.npy is neither"):
        shard_paths(tmp_path / "b-*.npy")


def test_shard_globs_are_checked(tmp_path: Path, shards: Path) -> None:
    with pytest.raises(DataError, match="no data file matches"):
        backdoorscan.scan(str(DEMO_MODEL), data=str(tmp_path / "none-*.npz"))
    np.savez(tmp_path / "a-0.npz", x=np.zeros((30, 64), np.float32), y=np.zeros(30, np.int64))
    np.savez(tmp_path / "a-1.npz", x=np.zeros((30, 8, 8), np.float32), y=np.zeros(30, np.int64))
    with pytest.raises(DataError, match="every shard must agree"):
        backdoorscan.scan(str(DEMO_MODEL), data=str(tmp_path / "a-*.npz"))
    with pytest.raises(ValueError, match="engine must be"):
        backdoorscan.scan(str(DEMO_MODEL), data=str(shards), engine="spark")
    from backdoorscan.cli import main

    with pytest.raises(SystemExit) as exit_info:  # a usage error, before anything is read
        main(["scan", str(DEMO_MODEL), "--data", str(shards), "--ray-spill-dir", str(tmp_path)])
    assert exit_info.value.code == 4


def test_cli_scans_a_glob_of_shards(tmp_path: Path, shards: Path) -> None:
    out = tmp_path / "report.json"
    cmd = "from backdoorscan.cli import main; main()"
    args = ["scan", str(DEMO_MODEL), "--data", str(shards), "--format", "json", "-o", str(out)]
    proc = subprocess.run(
        [sys.executable, "-c", cmd, *args, "-q"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1, proc.stderr
    report = json.loads(out.read_text())
    assert report["poisoned_classes"] == [1]
    truth = np.flatnonzero(np.load(DEMO_DATA)["poison"])
    assert len(np.intersect1d(report["flagged_indices"], truth)) >= 0.95 * len(truth)
    proc = subprocess.run(
        [sys.executable, "-c", cmd, *args, "--engine", "ray"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "--trust-model" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
