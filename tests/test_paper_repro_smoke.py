"""Smoke test of the paper-reproduction benchmark (``benchmarks/paper_repro.py``) on 8x8 digits.

The real run needs the MNIST and Rotten Tomatoes scenarios; here the same code (scoring,
backdoorscan end to end from files, ART's ActivationDefence when installed, the tables and the
RESULTS.md section) runs on the digits CNNs of ``conftest.py``, whose poison is known.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import art_runner, paper_repro

VARIANTS = {
    "default": ("default settings", {}),
    "size": ("size rule alone", {"rule": ("size",)}),
}


def test_prf_counts_and_undefined_cases() -> None:
    flagged = np.array([1, 1, 0, 0, 1, 0], bool)
    poison = np.array([1, 0, 1, 0, 1, 0], bool)
    m = paper_repro.prf(flagged, poison)
    assert (m["tp"], m["fp"], m["fn"], m["n_flagged"], m["n_poison"]) == (2, 1, 1, 3, 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    none = paper_repro.prf(np.zeros(4, bool), np.zeros(4, bool))  # clean class left alone
    assert none["precision"] is None and none["recall"] is None and none["f1"] is None
    assert none["accuracy"] == 1.0
    missed = paper_repro.prf(np.zeros(4, bool), np.array([1, 0, 0, 0], bool))
    assert missed["f1"] == 0.0 and missed["precision"] is None and missed["recall"] == 0.0
    false_alarm = paper_repro.prf(np.array([1, 0], bool), np.zeros(2, bool))
    assert false_alarm["f1"] == 0.0 and false_alarm["precision"] == 0.0
    with pytest.raises(ValueError):
        paper_repro.prf(np.zeros(3, bool), np.zeros(4, bool))


def test_score_per_class_and_classes_flagged() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    poison = np.array([0, 0, 0, 1, 1, 0, 0, 0], bool)
    flagged = np.array([1, 0, 0, 1, 1, 0, 0, 0], bool)
    s = paper_repro.score(flagged, poison, labels)
    assert s["classes_flagged"] == [0, 1]
    by = {pc["label"]: pc for pc in s["per_class"]}
    assert by[1]["f1"] == 1.0 and by[0]["fp"] == 1 and by[0]["f1"] == 0.0
    assert by[2]["n_flagged"] == 0 and by[2]["f1"] is None
    assert s["overall"]["precision"] == pytest.approx(2 / 3) and s["overall"]["recall"] == 1.0


def test_replace_section_keeps_other_sections() -> None:
    text = "# R\n\n## Kernels\nk table\n\n## Paper reproduction\nold\n\n## Later\nx\n"
    out = paper_repro.replace_section(text, "## Paper reproduction", "## Paper reproduction\nnew")
    assert "old" not in out and "## Paper reproduction\nnew\n" in out
    assert out.startswith("# R\n\n## Kernels\nk table\n\n") and out.endswith("## Later\nx\n")
    appended = paper_repro.replace_section("# R\n", "## Paper reproduction", "## Paper X\nb")
    assert appended == "# R\n\n## Paper X\nb\n"


def test_documented_rule_reapplied_on_a_clustering() -> None:
    y = np.array([0] * 10 + [1] * 10)
    clusters = [np.array([0] * 9 + [1]), np.array([0] * 5 + [1] * 5)]
    rng = np.random.default_rng(0)
    reduced = [rng.normal(size=(10, 2)) + 5 * c[:, None] for c in clusters]
    flags = art_runner.documented_rule("relative-size", clusters, reduced, y)
    assert flags.tolist() == [False] * 9 + [True] + [False] * 10  # only the 10 % cluster
    smaller = art_runner.documented_rule("smaller", clusters, reduced, y)
    assert smaller[:10].sum() == 1 and smaller[10:].sum() == 5  # every class gives one up


def _scenario(root: Path, name: str, case: dict) -> None:
    """A scenario folder in the benchmark's layout from a conftest digits case."""
    folder = root / name
    folder.mkdir()
    (folder / "model.onnx").write_bytes(case["model"].read_bytes())
    np.savez(folder / "train.npz", x=case["x"], y=case["y"], poison=case["poison"])
    meta = {"clean_accuracy": 0.9, "attack_success_rate": 0.5}
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def digits_root(
    tmp_path_factory: pytest.TempPathFactory, poisoned_digits: dict, clean_digits: dict
) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("repro")
    _scenario(root, "digits_poisoned", poisoned_digits)
    _scenario(root, "digits_clean", clean_digits)
    models = {"digits_poisoned": poisoned_digits, "digits_clean": clean_digits}
    return root, models


def _run(digits_root: tuple[Path, dict], detectors: set[str], names: list[str]) -> dict:
    root, models = digits_root
    return paper_repro.run(
        names,
        root,
        detectors,
        log=lambda _line: None,
        variants=VARIANTS,
        art_configs=(("default", "PCA"), ("penultimate", "PCA")),
        model_loader=lambda folder: models[folder.name]["torch_model"],
        clean=("digits_clean",),
        goals={"digits_poisoned": 0.9},
        warm=False,  # the kernels' warm-up scan is for timings; nothing is timed here
    )


def test_backdoorscan_path_scores_and_renders(digits_root: tuple[Path, dict]) -> None:
    results = _run(digits_root, {"bds"}, ["digits_poisoned", "digits_clean"])
    poisoned = results["scenarios"]["digits_poisoned"]["detectors"]
    clean = results["scenarios"]["digits_clean"]["detectors"]
    d = poisoned["bds:default"]
    # The scores are the report's flags against the poison mask: 50 triggered 7s labelled 1.
    assert d["overall"]["n_poison"] == 50 and d["verdict_classes"] == [1]
    assert d["classes_flagged"] == [1] and d["overall"]["f1"] >= 0.95
    assert d["sources"] == {"1": 7}
    assert d["overall"]["tp"] + d["overall"]["fn"] == 50 and d["time_s"] > 0
    assert clean["bds:default"]["classes_flagged"] == []
    assert len(clean["bds:size"]["classes_flagged"]) >= 3  # the size rule alone: false alarms
    section = paper_repro.render_section(results)
    assert section.startswith(paper_repro.SECTION)
    assert "| digits_poisoned | 1847 / 50 |" in section
    assert "- digits_poisoned: F1 >= 0.9: **met**" in section
    assert "- digits_clean: no class flagged: **met**" in section
    docs = paper_repro.render_docs(results)
    assert "digits_clean" in docs and "RESULTS.md" in docs
    # One fresh process per scan: the command line itself, timed from outside.
    sc = paper_repro.Scenario.load(digits_root[0] / "digits_poisoned")
    cold = paper_repro.cold_runs(sc, None, 1)
    assert "error" not in cold, cold
    assert len(cold["bds_wall"]) == 1 and cold["bds_wall"][0] > 0 and cold["bds_cpu"][0] > 0


def test_art_path(digits_root: tuple[Path, dict]) -> None:
    if not art_runner.art_available():
        pytest.skip("IBM ART not installed (pip install adversarial-robustness-toolbox)")
    results = _run(digits_root, {"art"}, ["digits_poisoned"])
    dets = results["scenarios"]["digits_poisoned"]["detectors"]
    for layer in ("default", "penultimate"):
        for analysis in art_runner.ANALYSES:
            cell = dets[f"art:{layer}:PCA:{analysis}"]
            assert ("overall" in cell) != ("error" in cell)  # a score, or ART's error recorded
            assert cell.get("error", "error: ").startswith("error: ")
        for analysis in ("relative-size", "silhouette-scores"):
            assert "overall" in dets[f"art:{layer}:PCA:{analysis}:reapplied"]
    pen = dets["art:penultimate:PCA:smaller"]
    assert pen["config"]["dims"] == 64 and pen["config"]["reduced"]  # the 64-unit ReLU
    logits = dets["art:default:PCA:smaller"]["config"]
    assert logits["dims"] == 10 and not logits["reduced"]  # ART's default layer: the logits
    # ART's "smaller" gives up the smaller cluster of every class.
    assert len(pen["classes_flagged"]) == 10
    # The documented size rule keeps only clusters under 35 % of their class.
    sc = paper_repro.Scenario.load(digits_root[0] / "digits_poisoned")
    reapplied = dets["art:penultimate:PCA:relative-size:reapplied"]
    for pc in reapplied["per_class"]:
        assert pc["n_flagged"] < 0.35 * pc["n"] + 1
    best = paper_repro.best_art(dets, clean=False)
    assert best is not None
    # The alternated timing runs: both sides end to end, and the headline then uses them.
    case = digits_root[1]["digits_poisoned"]
    timing = paper_repro.timing_runs(sc, best, 1, model_loader=lambda _f: case["torch_model"])
    assert len(timing["bds_wall"]) == len(timing["art_cpu"]) == 1 and timing["art_wall"][0] > 0
    entry = results["scenarios"]["digits_poisoned"] | {"detectors": {**dets}, "timing": timing}
    entry["detectors"]["bds:default"] = {"time_s": 99.0}
    assert paper_repro.compared_times(entry, best)[0] == timing["bds_wall"][0]
    assert "ART penultimate/PCA" in paper_repro.render_section(results)
    # Seeded globally, ART's unseeded FastICA/k-means repeat themselves: a second run agrees.
    again = art_runner.run_art(
        case["torch_model"],
        case["x"],
        sc.y,
        layer="penultimate",
        reduce="PCA",
        analyses=("smaller",),
    )
    assert paper_repro.score(again["cells"]["smaller"]["flagged"], sc.poison, sc.y) == {
        k: pen[k] for k in ("overall", "per_class", "classes_flagged")
    }
