"""Keras 3 adapter: ``.keras`` archives (and legacy ``.h5``), on any Keras backend.

Keras is imported inside functions only. Files load with ``safe_mode=True``, so a Lambda layer
carrying Python bytecode is refused rather than run; legacy ``.h5`` files go through the same
safe-mode scope (Keras 3 applies it to ``load_model_from_hdf5`` too), and a file without a Keras
model config is refused before Keras sees it.

Export uses Keras' own ``model.export(path, format="onnx")`` on a two-output functional model
(logits, features). What that needs depends on the backend:

* torch (``KERAS_BACKEND=torch``): torch and onnxscript, i.e. ``pip install ".[torch,keras]"``;
  with a dynamic batch Keras uses torch's TorchScript-based exporter.
* tensorflow: tensorflow and ``tf2onnx`` (Keras calls ``tf2onnx.convert.from_function``).
* jax: ``jax2onnx``.

When neither ``KERAS_BACKEND``, an imported keras nor keras.json has chosen a backend other than
TensorFlow, and TensorFlow is not installed but torch is, this module selects the torch backend
(Keras would otherwise default to TensorFlow and fail to import).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from backdoorscan._io import atomic_write, sha256_file
from backdoorscan.adapters import _cache, _check
from backdoorscan.adapters._util import quiet
from backdoorscan.adapters.base import AdapterError, LayerInfo, OnnxExport, mark_default


def _keras() -> Any:
    """Import keras 3, choosing the torch backend when nothing else was chosen and TF is absent."""
    if "keras" not in sys.modules and not os.environ.get("KERAS_BACKEND"):
        has = importlib.util.find_spec
        chosen = _configured_backend()
        if chosen in (None, "tensorflow") and has("tensorflow") is None and has("torch"):
            os.environ["KERAS_BACKEND"] = "torch"
    try:
        import keras
    except ImportError as e:
        raise AdapterError(
            "Keras models need keras 3 and a backend, which are not installed: "
            f'pip install "backdoorscan[keras,torch]" and set KERAS_BACKEND=torch ({e})'
        ) from None
    if int(keras.__version__.split(".")[0]) < 3:
        raise AdapterError(f"Keras models need keras >= 3, found {keras.__version__}")
    return keras


def _configured_backend() -> str | None:
    """The backend named in keras.json ($KERAS_HOME or ~/.keras), or None.

    Keras writes ``"tensorflow"`` there on its first import, so only another name is a choice
    the user made (and is respected).
    """
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            backend = json.load(f).get("backend")
    except (OSError, ValueError, AttributeError):
        return None
    return backend if isinstance(backend, str) else None


def load(path: str | Path, **_ignored: Any) -> KerasAdapter:
    """Load a ``.keras`` (or legacy ``.h5``) model in safe mode, uncompiled."""
    p = Path(path)
    if not p.is_file():
        raise AdapterError(f"no such model file: {p}")
    suffix = p.suffix.lower()
    if suffix == ".keras":
        if not zipfile.is_zipfile(p):
            raise AdapterError(f"{p.name} is not a Keras archive (a .keras file is a zip)")
    elif suffix in (".h5", ".hdf5"):
        _require_keras_h5(p)
    else:
        raise AdapterError(f"{p.name}: Keras models are loaded from .keras or .h5 files")
    keras = _keras()
    try:
        model = keras.saving.load_model(p, safe_mode=True, compile=False)
    except Exception as e:
        msg = str(e)
        if "safe_mode" in msg or "Lambda" in msg:
            raise AdapterError(
                f"refusing {p.name}: Keras safe mode blocked it (a Lambda layer carries Python "
                "bytecode that would run on load). Rebuild that layer as a registered custom "
                "layer class, or export the model to ONNX yourself"
            ) from None
        raise AdapterError(f"cannot load {p.name} as a Keras model: {_one_line(msg)}") from e
    if not isinstance(model, keras.Model):
        raise AdapterError(f"{p.name} holds a {type(model).__name__}, not a keras.Model")
    return KerasAdapter(model, source=p, sha256=sha256_file(p))


def _one_line(text: str, limit: int = 300) -> str:
    """Keras' error text in one line: its errors run to several paragraphs (the config of
    every layer, then "Exception encountered:" and the cause, nested), so the innermost cause
    is kept, without the config dump; else the first line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    causes = [
        ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Exception encountered:")
    ]
    line = next((c for c in reversed(causes) if c), lines[0] if lines else "unknown error")
    line = re.sub(r"\s*(using )?config=\{.*$", "", line) or line
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _require_keras_h5(p: Path) -> None:
    try:
        import h5py
    except ImportError as e:
        raise AdapterError("reading .h5 models needs h5py: pip install h5py") from e
    try:
        with h5py.File(p, "r") as f:
            has_config = "model_config" in f.attrs
    except OSError as e:
        raise AdapterError(f"{p.name} is not an HDF5 file, so not a Keras .h5 model ({e})") from e
    if not has_config:
        raise AdapterError(
            f"{p.name} is an HDF5 file without a Keras model config (weights only, or not Keras "
            "at all); save the whole model with model.save('model.keras')"
        )


def from_model(model: Any, **_ignored: Any) -> KerasAdapter:
    """Wrap an in-memory ``keras.Model``; in-memory models are not cached."""
    keras = _keras()
    if not isinstance(model, keras.Model):
        raise AdapterError(f"expected a keras.Model, got {type(model).__name__}")
    return KerasAdapter(model)


class KerasAdapter:
    """A Keras 3 model behind the Adapter contract."""

    framework = "keras"
    can_fit = True
    fit_reason = ""

    def __init__(self, model: Any, *, source: Path | None = None, sha256: str | None = None):
        self.model = model
        self.source = source
        self._sha256 = sha256

    # -- Adapter contract -----------------------------------------------------------------

    def to_onnx(self, layer: str | None = None) -> OnnxExport:
        """Export ``logits`` and ``features`` (the last Dense's input, or ``layer``'s output)."""
        keras = _keras()
        key = None
        if self._sha256:
            key = _cache.make_key(
                self._sha256,
                framework="keras",
                layer=layer,
                keras=keras.__version__,
                backend=keras.backend.backend(),
                backend_version=_backend_version(keras),
            )
        return _cache.cached(key, lambda: self._export(layer))

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int = 1,
        batch_size: int = 128,
        lr: float = 1e-3,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        """Continue training: Adam and sparse cross-entropy (from_logits read off the last layer).

        ``optimizer=`` (a keras optimizer) and ``loss_fn=`` (a keras loss) replace the defaults;
        seeded with ``keras.utils.set_random_seed``.
        """
        keras = _keras()
        optimizer = kwargs.pop("optimizer", None) or keras.optimizers.Adam(learning_rate=lr)
        loss = kwargs.pop("loss_fn", None) or keras.losses.SparseCategoricalCrossentropy(
            from_logits=_outputs_logits(keras, self.model)
        )
        if kwargs:
            raise AdapterError(f"unknown fit options: {', '.join(sorted(kwargs))}")
        x = np.asarray(x)
        y = np.asarray(y)
        if len(x) != len(y) or len(x) == 0:
            raise AdapterError(f"fit needs as many labels as samples, got {len(x)} and {len(y)}")
        keras.utils.set_random_seed(seed)
        self.model.compile(optimizer=optimizer, loss=loss)
        history = self.model.fit(
            x.astype(self._input_dtype(), copy=False),
            y.astype(np.int64, copy=False),
            epochs=int(epochs),
            batch_size=int(batch_size),
            shuffle=True,
            verbose=0,
        )
        losses = history.history.get("loss") or [None]
        self.last_loss = losses[-1]
        self._sha256 = None  # the weights no longer match the file: never reuse its cached export

    def clone(self) -> KerasAdapter:
        """An independent copy with the same weights (clone_model, or a safe-mode save/load)."""
        keras = _keras()
        try:
            twin = keras.models.clone_model(self.model)
            twin.set_weights(self.model.get_weights())
        except Exception:  # subclassed models without a config: round-trip through a file
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "clone.keras"
                self.model.save(path)
                twin = keras.saving.load_model(path, safe_mode=True, compile=False)
        return KerasAdapter(twin, source=self.source, sha256=self._sha256)

    def reinitialize(self, seed: int = 0) -> None:
        """Fresh weights for the same architecture, seeded: every initializer draws again.

        Exclusionary reclassification retrains from scratch, as continuing from poisoned weights
        keeps the backdoor. A clone of the model (``clone_model`` builds new layers from the
        config) draws its weights under ``keras.utils.set_random_seed(seed)``; its weights are
        copied into this model, so the model object and its layers stay the same.
        """
        keras = _keras()
        keras.utils.set_random_seed(seed)
        try:
            fresh = keras.models.clone_model(self.model)
        except Exception as e:  # subclassed models without a config
            raise AdapterError(
                f"cannot re-initialise the Keras model ({type(e).__name__}: "
                f"{_one_line(str(e))}); retraining from scratch needs a Functional or "
                "Sequential model"
            ) from None
        if not fresh.built:
            fresh.build(self.model.inputs[0].shape if self.model.inputs else None)
        self.model.set_weights(fresh.get_weights())
        self._sha256 = None  # the weights no longer match the file: never reuse its cached export

    def save(self, path: str | Path) -> Path:
        """Write the model as a ``.keras`` archive, atomically (the folder made where missing)."""
        target = Path(path)
        if target.suffix.lower() != ".keras":
            raise AdapterError(f"Keras models are saved as .keras files, got {target.name}")
        return atomic_write(
            target, lambda tmp: self.model.save(tmp), suffix=".keras", make_parents=True
        )

    def to_bytes(self, suffix: str = ".keras") -> bytes:
        """The ``.keras`` archive :meth:`save` writes, as bytes (a model in a worker process,
        which may not write files, hands its retrained weights over this way)."""
        if suffix.lower() != ".keras":
            raise AdapterError(f"Keras models are saved as .keras files, got {suffix!r}")
        from keras.src.saving import saving_lib  # Keras 3's saver takes a file object

        buf = io.BytesIO()
        try:
            saving_lib.save_model(self.model, buf)
        except PermissionError:
            # Keras stages assets in a temporary folder, which a confined worker may not make.
            return _archive_without_assets(self.model)
        return buf.getvalue()

    # -- inspection and inference ---------------------------------------------------------

    def layers(self) -> list[LayerInfo]:
        """A row per top-level layer: name, class name, per-sample output shape (or ()).

        The default feature layer is marked (``row.default``): the layer whose output the last
        Dense reads, or an inserted ``input of DENSE`` row where that is no listed layer.
        """
        keras = _keras()
        rows, outputs = [], {}
        for layer in self.model.layers:
            try:
                out = layer.output
                shape = tuple(out.shape[1:])
            except (AttributeError, ValueError):
                out, shape = None, ()
            rows.append(LayerInfo(layer.name, type(layer).__name__, shape))
            outputs[layer.name] = out
        dense = [x for x in self.model.layers if isinstance(x, keras.layers.Dense)]
        if not dense:
            return rows
        try:
            feats = dense[-1].input
        except (AttributeError, ValueError):  # a shared head: no single input to point at
            return rows
        # A loaded Sequential calls its layers more than once while rebuilding, and layer.output
        # is the first call's tensor: ask the head's input which layer made it instead.
        made_by = getattr(getattr(feats, "_keras_history", None), "operation", None)
        producer = next(
            (x.name for x in self.model.layers if x is made_by or outputs[x.name] is feats), None
        )
        shape = tuple(getattr(feats, "shape", (None,))[1:])
        return mark_default(rows, producer, dense[-1].name, shape)

    def predict_logits(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """The model's outputs for ``x`` (inference mode), as float32."""
        x = np.asarray(x).astype(self._input_dtype(), copy=False)
        if len(x) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        out = self.model.predict(x, batch_size=int(batch_size), verbose=0)
        return np.asarray(out, dtype=np.float32)

    # -- internals ------------------------------------------------------------------------

    def _input(self) -> Any:
        try:
            inputs = self.model.inputs
        except (AttributeError, ValueError):
            inputs = None
        if not inputs:
            raise AdapterError(
                "the Keras model has no defined inputs yet: build it with keras.Input(...) or "
                "call it once on a batch before scanning"
            )
        if len(inputs) != 1:
            names = ", ".join(str(getattr(i, "name", i)) for i in inputs)
            raise AdapterError(
                f"the model takes {len(inputs)} inputs ({names}); backdoorscan feeds one tensor "
                "per sample: build a single-input model"
            )
        return inputs[0]

    def _input_dtype(self) -> str:
        try:
            return str(np.dtype(self._input().dtype))
        except AdapterError:
            return "float32"

    def _candidates(self, n: int = 10) -> str:
        named = [f"{layer.name} ({type(layer).__name__})" for layer in self.model.layers]
        return ", ".join(named[-n:]) or "(no layers)"

    def _vocab(self, keras: Any) -> int | None:
        for layer in self.model.layers:
            if isinstance(layer, keras.layers.Embedding):
                return int(layer.input_dim)
        return None

    def _export(self, layer: str | None) -> OnnxExport:
        import onnx

        keras = _keras()
        model = self.model
        inp = self._input()
        outputs = list(model.outputs)
        if len(outputs) != 1 or len(outputs[0].shape) != 2:
            found = (
                f"{len(outputs)} outputs"
                if len(outputs) != 1
                else f"an output of shape {tuple(outputs[0].shape)}"
            )
            raise AdapterError(
                f"the model has {found}; backdoorscan needs a classifier with one "
                "[batch, classes] output (the feature layer is chosen separately with --layer)"
            )
        if layer is None:
            dense = [x for x in model.layers if isinstance(x, keras.layers.Dense)]
            if not dense:
                raise AdapterError(
                    "no Dense layer in the model, so there is no classifier head whose input "
                    f"would be the features; name the feature layer with --layer: "
                    f"{self._candidates()}"
                )
            head = dense[-1]
            try:
                feature = head.input
            except (AttributeError, ValueError) as e:
                raise AdapterError(
                    f"the input of {head.name} is ambiguous (shared layer?): name the feature "
                    f"layer with --layer: {self._candidates()}"
                ) from e
            description = f"input of {head.name}"
        else:
            try:
                feature = model.get_layer(layer).output
            except (AttributeError, ValueError) as e:
                raise AdapterError(
                    f"no layer named {layer!r} (or it has no single output); candidates: "
                    f"{self._candidates()}"
                ) from e
            description = layer
        per_sample = tuple(inp.shape[1:])
        if any(d is None for d in per_sample):
            raise AdapterError(
                f"the model input has dynamic dimensions {per_sample}; backdoorscan needs a "
                "fixed per-sample shape (rebuild the model with a concrete keras.Input shape)"
            )
        dtype = str(np.dtype(inp.dtype))
        two = keras.Model(model.inputs, [outputs[0], feature])
        spec = keras.InputSpec(shape=(None, *per_sample), dtype=dtype)
        # On the torch backend Keras hands the target to torch.onnx.export, which writes to a
        # file object as well: into memory, then, as no file may be written where untrusted
        # models are exported (the sandbox's model worker). The other backends need a path.
        in_memory = keras.backend.backend() == "torch"
        folder = contextlib.nullcontext("") if in_memory else tempfile.TemporaryDirectory()
        with folder as tmp, quiet():
            target: Any = io.BytesIO() if in_memory else str(Path(tmp) / "model.onnx")
            try:
                two.export(target, format="onnx", verbose=False, input_signature=[spec])
            except Exception as e:
                raise AdapterError(
                    f"Keras could not export the model to ONNX on the "
                    f"{keras.backend.backend()} backend: {_one_line(str(e))} (see "
                    "backdoorscan.adapters.keras for what each backend needs)"
                ) from e
            graph = onnx.load_from_string(target.getvalue()) if in_memory else onnx.load(target)
        graph_inputs = _check.data_inputs(graph)
        if len(graph_inputs) != 1 or len(graph.graph.output) != 2:
            raise AdapterError("Keras' ONNX export does not have one input and two outputs")
        # Keras numbers its ONNX outputs; they come in the order the functional model lists them.
        logits_name, feature_name = (o.name for o in graph.graph.output)
        graph = _check.name_outputs(graph, logits_name, feature_name)
        model_bytes = graph.SerializeToString()
        x = _check.sample_batch(per_sample, dtype, vocab=self._vocab(keras))
        x2 = x[: _check.SECOND_BATCH]

        def reference(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            logits, feats = two.predict(batch, batch_size=len(batch), verbose=0)
            return np.asarray(logits), np.asarray(feats).reshape(len(batch), -1)

        what = self.source.name if self.source else "the model"
        feature_dim, num_classes, note = _check.check_export(
            model_bytes, graph_inputs[0].name, [x, x2], reference, what=what
        )
        notes = [f"exported with Keras {keras.__version__} on {keras.backend.backend()}", note]
        if not _outputs_logits(keras, model):
            notes.append("the model ends in softmax: 'logits' holds probabilities")
        return OnnxExport(
            model_bytes=model_bytes,
            input_name=graph_inputs[0].name,
            input_shape=per_sample,
            input_dtype=dtype,
            layer=description,
            feature_dim=feature_dim,
            num_classes=num_classes,
            notes=notes,
        )


def _outputs_logits(keras: Any, model: Any) -> bool:
    """False when the last layer applies softmax (the outputs are probabilities)."""
    if not model.layers:
        return True
    last = model.layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return False
    act = getattr(last, "activation", None)
    return getattr(act, "__name__", "") != "softmax"


def _backend_version(keras: Any) -> str:
    name = keras.backend.backend()
    mod = {"torch": "torch", "tensorflow": "tensorflow", "jax": "jax"}.get(name)
    if mod and mod in sys.modules:
        return str(getattr(sys.modules[mod], "__version__", ""))
    return ""


def _archive_without_assets(model: Any) -> bytes:
    """A ``.keras`` archive (metadata, config, weights) built in memory, for a model with no
    assets to stage; a model with assets (vocabularies, lookup tables) is refused in a line."""
    from keras.src.saving import saving_lib

    with_assets = [layer.name for layer in model._flatten_layers() if hasattr(layer, "save_assets")]
    if with_assets:
        raise AdapterError(
            f"this Keras model carries assets ({', '.join(with_assets[:3])}), which cannot be "
            "written from the confined model worker; pass --trust-model to save it here"
        )
    config_json, metadata_json = saving_lib._serialize_model_as_json(model)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(saving_lib._METADATA_FILENAME, metadata_json)
        zf.writestr(saving_lib._CONFIG_FILENAME, config_json)
        store = saving_lib.H5IOStore(saving_lib._VARS_FNAME_H5, archive=zf, mode="w")
        try:
            saving_lib._save_state(
                model,
                weights_store=store,
                assets_store=None,
                inner_path="",
                visited_saveables=set(),
            )
        finally:
            store.close()
    return buf.getvalue()
