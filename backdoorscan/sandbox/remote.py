"""A retrainable model that lives in the worker process: the scanner's side of ``hosted.py``.

:func:`load_remote` loads a model file in a :class:`~backdoorscan.sandbox.ModelWorker` and
returns a :class:`RemoteModel`, which fulfils the adapter contract (``adapters.base.Adapter``
and ``Retrainable``) by requests: repair and ExRe 'full' train, measure, export and save an
untrusted model without ever loading it in the scanner. Arrays go over as raw numbers; what
comes back is checked like every other reply (shapes, dtypes, sizes), never unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from backdoorscan._io import atomic_write
from backdoorscan.adapters.base import LayerInfo, OnnxExport
from backdoorscan.sandbox import protocol

# Samples per prediction request: bounds each message whatever the data set's size.
PREDICT_CHUNK = 4096


class RemoteModel:
    """A model held by a worker under ``handle``; every method is one request to it.

    The worker must stay open while the model is used; :meth:`close` frees the worker's copy.
    """

    def __init__(self, worker: Any, path: str, options: dict[str, Any], info: dict) -> None:
        self._worker = worker
        self._path = path
        self._options = options
        self.handle = protocol.expect(info.get("handle"), int, "model handle")
        self.framework = protocol.expect(info.get("framework"), str, "framework")
        self.can_fit = protocol.expect(info.get("can_fit"), bool, "can_fit")
        self.fit_reason = protocol.expect(info.get("fit_reason"), str, "fit_reason")

    def _ask(self, op: str, what: str, buffers: tuple = (), **fields: Any) -> tuple[dict, list]:
        header = {"op": op, "handle": self.handle, **fields}
        return self._worker._request(header, buffers, what)

    # -- the adapter contract --------------------------------------------------------------

    def to_onnx(self, layer: str | None = None) -> OnnxExport:
        """Export the model (its current weights) in the worker, features as an output."""
        reply, bufs = self._ask("model_export", "exporting the model", layer=layer)
        if len(bufs) != 1 or not isinstance(bufs[0], bytes):
            raise self._worker._malformed("an export without its model bytes")
        return protocol.export_from_fields(reply.get("export"), bufs[0])

    def layers(self) -> list[LayerInfo]:
        """The model's hidden layers, as the worker lists them."""
        reply, _ = self._ask("model_layers", "listing the layers")
        return self._worker._layer_rows(reply)

    def predict_logits(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """The model's logits for ``x``, computed in the worker a bounded chunk at a time."""
        x = np.asarray(x)
        parts = []
        for start in range(0, len(x), PREDICT_CHUNK):
            chunk = np.ascontiguousarray(x[start : start + PREDICT_CHUNK])
            _, bufs = self._ask(
                "model_predict", "running the model", (chunk,), batch=int(batch_size)
            )
            if (
                len(bufs) != 1
                or not isinstance(bufs[0], np.ndarray)
                or bufs[0].dtype != np.float32
                or bufs[0].ndim < 1
                or len(bufs[0]) != len(chunk)
            ):
                raise self._worker._malformed("logits")
            parts.append(bufs[0].reshape(len(chunk), -1))
        if not parts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(parts)

    def clone(self) -> RemoteModel:
        """An independent copy in the same worker (same weights)."""
        reply, _ = self._ask("model_clone", "copying the model")
        return RemoteModel(self._worker, self._path, self._options, reply)

    def save(self, path: str | Path) -> Path:
        """Write the model in its own format: the worker serialises it, the scanner writes the
        bytes atomically (the worker may not write files)."""
        target = Path(path)
        _, bufs = self._ask("model_save", "saving the model", suffix=target.suffix)
        if len(bufs) != 1 or not isinstance(bufs[0], bytes):
            raise self._worker._malformed("a saved model without its bytes")
        data = bufs[0]
        return atomic_write(target, lambda tmp: tmp.write_bytes(data), make_parents=True)

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int = 1,
        batch_size: int = 128,
        lr: float = 1e-3,
        seed: int = 0,
    ) -> None:
        """Continue training in the worker on (x, y), bounded by its memory and time limits."""
        self._ask(
            "model_fit",
            "training the model",
            (np.ascontiguousarray(x), np.ascontiguousarray(y)),
            epochs=int(epochs),
            batch_size=int(batch_size),
            lr=float(lr),
            seed=int(seed),
        )

    def reinitialize(self, seed: int = 0) -> None:
        """Draw fresh weights in the worker (seeded)."""
        self._ask("model_reinitialize", "re-initialising the model", seed=int(seed))

    def close(self) -> None:
        """Free the worker's copy (a worker that is gone has freed it already)."""
        w = self._worker
        if not w._dead and w._sock is not None:
            self._ask("model_free", "freeing a model")


def load_remote(worker: Any, model_path: str | Path, **options: Any) -> RemoteModel:
    """``adapters.load(model_path, **options)`` kept in ``worker``, as a :class:`RemoteModel`."""
    path = worker._model_path(model_path, options)
    reply, _ = worker._request(
        {"op": "model_load", "path": path, "options": options},
        (),
        f"loading {Path(path).name}",
    )
    return RemoteModel(worker, path, options, reply)
