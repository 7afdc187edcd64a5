"""Nothing is lost: inputs are opened read-only and never modified; a report appears whole or
not at all; an interrupted scan says so, leaves no temporary files and no half-written report."""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import hostile
import numpy as np
import pytest

from backdoorscan._io import atomic_write_text
from backdoorscan.scanner import scan


def _digest(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


# -- inputs ---------------------------------------------------------------------------------

_OPENS: list[tuple[str, object]] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENS is None:
        return
    if event == "open":
        _OPENS.append((event, args))
    elif event == "mmap.__new__" and args[0] >= 0:
        # Record which file is mapped while its descriptor is still open.
        _OPENS.append((event, (os.readlink(f"/proc/self/fd/{args[0]}"), *args[1:])))


sys.addaudithook(_audit)  # audit hooks cannot be removed; it records only inside `recording`


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[str, object]]]:
    """Record every file this process opens or memory-maps inside the block."""
    global _OPENS
    _OPENS = []
    try:
        yield _OPENS
    finally:
        _OPENS = None


@pytest.mark.parametrize("layout", ["npz-compressed", "npz", "npy"])
def test_inputs_are_read_only_and_unchanged(layout: str, tmp_path: Path) -> None:
    model = hostile.save(hostile.mlp(), tmp_path / "model.onnx")
    x, y = hostile.digits()
    if layout == "npz-compressed":
        np.savez_compressed(tmp_path / "train.npz", x=x, y=y)
        data = {"data": tmp_path / "train.npz"}
    elif layout == "npz":
        np.savez(tmp_path / "train.npz", x=x, y=y)
        data = {"data": tmp_path / "train.npz"}
    else:
        np.save(tmp_path / "x.npy", x)
        np.save(tmp_path / "y.npy", y)
        data = {"data": tmp_path / "x.npy", "labels": tmp_path / "y.npy"}
    inputs = [Path(model), *map(Path, data.values())]
    before = {p: _digest(p) for p in inputs}
    with recording() as events:
        report = scan(model, **data)
    assert report.data["n_samples"] == 300 and len(report.analysed_classes) == 10  # it ran
    assert {p: _digest(p) for p in inputs} == before
    opened = {str(p.resolve()) for p in inputs}
    seen, mapped = set(), set()
    for event, args in events:
        if event == "open" and isinstance(args[0], str) and str(Path(args[0]).resolve()) in opened:
            path, mode, flags = args
            seen.add(str(Path(path).resolve()))
            assert mode in (None, "r", "rb"), (path, mode)
            assert flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC) == 0, (path, flags)
        elif event == "mmap.__new__" and str(Path(args[0]).resolve()) in opened:
            assert args[2] == mmap.ACCESS_READ, args  # memory maps of inputs are read-only
            mapped.add(str(Path(args[0]).resolve()))
    assert seen == opened  # every input was opened, and only for reading
    # Uncompressed data is memory-mapped (read-only); compressed members are read whole.
    want_mapped = set() if layout == "npz-compressed" else opened - {str(Path(model).resolve())}
    assert mapped == want_mapped
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in inputs)


# -- outputs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("small")
    x, y = hostile.digits()
    np.savez(folder / "train.npz", x=x, y=y)
    return hostile.save(hostile.mlp(), folder / "mlp.onnx"), folder / "train.npz"


def test_report_is_written_whole(tmp_path: Path, small: tuple[Path, Path]) -> None:
    model, data = small
    out = tmp_path / "report.json"
    # An untrained MLP: judged anyway (--min-agreement 0), as this is about the written file.
    code, _, err = hostile.run_cli(
        "scan", model, "--data", data, "--format", "json", "-o", out, "--min-agreement", "0"
    )
    assert code in (0, 1), err
    assert json.loads(out.read_text())["data"]["n_samples"] == 300
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left


def test_interrupted_write_keeps_the_old_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted between writing and renaming: the previous report stays, the partial file
    goes."""
    out = tmp_path / "report.json"
    out.write_text('{"old": true}\n')

    def interrupted(_fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(out, '{"new": true}\n' * 10_000)
    assert out.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_output_folder_missing_writes_nothing(tmp_path: Path, small: tuple[Path, Path]) -> None:
    model, data = small
    out = tmp_path / "missing" / "report.json"
    code, _, err = hostile.run_cli("scan", model, "--data", data, "-o", out, "-q")
    assert code == 2 and "output folder does not exist" in err, err
    assert list(tmp_path.iterdir()) == []


# -- interruption ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_scan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A model that runs at a few hundred samples a second and 10,240 samples: extraction
    takes about 10 s, so a signal sent once it starts lands in the middle of it."""
    folder = tmp_path_factory.mktemp("slow")
    model = hostile.slow_mlp(folder / "slow.onnx")
    x, y = hostile.digits(n_per_class=1024)
    np.savez(folder / "train.npz", x=x, y=y)
    return model, folder / "train.npz"


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
    return seen


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_scan_leaves_nothing(
    sig: signal.Signals, slow_scan: tuple[Path, Path], tmp_path: Path
) -> None:
    model, data = slow_scan
    out_dir, tmp_dir, home = tmp_path / "out", tmp_path / "tmp", tmp_path / "home"
    for folder in (out_dir, tmp_dir, home):
        folder.mkdir()
    report = out_dir / "report.json"
    env = {
        **os.environ,
        "TMPDIR": str(tmp_dir),
        "HOME": str(home),
        "BACKDOORSCAN_CACHE_DIR": str(tmp_dir / "cache"),
    }
    env.pop("ORT_DISABLE_TELEMETRY", None)  # the scanner sets it itself
    # stderr is a terminal, so that the progress bar shows when extraction starts.
    leader, follower = pty.openpty()
    args = [sys.executable, "-m", "backdoorscan.cli", "scan", model, "--data", data, "-o", report]
    proc = subprocess.Popen(
        [*args, "--device", "cpu", "--batch-size", "64"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=follower,
        env=env,
        # A runner may start us with SIGINT ignored; the child must see the default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.close(follower)
    try:
        shown = _read_until(leader, b"extracting activations", timeout=60)
        assert b"extracting activations" in shown, shown
        time.sleep(0.5)
        assert proc.poll() is None, "the scan finished before it could be interrupted"
        proc.send_signal(sig)
        code = proc.wait(timeout=30)
        shown += _read_until(leader, b"no report was written", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
        assert proc.stdout is not None
        stdout = proc.stdout.read()
        proc.stdout.close()
    assert code == 2, shown
    assert b"error: interrupted; no report was written" in shown, shown
    assert b"Traceback" not in shown
    assert stdout == b""
    assert list(out_dir.iterdir()) == []  # no report, no partial file
    assert list(tmp_dir.iterdir()) == []  # no temporary files left behind
    assert list(home.iterdir()) == []  # nor anything under HOME (no runtime telemetry state)
