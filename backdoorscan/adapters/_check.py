"""ONNX post-processing and the numerical check shared by the PyTorch and Keras adapters.

Every export ends here: the chosen tensors become graph outputs named ``logits`` and
``features`` (features flattened to [batch, dim]), then the same seeded batch runs through the
framework and through ONNX Runtime, once at the traced batch size and once at another, so that a
graph that drifted numerically or froze its batch size is refused before it reaches a scan.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from backdoorscan.adapters.base import FEATURES, LOGITS, AdapterError

if TYPE_CHECKING:
    import onnx
    import onnxruntime

CHECK_BATCH = 8
SECOND_BATCH = 3  # a second batch size: a graph that froze its batch fails here
RTOL = 1e-3  # max |a - b| must stay within RTOL * (1 + max |reference|)

Reference = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


def sample_batch(
    input_shape: tuple[int, ...],
    dtype: str,
    *,
    n: int = CHECK_BATCH,
    seed: int = 0,
    vocab: int | None = None,
) -> np.ndarray:
    """A seeded batch of ``n`` inputs: uniform [0, 1) floats, or integer ids below ``vocab``."""
    rng = np.random.default_rng(seed)
    shape = (n, *input_shape)
    kind = np.dtype(dtype).kind
    if kind in "iu":
        return rng.integers(0, max(int(vocab or 2), 1), size=shape).astype(dtype)
    if kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    return rng.random(shape).astype(dtype)


def session(model_bytes: bytes, *, optimized: bool = True) -> onnxruntime.InferenceSession:
    """A CPU ONNX Runtime session; unoptimised on request, to check that fusion kept a tensor."""
    from backdoorscan.runtime import cpu_session

    return cpu_session(model_bytes, optimized=optimized)  # type: ignore[return-value]


def data_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (older exporters list weights as inputs too)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def name_outputs(model: onnx.ModelProto, logits: str, features: str) -> onnx.ModelProto:
    """Replace the graph outputs by ``logits`` (Identity of one tensor) and ``features``.

    ``features`` is ``Flatten(axis=1)`` of the other tensor: a no-op on [batch, dim], and the
    per-sample flattening the method asks for on anything of higher rank.
    """
    import onnx
    from onnx import helper

    graph = model.graph
    taken = {o for n in graph.node for o in n.output}
    for name in (LOGITS, FEATURES):
        if name in taken and name not in (logits, features):
            raise AdapterError(f"the exported graph already has a tensor named {name!r}")
    elem = _elem_type(model, logits)
    feat_elem = _elem_type(model, features)
    nodes = []
    if logits != LOGITS:
        nodes.append(helper.make_node("Identity", [logits], [LOGITS], name="backdoorscan_logits"))
    nodes.append(
        helper.make_node("Flatten", [features], [FEATURES], name="backdoorscan_features", axis=1)
    )
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(LOGITS, elem, None),
            helper.make_tensor_value_info(FEATURES, feat_elem, None),
        ]
    )
    # Drop stale value_info entries for the renamed tensors, then let inference fill the shapes.
    keep = [v for v in graph.value_info if v.name not in (LOGITS, FEATURES)]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    with contextlib.suppress(Exception):  # shapes are a convenience; ONNX Runtime needs none
        model = onnx.shape_inference.infer_shapes(model)
    return model


def _elem_type(model: onnx.ModelProto, name: str) -> int:
    import onnx

    for vi in [*model.graph.output, *model.graph.value_info, *model.graph.input]:
        if vi.name == name and vi.type.tensor_type.elem_type:
            return vi.type.tensor_type.elem_type
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        for vi in [*inferred.graph.value_info, *inferred.graph.output]:
            if vi.name == name and vi.type.tensor_type.elem_type:
                return vi.type.tensor_type.elem_type
    except Exception:
        pass
    return onnx.TensorProto.FLOAT


def max_rel_diff(reference: np.ndarray, got: np.ndarray) -> float:
    """max |reference - got| / (1 + max |reference|): the figure the tolerance applies to."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(got, dtype=np.float64)
    if ref.size == 0:
        return 0.0
    return float(np.max(np.abs(ref - out)) / (1.0 + np.max(np.abs(ref))))


def check_export(
    model_bytes: bytes,
    input_name: str,
    batches: list[np.ndarray],
    reference: Reference,
    *,
    what: str = "the model",
) -> tuple[int, int, str]:
    """Run each batch through ONNX Runtime and ``reference``; raise AdapterError on disagreement.

    ``reference(x)`` returns the framework's (logits, features), features flattened, or None for
    features the framework cannot expose (then they are compared against an unoptimised ONNX
    Runtime session instead). Batches of different sizes check that the batch stayed dynamic.
    Returns (feature_dim, num_classes, a note with the figures).
    """
    try:
        sess = session(model_bytes)
    except Exception as e:
        raise AdapterError(f"ONNX Runtime cannot load the graph exported from {what}: {e}") from e
    worst = {LOGITS: 0.0, FEATURES: 0.0}
    plain = None
    feature_dim = num_classes = 0
    for i, batch in enumerate(batches):
        try:
            logits, features = sess.run([LOGITS, FEATURES], {input_name: batch})
        except Exception as e:
            hint = ""
            if i > 0:
                hint = (
                    f" at batch size {len(batch)} after tracing with {len(batches[0])}: the graph "
                    "fixed its batch size (avoid reshapes with a hard-coded batch; x.flatten(1) "
                    "keeps it free)"
                )
            raise AdapterError(f"ONNX Runtime failed on the export of {what}{hint}: {e}") from e
        ref_logits, ref_features = reference(batch)
        if ref_features is None:
            if plain is None:
                plain = session(model_bytes, optimized=False)
            ref_features = plain.run([FEATURES], {input_name: batch})[0]
        for name, got in ((LOGITS, logits), (FEATURES, features)):
            if got.ndim != 2 or got.shape[0] != len(batch):
                raise AdapterError(
                    f"{name} of the export of {what} have shape {got.shape} for a batch of "
                    f"{len(batch)}; expected [batch, n]"
                )
        for name, ref, got in ((LOGITS, ref_logits, logits), (FEATURES, ref_features, features)):
            if np.shape(ref) != got.shape:
                raise AdapterError(
                    f"{name} of the ONNX export of {what} have shape {got.shape}, the framework "
                    f"gives {np.shape(ref)}"
                )
            diff = max_rel_diff(ref, got)
            worst[name] = max(worst[name], diff)
            if not diff <= RTOL:  # also catches NaN
                raise AdapterError(
                    f"the ONNX export of {what} differs from the framework: {name} max abs "
                    f"difference {diff:.3g} x (1 + max |value|) > {RTOL:g} on a seeded batch "
                    f"of {len(batch)}"
                )
        num_classes, feature_dim = logits.shape[1], features.shape[1]
    sizes = ", ".join(str(len(b)) for b in batches)
    note = (
        f"numerical check against ONNX Runtime (CPU), batches of {sizes}: max |diff| / "
        f"(1 + max |ref|) = {worst[LOGITS]:.2g} on logits, {worst[FEATURES]:.2g} on features"
    )
    return int(feature_dim), int(num_classes), note
