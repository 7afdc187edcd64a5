"""File I/O shared by every room: atomic writes, the mode of a new file, sha256 of a file.

At the bottom of the package: it imports nothing from backdoorscan, so adapters and the scanner
can both use it without importing each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "OutputError",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output",
    "file_mode",
    "sha256_file",
]

CHUNK = 1 << 20  # bytes read at a time when hashing


class OutputError(ValueError):
    """An output path that would replace an input or something that is not a regular file."""


def check_output(output: str | Path, inputs: list[str | Path]) -> None:
    """Refuse an output that is one of ``inputs`` (the same file by any name) or an existing
    non-regular file (a device, a FIFO, a folder): writing it would replace the input or turn
    ``/dev/null`` into a regular file."""
    out = Path(output)
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise OutputError(f"refusing to write {out}: it exists and is not a regular file")
    if not out.exists():
        return
    for given in inputs:
        p = Path(given)
        try:
            same = p.exists() and os.path.samefile(out, p)
        except OSError:
            same = False
        if same:
            raise OutputError(f"refusing to write {out}: it is an input of this command ({p})")


def file_mode() -> int:
    """The mode a plainly created file gets (0o666 less the umask); mkstemp's is 0o600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks so that large checkpoints do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(
    path: str | Path,
    write: Callable[[Path], None],
    *,
    suffix: str = ".part",
    make_parents: bool = False,
) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it into place.

    Readers never see a half-written file: the rename is atomic within a folder, and on any
    error (or interrupt) the temporary file is removed. ``suffix`` is there for writers that
    insist on a file extension (Keras wants ``.keras``). The folder must exist unless
    ``make_parents`` is set.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if make_parents:
        folder.mkdir(parents=True, exist_ok=True)
    elif not folder.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {folder}")
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())  # mkstemp's 0o600 would outlive the rename
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return target


def atomic_write_bytes(path: str | Path, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` whole or not at all."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(payload))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))
