"""Training data given as several shard files: ``--data 'shards/train-*.npz'``.

A shard is an ``.npz`` (arrays ``x`` and ``y``, or ``--x-key``/``--y-key``) or a pair of
``.npy`` files whose names differ only in a last ``x``/``y`` part after ``-``, ``_`` or ``.``
(``train-0-x.npy`` and ``train-0-y.npy``; the glob may match the samples' files only, or both).
The shards are taken in the sorted order of their (samples') paths; the global sample index is
their concatenation order, so a flagged index refers to the row of the same rank in
``cat shard0 shard1 ...``. Each shard is loaded as one data file is (:func:`load_data`: headers
checked, memory-mapped, nothing unpickled, hashed before it is read), and :class:`ShardRows`
reads rows across them as one array, with the shards' explicit readers.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from backdoorscan._io import sha256_file
from backdoorscan.scanner.data import DataError, Dataset, load_data
from backdoorscan.scanner.datafiles import FileRows, Source, check_input_file

__all__ = ["ShardRows", "is_glob", "load_shards", "open_shards", "shard_paths"]

GLOB_CHARS = "*?["
SEPARATORS = "-_."
# A shard: an .npz file, or the .npy files of its samples and its labels.
Shard = tuple[Path, Path | None]


def is_glob(data: str | Path) -> bool:
    """Whether ``data`` is a glob of shard files rather than one file's path."""
    text = str(data)
    return any(ch in text for ch in GLOB_CHARS) and not Path(text).exists()


def shard_paths(pattern: str | Path, x_key: str = "x", y_key: str = "y") -> list[Shard]:
    """The shards matching ``pattern`` as ``(file, None)`` for an ``.npz`` and ``(samples,
    labels)`` for an ``.npy`` pair, sorted by path; none, or a file of no shard, is a DataError."""
    paths = sorted(Path(p) for p in glob.glob(str(pattern)))
    paths = [p for p in paths if not p.is_dir()]
    if not paths:
        raise DataError(f"no data file matches {pattern}")
    shards: list[Shard] = []
    labels_seen: set[Path] = set()
    for p in paths:
        suffix = p.suffix.lower()
        if suffix == ".npz":
            shards.append((p, None))
            continue
        role = _npy_role(p, x_key, y_key) if suffix == ".npy" else None
        if role is None:
            raise DataError(
                f"shard files must be .npz archives (arrays {x_key} and {y_key}) or .npy pairs "
                f"named like train-0-{x_key}.npy and train-0-{y_key}.npy; {p.name} is neither"
            )
        if role == "labels":
            labels_seen.add(p)
            continue
        labels = p.with_name(p.stem[: -len(x_key)] + y_key + p.suffix)
        if not labels.is_file():
            raise DataError(f"shard {p.name} has no labels file {labels.name} beside it")
        shards.append((p, labels))
    orphans = labels_seen - {lab for _, lab in shards}
    if orphans:
        raise DataError(f"labels file {min(orphans).name} has no samples file beside it")
    return shards


def _npy_role(path: Path, x_key: str, y_key: str) -> str | None:
    """``data`` or ``labels`` for an ``.npy`` named ``<stem><sep><x_key or y_key>.npy``."""
    stem = path.stem
    for key, role in ((x_key, "data"), (y_key, "labels")):
        if stem.endswith(key) and len(stem) > len(key) and stem[-len(key) - 1] in SEPARATORS:
            return role
    return None


class ShardRows:
    """The samples of several files as one read-only array, in their concatenation order.

    ``read`` and ``take`` (what :class:`Dataset` asks its reader for) read each shard with its
    explicit reader where it has one (a file cut short is a DataError, not SIGBUS); indexing
    (``rows[i]``, ``rows[a:b]``, ``rows[array]``) reads the shards' arrays as loaded (mapped or
    in memory), as the mosaics of the HTML report do after the files are closed.
    """

    def __init__(
        self, parts: Sequence[np.ndarray], readers: Sequence[FileRows | None], names: list[str]
    ) -> None:
        self.parts = list(parts)
        self.readers = list(readers)
        self.names = names
        self.bounds = np.cumsum([0, *(len(p) for p in self.parts)])
        self.shape = (int(self.bounds[-1]), *self.parts[0].shape[1:])
        self.dtype = self.parts[0].dtype
        self.ndim = len(self.shape)
        # What the shards hold in memory (compressed members are unpacked; mapped ones are not).
        self.nbytes = sum(int(p.nbytes) for p in self.parts if not isinstance(p, np.memmap))

    def __len__(self) -> int:
        return self.shape[0]

    def _pieces(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """``(shard, local start, local stop)`` covering the global rows ``start:stop``."""
        out = []
        first = int(np.searchsorted(self.bounds, start, side="right")) - 1
        for s in range(max(first, 0), len(self.parts)):
            lo, hi = int(self.bounds[s]), int(self.bounds[s + 1])
            if lo >= stop:
                break
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                out.append((s, a - lo, b - lo))
        return out

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a new array, with the shards' explicit readers."""
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        at = 0
        for s, a, b in self._pieces(start, stop):
            reader = self.readers[s]
            out[at : at + b - a] = reader.read(a, b) if reader is not None else self.parts[s][a:b]
            at += b - a
        return out

    def take(self, sorted_indices: np.ndarray) -> np.ndarray:
        """Rows at ``sorted_indices`` (ascending)."""
        idx = np.asarray(sorted_indices, dtype=np.int64)
        out = np.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        shard = np.searchsorted(self.bounds, idx, side="right") - 1
        for s in np.unique(shard):
            where = np.flatnonzero(shard == s)
            local = idx[where] - self.bounds[s]
            reader = self.readers[s]
            out[where] = reader.take(local) if reader is not None else self.parts[s][local]
        return out

    def __getitem__(self, key: object) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if int(key) < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"index {int(key)} is out of bounds for {len(self)} samples")
            s = int(np.searchsorted(self.bounds, i, side="right")) - 1
            return np.asarray(self.parts[s][i - self.bounds[s]])
        if isinstance(key, slice):
            idx = np.arange(len(self))[key]
        else:
            idx = np.arange(len(self))[np.asarray(key)]
        order = np.argsort(idx, kind="stable")
        out = np.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        shard = np.searchsorted(self.bounds, idx[order], side="right") - 1
        for s in np.unique(shard):
            where = order[shard == s]
            out[where] = self.parts[s][idx[where] - self.bounds[s]]
        return out

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


def open_shards(
    paths: Sequence[str | Path | tuple[str | Path, str | Path | None]],
    *,
    x_key: str = "x",
    y_key: str = "y",
    max_bytes: int | None = None,
    hashes: Sequence[Sequence[str]] | None = None,
) -> Dataset:
    """One :class:`Dataset` over the shards ``paths`` (``.npz`` files, or ``(samples, labels)``
    ``.npy`` pairs), concatenated in that order.

    Each shard is loaded and checked as a single data file is; the shards must agree on the
    per-sample shape and dtype. ``hashes`` (per shard, the sha256 of each of its files, taken
    before it was read) are kept on the files' sources so that :func:`verify_unchanged` checks
    each file.
    """
    pairs = [(Path(p[0]), p[1]) if isinstance(p, tuple) else (Path(p), None) for p in paths]
    parts: list[Dataset] = []
    try:
        for i, (path, labels) in enumerate(pairs):
            part = load_data(path, labels, x_key=x_key, y_key=y_key, max_bytes=max_bytes)
            parts.append(part)
            if hashes is not None:
                for src, sha in zip(part.sources, hashes[i], strict=True):
                    src.sha256 = sha
            first = parts[0]
            if part.x.shape[1:] != first.x.shape[1:] or part.x.dtype != first.x.dtype:
                raise DataError(
                    f"shard {path.name} holds samples of shape {part.x.shape[1:]} and "
                    f"dtype {part.x.dtype}, but {pairs[0][0].name} holds "
                    f"{first.x.shape[1:]} {first.x.dtype}: every shard must agree"
                )
    except BaseException:
        for part in parts:
            part.close()
        raise
    names = [p.name for p, _ in pairs]
    rows = ShardRows([p.x for p in parts], [p.reader for p in parts], names)
    y = np.concatenate([p.y for p in parts])
    sources: list[Source] = [src for p in parts for src in p.sources]
    source = names[0] if len(names) == 1 else f"{len(names)} shards ({names[0]} .. {names[-1]})"
    return Dataset(x=rows, y=y, source=source, sources=sources, reader=rows)  # type: ignore[arg-type]


def load_shards(
    pattern: str | Path,
    *,
    x_key: str = "x",
    y_key: str = "y",
    max_bytes: int | None = None,
) -> Dataset:
    """The shards matching ``pattern`` (sorted by path) as one :class:`Dataset`.

    Every shard is hashed before it is read; the report's ``sha256`` is that of the list of
    the shards' names and hashes (one line each, in order), and ``path`` is the pattern.
    """
    shards = shard_paths(pattern, x_key, y_key)
    files = [[check_input_file(data, "data")] for data, _ in shards]
    for fs, (_, labels) in zip(files, shards, strict=True):
        if labels is not None:
            fs.append(check_input_file(labels, "labels"))
    # Each file hashed before it is read; several at once (hashlib and the reads release the
    # GIL): over many shards the driver's hashing is a pass over all the data.
    flat = [f for fs in files for f in fs]
    with ThreadPoolExecutor(max(1, min(len(flat), os.cpu_count() or 1, 8))) as pool:
        digests = iter(list(pool.map(sha256_file, flat)))
    hashes = [[next(digests) for _ in fs] for fs in files]
    manifest = "".join(
        f"{f.name} {h}\n"
        for fs, hs in zip(files, hashes, strict=True)
        for f, h in zip(fs, hs, strict=True)
    )
    ds = open_shards(shards, x_key=x_key, y_key=y_key, max_bytes=max_bytes, hashes=hashes)
    ds.files = {"path": str(pattern), "sha256": hashlib.sha256(manifest.encode()).hexdigest()}
    ds.notes.append(
        f"data: {len(shards)} shards matching {pattern}, concatenated in sorted order (the "
        "sample indices are global); its sha256 is that of the lines 'name sha256' of the shards"
    )
    return ds
