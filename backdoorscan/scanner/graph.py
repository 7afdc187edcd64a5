"""Rewrites of the exported graph that change how ONNX Runtime runs it, never what it computes.

ONNX Runtime's CPU provider runs a one-dimensional ``Conv`` (text and audio models: input
``[N, C, T]``, weight ``[O, C/g, k]``) through a generic path that is about 1.8x slower than its
two-dimensional convolution on the same numbers (benchmarks/RESULTS.md, the Rotten Tomatoes
text CNN). :func:`conv1d_as_conv2d` turns each such node into Unsqueeze -> Conv (a ``1 x k``
kernel on ``[N, C, 1, T]``) -> Squeeze: the same sums, results equal to float rounding
(tests/test_graph.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

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
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    taken |= {i.name for i in graph.input}

    def fresh(base: str) -> str:
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        return name

    # Unsqueeze and Squeeze take their axes as an input from opset 13, as an attribute before.
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    if opset >= 13:
        axis = fresh(_AXIS)
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
            weights_2d[w_name] = fresh(f"{w_name}_2d")
            graph.initializer.append(numpy_helper.from_array(w[:, :, None, :], weights_2d[w_name]))
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        for key in ("kernel_shape", "strides", "dilations"):
            if key in attrs:
                attrs[key] = [1, *attrs[key]]
        if "pads" in attrs:
            begin, end = attrs["pads"]
            attrs["pads"] = [0, begin, 0, end]
        x4 = fresh(f"{node.output[0]}_nc1t_in")
        y4 = fresh(f"{node.output[0]}_nc1t_out")
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
    # list initializers: left there, they would become inputs the caller must feed).
    used = {i for n in _all_nodes(graph) for i in n.input} | {o.name for o in graph.output}
    unused = {w for w in weights_2d if w not in used}
    _keep(graph.initializer, lambda t: t.name not in unused)
    _keep(graph.input, lambda v: v.name not in unused)
    return model.SerializeToString()


def _keep(field: Any, pred: Callable[[Any], bool]) -> None:
    """Keep the entries of a repeated protobuf field that pass ``pred``, in order."""
    kept = [x for x in field if pred(x)]
    del field[:]
    field.extend(kept)


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Every node, subgraphs (If, Loop, Scan bodies) included: those may read a weight too."""
    out = []
    for node in graph.node:
        out.append(node)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                out.extend(_all_nodes(sub))
    return out
