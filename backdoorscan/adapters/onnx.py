"""The ONNX adapter: take any ONNX classifier as it is and expose its penultimate activations.

The penultimate tensor is found by walking back from the logits output through the operators
that only reshape or normalise (Softmax, Add, Flatten, Reshape, Identity, ...) to the last
Gemm/MatMul; its data input is the hidden layer (``backdoorscan.onnx_graph.find_head``). The
tensor is added as a graph output named ``features``, flattened per sample. Custom-op domains
and external data outside the model's folder are refused: a model file is untrusted input.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from backdoorscan import onnx_graph as og
from backdoorscan.adapters import _check
from backdoorscan.adapters.base import FEATURES, LOGITS, AdapterError, LayerInfo, OnnxExport

# Operator domains ONNX Runtime implements itself; anything else needs a custom-op library.
STANDARD_DOMAINS = frozenset(
    {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"}
)
# Operators whose outputs `layers` lists as candidate hidden tensors.
HIDDEN_OPS = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "Gelu",
        "Tanh",
        "Sigmoid",
        "Elu",
        "Selu",
        "HardSigmoid",
        "HardSwish",
        "Mish",
        "Softplus",
        "Gemm",
        "MatMul",
        "Add",
        "Flatten",
        "Reshape",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "MaxPool",
        "AveragePool",
        "ReduceMean",
        "ReduceMax",
        "Conv",
        "Concat",
        "BatchNormalization",
        "LayerNormalization",
        "Clip",
    }
)
MAX_MODEL_BYTES = 4 << 30


def read_model(path: str | Path) -> onnx.ModelProto:
    """Parse an ONNX file without trusting it: no custom ops, external data inside its folder."""
    p = Path(path)
    if not p.exists():
        raise AdapterError(f"model file not found: {p}")
    if not p.is_file():
        raise AdapterError(f"model path is not a file: {p}")
    size = p.stat().st_size
    if size == 0:
        raise AdapterError(f"model file is empty: {p}")
    if size > MAX_MODEL_BYTES:
        raise AdapterError(f"model file is {size / 2**30:.1f} GiB, over the 4 GiB ONNX limit: {p}")
    try:
        model = onnx.load_model(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types on garbage
        raise AdapterError(
            f"{p.name} is not a readable ONNX model ({type(exc).__name__})"
        ) from None
    if len(model.graph.node) == 0 and len(model.graph.output) == 0:
        raise AdapterError(f"{p.name} is not an ONNX model: it holds no graph")
    _check_external_data(model, p.parent)
    if any(t.data_location == TensorProto.EXTERNAL for t in og.all_tensors(model)):
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError) as exc:
            raise AdapterError(f"cannot read the external data of {p.name}: {exc}") from None
    return model


def _check_external_data(model: onnx.ModelProto, folder: Path) -> None:
    root = folder.resolve()
    for tensor in og.all_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        location = entries.get("location", "")
        if not location or os.path.isabs(location) or Path(location).drive:
            raise AdapterError(
                f"refusing external data of tensor {tensor.name!r}: location {location!r} "
                "is not a relative path inside the model's folder"
            )
        target = (root / location).resolve()
        if target != root and root not in target.parents:
            raise AdapterError(
                f"refusing external data of tensor {tensor.name!r}: {location!r} points outside "
                "the model's folder"
            )
        if not target.is_file():
            raise AdapterError(
                f"external data file of tensor {tensor.name!r} is missing: {location}"
            )


def check_domains(model: onnx.ModelProto) -> None:
    """Refuse operators from domains that would need a custom-op library to run."""
    local = {f.domain for f in model.functions}
    custom = sorted({n.domain for n in og.all_nodes(model.graph)} - STANDARD_DOMAINS - local)
    if custom:
        raise AdapterError(
            f"model uses custom operator domain(s) {', '.join(custom)}; backdoorscan does not load "
            "custom-op libraries"
        )


def check_text(model: onnx.ModelProto) -> None:
    """Refuse a model whose names are not valid UTF-8 (protobuf then hands out bytes, not str)."""
    texts: list[object] = [d.domain for d in model.opset_import]
    for graph in og.subgraphs(model.graph):
        for vi in [*graph.input, *graph.output, *graph.value_info]:
            texts.append(vi.name)
        texts.extend(t.name for t in graph.initializer)
        for node in graph.node:
            texts.extend([node.op_type, node.domain, node.name, *node.input, *node.output])
            texts.extend(a.name for a in node.attribute)
    for f in model.functions:
        texts.extend([f.name, f.domain, *f.input, *f.output])
        for node in f.node:
            texts.extend([node.op_type, node.domain, *node.input, *node.output])
    if any(not isinstance(t, str) for t in texts):
        raise AdapterError("the model holds names that are not valid UTF-8 text; it is damaged")


class OnnxAdapter:
    """An ONNX classifier scanned as it is; it cannot be retrained (repair writes data instead)."""

    framework = "onnx"
    can_fit = False
    fit_reason = (
        "a bare ONNX model cannot be retrained; repair writes the relabelled data set instead"
    )

    def __init__(self, model: onnx.ModelProto, *, source: Path | None = None) -> None:
        check_text(model)
        check_domains(model)
        self.model = model
        self.source = source
        graph = model.graph
        self._inputs = _check.data_inputs(model)
        if len(self._inputs) != 1:
            names = ", ".join(i.name for i in self._inputs) or "none"
            raise AdapterError(
                f"model has {len(self._inputs)} data inputs ({names}); backdoorscan scans "
                "classifiers with exactly one input"
            )
        if len(graph.output) == 0:
            raise AdapterError("model has no outputs")
        self._producer = og.producers(graph)
        self._inferred: onnx.ModelProto | None = None
        self._logits_session: Any = None  # onnxruntime.InferenceSession, made on first predict

    # -- inspection ---------------------------------------------------------------------------
    @property
    def input(self) -> onnx.ValueInfoProto:
        """The one data input (graph inputs that are initializers do not count)."""
        return self._inputs[0]

    @property
    def logits_name(self) -> str:
        """The classifier output: the first graph output (the convention of every exporter)."""
        return self.model.graph.output[0].name

    def _shapes(self) -> dict[str, tuple[int | str | None, ...]]:
        if self._inferred is None:
            try:
                self._inferred = onnx.shape_inference.infer_shapes(self.model, data_prop=True)
            except Exception:
                self._inferred = self.model
        g = self._inferred.graph
        shapes: dict[str, tuple[int | str | None, ...]] = {}
        for vi in [*g.input, *g.value_info, *g.output]:
            dims = og.dims(vi)
            if dims is not None:
                shapes[vi.name] = dims
        return shapes

    def default_layer(self) -> str:
        """The data input of the last Gemm/MatMul that feeds the logits."""
        try:
            return og.find_head(self.model.graph, self.logits_name).features
        except og.NoHeadError as e:
            raise AdapterError(
                f"{e}; name the hidden tensor with --layer (see `backdoorscan layers MODEL`)"
            ) from None

    def layers(self) -> list[LayerInfo]:
        """Candidate hidden tensors in graph order, with per-sample shapes; the default marked."""
        try:
            default = self.default_layer()
        except AdapterError:
            default = None
        shapes = self._shapes()
        out: list[LayerInfo] = []
        for node in self.model.graph.node:
            if node.op_type not in HIDDEN_OPS:
                continue
            for name in node.output[:1]:
                shape = shapes.get(name)
                out.append(
                    LayerInfo(name, node.op_type, shape[1:] if shape else (), name == default)
                )
        if default is not None and not any(layer.default for layer in out):
            shape = shapes.get(default)
            producer = self._producer.get(default)
            out.append(
                LayerInfo(
                    default,
                    producer.op_type if producer else "input",
                    shape[1:] if shape else (),
                    True,
                )
            )
        return out

    def input_spec(self) -> tuple[tuple[int | None, ...], str]:
        """Per-sample input shape (None where dynamic) and numpy dtype name."""
        dims = og.dims(self.input) or ()
        elem = self.input.type.tensor_type.elem_type
        dtype = og.numpy_dtype(elem)
        if dtype is None:
            raise AdapterError(
                f"model input {self.input.name!r} has element type "
                f"{og.type_name(elem)}, which backdoorscan cannot feed"
            )
        shape = tuple(d if isinstance(d, int) and d > 0 else None for d in dims[1:])
        return shape, dtype

    # -- export -------------------------------------------------------------------------------
    def to_onnx(self, layer: str | None = None) -> OnnxExport:
        """A copy of the model whose outputs are exactly ``logits`` and ``features``."""
        layer_name = layer or self.default_layer()
        known = {o for n in self.model.graph.node for o in n.output} | {self.input.name}
        if layer_name not in known:
            candidates = ", ".join(info.name for info in self.layers()[-8:])
            raise AdapterError(
                f"no tensor named {layer_name!r} in the model; candidates include: {candidates}"
            )
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        graph = model.graph
        shapes = self._shapes()
        logits_src = self.logits_name
        _make_batch_dynamic(graph, self.input.name)
        taken = og.taken_names(graph)
        logits_out = LOGITS if logits_src == LOGITS else og.fresh_name(LOGITS, taken)
        features_out = FEATURES if layer_name == FEATURES else og.fresh_name(FEATURES, taken)
        nodes = []
        if logits_out != logits_src:
            nodes.append(
                helper.make_node("Identity", [logits_src], [logits_out], name="backdoorscan_logits")
            )
        feat_shape = shapes.get(layer_name)
        if feat_shape is not None and len(feat_shape) == 2:
            op = helper.make_node(
                "Identity", [layer_name], [features_out], name="backdoorscan_features"
            )
        else:
            op = helper.make_node(
                "Flatten", [layer_name], [features_out], axis=1, name="backdoorscan_features"
            )
        if features_out != layer_name:
            nodes.append(op)
        graph.node.extend(nodes)
        feature_dim = og.shape_product(feat_shape[1:]) if feat_shape else None
        logits_shape = shapes.get(logits_src)
        num_classes = (
            logits_shape[-1]
            if logits_shape and isinstance(logits_shape[-1], int) and logits_shape[-1] > 0
            else None
        )
        del graph.output[:]
        graph.output.extend(
            [
                helper.make_tensor_value_info(
                    logits_out, self.model.graph.output[0].type.tensor_type.elem_type, None
                ),
                helper.make_tensor_value_info(features_out, TensorProto.FLOAT, None),
            ]
        )
        _fix_feature_type(graph, features_out, layer_name, shapes, self._inferred)
        shape, dtype = self.input_spec()
        notes = []
        if logits_out != LOGITS or features_out != FEATURES:
            notes.append(f"outputs named {logits_out!r} and {features_out!r} to avoid clashes")
        return OnnxExport(
            model_bytes=model.SerializeToString(),
            input_name=self.input.name,
            input_shape=shape,
            input_dtype=dtype,
            layer=layer_name,
            feature_dim=feature_dim,
            num_classes=num_classes,
            notes=notes,
            framework="onnx",
            logits_name=logits_out,
            features_name=features_out,
        )

    def predict_logits(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """The model's first output for ``x``, from ONNX Runtime on the CPU, as float32 rows."""
        x = np.asarray(x)
        if len(x) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        if self._logits_session is None:
            self._logits_session = _check.session(self._logits_graph())
        _, dtype = self.input_spec()
        step = max(int(batch_size), 1)
        outs = []
        for start in range(0, len(x), step):
            xb = np.ascontiguousarray(x[start : start + step], dtype=dtype)
            (logits,) = self._logits_session.run([self.logits_name], {self.input.name: xb})
            outs.append(np.asarray(logits, dtype=np.float32).reshape(len(xb), -1))
        return np.concatenate(outs)

    def _logits_graph(self) -> bytes:
        """A copy of the model with a free batch size and the logits as its only output."""
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        _make_batch_dynamic(model.graph, self.input.name)
        og.keep(model.graph.output, lambda o: o.name == self.logits_name)
        return model.SerializeToString()

    # -- the Adapter contract for a framework that cannot train -------------------------------
    def fit(self, x: np.ndarray, y: np.ndarray, **kwargs: object) -> None:
        """ONNX models cannot be retrained here; repair writes the cleaned data set instead."""
        raise AdapterError(self.fit_reason)

    def clone(self) -> OnnxAdapter:
        """A copy sharing nothing mutable with this adapter."""
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        return OnnxAdapter(model, source=self.source)

    def save(self, path: str | Path) -> Path:
        """Write the model as ONNX, atomically."""
        from backdoorscan._io import atomic_write_bytes

        return atomic_write_bytes(Path(path), self.model.SerializeToString())


def _make_batch_dynamic(graph: onnx.GraphProto, input_name: str) -> None:
    for vi in graph.input:
        if vi.name == input_name and vi.type.tensor_type.shape.dim:
            dim = vi.type.tensor_type.shape.dim[0]
            if dim.HasField("dim_value"):
                dim.Clear()
                dim.dim_param = "batch"
    # Intermediate shapes recorded for a fixed batch would contradict a dynamic one.
    del graph.value_info[:]


def _fix_feature_type(
    graph: onnx.GraphProto,
    out: str,
    layer: str,
    shapes: dict[str, tuple[int | str | None, ...]],
    inferred: onnx.ModelProto | None,
) -> None:
    elem = TensorProto.FLOAT
    if inferred is not None:
        for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            if vi.name == layer:
                elem = vi.type.tensor_type.elem_type or TensorProto.FLOAT
    for vi in graph.output:
        if vi.name == out:
            vi.type.tensor_type.elem_type = elem


def load(path: str | Path, **_options: object) -> OnnxAdapter:
    """Load an ONNX file for scanning; extra options meant for other frameworks are ignored."""
    p = Path(path)
    return OnnxAdapter(read_model(p), source=p)
