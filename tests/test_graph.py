"""The 1-D convolution rewrite: same outputs as the original graph, no 1-D Conv left behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import backdoorscan
from backdoorscan.scanner.graph import conv1d_as_conv2d


def conv1d_model(
    *,
    opset: int = 17,
    attrs: dict | None = None,
    shared: bool = False,
    weights_as_inputs: bool = False,
    bias: bool = True,
) -> bytes:
    """x [N, 6, 20] -> Conv1d (one or two, sharing a weight) -> ReduceMax over time -> [N, 4]."""
    rng = np.random.default_rng(0)
    attrs = attrs or {"kernel_shape": [3], "pads": [1, 2], "strides": [2], "dilations": [2]}
    group = attrs.get("group", 1)
    w = numpy_helper.from_array(rng.normal(size=(4, 6 // group, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b")
    inits = [w, b]
    conv_in = ["x", "w", "b"] if bias else ["x", "w"]
    nodes = [helper.make_node("Conv", conv_in, ["c1"], name="conv1", **attrs)]
    last = "c1"
    if shared:
        nodes.append(helper.make_node("Relu", ["c1"], ["r1"]))
        nodes.append(helper.make_node("Conv", ["r1", "w2", "b"], ["c2"], name="conv2", **attrs))
        w2 = numpy_helper.from_array(rng.normal(size=(4, 4 // group, 3)).astype(np.float32), "w2")
        inits.append(w2)
        last = "c2"
    if opset >= 18:
        axes = numpy_helper.from_array(np.array([2], dtype=np.int64), "axes")
        inits.append(axes)
        nodes.append(helper.make_node("ReduceMax", [last, "axes"], ["y"], keepdims=0))
    else:
        nodes.append(helper.make_node("ReduceMax", [last], ["y"], axes=[2], keepdims=0))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6, 20])]
    if weights_as_inputs:  # old exporters list the initializers among the inputs too
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits]
    graph = helper.make_graph(
        nodes,
        "conv1d",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def run(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def conv_weight_ranks(model_bytes: bytes) -> list[int]:
    model = onnx.load_from_string(model_bytes)
    dims = {t.name: len(t.dims) for t in model.graph.initializer}
    return [dims[n.input[1]] for n in model.graph.node if n.op_type == "Conv"]


CASES = {
    "pads, strides, dilations": {},
    "auto_pad same": {"attrs": {"kernel_shape": [3], "auto_pad": "SAME_UPPER"}},
    "groups": {"attrs": {"kernel_shape": [3], "group": 2}},
    "no bias": {"bias": False},
    "shared bias, two convs": {"shared": True},
    "weights listed as inputs": {"weights_as_inputs": True},
    "opset 11 (axes as attributes)": {"opset": 11},
    "opset 18": {"opset": 18},
}


@pytest.mark.parametrize("case", CASES)
def test_rewrite_keeps_outputs_and_leaves_no_1d_conv(case: str) -> None:
    original = conv1d_model(**CASES[case])
    rewritten = conv1d_as_conv2d(original)
    onnx.checker.check_model(onnx.load_from_string(rewritten))
    assert conv_weight_ranks(original) and set(conv_weight_ranks(original)) == {3}
    assert set(conv_weight_ranks(rewritten)) == {4}
    x = np.random.default_rng(1).normal(size=(7, 6, 20)).astype(np.float32)
    np.testing.assert_allclose(run(rewritten, x), run(original, x), rtol=1e-5, atol=1e-5)
    model = onnx.load_from_string(rewritten)
    assert [i.name for i in model.graph.input if i.name == "w"] == []  # unused weight dropped


def test_graph_without_1d_conv_comes_back_unchanged() -> None:
    model_bytes = (Path(backdoorscan.__file__).parent / "data" / "demo.onnx").read_bytes()
    assert conv1d_as_conv2d(model_bytes) is model_bytes
