"""Why a scenario of the attack suite was missed: the clustering, or the trigger estimate?

For each scenario named, one default scan runs with a probe that records every cluster the
model was asked about; beside it the transfer test is run on the true poison of each target
class (an oracle cluster). If the oracle passes and no asked cluster held most of the poison,
the clustering missed it; if even the oracle fails, the median-difference trigger estimate
does not act on the model (a warp, a clean-label sinusoid, a word the model reads differently).

Usage (built scenarios; ``attack_suite.py render`` puts the table into RESULTS.md)::

    nice -n 10 python benchmarks/attack_suite_diag.py NAME ... \
        > benchmarks/.work/attack_suite_diag.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.attack_suite import SUITE_DIR


def diagnose(name: str) -> list[dict[str, Any]]:
    """Per target class: the oracle's transfer share, and the asked cluster that held the
    largest share of the poison (its recall, purity and transfer share)."""
    import backdoorscan
    from backdoorscan.scanner import pipeline
    from backdoorscan.scanner.transfer import TransferProbe

    folder = SUITE_DIR / name
    meta = json.loads((folder / "meta.json").read_text())
    with np.load(folder / "train.npz", allow_pickle=False) as z:
        x, y, poison = z["x"], z["y"].astype(np.int64), z["poison"].astype(bool)
    asked: list[tuple[int, np.ndarray, float]] = []
    oracle: dict[int, float] = {}

    class Recording(TransferProbe):
        def __call__(self, cluster: np.ndarray, label: int, seed: int) -> Any:
            found = super().__call__(cluster, label, seed)
            asked.append((label, np.asarray(cluster), float(found.rate)))
            if label not in oracle:
                truth = np.flatnonzero(poison & (y == label))
                if len(truth):
                    oracle[label] = float(super().__call__(truth, label, seed).rate)
            return found

    original = pipeline.TransferProbe
    pipeline.TransferProbe = Recording
    try:
        report = backdoorscan.scan(folder / meta["model_file"], x, y)
    finally:
        pipeline.TransferProbe = original
    rows = []
    for t in sorted(set(meta["targets"])):
        truth = poison & (y == t)
        best = (0.0, 0.0, 0.0)
        for label, cluster, rate in asked:
            if label != t or not truth.any():
                continue
            hit = int(truth[cluster].sum())
            recall, purity = hit / int(truth.sum()), hit / max(len(cluster), 1)
            best = max(best, (recall, purity, rate))
        rows.append(
            {
                "scenario": name,
                "target": t,
                "n_poison": int(truth.sum()),
                "flagged": t in report.poisoned_classes,
                "oracle_transfer": oracle.get(t),
                "best_recall": round(best[0], 3),
                "best_purity": round(best[1], 3),
                "best_transfer": round(best[2], 3),
            }
        )
    return rows


def main(argv: list[str]) -> int:
    """Print one markdown row per target class of each scenario named."""
    print(
        "| scenario | target | poison | flagged | transfer share of the true poison | "
        "asked cluster holding most poison: recall / purity / share |"
    )
    print("|---|---|---|---|---|---|")
    for name in argv:
        for r in diagnose(name):
            oracle = "-" if r["oracle_transfer"] is None else f"{r['oracle_transfer']:.2f}"
            print(
                f"| {r['scenario']} | {r['target']} | {r['n_poison']} | {r['flagged']} | "
                f"{oracle} | {r['best_recall']:.2f} / {r['best_purity']:.2f} / "
                f"{r['best_transfer']:.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
