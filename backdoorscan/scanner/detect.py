"""Activation Clustering: per class, reduce the activations, cluster them, judge the clusters.

Framework-free: :func:`detect` takes a features matrix and the training labels and returns a
:class:`~backdoorscan.scanner.report.Report`. The clustering runs in the Numba kernels.

How a class is judged (each analysis is reported with its figure):

- ``size``: the candidate holds less than ``size_threshold`` of the class (the paper's rule);
- ``separation``: along the line joining the candidate's centre to the rest of the class, the gap
  between the two groups in pooled standard deviations; a clean class that k-means merely cuts
  in two gives about 2.5-3.5, a trigger's own cluster gives far more;
- ``silhouette``: the mean silhouette of the clustering (reported; a weak signal on its own);
- ``distance``: the candidate's median lies nearer another class's median than its own class's
  rest (evidence that it came from that class; that class is then the suspected source).

The default verdict is ``size`` and ``separation`` together: the paper's size rule alone flags the
smaller cluster of every class, which makes every clean model look poisoned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from backdoorscan import __version__
from backdoorscan.kernels import fastica, kmeans, pca, silhouette_score
from backdoorscan.scanner.config import ANALYSES, DetectConfig
from backdoorscan.scanner.report import ClassResult, Report

__all__ = ["ANALYSES", "DetectConfig", "detect", "reduce_features"]


@dataclass
class _Clustering:
    z: np.ndarray
    labels: np.ndarray
    centers: np.ndarray
    k: int
    silhouette: float


def reduce_features(f: np.ndarray, cfg: DetectConfig, seed: int) -> np.ndarray:
    """Centre, drop dead units and project one class's activations to ``n_components`` dims."""
    f = np.asarray(f, dtype=np.float64)
    live = f.std(axis=0) > 1e-12
    f = f[:, live] if live.any() else f[:, :1]
    k = min(cfg.n_components, f.shape[1], f.shape[0] - 1)
    if cfg.reduce == "none" or f.shape[1] <= k:
        return f - f.mean(axis=0)
    if cfg.reduce == "ica":
        z, _, _ = fastica(f, k, max_iter=cfg.ica_max_iter, random_state=seed)
        return z
    z, _, _ = pca(f, k)
    return z


def _cluster(z: np.ndarray, cfg: DetectConfig, seed: int) -> _Clustering:
    n = len(z)
    ks = (
        [cfg.n_clusters]
        if isinstance(cfg.n_clusters, int)
        else list(range(2, cfg.max_clusters + 1))
    )
    fits = []
    for k in ks:
        if k >= n:
            break
        labels, centers, _, _ = kmeans(z, k, n_init=cfg.n_init, random_state=seed)
        if len(np.unique(labels)) < 2:
            sil = 0.0
        else:
            sil = silhouette_score(z, labels, max_exact=cfg.silhouette_max_exact, random_state=seed)
        fits.append(_Clustering(z, labels, centers, k, float(sil)))
    if len(fits) == 1:
        return fits[0]
    # The smallest k whose silhouette is within 0.01 of the best: the best alone over-splits.
    best = max(f.silhouette for f in fits)
    return next(f for f in fits if f.silhouette >= best - 0.01)


def _separation(z: np.ndarray, members: np.ndarray) -> float:
    """Gap between a cluster and the rest of its class along the line joining their means."""
    a, b = z[members], z[~members]
    if len(a) < 2 or len(b) < 2:
        return 0.0
    u = a.mean(axis=0) - b.mean(axis=0)
    norm = np.linalg.norm(u)
    if norm == 0:
        return 0.0
    ta, tb = a @ (u / norm), b @ (u / norm)
    pooled = np.sqrt((ta.var() + tb.var()) / 2)
    return float((ta.mean() - tb.mean()) / pooled) if pooled > 0 else float("inf")


def _class_medians(
    features: np.ndarray, labels: np.ndarray, classes: np.ndarray
) -> dict[int, np.ndarray]:
    return {int(c): np.median(features[labels == c], axis=0) for c in classes}


def detect(
    features: np.ndarray,
    labels: np.ndarray,
    config: DetectConfig | None = None,
    **overrides: Any,
) -> Report:
    """Cluster each class's activations and say which samples look like poison.

    ``features`` is ``[n_samples, n_features]`` (the penultimate activations), ``labels`` the
    training labels. Keyword ``overrides`` set fields of :class:`DetectConfig`.
    """
    cfg = config or DetectConfig()
    if overrides:
        cfg = DetectConfig(
            **{**cfg.as_dict(), **overrides, "rule": tuple(overrides.get("rule", cfg.rule))}
        )
    features = np.asarray(features)
    labels = np.asarray(labels)
    if features.ndim != 2:
        features = features.reshape(len(features), -1)
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows but {len(labels)} labels")
    if not np.isfinite(features).all():
        raise ValueError("features hold NaN or Inf values")
    t0 = time.perf_counter()
    n = len(labels)
    scores = np.zeros(n, dtype=np.float64)
    classes = np.unique(labels)
    medians: dict[int, np.ndarray] | None = None
    results: list[ClassResult] = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        if len(idx) < max(cfg.min_class_size, 3):
            results.append(
                ClassResult(
                    int(c),
                    len(idx),
                    "skipped",
                    reason=f"{len(idx)} samples, fewer than the {cfg.min_class_size} needed",
                )
            )
            continue
        seed = cfg.seed + int(c)
        f = features[idx]
        z = reduce_features(f, cfg, seed)
        fit = _cluster(z, cfg, seed)
        sizes = np.bincount(fit.labels, minlength=fit.k)
        rel = sizes / len(idx)
        # The candidate: the most separated cluster among those small enough, else the smallest.
        seps = np.array([_separation(z, fit.labels == j) for j in range(fit.k)])
        small = np.flatnonzero(rel < cfg.size_threshold)
        pool = small if len(small) else np.arange(fit.k)
        cand = int(pool[np.argmax(seps[pool])]) if len(small) else int(np.argmin(sizes))
        members = fit.labels == cand
        if medians is None:
            medians = _class_medians(features, labels, classes)
        own_rest = np.median(f[~members], axis=0) if (~members).any() else medians[int(c)]
        cand_median = np.median(f[members], axis=0)
        d_own = float(np.linalg.norm(cand_median - own_rest))
        others = {
            k: float(np.linalg.norm(cand_median - m)) for k, m in medians.items() if k != int(c)
        }
        nearest = min(others, key=others.get) if others else None
        dist_ratio = d_own / others[nearest] if nearest is not None and others[nearest] > 0 else 0.0
        votes = {
            "size": bool(rel[cand] < cfg.size_threshold),
            "separation": bool(seps[cand] >= cfg.separation_threshold),
            "silhouette": bool(fit.silhouette >= cfg.silhouette_threshold),
            "distance": bool(dist_ratio > 1.0),
        }
        poisoned = all(votes[a] for a in cfg.rule)
        # Membership: how much nearer a sample sits to the candidate centre than to the rest.
        d_c = np.linalg.norm(z - z[members].mean(axis=0), axis=1)
        d_r = np.linalg.norm(z - z[~members].mean(axis=0), axis=1) if (~members).any() else d_c
        membership = np.where(members, d_r / np.maximum(d_c + d_r, 1e-12), 0.0)
        membership = np.where(members, np.maximum(membership, 0.5 + 1e-6), membership)
        scores[idx] = membership if poisoned else membership * 0.5
        results.append(
            ClassResult(
                label=int(c),
                n_samples=len(idx),
                verdict="poisoned" if poisoned else "clean",
                cluster_sizes=[int(s) for s in sizes],
                suspicious_cluster=cand,
                relative_size=float(rel[cand]),
                silhouette=fit.silhouette,
                separation=float(seps[cand]),
                distance_ratio=float(dist_ratio),
                votes=votes,
                n_flagged=int(members.sum()) if poisoned else 0,
                suspected_source=int(nearest) if (poisoned and votes["distance"]) else None,
            )
        )
    flagged = np.flatnonzero(scores > 0.5)
    settings = cfg.as_dict()
    return Report(
        tool_version=__version__,
        settings=settings,
        classes=results,
        flagged_indices=flagged,
        scores=scores,
        data={"n_samples": n, "n_classes": len(classes)},
        timings={"detect": time.perf_counter() - t0},
    )
