"""Reading ``.npy`` and ``.npz`` files as untrusted input: what ``data.py`` loads through.

Every file is checked to be a regular file before it is opened, headers are parsed by hand
(no pickle, a bounded header), sizes are checked against what the headers declare, and the
file stays open so that batches are read with explicit reads (a file that shrinks gives a
:class:`DataError`, not SIGBUS) and a change during the scan can be told.
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
from pathlib import Path
from typing import BinaryIO

import numpy as np


class DataError(ValueError):
    """The data cannot be scanned with this model; the message names the problem."""


# numpy refuses .npy headers longer than this unless told to trust the file (max_header_size).
NPY_MAX_HEADER = 10_000
CHUNK = 1 << 20


class Source:
    """An input file held open from load to the end of the scan: what it was (device, inode,
    size, modification time) when opened, and explicit reads from it."""

    def __init__(self, path: Path, role: str) -> None:
        self.path = path
        self.role = role
        self.fh = open(path, "rb", buffering=0)  # noqa: SIM115 - open for the scan's lifetime
        self.lock = threading.Lock()
        self.signature = signature(os.fstat(self.fh.fileno()))
        # Its sha256 taken before it was read, where it is one shard of several (else the
        # dataset's ``files`` hold it).
        self.sha256: str | None = None

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


def signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class FileRows:
    """Rows of a C-ordered array stored uncompressed at ``offset`` in ``source``, read with
    explicit reads (not through the mapping) so that a file truncated meanwhile raises."""

    def __init__(
        self, source: Source, offset: int, shape: tuple[int, ...], dtype: np.dtype, name: str
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


def load_array(
    src: Source, key: str | None, what: str, max_bytes: int | None = None
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


def _map_npy(src: Source) -> np.ndarray:
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
    src: Source, zf: zipfile.ZipFile, key: str, max_bytes: int | None
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


def row_reader(arr: np.ndarray, src: Source, name: str) -> FileRows | None:
    """The explicit row reader for a C-ordered array mapped from ``src``, else None (in
    memory, or Fortran-ordered: those batches come from the mapping after a size check)."""
    if not isinstance(arr, np.memmap) or arr.ndim < 1 or not arr.flags.c_contiguous:
        return None
    return FileRows(src, int(arr.offset), tuple(arr.shape), arr.dtype, name)


def labels_copy(arr: np.ndarray, src: Source, name: str) -> np.ndarray:
    """The labels read whole (they are small) with explicit reads, not left mapped."""
    rows = row_reader(arr, src, name)
    return rows.read(0, arr.shape[0]) if rows is not None else np.array(arr)


def file_sha256(src: Source) -> str:
    """sha256 of the file at ``src.path`` (what the report would name), read in chunks."""
    digest = hashlib.sha256()
    with open(src.path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
