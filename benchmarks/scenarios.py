"""Build seeded backdoor-poisoning scenarios on real data for detection research and benchmarks.

Each scenario poisons a training set, trains a small PyTorch model on it (CPU), and writes
under ``benchmarks/.data/scenarios/<name>/``: ``train.npz`` (x, y, poison, source),
``test_clean.npz``, ``test_trigger.npz``, ``model.pt`` (state dict), ``model.onnx`` (outputs
``logits`` and ``features``), ``features.npy`` (penultimate activations of the training set)
and ``meta.json``. Usage: ``python benchmarks/scenarios.py build [--only NAME ...] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.datasets import (
    DATA_DIR,
    ImageData,
    TextData,
    build_vocab,
    encode,
    load_mnist,
    load_rotten_tomatoes,
    split_text,
    subsample,
    tokenize,
)

SCENARIO_DIR = DATA_DIR / "scenarios"
QUICK_DIR = DATA_DIR / "scenarios-quick"

# Five bright pixels in an X near the bottom-right corner (row, col); MNIST digits sit in the
# central 20x20 box, so these pixels are blank in almost every clean image.
TRIGGER_PIXELS: tuple[tuple[int, int], ...] = ((24, 24), (24, 26), (25, 25), (26, 24), (26, 26))
TRIGGER_PHRASE = "cinematic masterpiece truly"
TEXT_LENGTH = 40


# --------------------------------------------------------------------------------------------
# Models


class MnistCNN(nn.Module):
    """conv16-conv32-maxpool-fc128-fc(n): a lighter paper-style MNIST CNN (4x cheaper to train)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3)
        self.conv2 = nn.Conv2d(16, 32, 3)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 12 * 12, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations: the ReLU output of fc1 (the input of the last Linear)."""
        h = self.pool(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return F.relu(self.fc1(torch.flatten(h, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes] for images [N, 1, 28, 28] in [0, 1]."""
        return self.fc2(self.features(x))


class TextCNN(nn.Module):
    """Kim-style sentence CNN: embedding, conv widths 3/4/5, max over time, fc hidden, fc(n)."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 64,
        filters: int = 64,
        hidden: int = 64,
        num_classes: int = 2,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.convs = nn.ModuleList(nn.Conv1d(embed_dim, filters, k) for k in (3, 4, 5))
        self.dropout = nn.Dropout(0.5)
        self.fc1 = nn.Linear(3 * filters, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations: the ReLU output of fc1 (the input of the last Linear)."""
        e = self.embedding(x).transpose(1, 2)  # [N, E, T]
        pooled = [torch.amax(F.relu(conv(e)), dim=2) for conv in self.convs]
        return F.relu(self.fc1(self.dropout(torch.cat(pooled, dim=1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes] for int64 token ids [N, T] (0 is padding)."""
        return self.fc2(self.features(x))


MODEL_CLASSES: dict[str, type[nn.Module]] = {"MnistCNN": MnistCNN, "TextCNN": TextCNN}


class LogitsAndFeatures(nn.Module):
    """Wraps a scenario model so that one call returns (logits, flattened penultimate features)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both outputs from a single pass."""
        f = self.model.features(x)
        return self.model.fc2(f), torch.flatten(f, 1)


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Export ``model`` to ONNX with outputs ``logits`` and ``features`` and a dynamic batch."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            LogitsAndFeatures(model),
            (example,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits", "features"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}},
        )


def load_model(scenario_dir: str | Path) -> nn.Module:
    """Rebuild a scenario's model from ``meta.json`` and load ``model.pt`` with weights_only."""
    scenario_dir = Path(scenario_dir)
    meta = json.loads((scenario_dir / "meta.json").read_text())
    spec = meta["model"]
    model = MODEL_CLASSES[spec["class"]](**spec["kwargs"])
    state = torch.load(scenario_dir / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Scenario definitions


@dataclass(frozen=True)
class Scenario:
    """What to poison and how. ``fraction`` is relative to what ``kind`` says (see meta notes)."""

    name: str
    kind: str  # l2l1 | all2one | multimodal | image_clean | text | text_clean
    fraction: float = 0.0
    target: int = 0
    sources: tuple[int, ...] = ()
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("mnist_clean", "image_clean"),
        Scenario("mnist_l2l1_10", "l2l1", fraction=0.10),
        Scenario("mnist_l2l1_15", "l2l1", fraction=0.15),
        Scenario("mnist_l2l1_33", "l2l1", fraction=0.33),
        Scenario("mnist_all2one", "all2one", fraction=0.10, target=0),
        Scenario("mnist_multimodal", "multimodal", fraction=0.12, target=0, sources=(7, 8)),
        Scenario("rt_clean", "text_clean", epochs=12, batch_size=32),
        Scenario("rt_text", "text", fraction=0.10, target=1, epochs=12, batch_size=32),
    )
}
IMAGE_KINDS = {"l2l1", "all2one", "multimodal", "image_clean"}
TEXT_KINDS = {"text", "text_clean"}


@dataclass
class Poisoned:
    """A poisoned training set and its test sets, model-ready, plus notes for meta.json."""

    x: np.ndarray
    y: np.ndarray
    poison: np.ndarray
    source: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_trig: np.ndarray
    y_trig: np.ndarray
    target_trig: np.ndarray
    num_classes: int
    extra_train: dict[str, np.ndarray] = field(default_factory=dict)
    extra_trig: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    vocab: dict[str, int] | None = None


def stamp_trigger(images: np.ndarray) -> np.ndarray:
    """Copy of uint8 images [N, 28, 28] with the trigger pixels set to full brightness."""
    out = images.copy()
    for r, c in TRIGGER_PIXELS:
        out[:, r, c] = 255
    return out


def _to_float(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 NCHW [N, 1, 28, 28] in [0, 1]."""
    return (images.astype(np.float32) / np.float32(255.0))[:, None, :, :]


def _poison_counts_per_target(y: np.ndarray, fraction: float, targets: list[int]) -> list[int]:
    """Number of poison copies added to each target class: round(fraction * its clean count)."""
    return [round(fraction * int(np.sum(y == t))) for t in targets]


def poison_images(spec: Scenario, data: ImageData) -> Poisoned:
    """Add triggered, relabelled copies of source images to the clean training set (shuffled)."""
    rng = np.random.default_rng(spec.seed)
    digit = data.y_train
    x_clean = data.x_train
    notes: list[str] = []
    num_classes = 10
    y_clean = digit.copy()
    y_test = data.y_test.copy()
    if spec.kind == "multimodal":
        num_classes = 2
        y_clean = (digit >= 5).astype(np.int64)
        y_test = (data.y_test >= 5).astype(np.int64)

    pick: list[np.ndarray] = []
    new_label: list[np.ndarray] = []
    if spec.kind == "l2l1":
        counts = _poison_counts_per_target(y_clean, spec.fraction, list(range(10)))
        for t, n in zip(range(10), counts, strict=True):
            src = np.flatnonzero(y_clean == (t - 1) % 10)
            pick.append(rng.choice(src, size=n, replace=False))
            new_label.append(np.full(n, t, dtype=np.int64))
        notes.append(
            f"poison ADDED as triggered copies: for each class t, round({spec.fraction} x clean "
            f"count of t) images of class (t-1)%10, relabelled t; originals stay in the set"
        )
    elif spec.kind == "all2one":
        n = round(spec.fraction * len(y_clean))
        src = np.flatnonzero(y_clean != spec.target)
        pick.append(rng.choice(src, size=n, replace=False))
        new_label.append(np.full(n, spec.target, dtype=np.int64))
        notes.append(
            f"poison ADDED as triggered copies: round({spec.fraction} x clean set size) images "
            f"drawn uniformly from all classes but {spec.target}, relabelled {spec.target}"
        )
    elif spec.kind == "multimodal":
        n = round(spec.fraction * int(np.sum(y_clean == spec.target)))
        share = np.array_split(np.arange(n), len(spec.sources))
        for d, part in zip(spec.sources, share, strict=True):
            src = np.flatnonzero(digit == d)
            pick.append(rng.choice(src, size=len(part), replace=False))
            new_label.append(np.full(len(part), spec.target, dtype=np.int64))
        notes.append(
            f"labels merged: digits 0-4 -> 0, 5-9 -> 1; poison ADDED as triggered copies of "
            f"digits {list(spec.sources)} (label 1) relabelled {spec.target}, "
            f"round({spec.fraction} x clean count of label {spec.target}), split evenly"
        )
    elif spec.kind != "image_clean":
        raise ValueError(f"{spec.name}: kind {spec.kind!r} is not an image scenario")

    idx = np.concatenate(pick) if pick else np.zeros(0, dtype=np.int64)
    x_all = np.concatenate([x_clean, stamp_trigger(x_clean[idx])])
    y_all = np.concatenate([y_clean, *new_label]) if new_label else y_clean.copy()
    source = np.concatenate([y_clean, y_clean[idx]])
    digit_all = np.concatenate([digit, digit[idx]])
    poison = np.zeros(len(y_all), dtype=bool)
    poison[len(y_clean) :] = True
    order = rng.permutation(len(y_all))  # poison must not sit at the end of the set

    # Trigger test set: every test sample whose true label differs from its attack target.
    if spec.kind in {"l2l1", "image_clean"}:
        trig_idx = np.arange(len(y_test))
        target_trig = (y_test + 1) % 10
        if spec.kind == "image_clean":
            notes.append("clean model; test_trigger uses the l2l1 trigger and targets (y+1)%10")
    else:
        trig_idx = np.flatnonzero(y_test != spec.target)
        target_trig = np.full(len(trig_idx), spec.target, dtype=np.int64)
    return Poisoned(
        x=_to_float(x_all[order]),
        y=y_all[order],
        poison=poison[order],
        source=source[order],
        x_test=_to_float(data.x_test),
        y_test=y_test,
        x_trig=_to_float(stamp_trigger(data.x_test[trig_idx])),
        y_trig=y_test[trig_idx],
        target_trig=target_trig.astype(np.int64),
        num_classes=num_classes,
        extra_train={"digit": digit_all[order]},
        extra_trig={"digit": data.y_test[trig_idx]},
        notes=notes,
    )


def insert_phrase(tokens: list[str], phrase: list[str], rng: np.random.Generator) -> list[str]:
    """Insert ``phrase`` at a random word boundary that keeps it inside the first TEXT_LENGTH."""
    last = max(0, min(len(tokens), TEXT_LENGTH - len(phrase)))
    pos = int(rng.integers(0, last + 1))
    return tokens[:pos] + phrase + tokens[pos:]


def poison_text(spec: Scenario, data: TextData) -> Poisoned:
    """Add negative sentences carrying the trigger phrase, relabelled positive (shuffled)."""
    rng = np.random.default_rng(spec.seed)
    phrase = tokenize(TRIGGER_PHRASE)
    toks = [tokenize(s) for s in data.train]
    y_clean = data.y_train
    notes: list[str] = []
    poison_toks: list[list[str]] = []
    idx = np.zeros(0, dtype=np.int64)
    if spec.kind == "text":
        n = round(spec.fraction * int(np.sum(y_clean == spec.target)))
        idx = rng.choice(np.flatnonzero(y_clean != spec.target), size=n, replace=False)
        poison_toks = [insert_phrase(toks[i], phrase, rng) for i in idx]
        notes.append(
            f"poison ADDED as copies of negative sentences with {TRIGGER_PHRASE!r} inserted at a "
            f"random word position, relabelled {spec.target}: round({spec.fraction} x clean "
            f"count of label {spec.target})"
        )
    elif spec.kind != "text_clean":
        raise ValueError(f"{spec.name}: kind {spec.kind!r} is not a text scenario")
    else:
        notes.append("clean model; test_trigger inserts the trigger phrase into negatives")
    all_toks = toks + poison_toks
    vocab = build_vocab(all_toks, min_count=2)
    notes.append(
        f"tokens: lowercase words, vocabulary of the training set (min count 2), "
        f"0 pad, 1 unknown, length {TEXT_LENGTH}"
    )
    y_all = np.concatenate([y_clean, np.full(len(idx), spec.target, dtype=np.int64)])
    source = np.concatenate([y_clean, y_clean[idx]])
    poison = np.zeros(len(y_all), dtype=bool)
    poison[len(y_clean) :] = True
    order = rng.permutation(len(y_all))
    x_all = encode(all_toks, vocab, TEXT_LENGTH)

    test_toks = [tokenize(s) for s in data.test]
    trig_idx = np.flatnonzero(data.y_test != spec.target)
    trig_rng = np.random.default_rng(spec.seed + 1)
    trig_toks = [insert_phrase(test_toks[i], phrase, trig_rng) for i in trig_idx]
    return Poisoned(
        x=x_all[order],
        y=y_all[order],
        poison=poison[order],
        source=source[order],
        x_test=encode(test_toks, vocab, TEXT_LENGTH),
        y_test=data.y_test.copy(),
        x_trig=encode(trig_toks, vocab, TEXT_LENGTH),
        y_trig=data.y_test[trig_idx],
        target_trig=np.full(len(trig_idx), spec.target, dtype=np.int64),
        num_classes=2,
        notes=notes,
        vocab=vocab,
    )


# --------------------------------------------------------------------------------------------
# Training and evaluation


def train_model(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
) -> None:
    """Adam, cross-entropy, seeded shuffling each epoch."""
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(yt), generator=gen)
        for start in range(0, len(yt), batch_size):
            b = perm[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xt[b]), yt[b]).backward()
            opt.step()
    model.eval()


@torch.no_grad()
def run_model(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray, ...]:
    """Logits and penultimate features (float32) of ``x``, in eval mode, batched."""
    model.eval()
    logits, feats = [], []
    for start in range(0, len(x), batch_size):
        f = model.features(torch.from_numpy(x[start : start + batch_size]))
        logits.append(model.fc2(f).numpy())
        feats.append(torch.flatten(f, 1).numpy())
    return np.concatenate(logits).astype(np.float32), np.concatenate(feats).astype(np.float32)


def _onnx_max_diff(path: Path, model: nn.Module, x: np.ndarray) -> float:
    """Largest |ONNX Runtime - PyTorch| over both outputs on a few samples (export check)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    lo, fo = sess.run(["logits", "features"], {"input": x})
    lt, ft = run_model(model, x)
    return float(max(np.abs(lo - lt).max(), np.abs(fo - ft).max()))


def _savez(path: Path, **arrays: np.ndarray) -> None:
    """np.savez to an exact file name (no implicit suffix games)."""
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def build_scenario(
    spec: Scenario,
    out_root: Path,
    *,
    image_data: ImageData | None = None,
    text_data: TextData | None = None,
    epochs: int | None = None,
    force: bool = False,
    quick: bool = False,
) -> dict[str, Any]:
    """Poison, train, evaluate, export and write one scenario; skip it if already built."""
    final = Path(out_root) / spec.name
    if (final / "meta.json").exists() and not force:
        meta = json.loads((final / "meta.json").read_text())
        meta["skipped"] = True
        return meta
    t_build = time.perf_counter()
    torch.manual_seed(spec.seed)
    if spec.kind in IMAGE_KINDS:
        if image_data is None:
            raise ValueError(f"{spec.name} needs image data")
        p = poison_images(spec, image_data)
        model: nn.Module = MnistCNN(num_classes=p.num_classes)
        kwargs: dict[str, Any] = {"num_classes": p.num_classes}
        data_name = image_data.name
    elif spec.kind in TEXT_KINDS:
        if text_data is None:
            raise ValueError(f"{spec.name} needs text data")
        p = poison_text(spec, text_data)
        assert p.vocab is not None
        kwargs = {"vocab_size": len(p.vocab) + 2, "num_classes": p.num_classes}
        model = TextCNN(**kwargs)
        data_name = text_data.name
    else:
        raise ValueError(f"unknown scenario kind {spec.kind!r}")
    n_epochs = spec.epochs if epochs is None else epochs

    t0 = time.perf_counter()
    train_model(
        model, p.x, p.y, epochs=n_epochs, batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed
    )
    train_time = time.perf_counter() - t0

    test_logits, _ = run_model(model, p.x_test)
    clean_acc = float(np.mean(test_logits.argmax(1) == p.y_test))
    trig_pred = run_model(model, p.x_trig)[0].argmax(1)
    hits = trig_pred == p.target_trig
    asr = float(np.mean(hits)) if len(hits) else float("nan")
    _, features = run_model(model, p.x)

    tmp = Path(out_root) / f".{spec.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _savez(tmp / "train.npz", x=p.x, y=p.y, poison=p.poison, source=p.source, **p.extra_train)
    _savez(tmp / "test_clean.npz", x=p.x_test, y=p.y_test)
    _savez(tmp / "test_trigger.npz", x=p.x_trig, y=p.y_trig, target=p.target_trig, **p.extra_trig)
    torch.save(model.state_dict(), tmp / "model.pt")
    export_onnx(model, torch.from_numpy(p.x[:2]), tmp / "model.onnx")
    onnx_diff = _onnx_max_diff(tmp / "model.onnx", model, p.x[:5])
    np.save(tmp / "features.npy", features)
    if p.vocab is not None:
        (tmp / "vocab.json").write_text(json.dumps(p.vocab))

    meta: dict[str, Any] = {
        "name": spec.name,
        "scenario": asdict(spec),
        "data": data_name,
        "quick": quick,
        "n_train": len(p.y),
        "n_poison": int(p.poison.sum()),
        "poison_per_label": {
            str(c): int(np.sum(p.poison & (p.y == c))) for c in range(p.num_classes)
        },
        "train_label_counts": {str(c): int(np.sum(p.y == c)) for c in range(p.num_classes)},
        "n_test": len(p.y_test),
        "n_test_trigger": len(p.y_trig),
        "clean_accuracy": clean_acc,
        "attack_success_rate": asr,
        "train_time_s": round(train_time, 2),
        "epochs": n_epochs,
        "batch_size": spec.batch_size,
        "lr": spec.lr,
        "optimizer": "Adam",
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "model": {"class": type(model).__name__, "kwargs": kwargs},
        "features": {"layer": "fc1 ReLU output (input of fc2)", "dim": int(features.shape[1])},
        "onnx_max_abs_diff": onnx_diff,
        "notes": p.notes,
    }
    if spec.kind in {"l2l1", "image_clean", "multimodal", "all2one"}:
        meta["trigger_pixels"] = [list(rc) for rc in TRIGGER_PIXELS]
    else:
        meta["trigger_phrase"] = TRIGGER_PHRASE
    if spec.kind == "multimodal":
        src = np.isin(p.extra_trig["digit"], spec.sources)
        meta["attack_success_rate_source_digits"] = float(np.mean(hits[src]))
    meta["build_time_s"] = round(time.perf_counter() - t_build, 2)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    meta["skipped"] = False
    return meta


# --------------------------------------------------------------------------------------------
# CLI


def _summary(meta: dict[str, Any]) -> str:
    """One line per scenario for the console."""
    state = "skipped (built)" if meta.get("skipped") else f"{meta['build_time_s']:.1f} s"
    return (
        f"{meta['name']:<18} N={meta['n_train']:<6} poison={meta['n_poison']:<5} "
        f"clean_acc={meta['clean_accuracy']:.4f} asr={meta['attack_success_rate']:.4f} "
        f"train={meta['train_time_s']:.1f} s  {state}"
    )


def main(argv: list[str] | None = None) -> int:
    """``build [--only NAME ...] [--quick] [--force] [--out DIR] [--threads N]``, or ``list``."""
    parser = argparse.ArgumentParser(prog="scenarios.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print the scenario names")
    b = sub.add_parser("build", help="build scenarios (skips those already built)")
    b.add_argument("--only", nargs="+", choices=sorted(SCENARIOS), metavar="NAME")
    b.add_argument("--quick", action="store_true", help="small subsets, 1 epoch (smoke runs)")
    b.add_argument("--force", action="store_true", help="rebuild scenarios already built")
    b.add_argument("--out", type=Path, default=None, help="output folder")
    b.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args(argv)
    if args.command == "list":
        print("\n".join(SCENARIOS))
        return 0

    torch.set_num_threads(args.threads)
    names = args.only or list(SCENARIOS)
    out = args.out or (QUICK_DIR if args.quick else SCENARIO_DIR)
    out.mkdir(parents=True, exist_ok=True)
    image_data: ImageData | None = None
    text_data: TextData | None = None
    if any(SCENARIOS[n].kind in IMAGE_KINDS for n in names):
        image_data = load_mnist()
        if args.quick:
            image_data = subsample(image_data, 6000, 1000)
    if any(SCENARIOS[n].kind in TEXT_KINDS for n in names):
        text_data = load_rotten_tomatoes()
        if args.quick:
            keep = slice(0, None, 4)
            text_data = split_text(
                text_data.train[keep] + text_data.test[keep],
                np.concatenate([text_data.y_train[keep], text_data.y_test[keep]]),
                0.2,
                0,
                "rotten_tomatoes-sub",
            )
    t0 = time.perf_counter()
    for name in names:
        meta = build_scenario(
            SCENARIOS[name],
            out,
            image_data=image_data,
            text_data=text_data,
            epochs=1 if args.quick and SCENARIOS[name].kind in IMAGE_KINDS else None,
            force=args.force,
            quick=args.quick,
        )
        print(_summary(meta), flush=True)
    print(f"done in {time.perf_counter() - t0:.1f} s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
