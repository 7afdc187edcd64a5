"""ONNX export machinery for PyTorch: the two exporters, the first run on a sample batch, and
the choice of the features tensor in a TorchScript export (module scopes live in node names).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np

from backdoorscan.adapters._util import few, quiet
from backdoorscan.adapters.base import FEATURES, LOGITS, AdapterError

INPUT_NAME = "input"


def export_onnx(module: Any, x: Any, *, dynamic: bool) -> tuple[bytes, str]:
    """Export ``module`` (returning (logits, features)): dynamo first, TorchScript exporter next."""
    import torch

    errors = []
    with quiet():
        try:
            kwargs: dict[str, Any] = {}
            if dynamic:
                kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
            program = torch.onnx.export(
                module,
                (x,),
                dynamo=True,
                verbose=False,
                input_names=[INPUT_NAME],
                output_names=[LOGITS, FEATURES],
                **kwargs,
            )
            return program.model_proto.SerializeToString(), "torch.onnx dynamo exporter"
        except Exception as e:
            errors.append(f"dynamo exporter: {first_line(e)}")
        try:
            buf = io.BytesIO()
            axes = {n: {0: "batch"} for n in (INPUT_NAME, LOGITS, FEATURES)} if dynamic else None
            torch.onnx.export(
                module,
                (x,),
                buf,
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[LOGITS, FEATURES],
                dynamic_axes=axes,
            )
            return buf.getvalue(), "torch.onnx TorchScript exporter (dynamo failed)"
        except Exception as e:
            errors.append(f"TorchScript exporter: {first_line(e)}")
    raise AdapterError("export to ONNX failed. " + "; ".join(errors))


def first_run(run: Callable[[], Any], x: np.ndarray) -> Any:
    """Run the model once on the sample batch ``x``; its failure becomes a one-line AdapterError.

    The usual cause is a wrong per-sample shape (NHWC data for an NCHW model, say), so the
    message says how to pass the right one.
    """
    try:
        return run()
    except AdapterError:
        raise
    except Exception as e:
        # TorchScript puts its interpreter's stack first and the cause on the last line.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        cause = lines[-1][:300] if lines else type(e).__name__
        raise AdapterError(
            f"the model failed on a sample batch of shape {tuple(x.shape)} "
            f"({cause}); pass the per-sample shape it takes with --input-shape "
            "(input_shape= from Python), e.g. 1,28,28 for one-channel 28x28 images"
        ) from e


def first_line(e: BaseException) -> str:
    """An exception's type and first line, short enough for a one-line error."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


def onnx_scope(node: Any) -> str:
    """The module path the TorchScript exporter wrote into a node's name (/layer4/1/Conv)."""
    parts = node.name.split("/")
    if len(parts) < 3 or parts[0] != "":
        return ""
    return ".".join(parts[1:-1])


def onnx_feature_tensor(model: Any, layer: str | None) -> tuple[str, str]:
    """(tensor name, description) of the features in a graph whose only output is the logits."""
    from backdoorscan import onnx_graph

    graph = model.graph
    if layer is None:
        try:
            head = onnx_graph.find_head(graph)
        except onnx_graph.NoHeadError as e:
            scopes = sorted({onnx_scope(n) for n in graph.node} - {""})
            raise AdapterError(
                f"{e}: no linear layer (Gemm/MatMul) feeds the logits, so there is no classifier "
                f"head whose input would be the features; name one with --layer: {few(scopes, 10)}"
            ) from None
        return head.features, f"input of {onnx_scope(head.node) or head.node.name}"
    inside = [
        n for n in graph.node if onnx_scope(n) == layer or onnx_scope(n).startswith(layer + ".")
    ]
    if not inside:
        scopes = sorted({onnx_scope(n) for n in graph.node} - {""})
        raise AdapterError(f"no module at path {layer!r}; candidates: {few(scopes, 15)}")
    members = {id(n) for n in inside}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    leaving = [
        o
        for n in inside
        for o in n.output
        if o in outputs or any(id(c) not in members for c in consumers.get(o, []))
    ]
    if not leaving:
        raise AdapterError(f"the output of {layer!r} is not used by the rest of the graph")
    return leaving[-1], layer
