"""Training data in, batches out: load ``.npz``/``.npy`` safely, check it against the model.

Arrays are loaded once (``.npy`` files and uncompressed ``.npz`` members are memory-mapped, so
a data set larger than memory streams from disk; compressed members are unpacked whole) and
converted batch by batch: the whole set is never copied twice.
Object arrays are refused (``allow_pickle=False``): a data file is untrusted input too.
"""

from __future__ import annotations

import math
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np


class DataError(ValueError):
    """The data cannot be scanned with this model; the message names the problem."""


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

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def batch(self, start: int, stop: int) -> np.ndarray:
        """Samples ``start:stop`` converted to what the model takes."""
        return self._convert(np.asarray(self.x[start:stop]), start)

    def take(self, indices: np.ndarray) -> np.ndarray:
        """The samples at ``indices`` (any order), converted to what the model takes."""
        indices = np.asarray(indices, dtype=np.int64)
        order = np.argsort(indices, kind="stable")
        xb = np.empty((len(indices), *self.x.shape[1:]), dtype=self.x.dtype)
        xb[order] = self.x[indices[order]]
        return self._convert(xb, int(indices.min()) if len(indices) else 0)

    def _convert(self, xb: np.ndarray, start: int) -> np.ndarray:
        if self.layout == "nhwc->nchw":
            xb = np.moveaxis(xb, -1, 1)
        elif self.layout == "nchw->nhwc":
            xb = np.moveaxis(xb, 1, -1)
        elif self.layout == "add-channel":
            xb = xb[:, None]
        if np.issubdtype(np.dtype(self.dtype), np.integer):
            return np.ascontiguousarray(xb, dtype=self.dtype)
        xb = xb.astype(self.dtype, copy=True)
        if self.scale is not None:
            xb *= self.scale
        if self.mean is not None:
            xb -= self.mean.reshape(_channel_shape(self.mean, xb))
        if self.std is not None:
            xb /= self.std.reshape(_channel_shape(self.std, xb))
        if not np.isfinite(xb).all():
            bad = start + int(np.argwhere(~np.isfinite(xb.reshape(len(xb), -1)))[0, 0])
            raise DataError(f"sample {bad} holds NaN or Inf values")
        return np.ascontiguousarray(xb)

    def batches(self, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, batch)`` over the whole set."""
        for start in range(0, len(self), batch_size):
            yield start, self.batch(start, min(start + batch_size, len(self)))


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


def _load_array(path: Path, key: str | None, what: str, max_bytes: int | None = None) -> np.ndarray:
    """Read one array from ``.npy`` or one member of ``.npz``, memory-mapped where the file
    stores it uncompressed, never unpickling."""
    if not path.exists():
        raise DataError(f"{what} file not found: {path}")
    if path.is_dir():
        raise DataError(f"{what} path is a folder, not a file: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"{what} file is empty: {path}")
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic[:1] == b"\x80":
        raise DataError(
            f"{path.name} is a Python pickle, which is refused: backdoorscan never unpickles a "
            "data file (save arrays with np.save or np.savez)"
        )
    if magic != b"\x93NUMPY" and magic[:4] != b"PK\x03\x04":
        raise DataError(
            f"{path.name} is not a numpy file: {what} must be .npy or .npz (np.save, np.savez)"
        )
    try:
        if path.suffix.lower() == ".npy" or key is None:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            if isinstance(arr, np.lib.npyio.NpzFile):
                arr.close()
                raise DataError(f"{path.name} is an .npz archive; pass it with --data")
            return _check_plain(arr, path.name)
        with np.load(path, allow_pickle=False) as archive:
            if key not in archive.files:
                keys = ", ".join(archive.files) or "none"
                raise DataError(f"{path.name} has no array {key!r} (it has: {keys})")
            mapped = _map_npz_member(path, key, max_bytes)
            if mapped is not None:
                return _check_plain(mapped, f"{path.name}[{key}]")
            return _check_plain(archive[key], f"{path.name}[{key}]")
    except DataError:
        raise
    except ValueError as exc:
        text = str(exc).lower()
        if "pickle" in text or "object" in text:
            raise DataError(
                f"{path.name} holds pickled Python objects (object arrays or a pickle), which "
                "are refused: backdoorscan never unpickles a data file"
            ) from None
        raise DataError(f"{path.name} is not a readable numpy file ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(
            f"{path.name} is not a readable numpy file ({type(exc).__name__})"
        ) from None


def _map_npz_member(path: Path, key: str, max_bytes: int | None) -> np.ndarray | None:
    """Memory-map ``key`` of an ``.npz`` when the zip stores it uncompressed (``np.savez``).

    Returns None where the member must be read whole (compressed); the header is checked
    first, so that a member declaring more data than it holds, or a compressed member larger
    than ``max_bytes``, is refused before anything is allocated.
    """
    with zipfile.ZipFile(path) as zf:
        name = key if key in zf.namelist() else f"{key}.npy"
        info = zf.getinfo(name)
        with zf.open(info) as member:
            shape, fortran, dtype, header_len = _npy_header(member)
    if dtype.hasobject:
        raise ValueError("object arrays are refused")
    nbytes = math.prod(shape) * dtype.itemsize
    if header_len + nbytes > info.file_size:
        raise DataError(
            f"{path.name}[{key}] is damaged: its header declares {nbytes} bytes of data but the "
            f"member holds {max(info.file_size - header_len, 0)}"
        )
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        if max_bytes is not None and nbytes > max_bytes:
            raise DataError(
                f"{path.name}[{key}] is compressed and would be unpacked whole into memory "
                f"({_mib(nbytes)}, over the memory limit of {_mib(max_bytes)}); save it with "
                "np.savez (uncompressed) or as .npy so that it streams from disk"
            )
        return None
    if nbytes == 0:
        return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise DataError(f"{path.name} is a damaged zip archive (member {name})")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
    offset = info.header_offset + 30 + name_len + extra_len + header_len
    return np.memmap(
        path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _npy_header(fh: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """Shape, Fortran order, dtype and header length of the ``.npy`` stream ``fh``."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    return shape, fortran, dtype, fh.tell()


def _check_plain(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype.hasobject or arr.dtype.kind not in "biuf":
        raise DataError(f"{name} has dtype {arr.dtype}; numbers are required")
    return arr


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
    larger than ``max_bytes`` is refused before it is unpacked.
    """
    data = Path(data)
    if labels is not None:
        x = _load_array(data, None, "data")
        y = _load_array(Path(labels), None, "labels")
        source = f"{data.name} + {Path(labels).name}"
    else:
        if data.suffix.lower() == ".npy":
            raise DataError(f"{data.name} holds samples only: pass the labels with --labels")
        x = _load_array(data, x_key, "data", max_bytes)
        y = _load_array(data, y_key, "data", max_bytes)
        source = data.name
    return from_arrays(x, y, source=source)


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
    if num_classes is not None and int(ds.y.max()) >= num_classes:
        raise DataError(
            f"labels go up to {int(ds.y.max())} but the model has {num_classes} classes"
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
