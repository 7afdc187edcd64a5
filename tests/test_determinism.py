"""Same inputs and seed, same report: byte-identical JSON across processes (timings, time
and command line aside)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from backdoorscan import detect

DEMO = Path(__file__).resolve().parents[1] / "backdoorscan" / "data"


def _without_timings(text: str) -> str:
    """The report's text with its ``timings_s`` and ``invocation`` (time, command line)
    blocks cut out, every other byte kept."""
    for block in ("timings_s", "invocation"):
        text, n = re.subn(rf'\n  "{block}": \{{[^{{}}]*\}},', "", text)
        assert n == 1, f"no {block} block found"
    return text


def test_two_processes_write_the_same_report(tmp_path: Path) -> None:
    """The demo scanned in two fresh interpreters, with different hash seeds (so that no
    result depends on set or dict ordering of strings): identical reports."""
    procs, outs = [], []
    for i, hash_seed in enumerate(("1", "2")):
        out = tmp_path / f"report{i}.json"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        args = [sys.executable, "-m", "backdoorscan.cli", "scan", DEMO / "demo.onnx"]
        args += ["--data", DEMO / "demo.npz", "--seed", "7", "--format", "json", "-o", out, "-q"]
        procs.append(subprocess.Popen(args, env=env, stderr=subprocess.PIPE))
        outs.append(out)
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err.decode()  # the demo's backdoor is found
    first, second = (p.read_text() for p in outs)
    doc = json.loads(first)
    assert doc["settings"]["seed"] == 7 and doc["n_flagged"] > 0
    assert len(doc["scores"]) == doc["data"]["n_samples"]
    assert _without_timings(first) == _without_timings(second)


def test_detect_is_a_function_of_its_inputs_and_seed() -> None:
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(400, 12)).astype(np.float32)
    labels = rng.integers(0, 4, 400)
    poisoned = np.flatnonzero(labels == 1)[:25]
    feats[poisoned] += 8.0  # a small, far-off cluster in class 1
    a = detect(feats, labels, seed=11)
    b = detect(feats.copy(), labels.copy(), seed=11)
    assert _without_timings(a.to_json()) == _without_timings(b.to_json())
    assert set(poisoned) <= set(a.flagged_indices.tolist())  # the planted cluster is found
