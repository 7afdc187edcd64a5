"""Training images as files: a class-per-folder tree (``images/cat/001.png``) or the paths of
an image column, decoded with Pillow batch by batch and resized to the model's input.

:class:`ImageRows` looks like a read-only ``uint8`` array of shape ``[N, C, H, W]`` (what
:class:`~backdoorscan.scanner.data.Dataset` takes as its samples and its reader): ``read(i, j)``
decodes images ``i..j-1`` on a small thread pool (Pillow releases the GIL while it decodes and
resizes) and starts decoding the next batch of the same size at once, so that decoding overlaps
the model's run on the batch just returned; at most two batches are ever held, so a folder
larger than memory scans. Every file is checked before it is decoded: a regular file inside the
folder given, at most ``MAX_IMAGE_BYTES``, PNG or JPEG by content, at most ``MAX_PIXELS``
pixels (a decompression bomb is refused, not decoded). What the folder held when it was listed
(path, size, modification time of every image) is hashed; :meth:`ImageRows.verify` tells
whether any of it changed during the scan.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from backdoorscan.scanner.datafiles import DataError

__all__ = ["IMAGE_SUFFIXES", "ImageRows", "Preprocess", "list_image_folder"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
MAX_IMAGE_BYTES = 64 << 20
MAX_PIXELS = 64 << 20  # width x height of one image, before it is decoded
MAX_IMAGES = 50_000_000
FORMATS = {"PNG", "JPEG"}
RESAMPLE = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


class Preprocess:
    """How an image becomes a model input: resized to ``size`` (height, width) directly, or
    its shorter side to ``shortest_edge`` and then centre-cropped to ``size``; ``channels`` 3
    (RGB) or 1 (grey); ``resample`` a Pillow filter number (2 bilinear, 3 bicubic)."""

    def __init__(
        self,
        size: tuple[int, int] | None,
        *,
        shortest_edge: int | None = None,
        channels: int = 3,
        resample: int = 2,
    ) -> None:
        self.size = size
        self.shortest_edge = shortest_edge
        self.channels = channels
        self.resample = resample if resample in RESAMPLE else 2

    def describe(self) -> str:
        """One line for the report's notes."""
        h, w = self.size or (0, 0)
        how = f"resized to {h}x{w}"
        if self.shortest_edge:
            how = f"shorter side resized to {self.shortest_edge}, centre-cropped to {h}x{w}"
        mode = "RGB" if self.channels == 3 else "greyscale"
        return f"images decoded with Pillow ({mode}), {how} ({RESAMPLE[self.resample].lower()})"


def list_image_folder(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """The images under ``root`` (one sub-folder per class, PNG/JPEG), their class indices
    (sorted folder names) and the class names; files sorted by path within each class."""
    root = Path(root)
    try:
        entries = sorted(root.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise DataError(f"data folder {root} cannot be listed ({exc.strerror or exc})") from None
    classes = [p.name for p in entries if p.is_dir() and not p.name.startswith(".")]
    if not classes:
        raise DataError(
            f"data folder {root} has no class sub-folders: lay the images out as "
            f"{root.name}/CLASS/IMAGE.png, one folder per class"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        folder = root / name
        found = sorted(
            p
            for p in _walk(folder)
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        paths.extend(found)
        labels.extend([index] * len(found))
        if len(paths) > MAX_IMAGES:
            raise DataError(f"data folder {root} holds more than {MAX_IMAGES} images")
    if not paths:
        raise DataError(f"data folder {root} holds no PNG or JPEG images in its class folders")
    return paths, np.asarray(labels, dtype=np.int64), classes


def _walk(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out.extend(Path(dirpath) / f for f in filenames)
    return out


class ImageRows:
    """Images ``paths`` as a lazily decoded ``uint8`` array ``[N, C, H, W]`` (see the module
    docstring); ``root`` is the folder every image must lie in; ``names`` what the report
    calls each sample (its path relative to ``root`` by default)."""

    dtype = np.dtype(np.uint8)
    ndim = 4
    nbytes = 0  # nothing held in memory but the batch being decoded and the one ahead

    def __init__(
        self,
        paths: Sequence[Path],
        root: Path,
        prep: Preprocess,
        *,
        threads: int | None = None,
    ) -> None:
        self.paths = list(paths)
        self.root = root.resolve()
        self.prep = prep
        self.names = [_relative(p, root) for p in self.paths]
        self._stats = [_check_file(p, self.root) for p in self.paths]
        self._pool = ThreadPoolExecutor(
            max_workers=threads or min(4, os.cpu_count() or 1), thread_name_prefix="decode"
        )
        # The read-ahead waits on the decoding pool from a thread of its own (never a pool
        # thread waiting on its own pool).
        self._ahead_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead")
        self._lock = threading.Lock()
        self._ahead: tuple[int, int, Future] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """``(N, C, H, W)``; H and W are None until the size is known (:meth:`set_size`)."""
        h, w = self.prep.size or (None, None)
        return (len(self.paths), self.prep.channels, h, w)  # type: ignore[return-value]

    def set_size(self, height: int, width: int) -> None:
        """Resize to ``height`` x ``width`` (the model's input, once it is known)."""
        if height < 1 or width < 1 or height * width > MAX_PIXELS:
            raise DataError(f"image size {height}x{width} is out of range")
        self.prep.size = (int(height), int(width))

    def __len__(self) -> int:
        return len(self.paths)

    def listing_sha256(self) -> str:
        """sha256 of what the folder held when listed: each image's relative path, size and
        modification time."""
        digest = hashlib.sha256()
        for name, st in zip(self.names, self._stats, strict=True):
            digest.update(f"{name}\0{st[2]}\0{st[3]}\n".encode())
        return digest.hexdigest()

    def read(self, start: int, stop: int) -> np.ndarray:
        """Images ``start..stop-1``; decoding of the next ``stop - start`` starts now."""
        with self._lock:
            ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:2] == (start, stop):
            out = ahead[2].result()
        else:
            if ahead is not None:
                ahead[2].cancel()
            out = self._decode(range(start, stop))
        nxt = min(stop + (stop - start), len(self))
        if stop < nxt:
            fut = self._ahead_pool.submit(self._decode, range(stop, nxt))
            with self._lock:
                self._ahead = (stop, nxt, fut)
        return out

    def take(self, sorted_indices: np.ndarray) -> np.ndarray:
        """Images at ``sorted_indices``."""
        return self._decode([int(i) for i in sorted_indices])

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self._decode([int(index) % len(self)])[0]
        if isinstance(index, slice):
            return self._decode(range(*index.indices(len(self))))
        return self._decode([int(i) for i in np.asarray(index).reshape(-1)])

    def _decode(self, indices: Sequence[int]) -> np.ndarray:
        if self.prep.size is None:
            raise DataError(
                "the image size is not known: pass --image-size (the model's input height)"
            )
        h, w = self.prep.size
        out = np.empty((len(indices), self.prep.channels, h, w), dtype=np.uint8)

        def one(k: int) -> None:
            out[k] = self._decode_one(indices[k])

        if len(indices) > 1:
            # list() so that the first failure is raised here, in the caller's thread.
            list(self._pool.map(one, range(len(indices))))
        elif indices:
            one(0)
        return out

    def _decode_one(self, i: int) -> np.ndarray:
        from PIL import Image

        path, name = self.paths[i], self.names[i]
        try:
            with open(path, "rb") as fh:
                raw = fh.read(MAX_IMAGE_BYTES + 1)
        except OSError as exc:
            raise DataError(f"image {name} cannot be read ({exc.strerror or exc})") from None
        if len(raw) > MAX_IMAGE_BYTES:
            raise DataError(f"image {name} is larger than {MAX_IMAGE_BYTES >> 20} MiB")
        try:
            with Image.open(io.BytesIO(raw), formats=sorted(FORMATS)) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise DataError(
                        f"image {name} declares {im.width}x{im.height} pixels, over the limit "
                        f"of {MAX_PIXELS} (a decompression bomb?)"
                    )
                img = im.convert("RGB" if self.prep.channels == 3 else "L")
                img = self._resize(img)
        except DataError:
            raise
        except Image.DecompressionBombError:
            raise DataError(
                f"image {name} declares more pixels than Pillow decodes (a decompression bomb?)"
            ) from None
        except Exception as exc:  # Pillow's UnidentifiedImageError, OSError, SyntaxError...
            raise DataError(
                f"image {name} is not a readable PNG or JPEG file ({type(exc).__name__})"
            ) from None
        arr = np.asarray(img, dtype=np.uint8)
        return arr.transpose(2, 0, 1) if arr.ndim == 3 else arr[None]

    def _resize(self, img: Any) -> Any:
        h, w = self.prep.size or (0, 0)
        resample = self.prep.resample
        edge = self.prep.shortest_edge
        if edge:
            scale = edge / min(img.width, img.height)
            size = (max(round(img.width * scale), 1), max(round(img.height * scale), 1))
            img = img.resize(size, resample=resample)
            left, top = (img.width - w) // 2, (img.height - h) // 2
            return img.crop((left, top, left + w, top + h))
        if (img.width, img.height) != (w, h):
            img = img.resize((w, h), resample=resample)
        return img

    def verify(self) -> None:
        """Raise DataError when an image changed (size, time, gone) since it was listed."""
        for path, name, was in zip(self.paths, self.names, self._stats, strict=True):
            try:
                now = _signature(os.stat(path))
            except OSError:
                raise DataError(f"image {name} is gone: it was removed during the scan") from None
            if now != was:
                raise DataError(
                    f"image {name} changed during the scan; the scan read other bytes, so no "
                    "report is written: scan it again once the folder is stable"
                )

    def close(self) -> None:
        """Stop the decoding threads."""
        self._ahead_pool.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _check_file(path: Path, root: Path) -> tuple[int, int, int, int]:
    """Refuse an image that is not a regular file inside ``root`` (a link out of it
    included); returns its stat signature."""
    try:
        real = path.resolve(strict=True)
        st = os.stat(real)
    except OSError as exc:
        raise DataError(f"image {path} cannot be read ({exc.strerror or exc})") from None
    if real != root and root not in real.parents:
        raise DataError(f"image {path} lies outside the data folder {root}")
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"image {path} is not a regular file")
    if st.st_size == 0:
        raise DataError(f"image {path} is empty")
    return _signature(st)
