"""Isolation of untrusted models: everything that parses or runs one happens in a worker process
that the scanner bounds (memory, time), confines (seccomp, Landlock) and can always kill.

    from backdoorscan.sandbox import Limits, ModelWorker

    limits = Limits(max_memory=2 << 30, timeout=600.0, allow_read=[model_dir, data_dir])
    with ModelWorker(limits) as w:
        export = w.export(model_path, layer=None, **adapter_options)  # an OnnxExport
        session = w.session(export, device="auto")                      # a SessionProxy
        logits, feats = session.run([export.logits_name, export.features_name],
                                    {export.input_name: batch})
        w.status.summary()  # "seccomp on (..); landlock on (ABI 7); memory RLIMIT_AS=..."

``export_cached(w, model_path, layer, **options)`` is ``w.export`` with the export cache:
the worker reads it, the scanner stores what the worker had to make (``export_cache.py``).

Errors are :class:`SandboxError` (one line each): :class:`WorkerTimeout`,
:class:`WorkerMemoryError`, and :class:`ModelError` for anything raised inside the worker
(``kind`` names the worker's exception class, e.g. ``AdapterError``). Names are imported on
first use, so that the worker process starts without numpy until it has confined itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backdoorscan.sandbox.client import ModelWorker, NodeInfo, SessionProxy
    from backdoorscan.sandbox.export_cache import export_cached
    from backdoorscan.sandbox.limits import (
        IsolationStatus,
        Limits,
        ModelError,
        SandboxError,
        WorkerMemoryError,
        WorkerTimeout,
    )

_EXPORTS = {
    "ModelWorker": "client",
    "NodeInfo": "client",
    "SessionProxy": "client",
    "export_cached": "export_cache",
    "IsolationStatus": "limits",
    "Limits": "limits",
    "ModelError": "limits",
    "SandboxError": "limits",
    "WorkerMemoryError": "limits",
    "WorkerTimeout": "limits",
}

__all__ = [
    "IsolationStatus",
    "Limits",
    "ModelError",
    "ModelWorker",
    "NodeInfo",
    "SandboxError",
    "SessionProxy",
    "WorkerMemoryError",
    "WorkerTimeout",
    "export_cached",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'backdoorscan.sandbox' has no attribute {name!r}")
    return getattr(importlib.import_module(f"backdoorscan.sandbox.{module}"), name)
