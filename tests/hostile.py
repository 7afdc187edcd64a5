"""Generators of hostile and broken inputs for the scanner's tests; nothing here is committed.

Every function builds its file (or model) from scratch in a folder the test gives, so the
corpus lives only in pytest's temporary folders. The pickle payloads write a marker file when
(and only when) something unpickles them: the tests assert that the marker never appears.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

D_IN, HIDDEN, CLASSES = 64, 16, 10
OPSET = [helper.make_opsetid("", 17)]


def run_cli(*args: object) -> tuple[int, str, str]:
    """Run ``backdoorscan ARGS`` in this process; return the exit code, stdout and stderr."""
    from backdoorscan.cli import main

    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
    assert isinstance(code, int), code
    return code, out.getvalue(), err.getvalue()


def _model(graph: onnx.GraphProto, opsets: list | None = None) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=opsets or OPSET, producer_name="hostile")
    model.ir_version = 8
    return model


def _weights(seed: int, d_in: int = D_IN, hidden: int = HIDDEN, classes: int = CLASSES) -> list:
    rng = np.random.default_rng(seed)
    return [
        numpy_helper.from_array(
            (rng.standard_normal((d_in, hidden)) / np.sqrt(d_in)).astype(np.float32), "w1"
        ),
        numpy_helper.from_array(np.zeros(hidden, np.float32), "b1"),
        numpy_helper.from_array(
            (rng.standard_normal((hidden, classes)) / np.sqrt(hidden)).astype(np.float32), "w2"
        ),
        numpy_helper.from_array(np.zeros(classes, np.float32), "b2"),
    ]


def _io(name: str, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def mlp(
    seed: int = 0, d_in: int = D_IN, hidden: int = HIDDEN, classes: int = CLASSES
) -> onnx.ModelProto:
    """A valid ONNX classifier: input [batch, d_in] -> Gemm -> Relu -> Gemm -> logits."""
    nodes = [
        helper.make_node("Gemm", ["input", "w1", "b1"], ["fc1"], name="fc1"),
        helper.make_node("Relu", ["fc1"], ["hidden"], name="relu"),
        helper.make_node("Gemm", ["hidden", "w2", "b2"], ["logits"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [_io("input", ["batch", d_in])],
        [_io("logits", ["batch", classes])],
        _weights(seed, d_in, hidden, classes),
    )
    return _model(graph)


def mlp_bytes(seed: int = 0) -> bytes:
    """The serialized :func:`mlp`: the seed corpus of the ONNX fuzzer."""
    return mlp(seed).SerializeToString()


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Write a model without any check (hostile models are invalid on purpose)."""
    path.write_bytes(model.SerializeToString())
    return path


# -- model files ------------------------------------------------------------------------------


def truncated(path: Path) -> Path:
    """A valid ONNX model cut off in the middle of its weights."""
    blob = mlp_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    return path


def random_bytes(path: Path, n: int = 4096, seed: int = 0) -> Path:
    """Bytes that are no model at all."""
    path.write_bytes(np.random.default_rng(seed).bytes(n))
    return path


def custom_domain(path: Path) -> Path:
    """The MLP with its activation replaced by an operator from a custom-op library's domain."""
    model = mlp()
    relu = model.graph.node[1]
    relu.op_type, relu.domain = "EvilRelu", "com.attacker.ops"
    model.opset_import.append(helper.make_opsetid("com.attacker.ops", 1))
    return save(model, path)


def external_data(path: Path, location: str) -> Path:
    """The MLP whose first weight matrix claims to live in the external file ``location``."""
    model = mlp()
    w1 = model.graph.initializer[0]
    w1.ClearField("raw_data")
    w1.ClearField("float_data")
    w1.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(D_IN * 64))):
        entry = w1.external_data.add()
        entry.key, entry.value = key, value
    return save(model, path)


def symlinked_external_data(folder: Path, target: Path) -> Path:
    """External data named by a relative path inside the folder that is a symlink leading out."""
    link = folder / "weights.bin"
    os.symlink(target, link)
    return external_data(folder / "model.onnx", "weights.bin")


def _branch(name: str, out: str, body_nodes: list, inits: list) -> onnx.GraphProto:
    return helper.make_graph(body_nodes, name, [], [_io(out, None)], inits)


def if_head(path: Path) -> Path:
    """The linear head hidden inside both branches of an If: no Gemm feeds the logits directly."""
    model = mlp()
    w2, b2 = model.graph.initializer[2], model.graph.initializer[3]
    del model.graph.node[2]
    del model.graph.initializer[2:]
    then_g = _branch(
        "then", "l_then", [helper.make_node("Gemm", ["hidden", "w2", "b2"], ["l_then"])], [w2, b2]
    )
    else_g = _branch(
        "else", "l_else", [helper.make_node("Gemm", ["hidden", "w2", "b2"], ["l_else"])], [w2, b2]
    )
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    model.graph.node.append(
        helper.make_node("If", ["cond"], ["logits"], then_branch=then_g, else_branch=else_g)
    )
    return save(model, path)


def loop_head(path: Path) -> Path:
    """The linear head computed inside a Loop body (one iteration) as a loop-carried value."""
    model = mlp()
    w2, b2 = model.graph.initializer[2], model.graph.initializer[3]
    del model.graph.node[2]
    del model.graph.initializer[2:]
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Gemm", ["hidden", "w2", "b2"], ["l_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            _io("l_in", None),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _io("l_out", None)],
        [w2, b2],
    )
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(1, np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "go"),
            numpy_helper.from_array(np.zeros((1, CLASSES), np.float32), "l0"),
        ]
    )
    model.graph.node.append(helper.make_node("Loop", ["trips", "go", "l0"], ["logits"], body=body))
    return save(model, path)


def no_linear_head(path: Path) -> Path:
    """A classifier whose logits come from a pooling operator: no Gemm/MatMul anywhere."""
    nodes = [
        helper.make_node("Reshape", ["input", "shape"], ["grid"]),
        helper.make_node("ReduceMax", ["grid", "axes"], ["logits"], keepdims=0),
    ]
    inits = [
        numpy_helper.from_array(np.array([-1, CLASSES, D_IN // 8], np.int64), "shape"),
        numpy_helper.from_array(np.array([2], np.int64), "axes"),
    ]
    graph = helper.make_graph(
        nodes, "nohead", [_io("input", ["batch", D_IN])], [_io("logits", None)], inits
    )
    # 64 inputs do not split into 10 x 8; the model is refused before it would ever run.
    return save(_model(graph, [helper.make_opsetid("", 18)]), path)


def two_inputs(path: Path) -> Path:
    """The MLP with a second data input added to the hidden layer."""
    model = mlp()
    model.graph.input.append(_io("mask", ["batch", HIDDEN]))
    model.graph.node[1].input[0] = "fc1m"
    model.graph.node.insert(1, helper.make_node("Mul", ["fc1", "mask"], ["fc1m"]))
    return save(model, path)


def huge_activation(path: Path, repeats: int = 1 << 24) -> Path:
    """A model whose declared hidden layer is D_IN * ``repeats`` floats per sample (4 GiB at
    the default): a Tile of the input, and a head whose weights are made at run time."""
    width = D_IN * repeats
    nodes = [
        helper.make_node("Tile", ["input", "reps"], ["hidden"]),
        helper.make_node("ConstantOfShape", ["wshape"], ["w"]),
        helper.make_node("MatMul", ["hidden", "w"], ["logits"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([1, repeats], np.int64), "reps"),
        numpy_helper.from_array(np.array([width, CLASSES], np.int64), "wshape"),
    ]
    graph = helper.make_graph(
        nodes,
        "huge",
        [_io("input", ["batch", D_IN])],
        [_io("logits", ["batch", CLASSES])],
        inits,
    )
    return save(_model(graph), path)


def slow_mlp(path: Path, iterations: int = 2000, seed: int = 0) -> Path:
    """A small file that is slow to run: ``iterations`` rounds of tanh(h @ W) in a Loop before
    the hidden layer, so that extraction takes seconds on a few thousand samples."""
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["h_in", "w_loop"], ["h_mm"]),
            helper.make_node("Tanh", ["h_mm"], ["h_out"]),
        ],
        "rounds",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            _io("h_in", ["batch", D_IN]),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _io("h_out", None)],
    )
    nodes = [
        helper.make_node("Loop", ["trips", "", "input"], ["mixed"], body=body),
        helper.make_node("Gemm", ["mixed", "w1", "b1"], ["fc1"], name="fc1"),
        helper.make_node("Relu", ["fc1"], ["hidden"], name="relu"),
        helper.make_node("Gemm", ["hidden", "w2", "b2"], ["logits"], name="fc2"),
    ]
    w_loop = (rng.standard_normal((D_IN, D_IN)) / np.sqrt(D_IN)).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.array(iterations, np.int64), "trips"),
        numpy_helper.from_array(w_loop, "w_loop"),
        *_weights(seed),
    ]
    graph = helper.make_graph(
        nodes, "slow", [_io("input", ["batch", D_IN])], [_io("logits", ["batch", CLASSES])], inits
    )
    return save(_model(graph), path)


def dead_layer(path: Path) -> Path:
    """The MLP with a bias so negative that every hidden unit is 0 for every sample."""
    model = mlp()
    model.graph.initializer[1].CopyFrom(
        numpy_helper.from_array(np.full(HIDDEN, -1e6, np.float32), "b1")
    )
    return save(model, path)


def nan_features(path: Path) -> Path:
    """The MLP with a Log in front of the hidden layer: Log of negative pre-activations is NaN."""
    model = mlp()
    model.graph.node[1].op_type = "Log"
    return save(model, path)


def token_model(path: Path, vocab: int = 50, length: int = 8) -> Path:
    """A text classifier on int64 token ids: embedding (Gather), mean over the sequence, head."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gather", ["emb", "input"], ["vectors"]),
        helper.make_node("ReduceMean", ["vectors", "axis1"], ["hidden"], keepdims=0),
        helper.make_node("Gemm", ["hidden", "w2", "b2"], ["logits"]),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((vocab, HIDDEN)).astype(np.float32), "emb"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(rng.standard_normal((HIDDEN, CLASSES)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(CLASSES, np.float32), "b2"),
    ]
    graph = helper.make_graph(
        nodes,
        "tokens",
        [helper.make_tensor_value_info("input", TensorProto.INT64, ["batch", length])],
        [_io("logits", ["batch", CLASSES])],
        inits,
    )
    return save(_model(graph, [helper.make_opsetid("", 18)]), path)


# -- pickle payloads --------------------------------------------------------------------------


class Payload:
    """Unpickling this runs ``exec`` on code that creates ``marker``: proof that it ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def pickle_payload(path: Path, marker: Path) -> Path:
    """A plain pickle (the legacy torch.save format) whose loading runs the payload."""
    with open(path, "wb") as fh:
        pickle.dump({"fc1.weight": Payload(marker)}, fh, protocol=2)
    return path


def torch_zip_payload(path: Path, marker: Path) -> Path:
    """A torch.save zip archive (what .pt/.pth/.bin files are today) with the payload inside."""
    blob = pickle.dumps({"fc1.weight": Payload(marker)}, protocol=2)
    stem = path.stem or "archive"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{stem}/data.pkl", blob)
        zf.writestr(f"{stem}/byteorder", "little")
        zf.writestr(f"{stem}/version", "3\n")
    return path


def torchscript_payload(path: Path, marker: Path) -> Path:
    """A zip shaped like TorchScript (``constants.pkl``) whose pickles carry the payload."""
    blob = pickle.dumps(Payload(marker), protocol=2)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("m/data.pkl", blob)
        zf.writestr("m/constants.pkl", blob)
        zf.writestr("m/version", "3\n")
    return path


def keras_lambda(path: Path, marker: Path) -> Path:
    """A .keras archive whose Lambda layer (Python bytecode, run whenever the model is built)
    creates ``marker``; the marker made while building here is removed before returning."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    touch = eval(f"lambda t: (open({str(marker)!r}, 'w').close(), t)[1]")
    inputs = keras.Input((D_IN,))
    hidden = keras.layers.Dense(HIDDEN, activation="relu")(inputs)
    hidden = keras.layers.Lambda(touch)(hidden)
    outputs = keras.layers.Dense(CLASSES)(hidden)
    keras.Model(inputs, outputs).save(path)
    marker.unlink()
    return path


def h5_not_keras(path: Path) -> Path:
    """A valid HDF5 file that holds a plain data set, not a Keras model."""
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(10.0))
    return path


# -- data files -------------------------------------------------------------------------------


def digits(n_per_class: int = 30, seed: int = 0, d: int = D_IN) -> tuple[np.ndarray, np.ndarray]:
    """Random samples with balanced labels 0..9 (float32 [n, d], int64 [n])."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(CLASSES), n_per_class)
    x = rng.random((len(y), d), dtype=np.float32)
    return x, rng.permutation(y)


def object_array_npy(path: Path, marker: Path) -> Path:
    """An .npy object array whose unpickling would run the payload."""
    arr = np.empty(3, dtype=object)
    arr[:] = [Payload(marker), 1, 2]
    np.save(path, arr, allow_pickle=True)
    return path


def object_array_npz(path: Path, marker: Path) -> Path:
    """An .npz whose ``x`` is an object array carrying the payload."""
    arr = np.empty(3, dtype=object)
    arr[:] = [Payload(marker), 1, 2]
    np.savez(path, x=arr, y=np.arange(3))
    return path


def pickle_as_npz(path: Path, marker: Path) -> Path:
    """A bare pickle named ``.npz``."""
    with open(path, "wb") as fh:
        pickle.dump(Payload(marker), fh)
    return path


# -- torch.export archives --------------------------------------------------------------------


def clean_pt2(path: Path) -> Path:
    """A plain torch.export archive of a D_IN -> HIDDEN -> CLASSES MLP (dynamic batch)."""
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(D_IN, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, CLASSES)
    ).eval()
    program = torch.export.export(
        module, (torch.rand(4, D_IN),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, str(path))
    return path


def _rewrite_zip(
    src: Path, dst: Path, edit: dict[str, bytes], extra: list[tuple[str, bytes]]
) -> Path:
    """Copy ``src`` to ``dst`` with the members named in ``edit`` replaced (relative to the top
    folder) and ``extra`` members appended, in that order."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            rel = info.filename.split("/", 1)[1]
            zout.writestr(info.filename, edit.get(rel, zin.read(info.filename)))
        for rel, payload in extra:
            zout.writestr(f"{root}/{rel}", payload)
    return dst


def pt2_case_twin(path: Path, marker: Path) -> Path:
    """A torch.export archive with a second weights config whose name differs only in letter
    case and that asks for pickled weights (the payload). A validator reading names exactly
    checks the plain config; torch's reader (case-insensitive) loads the twin and unpickles.

    Which of two equal names torch's reader finds depends on the zip's order (a binary search
    over the folded names), so the twin is placed, and spelt, the way this torch reads it."""
    import json

    import torch

    folder = path.parent / f".clean-{path.stem}"
    folder.mkdir(exist_ok=True)
    clean = clean_pt2(folder / path.name)
    with zipfile.ZipFile(clean) as zf:
        root = zf.namelist()[0].split("/", 1)[0]
        config = json.loads(zf.read(f"{root}/data/weights/model_weights_config.json"))
    fqn = next(iter(config["config"]))
    config["config"][fqn] |= {"use_pickle": True, "path_name": "payload"}
    evil = json.dumps(config).encode()
    payload = ("data/weights/payload", pickle.dumps(Payload(marker), protocol=2))
    for spelling in ("model_weights_config.jsoN", "MODEL_weights_config.json"):
        twin = (f"data/weights/{spelling}", evil)
        for extra in ([payload, twin], [twin, payload]):
            _rewrite_zip(clean, path, {}, extra)
            reader = torch._C.PyTorchFileReader(str(path))
            if reader.get_record("data/weights/model_weights_config.json") == evil:
                clean.unlink()
                folder.rmdir()
                return path
    raise AssertionError("no placement of the twin that this torch reads")


def pt2_operator_argument(
    path: Path, marker: Path, op: str = "torch.ops.aten.from_file.default"
) -> Path:
    """A torch.export archive whose graph calls the higher-order op ``with_effects`` with the
    operator ``op`` as an argument: run, it calls ``aten.from_file(marker, shared=True)``,
    which creates the marker. Every node target is allowed; only the argument is not."""
    import json

    clean = clean_pt2(path.with_name(f".clean-{path.name}"))
    with zipfile.ZipFile(clean) as zf:
        root = zf.namelist()[0].split("/", 1)[0]
        program = json.loads(zf.read(f"{root}/models/model.json"))
    graph = program["graph_module"]["graph"]
    x = graph["inputs"][-1]["as_tensor"]["name"]  # the user input: parameters come first
    args = [
        ("token", {"as_tensor": {"name": x}}),
        ("op", {"as_operator": op}),
        ("filename", {"as_string": str(marker)}),
        ("shared", {"as_bool": True}),
        ("size", {"as_int": 64}),
    ]
    graph["nodes"].insert(
        0,
        {
            "target": "torch.ops.higher_order.with_effects",
            "inputs": [{"name": n, "arg": a, "kind": 1} for n, a in args],
            "outputs": [{"as_tensor": {"name": "fx_token"}}, {"as_tensor": {"name": "fx_file"}}],
            "metadata": {},
            "is_hop_single_tensor_return": None,
            "name": "with_effects_0",
        },
    )
    graph["tensor_values"]["fx_token"] = graph["tensor_values"][x]
    graph["tensor_values"]["fx_file"] = graph["tensor_values"][x]
    _rewrite_zip(clean, path, {"models/model.json": json.dumps(program).encode()}, [])
    clean.unlink()
    return path
