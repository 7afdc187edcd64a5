"""--verbose: log lines (standard logging, loggers under backdoorscan.) on what each step
decided; without it, and off a terminal, nothing but errors on stderr."""

from __future__ import annotations

import json
import logging
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
    names = {r.name for r in caplog.records}
    assert names == {
        "backdoorscan.scanner.pipeline", "backdoorscan.scanner.detect",
        "backdoorscan.scanner.transfer",
    }  # fmt: skip
    detect = [r.getMessage() for r in caplog.records if r.name.endswith(".detect")]
    assert [m.split(":")[0] for m in detect] == [f"class {c.label}" for c in report.classes]
    caplog.clear()
    scan(DEMO_MODEL, data=DEMO_DATA)  # INFO is off by default: nothing
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []


def test_repair_logs_each_epoch(caplog: pytest.LogCaptureFixture) -> None:
    from backdoorscan.scanner.scanlog import log_epoch

    with caplog.at_level(logging.INFO, logger="backdoorscan"):
        log_epoch(2, 20, {"epoch": 2, "clean_accuracy": 0.97125, "asr": 0.0312})
    [rec] = caplog.records
    assert rec.name == "backdoorscan.scanner.repair"
    assert rec.getMessage() == "repair epoch 2/20: clean accuracy 0.9712, attack success 0.0312"
