"""Paper reproduction: backdoorscan against IBM ART's ActivationDefence on the built scenarios.

For each scenario under ``benchmarks/.data/scenarios/`` (see ``benchmarks/README.md``) this runs,
in one process and one after the other:

- backdoorscan end to end from the ONNX file (``scan(dir/'model.onnx', data=dir/'train.npz')``),
  with its default settings and with single analyses (``size``, ``separation``, ``transfer`` ...);
- ART's ActivationDefence on the same PyTorch weights, at its default layer (the last registered
  module: the logits here) and at the penultimate layer, with PCA and FastICA (10 dims, k=2),
  and its four cluster analyses (see ``benchmarks/art_runner.py``);

and scores the flagged samples against the known poison (accuracy, precision, recall, F1, overall
and per class; classes flagged on clean models), beside each detector's wall time.

Usage::

    nice python benchmarks/paper_repro.py run --write    # everything; rewrites the tables
    python benchmarks/paper_repro.py run --only rt_text --detectors bds   # a quick look
    python benchmarks/paper_repro.py render --write      # tables again from the saved JSON

``--write`` replaces the "## Paper reproduction" section of ``benchmarks/RESULTS.md`` (other
sections are kept) and writes ``docs/results.md``. Raw results go to
``benchmarks/.work/paper_repro.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import art_runner

ROOT = Path(__file__).resolve().parents[1]
SCENARIO_ROOT = ROOT / "benchmarks" / ".data" / "scenarios"
JSON_PATH = ROOT / "benchmarks" / ".work" / "paper_repro.json"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
DOCS_MD = ROOT / "docs" / "results.md"
SECTION = "## Paper reproduction"
SCENARIOS = (
    "mnist_l2l1_10",
    "mnist_l2l1_15",
    "mnist_l2l1_33",
    "mnist_all2one",
    "mnist_multimodal",
    "rt_text",
    "mnist_clean",
    "rt_clean",
)
# The targets for backdoorscan's default: F1 at least this much, or no class flagged.
TARGET_F1 = {
    "mnist_l2l1_10": 0.98,
    "mnist_l2l1_15": 0.98,
    "mnist_l2l1_33": 0.98,
    "mnist_multimodal": 0.98,
    "rt_text": 0.98,
    "mnist_all2one": 0.95,
}
CLEAN_SCENARIOS = ("mnist_clean", "rt_clean")


# --------------------------------------------------------------------------------------------
# Metrics


def prf(flagged: np.ndarray, poison: np.ndarray) -> dict[str, Any]:
    """Counts, accuracy, precision, recall and F1 of ``flagged`` against the ``poison`` mask.

    Precision is None when nothing is flagged, recall None when there is no poison, and F1
    (``2tp / (2tp + fp + fn)``) None when there is neither; so a clean class left alone is
    not scored as a success or a failure, only its false flags count.
    """
    flagged = np.asarray(flagged, dtype=bool)
    poison = np.asarray(poison, dtype=bool)
    if flagged.shape != poison.shape:
        raise ValueError(f"flags {flagged.shape} and poison mask {poison.shape} differ")
    tp = int(np.sum(flagged & poison))
    fp = int(np.sum(flagged & ~poison))
    fn = int(np.sum(~flagged & poison))
    n = len(poison)
    denom = 2 * tp + fp + fn
    return {
        "n": n,
        "n_poison": int(poison.sum()),
        "n_flagged": int(flagged.sum()),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "accuracy": (n - fp - fn) / n if n else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "f1": 2 * tp / denom if denom else None,
    }


def score(flagged: np.ndarray, poison: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Overall and per-class scores of a detector's flags, and the classes it flagged."""
    labels = np.asarray(labels)
    flagged = np.asarray(flagged, dtype=bool)
    per_class = []
    for c in np.unique(labels):
        m = labels == c
        per_class.append({"label": int(c), **prf(flagged[m], poison[m])})
    return {
        "overall": prf(flagged, poison),
        "per_class": per_class,
        "classes_flagged": [pc["label"] for pc in per_class if pc["n_flagged"]],
    }


# --------------------------------------------------------------------------------------------
# Detectors


@dataclass
class Scenario:
    """One built scenario's data and truth, loaded once for every detector."""

    name: str
    folder: Path
    y: np.ndarray
    poison: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: Path) -> Scenario:
        """Labels, poison mask and meta.json of a scenario folder (not the inputs)."""
        with np.load(folder / "train.npz", allow_pickle=False) as z:
            y, poison = z["y"].astype(np.int64), z["poison"].astype(bool)
        meta = json.loads((folder / "meta.json").read_text())
        return cls(folder.name, folder, y, poison, meta)


# name -> (description, DetectConfig overrides). Fields not given keep backdoorscan's defaults.
BDS_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("default settings", {}),
    "transfer-pca": ("transfer rule, PCA only", {"rule": ("transfer",), "reduce": "pca"}),
    "transfer-ica": ("transfer rule, ICA only", {"rule": ("transfer",), "reduce": "ica"}),
    "size-ica-k2": (
        "paper: ICA 10 dims, k=2, size < 0.35",
        {"rule": ("size",), "reduce": "ica", "n_clusters": 2},
    ),
    "size": ("size rule alone", {"rule": ("size",)}),
    "separation": ("separation rule alone", {"rule": ("separation",)}),
    "size+separation": ("size and separation", {"rule": ("size", "separation")}),
}
ART_CONFIGS: tuple[tuple[str, str], ...] = (
    ("default", "PCA"),  # ART's defaults (its class default reduce is PCA)
    ("penultimate", "FastICA"),  # the paper's setting
    ("penultimate", "PCA"),
)


def run_backdoorscan(
    model: Path,
    data: Path,
    sc: Scenario,
    overrides: dict[str, Any],
    seed: int = 0,
) -> dict[str, Any]:
    """One backdoorscan scan end to end from the files, timed, scored against the poison."""
    import backdoorscan
    from backdoorscan.scanner.config import DetectConfig

    try:
        cfg = DetectConfig(**{"seed": seed, **overrides})
    except (TypeError, ValueError) as exc:
        return {"error": f"error: {type(exc).__name__}: {exc}"}
    t = time.perf_counter()
    try:
        report = backdoorscan.scan(model, data=data, config=cfg)
    except Exception as exc:  # a failing variant is a result, not the end of the run
        return {"error": f"error: {type(exc).__name__}: {exc}", "time_s": time.perf_counter() - t}
    elapsed = time.perf_counter() - t
    out = score(report.is_flagged(), sc.poison, sc.y)
    out |= {
        "time_s": elapsed,
        "timings": {k: float(v) for k, v in report.timings.items()},
        "verdict_classes": list(report.poisoned_classes),
        "sources": {
            str(c.label): c.suspected_source for c in report.classes if c.verdict == "poisoned"
        },
        "settings": _jsonable(report.settings),
    }
    return out


def warm_up(folder: Path, n: int = 1500) -> float:
    """Scan a slice of a scenario once, so that the timed scans find the Numba kernels loaded
    (from the on-disk cache, or compiled) and ONNX Runtime initialised; returns its seconds."""
    import backdoorscan

    with np.load(folder / "train.npz", allow_pickle=False) as z:
        x, y = z["x"][:n], z["y"][:n]
    t = time.perf_counter()
    backdoorscan.scan(folder / "model.onnx", x, y)
    return time.perf_counter() - t


def run_art_configs(
    sc: Scenario,
    seed: int = 0,
    configs: tuple[tuple[str, str], ...] = ART_CONFIGS,
    model_loader: Callable[[Path], Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every ART configuration on a scenario; one result per (layer, reduction, analysis).

    ``model_loader(folder)`` rebuilds the PyTorch model (default: ``scenarios.load_model``,
    which loads the state dict with ``weights_only=True``).
    """
    if model_loader is None:
        from benchmarks.scenarios import load_model as model_loader

    results: dict[str, dict[str, Any]] = {}
    for layer, reduce in configs:
        t = time.perf_counter()
        with np.load(sc.folder / "train.npz", allow_pickle=False) as z:
            x = z["x"]
        model = model_loader(sc.folder)
        load_s = time.perf_counter() - t
        try:
            res = art_runner.run_art(model, x, sc.y, layer=layer, reduce=reduce, seed=seed)
        except Exception as exc:
            results[f"art:{layer}:{reduce}"] = {
                "error": f"error: {type(exc).__name__}: {exc}",
                "config": {"layer": layer, "reduce": reduce},
            }
            continue
        finally:
            del x
        base_time = load_s + res["time_s"]
        common = {
            "layer": layer,
            "layer_name": res["layer_name"],
            "reduce": reduce,
            "dims": res["dims"],
            "reduced": res["reduced"],
            "activation_s": res["activation_s"],
            "load_s": load_s,
        }
        for analysis, cell in res["cells"].items():
            key = f"art:{layer}:{reduce}:{analysis}"
            entry: dict[str, Any] = {
                "config": {**common, "analysis": analysis},
                "time_s": base_time + cell.get("extra_s", 0.0),
            }
            if "error" in cell:
                entry["error"] = cell["error"]
            else:
                entry |= score(cell["flagged"], sc.poison, sc.y)
            results[key] = entry
        for analysis, flags in res["reapplied"].items():
            key = f"art:{layer}:{reduce}:{analysis}:reapplied"
            results[key] = {
                "config": {**common, "analysis": analysis, "reapplied": True},
                "time_s": base_time,
                **score(flags, sc.poison, sc.y),
            }
    return results


def art_options(art_key: str) -> dict[str, Any]:
    """``run_art`` keywords that reproduce one ART result key: ``art:LAYER:REDUCE:ANALYSIS``
    (ART's own analysis), or with ``:reapplied`` (the documented rule re-applied to the
    clustering of a ``smaller`` run)."""
    _, layer, reduce, analysis, *rest = art_key.split(":")
    analyses, reapply = ((analysis,), ()) if not rest else (("smaller",), (analysis,))
    return {"layer": layer, "reduce": reduce, "analyses": analyses, "reapply": reapply}


def timing_runs(
    sc: Scenario,
    art_key: str | None,
    repeats: int,
    seed: int = 0,
    model_loader: Callable[[Path], Any] | None = None,
) -> dict[str, Any]:
    """Wall and CPU seconds of backdoorscan's default and of one ART result, alternated
    ``repeats`` times, each end to end from the files (the load of a shared machine drifts;
    alternating and taking medians keeps the two comparable). CPU time is the process's,
    all threads."""
    import backdoorscan

    if model_loader is None:
        from benchmarks.scenarios import load_model as model_loader
    out: dict[str, Any] = {"art_key": art_key, "repeats": repeats}
    for side in ("bds", "art"):
        out[f"{side}_wall"], out[f"{side}_cpu"] = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        backdoorscan.scan(sc.folder / "model.onnx", data=sc.folder / "train.npz")
        out["bds_wall"].append(time.perf_counter() - w)
        out["bds_cpu"].append(time.process_time() - c)
        if art_key is None:
            continue
        w, c = time.perf_counter(), time.process_time()
        with np.load(sc.folder / "train.npz", allow_pickle=False) as z:
            x = z["x"]
        art_runner.run_art(model_loader(sc.folder), x, sc.y, seed=seed, **art_options(art_key))
        out["art_wall"].append(time.perf_counter() - w)
        out["art_cpu"].append(time.process_time() - c)
        del x
    return out


_ART_COLD = """
import sys, numpy as np, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
from benchmarks import art_runner
from benchmarks.scenarios import load_model
folder = {folder!r}
with np.load(folder + "/train.npz", allow_pickle=False) as z:
    x, y = z["x"], z["y"]
art_runner.run_art(load_model(folder), x, y, seed={seed}, **{options!r})
"""


def cold_runs(sc: Scenario, art_key: str | None, repeats: int, seed: int = 0) -> dict[str, Any]:
    """Wall and CPU seconds of one fresh process per scan, alternated ``repeats`` times: the
    command line (``backdoorscan scan model.onnx --data train.npz``) against a script that
    imports ART and runs ``art_key``'s configuration on the same files. What a reviewer or a CI
    job pays for one scan: interpreter start, imports, loading, first calls (Numba kernels come
    from their on-disk cache, as after an install or in the container image)."""
    import resource

    def timed(cmd: list[str]) -> tuple[float, float, int]:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        w = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        wall = time.perf_counter() - w
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return wall, cpu, proc.returncode

    out: dict[str, Any] = {"art_key": art_key, "repeats": repeats}
    for side in ("bds", "art"):
        out[f"{side}_wall"], out[f"{side}_cpu"] = [], []
    with tempfile.TemporaryDirectory() as tmp:
        ours = [sys.executable, "-m", "backdoorscan.cli", "scan", str(sc.folder / "model.onnx")]
        ours += ["--data", str(sc.folder / "train.npz"), "-q", "--format", "json"]
        ours += ["-o", str(Path(tmp) / "report.json"), "--seed", str(seed)]
        art_cmd = None
        if art_key is not None:
            script = _ART_COLD.format(
                root=str(ROOT),
                threads=min(2, os.cpu_count() or 1),
                folder=str(sc.folder),
                seed=seed,
                options=art_options(art_key),
            )
            art_cmd = [sys.executable, "-c", script]
        for _ in range(repeats):
            wall, cpu, code = timed(ours)
            if code not in (0, 1):
                out["error"] = f"backdoorscan exited {code}"
                return out
            out["bds_wall"].append(wall)
            out["bds_cpu"].append(cpu)
            if art_cmd is None:
                continue
            wall, cpu, code = timed(art_cmd)
            if code != 0:
                out["error"] = f"the ART script exited {code}"
                return out
            out["art_wall"].append(wall)
            out["art_cpu"].append(cpu)
    return out


def _jsonable(value: Any) -> Any:
    """Tuples, numpy scalars and arrays made JSON-safe."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# --------------------------------------------------------------------------------------------
# Running


def environment() -> dict[str, Any]:
    """Machine, versions, date and commit, for the results section."""
    import numba
    import onnxruntime
    import sklearn
    import torch

    import backdoorscan

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit, dirty = "", ""
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "versions": {
            "backdoorscan": backdoorscan.__version__,
            "art": art_runner.art_version(),
            "numpy": np.__version__,
            "numba": numba.__version__,
            "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__,
            "scikit-learn": sklearn.__version__,
        },
        "torch_threads": torch.get_num_threads(),
        "commit": commit + (" + uncommitted changes" if dirty else ""),
    }


def run(
    names: list[str],
    root: Path,
    detectors: set[str],
    seed: int = 0,
    log: Callable[[str], None] = print,
    *,
    variants: dict[str, tuple[str, dict[str, Any]]] | None = None,
    art_configs: tuple[tuple[str, str], ...] = ART_CONFIGS,
    model_loader: Callable[[Path], Any] | None = None,
    clean: tuple[str, ...] = CLEAN_SCENARIOS,
    goals: dict[str, float] | None = None,
    warm: bool = True,
    repeats: int = 0,
    cold: bool = True,
) -> dict[str, Any]:
    """Run the chosen detector families (``bds``, ``art``) on the scenarios; the results dict.

    ``variants`` (default :data:`BDS_VARIANTS`) and ``art_configs`` pick the configurations;
    ``clean`` names the scenarios whose model is clean (scored by the classes flagged) and
    ``goals`` the F1 each poisoned scenario should reach (default: the issue's targets).
    ``warm`` runs a first, untimed scan so that the timed ones find the kernels loaded;
    ``repeats`` > 0 then times backdoorscan's default against the best ART result that many
    times, alternated (:func:`timing_runs`), and with ``cold`` also in a fresh process per
    scan (:func:`cold_runs`).
    """
    variants = BDS_VARIANTS if variants is None else variants
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))  # ONNX Runtime also uses the 2 cores
    out: dict[str, Any] = {
        "environment": environment(),
        "seed": seed,
        "clean_scenarios": list(clean),
        "targets_f1": dict(TARGET_F1 if goals is None else goals),
        "variants": {k: desc for k, (desc, _) in variants.items()},
        "scenarios": {},
    }
    if "art" in detectors and not art_runner.art_available():
        log("ART is not installed: pip install adversarial-robustness-toolbox; ART skipped")
        detectors = detectors - {"art"}
    out["detectors_run"] = sorted(detectors)
    folders = [root / n for n in names]
    missing = [f.name for f in folders if not (f / "meta.json").exists()]
    if missing:
        raise SystemExit(f"not built: {', '.join(missing)} (python benchmarks/scenarios.py build)")
    if "bds" in detectors and warm:
        out["warm_up_s"] = warm_up(folders[0])
        log(f"warm-up scan (Numba kernels, ONNX Runtime): {out['warm_up_s']:.2f} s")
    for folder in folders:
        sc = Scenario.load(folder)
        load_before = os.getloadavg()[0]
        entry: dict[str, Any] = {
            "meta": {
                "n_train": len(sc.y),
                "n_poison": int(sc.poison.sum()),
                "n_classes": int(sc.y.max()) + 1,
                "clean_accuracy": sc.meta.get("clean_accuracy"),
                "attack_success_rate": sc.meta.get("attack_success_rate"),
                "attack_success_rate_source_digits": sc.meta.get(
                    "attack_success_rate_source_digits"
                ),
            },
            "detectors": {},
        }
        dets = entry["detectors"]
        if "bds" in detectors:
            for name, (_desc, overrides) in variants.items():
                res = run_backdoorscan(
                    folder / "model.onnx", folder / "train.npz", sc, overrides, seed
                )
                dets[f"bds:{name}"] = res
                log(f"{sc.name:<17} bds:{name:<22} {_one_line(res)}")
        if "art" in detectors:
            for key, res in run_art_configs(sc, seed, art_configs, model_loader).items():
                dets[key] = res
                log(f"{sc.name:<17} {key:<44} {_one_line(res)}")
        if repeats > 0 and "bds" in detectors:
            art_key = best_art(dets, sc.name in clean) if "art" in detectors else None
            entry["timing"] = timing_runs(sc, art_key, repeats, seed, model_loader)
            log(f"{sc.name:<17} timing {_timing_line(entry['timing'])}")
            if cold:
                entry["timing_cold"] = cold_runs(sc, art_key, repeats, seed)
                log(f"{sc.name:<17} fresh processes {_timing_line(entry['timing_cold'])}")
        entry["load_average"] = [load_before, os.getloadavg()[0]]
        out["scenarios"][sc.name] = entry
    return out


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _timing_line(t: dict[str, Any]) -> str:
    """Median wall (CPU) seconds of both sides of a timing entry."""
    parts = []
    for side in ("bds", "art"):
        w, c = _median(t.get(f"{side}_wall", [])), _median(t.get(f"{side}_cpu", []))
        if w is not None and c is not None:
            parts.append(f"{side} {w:.1f} s wall ({c:.1f} s CPU)")
    return ", ".join(parts)


def _one_line(res: dict[str, Any]) -> str:
    """A progress line for one detector's result."""
    if "error" in res and "overall" not in res:
        return f"{res['error']}  ({res.get('time_s', 0.0):.1f} s)"
    o = res["overall"]
    return (
        f"P={_f(o['precision'])} R={_f(o['recall'])} F1={_f(o['f1'])} "
        f"flagged={o['n_flagged']} classes={res['classes_flagged']} {res['time_s']:.1f} s"
    )


# --------------------------------------------------------------------------------------------
# Tables


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def art_label(key: str) -> str:
    """``art:penultimate:FastICA:smaller`` -> ``ART penultimate/FastICA/smaller``."""
    parts = key.split(":")[1:]
    label = "ART " + "/".join(parts[:3])
    return label + " (rule re-applied)" if parts[-1] == "reapplied" else label


def detector_label(key: str) -> str:
    """Human name of a detector key."""
    if key.startswith("bds:"):
        return f"backdoorscan {key[4:]}"
    return art_label(key)


def best_art(detectors: dict[str, Any], clean: bool) -> str | None:
    """The best-scoring ART result: highest F1 (clean models: fewest classes, then samples
    flagged); ties go to the faster one."""
    scored = [(k, v) for k, v in detectors.items() if k.startswith("art:") and "overall" in v]
    if not scored:
        return None

    def key(item: tuple[str, Any]) -> tuple[float, ...]:
        _, v = item
        o = v["overall"]
        if clean:
            return (-len(v["classes_flagged"]), -o["n_flagged"], -v["time_s"])
        return (o["f1"] or 0.0, -len(v["classes_flagged"]), -v["time_s"])

    return max(scored, key=key)[0]


def _cell(res: dict[str, Any] | None, clean: bool) -> str:
    """A table cell: F1 (poisoned) or classes/samples flagged (clean), or the error."""
    if res is None:
        return "n/a"
    if "overall" not in res:
        return _short_error(res.get("error", "error"))
    o = res["overall"]
    if clean:
        return f"{len(res['classes_flagged'])} cls / {o['n_flagged']}"
    return _f(o["f1"])


def _short_error(error: str) -> str:
    """``error: ValueError: long message`` -> ``error (ValueError)`` for table cells."""
    parts = error.split(":")
    return f"error ({parts[1].strip()})" if len(parts) > 2 else error


def _detector_keys(results: dict[str, Any]) -> list[str]:
    """Every detector key in the results, backdoorscan's first, in the order they ran."""
    keys: list[str] = []
    for entry in results["scenarios"].values():
        for k in entry["detectors"]:
            if k not in keys:
                keys.append(k)
    return sorted(keys, key=lambda k: not k.startswith("bds:"))


def error_notes(results: dict[str, Any]) -> list[str]:
    """One line per distinct error message, with where it happened."""
    seen: dict[str, list[str]] = {}
    for name, entry in results["scenarios"].items():
        for k, v in entry["detectors"].items():
            if "error" in v and "overall" not in v:
                seen.setdefault(v["error"], []).append(f"{name} {detector_label(k)}")
    lines = []
    for msg, where in seen.items():
        shown = ", ".join(where[:3]) + (", ..." if len(where) > 3 else "")
        lines.append(f"- {msg.removeprefix('error: ')} ({len(where)} results: {shown})")
    return lines


def targets(results: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """The issue's targets for backdoorscan's default, each with (met?, evidence)."""
    rows: list[tuple[str, bool | None, str]] = []
    scen = results["scenarios"]
    for name, goal in results.get("targets_f1", TARGET_F1).items():
        d = scen.get(name, {}).get("detectors", {}).get("bds:default")
        if d is None or "overall" not in d:
            rows.append((f"{name}: F1 >= {goal}", None, "not run"))
            continue
        f1 = d["overall"]["f1"] or 0.0
        rows.append((f"{name}: F1 >= {goal}", f1 >= goal, f"F1 {_f(f1)}"))
    clean_names = _clean(results)
    for name in clean_names:
        d = scen.get(name, {}).get("detectors", {}).get("bds:default")
        if d is None or "overall" not in d:
            rows.append((f"{name}: no class flagged", None, "not run"))
            continue
        flagged = d["classes_flagged"]
        rows.append((f"{name}: no class flagged", not flagged, f"classes flagged {flagged}"))
    for name, entry in scen.items():
        dets = entry["detectors"]
        d = dets.get("bds:default")
        b = best_art(dets, name in clean_names)
        if d is None or "overall" not in d or b is None:
            continue
        a = dets[b]
        if name in clean_names:
            good = len(d["classes_flagged"]) <= len(a["classes_flagged"])
            what = f"{len(d['classes_flagged'])} vs {len(a['classes_flagged'])} classes"
        else:
            good = (d["overall"]["f1"] or 0.0) >= (a["overall"]["f1"] or 0.0)
            what = f"F1 {_f(d['overall']['f1'])} vs {_f(a['overall']['f1'])}"
        rows.append((f"{name}: at least as good as the best ART ({art_label(b)})", good, what))
        for kind, label in TIMING_KINDS.items():
            if kind == "timing_cold" and not _timed(entry, b, kind):
                continue
            bw, bc, aw, ac = compared_times(entry, b, kind)
            why = f"median wall {bw:.1f} s vs {aw:.1f} s"
            if bc is not None and ac is not None:
                why += f"; CPU {bc:.1f} s vs {ac:.1f} s"
            n = entry.get(kind, {}).get("repeats")
            why += f" over {n} alternated runs" if n else " (one run each)"
            rows.append(
                (f"{name}: faster end to end than that ART configuration, {label}", bw < aw, why)
            )
    return rows


# How the two sides were timed: in this process after a warm-up (the library called again and
# again), and in a fresh process per scan (the command line, as a reviewer or a CI job runs it).
TIMING_KINDS = {
    "timing": "in one warm process",
    "timing_cold": "in a fresh process per scan",
}


def _timed(entry: dict[str, Any], art_key: str | None, kind: str) -> bool:
    t = entry.get(kind)
    return bool(t and t.get("art_key") == art_key and t.get("art_wall") and t.get("bds_wall"))


def compared_times(
    entry: dict[str, Any], art_key: str | None, kind: str = "timing"
) -> tuple[float, float | None, float, float | None]:
    """(ours wall, ours CPU, ART wall, ART CPU) seconds: medians of the alternated timing runs
    of ``kind`` where they exist for ``art_key``, else the single timed run (no CPU figure)."""
    t = entry.get(kind)
    dets = entry["detectors"]
    if t and t.get("art_key") == art_key and t.get("art_wall") and t.get("bds_wall"):
        return (
            float(np.median(t["bds_wall"])),
            float(np.median(t["bds_cpu"])),
            float(np.median(t["art_wall"])),
            float(np.median(t["art_cpu"])),
        )
    art = dets.get(art_key, {}) if art_key else {}
    return dets["bds:default"]["time_s"], None, art.get("time_s", float("nan")), None


def headline_table(results: dict[str, Any]) -> list[str]:
    """One row per scenario: the model, backdoorscan's default, the best ART configuration."""
    lines = [
        "| scenario | N / poison | clean acc. | ASR | backdoorscan default P / R / F1 "
        "| classes flagged | time s, wall (CPU) | best ART configuration | ART P / R / F1 "
        "| classes flagged | time s, wall (CPU) | ART wall time / ours |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in results["scenarios"].items():
        m = entry["meta"]
        dets = entry["detectors"]
        clean = name in _clean(results)
        d = dets.get("bds:default")
        b = best_art(dets, clean)
        a = dets.get(b) if b else None
        row = [
            name,
            f"{m['n_train']} / {m['n_poison']}",
            _f(m["clean_accuracy"], 4),
            _f(m["attack_success_rate"], 4),
        ]
        have_both = d is not None and "overall" in d and a is not None
        times = compared_times(entry, b) if have_both else None
        for i, res in enumerate((d, a)):
            if i == 1:
                row.append(art_label(b).removeprefix("ART ") if b else "n/a")
            if res is None or "overall" not in res:
                row += [res.get("error", "n/a") if res else "n/a", "", ""]
                continue
            o = res["overall"]
            wall, cpu = (times[2 * i], times[2 * i + 1]) if times else (res["time_s"], None)
            row += [
                f"{_f(o['precision'])} / {_f(o['recall'])} / {_f(o['f1'])}",
                _classes(res["classes_flagged"]),
                f"{wall:.1f}" + (f" ({cpu:.1f})" if cpu is not None else ""),
            ]
        ratio = f"{times[2] / times[0]:.1f}x" if times and times[0] > 0 else ""
        lines.append("| " + " | ".join([*row, ratio]) + " |")
    return lines


def fresh_process_table(results: dict[str, Any]) -> list[str]:
    """Both sides in a fresh process per scan (when measured): a subsection, or nothing."""
    rows = []
    for name, entry in results["scenarios"].items():
        b = best_art(entry["detectors"], name in _clean(results))
        if not _timed(entry, b, "timing_cold"):
            continue
        bw, bc, aw, ac = compared_times(entry, b, "timing_cold")
        rows.append(
            f"| {name} | {bw:.1f} ({bc:.1f}) | {art_label(b).removeprefix('ART ')} "
            f"| {aw:.1f} ({ac:.1f}) | {aw / bw:.1f}x |"
        )
    if not rows:
        return []
    return [
        "### One fresh process per scan (as the command line runs)",
        "",
        "| scenario | backdoorscan, s wall (CPU) | ART configuration | ART, s wall (CPU) "
        "| ART wall time / ours |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "Medians of the alternated runs: `backdoorscan scan model.onnx --data train.npz -q "
        "--format json -o ...` against `python -c` running that ART configuration on the same "
        "files (imports, loading and the scan each time; Numba's kernels from the on-disk "
        "cache, as after an install or in the image; children's CPU seconds in brackets).",
        "",
    ]


def _clean(results: dict[str, Any]) -> tuple[str, ...]:
    """The scenarios of a results dict whose model is clean."""
    return tuple(results.get("clean_scenarios", CLEAN_SCENARIOS))


def _classes(classes: list[int]) -> str:
    if not classes:
        return "none"
    return (
        "[" + ",".join(map(str, classes)) + "]" if len(classes) <= 4 else f"{len(classes)} classes"
    )


def all_detectors_table(results: dict[str, Any]) -> list[str]:
    """Rows: every detector; columns: scenarios; cells: F1, or classes / samples flagged."""
    names = list(results["scenarios"])
    keys = _detector_keys(results)
    lines = [
        "| detector | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for k in keys:
        cells = [
            _cell(results["scenarios"][n]["detectors"].get(k), n in _clean(results)) for n in names
        ]
        lines.append(f"| {detector_label(k)} | " + " | ".join(cells) + " |")
    return lines


def times_table(results: dict[str, Any]) -> list[str]:
    """Wall seconds per detector run (ART: per configuration; its analyses share one run)."""
    names = list(results["scenarios"])
    keys = [
        k
        for k in _detector_keys(results)
        if k.startswith("bds:") or k.endswith(":smaller")  # ART: one run per configuration
    ]
    lines = [
        "| detector run | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for k in keys:
        cells = []
        for n in names:
            v = results["scenarios"][n]["detectors"].get(k)
            if v is None or "time_s" not in v:
                cells.append("n/a")
                continue
            extra = ""
            if "config" in v:
                extra = f" (act. {v['config']['activation_s']:.1f})"
            elif "extract" in v.get("timings", {}):
                extra = f" (ext. {v['timings']['extract']:.1f})"
            cells.append(f"{v['time_s']:.1f}{extra}")
        label = detector_label(k).removesuffix("/smaller") if k.startswith("art:") else None
        lines.append(f"| {label or detector_label(k)} | " + " | ".join(cells) + " |")
    loads = [results["scenarios"][n].get("load_average") for n in names]
    if any(loads):
        cells = [f"{a:.1f} -> {b:.1f}" if ld else "" for ld in loads for a, b in [ld or (0, 0)]]
        lines.append("| load average, before -> after | " + " | ".join(cells) + " |")
    return lines


def per_class_table(results: dict[str, Any], name: str) -> list[str]:
    """Per-class P/R/F1 (or flags) of backdoorscan's default and the best ART result."""
    entry = results["scenarios"][name]
    dets = entry["detectors"]
    clean = name in _clean(results)
    d = dets.get("bds:default")
    b = best_art(dets, clean)
    a = dets.get(b) if b else None
    if d is None or "per_class" not in d:
        return []
    head = f"| class | n | poison | backdoorscan default | {art_label(b) if b else 'ART'} |"
    lines = [head, "|---|---|---|---|---|"]
    art_pc = {pc["label"]: pc for pc in a["per_class"]} if a and "per_class" in a else {}
    for pc in d["per_class"]:
        other = art_pc.get(pc["label"])
        lines.append(
            f"| {pc['label']} | {pc['n']} | {pc['n_poison']} | {_pc(pc)} | "
            f"{_pc(other) if other else 'n/a'} |"
        )
    return lines


def _pc(pc: dict[str, Any]) -> str:
    if pc["n_poison"] == 0:
        return f"{pc['n_flagged']} flagged"
    return (
        f"P {_f(pc['precision'])} R {_f(pc['recall'])} F1 {_f(pc['f1'])} acc {_f(pc['accuracy'])}"
    )


def render_section(results: dict[str, Any]) -> str:
    """The "## Paper reproduction" section of benchmarks/RESULTS.md."""
    env = results["environment"]
    v = env["versions"]
    warm = results.get("warm_up_s")
    lines = [
        SECTION,
        "",
        "Activation Clustering (Chen et al. 2018, arXiv:1811.03728) reproduced on real data, "
        "backdoorscan side by side with the reference implementation (IBM ART's "
        "`ActivationDefence`), on the scenarios of `benchmarks/scenarios.py` (MNIST and Rotten "
        "Tomatoes; see `benchmarks/README.md`). Flags are scored against the known poison "
        "mask. Generated by `benchmarks/paper_repro.py`; do not edit by hand.",
        "",
        "```sh",
        "python benchmarks/scenarios.py build                 # once: data and models",
        "pip install adversarial-robustness-toolbox           # the reference implementation",
        "nice python benchmarks/paper_repro.py run --write    # this section and docs/results.md",
        "```",
        "",
        f"Run {env['date']} on {env['cpu']}, {env['cores']} cores shared with other jobs (load "
        f"average {env['load_average_at_start'][0]:.1f} at the start: timings are noisy, compare "
        f"within a row), CPU only; commit {env['commit'] or 'unknown'}. Python {env['python']}, "
        f"backdoorscan {v['backdoorscan']}, ART {v['art']}, numpy {v['numpy']}, numba "
        f"{v['numba']}, onnxruntime {v['onnxruntime']}, torch {v['torch']} "
        f"({env['torch_threads']} threads), scikit-learn {v['scikit-learn']}; seed "
        f"{results['seed']}.",
        "",
        "### Headline: backdoorscan's default against the best ART configuration",
        "",
        *headline_table(results),
        "",
        "P / R / F1 are pooled over all training samples (flagged vs. poison). Times: medians "
        "of the alternated timing runs (backdoorscan's default, then that ART configuration, "
        "each end to end from the files, repeated), wall seconds and in brackets the process's "
        "CPU seconds (all threads), which the other jobs on this shared machine disturb less. "
        '"Best ART" is '
        "the ART result with the highest F1 (clean models: fewest classes flagged), over every "
        "configuration below, the documented rules re-applied included. On the clean models "
        "F1 is undefined; the number of classes flagged is the result.",
        "",
        *fresh_process_table(results),
        "### Targets of the issue",
        "",
        summary(results),
        "",
    ]
    for text, ok, why in targets(results):
        mark = "met" if ok else ("not run" if ok is None else "NOT met")
        lines.append(f"- {text}: **{mark}** ({why})")
    lines += [
        "",
        "### Every detector (F1; clean models: classes / samples flagged)",
        "",
        *all_detectors_table(results),
        "",
        "Errors, as ART raised them:" if error_notes(results) else "",
        "",
        *error_notes(results),
        "",
        "### Wall time per run, seconds",
        "",
        *times_table(results),
        "",
        "How it was measured:",
        "",
        "- backdoorscan: `backdoorscan.scan(dir/'model.onnx', data=dir/'train.npz', "
        "config=DetectConfig(...))`, timed end to end (loading the data file and the model, "
        "ONNX Runtime extraction, clustering, the transfer probe through the model). Numba "
        "kernels were warm: a first scan on 1,500 samples ran before the timed ones"
        + (f" ({warm:.1f} s, numba's on-disk cache loaded or compiled)" if warm else "")
        + ". Variants: "
        + "; ".join(f"`{k}` = {desc}" for k, desc in results.get("variants", {}).items())
        + ".",
        "- ART: `ActivationDefence(PyTorchClassifier(model), x, y).detect_poison(nb_clusters=2, "
        "nb_dims=10, reduce=..., cluster_analysis='smaller')`, timed end to end (loading "
        "train.npz and the state dict, wrapping, ART's PyTorch activation pass at batch 128, "
        "reduction, k-means, analysis, index mapping; `act.` = the activation pass alone; "
        "backdoorscan's `ext.` = its ONNX Runtime extraction alone). "
        "The other analyses (`relative-size`, `distance`, `silhouette-scores`) run with "
        "`analyze_clusters` on that same clustering, so they reuse its activations; their time "
        "is the run's plus the extra analysis time. ART seeds nothing itself: `random`, numpy "
        "and torch are seeded globally before each configuration.",
        "- ART `default` layer = the model as given: ART clusters `layer_names[-1]`, the last "
        "registered module, here `fc2`, the logits (10 or 2 dims). With nb_dims=10 ART skips "
        "the reduction when the layer has 10 dims or fewer, so on the logits PCA and FastICA "
        "are the same computation and only ART's default (`PCA`) is run. ART `penultimate` = "
        "the model wrapped so that its last registered module is an `nn.Identity` fed with the "
        "input of the last Linear (the fc1 ReLU output that backdoorscan also clusters); ART's "
        "own code is untouched. `preprocessing=None` because ART's default standardisation "
        "casts the text model's token ids to float.",
        '- "rule re-applied": where ART\'s analysis fails (`relative-size` raises ValueError '
        "under numpy >= 2.2 when a class has no small cluster; `silhouette-scores` leaves the "
        "big cluster's flags uninitialised), its documented rule is applied to ART's own "
        "clustering (`clusters_by_class`, `red_activations_by_class`): a cluster holding "
        "less than 35 % of its class is poison (and, for silhouette-scores, only when the "
        "class's silhouette exceeds 0.1). Exclusionary reclassification (`ex_re_threshold`) "
        "was not run: it retrains the model per class.",
        "",
        "<details><summary>Per class: backdoorscan default vs. the best ART result</summary>",
        "",
    ]
    for name in results["scenarios"]:
        table = per_class_table(results, name)
        if table:
            lines += [f"**{name}**", "", *table, ""]
    lines += ["</details>", ""]
    return "\n".join(lines)


def summary(results: dict[str, Any]) -> str:
    """One sentence: how many of the issue's targets were met, detection and speed apart."""
    rows = targets(results)
    speed = [(text, ok) for text, ok, _ in rows if "faster" in text]
    quality = [ok for text, ok, _ in rows if "faster" not in text]
    return (
        f"Detection targets met: {sum(bool(ok) for ok in quality)} of {len(quality)}. "
        + "Faster end to end than the best ART configuration: "
        + ", ".join(
            f"{sum(bool(ok) for text, ok in speed if text.endswith(label))} of "
            f"{sum(text.endswith(label) for text, _ in speed)} scenarios {label}"
            for label in TIMING_KINDS.values()
            if any(text.endswith(label) for text, _ in speed)
        )
        + "."
    )


def render_docs(results: dict[str, Any]) -> str:
    """docs/results.md: the headline rows for the README."""
    env = results["environment"]
    lines = [
        "# Results",
        "",
        "backdoorscan's default settings against the reference implementation of Activation "
        "Clustering (IBM ART's `ActivationDefence`, best of its configurations per scenario), on "
        "real data: MNIST with the paper's l -> l+1 poisoning at 10/15/33 %, all-to-one and a "
        "multimodal target class, Rotten Tomatoes sentences with a trigger phrase, and two clean "
        "models. Wall time is end to end on "
        f"{env['cores']} shared CPU cores ({env['cpu']}), {env['date']}.",
        "",
        *headline_table(results),
        "",
        "Times in the table: both sides in one warm process (the library called again).",
        "",
        *fresh_process_table(results),
        summary(results),
        "",
        "Details, every ART configuration, per-class figures and how to rerun: "
        "[benchmarks/RESULTS.md](../benchmarks/RESULTS.md#paper-reproduction).",
        "",
    ]
    return "\n".join(lines)


def replace_section(text: str, heading: str, body: str) -> str:
    """``text`` with the section under ``heading`` (up to the next ``## `` heading) replaced by
    ``body``, or ``body`` appended when the section is absent; other sections are untouched."""
    body = body.rstrip("\n") + "\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == heading), None)
    if start is None:
        if not text.strip():
            return body
        return text.rstrip("\n") + "\n\n" + body
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    after = "".join(lines[end:])
    return "".join(lines[:start]) + body + ("\n" + after if after else "")


def _atomic_write(path: Path, text: str) -> None:
    """Write a whole file or nothing: a temporary file beside it, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_outputs(results: dict[str, Any], results_md: Path, docs_md: Path) -> None:
    """Update the RESULTS.md section (re-reading the file just before) and docs/results.md."""
    section = render_section(results)
    current = results_md.read_text() if results_md.exists() else ""
    if not current.strip():
        current = "# Benchmark results\n"
    _atomic_write(results_md, replace_section(current, SECTION, section))
    _atomic_write(docs_md, render_docs(results))


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    """``run [--only NAME ...] [--detectors bds,art] [--write]`` or ``render [--write]``."""
    ap = argparse.ArgumentParser(prog="paper_repro.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the detectors and save the results")
    r.add_argument("--only", nargs="+", choices=SCENARIOS, metavar="NAME")
    r.add_argument("--detectors", default="bds,art", help="bds, art or both (default)")
    r.add_argument("--root", type=Path, default=SCENARIO_ROOT)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument(
        "--repeats", type=int, default=3, help="alternated timing runs per scenario (default 3)"
    )
    r.add_argument(
        "--no-cold",
        dest="cold",
        action="store_false",
        help="skip the timing runs in a fresh process per scan",
    )
    for p in (r, sub.add_parser("render", help="rebuild the tables from the saved results")):
        p.add_argument("--json", type=Path, default=JSON_PATH)
        p.add_argument("--write", action="store_true", help="update RESULTS.md and docs")
    args = ap.parse_args(argv)
    if args.command == "run":
        dets = {d.strip() for d in args.detectors.split(",") if d.strip()}
        if not dets <= {"bds", "art"}:
            ap.error("--detectors takes bds, art or bds,art")
        t0 = time.perf_counter()
        results = run(
            list(args.only or SCENARIOS),
            args.root,
            dets,
            seed=args.seed,
            repeats=args.repeats,
            cold=args.cold,
        )
        results["total_s"] = time.perf_counter() - t0
        results["command"] = " ".join(["python", "benchmarks/paper_repro.py", *sys.argv[1:]])
        _atomic_write(args.json, json.dumps(_jsonable(results), indent=1) + "\n")
        print(f"results -> {args.json} ({results['total_s']:.0f} s)")
    else:
        results = json.loads(args.json.read_text())
    print("\n".join(headline_table(results)))
    for text, ok, why in targets(results):
        print(f"{'met' if ok else ('not run' if ok is None else 'NOT met')}: {text} ({why})")
    if args.write:
        write_outputs(results, RESULTS_MD, DOCS_MD)
        print(f"wrote {RESULTS_MD.relative_to(ROOT)} ({SECTION!r}) and {DOCS_MD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
