"""IBM ART's ActivationDefence (the reference implementation), run for the paper comparison.

Used by ``benchmarks/paper_repro.py``. ART is imported lazily (``art_available()`` says whether
it is installed). One call of :func:`run_art` is one ART configuration: a layer (ART's default,
the last registered module, or the penultimate ReLU output through :class:`PenultimateTap`) and a
reduction (``PCA`` or ``FastICA``, 10 dims, k-means k=2). ``detect_poison`` runs once end to end
(timed: wrapping, the PyTorch activation pass, reduction, clustering, the ``smaller`` analysis);
the other cluster analyses are applied to that same clustering with ``analyze_clusters``, so they
reuse its activations. ART does not seed FastICA or KMeans: numpy, torch and ``random`` are
seeded globally before each configuration.
"""

from __future__ import annotations

import importlib.util
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np

ANALYSES = ("smaller", "relative-size", "distance", "silhouette-scores")
SIZE_THRESHOLD = 0.35  # ART's documented defaults for relative-size and silhouette-scores
SILHOUETTE_THRESHOLD = 0.1


def art_available() -> bool:
    """True when IBM ART (``adversarial-robustness-toolbox``) can be imported."""
    return importlib.util.find_spec("art") is not None


def art_version() -> str | None:
    """The installed ART version, or None."""
    if not art_available():
        return None
    import art

    return str(art.__version__)


def _penultimate_tap_class() -> type:
    """Build the tap class lazily so that importing this module does not import torch."""
    from torch import nn

    class PenultimateTap(nn.Module):
        """Wraps a model so that its last registered top-level module outputs the penultimate
        activations (the input of the model's last Linear layer).

        ART's ActivationDefence clusters the output of ``classifier.layer_names[-1]``, and a
        PyTorchClassifier names the model's top-level modules in registration order; for a
        ``features -> fc2`` model that is the logits. Registering an ``nn.Identity`` last and
        feeding it the last Linear's input points ART at the paper's layer without touching
        ART. The logits are unchanged.
        """

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError("the model has no nn.Linear layer to tap")
            self._seen: list[Any] = []
            linears[-1].register_forward_pre_hook(self._capture)
            self.penultimate = nn.Identity()  # registered last: ART's "last layer"

        def _capture(self, _module: nn.Module, inputs: tuple[Any, ...]) -> None:
            self._seen.append(inputs[0])

        def forward(self, x: Any) -> Any:
            """Logits of the wrapped model; the tap module sees the last Linear's input."""
            self._seen.clear()
            out = self.model(x)
            self.penultimate(self._seen[-1].flatten(1))
            return out

    return PenultimateTap


def penultimate_tap(model: Any) -> Any:
    """``model`` wrapped so that ART's last layer is its penultimate activations."""
    return _penultimate_tap_class()(model)


def seed_everything(seed: int) -> None:
    """ART seeds nothing itself; seed the global generators that scikit-learn and torch use."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _flags_from_assigned(assigned_clean_by_class: Any, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Map ART's per-class ``assigned_clean`` arrays back to sample order (ART's own mapping:
    a sample is clean only where its value is exactly 1)."""
    flagged = np.zeros(len(y), dtype=bool)
    for c in range(n_classes):
        idx = np.flatnonzero(y == c)
        assigned = np.asarray(assigned_clean_by_class[c], dtype=np.float64)
        flagged[idx] = assigned != 1
    return flagged


def documented_rule(
    analysis: str,
    clusters_by_class: list[np.ndarray],
    reduced_by_class: list[np.ndarray],
    y: np.ndarray,
) -> np.ndarray:
    """ART's documented rule re-applied to ART's own clustering (for the analyses that fail).

    ``relative-size``: a cluster holding less than 35 % of its class (share rounded to two
    decimals, as ART does) is poison. ``silhouette-scores``: such a small cluster is poison only
    when the class's silhouette score exceeds 0.1. ``smaller``: the smallest cluster.
    """
    from sklearn.metrics import silhouette_score

    flagged = np.zeros(len(y), dtype=bool)
    for c, clusters in enumerate(clusters_by_class):
        idx = np.flatnonzero(y == c)
        clusters = np.asarray(clusters)
        if len(clusters) == 0:
            continue
        sizes = np.bincount(clusters)
        if analysis == "smaller":
            poison = np.array([int(np.argmin(sizes))])
        else:
            share = np.round(sizes / sizes.sum(), 2)
            poison = np.flatnonzero((share < SIZE_THRESHOLD) & (sizes > 0))
            if analysis == "silhouette-scores" and len(poison):
                z = np.asarray(reduced_by_class[c])
                sil = silhouette_score(z, clusters) if len(np.unique(clusters)) > 1 else 0.0
                if round(float(sil), 4) <= SILHOUETTE_THRESHOLD:
                    poison = poison[:0]
            elif analysis not in ("relative-size", "silhouette-scores"):
                raise ValueError(f"no documented rule re-applied for {analysis!r}")
        flagged[idx] = np.isin(clusters, poison)
    return flagged


def run_art(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    layer: str,
    reduce: str,
    seed: int = 0,
    nb_dims: int = 10,
    nb_clusters: int = 2,
    analyses: tuple[str, ...] = ANALYSES,
    reapply: tuple[str, ...] = ("relative-size", "silhouette-scores"),
) -> dict[str, Any]:
    """Run one ActivationDefence configuration; flags per analysis (or the error it raised).

    ``layer`` is ``"default"`` (the model as given: ART clusters its last registered module) or
    ``"penultimate"`` (through :func:`penultimate_tap`). Returns ``{"time_s", "activation_s",
    "layer_name", "dims", "reduced", "cells": {analysis: {"flagged"| "error", "extra_s"}},
    "reapplied": {analysis: flagged}}``; ``time_s`` is ``detect_poison`` end to end.
    """
    import torch
    from art.defences.detector.poison import ActivationDefence
    from art.estimators.classification import PyTorchClassifier

    if layer not in ("default", "penultimate"):
        raise ValueError(f"layer must be 'default' or 'penultimate', not {layer!r}")
    n_classes = int(y.max()) + 1
    seed_everything(seed)
    t0 = time.perf_counter()
    net = penultimate_tap(model) if layer == "penultimate" else model
    # preprocessing=None: ART's default (0, 1) standardisation casts token ids to float.
    clf = PyTorchClassifier(
        net,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=n_classes,
        preprocessing=None,
        device_type="cpu",
    )
    act_time = [0.0]
    dims = [0]
    get_activations: Callable[..., Any] = clf.get_activations

    def timed_activations(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = get_activations(*args, **kwargs)
        act_time[0] += time.perf_counter() - t
        dims[0] = int(np.prod(np.shape(out)[1:]))
        return out

    clf.get_activations = timed_activations  # type: ignore[method-assign]
    defence = ActivationDefence(clf, x, y)
    cells: dict[str, dict[str, Any]] = {}
    first = analyses[0]
    try:
        _, is_clean = defence.detect_poison(
            nb_clusters=nb_clusters, nb_dims=nb_dims, reduce=reduce, cluster_analysis=first
        )
        cells[first] = {"flagged": np.asarray(is_clean) != 1}
    except Exception as exc:  # ART's own failures are results, recorded as they happen
        cells[first] = {"error": _describe(exc)}
    total = time.perf_counter() - t0
    result: dict[str, Any] = {
        "time_s": total,
        "activation_s": act_time[0],
        "layer_name": clf.layer_names[-1],
        "dims": dims[0],
        "reduced": dims[0] > nb_dims,
        "cells": cells,
        "reapplied": {},
    }
    clusters = list(getattr(defence, "clusters_by_class", []) or [])
    reduced = list(getattr(defence, "red_activations_by_class", []) or [])
    if not clusters:
        return result
    base_s = _time_analysis(defence, first, y, n_classes)[1]
    for analysis in analyses[1:]:
        flags, seconds, error = _time_analysis(defence, analysis, y, n_classes)
        cell: dict[str, Any] = {"extra_s": max(0.0, seconds - base_s)}
        if error is not None:
            cell["error"] = error
        else:
            cell["flagged"] = flags
        cells[analysis] = cell
    for analysis in reapply:
        result["reapplied"][analysis] = documented_rule(analysis, clusters, reduced, y)
    return result


def _time_analysis(
    defence: Any, analysis: str, y: np.ndarray, n_classes: int
) -> tuple[np.ndarray | None, float, str | None]:
    """One cluster analysis on the defence's existing clustering: (flags, seconds, error)."""
    t = time.perf_counter()
    try:
        _, assigned = defence.analyze_clusters(cluster_analysis=analysis)
        flags = _flags_from_assigned(assigned, y, n_classes)
    except Exception as exc:
        return None, time.perf_counter() - t, _describe(exc)
    return flags, time.perf_counter() - t, None


def _describe(exc: BaseException) -> str:
    """``error: ValueError: first line of the message``."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"error: {type(exc).__name__}: {msg}"[:160]
