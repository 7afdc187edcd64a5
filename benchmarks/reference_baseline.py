"""Quick reference numbers for the built scenarios: scikit-learn PCA(10) + KMeans(2) per class.

Not a product feature: it shows where the plain relative-size rule of Activation Clustering
works and where it fails. Per training label, features.npy is reduced to 10 dimensions with
PCA, split by k-means (k=2, 10 starts), and the smaller cluster is flagged when its share of
the class is below 0.35. Prints pooled precision/recall/F1 against the poison mask and the
classes flagged. Usage: ``python benchmarks/reference_baseline.py [--root DIR] [NAME ...]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

DEFAULT_ROOT = Path(__file__).resolve().parent / ".data" / "scenarios"
SIZE_THRESHOLD = 0.35


def flag_by_relative_size(
    features: np.ndarray, labels: np.ndarray, threshold: float = SIZE_THRESHOLD, seed: int = 0
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Per class PCA(10) + KMeans(2); flag the smaller cluster if its share < threshold."""
    flagged = np.zeros(len(labels), dtype=bool)
    per_class: list[dict[str, Any]] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        f = features[idx].astype(np.float64)
        dims = min(10, f.shape[1], len(idx))
        z = PCA(n_components=dims, random_state=seed).fit_transform(f)
        assign = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(z)
        sizes = np.bincount(assign, minlength=2)
        small = int(np.argmin(sizes))
        share = float(sizes[small] / len(idx))
        flag = share < threshold
        if flag:
            flagged[idx[assign == small]] = True
        per_class.append({"label": int(c), "small_share": share, "flagged": bool(flag)})
    return flagged, per_class


def prf(flagged: np.ndarray, poison: np.ndarray) -> tuple[float, float, float]:
    """Pooled precision, recall and F1 of flagged samples against the poison mask."""
    tp = int(np.sum(flagged & poison))
    precision = tp / int(flagged.sum()) if flagged.any() else 0.0
    recall = tp / int(poison.sum()) if poison.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def evaluate(scenario_dir: Path) -> dict[str, Any]:
    """Run the rule on one scenario and score it."""
    features = np.load(scenario_dir / "features.npy")
    with np.load(scenario_dir / "train.npz") as z:
        y, poison = z["y"], z["poison"]
    t0 = time.perf_counter()
    flagged, per_class = flag_by_relative_size(features, y)
    elapsed = time.perf_counter() - t0
    precision, recall, f1 = prf(flagged, poison)
    for pc in per_class:
        members = flagged & (y == pc["label"])
        pc["poison_share_of_flagged"] = float(poison[members].mean()) if members.any() else None
    return {
        "name": scenario_dir.name,
        "n": len(y),
        "n_poison": int(poison.sum()),
        "n_flagged": int(flagged.sum()),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "classes_flagged": [pc["label"] for pc in per_class if pc["flagged"]],
        "per_class": per_class,
        "seconds": round(elapsed, 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Print one line per scenario (and per-class shares with ``--verbose``)."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("names", nargs="*", help="scenario names (default: all built)")
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    args = ap.parse_args(argv)
    dirs = [args.root / n for n in args.names] or sorted(
        p.parent for p in args.root.glob("*/meta.json")
    )
    if not dirs:
        print(f"no built scenarios under {args.root}", file=sys.stderr)
        return 3
    results = []
    print(f"{'scenario':<18} {'N':>6} {'poison':>6} {'flagged':>7}  prec    rec     F1    classes")
    for d in dirs:
        r = evaluate(d)
        results.append(r)
        print(
            f"{r['name']:<18} {r['n']:>6} {r['n_poison']:>6} {r['n_flagged']:>7}  "
            f"{r['precision']:.3f}  {r['recall']:.3f}  {r['f1']:.3f}  {r['classes_flagged']}"
        )
        if args.verbose:
            for pc in r["per_class"]:
                ps = pc["poison_share_of_flagged"]
                print(
                    f"    label {pc['label']}: small cluster share {pc['small_share']:.3f}"
                    + (f", poison share of flagged {ps:.2f}" if ps is not None else "")
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
