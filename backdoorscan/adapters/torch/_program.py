"""torch.export program helpers: unlifting without guard code, the input signature, module
scopes, the feature tap as a rewritten graph, and the layer listing.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import numpy as np

from backdoorscan.adapters._util import quiet
from backdoorscan.adapters.base import AdapterError, LayerInfo, mark_default
from backdoorscan.adapters.torch._module import inputs_message


def unlift(program: Any) -> Any:
    """The program as a GraphModule, without executing the archive's guard code."""
    with quiet():
        return program.module(check_guards=False)


def program_input(program: Any) -> tuple[tuple[int, ...] | None, str | None, int | None]:
    """(per-sample shape, dtype, fixed batch size or None) of the program's one user input."""
    import torch

    sig = program.graph_signature
    users = list(sig.user_inputs)
    if len(users) != 1:
        raise AdapterError(inputs_message([str(u) for u in users]))
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == users[0])
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 1:
        return None, None, None
    dims = list(val.shape)
    batch = dims[0] if isinstance(dims[0], int) else None
    per_sample = (
        tuple(int(d) for d in dims[1:]) if all(isinstance(d, int) for d in dims[1:]) else None
    )
    dtype = str(val.dtype).replace("torch.", "")
    return per_sample, dtype, batch


def node_scopes(node: Any) -> list[tuple[str, str]]:
    """(module path, type name) of every module the node ran inside, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path, typ = value[0], value[1]
        if not isinstance(typ, str):
            typ = f"{getattr(typ, '__module__', '')}.{getattr(typ, '__qualname__', typ)}"
        out.append((re.sub(r"@\d+$", "", str(path)), typ))
    return out


def program_tap(gm: Any, layer: str | None) -> tuple[Any, str]:
    """A copy of the program's GraphModule that returns (logits, flattened features)."""
    import torch

    with quiet():
        tap = copy.deepcopy(gm)
    tap._forward_pre_hooks.clear()
    graph = tap.graph
    nodes = list(graph.nodes)
    out_node = next(n for n in nodes if n.op == "output")
    outs = out_node.args[0]
    flat = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    if len(flat) != 1:
        raise AdapterError(
            f"the program returns {len(flat)} outputs, not one [batch, classes] tensor of logits; "
            "export a module whose forward returns only the logits"
        )
    logits = flat[0]
    val = getattr(logits, "meta", {}).get("val")
    if isinstance(val, torch.Tensor) and val.dim() != 2:
        raise AdapterError(
            f"the program returns a tensor of shape {tuple(val.shape)}; backdoorscan needs "
            "[batch, classes] logits"
        )
    calls = [n for n in nodes if n.op == "call_function"]
    paths = {}
    for n in calls:
        for p, t in node_scopes(n):
            paths.setdefault(p, t.rsplit(".", 1)[-1])

    def candidates() -> str:
        named = [f"{p} ({t})" for p, t in paths.items() if p]
        return ", ".join(named[-10:]) or "(no module scopes recorded in the archive)"

    def in_scope(n: Any, path: str) -> bool:
        return any(p == path for p, _ in node_scopes(n))

    if layer is None:
        path, feature = program_head(calls)
        if path is None:
            raise AdapterError(
                "no nn.Linear in the program, so there is no classifier head whose input would "
                f"be the features; name the feature layer with --layer, e.g. one of: {candidates()}"
            )
        if feature is None:
            raise AdapterError(f"cannot find the input of {path} in the program")
        description = f"input of {path}"
    else:
        if layer not in paths or not layer:
            raise AdapterError(f"no module at path {layer!r}; candidates: {candidates()}")
        scope = [n for n in calls if in_scope(n, layer)]
        leaving = [
            n for n in scope if any(u.op == "output" or not in_scope(u, layer) for u in n.users)
        ]
        if not leaving:
            raise AdapterError(f"the output of {layer!r} is not used by the rest of the program")
        feature = leaving[-1]
        description = layer
    with graph.inserting_before(out_node):
        flat_feature = graph.call_function(torch.ops.aten.flatten.using_ints, (feature, 1))
    out_node.args = ((logits, flat_feature),)
    graph._codegen = torch.fx.graph.CodeGen()
    tap.recompile()
    return tap, description


def program_head(calls: list) -> tuple[str | None, Any]:
    """(path of the last nn.Linear, the node that feeds it from outside its scope, or None)."""
    linear = [n for n in calls if node_scopes(n) and node_scopes(n)[-1][1].endswith("Linear")]
    if not linear:
        return None, None
    path = node_scopes(linear[-1])[-1][0]

    def inside(n: Any) -> bool:
        return any(p == path for p, _ in node_scopes(n))

    for n in calls:
        if inside(n):
            for a in n.all_input_nodes:
                if not inside(a) and a.op != "get_attr":
                    return path, a
    return path, None


def program_layers(gm: Any) -> list[LayerInfo]:
    """A row per module scope of the program (type, output shape); the head's input marked."""
    import torch

    def per_sample(n: Any) -> tuple:
        val = getattr(n, "meta", {}).get("val")
        if not isinstance(val, torch.Tensor):
            return ()
        return tuple(int(d) if isinstance(d, int) else None for d in val.shape[1:])

    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    info: dict[str, tuple[str, tuple]] = {}
    last: dict[str, Any] = {}
    for n in calls:
        for p, t in node_scopes(n):
            if p:
                info[p] = (t.rsplit(".", 1)[-1], per_sample(n))  # a scope's last node: its output
                last[p] = n
    rows = [LayerInfo(p, t, s) for p, (t, s) in info.items()]
    head, feature = program_head(calls)
    # The innermost module whose last node is the head's input produced the features.
    producer = None
    if feature is not None:
        for p, _ in node_scopes(feature):
            if p and last.get(p) is feature:
                producer = p
    shape = per_sample(feature) if feature is not None else ()
    flat = (int(np.prod(shape)),) if shape and None not in shape else shape
    return mark_default(rows, producer, head, flat)


def get_attr(gm: Any, target: str) -> Any:
    """The attribute at a dotted ``get_attr`` target of the graph module, or None."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
