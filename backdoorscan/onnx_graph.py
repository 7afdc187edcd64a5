"""ONNX graph plumbing at the bottom of the package: walks, fresh names, dtypes, the head, rewrites.

Everything here reads or rewrites an ``onnx.ModelProto`` and knows nothing of adapters or scans,
so every room may import it (it imports nothing from backdoorscan):

* walks that also enter subgraphs (the ``If``/``Loop``/``Scan`` bodies held in attributes) and
  the model's local functions, where a hostile or unusual model may hide a node or a tensor;
* :func:`fresh_name`, a name no tensor of the graph uses yet;
* the numpy <-> ONNX element type tables;
* :func:`find_head`, the one rule for "which tensor is the penultimate layer": walk back from
  the logits through operators that only reshape or rescale to the last ``Gemm``/``MatMul``;
* :func:`conv1d_as_conv2d`, which runs 1-D convolutions as 2-D ones: ONNX Runtime's CPU
  provider takes a generic path for a 1-D ``Conv`` (input ``[N, C, T]``, weight
  ``[O, C/g, k]``) that is about 1.8x slower than its 2-D convolution on the same numbers
  (benchmarks/RESULTS.md, the Rotten Tomatoes text CNN); each such node becomes Unsqueeze ->
  Conv (a ``1 x k`` kernel on ``[N, C, 1, T]``) -> Squeeze, the same sums, results equal to
  float rounding (tests/test_graph.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# --------------------------------------------------------------------------------------------
# Walks


def subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in its nodes' attributes, depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from subgraphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from subgraphs(sub)


def all_nodes(model: onnx.ModelProto | onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of the graph and its subgraphs, then (for a model) of its local functions."""
    graph = model.graph if isinstance(model, onnx.ModelProto) else model
    for g in subgraphs(graph):
        yield from g.node
    if isinstance(model, onnx.ModelProto):
        for function in model.functions:
            for node in function.node:
                yield node
                for attr in node.attribute:
                    subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs
                    for sub in subs:
                        for g in subgraphs(sub):
                            yield from g.node


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every stored tensor: initializers (sparse ones too) and tensor-valued attributes, in the
    main graph, its subgraphs and the local functions (where external data can point too)."""
    for g in subgraphs(model.graph):
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield sparse.values
            yield sparse.indices
    for node in all_nodes(model):
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node of ``graph`` (not its subgraphs) that writes it."""
    return {out: node for node in graph.node for out in node.output if out}


def constant_names(graph: onnx.GraphProto) -> set[str]:
    """Names whose value is fixed in the file: initializers and ``Constant`` outputs."""
    names = {t.name for t in graph.initializer}
    names |= {n.output[0] for n in graph.node if n.op_type == "Constant" and n.output}
    return names


def taken_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name in use in ``graph``: inputs, initializers and node outputs."""
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    return names | {o for n in graph.node for o in n.output}


def fresh_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, ... whichever is free first; added to ``taken``."""
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def keep(field: Any, pred: Callable[[Any], bool]) -> None:
    """Keep the entries of a repeated protobuf field that pass ``pred``, in order."""
    kept = [x for x in field if pred(x)]
    del field[:]
    field.extend(kept)


def dims(vi: onnx.ValueInfoProto) -> tuple[int | str | None, ...] | None:
    """A value's shape (ints, symbolic names, None where unknown), or None without a shape."""
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


# --------------------------------------------------------------------------------------------
# Element types

# The input types a scan can feed: ONNX element type -> numpy dtype name.
NUMPY_DTYPES: dict[int, str] = {
    TensorProto.FLOAT: "float32",
    TensorProto.DOUBLE: "float64",
    TensorProto.FLOAT16: "float16",
    TensorProto.INT64: "int64",
    TensorProto.INT32: "int32",
    TensorProto.UINT8: "uint8",
    TensorProto.INT8: "int8",
    TensorProto.BOOL: "bool",
}
ONNX_DTYPES: dict[str, int] = {name: elem for elem, name in NUMPY_DTYPES.items()}
# Bytes per element of every fixed-size element type (4 is a fair guess for the rest).
ITEMSIZE: dict[int, int] = {
    TensorProto.FLOAT: 4,
    TensorProto.UINT8: 1,
    TensorProto.INT8: 1,
    TensorProto.UINT16: 2,
    TensorProto.INT16: 2,
    TensorProto.INT32: 4,
    TensorProto.INT64: 8,
    TensorProto.BOOL: 1,
    TensorProto.FLOAT16: 2,
    TensorProto.DOUBLE: 8,
    TensorProto.UINT32: 4,
    TensorProto.UINT64: 8,
    TensorProto.BFLOAT16: 2,
}


def numpy_dtype(elem: int) -> str | None:
    """The numpy dtype name a scan feeds for an ONNX element type, or None when it cannot."""
    return NUMPY_DTYPES.get(elem)


def onnx_dtype(dtype: Any) -> int:
    """The ONNX element type of a numpy dtype (or its name); ValueError where there is none."""
    name = np.dtype(dtype).name
    if name not in ONNX_DTYPES:
        raise ValueError(f"no ONNX element type for numpy dtype {name}")
    return ONNX_DTYPES[name]


def type_name(elem: int) -> str:
    """An ONNX element type's name (FLOAT, STRING, ...), or its number when unknown."""
    return TensorProto.DataType.Name(elem) if elem in TensorProto.DataType.values() else str(elem)


# --------------------------------------------------------------------------------------------
# The head: where the penultimate activations are

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
MAX_WALK = 64


class NoHeadError(ValueError):
    """No linear head was found behind the logits; ``walked`` lists the operators passed."""

    def __init__(self, output: str, walked: list[str]) -> None:
        self.output = output
        self.walked = walked
        path = " <- ".join(walked) or "nothing"
        super().__init__(
            f"no linear head found behind output {output!r} (walked back through {path})"
        )


@dataclass(frozen=True)
class Head:
    """The classifier head: its linear node and the tensor it reads (the default features)."""

    node: onnx.NodeProto
    features: str


def find_head(graph: onnx.GraphProto, output: str | None = None) -> Head:
    """Walk back from ``output`` (the first graph output by default) through pass-through
    operators with one non-constant input to the last Gemm/MatMul; its data input is the
    penultimate tensor. Raises :class:`NoHeadError` where the walk ends elsewhere."""
    start = output if output is not None else graph.output[0].name
    made_by = producers(graph)
    static = constant_names(graph)
    name = start
    walked: list[str] = []
    for _ in range(MAX_WALK):
        node = made_by.get(name)
        if node is None:
            break
        walked.append(node.op_type)
        data = [i for i in node.input if i and i not in static]
        if node.op_type in LINEAR_OPS and data:
            return Head(node, data[0])
        if node.op_type not in PASS_THROUGH or len(data) != 1:
            break
        name = data[0]
    raise NoHeadError(start, walked)


# --------------------------------------------------------------------------------------------
# The 1-D convolution rewrite

_AXIS = "backdoorscan_conv1d_axis"


def conv1d_as_conv2d(model_bytes: bytes) -> bytes:
    """The model with every 1-D ``Conv`` of the main graph whose weight is an initializer run
    as a 2-D one; the bytes unchanged when there is none."""
    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    todo = [
        n
        for n in graph.node
        if n.op_type == "Conv"
        and n.domain in ("", "ai.onnx")
        and len(n.input) >= 2
        and n.input[1] in inits
        and len(inits[n.input[1]].dims) == 3
    ]
    if not todo:
        return model_bytes
    taken = taken_names(graph)

    # Unsqueeze and Squeeze take their axes as an input from opset 13, as an attribute before.
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    if opset >= 13:
        axis = fresh_name(_AXIS, taken)
        graph.initializer.append(numpy_helper.from_array(np.array([2], dtype=np.int64), axis))

        def reshape(op: str, x: str, y: str) -> onnx.NodeProto:
            return helper.make_node(op, [x, axis], [y])
    else:

        def reshape(op: str, x: str, y: str) -> onnx.NodeProto:
            return helper.make_node(op, [x], [y], axes=[2])

    weights_2d: dict[str, str] = {}
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for node in todo:
        w_name = node.input[1]
        if w_name not in weights_2d:
            w = numpy_helper.to_array(inits[w_name])
            weights_2d[w_name] = fresh_name(f"{w_name}_2d", taken)
            graph.initializer.append(numpy_helper.from_array(w[:, :, None, :], weights_2d[w_name]))
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        for key in ("kernel_shape", "strides", "dilations"):
            if key in attrs:
                attrs[key] = [1, *attrs[key]]
        if "pads" in attrs:
            begin, end = attrs["pads"]
            attrs["pads"] = [0, begin, 0, end]
        x4 = fresh_name(f"{node.output[0]}_nc1t_in", taken)
        y4 = fresh_name(f"{node.output[0]}_nc1t_out", taken)
        inputs = [x4, weights_2d[w_name], *node.input[2:]]
        replaced[id(node)] = [
            reshape("Unsqueeze", node.input[0], x4),
            helper.make_node("Conv", inputs, [y4], name=node.name, **attrs),
            reshape("Squeeze", y4, node.output[0]),
        ]
    nodes = [m for n in graph.node for m in replaced.get(id(n), [n])]
    del graph.node[:]
    graph.node.extend(nodes)
    # The 3-D weights nothing reads any more go (also from the inputs, where old exporters
    # list initializers: left there, they would become inputs the caller must feed). A
    # subgraph (If, Loop, Scan body) may read a weight too.
    used = {i for n in all_nodes(graph) for i in n.input} | {o.name for o in graph.output}
    unused = {w for w in weights_2d if w not in used}
    keep(graph.initializer, lambda t: t.name not in unused)
    keep(graph.input, lambda v: v.name not in unused)
    return model.SerializeToString()


def shape_product(values: Iterable[int | str | None]) -> int | None:
    """The product of a shape's dimensions, or None where one is not a known int."""
    total = 1
    for d in values:
        if not isinstance(d, int):
            return None
        total *= d
    return total
