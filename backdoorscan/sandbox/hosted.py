"""Worker side of a retrainable model kept in the worker (``remote.py`` is the scanner's side).

Repair and ExRe 'full' train the model, predict with it and save it; an untrusted file must
not be loaded in the scanner for that, so the worker keeps the loaded adapter (and its clones)
under integer handles and answers ``model_*`` requests on them. Replies are JSON and raw
numbers; a saved model comes back as bytes for the scanner to write (the worker may not).
"""

from __future__ import annotations

from typing import Any

from backdoorscan.sandbox import protocol

OPS = frozenset(
    {
        "model_load",
        "model_clone",
        "model_free",
        "model_fit",
        "model_reinitialize",
        "model_predict",
        "model_export",
        "model_layers",
        "model_save",
    }
)


def layer_table(rows: list) -> list[list]:
    """``LayerInfo`` rows as the JSON table a ``layers`` reply carries."""
    return [[r.name, r.op_type, list(r.shape), bool(r.default)] for r in rows]


class HostedModels:
    """The adapters a worker holds for the scanner, by handle."""

    def __init__(self) -> None:
        self.models: dict[int, Any] = {}
        self.next_handle = 1

    def _add(self, adapter: Any) -> dict[str, Any]:
        handle = self.next_handle
        self.next_handle += 1
        self.models[handle] = adapter
        return {
            "handle": handle,
            "framework": str(getattr(adapter, "framework", "")),
            "can_fit": bool(getattr(adapter, "can_fit", False)),
            "fit_reason": str(getattr(adapter, "fit_reason", "") or ""),
        }

    def _get(self, msg: dict[str, Any]) -> Any:
        handle = int(msg["handle"])
        if handle not in self.models:
            raise KeyError(f"no model with handle {handle} in this worker")
        return self.models[handle]

    def handle(self, op: str, msg: dict[str, Any], bufs: list) -> tuple[dict[str, Any], list]:
        """Answer one ``model_*`` request."""
        if op == "model_load":
            from backdoorscan import adapters

            return self._add(adapters.load(msg["path"], **msg.get("options", {}))), []
        if op == "model_free":
            self.models.pop(int(msg["handle"]), None)
            return {}, []
        adapter = self._get(msg)
        if op == "model_clone":
            return self._add(adapter.clone()), []
        if op == "model_fit":
            x, y = bufs
            adapter.fit(
                x,
                y,
                epochs=int(msg["epochs"]),
                batch_size=int(msg["batch_size"]),
                lr=float(msg["lr"]),
                seed=int(msg["seed"]),
            )
            return {}, []
        if op == "model_reinitialize":
            adapter.reinitialize(seed=int(msg["seed"]))
            return {}, []
        if op == "model_predict":
            import numpy as np

            logits = np.asarray(adapter.predict_logits(bufs[0], batch_size=int(msg["batch"])))
            return {}, [np.ascontiguousarray(logits, dtype=np.float32)]
        if op == "model_export":
            export = adapter.to_onnx(msg.get("layer"))
            export.framework = str(getattr(adapter, "framework", export.framework))
            return {"export": protocol.export_fields(export)}, [export.model_bytes]
        if op == "model_layers":
            return {"layers": layer_table(adapter.layers())}, []
        if op == "model_save":
            return {}, [adapter.to_bytes(str(msg["suffix"]))]
        raise ValueError(f"unknown request {op[:40]!r}")
