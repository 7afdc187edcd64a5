"""Loading PyTorch model files without trusting them: format sniffing, state dicts (pickle and
safetensors) into a named architecture, TorchScript archives, and validated torch.export archives.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import re
import zipfile
from pathlib import Path
from typing import Any

from backdoorscan._io import sha256_file
from backdoorscan.adapters._util import few, quiet, require
from backdoorscan.adapters.base import AdapterError
from backdoorscan.adapters.torch._adapter import TorchAdapter
from backdoorscan.adapters.torch._guard import check_script, validate_pt2

_SAVE_HINT = (
    "save the weights only, with torch.save(model.state_dict(), path), and pass the "
    "architecture as --arch module:callable (and --input-shape)"
)
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
SAFETENSORS_SUFFIX = ".safetensors"


def require_torch() -> Any:
    """Import torch, or raise AdapterError with the command that installs it."""
    return require("torch", extra="torch", what="PyTorch models")


def load(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    input_shape: tuple[int, ...] | None = None,
    input_dtype: str = "float32",
) -> TorchAdapter:
    """Load a PyTorch model file without unpickling Python objects, picking the format by content.

    A ``.safetensors`` file is a state dict; otherwise a zip with ``archive_format`` = pt2 is a
    torch.export archive, one with ``constants.pkl`` is TorchScript, and anything else must be a
    pickled state dict. State dicts load into ``arch`` (``module:callable``).
    """
    p = Path(path)
    if not p.is_file():
        raise AdapterError(f"no such model file: {p}")
    shape = _parse_shape(input_shape)
    require_torch()
    suffix = p.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        state = _read_safetensors(p)
        return _state_dict_adapter(p, sha256_file(p), state, arch, arch_kwargs, shape, input_dtype)
    kind = _sniff(p)
    if suffix == ".pt2" and kind != "pt2":
        raise AdapterError(f"{p.name} is not a torch.export archive (torch.export.save output)")
    if suffix == ".ts" and kind != "script":
        raise AdapterError(f"{p.name} is not a TorchScript archive (torch.jit.save output)")
    sha = sha256_file(p)
    if kind == "pt2":
        return _load_program(p, sha, shape, input_dtype)
    if kind == "script":
        return _load_script(p, sha, shape, input_dtype)
    state = _read_pickled_state(p)
    return _state_dict_adapter(p, sha, state, arch, arch_kwargs, shape, input_dtype)


def from_module(
    module: Any, *, input_shape: tuple[int, ...] | None = None, input_dtype: str = "float32"
) -> TorchAdapter:
    """Wrap an in-memory ``torch.nn.Module`` (or ScriptModule); in-memory models are not cached.

    ``backdoorscan.adapters.from_object`` sends a keras.Model (on Keras' torch backend also an
    nn.Module) to the Keras adapter before it gets here.
    """
    torch = require_torch()
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


def _read_pickled_state(p: Path) -> dict:
    """The state dict in a torch.save file, read by torch's weights-only unpickler."""
    import torch

    try:
        with quiet():
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
    return state


def _read_safetensors(p: Path) -> dict:
    """The tensors of a safetensors file (a JSON header and raw bytes: nothing is unpickled)."""
    st = require("safetensors.torch", extra="torch", what="safetensors files")
    try:
        state = st.load_file(str(p), device="cpu")
    except Exception as e:  # SafetensorError on a bad header, OSError, unknown dtypes
        raise AdapterError(f"{p.name} is not a safetensors file torch can read: {e}") from None
    if not state:
        raise AdapterError(f"{p.name} holds no tensors")
    return dict(state)


def _state_dict_adapter(
    p: Path,
    sha: str,
    state: dict,
    arch: str | None,
    arch_kwargs: dict | None,
    shape: tuple[int, ...] | None,
    dtype: str,
) -> TorchAdapter:
    """The architecture ``arch`` built and loaded with ``state``, behind the adapter."""
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
            f"the weights in {name} do not fit --arch {arch}: missing {few(missing)}, "
            f"unexpected {few(extra)}"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise AdapterError(f"the weights in {name} do not fit --arch {arch}: {e}") from e


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
        with quiet():
            module = torch.jit.load(str(p), map_location="cpu")
    except Exception as e:
        raise AdapterError(
            f"{p.name} is not a TorchScript archive torch can load: {_script_error(e)}"
        ) from e
    check_script(module, p.name)
    module.eval()
    return TorchAdapter(
        module, kind="script", input_shape=shape, input_dtype=dtype, source=p, sha256=sha
    )


def _script_error(exc: Exception) -> str:
    """The cause of a failed TorchScript load in one line: the interpreter's own report
    (its first line only announces a traceback) or, where the archive's code was stopped from
    reaching the file system, that."""
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if any(m in text for m in ("Operation not permitted", "Permission denied")):
        return "its code tried to open a file while loading, which was refused"
    if lines and lines[0].startswith("The following operation failed"):
        return lines[-1]
    return text


def _load_program(p: Path, sha: str, shape: tuple[int, ...] | None, dtype: str) -> TorchAdapter:
    import torch

    data = p.read_bytes()
    validate_pt2(data, p.name)
    try:
        with quiet():
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
