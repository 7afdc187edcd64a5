"""Cache of exported ONNX graphs.

Exporting a PyTorch or Keras model to ONNX takes seconds; scanning the same file again (another
data set, other settings) should not pay for it twice. An entry is keyed by the model file's
sha256 plus everything that changes the export (layer, input shape and dtype, architecture,
framework versions) and lives in ``$BACKDOORSCAN_CACHE_DIR`` or ``~/.cache/backdoorscan/onnx/``.
In-memory models have no file to hash and are never cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backdoorscan._io import atomic_write
from backdoorscan.adapters.base import OnnxExport

# Bump when the layout of an export changes, so that older entries are not reused.
CACHE_FORMAT = 1
META_KEY = "backdoorscan.export"
KEY_PATTERN = re.compile(r"[0-9a-f]{64}-[0-9a-f]{64}")


def cache_dir() -> Path:
    """The folder holding cached exports (not created here)."""
    env = os.environ.get("BACKDOORSCAN_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "backdoorscan" / "onnx"


def make_key(model_sha256: str, **parts: Any) -> str:
    """A cache key for one export of one model file; ``parts`` are what else shapes the export.

    ``MODEL_SHA256-DIGEST``: the model file's hash in clear, so that a key made by a process
    that ran the model (the worker, which could return any key) can be checked against the
    file before its export is stored (:func:`is_key_for`).
    """
    blob = json.dumps(
        {"format": CACHE_FORMAT, "model": model_sha256, **parts}, sort_keys=True, default=repr
    )
    return f"{model_sha256}-{hashlib.sha256(blob.encode()).hexdigest()}"


def is_key_for(key: object, model_sha256: str) -> bool:
    """Whether ``key`` has the form :func:`make_key` gives (nothing that could name another
    path) and belongs to the model file whose sha256 is ``model_sha256``."""
    return (
        isinstance(key, str)
        and KEY_PATTERN.fullmatch(key) is not None
        and key.startswith(model_sha256 + "-")
    )


def embed_metadata(export: OnnxExport) -> OnnxExport:
    """Write the export's description into the ONNX model's metadata, so a file is self-describing.

    The cache reads it back; it also tells anyone opening the file which tensor ``features`` is.
    """
    import onnx

    model = onnx.load_from_string(export.model_bytes)
    meta = {
        "input_name": export.input_name,
        "input_shape": list(export.input_shape),
        "input_dtype": export.input_dtype,
        "layer": export.layer,
        "feature_dim": export.feature_dim,
        "num_classes": export.num_classes,
        "notes": list(export.notes),
    }
    kept = [p for p in model.metadata_props if p.key != META_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    prop = model.metadata_props.add()
    prop.key = META_KEY
    prop.value = json.dumps(meta, sort_keys=True)
    export.model_bytes = model.SerializeToString()
    return export


def load(key: str) -> OnnxExport | None:
    """The cached export for ``key``, or None when absent or unreadable."""
    import onnx

    path = cache_dir() / f"{key}.onnx"
    try:
        data = path.read_bytes()
        model = onnx.load_from_string(data)
        raw = next(p.value for p in model.metadata_props if p.key == META_KEY)
        meta = json.loads(raw)
        return OnnxExport(
            model_bytes=data,
            input_name=meta["input_name"],
            input_shape=tuple(meta["input_shape"]),
            input_dtype=meta["input_dtype"],
            layer=meta["layer"],
            feature_dim=meta["feature_dim"],
            num_classes=meta["num_classes"],
            notes=[*meta["notes"], f"loaded from the export cache ({path})"],
        )
    except Exception:  # missing, unreadable, corrupt (protobuf's DecodeError) or foreign file
        return None


def store(key: str, export: OnnxExport) -> Path | None:
    """Write an export (metadata embedded) to the cache; None when the folder is unwritable.

    A failing cache must never fail a scan, so write errors are swallowed; a key not of
    :func:`make_key`'s form (it names the file) is not written.
    """
    if KEY_PATTERN.fullmatch(key) is None:
        return None
    path = cache_dir() / f"{key}.onnx"
    try:
        return atomic_write(
            path, lambda tmp: tmp.write_bytes(export.model_bytes), make_parents=True
        )
    except OSError:
        return None


def cached(key: str | None, make: Callable[[], OnnxExport]) -> OnnxExport:
    """The export stored under ``key``; else ``make()``, its metadata embedded, stored under
    ``key`` (no key: a model with no file to hash, made and not stored). Either way the
    export's ``cache_key`` is ``key``: where the store fails (the model worker may not write)
    the caller can store it elsewhere."""
    if key is not None:
        hit = load(key)
        if hit is not None:
            hit.cache_key = key
            return hit
    export = embed_metadata(make())
    if key is not None:
        export.cache_key = key
        store(key, export)
    return export
