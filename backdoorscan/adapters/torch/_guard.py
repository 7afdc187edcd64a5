"""The torch.export archive guard: refuse a .pt2 that would unpickle, exec or dlopen on load
(and, for TorchScript, code that reaches the file system: :func:`check_script`).

``torch.export.load`` is not safe on its own (see the package docstring): this module reads the
archive as a zip and refuses pickled weights or constants, compiled code, legacy formats, sample
inputs that are not plain tensors, and any shape expression, guard, graph target or
operator-valued argument outside an allowlist, before torch sees a byte of it.

Member names are read as torch reads them: its archive reader (miniz) looks a name up with ASCII
case folded and takes whichever entry it finds, so an archive whose names collide once folded
(``model_weights_config.json`` and ``MODEL_weights_config.json``) could be checked in one
spelling and loaded in the other; such an archive is refused, and every lookup here folds case.
"""

from __future__ import annotations

import ast
import io
import json
import re
import zipfile
from typing import Any

from backdoorscan.adapters._util import quiet
from backdoorscan.adapters.base import AdapterError

_SYMPY_NAMES = frozenset(
    {
        "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Max", "Min", "Abs",
        "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Piecewise", "floor", "ceiling",
        "sqrt", "oo", "zoo", "nan", "true", "false", "True", "False", "None", "S",
        "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "Equality",
        "Unequality", "BooleanTrue", "BooleanFalse", "FloorDiv", "ModularIndexing", "Where",
        "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "IntTrueDiv",
        "FloatTrueDiv", "LShift", "RShift", "IsNonOverlappingAndDenseIndicator", "TruncToFloat",
        "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "FloatPow", "PowByNatural",
        "Identity",
    }
)  # fmt: skip
_GUARD_NAMES = frozenset({"L", "math", "inf", "args"})
_GUARD_ATTRS = frozenset({"size", "stride", "dim", "storage_offset", "shape", "isnan", "inf"})
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
_TARGET_PREFIXES = (
    "torch.ops.aten.",
    "torch.ops.prims.",
    "torch.ops.higher_order.",
    "_operator.",
    "math.",
    "torch.sym_",
    "torch._sym_",
)
_TARGET_EXACT = frozenset({"torch._check", "torch._check_is_size", "torch._C._set_grad_enabled"})
_TARGET_DENY = ("from_file", "_save", "save")
# Python's operator module is allowed for arithmetic on sizes; these reach attributes or call
# whatever they are given.
_OPERATOR_DENY = frozenset({"attrgetter", "methodcaller", "call", "setitem", "delitem"})


def _refuse_pt2(name: str, why: str) -> AdapterError:
    return AdapterError(
        f"refusing {name}: {why}. torch.export archives can carry pickles and code, so "
        "backdoorscan loads only plain ones; save a state dict instead, or export the model to "
        "ONNX yourself"
    )


def validate_pt2(data: bytes, name: str) -> None:
    """Refuse a torch.export archive that would unpickle, exec or dlopen anything when loaded."""
    import torch
    from torch.export.pt2_archive import constants as k

    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        names = _member_names(zf, name)
    except (zipfile.BadZipFile, OSError) as e:
        raise _refuse_pt2(name, f"not a readable zip archive ({e})") from None
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise _refuse_pt2(name, "entries outside a single top folder")
    # Keyed by the folded name, as torch looks members up; _member_names made the keys unique.
    rel = {n.split("/", 1)[1].lower(): n for n in names}

    def read(r: str) -> bytes:
        return zf.read(rel[r.lower()])

    if k.ARCHIVE_FORMAT_PATH.lower() not in rel or read(k.ARCHIVE_FORMAT_PATH).strip() != b"pt2":
        raise _refuse_pt2(name, "not a pt2 archive")
    if k.ARCHIVE_VERSION_PATH.lower() not in rel:
        raise _refuse_pt2(name, "an archive of the pre-2.7 format, which torch reads by unpickling")
    native = tuple(
        d.lower() for d in (k.AOTINDUCTOR_DIR, k.EXECUTORCH_DIR, k.MTIA_DIR, k.XL_MODEL_WEIGHTS_DIR)
    )
    for r in rel:
        if r.startswith(native):
            raise _refuse_pt2(name, f"it holds compiled code ({rel[r]})")
    models_dir = k.MODELS_DIR.lower()
    models = [r for r in rel if r.startswith(models_dir) and r.endswith(".json")]
    if not models:
        raise _refuse_pt2(name, "no exported program inside")
    for m in models:
        model = m[len(models_dir) : -len(".json")]
        for legacy in (f"{k.WEIGHTS_DIR}{model}.pt", f"{k.CONSTANTS_DIR}{model}.pt"):
            if legacy.lower() in rel:
                raise _refuse_pt2(name, f"legacy pickled weights ({legacy})")
        configs = (
            (k.WEIGHTS_CONFIG_FILENAME_FORMAT.format(model), None),
            (k.CONSTANTS_CONFIG_FILENAME_FORMAT.format(model), k.TENSOR_CONSTANT_FILENAME_PREFIX),
        )
        for cfg_name, prefix in configs:
            if cfg_name.lower() not in rel:
                continue
            try:
                cfg = json.loads(read(cfg_name)).get("config", {})
            except (ValueError, AttributeError):
                raise _refuse_pt2(name, f"{cfg_name} is not valid JSON") from None
            for fqn, meta in cfg.items():
                if not isinstance(meta, dict) or meta.get("use_pickle"):
                    raise _refuse_pt2(name, f"{fqn} is stored as a pickle")
                if prefix and not str(meta.get("path_name", "")).startswith(prefix):
                    raise _refuse_pt2(name, f"constant {fqn} is a Python object, not a tensor")
        sample = k.SAMPLE_INPUTS_FILENAME_FORMAT.format(model)
        if sample.lower() in rel and read(sample):
            try:
                with quiet():
                    torch.load(io.BytesIO(read(sample)), weights_only=True, map_location="cpu")
            except Exception:
                raise _refuse_pt2(name, "its sample inputs are not plain tensors") from None
        try:
            program = json.loads(read(m))
        except ValueError:
            raise _refuse_pt2(name, f"{m} is not valid JSON") from None
        _check_program_json(program, name)


def _member_names(zf: zipfile.ZipFile, name: str) -> list[str]:
    """The archive's member names, refused unless torch and this module read the same ones.

    torch's reader compares the raw name bytes with ASCII case folded, and Python's zipfile cuts
    a name at its first NUL: names must be printable ASCII, unique once folded.
    """
    seen: dict[str, str] = {}
    for info in zf.infolist():
        raw = info.orig_filename
        if not raw.isascii() or not raw.isprintable():
            raise _refuse_pt2(name, f"an entry name that is not printable ASCII ({raw[:80]!r})")
        folded = raw.lower()
        if folded in seen:
            same = "twice" if seen[folded] == raw else f"twice, as {seen[folded]!r} and {raw!r}"
            raise _refuse_pt2(name, f"the zip lists an entry {same}, which torch reads as one")
        seen[folded] = raw
    return list(seen.values())


def _check_program_json(program: Any, name: str) -> None:
    """Walk the whole program (nested subgraphs included): every node target and every
    operator-valued argument must be allowed, every shape expression and guard plain."""
    if isinstance(program, dict):
        for guard in program.get("guards_code") or []:
            _check_expr(guard, name, guard=True)
    stack = [program]
    while stack:
        obj = stack.pop()
        if isinstance(obj, dict):
            expr = obj.get("expr_str")
            if isinstance(expr, str):
                _check_expr(expr, name)
            target = obj.get("target")
            if "target" in obj and ("inputs" in obj or not isinstance(target, str)):
                _check_target(target, name)
            # An operator passed as an argument (to a higher-order op such as with_effects or
            # auto_functionalized, or to a Python callable) is resolved like a target and called.
            if "as_operator" in obj:
                _check_target(obj["as_operator"], name, argument=True)
            stack.extend(obj.values())
        elif isinstance(obj, list):
            stack.extend(obj)


def _check_target(target: object, name: str, *, argument: bool = False) -> None:
    """Refuse a graph target (or operator-valued argument) outside the allowlist."""
    what = "passes the operator" if argument else "calls"
    if not isinstance(target, str):
        raise _refuse_pt2(name, f"its graph {what} {target!r}, which is not an operator name")
    ok = target in _TARGET_EXACT or target.startswith(_TARGET_PREFIXES)
    parts = target.split(".")
    op = parts[3] if target.startswith("torch.ops.") and len(parts) > 3 else ""
    py_op = parts[1] if target.startswith("_operator.") and len(parts) > 1 else ""
    if not ok or op in _TARGET_DENY or py_op in _OPERATOR_DENY:
        raise _refuse_pt2(name, f"its graph {what} {target!r}, outside the operators allowed")


def _check_expr(text: str, name: str, *, guard: bool = False) -> None:
    """Allow only arithmetic on symbols and torch's sympy functions (no attributes, no builtins)."""
    what = "guard" if guard else "shape expression"
    if len(text) > 4000:
        raise _refuse_pt2(name, f"a {what} of {len(text)} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise _refuse_pt2(name, f"a {what} that does not parse: {text[:80]!r}") from None
    names = _SYMPY_NAMES | _GUARD_NAMES if guard else _SYMPY_NAMES
    plain = (
        ast.Expression, ast.Load, ast.operator, ast.unaryop, ast.cmpop, ast.boolop,
        ast.UnaryOp, ast.Compare, ast.BoolOp, ast.keyword, ast.Tuple,
    )  # fmt: skip
    for node in ast.walk(tree):
        if isinstance(node, plain):
            ok = True
        elif isinstance(node, ast.BinOp):
            ok = not isinstance(node.op, ast.Pow) or _small_int(node.right)
        elif isinstance(node, ast.Constant):
            v = node.value
            ok = v is None or isinstance(v, (bool, int, float)) or bool(_IDENT.match(str(v)))
            ok = ok and not (isinstance(v, int) and abs(v) > 1 << 62)
        elif isinstance(node, ast.Name):
            ok = node.id in names or bool(re.fullmatch(r"[a-z]{1,6}\d+", node.id))
        elif isinstance(node, ast.Call):
            f = node.func
            ok = (isinstance(f, ast.Name) and f.id in names) or (
                guard and isinstance(f, ast.Attribute) and f.attr in _GUARD_ATTRS
            )
            if ok and isinstance(f, ast.Name) and f.id == "Pow" and len(node.args) == 2:
                ok = _small_int(node.args[1])
        elif guard and isinstance(node, ast.Attribute):
            ok = node.attr in _GUARD_ATTRS
        elif guard and isinstance(node, ast.Subscript):
            ok = True
        else:
            ok = False
        if not ok:
            raise _refuse_pt2(name, f"a {what} outside the allowed grammar: {text[:80]!r}")


def _small_int(node: ast.AST) -> bool:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) == 1:
        node = node.args[0]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    return isinstance(node, ast.Constant) and isinstance(node.value, int) and abs(node.value) <= 64


# TorchScript operators that reach the file system (a first layer only: the model worker's
# seccomp filter refuses writes whatever calls them).
_SCRIPT_DENY = ("from_file", "save", "load", "_save", "_load")


def check_script(module: Any, name: str) -> None:
    """Refuse a loaded TorchScript module whose code calls an operator that reads or writes
    files (``aten::from_file`` and the like), in any method of any submodule, calls inlined.

    Loading already ran the archive's ``__setstate__`` code (in the worker, confined); this
    keeps the rest of its code from running at all, and lets ``layers`` say so as well."""
    for path, sub in module.named_modules():
        for method in sub._c._method_names():
            fn = sub._c._get_method(method)
            try:
                graph = fn.inlined_graph
            except RuntimeError:
                graph = fn.graph
            bad = _script_kind(graph.block())
            if bad is not None:
                where = f"{path}.{method}" if path else method
                raise AdapterError(
                    f"refusing {name}: its TorchScript method {where} calls {bad}, which reaches "
                    "the file system; save a state dict instead, or export the model to ONNX"
                )


def _script_kind(block: Any) -> str | None:
    """The first denied operator kind in ``block`` and its nested blocks, else None."""
    for node in block.nodes():
        kind = node.kind()
        if kind.partition("::")[2] in _SCRIPT_DENY:
            return kind
        for inner in node.blocks():
            bad = _script_kind(inner)
            if bad is not None:
                return bad
    return None
