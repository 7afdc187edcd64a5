"""Property tests and fuzzing: any input gives a result or a clean error, never a crash or a hang.

* the data loader on arrays of any dtype, shape and value written to ``.npz``/``.npy``;
* the detector on any finite features and labels;
* the ONNX loading path on mutated bytes and on structurally mutated graphs of a valid model.

Each property runs a bounded number of examples (about 20 s in all on 2 cores); a watchdog
kills the run with a traceback if one example hangs.
"""

from __future__ import annotations

import faulthandler
import tempfile
from collections.abc import Iterator
from pathlib import Path

import hostile
import hypothesis.extra.numpy as hnp
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from backdoorscan import adapters, detect
from backdoorscan.adapters.base import AdapterError
from backdoorscan.adapters.onnx import OnnxAdapter
from backdoorscan.scanner.budget import check_memory
from backdoorscan.scanner.config import DetectConfig
from backdoorscan.scanner.data import DataError, conform, from_arrays, load_data
from backdoorscan.scanner.extract import ExtractionError, extract, make_session

FUZZ = settings(
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)
HANG_S = 120


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    """Dump every thread's stack and exit if a test runs past HANG_S (a hang, not a failure)."""
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


# -- the data loader ------------------------------------------------------------------------

DTYPES = st.sampled_from(
    ["float32", "float64", "float16", "int8", "uint8", "int32", "int64", "bool", "complex64"]
)


@st.composite
def arrays(draw: st.DrawFn, max_rows: int = 12) -> np.ndarray:
    dtype = np.dtype(draw(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=max_rows))
    return draw(hnp.arrays(dtype, shape))


@settings(FUZZ, max_examples=150)
@given(x=arrays(), y=arrays(), layout=st.sampled_from(["npz", "npz-compressed", "npy"]))
def test_load_data_gives_a_dataset_or_a_data_error(
    x: np.ndarray, y: np.ndarray, layout: str
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if layout == "npy":
            np.save(folder / "x.npy", x)
            np.save(folder / "y.npy", y)
            args: tuple = (folder / "x.npy", folder / "y.npy")
        else:
            save = np.savez if layout == "npz" else np.savez_compressed
            save(folder / "d.npz", x=x, y=y)
            args = (folder / "d.npz",)
        try:
            ds = load_data(*args)
        except DataError:
            return
        assert len(ds) == len(x) == len(y) >= 1
        assert ds.y.dtype == np.int64 and ds.y.min() >= 0
        try:
            conform(ds, tuple(x.shape[1:]), "float32", int(ds.y.max()) + 1)
            batch = ds.batch(0, len(ds))
        except DataError:
            assert x.dtype.kind == "f" and not np.isfinite(x).all()
            return
        assert batch.dtype == np.float32 and batch.shape == x.shape
        assert np.isfinite(batch).all()


# -- the detector ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def warm_kernels() -> None:
    """Compile (or load) the Numba kernels once, outside the per-example deadline."""
    rng = np.random.default_rng(0)
    detect(rng.normal(size=(60, 4)).astype(np.float32), np.repeat([0, 1], 30))


finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@st.composite
def features_and_labels(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(1, 90))
    d = draw(st.integers(1, 6))
    style = draw(st.sampled_from(["any", "constant", "duplicates", "blobs"]))
    if style == "any":
        f = draw(hnp.arrays(np.float32, (n, d), elements=finite32))
    elif style == "constant":
        f = np.full((n, d), draw(finite32), np.float32)
    elif style == "duplicates":
        rows = draw(hnp.arrays(np.float32, (draw(st.integers(1, 3)), d), elements=finite32))
        f = rows[np.arange(n) % len(rows)]
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        f = rng.normal(size=(n, d)).astype(np.float32)
        f[: n // 5] += draw(st.floats(0, 1e4))
    k = draw(st.integers(1, 4))
    labels = draw(hnp.arrays(np.int64, n, elements=st.integers(0, k - 1)))
    return f, labels


_HUGE = [  # float32 products of these overflow: the scatter and projections go to float64
    (np.array([[v, big, 2.0], [0, 0, 0], [0, 0, 0]], np.float32), np.zeros(3, np.int64))
    for v, big in ((2.0, 2.5521178e38), (1.0, 2.5521178e38), (1.0, 2.2592556e19))
]


@settings(FUZZ, max_examples=300)
@given(data=features_and_labels(), min_size=st.sampled_from([3, 20]))
@example(data=_HUGE[0], min_size=3)
@example(data=_HUGE[1], min_size=3)
@example(data=_HUGE[2], min_size=3)
def test_detect_any_finite_input(
    warm_kernels: None, data: tuple[np.ndarray, np.ndarray], min_size: int
) -> None:
    features, labels = data
    report = detect(features, labels, DetectConfig(min_class_size=min_size))
    assert len(report.scores) == len(labels)
    assert np.isfinite(report.scores).all()
    assert ((report.scores >= 0) & (report.scores <= 1)).all()
    assert set(report.flagged_indices.tolist()) <= set(range(len(labels)))
    assert sorted(c.label for c in report.classes) == sorted(set(labels.tolist()))
    for c in report.classes:
        assert c.verdict in ("clean", "poisoned", "skipped")
        assert c.verdict == "skipped" or sum(c.cluster_sizes) == c.n_samples
    report.to_json()  # every figure renders


@settings(FUZZ, max_examples=30)
@given(
    features=hnp.arrays(np.float64, (40, 3), elements=st.sampled_from([0.0, 1.0, np.nan, np.inf])),
)
def test_detect_refuses_non_finite(features: np.ndarray) -> None:
    labels = np.repeat([0, 1], 20)
    if np.isfinite(features).all():
        assert len(detect(features, labels).scores) == 40
    else:
        with pytest.raises(ValueError, match="NaN or Inf"):
            detect(features, labels)


# -- the ONNX loading path ------------------------------------------------------------------

SEED_MODEL = hostile.mlp_bytes()
X_SMALL, Y_SMALL = hostile.digits(n_per_class=2)
LOAD_ERRORS = (AdapterError,)
RUN_ERRORS = (AdapterError, ExtractionError, DataError)


@st.composite
def mutated_bytes(draw: st.DrawFn) -> bytes:
    blob = bytearray(SEED_MODEL)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["set", "insert", "delete", "copy", "truncate"]))
        i = draw(st.integers(0, len(blob) - 1)) if blob else 0
        if op == "set" and blob:
            blob[i] = draw(st.integers(0, 255))
        elif op == "insert":
            blob[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del blob[i : i + draw(st.integers(1, 8))]
        elif op == "copy" and blob:
            j = draw(st.integers(0, len(blob) - 1))
            blob[i:i] = blob[j : j + draw(st.integers(1, 32))]
        elif op == "truncate":
            del blob[i:]
    return bytes(blob)


@settings(FUZZ, max_examples=600)
@given(blob=mutated_bytes())
def test_mutated_onnx_bytes_load_or_adapter_error(blob: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        path.write_bytes(blob)
        try:
            adapter = adapters.load(path)
            adapter.layers()
            export = adapter.to_onnx()
        except LOAD_ERRORS:
            return
        onnx.load_from_string(export.model_bytes)  # what was exported parses again


OPS = [
    "Gemm", "MatMul", "Relu", "Add", "Identity", "Flatten", "Reshape", "Softmax", "Loop", "If",
    "Scan", "Conv", "Tile", "Expand", "ConstantOfShape", "Cast", "Concat", "Sqrt", "Evil",
]  # fmt: skip
DIMS = st.sampled_from([0, -1, 1, 3, 64, 1 << 20, 1 << 40, "q"])


def _names(model: onnx.ModelProto) -> list[str]:
    g = model.graph
    return [
        *(i.name for i in g.input),
        *(t.name for t in g.initializer),
        *(o for n in g.node for o in n.output),
        "",
        "zzz",
    ]


@st.composite
def mutated_graphs(draw: st.DrawFn) -> onnx.ModelProto:
    """The valid MLP with a few structural edits: operators, wiring, shapes, types, attributes."""
    model = hostile.mlp()
    g = model.graph
    for _ in range(draw(st.integers(1, 4))):
        what = draw(st.integers(0, 11))
        node = g.node[draw(st.integers(0, len(g.node) - 1))] if g.node else None
        if what == 0 and node is not None:
            node.op_type = draw(st.sampled_from(OPS))
        elif what == 1 and node is not None and node.input:
            node.input[draw(st.integers(0, len(node.input) - 1))] = draw(
                st.sampled_from(_names(model))
            )
        elif what == 2 and node is not None:
            node.output[0] = draw(st.sampled_from(_names(model)))
        elif what == 3 and node is not None:
            g.node.remove(node)
        elif what in (4, 5):
            vi = draw(st.sampled_from([*g.input, *g.output]))
            if what == 4:
                dims = vi.type.tensor_type.shape.dim
                dim = dims[draw(st.integers(0, len(dims) - 1))] if dims else dims.add()
                value = draw(DIMS)
                if isinstance(value, str):
                    dim.dim_param = value
                else:
                    dim.dim_value = value
            else:
                vi.type.tensor_type.elem_type = draw(st.integers(0, 30))
        elif what == 6 and g.initializer:
            t = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
            if draw(st.booleans()) and t.dims:
                t.dims[draw(st.integers(0, len(t.dims) - 1))] = draw(st.sampled_from([0, 1, 7, -1]))
            else:
                t.raw_data = t.raw_data[: draw(st.integers(0, len(t.raw_data)))]
        elif what == 7 and node is not None:
            name = draw(st.sampled_from(["axis", "transA", "transB", "alpha", "to", "body"]))
            value = draw(
                st.one_of(
                    st.integers(-5, 1 << 40),
                    st.floats(allow_nan=True),
                    st.lists(st.integers(-3, 5), min_size=1, max_size=3),
                    st.just(helper.make_graph([], "empty", [], [])),
                )
            )
            node.attribute.append(helper.make_attribute(name, value))
        elif what == 8:
            model.opset_import[0].version = draw(st.sampled_from([0, 1, 7, 13, 21, 30, 10**6]))
        elif what == 9:
            model.ir_version = draw(st.sampled_from([0, 1, 3, 10, 100]))
        elif what == 10 and node is not None:
            g.node.append(node)  # a duplicate producer
        elif what == 11:
            if g.output and draw(st.booleans()):
                del g.output[draw(st.integers(0, len(g.output) - 1))]
            else:
                name = draw(st.sampled_from(_names(model))) or "x"
                g.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return model


@settings(FUZZ, max_examples=300)
@given(model=mutated_graphs())
def test_mutated_onnx_graphs_run_or_clean_error(model: onnx.ModelProto) -> None:
    """Parse, export, check against data, build the session and extract: every failure along the
    way is one of the scanner's own errors."""
    try:
        export = OnnxAdapter(model).to_onnx()
        ds = from_arrays(X_SMALL, Y_SMALL)
        conform(ds, export.input_shape, export.input_dtype, export.num_classes)
        check_memory(export, ds, batch_size=7, config=DetectConfig(), max_memory=1 << 30)
        session = make_session(export, "cpu", threads=1)
        acts = extract(export, ds, batch_size=7, session=session)
    except RUN_ERRORS:
        return
    assert acts.features.shape[0] == len(Y_SMALL) and np.isfinite(acts.features).all()
