"""Hostile model files through the command line: the worker process bounds memory and time,
SIGTERM ends a hung run, and a payload that would write a file leaves no mark, whatever the
command (scan, layers, export, repair). Every run is a fresh process, as a review runs it."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import hostile_sandbox as hs

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the worker's confinement is Linux")

CLI = [sys.executable, "-c", "from backdoorscan.cli import main; main()"]


def _data(folder: Path, n: int = 64) -> Path:
    """Four float features per sample, four classes: what the hostile ONNX models take."""
    rng = np.random.default_rng(0)
    path = folder / "d.npz"
    np.savez(path, x=rng.random((n, 4), dtype=np.float32), y=np.arange(n) % 4)
    return path


def _digest(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def _measured(args: list[object], timeout: float = 120) -> tuple[int, str, int]:
    """Run the CLI in a child of a fresh wrapper; (exit code, stderr, peak RSS in bytes of the
    CLI or any process it waited for, as the kernel counts it)."""
    code = (
        "import resource, subprocess, sys, json\n"
        f"r = subprocess.run({CLI + [str(a) for a in args]!r}, capture_output=True, text=True)\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
        "print(json.dumps([r.returncode, r.stderr, peak]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, check=True
    )
    rc, err, peak = json.loads(out.stdout)
    return rc, err, peak


def test_memory_bomb_stays_under_max_memory(tmp_path: Path) -> None:
    """A 300-byte graph allocating 1 GiB at run time: exit 2, one line naming --max-memory, and
    the peak of every process stays under the limit plus the scanner's own footprint (that of
    the same command on a harmless model of the same size)."""
    data = _data(tmp_path)
    bomb = tmp_path / "bomb.onnx"
    bomb.write_bytes(hs.memory_bomb())
    small = tmp_path / "small.onnx"
    small.write_bytes(hs.memory_bomb(n_floats=16))  # the same graph, 64 bytes expanded
    limit = 200 << 20
    args = ["--data", data, "--layer", "features", "--max-memory", "200M", "--min-agreement", "0"]
    rc_ok, err_ok, footprint = _measured(["scan", small, *args])
    assert rc_ok in (0, 1, 3), err_ok
    rc, err, peak = _measured(["scan", bomb, *args])
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "--max-memory" in err
    assert peak < footprint + limit, (peak >> 20, footprint >> 20)


def test_sigterm_during_a_hung_model_run_ends_within_2s(tmp_path: Path) -> None:
    data = _data(tmp_path)
    model = tmp_path / "loop.onnx"
    model.write_bytes(hs.endless_loop())
    out = tmp_path / "r.json"
    proc = subprocess.Popen(
        [*CLI, "scan", model, "--data", data, "--layer", "features", "-o", out],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(6)  # imports, the worker's start and the export: then it hangs in the Loop
    assert proc.poll() is None, proc.communicate()
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert time.monotonic() - t < 2.0
    assert proc.returncode == 2 and "interrupted" in err, err
    assert not out.exists()
    time.sleep(0.2)
    leftover = subprocess.run(["pgrep", "-f", "backdoorscan.sandbox.worker"], capture_output=True)
    assert leftover.stdout.strip() == b"" or str(proc.pid) not in leftover.stdout.decode()


def test_timeout_kills_a_hung_model(tmp_path: Path) -> None:
    data = _data(tmp_path)
    model = tmp_path / "loop.onnx"
    model.write_bytes(hs.endless_loop())
    t = time.monotonic()
    proc = subprocess.run(
        [*CLI, "scan", model, "--data", data, "--layer", "features", "--timeout", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "3" in proc.stderr and "timeout" in proc.stderr.lower()
    assert time.monotonic() - t < 30


@pytest.fixture(params=["forward", "setstate"])
def writer(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, Path, Path]:
    """A TorchScript model that creates ``marker`` (aten::from_file, shared) in ``forward``
    (refused by the code check, and by the worker's confinement where that check is missed) or
    in ``__setstate__`` (run by ``torch.jit.load`` itself: only the confinement stops it),
    with data it fits the shape of."""
    pytest.importorskip("torch")
    marker = tmp_path / "MARKER"
    make = hs.torchscript_writer if request.param == "forward" else hs.torchscript_setstate_writer
    model = make(tmp_path / "writer.ts", marker)
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.random((60, 4), dtype=np.float32), y=np.arange(60) % 3)
    return model, data, marker


@pytest.mark.parametrize("command", ["scan", "layers", "export", "repair"])
def test_a_file_writing_torchscript_leaves_no_mark(
    writer: tuple[Path, Path, Path], tmp_path: Path, command: str
) -> None:
    model, data, marker = writer
    before = _digest(model, data)
    argv: list[object] = [command, model]
    if command in ("scan", "repair"):
        argv += ["--data", data, "--min-agreement", "0"]
    if command == "export":  # with its input shape, so that the export runs forward
        argv += ["--input-shape", "4", "-o", tmp_path / "out.onnx"]
    if command == "repair":  # retrained in the worker: no --trust-model needed, none given
        argv += ["-o", tmp_path / "repaired.ts"]
    proc = subprocess.run([*CLI, *map(str, argv)], capture_output=True, text=True, timeout=300)
    assert not marker.exists(), "the payload ran"
    assert _digest(model, data) == before
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    # Refused for what it is: its code (forward), or its file access while loading (setstate).
    assert ("file system" in proc.stderr) or ("open a file" in proc.stderr), proc.stderr
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "repaired.ts").exists()
