"""The command line as a reviewer uses it: the demo, reports, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from backdoorscan.cli import DEMO_DIR

DEMO_MODEL, DEMO_DATA = DEMO_DIR / "demo.onnx", DEMO_DIR / "demo.npz"


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed entry point's code in a fresh interpreter."""
    cmd = [sys.executable, "-c", "from backdoorscan.cli import main; main()", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)


def test_demo_finds_the_planted_backdoor(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    proc = run("demo", "--format", "json", "-o", out)
    assert proc.returncode == 1, proc.stderr
    assert "BACKDOOR SUSPECTED in class(es) 1" in proc.stdout
    report = json.loads(out.read_text())
    truth = np.load(DEMO_DATA)["poison"]
    flagged = np.zeros(len(truth), bool)
    flagged[report["flagged_indices"]] = True
    tp = int((flagged & truth).sum())
    f1 = 2 * tp / (int(flagged.sum()) + int(truth.sum()))
    assert f1 >= 0.95
    assert report["poisoned_classes"] == [1]
    assert next(c for c in report["classes"] if c["label"] == 1)["suspected_source"] == 7


def test_json_report_schema(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = run("scan", DEMO_MODEL, "--data", DEMO_DATA, "--format", "json", "-o", out, "-q")
    assert proc.returncode == 1, proc.stderr
    r = json.loads(out.read_text())
    assert r["schema_version"] == 2
    assert r["invocation"]["command"].startswith(f"backdoorscan scan {DEMO_MODEL} --data ")
    assert r["tool"]["name"] == "backdoorscan" and r["tool"]["version"]
    assert len(r["model"]["sha256"]) == 64 and len(r["data"]["sha256"]) == 64
    assert r["settings"]["seed"] == 0
    assert r["provider"] == "CPUExecutionProvider"
    assert len(r["scores"]) == r["data"]["n_samples"] == 1847
    assert {"extract", "detect"} <= set(r["timings_s"])
    for c in r["classes"]:
        assert {"label", "verdict", "cluster_sizes", "silhouette", "transfer"} <= set(c)


def test_text_report_to_stdout() -> None:
    proc = run("scan", DEMO_MODEL, "--data", DEMO_DATA)
    assert proc.returncode == 1
    assert "poisoned" in proc.stdout and "CPUExecutionProvider" in proc.stdout


def test_layers_marks_the_default() -> None:
    proc = run("layers", DEMO_MODEL)
    assert proc.returncode == 0
    default = [line for line in proc.stdout.splitlines() if line.startswith("*")]
    assert len(default) == 1 and "hidden" in default[0] and "32" in default[0]


def test_choosing_a_layer_by_name(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = run(
        "scan", DEMO_MODEL, "--data", DEMO_DATA, "--layer", "fc1", "--format", "json", "-o", out
    )
    assert proc.returncode in (0, 1), proc.stderr
    assert json.loads(out.read_text())["model"]["layer"] == "fc1"


def _assert_error(proc: subprocess.CompletedProcess[str], words: str, out: Path) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert words in lines[0], lines[0]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*")), "a temporary report was left behind"


def test_corrupt_model(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(DEMO_MODEL.read_bytes()[:300])
    out = tmp_path / "r.json"
    _assert_error(run("scan", bad, "--data", DEMO_DATA, "-o", out), "not a readable ONNX", out)


def test_empty_model_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    out = tmp_path / "r.json"
    _assert_error(run("scan", empty, "--data", DEMO_DATA, "-o", out), "empty", out)


def test_empty_data_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    out = tmp_path / "r.json"
    _assert_error(run("scan", DEMO_MODEL, "--data", empty, "-o", out), "empty", out)


def test_data_shape_does_not_fit_the_model(tmp_path: Path) -> None:
    data = tmp_path / "wrong.npz"
    np.savez(data, x=np.zeros((50, 7, 7), np.float32), y=np.zeros(50, np.int64))
    out = tmp_path / "r.json"
    _assert_error(run("scan", DEMO_MODEL, "--data", data, "-o", out), "shape (7, 7)", out)


def test_labels_out_of_range(tmp_path: Path) -> None:
    arrays = np.load(DEMO_DATA)
    data = tmp_path / "labels.npz"
    y = arrays["y"].copy()
    y[3] = 12
    np.savez(data, x=arrays["x"], y=y)
    out = tmp_path / "r.json"
    _assert_error(run("scan", DEMO_MODEL, "--data", data, "-o", out), "10 classes", out)


def test_missing_array_in_npz(tmp_path: Path) -> None:
    data = tmp_path / "keys.npz"
    np.savez(data, images=np.zeros((5, 64), np.float32), y=np.zeros(5, np.int64))
    out = tmp_path / "r.json"
    _assert_error(run("scan", DEMO_MODEL, "--data", data, "-o", out), "no array 'x'", out)
    proc = run("scan", DEMO_MODEL, "--data", data, "--x-key", "images", "-q")
    assert proc.returncode == 3  # five samples of one class: nothing can be clustered


def test_separate_npy_files(tmp_path: Path) -> None:
    arrays = np.load(DEMO_DATA)
    np.save(tmp_path / "x.npy", arrays["x"])
    np.save(tmp_path / "y.npy", arrays["y"])
    proc = run("scan", DEMO_MODEL, "--data", tmp_path / "x.npy", "--labels", tmp_path / "y.npy")
    assert proc.returncode == 1, proc.stderr


def test_usage_errors_exit_4() -> None:
    assert run("scan", DEMO_MODEL, "--no-such-option").returncode == 4
    assert run("scan", DEMO_MODEL).returncode == 4  # --data is required
    assert run("scan", DEMO_MODEL, "--data", DEMO_DATA, "--clusters", "1").returncode == 4
    assert run("frobnicate").returncode == 4


def test_every_command_has_help_with_an_example() -> None:
    for command in ("scan", "demo", "layers", "export"):
        proc = run(command, "--help")
        assert proc.returncode == 0
        assert "Example" in proc.stdout, command


def test_custom_operator_domain_refused(tmp_path: Path) -> None:
    model = onnx.load(DEMO_MODEL)
    model.graph.node[1].domain = "com.evil"
    model.opset_import.add(domain="com.evil", version=1)
    bad = tmp_path / "custom.onnx"
    onnx.save(model, bad)
    out = tmp_path / "r.json"
    _assert_error(run("scan", bad, "--data", DEMO_DATA, "-o", out), "custom operator domain", out)


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_device_choice_reports_the_provider_used(device: str, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = run(
        "scan",
        DEMO_MODEL,
        "--data",
        DEMO_DATA,
        "--device",
        device,
        "--format",
        "json",
        "-o",
        out,
        "-q",
    )
    assert proc.returncode == 1
    provider = json.loads(out.read_text())["provider"]
    import onnxruntime as ort

    if device == "cpu" or "CUDAExecutionProvider" not in ort.get_available_providers():
        assert provider == "CPUExecutionProvider"
    assert "Failed to load" not in proc.stderr and "libcublas" not in proc.stderr


def test_threads_option_bounds_the_scan_and_keeps_the_report(tmp_path: Path) -> None:
    """--threads 1 runs the model and the classes on one thread; the findings are unchanged."""
    docs = []
    for threads in ("1", "0"):
        out = tmp_path / f"t{threads}.json"
        proc = run(
            "scan",
            DEMO_MODEL,
            "--data",
            DEMO_DATA,
            "--threads",
            threads,
            "-q",
            "--format",
            "json",
            "-o",
            out,
        )
        assert proc.returncode == 1, proc.stderr
        docs.append(json.loads(out.read_text()))
    assert docs[0]["settings"]["n_jobs"] == 1 and docs[1]["settings"]["n_jobs"] == 0
    for doc in docs:
        doc.pop("timings_s"), doc.pop("invocation"), doc["settings"].pop("n_jobs")
    assert docs[0] == docs[1]
    assert run("scan", DEMO_MODEL, "--data", DEMO_DATA, "--threads", "-1").returncode == 4
