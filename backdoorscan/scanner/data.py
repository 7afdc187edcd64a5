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

import hashlib
import math
import os
import stat
import struct
import threading
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np


class DataError(ValueError):
    """The data cannot be scanned with this model; the message names the problem."""


# numpy refuses .npy headers longer than this unless told to trust the file (max_header_size).
NPY_MAX_HEADER = 10_000
# The largest class index accepted when the model does not say how many classes it has: a
# label past it is no class of any model, and counting samples per class would need memory
# proportional to it.
MAX_CLASSES = 1 << 24
_CHUNK = 1 << 20


class _Source:
    """An input file held open from load to the end of the scan: what it was (device, inode,
    size, modification time) when opened, and explicit reads from it."""

    def __init__(self, path: Path, role: str) -> None:
        self.path = path
        self.role = role
        self.fh = open(path, "rb", buffering=0)  # noqa: SIM115 - open for the scan's lifetime
        self.lock = threading.Lock()
        self.signature = _signature(os.fstat(self.fh.fileno()))

    def size(self) -> int:
        """The file's size now."""
        return os.fstat(self.fh.fileno()).st_size

    def read_into(self, offset: int, buf: memoryview, what: str) -> None:
        """Fill ``buf`` from ``offset``; a file cut short meanwhile is a DataError."""
        done = 0
        with self.lock:
            self.fh.seek(offset)
            while done < len(buf):
                n = self.fh.readinto(buf[done:])
                if not n:
                    raise DataError(
                        f"{self.path.name} was truncated during the scan: reading {what} needs "
                        f"{offset + len(buf)} bytes, but the file now holds {self.size()}"
                    )
                done += n

    def close(self) -> None:
        """Close the file."""
        self.fh.close()


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class _FileRows:
    """Rows of a C-ordered array stored uncompressed at ``offset`` in ``source``, read with
    explicit reads (not through the mapping) so that a file truncated meanwhile raises."""

    def __init__(
        self, source: _Source, offset: int, shape: tuple[int, ...], dtype: np.dtype, name: str
    ) -> None:
        self.source = source
        self.offset = offset
        self.shape = shape
        self.dtype = dtype
        self.name = name
        self.row_bytes = math.prod(shape[1:]) * dtype.itemsize

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a new array."""
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        self._fill(out, start, f"samples {start}..{stop - 1} of {self.name}")
        return out

    def take(self, sorted_indices: np.ndarray) -> np.ndarray:
        """Rows at ``sorted_indices`` (ascending), one read per run of consecutive rows."""
        out = np.empty((len(sorted_indices), *self.shape[1:]), dtype=self.dtype)
        if not len(sorted_indices):
            return out
        breaks = np.flatnonzero(np.diff(sorted_indices) != 1) + 1
        for lo, hi in zip(
            np.concatenate([[0], breaks]),
            np.concatenate([breaks, [len(sorted_indices)]]),
            strict=True,
        ):
            first = int(sorted_indices[lo])
            self._fill(out[lo:hi], first, f"samples {first}..{first + hi - lo - 1} of {self.name}")
        return out

    def _fill(self, out: np.ndarray, start: int, what: str) -> None:
        if out.size == 0:
            return
        buf = memoryview(out.reshape(-1).view(np.uint8))
        self.source.read_into(self.offset + start * self.row_bytes, buf, what)


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
    sources: list[_Source] = field(default_factory=list, repr=False, compare=False)
    reader: _FileRows | None = field(default=None, repr=False, compare=False)

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


def check_input_file(path: str | Path, what: str = "data") -> Path:
    """Refuse, before anything opens it, a path that is missing, a folder, or not a regular
    file (a FIFO would block the reader, ``/dev/zero`` never ends, a ``/proc`` file's size is
    unknown); an empty regular file too. Returns the path."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise DataError(f"{what} file not found: {p}") from None
    except OSError as exc:
        raise DataError(f"{what} file {p} cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"{what} path is a folder, not a file: {p}")
    if not stat.S_ISREG(st.st_mode):
        raise DataError(
            f"{what} file {p} is not a regular file (a {_file_kind(st.st_mode)}); save the "
            "arrays to a file with np.save or np.savez"
        )
    if st.st_size == 0:
        try:
            with open(p, "rb") as fh:
                has_bytes = bool(fh.read(1))
        except OSError as exc:
            raise DataError(f"{what} file {p} cannot be read ({exc.strerror or exc})") from None
        if has_bytes:
            raise DataError(
                f"{what} file {p} is not a regular file on disk (it reports a size of 0 but "
                "holds data, as /proc and /sys files do)"
            )
        raise DataError(f"{what} file is empty: {p}")
    return p


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    )
    return next((name for test, name in kinds if test(mode)), "special file")


def _load_array(
    src: _Source, key: str | None, what: str, max_bytes: int | None = None
) -> np.ndarray:
    """Read one array from ``.npy`` or one member of ``.npz``, memory-mapped where the file
    stores it uncompressed, never unpickling."""
    path = src.path
    src.fh.seek(0)
    magic = src.fh.read(6)
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
        if magic == b"\x93NUMPY":
            if key is not None and path.suffix.lower() != ".npy":
                raise DataError(
                    f"{path.name} is a single .npy array: pass it with --data and --labels"
                )
            return _check_plain(_map_npy(src), path.name)
        if key is None:
            raise DataError(f"{path.name} is an .npz archive; pass it with --data")
        src.fh.seek(0)
        with zipfile.ZipFile(src.fh) as zf:
            names = [n[:-4] if n.endswith(".npy") else n for n in zf.namelist()]
            if key not in names:
                keys = ", ".join(names) or "none"
                raise DataError(f"{path.name} has no array {key!r} (it has: {keys})")
            mapped = _map_npz_member(src, zf, key, max_bytes)
            if mapped is not None:
                return _check_plain(mapped, f"{path.name}[{key}]")
            name = key if key in zf.namelist() else f"{key}.npy"
            with zf.open(name) as member:
                arr = np.lib.format.read_array(member, allow_pickle=False)
            return _check_plain(arr, f"{path.name}[{key}]")
    except DataError:
        raise
    except ValueError as exc:
        text = str(exc)
        if "allow_pickle=False" in text or "pickled (object)" in text:
            raise DataError(
                f"{path.name} holds pickled Python objects (object arrays or a pickle), which "
                "are refused: backdoorscan never unpickles a data file"
            ) from None
        raise DataError(f"{path.name} is not a readable numpy file ({_first_line(text)})") from None
    except (OSError, EOFError, OverflowError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(
            f"{path.name} is not a readable numpy file ({type(exc).__name__})"
        ) from None


def _first_line(text: str, limit: int = 200) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _map_npy(src: _Source) -> np.ndarray:
    """Memory-map the ``.npy`` file ``src`` after checking its header against its size."""
    src.fh.seek(0)
    shape, fortran, dtype, header_len = _npy_header(src.fh, src.path.name)
    nbytes = math.prod(shape) * dtype.itemsize
    size = src.size()
    if header_len + nbytes > size:
        raise DataError(
            f"{src.path.name} is not a readable numpy file: it is truncated (its header declares "
            f"{nbytes} bytes of data but the file holds {max(size - header_len, 0)})"
        )
    if nbytes == 0:
        return np.empty(shape, dtype=dtype)
    return np.memmap(
        src.fh, dtype=dtype, mode="r", offset=header_len, shape=shape, order="F" if fortran else "C"
    )


def _map_npz_member(
    src: _Source, zf: zipfile.ZipFile, key: str, max_bytes: int | None
) -> np.ndarray | None:
    """Memory-map ``key`` of an ``.npz`` when the zip stores it uncompressed (``np.savez``).

    Returns None where the member must be read whole (compressed); the header is checked
    first, so that a member declaring more data than it holds, or a compressed member larger
    than ``max_bytes``, is refused before anything is allocated.
    """
    path = src.path
    name = key if key in zf.namelist() else f"{key}.npy"
    info = zf.getinfo(name)
    with zf.open(info) as member:
        shape, fortran, dtype, header_len = _npy_header(member, f"{path.name}[{key}]")
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
    src.fh.seek(info.header_offset)
    local = src.fh.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise DataError(f"{path.name} is a damaged zip archive (member {name})")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    offset = info.header_offset + 30 + name_len + extra_len + header_len
    if offset + nbytes > src.size():
        raise DataError(
            f"{path.name}[{key}] is damaged: its data would end at byte {offset + nbytes} but "
            f"the file holds {src.size()}"
        )
    return np.memmap(
        src.fh, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _npy_header(fh: BinaryIO, name: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """Shape, Fortran order, dtype and header length of the ``.npy`` stream ``fh``; a header
    over numpy's size limit, a negative dimension or an object dtype is a DataError."""
    version = np.lib.format.read_magic(fh)
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise DataError(f"{name} is a .npy file of format version {version}, which is not read")
    width = 2 if version == (1, 0) else 4
    raw = fh.read(width)
    if len(raw) < width:
        raise DataError(f"{name} is not a readable numpy file: it ends inside its header")
    length = int.from_bytes(raw, "little")
    if length > NPY_MAX_HEADER:
        raise DataError(
            f"{name} has a .npy header of {length} bytes, over numpy's limit of "
            f"{NPY_MAX_HEADER} for a file it does not trust (a crafted or damaged file)"
        )
    fh.seek(-width, os.SEEK_CUR)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    else:  # 3.0 is 2.0 with a UTF-8 header, written only for non-Latin-1 field names (refused)
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    if any(d < 0 for d in shape):
        raise DataError(f"{name} is damaged: its header declares the shape {shape}")
    if dtype.hasobject:
        raise ValueError("object arrays are refused: allow_pickle=False")
    return shape, fortran, dtype, fh.tell()


def _check_plain(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype.hasobject or arr.dtype.kind not in "biuf":
        raise DataError(f"{name} has dtype {arr.dtype}; numbers are required")
    return arr


def _reader(arr: np.ndarray, src: _Source, name: str) -> _FileRows | None:
    """The explicit row reader for a C-ordered array mapped from ``src``, else None (in
    memory, or Fortran-ordered: those batches come from the mapping after a size check)."""
    if not isinstance(arr, np.memmap) or arr.ndim < 1 or not arr.flags.c_contiguous:
        return None
    return _FileRows(src, int(arr.offset), tuple(arr.shape), arr.dtype, name)


def _labels_copy(arr: np.ndarray, src: _Source, name: str) -> np.ndarray:
    """The labels read whole (they are small) with explicit reads, not left mapped."""
    rows = _reader(arr, src, name)
    return rows.read(0, arr.shape[0]) if rows is not None else np.array(arr)


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
    sources = [_Source(data, "data")]
    try:
        if labels is not None:
            sources.append(_Source(labels, "labels"))
            x = _load_array(sources[0], None, "data")
            y = _labels_copy(_load_array(sources[1], None, "labels"), sources[1], labels.name)
            source = f"{data.name} + {labels.name}"
        else:
            x = _load_array(sources[0], x_key, "data", max_bytes)
            y = _load_array(sources[0], y_key, "data", max_bytes)
            y = _labels_copy(y, sources[0], f"{data.name}[{y_key}]")
            source = data.name
        ds = from_arrays(x, y, source=source)
    except BaseException:
        for src in sources:
            src.close()
        raise
    name = data.name if labels is not None else f"{data.name}[{x_key}]"
    ds.sources = sources
    ds.reader = _reader(x, sources[0], name)
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
            now = _signature(os.stat(src.path))
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
        want = hashes.get(src.role)
        if rehash and want is not None and _sha256(src) != want:
            raise DataError(
                f"{src.role} file {src.path} changed during the scan (its sha256 differs from "
                "the one taken before it was read); scan it again once it is stable"
            )


def _sha256(src: _Source) -> str:
    """sha256 of the file at ``src.path`` (what the report would name), read in chunks."""
    digest = hashlib.sha256()
    with open(src.path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    if top >= MAX_CLASSES:
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
