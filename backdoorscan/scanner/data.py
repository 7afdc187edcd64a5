"""Training data in, batches out: load ``.npz``/``.npy`` safely, check it against the model.

Arrays are loaded once (``.npy`` files and uncompressed ``.npz`` members are memory-mapped, so
a data set larger than memory streams from disk; compressed members are unpacked whole) and
converted batch by batch: the whole set is never copied twice.
Object arrays are refused (``allow_pickle=False``): a data file is untrusted input too.

A mapped file that shrinks while it is read would kill the process with SIGBUS, so the samples
of a C-ordered array are read batch by batch with explicit reads from the file opened at load
(a short read is a :class:`DataError`, not a crash), and the mapping serves only the array's
shape and the few readers that index it directly. :func:`verify_unchanged` tells whether an
input file changed while it was scanned.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from backdoorscan.scanner.datafiles import (
    DataError,
    FileRows,
    Source,
    check_input_file,
    file_sha256,
    labels_copy,
    load_array,
    row_reader,
    signature,
)

__all__ = [
    "DataError",
    "Dataset",
    "check_input_file",
    "conform",
    "from_arrays",
    "load_data",
    "verify_unchanged",
]


# The largest class index accepted when the model does not say how many classes it has: a
# label past it is no class of any model, and counting samples per class would need memory
# proportional to it.
MAX_CLASSES = 1 << 24


@dataclass
class Dataset:
    """Samples ``x`` and integer labels ``y``, plus the conversion applied to each batch.

    ``layout`` is ``None`` (as given), ``"nhwc->nchw"``, ``"nchw->nhwc"`` or ``"add-channel"``.
    """

    x: np.ndarray
    y: np.ndarray
    source: str = "<arrays>"
    scale: float | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    dtype: str = "float32"
    layout: str | None = None
    notes: list[str] = field(default_factory=list)
    # Path and sha256 of the files the data came from (empty for in-memory arrays).
    files: dict[str, str] = field(default_factory=dict)
    # The input files, held open (empty for in-memory arrays); the samples' explicit reader.
    sources: list[Source] = field(default_factory=list, repr=False, compare=False)
    reader: FileRows | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def batch(self, start: int, stop: int) -> np.ndarray:
        """Samples ``start:stop`` converted to what the model takes."""
        if self.reader is not None:
            return self._convert(self.reader.read(start, stop), start)
        self._check_sizes()
        return self._convert(np.asarray(self.x[start:stop]), start)

    def take(self, indices: np.ndarray) -> np.ndarray:
        """The samples at ``indices`` (any order), converted to what the model takes."""
        indices = np.asarray(indices, dtype=np.int64)
        order = np.argsort(indices, kind="stable")
        xb = np.empty((len(indices), *self.x.shape[1:]), dtype=self.x.dtype)
        if self.reader is not None:
            xb[order] = self.reader.take(indices[order])
        else:
            self._check_sizes()
            xb[order] = self.x[indices[order]]
        return self._convert(xb, int(indices.min()) if len(indices) else 0)

    def _check_sizes(self) -> None:
        """Refuse a mapped input that shrank (reading past its end would be SIGBUS)."""
        for src in self.sources:
            if src.size() < src.signature[2]:
                raise DataError(
                    f"{src.path.name} was truncated during the scan: it held "
                    f"{src.signature[2]} bytes, now {src.size()}"
                )

    def close(self) -> None:
        """Close the input files (the mapped array stays readable while referenced)."""
        for src in self.sources:
            src.close()

    def _convert(self, xb: np.ndarray, start: int) -> np.ndarray:
        if self.layout == "nhwc->nchw":
            xb = np.moveaxis(xb, -1, 1)
        elif self.layout == "nchw->nhwc":
            xb = np.moveaxis(xb, 1, -1)
        elif self.layout == "add-channel":
            xb = xb[:, None]
        if np.issubdtype(np.dtype(self.dtype), np.integer):
            return np.ascontiguousarray(xb, dtype=self.dtype)
        src = xb
        with np.errstate(over="ignore", invalid="ignore"):
            xb = xb.astype(self.dtype, copy=True)
        with np.errstate(over="ignore", invalid="ignore"):
            if self.scale is not None:
                xb *= self.scale
            if self.mean is not None:
                xb -= self.mean.reshape(_channel_shape(self.mean, xb))
            if self.std is not None:
                xb /= self.std.reshape(_channel_shape(self.std, xb))
        if not np.isfinite(xb).all():
            raise DataError(_not_finite(src, xb, start, self.dtype))
        return np.ascontiguousarray(xb)

    def batches(self, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, batch)`` over the whole set."""
        for start in range(0, len(self), batch_size):
            yield start, self.batch(start, min(start + batch_size, len(self)))


def _not_finite(src: np.ndarray, xb: np.ndarray, start: int, dtype: str) -> str:
    """Say why the first non-finite converted value is so: NaN or Inf in the file, a value
    beyond ``dtype``'s range, or one that --scale/--mean/--std took there."""
    flat = np.flatnonzero(~np.isfinite(xb.reshape(-1)))[0]
    row = int(flat // max(math.prod(xb.shape[1:]), 1))
    given = float(np.asarray(src).reshape(-1)[flat])
    if not math.isfinite(given):
        return f"sample {start + row} holds NaN or Inf values"
    if abs(given) > float(np.finfo(dtype).max):
        return f"sample {start + row} holds the value {given:g}, out of the {dtype} range"
    return (
        f"sample {start + row} holds the value {given:g}, which --scale/--mean/--std take out "
        f"of the {dtype} range"
    )


def _channel_shape(stat: np.ndarray, xb: np.ndarray) -> tuple[int, ...]:
    if stat.size == 1:
        return (1,) * xb.ndim
    shape = [1] * xb.ndim
    # Per-channel statistics apply to the channel axis: 1 for NCHW, the last one otherwise.
    axis = 1 if xb.ndim >= 3 and xb.shape[1] == stat.size else xb.ndim - 1
    if xb.shape[axis] != stat.size:
        raise DataError(
            f"--mean/--std have {stat.size} values but samples have shape {xb.shape[1:]}"
        )
    shape[axis] = stat.size
    return tuple(shape)


def load_data(
    data: str | Path,
    labels: str | Path | None = None,
    *,
    x_key: str = "x",
    y_key: str = "y",
    max_bytes: int | None = None,
) -> Dataset:
    """Load samples and labels from one ``.npz`` (``x_key``, ``y_key``) or two ``.npy`` files.

    ``.npy`` files and uncompressed ``.npz`` members are memory-mapped; a compressed member
    larger than ``max_bytes`` is refused before it is unpacked. The files stay open (see
    :meth:`Dataset.close`): batches are read from them, and :func:`verify_unchanged` checks them.
    """
    data = check_input_file(data, "data")
    if labels is None and data.suffix.lower() == ".npy":
        raise DataError(f"{data.name} holds samples only: pass the labels with --labels")
    labels = None if labels is None else check_input_file(labels, "labels")
    sources = [Source(data, "data")]
    try:
        if labels is not None:
            sources.append(Source(labels, "labels"))
            x = load_array(sources[0], None, "data")
            y = labels_copy(load_array(sources[1], None, "labels"), sources[1], labels.name)
            source = f"{data.name} + {labels.name}"
        else:
            x = load_array(sources[0], x_key, "data", max_bytes)
            y = load_array(sources[0], y_key, "data", max_bytes)
            y = labels_copy(y, sources[0], f"{data.name}[{y_key}]")
            source = data.name
        ds = from_arrays(x, y, source=source)
    except BaseException:
        for src in sources:
            src.close()
        raise
    name = data.name if labels is not None else f"{data.name}[{x_key}]"
    ds.sources = sources
    ds.reader = row_reader(x, sources[0], name)
    return ds


def verify_unchanged(dataset: Dataset, *, rehash: bool = True) -> None:
    """Raise DataError if an input file of ``dataset`` changed since it was opened.

    The file at each path must still be the one opened (same device and inode), of the same
    size and modification time; with ``rehash`` its content is hashed again and compared with
    the sha256 taken before it was read (``dataset.files``), which catches a change that kept
    the size and reset the time, or one made between the hashing and the opening.
    """
    hashes = {"data": dataset.files.get("sha256"), "labels": dataset.files.get("labels_sha256")}
    for src in dataset.sources:
        try:
            now = signature(os.stat(src.path))
        except OSError:
            raise DataError(
                f"{src.role} file {src.path} changed during the scan: it is gone"
            ) from None
        if now != src.signature:
            what = "replaced" if now[:2] != src.signature[:2] else "modified"
            raise DataError(
                f"{src.role} file {src.path} changed during the scan ({what}); the scan read "
                "the old content, so no report is written: scan it again once it is stable"
            )
        want = src.sha256 or hashes.get(src.role)
        if rehash and want is not None and file_sha256(src) != want:
            raise DataError(
                f"{src.role} file {src.path} changed during the scan (its sha256 differs from "
                "the one taken before it was read); scan it again once it is stable"
            )


def from_arrays(x: np.ndarray, y: np.ndarray, *, source: str = "<arrays>") -> Dataset:
    """Wrap in-memory arrays after checking the labels and lengths."""
    x = np.asarray(x) if not isinstance(x, np.ndarray) else x
    y = np.asarray(y)
    if x.ndim == 0:
        raise DataError("samples must be an array with one row per sample, got a single number")
    if x.shape[0] == 0:
        raise DataError("the data set holds no samples")
    if y.ndim != 1:
        if y.ndim == 2 and y.shape[1] > 1 and np.isin(y, (0, 1)).all() and (y.sum(1) == 1).all():
            raise DataError("labels look one-hot encoded; pass class indices (argmax) instead")
        raise DataError(f"labels must be a 1-D array, got shape {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{x.shape[0]} samples but {y.shape[0]} labels")
    if y.dtype.kind == "f":
        raise DataError(f"labels have float dtype {y.dtype}; integer class indices are required")
    if y.dtype.kind == "b" or y.dtype.kind not in "iu":
        raise DataError(f"labels have dtype {y.dtype}; integer class indices are required")
    y = np.asarray(y, dtype=np.int64)
    if y.min() < 0:
        raise DataError(f"labels must be >= 0; found {int(y.min())}")
    return Dataset(x=x, y=y, source=source)


def conform(
    ds: Dataset,
    input_shape: tuple[int | None, ...],
    input_dtype: str,
    num_classes: int | None,
    *,
    scale: float | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> Dataset:
    """Check the data against the model's input and classes; set the per-batch conversion."""
    sample = tuple(ds.x.shape[1:])
    ds.dtype = "int64" if np.issubdtype(np.dtype(input_dtype), np.integer) else input_dtype
    ds.layout = _layout(sample, input_shape)
    if ds.layout is not None:
        ds.notes.append(f"samples converted {ds.layout.replace('->', ' to ')}")
    if np.issubdtype(np.dtype(ds.dtype), np.integer):
        if ds.x.dtype.kind == "f":
            raise DataError(
                f"model takes integer inputs (token ids) but the data has dtype {ds.x.dtype}"
            )
        if scale is not None or mean is not None or std is not None:
            raise DataError("--scale/--mean/--std apply to float inputs, not token ids")
    elif ds.x.dtype.kind not in "biuf":
        raise DataError(f"samples have dtype {ds.x.dtype}; numbers are required")
    top = int(ds.y.max())
    if num_classes is not None and top >= num_classes:
        raise DataError(f"labels go up to {top} but the model has {num_classes} classes")
    if num_classes is None and top >= MAX_CLASSES:
        raise DataError(
            f"labels go up to {top}: too large a class index for the model (its number of "
            f"classes is not known before it runs; backdoorscan takes class indices below "
            f"{MAX_CLASSES})"
        )
    ds.scale = scale
    ds.mean = None if mean is None else np.asarray(mean, dtype=np.float32)
    ds.std = None if std is None else np.asarray(std, dtype=np.float32)
    if ds.std is not None and (ds.std == 0).any():
        raise DataError("--std must not contain zeros")
    return ds


def _layout(sample: tuple[int, ...], want: tuple[int | None, ...]) -> str | None:
    def fits(s: tuple[int, ...]) -> bool:
        return len(s) == len(want) and all(
            w is None or w == d for d, w in zip(s, want, strict=True)
        )

    if fits(sample):
        return None
    if len(sample) == 3 and fits((sample[2], sample[0], sample[1])):
        return "nhwc->nchw"
    if len(sample) == 3 and fits((sample[1], sample[2], sample[0])):
        return "nchw->nhwc"
    if len(want) == len(sample) + 1 and want[0] in (1, None) and fits((1, *sample)):
        return "add-channel"
    shown = tuple("?" if w is None else w for w in want)
    raise DataError(f"samples have shape {sample} but the model takes {shown}")
