"""PyTorch adapter: state dicts (with a named architecture), TorchScript and torch.export archives.

torch is imported inside functions only, so that the rest of backdoorscan runs without it.

What each format runs when it is loaded (checked against torch 2.13's source):

* State dicts load with ``torch.load(weights_only=True)``: torch's restricted unpickler, which
  builds tensors and plain containers and refuses every other global. A file holding a whole
  pickled model fails there and is refused; backdoorscan never falls back to a full unpickle.
* TorchScript (``torch.jit.load``) reads its pickles with the C++ unpickler
  (torch/csrc/jit/serialization/unpickler.cpp), which resolves only a fixed list of torch
  globals and the TorchScript classes compiled from the archive's own code; that code is
  TorchScript, compiled by torch and never handed to Python's exec. What it can call is the
  registered operator set (``torch.ops``), not arbitrary Python.
* ``torch.export.load`` is NOT safe on its own: tensors flagged ``use_pickle``, "opaque"
  constants and legacy weight files go through ``torch.load(weights_only=False)`` or
  ``pickle.loads``; sample inputs that fail a weights-only load are retried with a full unpickle;
  ``data/aotinductor/`` holds compiled shared libraries that get loaded; symbolic shape strings
  are parsed with ``sympy.sympify`` (an eval); and ``ExportedProgram.module()`` execs the
  archive's ``guards_code``. So the archive is validated first (see ``_validate_pt2``): every
  one of those is refused, shape expressions and graph targets must pass an allowlist, sample
  inputs must load weights-only, and the program is unlifted with ``check_guards=False``.
  The bytes validated are the bytes loaded (read once, no second open of the file).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import hashlib
import importlib
import inspect
import io
import json
import logging
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from backdoorscan._io import atomic_write, sha256_file
from backdoorscan.adapters import _cache, _check
from backdoorscan.adapters.base import FEATURES, LOGITS, AdapterError, OnnxExport

if TYPE_CHECKING:
    from backdoorscan.adapters.keras import KerasAdapter

INPUT_NAME = "input"
_SAVE_HINT = (
    "save the weights only, with torch.save(model.state_dict(), path), and pass the "
    "architecture as --arch module:callable (and --input-shape)"
)
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


class LayerRow(tuple):
    """One ``layers()`` row: unpacks as (path, type name, per-sample shape), and ``.default``.

    ``default`` marks the row whose output the scan clusters when no layer is named. Attribute
    names match the ONNX adapter's LayerInfo, so the CLI reads every adapter's rows alike.
    """

    default: bool

    def __new__(cls, name: str, op_type: str, shape: tuple, default: bool = False) -> LayerRow:
        row = super().__new__(cls, (name, op_type, tuple(shape)))
        row.default = bool(default)
        return row

    @property
    def name(self) -> str:
        """Module path (or layer name), what ``--layer`` takes."""
        return self[0]

    @property
    def op_type(self) -> str:
        """Class name of the module or layer."""
        return self[1]

    @property
    def shape(self) -> tuple:
        """Per-sample output shape, () where unknown."""
        return self[2]

    def __repr__(self) -> str:
        return f"LayerRow({self[0]!r}, {self[1]!r}, {self[2]!r}, default={self.default})"


def mark_default(
    rows: list[LayerRow], producer: str | None, head: str | None, shape: tuple
) -> list[LayerRow]:
    """Mark the row whose output is the default features, or insert ``input of HEAD`` before it.

    ``producer`` is the path whose output the head reads (None when the features come from a
    functional op); ``shape`` is the features' per-sample shape for an inserted row.
    """
    if producer is not None and any(r.name == producer for r in rows):
        return [LayerRow(*r, default=r.name == producer) for r in rows]
    if head is None:
        return rows
    row = LayerRow(f"input of {head}", "(features)", shape, default=True)
    at = next((i for i, r in enumerate(rows) if r.name == head), len(rows))
    return [*rows[:at], row, *rows[at:]]


# --------------------------------------------------------------------------------------------
# Loading


def load(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    input_shape: tuple[int, ...] | None = None,
    input_dtype: str = "float32",
) -> TorchAdapter:
    """Load a PyTorch model file without unpickling Python objects, picking the format by content.

    A zip with ``archive_format`` = pt2 is a torch.export archive, one with ``constants.pkl`` is
    TorchScript; anything else must be a state dict, loaded into ``arch`` (``module:callable``).
    """
    p = Path(path)
    if not p.is_file():
        raise AdapterError(f"no such model file: {p}")
    shape = _parse_shape(input_shape)
    kind = _sniff(p)
    suffix = p.suffix.lower()
    if suffix == ".pt2" and kind != "pt2":
        raise AdapterError(f"{p.name} is not a torch.export archive (torch.export.save output)")
    if suffix == ".ts" and kind != "script":
        raise AdapterError(f"{p.name} is not a TorchScript archive (torch.jit.save output)")
    sha = sha256_file(p)
    if kind == "pt2":
        return _load_program(p, sha, shape, input_dtype)
    if kind == "script":
        return _load_script(p, sha, shape, input_dtype)
    return _load_state_dict(p, sha, arch, arch_kwargs, shape, input_dtype)


def from_module(
    module: Any, *, input_shape: tuple[int, ...] | None = None, input_dtype: str = "float32"
) -> TorchAdapter | KerasAdapter:
    """Wrap an in-memory ``torch.nn.Module`` (or ScriptModule); in-memory models are not cached.

    On Keras' torch backend every keras.Model is also an nn.Module; those go to the Keras adapter.
    """
    import torch

    if any(c.__module__.split(".")[0] == "keras" for c in type(module).__mro__):
        from backdoorscan.adapters import keras as keras_adapter

        return keras_adapter.from_model(module)
    if not isinstance(module, torch.nn.Module):
        raise AdapterError(f"expected a torch.nn.Module, got {type(module).__name__}")
    kind = "script" if isinstance(module, torch.jit.ScriptModule) else "module"
    return TorchAdapter(
        module, kind=kind, input_shape=_parse_shape(input_shape), input_dtype=input_dtype
    )


def _parse_shape(shape: Any) -> tuple[int, ...] | None:
    if shape is None:
        return None
    if isinstance(shape, str):
        shape = [s for s in re.split(r"[,x\s]+", shape.strip()) if s]
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"input shape must be integers like 1,28,28, got {shape!r}") from e
    if not out or any(s <= 0 for s in out):
        raise AdapterError(f"input shape must be positive integers like 1,28,28, got {shape!r}")
    return out


def _sniff(p: Path) -> str:
    """'pt2', 'script' or 'pickle' (a torch.save file or anything else torch.load may read)."""
    if not zipfile.is_zipfile(p):
        return "pickle"
    try:
        with zipfile.ZipFile(p) as zf:
            rel = {n.split("/", 1)[-1] for n in zf.namelist()}
            if "archive_format" in rel:
                root = zf.namelist()[0].split("/", 1)[0]
                name = f"{root}/archive_format"
                if name in zf.namelist() and zf.read(name).strip() == b"pt2":
                    return "pt2"
            if "constants.pkl" in rel:
                return "script"
    except (zipfile.BadZipFile, OSError):
        return "pickle"
    return "pickle"


def _load_state_dict(
    p: Path,
    sha: str,
    arch: str | None,
    arch_kwargs: dict | None,
    shape: tuple[int, ...] | None,
    dtype: str,
) -> TorchAdapter:
    import torch

    try:
        with _quiet():
            obj = torch.load(p, weights_only=True, map_location="cpu")
    except Exception as e:
        msg = str(e)
        if "weights_only" in msg or "Unsupported global" in msg or "Weights only" in msg:
            raise AdapterError(
                f"{p.name} holds pickled Python objects, which backdoorscan never loads (a "
                f"whole model saved with torch.save(model), or worse): {_SAVE_HINT}"
            ) from None
        raise AdapterError(
            f"{p.name} is not a PyTorch weights file that torch can read: {e}"
        ) from e
    state = _as_state_dict(obj)
    if state is None:
        raise AdapterError(
            f"{p.name} holds a {type(obj).__name__}, not a state dict (a dict of tensors): "
            f"{_SAVE_HINT}"
        )
    if not arch:
        raise AdapterError(
            f"{p.name} is a state dict: weights without the code of the network. Pass the "
            "architecture as --arch module:callable (a class or function that builds the "
            "untrained model, importable from your PYTHONPATH) and the per-sample input shape "
            "as --input-shape, e.g. --arch mypkg.models:Net --input-shape 1,28,28"
        )
    module = _build_arch(arch, arch_kwargs or {})
    _load_weights(module, state, p.name, arch)
    module.eval()
    arch_id = _arch_fingerprint(module, arch, arch_kwargs or {})
    return TorchAdapter(
        module,
        kind="module",
        input_shape=shape,
        input_dtype=dtype,
        source=p,
        sha256=sha,
        cache_parts={"arch": arch_id},
    )


def _as_state_dict(obj: Any) -> dict | None:
    import torch

    def tensors(d: Any) -> bool:
        return (
            isinstance(d, dict)
            and len(d) > 0
            and all(isinstance(k, str) for k in d)
            and all(isinstance(v, torch.Tensor) for v in d.values())
        )

    if tensors(obj):
        return dict(obj)
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            if tensors(obj.get(key)):
                return dict(obj[key])
    return None


def _build_arch(arch: str, kwargs: dict) -> Any:
    import torch

    mod_name, sep, attr = arch.partition(":")
    if not sep or not mod_name or not attr:
        raise AdapterError(
            f"--arch must look like module:callable (e.g. mypkg.models:Net), got {arch!r}"
        )
    try:
        target: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise AdapterError(
            f"cannot import {mod_name!r} for --arch {arch}: {e} (is it on PYTHONPATH?)"
        ) from e
    for part in attr.split("."):
        if not hasattr(target, part):
            raise AdapterError(f"{mod_name} has no attribute {attr!r} (from --arch {arch})")
        target = getattr(target, part)
    if not callable(target):
        raise AdapterError(f"--arch {arch} is not callable")
    try:
        module = target(**kwargs)
    except Exception as e:
        raise AdapterError(f"building the architecture {arch}({kwargs or ''}) failed: {e}") from e
    if not isinstance(module, torch.nn.Module):
        raise AdapterError(
            f"--arch {arch} returned a {type(module).__name__}, not a torch.nn.Module"
        )
    return module


def _load_weights(module: Any, state: dict, name: str, arch: str) -> None:
    expected = set(module.state_dict())
    got = set(state)
    if got != expected:
        # Checkpoints from DataParallel or wrapper modules prefix every key; strip a shared prefix.
        for prefix in ("module.", "model.", "net."):
            if all(k.startswith(prefix) for k in got):
                stripped = {k[len(prefix) :]: v for k, v in state.items()}
                if set(stripped) == expected:
                    state = stripped
                    got = expected
                    break
    if got != expected:
        missing = sorted(expected - got)
        extra = sorted(got - expected)
        raise AdapterError(
            f"the weights in {name} do not fit --arch {arch}: missing {_few(missing)}, "
            f"unexpected {_few(extra)}"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise AdapterError(f"the weights in {name} do not fit --arch {arch}: {e}") from e


def _few(items: list[str], n: int = 5) -> str:
    if not items:
        return "none"
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _arch_fingerprint(module: Any, arch: str, kwargs: dict) -> str:
    """What identifies the architecture for the cache: name, kwargs, structure and source file."""
    digest = hashlib.sha256(f"{arch}|{sorted(kwargs.items())!r}|{module!r}".encode())
    with contextlib.suppress(TypeError, OSError):
        src = inspect.getsourcefile(type(module))
        if src:
            digest.update(Path(src).read_bytes())
    return digest.hexdigest()


def _load_script(p: Path, sha: str, shape: tuple[int, ...] | None, dtype: str) -> TorchAdapter:
    import torch

    try:
        with _quiet():
            module = torch.jit.load(str(p), map_location="cpu")
    except Exception as e:
        raise AdapterError(f"{p.name} is not a TorchScript archive torch can load: {e}") from e
    module.eval()
    return TorchAdapter(
        module, kind="script", input_shape=shape, input_dtype=dtype, source=p, sha256=sha
    )


def _load_program(p: Path, sha: str, shape: tuple[int, ...] | None, dtype: str) -> TorchAdapter:
    import torch

    data = p.read_bytes()
    _validate_pt2(data, p.name)
    try:
        with _quiet():
            program = torch.export.load(io.BytesIO(data))
    except Exception as e:
        raise AdapterError(f"{p.name} is not a torch.export archive torch can load: {e}") from e
    return TorchAdapter(
        program,
        kind="program",
        input_shape=shape,
        input_dtype=dtype,
        source=p,
        sha256=sha,
        raw=data,
    )


# --------------------------------------------------------------------------------------------
# torch.export archive validation (see the module docstring for why)

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


def _refuse_pt2(name: str, why: str) -> AdapterError:
    return AdapterError(
        f"refusing {name}: {why}. torch.export archives can carry pickles and code, so "
        "backdoorscan loads only plain ones; save a state dict instead, or export the model to "
        "ONNX yourself"
    )


def _validate_pt2(data: bytes, name: str) -> None:
    """Refuse a torch.export archive that would unpickle, exec or dlopen anything when loaded."""
    import torch
    from torch.export.pt2_archive import constants as k

    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise _refuse_pt2(name, f"not a readable zip archive ({e})") from None
    if len(set(names)) != len(names):
        raise _refuse_pt2(name, "the zip lists an entry twice")
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise _refuse_pt2(name, "entries outside a single top folder")
    rel = {n.split("/", 1)[1]: n for n in names}

    def read(r: str) -> bytes:
        return zf.read(rel[r])

    if k.ARCHIVE_FORMAT_PATH not in rel or read(k.ARCHIVE_FORMAT_PATH).strip() != b"pt2":
        raise _refuse_pt2(name, "not a pt2 archive")
    if k.ARCHIVE_VERSION_PATH not in rel:
        raise _refuse_pt2(name, "an archive of the pre-2.7 format, which torch reads by unpickling")
    native = (k.AOTINDUCTOR_DIR, k.EXECUTORCH_DIR, k.MTIA_DIR, k.XL_MODEL_WEIGHTS_DIR)
    for r in rel:
        if r.startswith(native):
            raise _refuse_pt2(name, f"it holds compiled code ({r})")
    models = [r for r in rel if r.startswith(k.MODELS_DIR) and r.endswith(".json")]
    if not models:
        raise _refuse_pt2(name, "no exported program inside")
    for m in models:
        model = m[len(k.MODELS_DIR) : -len(".json")]
        for legacy in (f"{k.WEIGHTS_DIR}{model}.pt", f"{k.CONSTANTS_DIR}{model}.pt"):
            if legacy in rel:
                raise _refuse_pt2(name, f"legacy pickled weights ({legacy})")
        configs = (
            (k.WEIGHTS_CONFIG_FILENAME_FORMAT.format(model), None),
            (k.CONSTANTS_CONFIG_FILENAME_FORMAT.format(model), k.TENSOR_CONSTANT_FILENAME_PREFIX),
        )
        for cfg_name, prefix in configs:
            if cfg_name not in rel:
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
        if sample in rel and read(sample):
            try:
                with _quiet():
                    torch.load(io.BytesIO(read(sample)), weights_only=True, map_location="cpu")
            except Exception:
                raise _refuse_pt2(name, "its sample inputs are not plain tensors") from None
        try:
            program = json.loads(read(m))
        except ValueError:
            raise _refuse_pt2(name, f"{m} is not valid JSON") from None
        _check_program_json(program, name)


def _check_program_json(program: Any, name: str) -> None:
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
            if isinstance(target, str) and "inputs" in obj:
                _check_target(target, name)
            stack.extend(obj.values())
        elif isinstance(obj, list):
            stack.extend(obj)


def _check_target(target: str, name: str) -> None:
    ok = target in _TARGET_EXACT or target.startswith(_TARGET_PREFIXES)
    op = target.split(".")[3] if target.startswith("torch.ops.") and target.count(".") >= 3 else ""
    if not ok or op in _TARGET_DENY:
        raise _refuse_pt2(name, f"its graph calls {target!r}, outside the operators allowed")


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


# --------------------------------------------------------------------------------------------
# Quiet exports


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' warnings, deprecation notes, log lines and progress prints."""
    names = ("torch", "torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export_onnx(module: Any, x: Any, *, dynamic: bool) -> tuple[bytes, str]:
    """Export ``module`` (returning (logits, features)): dynamo first, TorchScript exporter next."""
    import torch

    errors = []
    with _quiet():
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
            errors.append(f"dynamo exporter: {_first_line(e)}")
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
            errors.append(f"TorchScript exporter: {_first_line(e)}")
    raise AdapterError("export to ONNX failed. " + "; ".join(errors))


def _first_run(run: Callable[[], Any], x: np.ndarray) -> Any:
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


# --------------------------------------------------------------------------------------------
# The adapter


class TorchAdapter:
    """A PyTorch model (nn.Module, ScriptModule or ExportedProgram) behind the Adapter contract."""

    framework = "torch"

    def __init__(
        self,
        model: Any,
        *,
        kind: str,
        input_shape: tuple[int, ...] | None = None,
        input_dtype: str = "float32",
        source: Path | None = None,
        sha256: str | None = None,
        cache_parts: dict | None = None,
        raw: bytes | None = None,
    ) -> None:
        self.kind = kind  # "module" | "script" | "program"
        self.source = source
        self.input_dtype = str(np.dtype(input_dtype))
        self._sha256 = sha256
        self._cache_parts = cache_parts or {}
        self._raw = raw
        self._static_batch: int | None = None
        self.last_loss: float | None = None
        if kind == "program":
            self.program = model
            self.module = _unlift(model)
            shape, dtype, batch = _program_input(model)
            self._static_batch = batch
            # The archive's own shape wins: its graph was specialised to it, and a shape
            # guessed from NHWC data would not fit an NCHW program (the scan transposes).
            input_shape = shape or input_shape
            if dtype is not None:
                self.input_dtype = dtype
        else:
            self.program = None
            self.module = model
        self.input_shape = input_shape or self._guess_input_shape()
        self.can_fit, self.fit_reason = self._fit_status()

    # -- Adapter contract -----------------------------------------------------------------

    def to_onnx(self, layer: str | None = None) -> OnnxExport:
        """Export ``logits`` and ``features`` (the last Linear's input, or ``layer``'s output)."""
        import onnx
        import torch

        shape = self._require_shape()
        key = None
        if self._sha256:
            key = _cache.make_key(
                self._sha256,
                framework="torch",
                kind=self.kind,
                layer=layer,
                input_shape=list(shape),
                input_dtype=self.input_dtype,
                torch=torch.__version__,
                onnx=onnx.__version__,
                **self._cache_parts,
            )
        return _cache.cached(key, lambda: self._export(layer, shape))

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int = 1,
        batch_size: int = 128,
        lr: float = 1e-3,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        """Continue training the loaded weights: Adam and cross-entropy unless overridden.

        ``optimizer=callable(params) -> torch.optim.Optimizer`` and ``loss_fn=callable(logits, y)``
        replace the defaults. Seeded (torch.manual_seed and a seeded shuffle); back in eval mode
        afterwards.
        """
        import torch

        if not self.can_fit:
            raise AdapterError(self.fit_reason)
        make_optimizer = kwargs.pop("optimizer", None)
        loss_fn = kwargs.pop("loss_fn", None) or torch.nn.CrossEntropyLoss()
        if kwargs:
            raise AdapterError(f"unknown fit options: {', '.join(sorted(kwargs))}")
        x = np.asarray(x)
        y = np.asarray(y)
        if len(x) != len(y) or len(x) == 0:
            raise AdapterError(f"fit needs as many labels as samples, got {len(x)} and {len(y)}")
        module = self.module
        device = _device(module)
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        params = [p for p in module.parameters() if p.requires_grad]
        if make_optimizer is not None:
            opt = make_optimizer(params)
        else:
            opt = torch.optim.Adam(params, lr=lr)
        module.train()
        try:
            for _ in range(int(epochs)):
                order = rng.permutation(len(x))
                for start in range(0, len(x), batch_size):
                    idx = order[start : start + batch_size]
                    xb = torch.from_numpy(np.ascontiguousarray(x[idx], dtype=self.input_dtype))
                    yb = torch.from_numpy(y[idx].astype(np.int64))
                    opt.zero_grad()
                    loss = loss_fn(module(xb.to(device)), yb.to(device))
                    loss.backward()
                    opt.step()
                    self.last_loss = float(loss.detach())
        finally:
            module.eval()
        self._sha256 = None  # the weights no longer match the file: never reuse its cached export

    def reinitialize(self, seed: int = 0) -> None:
        """Fresh weights from every layer's own initialiser (``reset_parameters``), seeded.

        Exclusionary reclassification retrains from scratch: continuing from poisoned weights
        keeps the backdoor.
        """
        import torch

        if not self.can_fit:
            raise AdapterError(self.fit_reason)
        layers = [
            m for m in self.module.modules() if callable(getattr(m, "reset_parameters", None))
        ]
        if not layers:
            raise AdapterError("no layer has reset_parameters; cannot retrain from scratch")
        torch.manual_seed(seed)
        for layer in layers:
            layer.reset_parameters()
        self._sha256 = None

    def clone(self) -> TorchAdapter:
        """An independent deep copy; training it leaves this adapter untouched."""
        if self.kind == "script":
            model = _script_copy(self.module)
        elif self.kind == "program":
            with _quiet():
                model = copy.deepcopy(self.program)
        else:
            try:
                model = copy.deepcopy(self.module)
            except Exception as e:
                raise AdapterError(f"cannot copy the model (copy.deepcopy failed): {e}") from e
        twin = TorchAdapter(
            model,
            kind=self.kind,
            input_shape=self.input_shape,
            input_dtype=self.input_dtype,
            source=self.source,
            sha256=self._sha256,
            cache_parts=dict(self._cache_parts),
            raw=self._raw,
        )
        return twin

    def save(self, path: str | Path) -> Path:
        """Write the model in its own format (tensor state dict, TorchScript, pt2), atomically."""
        import torch

        target = Path(path)
        if self.kind == "module":
            state = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
            return atomic_write(target, lambda tmp: torch.save(state, tmp))
        if self.kind == "script":

            def write_script(tmp: Path) -> None:
                with _quiet():  # torch deprecates TorchScript; this file came in as TorchScript
                    torch.jit.save(self.module, str(tmp))

            return atomic_write(target, write_script)
        raw = self._raw
        if raw is not None:
            return atomic_write(target, lambda tmp: tmp.write_bytes(raw))
        return atomic_write(target, lambda tmp: torch.export.save(self.program, str(tmp)))

    # -- extras used by the CLI and by exclusionary reclassification ------------------------

    def layers(self) -> list[LayerRow]:
        """(module path, type name, per-sample output shape or ()) for every submodule.

        The default feature layer is marked (``row.default``): the module whose output the last
        nn.Linear reads, or an inserted ``input of HEAD`` row where a functional op feeds it.
        TorchScript records no shapes or data flow, so there the head is the last Linear listed.
        """
        if self.kind == "program":
            return _program_layers(self.module)
        if self.kind == "script":
            rows = [
                LayerRow(n, getattr(m, "original_name", type(m).__name__), ())
                for n, m in self.module.named_modules()
                if n
            ]
            heads = [r for r in rows if r.op_type == "Linear"]
            return mark_default(rows, None, heads[-1].name if heads else None, ())
        return _module_layers(self.module, self.input_shape, self.input_dtype, self._vocab())

    def predict_logits(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits for ``x`` from PyTorch itself (eval mode, no grad), as float32."""
        import torch

        x = np.asarray(x)
        module = self.module
        device = _device(module)
        outs = []
        fixed = self._static_batch
        step = fixed or max(int(batch_size), 1)
        toggles = self.kind != "program"  # an unlifted program refuses train()/eval()
        was_training = toggles and module.training
        if toggles:
            module.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(x), step):
                    xb = np.ascontiguousarray(x[start : start + step], dtype=self.input_dtype)
                    n = len(xb)
                    if fixed and n < fixed:
                        pad = np.repeat(xb[-1:], fixed - n, axis=0)
                        xb = np.concatenate([xb, pad])
                    out = _single_output(module(torch.from_numpy(xb).to(device)))
                    outs.append(out[:n].detach().float().cpu().numpy())
        finally:
            if was_training:
                module.train()
        if not outs:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(outs).astype(np.float32, copy=False)

    # -- internals ------------------------------------------------------------------------

    def _fit_status(self) -> tuple[bool, str]:
        if self.kind == "program":
            return False, (
                "a torch.export program is an inference graph (batch norm and dropout frozen in "
                "eval mode), so backdoorscan does not train it; retrain the source model, or "
                "repair with the cleaned data set"
            )
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            return False, (
                "the model has no trainable parameters (a frozen TorchScript module keeps its "
                "weights as constants); pass the unfrozen model or a state dict with --arch"
            )
        if not all(p.dtype.is_floating_point for p in params):
            return False, "the model's parameters are not floating point (quantized?)"
        return True, ""

    def _guess_input_shape(self) -> tuple[int, ...] | None:
        if self.kind != "module":
            return None
        import torch

        for m in self.module.modules():
            if isinstance(m, torch.nn.Linear):
                return (m.in_features,)
            if any(True for _ in m.parameters(recurse=False)):
                return None
        return None

    def _require_shape(self) -> tuple[int, ...]:
        if self.input_shape is None:
            raise AdapterError(
                "the per-sample input shape of this PyTorch model is unknown: pass --input-shape "
                "(e.g. 1,28,28 for one-channel 28x28 images), or input_shape= from Python"
            )
        return tuple(self.input_shape)

    def _vocab(self) -> int | None:
        """num_embeddings of the first embedding table, to draw valid ids for integer inputs."""
        import torch

        if self.kind == "module":
            for m in self.module.modules():
                if isinstance(m, torch.nn.Embedding):
                    return int(m.num_embeddings)
        elif self.kind == "script":
            for _, m in self.module.named_modules():
                if getattr(m, "original_name", "") == "Embedding" and hasattr(m, "weight"):
                    return int(m.weight.shape[0])
        else:
            for n in self.module.graph.nodes:
                if n.op == "call_function" and "embedding" in str(n.target):
                    val = n.args[0].meta.get("val") if hasattr(n.args[0], "meta") else None
                    if val is None and n.args[0].op == "get_attr":
                        val = _get_attr(self.module, n.args[0].target)
                    if val is not None:
                        return int(val.shape[0])
        return None

    def _sample(self, shape: tuple[int, ...], n: int = _check.CHECK_BATCH, seed: int = 0):
        return _check.sample_batch(shape, self.input_dtype, n=n, seed=seed, vocab=self._vocab())

    def _export(self, layer: str | None, shape: tuple[int, ...]) -> OnnxExport:
        if self.kind == "module":
            return self._export_module(layer, shape)
        if self.kind == "script":
            return self._export_script(layer, shape)
        return self._export_program(layer, shape)

    def _export_module(self, layer: str | None, shape: tuple[int, ...]) -> OnnxExport:
        import torch

        module = self.module
        _require_single_input(module)
        was_training = module.training
        module.eval()
        try:
            tap = _feature_tap(module, layer)
            x = self._sample(shape)
            device = _device(module)

            def reference(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                with torch.no_grad():
                    logits, feats = tap(torch.from_numpy(batch).to(device))
                return _np(logits), _np(feats)

            _first_run(lambda: reference(x), x)  # AdapterError on unsuitable models
            model_bytes, how = _export_onnx(tap, torch.from_numpy(x).to(device), dynamic=True)
            return self._finish(model_bytes, x, reference, tap.description, how, True)
        finally:
            module.train(was_training)

    def _export_script(self, layer: str | None, shape: tuple[int, ...]) -> OnnxExport:
        import onnx
        import torch

        module = self.module
        schema = module.forward.schema
        args = [a.name for a in schema.arguments][1:]
        if len(args) != 1:
            raise AdapterError(_inputs_message(args))
        x = self._sample(shape)
        device = _device(module)
        with torch.no_grad():  # type/shape gate
            _first_run(lambda: _single_output(module(torch.from_numpy(x).to(device))), x)
        # The TorchScript exporter names ONNX nodes by module scope (/layer4/1/conv2/Conv),
        # which is what lets a module path pick the feature tensor; converting the archive to
        # torch.export first (what dynamo=True does) drops those scopes.
        buf = io.BytesIO()
        try:
            with _quiet():
                torch.onnx.export(
                    _script_copy(module),  # the exporter inlines (and unscopes) what it is given
                    (torch.from_numpy(x).to(device),),
                    buf,
                    dynamo=False,
                    input_names=[INPUT_NAME],
                    output_names=[LOGITS],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, LOGITS: {0: "batch"}},
                )
        except Exception as e:
            raise AdapterError(f"export of the TorchScript model failed: {_first_line(e)}") from e
        model = onnx.load_from_string(buf.getvalue())
        feature, description = _onnx_feature_tensor(model, layer)
        model = _check.name_outputs(model, LOGITS, feature)

        def reference(batch: np.ndarray) -> tuple[np.ndarray, None]:
            with torch.no_grad():
                return _np(module(torch.from_numpy(batch).to(device))), None

        export = self._finish(
            model.SerializeToString(), x, reference, description, "torch.onnx TorchScript exporter"
        )
        export.notes.append(
            "TorchScript exposes no intermediate tensors, so features were checked against "
            "ONNX Runtime with graph optimisations off; logits against PyTorch"
        )
        return export

    def _export_program(self, layer: str | None, shape: tuple[int, ...]) -> OnnxExport:
        import torch

        tap_module, description = _program_tap(self.module, layer)
        fixed = self._static_batch

        def reference(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            with torch.no_grad():
                logits, feats = tap_module(torch.from_numpy(batch))
            return _np(logits), _np(feats)

        x = self._sample(shape, n=fixed or _check.CHECK_BATCH)
        _first_run(lambda: reference(x), x)
        if fixed is None:
            model_bytes, how = _export_onnx(tap_module, torch.from_numpy(x), dynamic=True)
            return self._finish(model_bytes, x, reference, description, how, True)
        # The archive was exported with a fixed batch size: try to free it (its graph may well
        # be batch-agnostic), and keep the fixed size only if the freed graph fails the check.
        try:
            x_free = self._sample(shape)
            model_bytes, how = _export_onnx(tap_module, torch.from_numpy(x_free), dynamic=True)
            return self._finish(model_bytes, x_free, reference, description, how, True)
        except (AdapterError, RuntimeError):
            pass
        model_bytes, how = _export_onnx(tap_module, torch.from_numpy(x), dynamic=False)
        export = self._finish(model_bytes, x, reference, description, how, False)
        export.notes.append(
            f"batch size fixed at {fixed}: the archive was exported without a dynamic batch "
            "dimension; feed batches of exactly this size (pad the last one)"
        )
        return export

    def _finish(
        self,
        model_bytes: bytes,
        x: np.ndarray,
        reference: _check.Reference,
        description: str,
        how: str,
        dynamic: bool = True,
    ) -> OnnxExport:
        import onnx

        model = onnx.load_from_string(model_bytes)
        inputs = _check.data_inputs(model)
        if len(inputs) != 1:
            raise AdapterError(f"the exported graph has {len(inputs)} inputs, expected one")
        input_name = inputs[0].name
        what = self.source.name if self.source else "the model"
        batches = [x, x[: _check.SECOND_BATCH]] if dynamic else [x]
        if dynamic and len(x) <= _check.SECOND_BATCH:
            batches = [x, self._sample(x.shape[1:], n=len(x) + 3, seed=1)]
        feature_dim, num_classes, note = _check.check_export(
            model_bytes, input_name, batches, reference, what=what
        )
        notes = [f"exported with the {how}", note]
        return OnnxExport(
            model_bytes=model_bytes,
            input_name=input_name,
            input_shape=tuple(x.shape[1:]),
            input_dtype=self.input_dtype,
            layer=description,
            feature_dim=feature_dim,
            num_classes=num_classes,
            notes=notes,
        )


# --------------------------------------------------------------------------------------------
# nn.Module helpers


def _make_tap_class():  # the class needs torch, which is imported lazily
    import torch

    class FeatureTap(torch.nn.Module):
        """Runs the wrapped model and returns (logits, flattened features) for export."""

        def __init__(self, model: torch.nn.Module, layer: str | None) -> None:
            super().__init__()
            self.model = model
            self.layer = layer
            self.description = ""
            modules = dict(model.named_modules())
            if layer is not None:
                if layer not in modules or layer == "":
                    raise AdapterError(
                        f"no module at path {layer!r}; candidates: {_candidates(model)}"
                    )
                self.target = modules[layer]
                self.description = layer
            else:
                self.target = None
                self.paths = {id(m): n for n, m in modules.items()}

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            seen: dict[str, Any] = {}
            handles = []
            if self.target is not None:

                def grab_output(mod: Any, args: Any, out: Any) -> None:
                    seen["features"] = out

                handles.append(self.target.register_forward_hook(grab_output))
            else:

                def grab_input(mod: Any, args: tuple) -> None:
                    seen["features"] = args[0] if args else None
                    seen["path"] = self.paths.get(id(mod), type(mod).__name__)

                for m in self.model.modules():
                    if isinstance(m, torch.nn.Linear):
                        handles.append(m.register_forward_pre_hook(grab_input))
            try:
                logits = _single_output(self.model(x))
            finally:
                for h in handles:
                    h.remove()
            if "features" not in seen:
                raise AdapterError(
                    "no nn.Linear ran in forward, so there is no classifier head whose input "
                    "would be the features; name the feature layer with --layer (layer=), e.g. "
                    f"one of: {_candidates(self.model)}"
                )
            feats = seen["features"]
            if self.target is None:
                self.description = f"input of {seen['path']}"
            if not isinstance(feats, torch.Tensor) or feats.dim() < 2:
                got = type(feats).__name__ if not isinstance(feats, torch.Tensor) else feats.shape
                raise AdapterError(
                    f"the features ({self.description}) are {got}, not a [batch, ...] tensor; "
                    f"name another layer with --layer, e.g. one of: {_candidates(self.model)}"
                )
            return logits, feats.flatten(1)

    return FeatureTap


def _feature_tap(model: Any, layer: str | None) -> Any:
    """A FeatureTap module around ``model`` (built on first use, as it needs torch)."""
    return _make_tap_class()(model, layer)


def _single_output(out: Any) -> Any:
    """The logits tensor, or AdapterError when the model is no [batch, classes] classifier."""
    import torch

    if isinstance(out, torch.Tensor):
        if out.dim() == 2:
            return out
        raise AdapterError(
            f"the model returns a tensor of shape {tuple(out.shape)}; backdoorscan needs a "
            "classifier that returns [batch, classes] logits (wrap the model so it does); the "
            "feature layer is a separate choice (--layer)"
        )
    kind = type(out).__name__
    size = f" of {len(out)}" if isinstance(out, (tuple, list, dict)) else ""
    raise AdapterError(
        f"the model returns a {kind}{size}, not one [batch, classes] tensor of logits; wrap it "
        "in a module whose forward returns only the logits (the feature layer is chosen "
        "separately with --layer)"
    )


def _require_single_input(module: Any) -> None:
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return
    required = [
        p.name
        for p in sig.parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if len(required) > 1:
        raise AdapterError(_inputs_message(required))


def _inputs_message(names: list[str]) -> str:
    return (
        f"the model takes {len(names)} inputs ({', '.join(names)}); backdoorscan feeds one "
        "tensor per sample: wrap the model in a module whose forward takes a single input"
    )


def _candidates(model: Any, n: int = 10) -> str:
    """The last few module paths with their types: the likely feature layers."""
    named = [(p, type(m).__name__) for p, m in model.named_modules() if p]
    if not named:
        return "(the model has no submodules)"
    return ", ".join(f"{p} ({t})" for p, t in named[-n:])


def _module_layers(
    module: Any, shape: tuple[int, ...] | None, dtype: str, vocab: int | None
) -> list[LayerRow]:
    import torch

    named = [(p, m) for p, m in module.named_modules() if p]
    shapes: dict[str, tuple] = {}
    outputs: list[tuple[str, Any]] = []  # (path, output) in the order the modules finished
    head: dict[str, Any] = {}  # the last nn.Linear to run, and its input (as FeatureTap picks)
    if shape is not None:
        handles = []
        for p, m in named:

            def hook(mod: Any, args: Any, out: Any, p: str = p) -> None:
                if isinstance(out, torch.Tensor):
                    shapes[p] = tuple(out.shape[1:])
                    outputs.append((p, out))

            def pre(mod: Any, args: tuple, p: str = p) -> None:
                head.update(path=p, input=args[0] if args else None)

            handles.append(m.register_forward_hook(hook))
            if isinstance(m, torch.nn.Linear):
                handles.append(m.register_forward_pre_hook(pre))
        was_training = module.training
        module.eval()
        try:
            x = _check.sample_batch(shape, dtype, n=2, vocab=vocab)
            with torch.no_grad():
                module(torch.from_numpy(x).to(_device(module)))
        except Exception:  # shapes are a courtesy; the listing stands without them
            pass
        finally:
            for h in handles:
                h.remove()
            module.train(was_training)
    rows = [LayerRow(p, type(m).__name__, shapes.get(p, ())) for p, m in named]
    if not head:  # no forward pass: take the last Linear declared
        linear = [(p, m) for p, m in named if isinstance(m, torch.nn.Linear)]
        if not linear:
            return rows
        return mark_default(rows, None, linear[-1][0], (linear[-1][1].in_features,))
    feats = head["input"]
    producer = next(
        (p for p, out in outputs if out is feats and not head["path"].startswith(p + ".")), None
    )
    feat_shape = tuple(feats.flatten(1).shape[1:]) if isinstance(feats, torch.Tensor) else ()
    return mark_default(rows, producer, head["path"], feat_shape)


def _script_copy(module: Any) -> Any:
    """A fresh copy of a ScriptModule (through torch.jit.save / torch.jit.load in memory)."""
    import torch

    buf = io.BytesIO()
    torch.jit.save(module, buf)
    buf.seek(0)
    with _quiet():
        return torch.jit.load(buf, map_location=_device(module))


def _device(module: Any) -> Any:
    import torch

    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _np(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy()


# --------------------------------------------------------------------------------------------
# torch.export program helpers


def _unlift(program: Any) -> Any:
    """The program as a GraphModule, without executing the archive's guard code."""
    with _quiet():
        return program.module(check_guards=False)


def _program_input(program: Any) -> tuple[tuple[int, ...] | None, str | None, int | None]:
    """(per-sample shape, dtype, fixed batch size or None) of the program's one user input."""
    import torch

    sig = program.graph_signature
    users = list(sig.user_inputs)
    if len(users) != 1:
        raise AdapterError(_inputs_message([str(u) for u in users]))
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


def _scopes(node: Any) -> list[tuple[str, str]]:
    """(module path, type name) of every module the node ran inside, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path, typ = value[0], value[1]
        if not isinstance(typ, str):
            typ = f"{getattr(typ, '__module__', '')}.{getattr(typ, '__qualname__', typ)}"
        out.append((re.sub(r"@\d+$", "", str(path)), typ))
    return out


def _program_tap(gm: Any, layer: str | None) -> tuple[Any, str]:
    """A copy of the program's GraphModule that returns (logits, flattened features)."""
    import torch

    with _quiet():
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
        for p, t in _scopes(n):
            paths.setdefault(p, t.rsplit(".", 1)[-1])

    def candidates() -> str:
        named = [f"{p} ({t})" for p, t in paths.items() if p]
        return ", ".join(named[-10:]) or "(no module scopes recorded in the archive)"

    def in_scope(n: Any, path: str) -> bool:
        return any(p == path for p, _ in _scopes(n))

    if layer is None:
        path, feature = _program_head(calls)
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


def _program_head(calls: list) -> tuple[str | None, Any]:
    """(path of the last nn.Linear, the node that feeds it from outside its scope, or None)."""
    linear = [n for n in calls if _scopes(n) and _scopes(n)[-1][1].endswith("Linear")]
    if not linear:
        return None, None
    path = _scopes(linear[-1])[-1][0]

    def inside(n: Any) -> bool:
        return any(p == path for p, _ in _scopes(n))

    for n in calls:
        if inside(n):
            for a in n.all_input_nodes:
                if not inside(a) and a.op != "get_attr":
                    return path, a
    return path, None


def _program_layers(gm: Any) -> list[LayerRow]:
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
        for p, t in _scopes(n):
            if p:
                info[p] = (t.rsplit(".", 1)[-1], per_sample(n))  # a scope's last node: its output
                last[p] = n
    rows = [LayerRow(p, t, s) for p, (t, s) in info.items()]
    head, feature = _program_head(calls)
    # The innermost module whose last node is the head's input produced the features.
    producer = None
    if feature is not None:
        for p, _ in _scopes(feature):
            if p and last.get(p) is feature:
                producer = p
    shape = per_sample(feature) if feature is not None else ()
    flat = (int(np.prod(shape)),) if shape and None not in shape else shape
    return mark_default(rows, producer, head, flat)


def _get_attr(gm: Any, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


# --------------------------------------------------------------------------------------------
# ONNX feature selection for TorchScript exports (scopes live in node names)


def _onnx_scope(node: Any) -> str:
    parts = node.name.split("/")
    if len(parts) < 3 or parts[0] != "":
        return ""
    return ".".join(parts[1:-1])


def _onnx_feature_tensor(model: Any, layer: str | None) -> tuple[str, str]:
    """(tensor name, description) of the features in a graph whose only output is the logits."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    if layer is None:
        ancestors = set()
        stack = [graph.output[0].name]
        while stack:
            t = stack.pop()
            n = producer.get(t)
            if n is None or id(n) in ancestors:
                continue
            ancestors.add(id(n))
            stack.extend(n.input)
        heads = [n for n in graph.node if id(n) in ancestors and n.op_type in ("Gemm", "MatMul")]
        if not heads:
            scopes = sorted({_onnx_scope(n) for n in graph.node} - {""})
            raise AdapterError(
                "no linear layer (Gemm/MatMul) feeds the logits, so there is no classifier head "
                f"whose input would be the features; name one with --layer: {_few(scopes, 10)}"
            )
        head = heads[-1]
        return head.input[0], f"input of {_onnx_scope(head) or head.name}"
    inside = [
        n for n in graph.node if _onnx_scope(n) == layer or _onnx_scope(n).startswith(layer + ".")
    ]
    if not inside:
        scopes = sorted({_onnx_scope(n) for n in graph.node} - {""})
        raise AdapterError(f"no module at path {layer!r}; candidates: {_few(scopes, 15)}")
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
