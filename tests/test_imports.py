"""What a light entry point loads: each case runs in a fresh interpreter and lists the heavy
libraries found in ``sys.modules`` when it exits.

``import backdoorscan.kernels`` is the Numba kernels alone (no ONNX); ``import backdoorscan``
defers the scanner until a public name is used; ``--help`` must answer without Numba or ONNX
Runtime (each costs about a second to import).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("onnx", "onnxruntime", "numba", "torch", "keras", "tensorflow", "sklearn")

# Runs the statement given, then prints which HEAVY top-level packages are loaded at exit (an
# atexit hook, so that a command line's SystemExit still reports).
PROBE = """
import atexit, json, sys
heavy = json.loads(sys.argv[1])
def _report():
    loaded = sorted(h for h in heavy if h in sys.modules)
    sys.__stdout__.write("\\nLOADED=" + json.dumps(loaded) + "\\n")
    sys.__stdout__.flush()
atexit.register(_report)
sys.argv = json.loads(sys.argv[2])
exec(STATEMENT)
"""


def _loaded(statement: str, argv: list[str] | None = None) -> tuple[set[str], str]:
    """Run ``statement`` in a fresh interpreter; the heavy packages it loaded, and its output."""
    code = PROBE.replace("STATEMENT", repr(statement))
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(HEAVY), json.dumps(argv or ["-c"])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    marker = [line for line in proc.stdout.splitlines() if line.startswith("LOADED=")]
    assert marker, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return set(json.loads(marker[-1][len("LOADED=") :])), proc.stdout + proc.stderr


def test_probe_sees_what_is_loaded() -> None:
    """The probe itself: a statement that imports a heavy package is caught."""
    loaded, _ = _loaded("import sklearn")
    assert "sklearn" in loaded


def test_kernels_load_no_onnx() -> None:
    loaded, out = _loaded("import backdoorscan.kernels")
    assert not loaded & {"onnx", "onnxruntime"}, out


def test_package_root_loads_no_framework() -> None:
    loaded, out = _loaded("import backdoorscan; backdoorscan.__version__")
    assert not loaded & {"onnx", "onnxruntime", "numba", "torch"}, out


@pytest.mark.parametrize("args", [["--help"], ["scan", "--help"]], ids=["help", "scan-help"])
def test_help_loads_neither_numba_nor_onnxruntime(args: list[str]) -> None:
    """``python -m backdoorscan [scan] --help``, as the module runs it."""
    statement = "import runpy; runpy.run_module('backdoorscan', run_name='__main__')"
    loaded, out = _loaded(statement, argv=["backdoorscan", *args])
    assert "Usage:" in out and "--help" in out  # the help was printed
    if args[0] == "scan":
        assert "--size-threshold" in out
    assert not loaded & {"numba", "onnxruntime"}, out
