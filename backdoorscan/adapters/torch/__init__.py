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
* ``.safetensors`` state dicts are read by the safetensors package (a JSON header and raw
  tensor bytes; nothing is unpickled) and load into ``--arch`` like a ``.pt`` state dict.

The package: ``_load`` (sniffing the format, state dicts, building ``--arch``, TorchScript and
program loading), ``_guard`` (the torch.export archive validator), ``_export`` (the ONNX
exporters and the features of a TorchScript export), ``_module`` (the nn.Module feature tap and
layer listing), ``_program`` (torch.export program helpers) and ``_adapter`` (the class).
"""

from __future__ import annotations

from backdoorscan.adapters.torch._adapter import TorchAdapter
from backdoorscan.adapters.torch._load import from_module, load

__all__ = ["TorchAdapter", "from_module", "load"]
