"""The figures of the HTML report, drawn with matplotlib: sample mosaics, the trigger image,
each class's 2-D projection and its transfer evidence, as PNG bytes."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from backdoorscan.scanner.report import ClassResult, Report

# A mosaic tile is drawn at least this many pixels tall (nearest-neighbour upscaling).
TILE_PX = 48


# Images: any sample shape as given becomes a grey (H, W) or colour (H, W, 3) image.


def _is_tokens(samples: Any) -> bool:
    """Token-id data: integer samples of one dimension (as the scan feeds token models int32
    and int64 arrays; uint8 images are images)."""
    return np.dtype(samples.dtype) in (np.int32, np.int64) and samples.ndim == 2


def _as_images(x: np.ndarray) -> np.ndarray:
    """A batch of samples as images: ``(n, H, W)`` grey or ``(n, H, W, 3)`` colour.

    One dimension: a square number of values is a square image, anything else a one-row
    strip. Three: the axis of 1, 3 or 4 values at either end is the channel axis (NCHW or
    NHWC); otherwise the shorter end is averaged. More: flattened to a strip."""
    x = np.asarray(x, dtype=np.float64)
    n, shape = len(x), x.shape[1:]
    if len(shape) == 1:
        r = math.isqrt(shape[0])
        return x.reshape(n, r, r) if r * r == shape[0] else x.reshape(n, 1, shape[0])
    if len(shape) == 2:
        return x
    if len(shape) == 3:
        if shape[2] not in (1, 3, 4):
            if shape[0] not in (1, 3, 4):  # no channel axis to recognise: average the shorter
                return x.mean(axis=1 if shape[0] <= shape[2] else 3)
            x = np.moveaxis(x, 1, -1)  # NCHW
        return x[..., 0] if x.shape[-1] == 1 else x[..., :3]
    return x.reshape(n, 1, -1)


def _joint_range(*batches: np.ndarray | None) -> tuple[float, float]:
    vals = [b for b in batches if b is not None and b.size]
    if not vals:
        return 0.0, 1.0
    lo = min(float(np.nanmin(b)) for b in vals)
    hi = max(float(np.nanmax(b)) for b in vals)
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _mosaic_png(images: np.ndarray, lo: float, hi: float) -> bytes:
    """A grid of images scaled to [lo, hi], each upscaled to about TILE_PX pixels tall, on a
    white background."""
    imgs = np.clip((images - lo) / (hi - lo), 0.0, 1.0)
    if imgs.ndim == 3:
        imgs = np.repeat(imgs[..., None], 3, axis=-1)
    n, h, w = imgs.shape[:3]
    f = max(1, TILE_PX // h)
    imgs = imgs.repeat(f, axis=1).repeat(f if w * f <= 8 * TILE_PX else 1, axis=2)
    h, w = imgs.shape[1:3]
    cols = max(1, min(n, 6 if w <= 2 * TILE_PX else 1))
    rows = -(-n // cols)
    pad = 2
    canvas = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, 3))
    for k in range(n):
        r, q = divmod(k, cols)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        canvas[y0 : y0 + h, x0 : x0 + w] = imgs[k]
    return _imsave(canvas)


def _trigger_png(values: np.ndarray) -> bytes:
    img = _as_images(values[None])[0]
    m = float(np.abs(img).max()) or 1.0
    if img.ndim == 3:
        return _mosaic_png((0.5 + img / (2 * m))[None], 0.0, 1.0)
    from matplotlib import colormaps

    f = max(1, 4 * TILE_PX // max(img.shape[0], 1))
    rgb = colormaps["RdBu_r"](0.5 + img / (2 * m))[..., :3]
    return _imsave(rgb.repeat(f, axis=0).repeat(f if img.shape[1] * f <= 1024 else 1, axis=1))


def _imsave(rgb: np.ndarray) -> bytes:
    from matplotlib.image import imsave

    buf = io.BytesIO()
    imsave(buf, np.clip(rgb, 0.0, 1.0), format="png")
    return buf.getvalue()


# Plots.


def _new_figure(w: float, h: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _projection_png(flagged_set: set[int], c: ClassResult) -> bytes:
    """The class's 2-D projection coloured by cluster, ``flagged_set`` samples ringed."""
    p = c.projection or {}
    x, y = np.asarray(p["x"]), np.asarray(p["y"])
    cl, idx = np.asarray(p["cluster"]), np.asarray(p["index"])
    flagged = np.asarray([int(i) in flagged_set for i in idx], dtype=bool)
    fig = _new_figure(4.2, 3.4)
    ax = fig.add_subplot()
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    # The suspicious cluster last, on top.
    for j in sorted(np.unique(cl), key=lambda j: j == c.suspicious_cluster):
        sel = cl == j
        susp = j == c.suspicious_cluster
        color = "#d62728" if susp else palette[int(j) % len(palette)]
        n = c.cluster_sizes[j] if j < len(c.cluster_sizes) else int(sel.sum())
        ax.scatter(
            x[sel], y[sel], s=10, c=color, alpha=0.7, linewidths=0,
            label=f"cluster {j}: {n}" + (" (suspicious)" if susp else ""),
        )  # fmt: skip
    if flagged.any():
        ax.scatter(
            x[flagged], y[flagged], s=28, facecolors="none", edgecolors="black",
            linewidths=0.7, label="flagged",
        )  # fmt: skip
    ax.set_xlabel("suspicious cluster vs the rest of the class")
    ax.set_ylabel("main direction of the rest")
    ax.set_title(f"class {c.label}: {c.clustering}", fontsize=10)
    ax.legend(fontsize=7, loc="best", framealpha=0.8)
    return _png(fig)


def _projection_caption(c: ClassResult) -> str:
    shown = len((c.projection or {}).get("x", []))
    return (
        f"The class's activations as the clustering reported ({c.clustering}) sees them, "
        f"{shown} of {c.n_samples} samples: across, the line from the rest of the class to the "
        "suspicious cluster (red; the axis its separation is measured on); up, the main "
        "direction of what remains. Black rings: the flagged samples."
    )


def _transfer_png(report: Report, c: ClassResult) -> bytes:
    rates = c.transfer_rates
    keys = sorted(rates)
    vals = [rates[k] for k in keys]
    thr = float(report.settings.get("transfer_threshold", 0.5))
    fig = _new_figure(4.2, 3.0)
    ax = fig.add_subplot()
    colors = ["#d62728" if v >= thr else "#7f7f7f" for v in vals]
    ax.bar([str(k) for k in keys], vals, color=colors)
    ax.axhline(thr, color="black", linestyle="--", linewidth=0.8)
    ax.set_ylim(min(0.0, min(vals) - 0.05), 1.0)
    ax.set_xlabel("class stamped")
    ax.set_ylabel(f"share sent to class {c.label}")
    ax.set_title(f"transfer test, class {c.label}", fontsize=10)
    return _png(fig)


def _transfer_caption(c: ClassResult) -> str:
    moved = [k for k, v in sorted(c.transfer_rates.items()) if v > 0]
    top = max(c.transfer_rates.items(), key=lambda kv: kv[1], default=None)
    text = (
        "Samples of each other class stamped with the cluster's shared perturbation: the share "
        f"the model then classifies as {c.label}, less the share it classified so before "
        "(the model's own null). Dashed: the threshold."
    )
    if top is not None and top[1] > 0:
        text += f" Most moved: class {top[0]} ({top[1]:.0%}); moved at all: {moved}."
    return text
