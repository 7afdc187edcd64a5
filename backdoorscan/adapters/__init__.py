"""Framework adapters: turn a model file or an in-memory model into an ONNX graph with features.

Only this package imports training frameworks, and each module imports its framework lazily,
so that scanning a bare ONNX file needs neither torch nor keras.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backdoorscan.adapters.base import (
    FEATURES,
    LOGITS,
    Adapter,
    AdapterError,
    LayerInfo,
    OnnxExport,
    Retrainable,
)

ONNX_SUFFIXES = {".onnx"}
TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".ts", ".pt2", ".ckpt", ".safetensors"}
KERAS_SUFFIXES = {".keras", ".h5", ".hdf5"}
SUPPORTED_FORMATS = (
    "ONNX .onnx; PyTorch .pt/.pth/.bin/.ckpt state dicts and .safetensors with --arch; "
    "TorchScript .ts/.pt; torch.export .pt2; Keras .keras/.h5; Hugging Face model folders "
    "(config.json + model.safetensors)"
)

__all__ = [
    "FEATURES",
    "LOGITS",
    "SUPPORTED_FORMATS",
    "Adapter",
    "AdapterError",
    "LayerInfo",
    "OnnxExport",
    "Retrainable",
    "from_object",
    "load",
]


def load(path: str | Path, **options: Any) -> Adapter:
    """Pick the adapter for a model file by its suffix and load the model without trusting it.

    ``options`` are passed to the framework's loader (``arch``, ``arch_kwargs``, ``input_shape``
    for PyTorch state dicts); the ONNX adapter ignores the ones it does not need. A suffix that
    names no supported format is refused rather than guessed at.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if p.is_dir():  # a Hugging Face model folder
        from backdoorscan.adapters import hf

        return hf.load(p, **options)
    if suffix in ONNX_SUFFIXES:
        from backdoorscan.adapters import onnx as onnx_adapter

        return onnx_adapter.load(p)
    if suffix in TORCH_SUFFIXES:
        from backdoorscan.adapters import torch as torch_adapter

        return torch_adapter.load(p, **options)
    if suffix in KERAS_SUFFIXES:
        from backdoorscan.adapters import keras as keras_adapter

        return keras_adapter.load(p, **options)
    if not p.exists():
        raise AdapterError(f"model file not found: {p}")
    what = f"the extension {p.suffix!r}" if p.suffix else "no extension"
    raise AdapterError(
        f"{p.name} has {what}, which names no model format backdoorscan reads; "
        f"supported: {SUPPORTED_FORMATS} (rename the file to its format's extension)"
    )


def from_object(model: Any, **options: Any) -> Adapter:
    """Wrap an in-memory ``torch.nn.Module``, ``keras.Model`` or ``onnx.ModelProto``."""
    kind = type(model).__module__.split(".")[0]
    if kind == "onnx":
        from backdoorscan.adapters import onnx as onnx_adapter

        return onnx_adapter.OnnxAdapter(model)
    # On the torch backend a keras.Model is also an nn.Module: ask for Keras first.
    if kind in {"keras", "tf_keras", "tensorflow"} or _is_keras_model(model):
        from backdoorscan.adapters import keras as keras_adapter

        return keras_adapter.from_model(model, **options)
    if kind == "torch" or _is_torch_module(model):
        from backdoorscan.adapters import torch as torch_adapter

        return torch_adapter.from_module(model, **options)
    raise AdapterError(
        f"cannot scan an object of type {type(model).__name__}: pass a torch.nn.Module, "
        "a keras.Model, an onnx.ModelProto, or a path to a model file"
    )


def _is_torch_module(model: Any) -> bool:
    return any(c.__module__.startswith("torch.nn") for c in type(model).__mro__)


def _is_keras_model(model: Any) -> bool:
    return any(c.__module__.startswith("keras") for c in type(model).__mro__)
