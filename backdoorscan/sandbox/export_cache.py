"""The export cache across the sandbox: the worker reads it, the scanner writes it.

The adapters keep exports under ``adapters._cache.cache_dir()`` (``cached(key, make)``). The
model worker may read that folder (it is on its Landlock list, read-only) and so is served
from it, but it may not write anywhere; an export it had to make comes back with its
``cache_key``, and the scanner stores it, once it has checked that the key, which the worker
(code the model shapes) could have forged, has the cache's form and belongs to the model file
the scanner itself hashes. A hostile model can so only ever fill the entries of its own bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backdoorscan.adapters.base import OnnxExport
    from backdoorscan.sandbox.client import ModelWorker

__all__ = ["cache_read_paths", "export_cached"]


def cache_read_paths() -> list[str]:
    """The export cache's folder, resolved, for the worker's read-only list; none while the
    folder does not exist (the first export a scanner stores creates it, for later workers)."""
    from backdoorscan.adapters import _cache

    try:
        folder = _cache.cache_dir().resolve()
        return [str(folder)] if folder.is_dir() else []
    except (OSError, RuntimeError):
        return []


def export_cached(
    worker: ModelWorker, model_path: str | Path, layer: str | None = None, **options: Any
) -> OnnxExport:
    """``worker.export(model_path, layer, **options)``, with the export cache: looked up in the
    worker (its notes then say "loaded from the export cache"), stored here when the worker had
    to make it. A key that does not check out is dropped (``cache_key`` None), not stored."""
    from backdoorscan._io import sha256_file
    from backdoorscan.adapters import _cache

    export = worker.export(model_path, layer, **options)
    key = export.cache_key
    if key is None:
        return export
    if _cache.KEY_PATTERN.fullmatch(key) is None:
        export.cache_key = None
        return export
    if (_cache.cache_dir() / f"{key}.onnx").exists():
        return export  # served from the cache, or stored meanwhile: nothing to add
    try:
        sha = sha256_file(Path(model_path).expanduser().resolve())
    except OSError:
        export.cache_key = None
        return export
    if not _cache.is_key_for(key, sha):
        export.cache_key = None
        return export
    _cache.store(key, export)
    return export
