"""The ONNX adapter: take any ONNX classifier as it is and expose its penultimate activations.

The penultimate tensor is found by walking back from the logits output through the operators
that only reshape or normalise (Softmax, Add, Flatten, Reshape, Identity, ...) to the last
Gemm/MatMul; its data input is the hidden layer. The tensor is added as a graph output named
``features``, flattened per sample. Custom-op domains and external data outside the model's
folder are refused: a model file is untrusted input.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from backdoorscan.adapters.base import FEATURES, LOGITS, AdapterError, OnnxExport

# Operator domains ONNX Runtime implements itself; anything else needs a custom-op library.
STANDARD_DOMAINS = frozenset(
    {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"}
)
# Operators that sit between the last linear layer and the logits without changing what it means.
PASS_THROUGH = frozenset(
    {
        "Softmax",
        "LogSoftmax",
        "Add",
        "Sub",
        "Flatten",
        "Reshape",
        "Identity",
        "Cast",
        "Squeeze",
        "Unsqueeze",
        "Mul",
        "Div",
        "Sigmoid",
        "Dropout",
    }
)
LINEAR_OPS = frozenset({"Gemm", "MatMul"})
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

_NP_DTYPES = {
    TensorProto.FLOAT: "float32",
    TensorProto.DOUBLE: "float64",
    TensorProto.FLOAT16: "float16",
    TensorProto.INT64: "int64",
    TensorProto.INT32: "int32",
    TensorProto.UINT8: "uint8",
    TensorProto.INT8: "int8",
    TensorProto.BOOL: "bool",
}


@dataclass(frozen=True)
class LayerInfo:
    """A candidate hidden tensor: its name, the operator making it, its per-sample shape."""

    name: str
    op_type: str
    shape: tuple[int | str | None, ...]
    default: bool = False


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
    if any(t.data_location == TensorProto.EXTERNAL for t in _all_initializers(model)):
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError) as exc:
            raise AdapterError(f"cannot read the external data of {p.name}: {exc}") from None
    return model


def _all_initializers(model: onnx.ModelProto) -> Iterable[onnx.TensorProto]:
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def _check_external_data(model: onnx.ModelProto, folder: Path) -> None:
    root = folder.resolve()
    for tensor in _all_initializers(model):
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
    custom = sorted({n.domain for n in _all_nodes(model.graph)} - STANDARD_DOMAINS - local)
    if custom:
        raise AdapterError(
            f"model uses custom operator domain(s) {', '.join(custom)}; backdoorscan does not load "
            "custom-op libraries"
        )


def check_text(model: onnx.ModelProto) -> None:
    """Refuse a model whose names are not valid UTF-8 (protobuf then hands out bytes, not str)."""
    texts: list[object] = [d.domain for d in model.opset_import]
    for graph in _all_graphs(model.graph):
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


def _all_graphs(graph: onnx.GraphProto) -> Iterable[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_graphs(g)


def _all_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)


def _dims(vi: onnx.ValueInfoProto) -> tuple[int | str | None, ...] | None:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    out: list[int | str | None] = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return tuple(out)


class OnnxAdapter:
    """An ONNX classifier scanned as it is; it cannot be retrained (repair writes data instead)."""

    framework = "onnx"
    can_fit = False

    def __init__(self, model: onnx.ModelProto, *, source: Path | None = None) -> None:
        check_text(model)
        check_domains(model)
        self.model = model
        self.source = source
        graph = model.graph
        initializers = {t.name for t in graph.initializer}
        self._inputs = [i for i in graph.input if i.name not in initializers]
        if len(self._inputs) != 1:
            names = ", ".join(i.name for i in self._inputs) or "none"
            raise AdapterError(
                f"model has {len(self._inputs)} data inputs ({names}); backdoorscan scans "
                "classifiers with exactly one input"
            )
        if len(graph.output) == 0:
            raise AdapterError("model has no outputs")
        self._producer = {out: node for node in graph.node for out in node.output}
        self._inferred: onnx.ModelProto | None = None

    # -- inspection ---------------------------------------------------------------------------
    @property
    def input(self) -> onnx.ValueInfoProto:
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
            dims = _dims(vi)
            if dims is not None:
                shapes[vi.name] = dims
        return shapes

    def default_layer(self) -> str:
        """The data input of the last Gemm/MatMul that feeds the logits."""
        initializers = {t.name for t in self.model.graph.initializer}
        constants = {
            n.output[0] for n in self.model.graph.node if n.op_type == "Constant" and n.output
        }
        static = initializers | constants
        name = self.logits_name
        seen: list[str] = []
        for _ in range(64):
            node = self._producer.get(name)
            if node is None:
                break
            seen.append(node.op_type)
            data_inputs = [i for i in node.input if i and i not in static]
            if node.op_type in LINEAR_OPS and data_inputs:
                return data_inputs[0]
            if node.op_type not in PASS_THROUGH or len(data_inputs) != 1:
                break
            name = data_inputs[0]
        path = " <- ".join(seen) or "nothing"
        raise AdapterError(
            f"no linear head found behind output {self.logits_name!r} (walked back through "
            f"{path}); name the hidden tensor with --layer (see `backdoorscan layers MODEL`)"
        )

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
        dims = _dims(self.input) or ()
        elem = self.input.type.tensor_type.elem_type
        if elem not in _NP_DTYPES:
            raise AdapterError(
                f"model input {self.input.name!r} has element type "
                f"{_type_name(elem)}, which backdoorscan cannot feed"
            )
        shape = tuple(d if isinstance(d, int) and d > 0 else None for d in dims[1:])
        return shape, _NP_DTYPES[elem]

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
        taken = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
        taken |= {t.name for t in graph.initializer}
        logits_out = _fresh(LOGITS, taken, keep=logits_src)
        features_out = _fresh(FEATURES, taken | {logits_out}, keep=layer_name)
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
        feature_dim = _prod(feat_shape[1:]) if feat_shape else None
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

    # -- the Adapter contract for a framework that cannot train -------------------------------
    def fit(self, x: np.ndarray, y: np.ndarray, **kwargs: object) -> None:
        """ONNX models cannot be retrained here; repair writes the cleaned data set instead."""
        raise AdapterError(
            "a bare ONNX model cannot be retrained; repair writes the relabelled data set instead"
        )

    def clone(self) -> OnnxAdapter:
        """A copy sharing nothing mutable with this adapter."""
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        return OnnxAdapter(model, source=self.source)

    def save(self, path: str | Path) -> Path:
        """Write the model as ONNX, atomically."""
        from backdoorscan._io import atomic_write_bytes

        return atomic_write_bytes(Path(path), self.model.SerializeToString())


def _type_name(elem: int) -> str:
    return TensorProto.DataType.Name(elem) if elem in TensorProto.DataType.values() else str(elem)


def _fresh(base: str, taken: set[str], *, keep: str) -> str:
    if keep == base:
        return base
    name, i = base, 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    return name


def _prod(dims: Iterable[int | str | None]) -> int | None:
    total = 1
    for d in dims:
        if not isinstance(d, int):
            return None
        total *= d
    return total


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
