"""Training data given as several shard files: ``--data 'shards/train-*.npz'``.

The files matching the glob are taken in sorted order (by path); the global sample index is
their concatenation order, so a flagged index refers to the row of the same rank in
``cat shard0 shard1 ...``. Each shard is loaded as one ``.npz`` is (:func:`load_data`: headers
checked, uncompressed members memory-mapped, nothing unpickled, hashed before it is read), and
:class:`ShardRows` reads rows across them as one array, with the shards' explicit readers.
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from backdoorscan._io import sha256_file
from backdoorscan.scanner.data import DataError, Dataset, load_data
from backdoorscan.scanner.datafiles import FileRows, Source, check_input_file

__all__ = ["ShardRows", "is_glob", "load_shards", "open_shards", "shard_paths"]

GLOB_CHARS = "*?["


def is_glob(data: str | Path) -> bool:
    """Whether ``data`` is a glob of shard files rather than one file's path."""
    text = str(data)
    return any(ch in text for ch in GLOB_CHARS) and not Path(text).exists()


def shard_paths(pattern: str | Path) -> list[Path]:
    """The files matching ``pattern``, sorted by path; none is a DataError."""
    paths = sorted(Path(p) for p in glob.glob(str(pattern)))
    paths = [p for p in paths if not p.is_dir()]
    if not paths:
        raise DataError(f"no data file matches {pattern}")
    bad = [p.name for p in paths if p.suffix.lower() != ".npz"]
    if bad:
        raise DataError(f"shard files must be .npz archives with arrays x and y; {bad[0]} is not")
    return paths


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
    paths: Sequence[str | Path],
    *,
    x_key: str = "x",
    y_key: str = "y",
    max_bytes: int | None = None,
    hashes: Sequence[str] | None = None,
) -> Dataset:
    """One :class:`Dataset` over the ``.npz`` files ``paths``, concatenated in that order.

    Each file is loaded and checked as a single data file is; the shards must agree on the
    per-sample shape and dtype. ``hashes`` (sha256 per file, taken before it was read) are kept
    on the files' sources so that :func:`verify_unchanged` checks each shard.
    """
    parts: list[Dataset] = []
    try:
        for i, path in enumerate(paths):
            part = load_data(path, x_key=x_key, y_key=y_key, max_bytes=max_bytes)
            parts.append(part)
            if hashes is not None:
                part.sources[0].sha256 = hashes[i]
            first = parts[0]
            if part.x.shape[1:] != first.x.shape[1:] or part.x.dtype != first.x.dtype:
                raise DataError(
                    f"shard {Path(path).name} holds samples of shape {part.x.shape[1:]} and "
                    f"dtype {part.x.dtype}, but {Path(paths[0]).name} holds "
                    f"{first.x.shape[1:]} {first.x.dtype}: every shard must agree"
                )
    except BaseException:
        for part in parts:
            part.close()
        raise
    names = [Path(p).name for p in paths]
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
    paths = shard_paths(pattern)
    hashes = [sha256_file(check_input_file(p, "data")) for p in paths]
    ds = open_shards(paths, x_key=x_key, y_key=y_key, max_bytes=max_bytes, hashes=hashes)
    manifest = "".join(f"{p.name} {h}\n" for p, h in zip(paths, hashes, strict=True))
    ds.files = {"path": str(pattern), "sha256": hashlib.sha256(manifest.encode()).hexdigest()}
    ds.notes.append(
        f"data: {len(paths)} shard files matching {pattern}, concatenated in sorted order (the "
        "sample indices are global); its sha256 is that of the lines 'name sha256' of the shards"
    )
    return ds
