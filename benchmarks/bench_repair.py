"""Exclusionary reclassification and repair on real poisoned MNIST (the paper's setting).

Run from the repository root, after ``python benchmarks/scenarios.py build``:

    python benchmarks/bench_repair.py                      # mnist_l2l1_10: ExRe both + repair
    python benchmarks/bench_repair.py --only all2one       # all-to-one: ExRe where size cannot
    python benchmarks/bench_repair.py --only clean         # clean model scanned with ExRe
    python benchmarks/bench_repair.py --only init          # ExRe continuing from the weights

Each part loads ``benchmarks/.data/scenarios/<name>/model.pt`` through the PyTorch adapter
(``--arch benchmarks.scenarios:MnistCNN``), so the library's own code paths run: scan with
ExRe ('full' retrains a re-initialised copy for one epoch without the suspicious clusters,
'probe' fits a logistic regression on the activations), then repair (relabel, one epoch from
the current weights), measured on the scenario's clean and triggered test sets. Figures are
printed as markdown and saved to ``benchmarks/.work/bench_repair_<part>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCENARIOS = ROOT / "benchmarks" / ".data" / "scenarios"
WORK = ROOT / "benchmarks" / ".work"
ARCH = "benchmarks.scenarios:MnistCNN"


def _load(name: str) -> tuple[Path, dict[str, np.ndarray], dict]:
    folder = SCENARIOS / name
    if not (folder / "meta.json").exists():
        raise SystemExit(f"scenario {name} is not built: python benchmarks/scenarios.py build")
    with np.load(folder / "train.npz") as d:
        truth = {k: d[k] for k in ("y", "poison", "source")}
    return folder, truth, json.loads((folder / "meta.json").read_text())


def _scan(folder: Path, exre: Any, **kw: Any) -> tuple[Any, float]:
    import backdoorscan

    t = time.perf_counter()
    report = backdoorscan.scan(
        folder / "model.pt",
        data=folder / "train.npz",
        arch=ARCH,
        input_shape=(1, 28, 28),
        exre=exre,
        **kw,
    )
    return report, time.perf_counter() - t


def _detection(report: Any, truth: dict[str, np.ndarray]) -> dict[str, Any]:
    flagged = report.is_flagged()
    poison = truth["poison"]
    tp = int((flagged & poison).sum())
    p = tp / max(int(flagged.sum()), 1)
    r = tp / max(int(poison.sum()), 1)
    return {
        "poisoned_classes": report.poisoned_classes,
        "flagged": int(flagged.sum()),
        "precision": round(p, 4),
        "recall": round(r, 4),
        "f1": round(2 * p * r / max(p + r, 1e-12), 4),
    }


def _class_rows(report: Any, truth: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per class: detector, true source of the examined cluster, ExRe figures per method."""
    rows = []
    preds = report.exre.predictions if report.exre is not None else None
    for c in report.classes:
        if not c.exre:
            continue
        members = np.asarray(c.members if c.members is not None else [], dtype=np.int64)
        poison_here = truth["poison"][members]
        true_source = (
            int(np.bincount(truth["source"][members][poison_here]).argmax())
            if poison_here.any()
            else None
        )
        row = {
            "label": c.label,
            "verdict": c.verdict,
            "relative_size": round(c.relative_size or 0.0, 3),
            "size_vote": bool(c.votes.get("size")),
            "transfer": c.transfer,
            "suspected_source": c.suspected_source,
            "n": len(members),
            "poison_share": round(float(poison_here.mean()) if len(members) else 0.0, 3),
            "true_source": true_source,
            "reason": c.reason,
        }
        for method in ("full", "probe"):
            o = c.exre.get(method)
            if o:
                row[method] = {
                    k: getattr(o, k)
                    for k in ("own_share", "source", "source_share", "ratio", "verdict")
                }
        if preds is not None and poison_here.any():
            p = preds[members][poison_here]
            row["full_per_sample_true_source"] = round(
                float((p == truth["source"][members][poison_here]).mean()), 4
            )
        rows.append(row)
    return rows


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "inf" if v == float("inf") else format(v, spec)
    return str(v)


def _table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| class | verdict | cluster n | poison share | size | transfer src | true src "
        "| full own / src (share) / ratio | full | probe own / src (share) / ratio | probe |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for m in ("full", "probe"):
            o = r.get(m)
            if o:
                cells += [
                    f"{_fmt(o['own_share'])} / {_fmt(o['source'])} ({_fmt(o['source_share'])}) "
                    f"/ {_fmt(o['ratio'])}",
                    o["verdict"],
                ]
            else:
                cells += ["-", "-"]
        out.append(
            f"| {r['label']} | {r['verdict']} | {r['n']} | {r['poison_share']:.2f} "
            f"| {r['relative_size']:.2f} | {_fmt(r['suspected_source'])} "
            f"| {_fmt(r['true_source'])} | " + " | ".join(cells) + " |"
        )
    return "\n".join(out)


def _save(part: str, payload: dict[str, Any]) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"bench_repair_{part}.json"
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    print(f"\nsaved {path.relative_to(ROOT)}")


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    raise TypeError(type(v).__name__)


def _features_probe(report: Any, folder: Path, truth: dict[str, np.ndarray]) -> dict[int, Any]:
    """The probe fitted on the poisoned model's activations instead of the input sketch."""
    from backdoorscan.scanner.exre import ExreConfig, exre_probe, suspicious_clusters

    cfg = ExreConfig(method="probe", probe_space="features")
    clusters = suspicious_clusters(report, truth["y"], max_share=cfg.max_share)
    features = np.load(folder / "features.npy")
    outcomes, _, _ = exre_probe(features, truth["y"], clusters, cfg, 10, space="features")
    return outcomes


def _features_probe_line(outcomes: dict[int, Any]) -> str:
    return "probe on the activations instead: " + ", ".join(
        f"{c}: {o['verdict']} (own {o['own_share']:.2f}, {o['source']} {o['source_share']:.2f})"
        for c, o in sorted(outcomes.items())
    )


def part_l2l1(name: str, epochs: int, strategies: list[str]) -> None:
    """ExRe (both methods) on the l -> l+1 scenario, then repair, then the rescan."""
    import backdoorscan
    from backdoorscan.scanner.exre import ExreConfig

    folder, truth, meta = _load(name)
    report, scan_s = _scan(folder, ExreConfig(method="both", epochs=1))
    rows = _class_rows(report, truth)
    poisoned = [r for r in rows if r["verdict"] == "poisoned"]
    full_right = sum(r["full"]["source"] == r["true_source"] for r in poisoned if "full" in r)
    full_poison = sum(r["full"]["verdict"] == "poison" for r in poisoned if "full" in r)
    probe_right = sum(r["probe"]["source"] == r["true_source"] for r in poisoned if "probe" in r)
    probe_poison = sum(r["probe"]["verdict"] == "poison" for r in poisoned if "probe" in r)
    agree = sum(
        r["probe"]["verdict"] == r["full"]["verdict"]
        and r["probe"]["source"] == r["full"]["source"]
        for r in rows
        if "probe" in r and "full" in r
    )
    print(f"## {name}: exclusionary reclassification\n")
    print(f"detection: {_detection(report, truth)}; scan + ExRe {scan_s:.0f} s")
    print(f"ExRe settings: {json.dumps(report.exre)}\n")
    print(_table(rows))
    print(
        f"\nfull: poison verdict in {full_poison}/{len(poisoned)} flagged classes, correct source "
        f"in {full_right}/{len(poisoned)}; probe: poison in {probe_poison}/{len(poisoned)}, "
        f"correct source in {probe_right}/{len(poisoned)}; probe agrees with full (verdict and "
        f"source) on {agree}/{len(rows)} clusters"
    )
    fp = _features_probe(report, folder, truth)
    by_label = {r["label"]: r for r in rows}
    fp_poison = sum(fp[r["label"]]["verdict"] == "poison" for r in poisoned if r["label"] in fp)
    fp_right = sum(
        fp[r["label"]]["source"] == r["true_source"] for r in poisoned if r["label"] in fp
    )
    fp_agree = sum(
        (o["verdict"], o["source"])
        == (by_label[c]["full"]["verdict"], by_label[c]["full"]["source"])
        for c, o in fp.items()
        if c in by_label and "full" in by_label[c]
    )
    print(
        f"probe on the activations instead (probe_space='features'): poison in "
        f"{fp_poison}/{len(poisoned)}, correct source in {fp_right}/{len(poisoned)}, agrees with "
        f"full on {fp_agree}/{len(fp)}; own shares "
        + ", ".join(f"{c}: {o['own_share']:.2f}" for c, o in sorted(fp.items()))
    )
    payload: dict[str, Any] = {
        "scenario": name,
        "meta": {k: meta.get(k) for k in ("clean_accuracy", "attack_success_rate", "n_train")},
        "detection": _detection(report, truth),
        "exre": report.exre,
        "classes": rows,
        "features_probe": fp,
        "scan_s": scan_s,
        "repairs": {},
    }
    for strategy in strategies:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            after = backdoorscan.repair(
                folder / "model.pt",
                data=folder / "train.npz",
                arch=ARCH,
                input_shape=(1, 28, 28),
                report=report,
                output=Path(tmp) / "repaired.pt",
                strategy=strategy,
                epochs=epochs,
                test=folder / "test_clean.npz",
                trigger_test=folder / "test_trigger.npz",
            )
            repair_s = time.perf_counter() - t
            written = sorted(p.name for p in Path(tmp).iterdir())
        info = after.repair
        m = info.metrics
        print(f"\n## {name}: repair ({strategy}, {epochs} epoch(s) from the current weights)\n")
        print(f"{info.summary} ({repair_s:.0f} s; wrote {', '.join(written)})")
        print(
            f"clean accuracy {m['before']['clean_accuracy']:.4f} -> "
            f"{m['after']['clean_accuracy']:.4f}; attack success rate (triggered test samples "
            f"not predicted as their true label) {m['before']['asr']:.4f} -> "
            f"{m['after']['asr']:.4f}"
        )
        print(f"share sent to each flagged class: before {m['before']['asr_per_class']}")
        print(f"                                  after  {m['after']['asr_per_class']}")
        print(
            f"rescan: {after.verdict}, flagged {len(after.flagged_indices)}, exit {after.exit_code}"
        )
        payload["repairs"][strategy] = {
            "summary": info.summary,
            "metrics": m,
            "per_class": info.per_class,
            "rescan_verdict": after.verdict,
            "rescan_poisoned_classes": after.poisoned_classes,
            "rescan_flagged": len(after.flagged_indices),
            "repair_s": repair_s,
            "fit_s": m.get("fit_s"),
        }
    _save(name, payload)


def part_all2one(epochs: int, repair: bool) -> None:
    """All-to-one: the poison is half of class 0; the default rule and the size rule, with ExRe."""
    import backdoorscan
    from backdoorscan.scanner.exre import ExreConfig

    folder, truth, _ = _load("mnist_all2one")
    payload: dict[str, Any] = {"scenario": "mnist_all2one", "runs": {}}
    runs = {
        "transfer (default)": backdoorscan.DetectConfig(),
        "size,separation": backdoorscan.DetectConfig(rule=("size", "separation")),
    }
    default_report = None
    for title, cfg in runs.items():
        report, scan_s = _scan(folder, ExreConfig(method="both", epochs=1), config=cfg)
        if default_report is None:
            default_report = report
        rows = _class_rows(report, truth)
        print(f"## mnist_all2one, rule {title}, with ExRe\n")
        print(f"detection: {_detection(report, truth)}; scan + ExRe {scan_s:.0f} s")
        print(f"ExRe settings: {json.dumps(report.exre)}\n")
        print(_table(rows))
        zero = next(r for r in rows if r["label"] == 0)
        print(f"\nclass 0: {zero['reason']}")
        fp = _features_probe(report, folder, truth)
        print(_features_probe_line(fp) + "\n")
        payload["runs"][title] = {
            "detection": _detection(report, truth),
            "exre": report.exre,
            "classes": rows,
            "features_probe": fp,
            "scan_s": scan_s,
        }
    if repair and default_report is not None:
        with tempfile.TemporaryDirectory() as tmp:
            after = backdoorscan.repair(
                folder / "model.pt",
                data=folder / "train.npz",
                arch=ARCH,
                input_shape=(1, 28, 28),
                report=default_report,
                output=Path(tmp) / "repaired.pt",
                epochs=epochs,
                test=folder / "test_clean.npz",
                trigger_test=folder / "test_trigger.npz",
            )
        m = after.repair.metrics
        print("## mnist_all2one: repair (relabel, per sample where ExRe found many sources)\n")
        print(after.repair.summary)
        print(f"per class: {after.repair.per_class}")
        print(
            f"clean accuracy {m['before']['clean_accuracy']:.4f} -> "
            f"{m['after']['clean_accuracy']:.4f}; attack success rate {m['before']['asr']:.4f} "
            f"-> {m['after']['asr']:.4f}; rescan {after.verdict}"
        )
        payload["repair"] = {
            "summary": after.repair.summary,
            "per_class": after.repair.per_class,
            "metrics": m,
            "rescan_verdict": after.verdict,
        }
    _save("all2one", payload)


def part_clean() -> None:
    """A clean MNIST model scanned with ExRe (both methods): it must stay clean."""
    from backdoorscan.scanner.exre import ExreConfig

    folder, truth, _ = _load("mnist_clean")
    report, scan_s = _scan(folder, ExreConfig(method="both", epochs=1))
    rows = _class_rows(report, truth)
    print("## mnist_clean with ExRe\n")
    print(f"verdict {report.verdict} (exit {report.exit_code}); scan + ExRe {scan_s:.0f} s")
    print(f"ExRe settings: {json.dumps(report.exre)}\n")
    print(_table(rows))
    fp = _features_probe(report, folder, truth)
    print("\n" + _features_probe_line(fp))
    _save(
        "clean",
        {"verdict": report.verdict, "exre": report.exre, "classes": rows, "features_probe": fp},
    )


def part_init(name: str) -> None:
    """ExRe 'full' continuing from the poisoned weights instead of from scratch."""
    from backdoorscan.scanner.exre import ExreConfig

    folder, truth, _ = _load(name)
    report, scan_s = _scan(folder, ExreConfig(method="full", init="continue", epochs=1))
    rows = _class_rows(report, truth)
    print(f"## {name}: ExRe full continuing from the current weights (1 epoch)\n")
    print(_table(rows))
    _save(f"{name}_continue", {"exre": report.exre, "classes": rows, "scan_s": scan_s})


def main(argv: list[str] | None = None) -> int:
    """Run the parts asked for (default: the l -> l+1 scenario with ExRe and repair)."""
    parser = argparse.ArgumentParser(prog="bench_repair.py", description=__doc__)
    parser.add_argument(
        "--only",
        nargs="+",
        default=["l2l1"],
        choices=["l2l1", "all2one", "clean", "init"],
    )
    parser.add_argument("--scenario", default="mnist_l2l1_10")
    parser.add_argument("--epochs", type=int, default=20, help="repair's epoch budget")
    parser.add_argument("--strategies", default="relabel", help="comma-separated")
    parser.add_argument("--no-all2one-repair", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"torch threads {args.threads}\n")
    for part in args.only:
        if part == "l2l1":
            part_l2l1(args.scenario, args.epochs, args.strategies.split(","))
        elif part == "all2one":
            part_all2one(args.epochs, not args.no_all2one_repair)
        elif part == "clean":
            part_clean()
        else:
            part_init(args.scenario)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
