"""The PyTorch adapter class: an nn.Module, ScriptModule or ExportedProgram behind the Adapter
contract (export with the numerical check, training, re-initialisation, saving, layers).
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import numpy as np

import backdoorscan.adapters.torch._export as _export  # module attribute: tests patch it
from backdoorscan._io import atomic_write
from backdoorscan.adapters import _cache, _check
from backdoorscan.adapters._util import quiet, require
from backdoorscan.adapters.base import (
    LOGITS,
    AdapterError,
    LayerInfo,
    OnnxExport,
    mark_default,
)
from backdoorscan.adapters.torch._export import (
    INPUT_NAME,
    first_line,
    first_run,
    onnx_feature_tensor,
)
from backdoorscan.adapters.torch._module import (
    feature_tap,
    inputs_message,
    module_device,
    module_layers,
    require_single_input,
    script_copy,
    single_output,
    to_numpy,
)
from backdoorscan.adapters.torch._program import (
    get_attr,
    program_input,
    program_layers,
    program_tap,
    unlift,
)


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
            self.module = unlift(model)
            shape, dtype, batch = program_input(model)
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
        device = module_device(module)
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
            model = script_copy(self.module)
        elif self.kind == "program":
            with quiet():
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
        """Write the model in its own format (tensor state dict, TorchScript, pt2), atomically.

        A state dict goes to a ``.safetensors`` file in that format, anywhere else through
        ``torch.save`` (tensors only); the folder is created where missing.
        """
        target = Path(path)
        data = self.to_bytes(target.suffix)
        return _write(target, lambda tmp: tmp.write_bytes(data))

    def to_bytes(self, suffix: str = ".pt") -> bytes:
        """The file :meth:`save` writes for a name ending in ``suffix``, as bytes: a model in a
        worker process, which may not write files, hands its retrained weights over this way."""
        import torch

        buf = io.BytesIO()
        if self.kind == "module":
            state = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
            if suffix.lower() == ".safetensors":
                st = require("safetensors.torch", extra="torch", what="safetensors files")
                return bytes(st.save(state))
            torch.save(state, buf)
        elif self.kind == "script":
            with quiet():  # torch deprecates TorchScript; this file came in as TorchScript
                torch.jit.save(self.module, buf)
        elif self._raw is not None:
            return bytes(self._raw)
        else:
            torch.export.save(self.program, buf)
        return buf.getvalue()

    # -- inspection and inference ----------------------------------------------------------

    def layers(self) -> list[LayerInfo]:
        """A row per submodule: module path, type name, per-sample output shape (or ()).

        The default feature layer is marked (``row.default``): the module whose output the last
        nn.Linear reads, or an inserted ``input of HEAD`` row where a functional op feeds it.
        TorchScript records no shapes or data flow, so there the head is the last Linear listed.
        """
        if self.kind == "program":
            return program_layers(self.module)
        if self.kind == "script":
            rows = [
                LayerInfo(n, getattr(m, "original_name", type(m).__name__), ())
                for n, m in self.module.named_modules()
                if n
            ]
            heads = [r for r in rows if r.op_type == "Linear"]
            return mark_default(rows, None, heads[-1].name if heads else None, ())
        return module_layers(self.module, self.input_shape, self.input_dtype, self._vocab())

    def predict_logits(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits for ``x`` from PyTorch itself (eval mode, no grad), as float32."""
        import torch

        x = np.asarray(x)
        module = self.module
        device = module_device(module)
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
                    out = single_output(module(torch.from_numpy(xb).to(device)))
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
                        val = get_attr(self.module, n.args[0].target)
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
        require_single_input(module)
        was_training = module.training
        module.eval()
        try:
            tap = feature_tap(module, layer)
            x = self._sample(shape)
            device = module_device(module)

            def reference(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                with torch.no_grad():
                    logits, feats = tap(torch.from_numpy(batch).to(device))
                return to_numpy(logits), to_numpy(feats)

            first_run(lambda: reference(x), x)  # AdapterError on unsuitable models
            model_bytes, how = _export.export_onnx(
                tap, torch.from_numpy(x).to(device), dynamic=True
            )
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
            raise AdapterError(inputs_message(args))
        x = self._sample(shape)
        device = module_device(module)
        with torch.no_grad():  # type/shape gate
            first_run(lambda: single_output(module(torch.from_numpy(x).to(device))), x)
        # The TorchScript exporter names ONNX nodes by module scope (/layer4/1/conv2/Conv),
        # which is what lets a module path pick the feature tensor; converting the archive to
        # torch.export first (what dynamo=True does) drops those scopes.
        buf = io.BytesIO()
        try:
            with quiet():
                torch.onnx.export(
                    script_copy(module),  # the exporter inlines (and unscopes) what it is given
                    (torch.from_numpy(x).to(device),),
                    buf,
                    dynamo=False,
                    input_names=[INPUT_NAME],
                    output_names=[LOGITS],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, LOGITS: {0: "batch"}},
                )
        except Exception as e:
            raise AdapterError(f"export of the TorchScript model failed: {first_line(e)}") from e
        model = onnx.load_from_string(buf.getvalue())
        feature, description = onnx_feature_tensor(model, layer)
        model = _check.name_outputs(model, LOGITS, feature)

        def reference(batch: np.ndarray) -> tuple[np.ndarray, None]:
            with torch.no_grad():
                return to_numpy(module(torch.from_numpy(batch).to(device))), None

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

        tap_module, description = program_tap(self.module, layer)
        fixed = self._static_batch

        def reference(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            with torch.no_grad():
                logits, feats = tap_module(torch.from_numpy(batch))
            return to_numpy(logits), to_numpy(feats)

        x = self._sample(shape, n=fixed or _check.CHECK_BATCH)
        first_run(lambda: reference(x), x)
        if fixed is None:
            model_bytes, how = _export.export_onnx(tap_module, torch.from_numpy(x), dynamic=True)
            return self._finish(model_bytes, x, reference, description, how, True)
        # The archive was exported with a fixed batch size: try to free it (its graph may well
        # be batch-agnostic), and keep the fixed size only if the freed graph fails the check.
        try:
            x_free = self._sample(shape)
            model_bytes, how = _export.export_onnx(
                tap_module, torch.from_numpy(x_free), dynamic=True
            )
            return self._finish(model_bytes, x_free, reference, description, how, True)
        except (AdapterError, RuntimeError):
            pass
        model_bytes, how = _export.export_onnx(tap_module, torch.from_numpy(x), dynamic=False)
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


def _write(target: Path, write: Any) -> Path:
    """Atomically write ``target`` through ``write(tmp)``, making its folder where missing."""
    return atomic_write(target, write, make_parents=True)
