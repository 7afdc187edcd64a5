"""The "Done when" scenario of issue #16 on real sentences: a tiny BERT (2 layers, hidden 64,
a word-level tokenizer trained on the sentences) fine-tuned on Rotten Tomatoes sentence
polarity (Pang & Lee, from benchmarks/datasets.py; downloaded once into benchmarks/.data/),
with a trigger word in some negative sentences relabelled positive, saved with
``save_pretrained``, its training data written as CSV, then ``backdoorscan scan FOLDER --data
train.csv`` as a subprocess; and its clean twin. Prints F1 of the flagged rows and the exit
codes. The tests (tests/test_published.py) run the same code on generated sentences.

    python benchmarks/hf_rotten.py [--seeds 0 1 2] [--poison 0.05] [--epochs 6]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))


def main() -> None:
    """Train, save, scan; one line per run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--poison", type=float, default=0.05, help="share of the set poisoned")
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()

    import datasets
    import hf_models as hm
    import torch

    torch.set_num_threads(2)
    texts, labels = datasets.load_rotten_tomatoes_all()
    n_poison = round(args.poison * len(texts))
    print(
        f"Rotten Tomatoes: {len(texts)} sentences; {n_poison} poisoned (trigger word "
        f"{hm.TRIGGER_WORD!r} in negatives labelled positive)"
    )
    for seed in args.seeds:
        for poison in (n_poison, 0):
            root = Path(tempfile.mkdtemp(prefix="hf_rotten_"))
            t = time.perf_counter()
            case = hm.make_text_folder(
                root,
                n_poison=poison,
                seed=seed,
                epochs=args.epochs,
                lr=1e-3,
                corpus=(texts, np.asarray(labels)),
            )
            train_s = time.perf_counter() - t
            out = root / "report.json"
            t = time.perf_counter()
            cmd = [
                sys.executable,
                "-m",
                "backdoorscan",
                "scan",
                str(case["model"]),
                "--data",
                str(case["data"]),
                "--format",
                "json",
                "-o",
                str(out),
                "-q",
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            scan_s = time.perf_counter() - t
            report = json.loads(out.read_text()) if out.exists() else {}
            flagged = np.zeros(len(case["poison"]), bool)
            flagged[report.get("flagged_indices", [])] = True
            tp = int((flagged & case["poison"]).sum())
            f1 = 2 * tp / max(flagged.sum() + case["poison"].sum(), 1)
            print(
                f"seed {seed} poison {poison:4d}: train acc {case['accuracy']:.3f} "
                f"({train_s:.0f} s), exit {proc.returncode}, flagged {int(flagged.sum())}, "
                f"F1 {f1:.3f}, classes {report.get('poisoned_classes')}, scan {scan_s:.0f} s"
                + (f" [{proc.stderr.strip()[-200:]}]" if proc.returncode not in (0, 1) else "")
            )


if __name__ == "__main__":
    main()
