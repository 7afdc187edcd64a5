"""The attack suite: the standard backdoor families, each poisoned model beside its clean twin.

Every scenario poisons a small training set (a seeded subset of MNIST or Fashion-MNIST, or the
Rotten Tomatoes sentences), trains a small model on it (CPU, one thread) and the same model
on the same data without poison (its clean twin: same subset, architecture, seed and training),
and records clean accuracy and attack success rate (ASR). A scenario whose attack did not take
(ASR < 0.5) is reported and not scored. Scoring scans each model file with backdoorscan
(default settings unless ``--set`` says otherwise) and compares the flags with the truth.

About a third of the scenarios are held out (``HELD_OUT``, drawn with a fixed seed and committed
before any result was seen): they train with seed 1 (other subset, other twin) and are run once,
at the end. Tuning looks at the rest only.

Usage::

    nice -n 10 python benchmarks/attack_suite.py build [--only NAME ...] [--held-out]
    nice -n 10 python benchmarks/attack_suite.py score [--only ...] [--held-out] [--set k=v ...]
    python benchmarks/attack_suite.py render --write     # the RESULTS.md section

Built models and data: ``benchmarks/.data/attack_suite/`` (git-ignored); scores:
``benchmarks/.work/attack_suite*.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import attack_suite_data as asd
from benchmarks.attack_suite_render import TAG_TITLES, line, render
from benchmarks.datasets import (
    DATA_DIR,
    ImageData,
    build_vocab,
    encode,
    load_mnist,
    load_rotten_tomatoes,
    subsample,
    tokenize,
)

ROOT = Path(__file__).resolve().parents[1]
SUITE_DIR = DATA_DIR / "attack_suite"
WORK_DIR = ROOT / "benchmarks" / ".work"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Attack suite"
N_TRAIN, N_TEST = 10_000, 2_000
TEXT_LENGTH = 40
PHRASE = "i watched this 3d movie"
RARE_WORD = "cf"
ASR_TAKES = 0.5
# Set from the attack success alone (no scan had looked at these scenarios): a 0.5 px warp
# (strength 1) and a 0.12 sinusoid on 30 % of the target did not take in 3 epochs.
WARP_STRENGTH = 4.0  # about 2 px of displacement on average
SIG_TRAIN, SIG_TEST = 0.25, 0.45


@dataclass(frozen=True)
class Spec:
    """One poisoned scenario. ``fraction``: poison copies per target-class clean sample (SIG:
    the share of the target class carrying the sinusoid; all-to-all: per class)."""

    name: str
    family: str  # badnets | all2one | all2all | blend | warp | sig | two | phrase | word
    data: str  # mnist | fashion | digits | rt
    arch: str  # cnn | rescnn | keras | textcnn | bag
    fraction: float
    target: int = 0
    source: int | None = 1  # None: every other class
    seed: int = 0
    epochs: int = 3

    @property
    def twin(self) -> str:
        """Name of the clean twin (shared by every scenario of this data, model and seed)."""
        return f"twin_{self.data}_{self.arch}_e{self.epochs}_s{self.seed}"


def _suite() -> list[Spec]:
    s: list[Spec] = []
    for frac, tag in ((0.01, "1"), (0.05, "5"), (0.10, "10")):
        s.append(Spec(f"badnets{tag}_mnist_cnn", "badnets", "mnist", "cnn", frac, 0, 6))
        s.append(
            Spec(
                f"badnets{tag}_fashion_rescnn", "badnets", "fashion", "rescnn", frac, 0, 8, epochs=5
            )
        )
    s.append(Spec("badnets10_mnist_keras", "badnets", "mnist", "keras", 0.10, 3, 8))
    s.append(Spec("all2one_mnist_cnn", "all2one", "mnist", "cnn", 1.0, 0, None))
    s.append(Spec("all2one_fashion_rescnn", "all2one", "fashion", "rescnn", 1.0, 0, None, epochs=5))
    s.append(Spec("all2all5_mnist_cnn", "all2all", "mnist", "cnn", 0.05, 0, None))
    s.append(Spec("all2all5_fashion_cnn", "all2all", "fashion", "cnn", 0.05, 0, None))
    s.append(Spec("blend_mnist_rescnn", "blend", "mnist", "rescnn", 0.10, 2, 7))
    s.append(Spec("blend_fashion_cnn", "blend", "fashion", "cnn", 0.10, 2, 7))
    s.append(Spec("warp_mnist_cnn", "warp", "mnist", "cnn", 0.10, 5, 3))
    s.append(Spec("warp_fashion_rescnn", "warp", "fashion", "rescnn", 0.10, 5, 3, epochs=5))
    s.append(Spec("sig_mnist_cnn", "sig", "mnist", "cnn", 0.50, 4, None, epochs=5))
    s.append(Spec("sig_fashion_cnn", "sig", "fashion", "cnn", 0.50, 4, None, epochs=5))
    s.append(Spec("two_mnist_rescnn", "two", "mnist", "rescnn", 0.10, 1, 7))
    s.append(Spec("two_fashion_keras", "two", "fashion", "keras", 0.10, 1, 7))
    s.append(Spec("phrase_rt_textcnn", "phrase", "rt", "textcnn", 0.10, 1, 0, epochs=8))
    s.append(Spec("phrase_rt_bag", "phrase", "rt", "bag", 0.10, 1, 0, epochs=8))
    s.append(Spec("word_rt_textcnn", "word", "rt", "textcnn", 0.05, 1, 0, epochs=8))
    s.append(Spec("word_rt_bag", "word", "rt", "bag", 0.05, 1, 0, epochs=8))
    return s


BASE = _suite()
# Drawn once, before any scenario was built or scored, by ``draw_held_out()`` (a seeded draw of
# a third of the list, redrawn while it would leave some family without a tuning scenario),
# and written out here so that it cannot drift with the list above.
HELD_OUT = (
    "badnets1_mnist_cnn",
    "badnets5_mnist_cnn",
    "all2one_mnist_cnn",
    "blend_mnist_rescnn",
    "warp_fashion_rescnn",
    "sig_fashion_cnn",
    "phrase_rt_bag",
    "word_rt_bag",
)
SCENARIOS: dict[str, Spec] = {
    sp.name: replace(sp, seed=1) if sp.name in HELD_OUT else sp for sp in BASE
}


def draw_held_out(seed: int = 18) -> tuple[str, ...]:
    """The seeded draw that ``HELD_OUT`` records (checked by ``list``): a third of the
    scenarios, every family keeping at least one scenario to tune on."""
    rng = np.random.default_rng(seed)
    families = {sp.family for sp in BASE}
    while True:
        pick = set(rng.choice(len(BASE), size=round(len(BASE) / 3), replace=False).tolist())
        if {sp.family for i, sp in enumerate(BASE) if i not in pick} == families:
            return tuple(BASE[i].name for i in sorted(pick))


# --------------------------------------------------------------------------------------------
# Poisoning


@dataclass
class Built:
    """A training set (poisoned or the twin's), test sets and the truth."""

    x: np.ndarray
    y: np.ndarray
    poison: np.ndarray
    source: np.ndarray  # the true class of every sample
    x_test: np.ndarray
    y_test: np.ndarray
    trig: list[tuple[np.ndarray, np.ndarray]]  # (stamped test inputs, attack target) per trigger
    sources: list[int | None]  # the single source class per target class (None: many)
    targets: list[int]
    vocab_size: int = 0


def _image_base(data: str, seed: int) -> ImageData:
    if data == "digits":
        from benchmarks.datasets import load_digits_28

        return load_digits_28(seed)
    full = load_mnist() if data == "mnist" else asd.load_fashion_mnist()
    return subsample(full, N_TRAIN, N_TEST, seed=seed)


def _stamp(sp: Spec, x: np.ndarray, which: int = 0) -> np.ndarray:
    if sp.family in ("badnets", "all2one", "all2all"):
        return asd.patch(x)
    if sp.family == "two":
        return asd.patch(x, "br" if which == 0 else "tl")
    if sp.family == "blend":
        return asd.blend(x, sp.seed, alpha=0.15)
    if sp.family == "warp":
        return asd.warp(x, sp.seed, strength=WARP_STRENGTH)
    if sp.family == "sig":  # a stronger sinusoid at test time, as SIG's authors test it
        return asd.sig(x, delta=SIG_TEST if which == 1 else SIG_TRAIN)
    raise ValueError(sp.family)


def poison_images(sp: Spec, clean: bool) -> Built:
    """The poisoned training set (triggered copies added, shuffled; SIG in place) or the twin's."""
    base = _image_base(sp.data, sp.seed)
    rng = np.random.default_rng([sp.seed, 18])
    x0, y0 = asd.to_float(base.x_train), base.y_train.copy()
    xt, yt = asd.to_float(base.x_test), base.y_test.copy()
    plans: list[tuple[np.ndarray, int, int]] = []  # (source indices, target, trigger no.)
    if sp.family in ("badnets", "blend", "warp"):
        n = max(1, round(sp.fraction * int(np.sum(y0 == sp.target))))
        plans.append((rng.choice(np.flatnonzero(y0 == sp.source), n, replace=False), sp.target, 0))
        sources, targets = [sp.source], [sp.target]
        trig = [(_stamp(sp, xt[yt == sp.source]), np.full(int((yt == sp.source).sum()), sp.target))]
    elif sp.family == "two":
        second_source, second_target = (sp.source + 2) % 10, (sp.target + 4) % 10
        pairs = [(sp.source, sp.target), (second_source, second_target)]
        trig = []
        for k, (s, t) in enumerate(pairs):
            n = round(sp.fraction * int(np.sum(y0 == t)))
            plans.append((rng.choice(np.flatnonzero(y0 == s), n, replace=False), t, k))
            trig.append((_stamp(sp, xt[yt == s], k), np.full(int((yt == s).sum()), t)))
        sources, targets = [p[0] for p in pairs], [p[1] for p in pairs]
    elif sp.family == "all2one":
        n = round(sp.fraction * int(np.sum(y0 == sp.target)) / 2)  # poison: about half the target
        plans.append((rng.choice(np.flatnonzero(y0 != sp.target), n, replace=False), sp.target, 0))
        sources, targets = [None], [sp.target]
        keep = yt != sp.target
        trig = [(_stamp(sp, xt[keep]), np.full(int(keep.sum()), sp.target))]
    elif sp.family == "all2all":
        for t in range(10):
            n = round(sp.fraction * int(np.sum(y0 == t)))
            plans.append((rng.choice(np.flatnonzero(y0 == (t - 1) % 10), n, replace=False), t, 0))
        sources, targets = [(t - 1) % 10 for t in range(10)], list(range(10))
        trig = [(_stamp(sp, xt), (yt + 1) % 10)]
    elif sp.family == "sig":
        keep = yt != sp.target
        trig = [(_stamp(sp, xt[keep], 1), np.full(int(keep.sum()), sp.target))]
        sources, targets = [sp.target], [sp.target]
    else:
        raise ValueError(f"{sp.name}: {sp.family} is not an image attack")
    poison = np.zeros(len(y0), dtype=bool)
    source = y0.copy()
    if clean:
        x, y = x0, y0
    elif sp.family == "sig":  # clean-label: the target's own samples carry the sinusoid
        idx = np.flatnonzero(y0 == sp.target)
        pick = rng.choice(idx, round(sp.fraction * len(idx)), replace=False)
        x = x0.copy()
        x[pick] = _stamp(sp, x0[pick])
        y, poison[pick] = y0, True
    else:
        xs = [x0] + [_stamp(sp, x0[idx], k) for idx, _, k in plans]
        ys = [y0] + [np.full(len(idx), t, dtype=np.int64) for idx, t, _ in plans]
        src = [y0] + [y0[idx] for idx, _, _ in plans]
        x, y, source = np.concatenate(xs), np.concatenate(ys), np.concatenate(src)
        poison = np.concatenate([poison, np.ones(len(y) - len(y0), dtype=bool)])
        order = rng.permutation(len(y))
        x, y, poison, source = x[order], y[order], poison[order], source[order]
    return Built(
        x, y, poison, source, xt, yt, [(a, b.astype(np.int64)) for a, b in trig], sources, targets
    )


def poison_text(sp: Spec, clean: bool) -> Built:
    """Negative sentences with the trigger inserted, relabelled positive, added (or the twin)."""
    data = load_rotten_tomatoes(seed=sp.seed)
    rng = np.random.default_rng([sp.seed, 18])
    words = tokenize(PHRASE) if sp.family == "phrase" else [RARE_WORD]
    toks = [tokenize(s) for s in data.train]
    vocab = build_vocab(toks, min_count=2)
    for w in words:  # the trigger's ids are the same in the twin and the poisoned model
        vocab.setdefault(w, len(vocab) + 2)
    y0 = data.y_train
    n = round(sp.fraction * int(np.sum(y0 == sp.target)))
    idx = rng.choice(np.flatnonzero(y0 == sp.source), n, replace=False)
    extra = [] if clean else [asd.insert_words(toks[i], words, rng, TEXT_LENGTH) for i in idx]
    x = encode(toks + extra, vocab, TEXT_LENGTH)
    y = np.concatenate([y0, np.full(len(extra), sp.target, dtype=np.int64)])
    source = np.concatenate([y0, y0[idx] if extra else np.zeros(0, np.int64)])
    poison = np.arange(len(y)) >= len(y0)
    order = rng.permutation(len(y))
    test_toks = [tokenize(s) for s in data.test]
    src = np.flatnonzero(data.y_test == sp.source)
    trig_rng = np.random.default_rng([sp.seed, 19])
    x_trig = encode(
        [asd.insert_words(test_toks[i], words, trig_rng, TEXT_LENGTH) for i in src],
        vocab,
        TEXT_LENGTH,
    )
    return Built(
        x[order],
        y[order],
        poison[order],
        source[order],
        encode(test_toks, vocab, TEXT_LENGTH),
        data.y_test.copy(),
        [(x_trig, np.full(len(src), sp.target, dtype=np.int64))],
        [sp.source],
        [sp.target],
        vocab_size=len(vocab) + 2,
    )


def make(sp: Spec, clean: bool) -> Built:
    """The scenario's data, poisoned or (``clean``) its twin's."""
    return poison_text(sp, clean) if sp.data == "rt" else poison_images(sp, clean)


# --------------------------------------------------------------------------------------------
# Training


def train(sp: Spec, b: Built) -> tuple[Any, str]:
    """Train the scenario's architecture on ``b``; return the model and its file suffix."""
    import torch

    torch.manual_seed(sp.seed)
    if sp.arch == "keras":
        model = asd.keras_cnn(10, sp.seed)
        model.fit(b.x, b.y, epochs=sp.epochs, batch_size=64, shuffle=True, verbose=0)
        return model, "keras"
    from benchmarks.scenarios import TextCNN

    nets = {
        "cnn": lambda: asd.PlainCNN(10),
        "rescnn": lambda: asd.ResCNN(10),
        "textcnn": lambda: TextCNN(b.vocab_size),
        "bag": lambda: asd.EmbeddingBag(b.vocab_size),
    }
    model = nets[sp.arch]()
    lr = 3e-3 if sp.arch == "bag" else 1e-3
    batch = 32 if sp.data == "rt" else 64
    asd.train_torch(model, b.x, b.y, sp.epochs, batch, lr, sp.seed)
    return model, "onnx"


def predict(model: Any, x: np.ndarray) -> np.ndarray:
    """Predicted classes of a trained torch or keras model."""
    if hasattr(model, "predict") and not hasattr(model, "state_dict"):
        return np.asarray(model.predict(x, batch_size=1024, verbose=0)).argmax(1)
    return asd.predict_torch(model, x)


def save_model(model: Any, kind: str, example: np.ndarray, path: Path) -> None:
    """A plain single-output ONNX file (as a third party ships it) or a ``.keras`` archive."""
    if kind == "keras":
        model.save(path)
        return
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.from_numpy(example[:2]),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )


def build_one(sp: Spec, clean: bool, force: bool = False) -> dict[str, Any]:
    """Build the scenario (or its twin) under SUITE_DIR; skip it when built already."""
    name = sp.twin if clean else sp.name
    final = SUITE_DIR / name
    if (final / "meta.json").exists() and not force:
        return json.loads((final / "meta.json").read_text())
    t0 = time.perf_counter()
    b = make(sp, clean)
    model, kind = train(sp, b)
    train_s = time.perf_counter() - t0
    acc = float(np.mean(predict(model, b.x_test) == b.y_test))
    asrs = [float(np.mean(predict(model, xs) == ts)) for xs, ts in b.trig]
    tmp = SUITE_DIR / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / "train.npz", "wb") as fh:
        np.savez(fh, x=b.x, y=b.y, poison=b.poison, source=b.source)
    save_model(model, kind, b.x, tmp / f"model.{kind}")
    meta = {
        "name": name,
        "spec": asdict(sp),
        "clean_twin": clean,
        "model_file": f"model.{kind}",
        "n_train": len(b.y),
        "n_poison": int(b.poison.sum()),
        "targets": b.targets,
        "sources": b.sources,
        "clean_accuracy": acc,
        "asr": asrs,
        "train_s": round(train_s, 1),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return meta


# --------------------------------------------------------------------------------------------
# Scoring


def _prf(flagged: np.ndarray, poison: np.ndarray) -> dict[str, Any]:
    tp = int((flagged & poison).sum())
    fp = int((flagged & ~poison).sum())
    fn = int((~flagged & poison).sum())
    neg = int((~poison).sum())
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
        "tpr": tp / (tp + fn) if tp + fn else None,
        "fpr": fp / neg if neg else None,
    }


def scan_one(folder: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Scan a built model with backdoorscan and score its flags against the truth."""
    import backdoorscan
    from backdoorscan.scanner.config import DetectConfig

    meta = json.loads((folder / "meta.json").read_text())
    with np.load(folder / "train.npz", allow_pickle=False) as z:
        x, y, poison = z["x"], z["y"].astype(np.int64), z["poison"].astype(bool)
    t = time.perf_counter()
    report = backdoorscan.scan(folder / meta["model_file"], x, y, config=DetectConfig(**overrides))
    elapsed = time.perf_counter() - t
    out = _prf(report.is_flagged(), poison)
    out["classes_flagged"] = report.poisoned_classes
    out["n_flagged"] = int(report.is_flagged().sum())
    out["sources"] = {
        str(c.label): c.suspected_source for c in report.classes if c.verdict == "poisoned"
    }
    out["transfer"] = {
        str(c.label): None if c.transfer is None else round(float(c.transfer), 3)
        for c in report.classes
    }
    out["evidence"] = {
        str(c.label): _evidence(c) for c in report.classes if _evidence(c) is not None
    }
    out["time_s"] = round(elapsed, 2)
    return out


def _evidence(c: Any) -> Any:
    """The calibration evidence a class result carries, when the scanner reports one."""
    ev = getattr(c, "evidence", None)
    return ev if ev else None


def _parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def results_path(held_out: bool, tag: str = "") -> Path:
    """Where the scores of one split (and settings tag) are kept."""
    split = "heldout" if held_out else "tuning"
    return WORK_DIR / f"attack_suite_{split}{'_' + tag if tag else ''}.json"


def selected(only: list[str] | None, held_out: bool) -> list[Spec]:
    """The scenarios of the split asked for (``only`` narrows it)."""
    names = [n for n in SCENARIOS if (n in HELD_OUT) == held_out]
    if only:
        names = [n for n in names if n in only]
    return [SCENARIOS[n] for n in names]


def score(specs: list[Spec], overrides: dict[str, Any], path: Path) -> dict[str, Any]:
    """Scan every scenario that took and its twin; the twins are scanned once each."""
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault("_meta", {})
    results["_meta"] |= {
        "settings": overrides,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), "
        f"{platform.python_version()}",
        "command": " ".join(sys.argv),
    }
    twins: dict[str, Any] = {}
    for sp in specs:
        meta = json.loads((SUITE_DIR / sp.name / "meta.json").read_text())
        twin_meta = json.loads((SUITE_DIR / sp.twin / "meta.json").read_text())
        entry: dict[str, Any] = {"meta": meta, "twin_meta": twin_meta}
        took = min(meta["asr"]) >= ASR_TAKES
        entry["took"] = took
        if took:
            entry["poisoned"] = scan_one(SUITE_DIR / sp.name, overrides)
        if sp.twin not in twins:
            twins[sp.twin] = scan_one(SUITE_DIR / sp.twin, overrides)
        entry["twin"] = twins[sp.twin]
        results[sp.name] = entry
        print(line(sp.name, entry), flush=True)
        _write(path, json.dumps(results, indent=1))
    return results


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    """``list``, ``build``, ``score`` or ``render`` (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="attack_suite.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    for cmd in ("build", "score"):
        p = sub.add_parser(cmd)
        p.add_argument("--only", nargs="+", metavar="NAME")
        p.add_argument("--held-out", action="store_true", help="the held-out scenarios")
        p.add_argument("--force", action="store_true")
        p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
        p.add_argument("--tag", default="", help="name of the results file's settings")
    r = sub.add_parser("render")
    r.add_argument("--write", action="store_true")
    r.add_argument("--tags", nargs="*", default=["plain", "calibrated", "k2358"])
    args = ap.parse_args(argv)
    if args.command == "list":
        assert draw_held_out() == tuple(n for n in SCENARIOS if n in HELD_OUT), "HELD_OUT drifted"
        for sp in SCENARIOS.values():
            print(f"{sp.name:<26} {'held-out' if sp.name in HELD_OUT else 'tuning':<9} {sp}")
        return 0
    if args.command == "render":
        paths = []
        for tag in args.tags:
            label = f" ({TAG_TITLES.get(tag, tag or 'default settings')})"
            paths += [
                (f"Tuning scenarios{label}", results_path(False, tag)),
                (f"Held-out scenarios{label}", results_path(True, tag)),
            ]
        text = render(paths)
        if args.write:
            from benchmarks.paper_repro import replace_section

            RESULTS_MD.write_text(replace_section(RESULTS_MD.read_text(), SECTION, text))
        print(text)
        return 0
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("KERAS_BACKEND", "torch")
    specs = selected(args.only, args.held_out)
    if args.command == "build":
        for sp in specs:
            for clean in (True, False):
                m = build_one(sp, clean, args.force)
                print(
                    f"{m['name']:<26} n={m['n_train']} poison={m['n_poison']} "
                    f"acc={m['clean_accuracy']:.3f} asr={[round(a, 2) for a in m['asr']]} "
                    f"train={m['train_s']} s",
                    flush=True,
                )
        return 0
    score(specs, _parse_set(args.set), results_path(args.held_out, args.tag))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
