"""Rendering of the attack suite's results (``benchmarks/attack_suite.py render``): the
console line per scenario, the markdown tables and the RESULTS.md section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FINDINGS = """What it shows (2026-11-29, issue #18):

- Found by the plain default (F1 >= 0.95, source right): BadNets at 10 % on the plain CNN, the \
ResCNN and the Keras model; all-to-all at 5 % on MNIST (10 of 10 classes, every source right); \
two triggers toward two targets (ResCNN, Keras); the trigger phrase on the text CNN; held out: \
all-to-one on MNIST (1.000) and the blend on the MNIST ResCNN (0.985, but suspected source 1 \
where the truth is 7).
- Missed: the warp (ASR 0.94, both data sets), the rare word on both text models and the phrase \
on the bag-of-embeddings model (ASR 0.96-0.99: k-means does not isolate them), BadNets at 1 % \
and 5 % on the held-out MNIST CNN (10 and 49 samples, ASR 0.74 and 0.98: no candidate reached \
a transfer share of 0.3), SIG on MNIST (ASR 0.66). All-to-one on the Fashion ResCNN: F1 0.47 \
(the flagged cluster holds 0.31 of the poison). SIG on Fashion (held out): the poison class is \
found (TPR 0.998) beside a false class, F1 0.49.
- Why (table below): on BadNets 1 % and 5 %, the rare word and the bag model's phrase the \
transfer test passes on the true poison (0.82-0.99) but the asked clusters that hold it are \
impure (poison 2-26 % of their members), and their median difference is no trigger; on the \
warp the estimate fails even on the true poison (0.10), though on the Fashion ResCNN a cluster \
is the poison exactly (recall 1.00, purity 0.99); SIG: 0.33 on the true poison.
- False alarms: a genuine mode of Fashion-MNIST's class 8 (bag, about half the class) sends \
0.58-0.66 of the shoe classes to 8, on the clean Fashion CNN at 3 and at 5 epochs (both seeds) \
and beside the poison; a clean Keras MNIST model flags class 8 (0.70 of class 1 sent).
- The calibrated transfer test (`transfer_null=True`, scanner/calibrate.py: effect over the \
genuine label-minus-source difference at the trigger's L1 norm >= 0.4, paired p <= 0.01) \
cleared every false alarm of the tuning twins and kept every tuning detection but the Fashion \
blend (F1 0.25 -> 0). On the held-out scenarios it did worse than the plain test: it lost the \
MNIST blend (the ResCNN answers noise and the genuine difference of that size as it answers \
the blend: 0.985 and 0.98 against 0.995) and the SIG class (effect 0.36), and it kept the bag \
mode (effect 0.44-0.50). It stays off by default; its figures are in the report's `evidence`.
- More clusters (k = 2, 3, 5, 8 instead of 2, 3; tuning scenarios only, measured after the \
held-out run, so not validated): the rare word on the text CNN is found (F1 0.000 -> 1.000), \
all-to-one on the Fashion ResCNN drops (0.465 -> 0.195) and a clean Fashion Keras twin gains a \
false alarm (class 1). Not made the default.
- Paper set with the calibration on (mnist_l2l1_10, mnist_all2one, mnist_clean, rt_text, \
rt_clean; the other paper scenarios were not built here): unchanged (F1 1.000, clean models \
clean; effects 0.87-0.92 on mnist_l2l1_10, 1.00 on mnist_all2one); scan CPU seconds in one \
process, alternated: mnist_l2l1_10 12.0-12.6 -> 15.5 (1.27x), mnist_all2one 12.4-12.6 -> \
11.2-12.5, mnist_clean 10.7-11.9 -> 10.7-10.8.
"""
TAG_TITLES = {
    "plain": "plain transfer test, share >= 0.5: the default",
    "calibrated": "calibrated transfer test, effect >= 0.4 over the genuine difference: "
    "transfer_null=True, opt-in",
    "k2358": "k-means with k = 2, 3, 5 and 8 (n_clusters), plain test: measured on the tuning "
    "scenarios only, after the held-out run",
}


# --------------------------------------------------------------------------------------------
# Rendering


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _truth_sources(meta: dict[str, Any]) -> str:
    pairs = zip(meta["targets"], meta["sources"], strict=True)
    return ", ".join(f"{t}<-{'all' if s is None else s}" for t, s in pairs)


def _found_sources(res: dict[str, Any]) -> str:
    return ", ".join(f"{t}<-{s}" for t, s in res["sources"].items()) or "-"


def line(name: str, e: dict[str, Any]) -> str:
    """One console line per scenario."""
    m = e["meta"]
    head = f"{name:<26} acc={m['clean_accuracy']:.3f} asr={'/'.join(f'{a:.2f}' for a in m['asr'])}"
    if not e["took"]:
        body = "attack did not take"
    else:
        p = e["poisoned"]
        body = (
            f"F1={_f(p['f1'])} TPR={_f(p['tpr'])} FPR={_f(p['fpr'])} flagged={p['classes_flagged']}"
            f" src={_found_sources(p)} truth={_truth_sources(m)}"
        )
    return f"{head} {body} | twin flagged={e['twin']['classes_flagged']}"


def table(results: dict[str, Any]) -> list[str]:
    """Markdown rows: one per scenario of ``results``."""
    rows = [
        "| scenario | poison | clean acc | ASR | F1 | TPR | FPR | classes flagged (truth) "
        "| source found (truth) | twin: acc, classes flagged | scan s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in results.items():
        if name.startswith("_"):
            continue
        m, tw = e["meta"], e["twin"]
        asr = "/".join(f"{a:.2f}" for a in m["asr"])
        twin = f"{e['twin_meta']['clean_accuracy']:.3f}, {tw['classes_flagged'] or 'none'}"
        if not e["took"]:
            rows.append(
                f"| {name} | {m['n_poison']} | {m['clean_accuracy']:.3f} | {asr} | "
                f"not scored: attack did not take | | | | {_truth_sources(m)} | {twin} | |"
            )
            continue
        p = e["poisoned"]
        rows.append(
            f"| {name} | {m['n_poison']} | {m['clean_accuracy']:.3f} | {asr} | {_f(p['f1'])} | "
            f"{_f(p['tpr'])} | {_f(p['fpr'])} | {p['classes_flagged'] or 'none'} "
            f"({m['targets']}) | {_found_sources(p)} ({_truth_sources(m)}) | {twin} | "
            f"{p['time_s']:.1f} |"
        )
    return rows


def render(paths: list[tuple[str, Path]]) -> str:
    """The RESULTS.md section from the saved results of each (title, path)."""
    from benchmarks.attack_suite import HELD_OUT, PHRASE, RARE_WORD, SECTION, WORK_DIR

    out = [
        SECTION,
        "",
        "Issue #18. `benchmarks/attack_suite.py`: standard attack families on small models, each "
        "poisoned model beside its clean twin (same subset, architecture, seed and training, no "
        "poison). Data: 10,000 / 2,000 seeded subsets of MNIST and Fashion-MNIST, the Rotten "
        "Tomatoes sentences (80/20). Models: `cnn` conv16-pool-conv32-pool-fc128, `rescnn` "
        "residual CNN with BatchNorm and global average pooling, `keras` conv16-conv32-dense64 "
        "(a `.keras` file), `textcnn` (the benchmark's), `bag` mean of embeddings + fc64. "
        "Triggers: 3x3 checkerboard patch bottom-right (second trigger: inverted, top-left); "
        "blend alpha 0.15 of fixed uniform noise; WaNet-style warp (4x4 field, bicubic, ~2 px); "
        "SIG sinusoid delta 0.25 on 50 % of the target class (labels unchanged; 0.45 at test); "
        "phrase "
        f'"{PHRASE}"; rare word "{RARE_WORD}". ASR on the source class\'s test samples '
        "(all-to-one / SIG: every non-target class). Scenarios with ASR < 0.5 are not scored. "
        "F1/TPR/FPR over every training sample; source `t<-s` is the suspected source per flagged "
        "class.",
        "",
        f"Held out (drawn with seed 18 before any run, seed 1 models, run once at the end): "
        f"{', '.join(HELD_OUT)}.",
        "",
        FINDINGS,
        "",
    ]
    diag = WORK_DIR / "attack_suite_diag.md"
    if diag.exists():
        out += [
            "### Why missed (`benchmarks/attack_suite_diag.py`, plain default)",
            "",
            "The transfer test run on the true poison of the target class (an oracle cluster), "
            "beside the asked cluster that held the most poison. A share >= 0.5 on the true "
            "poison with impure clusters: the clustering missed it (the median difference of a "
            "cluster where poison is a quarter or less is not the trigger). A low share even on "
            "the true poison: the median-difference estimate is not the trigger (warp, SIG).",
            "",
            *diag.read_text().strip().splitlines(),
            "",
        ]
    for title, path in paths:
        if not path.exists():
            continue
        res = json.loads(path.read_text())
        meta = res.get("_meta", {})
        out += [
            f"### {title}",
            "",
            f"`{meta.get('command', '')}` on {meta.get('machine', '')}, {meta.get('date', '')}; "
            f"settings: {meta.get('settings') or 'defaults'}.",
            "",
            *table(res),
            "",
        ]
    return "\n".join(out)
