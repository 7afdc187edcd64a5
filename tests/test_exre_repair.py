"""Exclusionary reclassification and repair on 8x8 digits CNNs where the truth is known.

A CNN trained on digits with 50 triggered 7s labelled 1 (a held-out split gives clean and
triggered test sets); the session's clean digits CNN; and the verdict rules on small reports.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent))

import digits_models as dm  # noqa: E402

import backdoorscan  # noqa: E402
from backdoorscan.cli import main  # noqa: E402
from backdoorscan.scanner.exre import (  # noqa: E402
    ExreConfig,
    cluster_outcome,
    combine,
    suspicious_clusters,
)
from backdoorscan.scanner.repair import exit_code, plan_repair  # noqa: E402
from backdoorscan.scanner.report import (  # noqa: E402
    ClassResult,
    ExreOutcome,
    ExreResult,
    RepairResult,
    Report,
)

# Digits are small: ExRe retrains from scratch at a higher rate, in batches of 64.
EXRE = {"batch_size": 64, "lr": 3e-3}
# One k per class keeps the scans short; the poison is still found (k = 2 is the paper's).
CONFIG = backdoorscan.DetectConfig(n_clusters=2)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> object:
    """One torch thread: steadier than two on a shared 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield None
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Poisoned digits split into train / held-out test; the CNN trained on the train part."""
    x, y, poison = dm.digits_data(50, seed=0)
    rng = np.random.default_rng(1)
    test = np.sort(rng.choice(np.flatnonzero(~poison), size=300, replace=False))
    train = np.setdiff1d(np.arange(len(y)), test)
    model = dm.train(dm.make_cnn(), x[train], y[train], epochs=15, seed=0)
    folder = tmp_path_factory.mktemp("exre")
    xt, yt = x[test], y[test]
    np.savez(folder / "test.npz", x=xt, y=yt)
    sevens = yt == dm.SOURCE
    np.savez(folder / "trigger.npz", x=dm.stamp(xt[sevens]), y=yt[sevens])
    np.savez(folder / "train.npz", x=x[train], y=y[train])
    (folder / "model.onnx").write_bytes(dm.to_onnx_bytes(model))
    return {
        "dir": folder,
        "model": model,
        "x": x[train],
        "y": y[train],
        "poison": poison[train],
    }


@pytest.fixture(scope="module")
def report(case: dict) -> Report:
    """The poisoned model scanned with both ExRe methods."""
    return backdoorscan.scan(
        case["model"],
        case["x"],
        case["y"],
        config=CONFIG,
        exre=ExreConfig(method="both", **EXRE),
    )


def test_exre_confirms_the_poisoned_class(report: Report, case: dict) -> None:
    assert report.poisoned_classes == [dm.TARGET]
    target = next(c for c in report.classes if c.label == dm.TARGET)
    full = target.exre["full"]
    # Retrained from scratch without the poison, the model no longer calls it 1.
    assert full.verdict == "poison" and full.own_share < 0.3
    assert full.ratio < 1.0 and full.n == target.n_flagged
    assert target.exre_decided_by == "full" and target.votes["exre"] is True
    assert "confirmed by ExRe full" in target.reason
    # The transfer test's source (the 7s) is kept; the probe's figures are reported beside.
    assert target.suspected_source == dm.SOURCE
    assert {"own_share", "source", "ratio", "verdict"} <= set(vars(target.exre["probe"]))
    info = report.exre.runs["full"]
    assert info["init"] == "scratch" and not info["undertrained"]
    assert info["kept_accuracy"] > 0.9
    flagged = report.flagged_indices
    assert report.exre.predictions is not None
    assert (report.exre.predictions[flagged] != dm.TARGET).mean() > 0.7
    assert "exclusionary reclassification" in report.to_text()
    assert report.to_dict()["exre"]["methods"] == ["full", "probe"]


def test_clean_model_with_exre_stays_clean() -> None:
    x, y, _ = dm.digits_data(0, seed=1)
    model = dm.train(dm.make_cnn(), x, y, epochs=15, seed=1)
    result = backdoorscan.scan(model, x, y, config=CONFIG, exre=ExreConfig(method="full", **EXRE))
    assert result.verdict == "clean" and result.exit_code == 0
    assert len(result.flagged_indices) == 0
    # ExRe looked at the best candidate of every class.
    assert sum(1 for c in result.classes if c.exre) == 10
    assert not result.exre.runs["full"]["undertrained"]


def test_repair_relabels_and_removes_the_backdoor(case: dict, report: Report) -> None:
    out = case["dir"] / "repaired.pt"
    original = {k: v.clone() for k, v in case["model"].state_dict().items()}
    result = backdoorscan.repair(
        case["model"],
        case["x"],
        case["y"],
        report=report,
        output=out,
        epochs=5,
        lr=3e-3,
        train_batch_size=64,
        test=case["dir"] / "test.npz",
        trigger_test=case["dir"] / "trigger.npz",
    )
    info = result.repair
    assert info.mode == "retrained"
    n_flagged = next(c.n_flagged for c in report.classes if c.label == dm.TARGET)
    assert info.per_class[dm.TARGET]["to"] == {dm.SOURCE: n_flagged}
    assert result.verdict == "clean" and exit_code(result) == 0
    before, after = info.metrics["before"], info.metrics["after"]
    # Triggered held-out 7s: the poisoned model sends most to 1, the repaired one few.
    assert before["asr_per_class"][dm.TARGET] > 0.5
    assert after["asr_per_class"][dm.TARGET] < 0.1
    assert after["asr"] < before["asr"]
    assert after["clean_accuracy"] >= before["clean_accuracy"] - 0.02
    assert info.before["poisoned_classes"] == [dm.TARGET]
    assert "attack success rate" in result.to_text()
    state = torch.load(out, weights_only=True)
    assert set(state) == set(original)
    assert any(not torch.equal(state[k], original[k]) for k in original)
    # The caller's in-memory model is left as it was.
    assert all(torch.equal(v, original[k]) for k, v in case["model"].state_dict().items())
    import onnxruntime as ort

    session = ort.InferenceSession(str(out.with_suffix(".onnx")))
    assert {o.name for o in session.get_outputs()} >= {"logits", "features"}


def test_bare_onnx_repair_writes_the_cleaned_data(case: dict, capsys) -> None:
    out = case["dir"] / "cleaned.npz"
    argv = ["repair", str(case["dir"] / "model.onnx"), "--data", str(case["dir"] / "train.npz")]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--clusters", "2", "--exre", "probe", "-o", str(out)])
    assert exc.value.code == 0
    assert "cannot be retrained" in capsys.readouterr().out
    with np.load(out) as cleaned:
        x, y, changed = cleaned["x"], cleaned["y"], cleaned["changed"]
        removed, index = cleaned["removed"], cleaned["original_index"]
    assert len(x) == len(y) == len(index) == len(case["y"]) - len(removed)
    poison = np.flatnonzero(case["poison"])
    assert len(np.intersect1d(changed, poison)) >= 0.95 * len(poison)
    assert len(np.setdiff1d(changed, poison)) <= 0.05 * len(poison)
    kept = np.isin(index, poison)
    assert (y[kept] == dm.SOURCE).mean() > 0.95 and np.array_equal(x, case["x"][index])


def test_scan_cli_bare_exre_on_onnx_runs_the_probe(case: dict) -> None:
    import json

    out = case["dir"] / "report.json"
    argv = ["scan", str(case["dir"] / "model.onnx"), "--data", str(case["dir"] / "train.npz")]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--exre", "--clusters", "2", "--format", "json", "-q", "-o", str(out)])
    assert exc.value.code == 1
    doc = json.loads(out.read_text())
    # A bare ONNX model cannot be retrained: a bare --exre runs the probe on the input sketch.
    assert doc["exre"]["methods"] == ["probe"] and doc["exre"]["probe"]["space"] == "input"
    target = next(c for c in doc["classes"] if c["label"] == dm.TARGET)
    assert target["verdict"] == "poisoned" and target["exre"]["probe"]["verdict"] == "poison"
    assert target["exre"]["probe"]["source"] == dm.SOURCE


def test_nothing_to_repair_on_a_clean_report(case: dict) -> None:
    clean = _report(["clean"] * 3, rule=("transfer",))
    out = case["dir"] / "untouched.pt"
    result = backdoorscan.repair(case["model"], case["x"], case["y"], report=clean, output=out)
    assert result.repair.mode == "clean" and exit_code(result) == 0
    assert not out.exists()


# -- the rules, on small reports -------------------------------------------------------------


def _report(verdicts: list[str], rule: tuple[str, ...], n: int = 10) -> Report:
    """Classes 0..k-1 with ``n`` samples each; the first 3 of each class are its candidate."""
    labels = np.repeat(np.arange(len(verdicts)), n)
    scores = np.zeros(len(labels))
    classes = []
    for c, verdict in enumerate(verdicts):
        idx = np.flatnonzero(labels == c)[:3]
        scores[idx] = 0.8
        classes.append(
            ClassResult(
                c,
                n,
                verdict,
                cluster_sizes=[3, n - 3],
                suspicious_cluster=0,
                transfer=0.9 if "transfer" in rule else None,
                votes={"size": True, "separation": verdict == "poisoned"},
                n_flagged=3 if verdict == "poisoned" else 0,
                suspected_source=(c + 1) % len(verdicts) if verdict == "poisoned" else None,
                members=idx,
            )
        )
    report = Report(
        tool_version="test",
        settings={"rule_applied": list(rule)},
        classes=classes,
        flagged_indices=np.zeros(0, dtype=np.int64),
        scores=scores,
    )
    report.flag_members()
    return report


def _outcome(verdict: str, source: int = 2, source_share: float | None = None) -> ExreOutcome:
    own = 0.1 if verdict == "poison" else 0.9
    share = 1 - own if source_share is None else source_share
    return ExreOutcome(3, own, source, share, own / (1 - own), verdict)


def test_cluster_outcome_figures() -> None:
    out = cluster_outcome(np.array([2, 2, 2, 1, 0]), label=1, threshold=1.0, num_classes=3)
    assert out.source == 2 and out.own_share == pytest.approx(0.2)
    assert out.ratio == pytest.approx(0.2 / 0.6) and out.verdict == "poison"
    legit = cluster_outcome(np.array([1, 1, 1, 2]), label=1, threshold=1.0, num_classes=3)
    assert legit.verdict == "legitimate" and legit.ratio == pytest.approx(3.0)
    alone = cluster_outcome(np.array([1, 1]), label=1, threshold=1.0, num_classes=3)
    assert alone.source is None and alone.verdict == "legitimate"


def test_suspicious_clusters_from_the_report() -> None:
    rep = _report(["poisoned", "clean", "skipped"], rule=("transfer",))
    rep.classes[2].suspicious_cluster = None
    labels = np.repeat(np.arange(3), 10)
    got = suspicious_clusters(rep, labels)
    assert list(got[0]) == [0, 1, 2] and list(got[1]) == [10, 11, 12] and 2 not in got
    assert list(suspicious_clusters(rep, labels, include_unflagged=False)) == [0]


def test_exre_never_overturns_the_transfer_test() -> None:
    rep = _report(["poisoned", "clean"], rule=("transfer",))
    labels = np.repeat(np.arange(2), 10)
    results = {"full": {0: _outcome("legitimate"), 1: _outcome("poison")}}
    combine(rep, results, ExreConfig(), labels)
    assert [c.verdict for c in rep.classes] == ["poisoned", "clean"]
    assert "disagrees" in rep.classes[0].reason and rep.classes[1].votes["exre"] is True
    assert list(rep.flagged_indices) == [0, 1, 2]


def test_exre_takes_the_place_of_the_size_vote() -> None:
    rep = _report(["clean", "poisoned", "clean"], rule=("size", "separation"))
    labels = np.repeat(np.arange(3), 10)
    # Class 0: a cluster too large for the size rule but apart; ExRe calls it poison.
    rep.classes[0].votes = {"size": False, "separation": True}
    # Class 1: flagged by size and separation; ExRe calls it legitimate.
    # Class 2: ExRe calls it poison, but it is not apart: the other votes still count.
    results = {"full": {0: _outcome("poison", 2), 1: _outcome("legitimate"), 2: _outcome("poison")}}
    combine(rep, results, ExreConfig(), labels)
    assert [c.verdict for c in rep.classes] == ["poisoned", "clean", "clean"]
    assert rep.classes[0].suspected_source == 2 and rep.classes[0].n_flagged == 3
    assert list(rep.flagged_indices) == [0, 1, 2]
    assert rep.classes[1].suspected_source is None


def test_inconclusive_exre_changes_nothing() -> None:
    rep = _report(["poisoned", "clean"], rule=("size", "separation"))
    labels = np.repeat(np.arange(2), 10)
    results = {"full": {0: _outcome("inconclusive"), 1: _outcome("inconclusive")}}
    combine(rep, results, ExreConfig(), labels)
    assert [c.verdict for c in rep.classes] == ["poisoned", "clean"]
    assert "inconclusive" in rep.classes[0].reason


def test_plan_repair_per_sample_and_without_source() -> None:
    rep = _report(["poisoned", "poisoned", "clean"], rule=("transfer",))
    labels = np.repeat(np.arange(3), 10)
    # Class 0: ExRe full found no dominant source: per-sample labels, own-label ones removed.
    rep.classes[0].exre = {"full": _outcome("poison", source_share=0.3)}
    predictions = np.full(30, -1)
    predictions[[0, 1, 2]] = [2, 1, 0]
    rep.exre = ExreResult(["full"], 1.0, True, 0.6, {0: 3}, predictions=predictions)
    # Class 1: no suspected source: removed.
    rep.classes[1].suspected_source = None
    plan = plan_repair(rep, labels, "relabel")
    assert list(plan.labels[:3]) == [2, 1, -1]
    assert list(plan.labels[10:13]) == [-1, -1, -1]
    assert list(plan.changed) == [0, 1] and list(plan.removed) == [2, 10, 11, 12]
    assert any("no suspected source" in note for note in plan.notes)
    removed = plan_repair(rep, labels, "remove")
    assert list(removed.removed) == [0, 1, 2, 10, 11, 12] and len(removed.changed) == 0


def test_repair_exit_codes() -> None:
    still = _report(["poisoned"], rule=("transfer",))
    still.repair = RepairResult("relabel", "retrained", "")
    assert exit_code(still) == 1
    still.repair = RepairResult("relabel", "data", "")
    assert exit_code(still) == 0
    nothing = _report(["skipped"], rule=("transfer",))
    nothing.repair = RepairResult("relabel", "nothing scanned", "")
    assert exit_code(nothing) == 3
    clean = _report(["clean"], rule=("transfer",))
    clean.repair = RepairResult("relabel", "failed", "repair failed: ...")
    assert exit_code(clean) == 1
