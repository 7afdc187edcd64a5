"""The memory a scan needs, estimated before extraction, and the limit it must stay under.

A hostile (or merely huge) model can declare a hidden layer of billions of values per sample;
running it would exhaust memory half-way through. The estimate adds up the arrays the scan
allocates (features ``N x D`` and the input sketch ``N x 64`` in float32, the per-class
clustering copy, one batch of converted inputs and of the model's activations as shape
inference declares them, the transfer test's working set, the model itself, and the data when
it is held in memory rather than memory-mapped) and refuses the scan before the first batch
when the sum exceeds the limit. The Python runtime and its libraries (about 0.3 GB) come on top.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from backdoorscan.adapters.base import OnnxExport
from backdoorscan.scanner.config import DetectConfig
from backdoorscan.scanner.data import Dataset
from backdoorscan.scanner.extract import ExtractionError

if TYPE_CHECKING:
    import onnx

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# Initializers larger than this are replaced by typed inputs before shape inference, so that
# estimating never copies a model's weights.
_BIG_INITIALIZER = 4096


class MemoryBudgetError(ExtractionError):
    """The scan would need more memory than allowed; raised before extraction starts."""


def parse_size(text: str | int) -> int:
    """Bytes from ``2G``, ``512M``, ``1.5GiB``, ``800k`` or a plain number (binary units)."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
        if m is None:
            raise ValueError(f"expected a size like 2G, 512M or 800K, got {text!r}")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return value


def fmt_bytes(n: float) -> str:
    """``1.5 GiB``-style text for a byte count."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop always returns


def machine_memory() -> int | None:
    """The memory this process may use: the cgroup limit if one is set, else physical RAM."""
    limits = []
    for cg in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(cg).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            limits.append(int(text))
    with contextlib.suppress(ValueError, OSError, AttributeError):
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return min(limits) if limits else None


@dataclass
class ActivationSizes:
    """What shape inference declares: bytes per sample of the largest batch-sized tensor, bytes
    of the largest fixed-size intermediate, and the width of the features output."""

    per_sample: int | None = None
    fixed: int = 0
    feature_dim: int | None = None
    unknown: list[str] = field(default_factory=list)


def activation_sizes(export: OnnxExport) -> ActivationSizes:
    """Declared tensor sizes of the exported graph (its big weights left out of the inference)."""
    import onnx

    from backdoorscan.onnx_graph import ITEMSIZE

    out = ActivationSizes(feature_dim=export.feature_dim)
    try:
        model = onnx.load_from_string(export.model_bytes)
        weights = _strip_weights(model.graph)
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # a graph shape inference cannot follow: nothing more is known
        return out
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        if vi.name in weights or not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        if not tt.HasField("shape") or not tt.shape.dim:
            continue
        dims = list(tt.shape.dim)
        item = ITEMSIZE.get(tt.elem_type, 4)
        rest = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
        if dims[0].HasField("dim_value"):
            if None not in rest:
                out.fixed = max(out.fixed, dims[0].dim_value * math.prod(rest) * item)
            continue
        if None in rest:
            out.unknown.append(vi.name)
            continue
        size = math.prod(rest) * item
        out.per_sample = max(out.per_sample or 0, size)
        if vi.name == export.features_name and out.feature_dim is None:
            out.feature_dim = math.prod(rest)
    return out


def _strip_weights(graph: onnx.GraphProto) -> set[str]:
    """Turn large initializers into typed inputs (shape inference needs only their shapes);
    return every initializer's name."""
    import onnx

    keep = []
    declared = {vi.name for vi in graph.input}  # older files list their weights as inputs
    for init in graph.initializer:
        if math.prod(init.dims) <= _BIG_INITIALIZER:
            keep.append(init)
        elif init.name not in declared:
            graph.input.append(
                onnx.helper.make_tensor_value_info(init.name, init.data_type, init.dims)
            )
    names = {t.name for t in graph.initializer}
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return names


@dataclass
class MemoryEstimate:
    """Bytes the scan's arrays need, part by part."""

    parts: dict[str, int]
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """The sum of the parts."""
        return sum(self.parts.values())

    def largest(self, n: int = 3) -> str:
        """The ``n`` largest parts, as text."""
        top = sorted(self.parts.items(), key=lambda kv: -kv[1])[:n]
        return ", ".join(f"{name} {fmt_bytes(size)}" for name, size in top if size > 0)


def estimate(
    export: OnnxExport,
    ds: Dataset,
    *,
    batch_size: int,
    config: DetectConfig,
    sketch_dim: int = 64,
    sizes: ActivationSizes | None = None,
) -> MemoryEstimate:
    """Add up what a scan of ``ds`` with ``export`` allocates (see the module docstring)."""
    sizes = sizes if sizes is not None else activation_sizes(export)
    n = len(ds)
    sample = math.prod(ds.x.shape[1:])
    item_in = np.dtype(ds.dtype).itemsize
    parts: dict[str, int] = {}
    notes: list[str] = []
    d = sizes.feature_dim
    if d is None:
        notes.append("the feature width is not declared; its size is not counted")
        d = 0
    largest_class = int(np.bincount(ds.y).max()) if n else 0
    parts["features"] = n * d * 4
    parts["clustering"] = largest_class * d * 8 * 2
    parts["sketch"] = n * sketch_dim * 4 + n * 16
    parts["batch inputs"] = batch_size * sample * max(item_in, ds.x.dtype.itemsize) * 3
    parts["batch activations"] = batch_size * (sizes.per_sample or 0) * 2 + sizes.fixed
    q = config.transfer_queries
    parts["transfer test"] = (
        q * (config.transfer_neighbors + 3)
    ) * sample * 8 + 4 * config.transfer_samples * sample * 8
    parts["model"] = 2 * len(export.model_bytes)
    if not isinstance(ds.x, np.memmap):
        parts["data in memory"] = int(ds.x.nbytes)
    parts["labels"] = int(ds.y.nbytes)
    return MemoryEstimate(parts, notes)


def check_memory(
    export: OnnxExport,
    ds: Dataset,
    *,
    batch_size: int,
    config: DetectConfig,
    max_memory: int | None,
    sizes: ActivationSizes | None = None,
) -> MemoryEstimate:
    """Estimate the scan's memory; refuse it (MemoryBudgetError) when over ``max_memory``.

    Without ``max_memory`` the limit is the machine's (or the container's) memory. ``sizes``
    replaces the shape inference of the exported graph (a model isolated in a worker is never
    parsed in this process: its own memory is bounded there).
    """
    sizes = sizes if sizes is not None else activation_sizes(export)
    est = estimate(export, ds, batch_size=batch_size, config=config, sizes=sizes)
    limit = max_memory if max_memory is not None else machine_memory()
    if limit is None or est.total <= limit:
        return est
    where = (
        f"the memory limit of {fmt_bytes(limit)} (--max-memory)"
        if max_memory is not None
        else f"this machine's memory ({fmt_bytes(limit)})"
    )
    hint = "scan a subset of the data or pick a smaller layer with --layer"
    if est.parts.get("data in memory", 0) > est.total / 2:
        hint = "save the samples as .npy (or an uncompressed .npz) so that they stream from disk"
    elif batch_size > 1:
        one = estimate(export, ds, batch_size=1, config=config, sizes=sizes)
        if one.total <= limit:
            hint = "lower --batch-size"
    raise MemoryBudgetError(
        f"the scan would need about {fmt_bytes(est.total)} ({est.largest()}), over {where}; {hint}"
    )
