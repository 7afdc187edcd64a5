"""An output never replaces an input or a file that is not a regular file (exit 2, one line,
the input byte-identical afterwards)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from backdoorscan.cli import DEMO_DIR

CLI = [sys.executable, "-c", "from backdoorscan.cli import main; main()"]


def _run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture()
def demo(tmp_path: Path) -> tuple[Path, Path]:
    model, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    shutil.copy(DEMO_DIR / "demo.onnx", model)
    shutil.copy(DEMO_DIR / "demo.npz", data)
    return model, data


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("target", ["model", "data", "data-by-symlink-folder"])
def test_scan_output_onto_an_input_is_refused(
    demo: tuple[Path, Path], tmp_path: Path, target: str
) -> None:
    model, data = demo
    before = (_sha(model), _sha(data))
    out = model if target == "model" else data
    if target == "data-by-symlink-folder":
        (tmp_path / "alias").symlink_to(tmp_path)
        out = tmp_path / "alias" / data.name
    proc = _run("scan", model, "--data", data, "--format", "json", "-o", out)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "input" in proc.stderr
    assert (_sha(model), _sha(data)) == before


def test_export_onto_its_input_is_refused(demo: tuple[Path, Path]) -> None:
    model, _ = demo
    before = _sha(model)
    proc = _run("export", model, "-o", model)
    assert proc.returncode == 2 and "input" in proc.stderr, proc.stderr
    assert _sha(model) == before


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
def test_a_device_is_never_replaced_by_a_report(demo: tuple[Path, Path]) -> None:
    model, data = demo
    proc = _run("scan", model, "--data", data, "-o", "/dev/null")
    assert proc.returncode == 2 and "not a regular file" in proc.stderr, proc.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
