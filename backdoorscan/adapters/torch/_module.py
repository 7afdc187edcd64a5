"""nn.Module helpers: the feature tap that export traces, output and input checks, the listing
of a module's layers with shapes and the default marked, copies and devices.
"""

from __future__ import annotations

import inspect
import io
from typing import Any

import numpy as np

from backdoorscan.adapters import _check
from backdoorscan.adapters._util import quiet
from backdoorscan.adapters.base import AdapterError, LayerInfo, mark_default


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
                        f"no module at path {layer!r}; candidates: {module_candidates(model)}"
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
                logits = single_output(self.model(x))
            finally:
                for h in handles:
                    h.remove()
            if "features" not in seen:
                raise AdapterError(
                    "no nn.Linear ran in forward, so there is no classifier head whose input "
                    "would be the features; name the feature layer with --layer (layer=), e.g. "
                    f"one of: {module_candidates(self.model)}"
                )
            feats = seen["features"]
            if self.target is None:
                self.description = f"input of {seen['path']}"
            if not isinstance(feats, torch.Tensor) or feats.dim() < 2:
                got = type(feats).__name__ if not isinstance(feats, torch.Tensor) else feats.shape
                raise AdapterError(
                    f"the features ({self.description}) are {got}, not a [batch, ...] tensor; "
                    f"name another layer with --layer, e.g. one of: {module_candidates(self.model)}"
                )
            return logits, feats.flatten(1)

    return FeatureTap


def feature_tap(model: Any, layer: str | None) -> Any:
    """A FeatureTap module around ``model`` (built on first use, as it needs torch)."""
    return _make_tap_class()(model, layer)


def single_output(out: Any) -> Any:
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


def require_single_input(module: Any) -> None:
    """Refuse a module whose forward needs more than one positional input (the scan feeds one)."""
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
        raise AdapterError(inputs_message(required))


def inputs_message(names: list[str]) -> str:
    """The refusal for a model that takes several inputs, naming them."""
    return (
        f"the model takes {len(names)} inputs ({', '.join(names)}); backdoorscan feeds one "
        "tensor per sample: wrap the model in a module whose forward takes a single input"
    )


def module_candidates(model: Any, n: int = 10) -> str:
    """The last few module paths with their types: the likely feature layers."""
    named = [(p, type(m).__name__) for p, m in model.named_modules() if p]
    if not named:
        return "(the model has no submodules)"
    return ", ".join(f"{p} ({t})" for p, t in named[-n:])


def module_layers(
    module: Any, shape: tuple[int, ...] | None, dtype: str, vocab: int | None
) -> list[LayerInfo]:
    """A row per submodule with the output shape seen on a sample batch; the head's input marked.

    One forward pass with hooks records each module's output and which tensor the last
    nn.Linear to run reads (what the feature tap picks); without a shape, the last Linear
    declared is the head.
    """
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
                module(torch.from_numpy(x).to(module_device(module)))
        except Exception:  # shapes are a courtesy; the listing stands without them
            pass
        finally:
            for h in handles:
                h.remove()
            module.train(was_training)
    rows = [LayerInfo(p, type(m).__name__, shapes.get(p, ())) for p, m in named]
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


def script_copy(module: Any) -> Any:
    """A fresh copy of a ScriptModule (through torch.jit.save / torch.jit.load in memory)."""
    import torch

    buf = io.BytesIO()
    torch.jit.save(module, buf)
    buf.seek(0)
    with quiet():
        return torch.jit.load(buf, map_location=module_device(module))


def module_device(module: Any) -> Any:
    """The device of the module's first parameter (CPU for a module without any)."""
    import torch

    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def to_numpy(t: Any) -> np.ndarray:
    """A tensor as a float32 numpy array on the CPU, detached."""
    return t.detach().float().cpu().numpy()
