"""--verbose: log lines (standard logging, loggers under backdoorscan.) on what each step
decided; without it, and off a terminal, nothing but errors on stderr."""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import pytest

from backdoorscan.cli import DEMO_DIR, main

DEMO_MODEL, DEMO_DATA = DEMO_DIR / "demo.onnx", DEMO_DIR / "demo.npz"


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def test_verbose_says_what_each_step_decided(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "r.json"
    code, stdout, err = cli(capsys, "demo", "-v", "-q", "--format", "json", "-o", out)
    assert code == 1 and stdout == ""
    report = json.loads(out.read_text())
    lines = err.splitlines()
    assert all(line.startswith("backdoorscan.") for line in lines if line.strip()), err
    assert any(
        line.startswith("backdoorscan.scanner.pipeline: model ")
        and f"clustering layer {report['model']['layer']!r}" in line
        for line in lines
    )
    assert any(f"on {report['provider']} in" in line for line in lines)
    decisions = [line for line in lines if line.startswith("backdoorscan.scanner.detect: ")]
    assert len(decisions) == len(report["classes"])
    for c in report["classes"]:
        [line] = [d for d in decisions if d.split(": ")[1] == f"class {c['label']}"]
        assert f": {c['verdict']}, {c['n_samples']} samples" in line
    poisoned = next(d for d in decisions if ": class 1: " in d)
    assert "poisoned" in poisoned and "50 flagged" in poisoned and "transfer yes" in poisoned
    assert any(
        line.startswith("backdoorscan.scanner.transfer: class 1: ")
        and "class 7 moved most (100% above its own null)" in line
        for line in lines
    )
    assert lines[-1] == "backdoorscan.scanner.pipeline: verdict: backdoor (50 samples flagged)"


def test_quiet_by_default_and_off_a_terminal(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """After a --verbose run in this process, a run without it logs nothing; stderr is not a
    terminal here, so no progress bar is drawn either: stderr holds only the output note."""
    cli(capsys, "demo", "-v", "-q")
    out = tmp_path / "r.json"
    code, stdout, err = cli(capsys, "demo", "--format", "json", "-o", out)
    assert code == 1 and stdout.startswith("BACKDOOR SUSPECTED")
    assert err == f"report written to {out}\n"
    assert logging.getLogger("backdoorscan").level == logging.NOTSET


def test_python_scans_log_through_logging(caplog: pytest.LogCaptureFixture) -> None:
    from backdoorscan.scanner.pipeline import scan

    with caplog.at_level(logging.INFO, logger="backdoorscan"):
        report = scan(DEMO_MODEL, data=DEMO_DATA)
    names = {r.name for r in caplog.records} - {"backdoorscan.progress"}  # (once a command
    # line has run in this process, the status lines go to its terminal handler only)
    assert names == {
        "backdoorscan.scanner.pipeline", "backdoorscan.scanner.detect",
        "backdoorscan.scanner.transfer",
    }  # fmt: skip
    detect = [r.getMessage() for r in caplog.records if r.name.endswith(".detect")]
    assert [m.split(":")[0] for m in detect] == [f"class {c.label}" for c in report.classes]
    caplog.clear()
    scan(DEMO_MODEL, data=DEMO_DATA)  # INFO is off by default: nothing
    assert [r for r in caplog.records if r.name.startswith("backdoorscan.scanner")] == []


def test_repair_logs_each_epoch(caplog: pytest.LogCaptureFixture) -> None:
    from backdoorscan.scanner.scanlog import log_epoch

    with caplog.at_level(logging.INFO, logger="backdoorscan"):
        log_epoch(2, 20, {"epoch": 2, "clean_accuracy": 0.97125, "asr": 0.0312})
    [rec] = caplog.records
    assert rec.name == "backdoorscan.scanner.repair"
    assert rec.getMessage() == "repair epoch 2/20: clean accuracy 0.9712, attack success 0.0312"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run_on_a_terminal(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str]:
    """The command line with stderr a (pretend) terminal: exit code and stderr."""
    err = _Tty()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return int(exc.value.code or 0), err.getvalue()


def test_long_steps_are_announced_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    scan = ["scan", str(DEMO_MODEL), "--data", str(DEMO_DATA), "--exre", "probe"]
    code, err = _run_on_a_terminal(monkeypatch, *scan)
    assert code == 1
    lines = err.splitlines()
    assert "loading demo.onnx and exporting it to ONNX with its features..." in lines
    assert "ExRe (probe): reclassifying the candidate clusters..." in lines
    assert "extracting activations" in err and "analysing classes 10/10" in err
    assert err.index("exporting it") < err.index("extracting") < err.index("ExRe (probe)")
    # --quiet: nothing at all on stderr; --verbose: each status once, as a log line.
    code, err = _run_on_a_terminal(monkeypatch, *scan, "-q")
    assert code == 1 and err == ""
    code, err = _run_on_a_terminal(monkeypatch, *scan, "-v")
    assert err.count("exporting it to ONNX") == 1
    assert "backdoorscan.progress: ExRe (probe): reclassifying" in err
    # Outside a command (and without -v's handler): nothing on stderr whatever it is.
    from backdoorscan.scanner.scanlog import set_verbose, status

    set_verbose(False)
    monkeypatch.setattr(sys, "stderr", _Tty())
    status("a step...")
    assert sys.stderr.getvalue() == ""
