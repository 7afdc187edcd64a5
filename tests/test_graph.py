"""The ONNX graph module: the 1-D convolution rewrite (same outputs as the original graph, no 1-D
Conv left behind), the walks into subgraphs and functions, fresh names, dtypes, the head finder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import backdoorscan
from backdoorscan import onnx_graph as og
from backdoorscan.onnx_graph import conv1d_as_conv2d


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


def _mlp(tail: list[str]) -> onnx.GraphProto:
    """x [n, 4] -> Gemm -> Relu ("hidden") -> Gemm -> the ops named in ``tail`` -> output."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 5)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=(5, 3)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["g1"]),
        helper.make_node("Relu", ["g1"], ["hidden"]),
        helper.make_node("Gemm", ["hidden", "w2"], ["t0"]),
    ]
    for i, op in enumerate(tail):
        nodes.append(helper.make_node(op, [f"t{i}"], [f"t{i + 1}"]))
    out = f"t{len(tail)}"
    return helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n", 3])],
        initializer=inits,
    )


def test_find_head_walks_through_pass_through_ops_only() -> None:
    head = og.find_head(_mlp(["Softmax", "Identity"]))
    assert head.features == "hidden" and head.node.op_type == "Gemm"
    with pytest.raises(og.NoHeadError) as missing:
        og.find_head(_mlp(["Relu"]))  # a Relu on the logits is no pass-through operator
    assert missing.value.walked == ["Relu"]
    assert "walked back through Relu" in str(missing.value)


def test_walks_enter_subgraphs_and_functions_and_names_stay_fresh() -> None:
    branch = _mlp([])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    outer = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
        "outer",
        [cond],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    function = helper.make_function(
        "local",
        "f",
        ["a"],
        ["b"],
        [helper.make_node("Neg", ["a"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    model = helper.make_model(outer, functions=[function])
    assert len(list(og.subgraphs(outer))) == 3
    ops = [n.op_type for n in og.all_nodes(model)]
    assert ops.count("Gemm") == 4 and ops[0] == "If" and ops[-1] == "Neg"
    assert len(list(og.all_tensors(model))) == 4  # the branches' weights
    taken = og.taken_names(branch)
    assert og.fresh_name("hidden", taken) == "hidden_1" and "hidden_1" in taken
    assert og.fresh_name("hidden", taken) == "hidden_2"
    assert og.fresh_name("new", taken) == "new"


def test_dtype_tables_agree() -> None:
    for elem, name in og.NUMPY_DTYPES.items():
        assert og.onnx_dtype(name) == elem and og.numpy_dtype(elem) == name
        assert og.ITEMSIZE[elem] == np.dtype(name).itemsize
    assert (
        og.numpy_dtype(TensorProto.STRING) is None and og.type_name(TensorProto.STRING) == "STRING"
    )
    with pytest.raises(ValueError):
        og.onnx_dtype(np.complex64)
