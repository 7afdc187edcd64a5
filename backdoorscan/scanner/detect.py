"""Activation Clustering: per class, reduce the activations, cluster them, judge the clusters.

Framework-free: :func:`detect` takes a features matrix and the training labels and returns a
:class:`~backdoorscan.scanner.report.Report`. The clustering runs in the Numba kernels.

Per class, every cluster of every clustering (PCA and FastICA, k = 2 and 3) is a candidate,
and each analysis gives it a figure:

- ``transfer`` (the default rule; needs the model, see ``scanner/transfer.py``): the share of
  another class's samples that the model sends to this class once they carry the perturbation
  the candidate's samples share; at ``transfer_threshold`` or above the candidate is poison;
- ``size``: the candidate holds less than ``size_threshold`` of the class (the paper's rule);
- ``separation``: along the line joining the candidate's centre to the rest of the class, the gap
  between the two groups in pooled standard deviations; a clean class that k-means merely cuts
  in two gives about 2.5-4.5, a trigger's own cluster often more;
- ``silhouette``: the mean silhouette of the clustering (reported; a weak signal on its own);
- ``distance``: the candidate's median lies nearer another class's median than its own class's
  rest (evidence that it came from that class).

A class is poisoned when some candidate passes every analysis of ``rule``. Without a model the
rule falls back to ``size`` and ``separation``: the size rule alone flags a genuine mode of many
clean classes, which makes every clean model look poisoned.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from threadpoolctl import threadpool_limits

from backdoorscan._version import __version__
from backdoorscan.kernels import column_medians, fastica, kmeans, pca, silhouette_score
from backdoorscan.kernels.pca import all_finite, column_stats, project
from backdoorscan.scanner.config import ANALYSES, DetectConfig
from backdoorscan.scanner.report import ClassResult, Report, class_projection

__all__ = [
    "ANALYSES",
    "ClassWork",
    "DetectConfig",
    "TransferTest",
    "detect",
    "detect_class",
    "effective_rule",
    "reduce_features",
]


@dataclass
class _Clustering:
    z: np.ndarray
    labels: np.ndarray
    centers: np.ndarray
    k: int
    max_exact: int
    seed: int
    reduction: str = ""
    _silhouette: float | None = None

    @property
    def silhouette(self) -> float:
        """Mean silhouette of the clustering, computed when first asked (it costs a pass over
        pairs of samples, and most clusterings are never asked)."""
        if self._silhouette is None:
            if len(np.unique(self.labels)) < 2:
                self._silhouette = 0.0
            else:
                self._silhouette = float(
                    silhouette_score(
                        self.z, self.labels, max_exact=self.max_exact, random_state=self.seed
                    )
                )
        return self._silhouette


# A sample in a cluster scores at least this (its membership is at least half the way to the
# cluster's centre); the scores of samples outside the cluster stay below it.
MEMBER_SCORE = 0.5 + 1e-6
# The carriers of a confirmed trigger: a score of at least this share of the trigger, and no
# lower than the cluster's median less this many robust standard deviations; the per-sample
# split replaces the cluster only where the two mostly agree (Jaccard index).
CARRIER_MIN = 0.5
CARRIER_MADS = 4.0
CARRIER_JACCARD = 0.5
# Among the clusterings the model confirms about equally (within this transfer rate), the best
# separated is reported.
TRANSFER_TIE = 0.1


def reduce_features(
    f: np.ndarray,
    cfg: DetectConfig,
    seed: int,
    method: str,
    capped: list[str] | None = None,
    cache: dict[str, Any] | None = None,
) -> np.ndarray:
    """Centre, drop dead units and project one class's activations to ``n_components`` dims.

    The class is used as given (float32 stays float32, no centred or float64 copy): dead units
    only leave FastICA's fitting rows (at most ``fit_samples``, the one copy), PCA ignores
    them by itself (zero variance), and every projection centres through the mean.
    A FastICA run that stops at ``ica_max_iter`` without converging appends ``method`` to
    ``capped`` (the report says so, as scikit-learn warns). ``cache`` (one dict per class)
    keeps PCA's eigenpairs, so that FastICA fitted on the whole class whitens with them
    instead of solving the same eigenproblem again."""
    f = np.asarray(f)
    if f.dtype not in (np.float32, np.float64):
        f = f.astype(np.float64)
    mean, live = column_stats(f)  # a dead unit: max - min <= 1e-12
    if not live.any():
        live[0] = True
    n_live = int(live.sum())
    k = min(cfg.n_components, n_live, f.shape[0] - 1)
    if method == "none" or n_live <= k:
        return f[:, live].astype(np.float64) - mean[live]
    if method == "ica":
        rows = _fit_rows(len(f), cfg, seed)
        known = cache.get("pca") if cache is not None and isinstance(rows, slice) else None
        if known is not None and known[0] == k:  # PCA's eigenpairs of this very class
            z, _, n_iter = fastica(
                f, k, max_iter=cfg.ica_max_iter, random_state=seed, whitening=known[1:]
            )
            if capped is not None and n_iter >= cfg.ica_max_iter:
                capped.append(method)
            return z
        fit = f[rows][:, live]
        _, unmixing, n_iter = fastica(fit, k, max_iter=cfg.ica_max_iter, random_state=seed)
        if capped is not None and n_iter >= cfg.ica_max_iter:
            capped.append(method)
        full = np.zeros((unmixing.shape[0], f.shape[1]))
        full[:, live] = unmixing
        fit_mean = np.zeros(f.shape[1])
        fit_mean[live] = fit.mean(axis=0, dtype=np.float64)
        return project(f, fit_mean, full.T)
    z, components, variance = pca(f, k, mean=mean)
    if cache is not None:
        cache["pca"] = (k, variance * (len(f) - 1), components.T)
    return z


def _fit_rows(n: int, cfg: DetectConfig, seed: int) -> np.ndarray | slice:
    """The rows that FastICA and k-means learn from: all of them, or a seeded sample of
    ``fit_samples`` when the class is larger (a cluster holds the same share of the sample as
    of the class; every row is then projected and assigned)."""
    if cfg.fit_samples <= 0 or n <= cfg.fit_samples:
        return slice(None)
    rng = np.random.default_rng([seed, n])
    return np.sort(rng.choice(n, size=cfg.fit_samples, replace=False))


def _kmeans_fit(z: np.ndarray, k: int, cfg: DetectConfig, seed: int) -> _Clustering:
    rows = _fit_rows(len(z), cfg, seed)
    labels, centers, _, _ = kmeans(z[rows], k, n_init=cfg.n_init, random_state=seed)
    if not isinstance(rows, slice):
        labels = _nearest(z, centers)
    return _Clustering(z, labels, centers, k, cfg.silhouette_max_exact, seed)


def _nearest(z: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of each row's nearest centre (ties to the lower index, as k-means assigns)."""
    d = ((z[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)
    return d.argmin(axis=1).astype(np.int64)


def _cluster(z: np.ndarray, cfg: DetectConfig, seed: int) -> list[_Clustering]:
    """k-means for each k asked for; with ``auto``, the one k chosen by silhouette."""
    n = len(z)
    if cfg.n_clusters != "auto":
        ks = (cfg.n_clusters,) if isinstance(cfg.n_clusters, int) else cfg.n_clusters
        return [_kmeans_fit(z, k, cfg, seed) for k in ks if k < n]
    fits = [_kmeans_fit(z, k, cfg, seed) for k in range(2, cfg.max_clusters + 1) if k < n]
    # The smallest k whose silhouette is within 0.01 of the best: the best alone over-splits.
    best = max(f.silhouette for f in fits)
    return [next(f for f in fits if f.silhouette >= best - 0.01)]


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
    return {int(c): column_medians(features, labels == c) for c in classes}


class TransferTest(Protocol):
    """Asks the model whether a cluster's shared perturbation acts as a trigger."""

    def __call__(self, indices: np.ndarray, label: int, seed: int) -> Any:
        """A result with ``rate`` (transfer rate), ``source`` (suspected source), ``trigger``
        (the estimated trigger, or None) and ``rates`` (rate per class stamped)."""
        ...

    def trigger(self, indices: np.ndarray, seed: int) -> Any:
        """The perturbation the samples at ``indices`` share, estimated as sharply as the
        test can (None if there is none)."""
        ...

    def trigger_scores(self, indices: np.ndarray, trigger: Any) -> np.ndarray:
        """How strongly each of the samples at ``indices`` carries ``trigger``."""
        ...


@dataclass
class _Candidate:
    cluster: int
    members: np.ndarray  # boolean over the class's samples
    relative_size: float
    separation: float
    fit: _Clustering
    distance: float | None = None  # computed when an analysis or the report asks
    nearest: int | None = None
    transfer: float | None = None
    source: int | None = None
    trigger: Any = None
    rates: dict[int, float] | None = None
    evidence: dict[str, Any] | None = None  # the calibrated transfer test's (transfer_null)


def _candidates(
    f: np.ndarray, cfg: DetectConfig, seed: int, capped: list[str] | None = None
) -> list[_Candidate]:
    """Every cluster of every clustering of one class (duplicates across reductions dropped)."""
    out: list[_Candidate] = []
    seen: set[bytes] = set()
    cache: dict[str, Any] = {}
    for method in cfg.reductions:
        z = reduce_features(f, cfg, seed, method, capped, cache)
        for fit in _cluster(z, cfg, seed):
            fit.reduction = f"{method} k={fit.k}"
            sizes = np.bincount(fit.labels, minlength=fit.k)
            for j in range(fit.k):
                members = fit.labels == j
                key = np.packbits(members).tobytes()
                if not members.any() or members.mean() > cfg.max_share or key in seen:
                    continue
                seen.add(key)
                out.append(_Candidate(j, members, sizes[j] / len(f), _separation(z, members), fit))
    return out


def _votes(
    cand: _Candidate, cfg: DetectConfig, analyses: tuple[str, ...] = ANALYSES
) -> dict[str, bool]:
    """Each analysis's verdict on a candidate; only those in ``analyses`` are computed."""
    tests = {
        "size": lambda: cand.relative_size < cfg.size_threshold,
        "separation": lambda: cand.separation >= cfg.separation_threshold,
        "silhouette": lambda: cand.fit.silhouette >= cfg.silhouette_threshold,
        "distance": lambda: (cand.distance or 0.0) > 1.0,
    }
    if cand.transfer is not None:
        tests["transfer"] = lambda: (
            cand.transfer >= cfg.transfer_threshold
            and (cand.evidence is None or bool(cand.evidence.get("passed")))
        )
    return {a: test() for a, test in tests.items() if a in analyses}


@dataclass
class ClassWork:
    """What every class's analysis shares: the settings, the rule applied, the class medians
    of the features and the transfer test (None without the model)."""

    config: DetectConfig
    rule: tuple[str, ...]
    medians: dict[int, np.ndarray]
    transfer: TransferTest | None = None


ClassOutcome = tuple[ClassResult, np.ndarray | None, list[str]]


def detect_class(
    work: ClassWork, label: int, indices: np.ndarray, features: np.ndarray
) -> ClassOutcome:
    """One class's analysis as :func:`detect` runs it (``features``: the class's rows, at
    ``indices``), for engines that run the classes elsewhere: the result, the samples'
    membership scores (None when skipped) and the reductions FastICA stopped at its cap."""
    capped: list[str] = []
    cfg, rule, medians, transfer = work.config, work.rule, work.medians, work.transfer
    result, scores = _detect_class(label, indices, features, cfg, rule, medians, transfer, capped)
    return result, scores, capped


def effective_rule(cfg: DetectConfig, has_transfer: bool) -> tuple[str, ...]:
    """The analyses that decide: ``transfer`` needs the model, so arrays alone fall back."""
    if has_transfer or "transfer" not in cfg.rule:
        return cfg.rule
    rest = tuple(a for a in cfg.rule if a != "transfer")
    return rest or cfg.fallback_rule


def detect(
    features: np.ndarray,
    labels: np.ndarray,
    config: DetectConfig | None = None,
    *,
    transfer: TransferTest | None = None,
    progress: Callable[[int, int], None] | None = None,
    class_map: Callable[..., Iterable[ClassOutcome]] | None = None,
    **overrides: Any,
) -> Report:
    """Cluster each class's activations and say which samples look like poison.

    ``features`` is ``[n_samples, n_features]`` (the penultimate activations), ``labels`` the
    training labels. ``transfer(indices, label, seed)`` (optional, given by :func:`scan`,
    which holds the model) returns the share of other classes' samples that the model sends to
    ``label`` once they carry the perturbation the cluster's samples share, and the class the
    cluster's samples resemble; without it the rule falls back to ``fallback_rule``.
    Keyword ``overrides`` set fields of :class:`DetectConfig`. ``class_map(work, features,
    [(label, indices), ...])``, when given, runs the classes instead of this process's threads
    (:func:`detect_class` on each; outcomes in class order): the Ray engine's tasks.
    """
    cfg = config or DetectConfig()
    if overrides:
        merged = {**cfg.as_dict(), **overrides}
        for key in ("rule", "fallback_rule"):
            merged[key] = tuple(merged[key])
        cfg = DetectConfig(**merged)
    features = np.asarray(features)
    labels = np.asarray(labels)
    if features.ndim != 2:
        features = features.reshape(len(features), -1)
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows but {len(labels)} labels")
    if not all_finite(features):
        raise ValueError("features hold NaN or Inf values")
    rule = effective_rule(cfg, transfer is not None)
    t0 = time.perf_counter()
    n = len(labels)
    scores = np.zeros(n, dtype=np.float64)
    classes = np.unique(labels)
    medians = _class_medians(features, labels, classes)
    jobs = [np.flatnonzero(labels == c) for c in classes]

    def one(c: int, idx: np.ndarray) -> tuple[ClassResult, np.ndarray | None]:
        return _detect_class(int(c), idx, features[idx], cfg, rule, medians, transfer, capped)

    capped: list[str] = []  # list.append is atomic: the class threads share it

    # Classes are independent and their kernels release the GIL: a thread each, results in
    # class order (each class is seeded on its own, so the report does not depend on n_jobs).
    # The classes are the parallelism: BLAS is held to one thread here (as scikit-learn does
    # around its own thread pools), else every class thread's small matrix products start a
    # pool of BLAS threads each and they spin against one another (4-12x slower at 10k samples
    # on 2 cores, benchmarks/RESULTS.md). Nested inside scan()'s own limit, this is a no-op.
    workers = min(_n_jobs(cfg.n_jobs), len(classes))
    outs: list[tuple[ClassResult, np.ndarray | None]] = []

    def collect(found: Any) -> None:
        for out in found:  # in class order, as each class is done (``progress(done, total)``)
            outs.append(out)
            if progress is not None:
                progress(len(outs), len(classes))

    with threadpool_limits(limits=1, user_api="blas"):
        if class_map is not None:
            work = ClassWork(cfg, rule, medians, transfer)
            pairs = list(zip(classes.tolist(), jobs, strict=True))
            for result, class_scores, cap in class_map(work, features, pairs):
                capped.extend(cap)
                collect([(result, class_scores)])
        elif workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                collect(pool.map(one, classes, jobs))
        else:
            collect(one(c, idx) for c, idx in zip(classes, jobs, strict=True))
    results: list[ClassResult] = []
    for idx, (result, class_scores) in zip(jobs, outs, strict=True):
        results.append(result)
        if class_scores is not None:
            scores[idx] = class_scores
    notes = []
    if len(classes) == 1 and "transfer" in rule:
        notes.append(
            "the data holds one class only: the transfer test needs samples of other classes "
            "to stamp, so no cluster could be confirmed"
        )
    if capped:
        notes.append(
            f"FastICA stopped at its iteration cap ({cfg.ica_max_iter}) without converging in "
            f"{len(capped)} class(es); its clusters were still used, beside PCA's"
        )
    settings = cfg.as_dict()
    settings["rule_applied"] = list(rule)
    report = Report(
        tool_version=__version__,
        settings=settings,
        classes=results,
        flagged_indices=np.zeros(0, dtype=np.int64),
        scores=scores,
        data={"n_samples": n, "n_classes": len(classes)},
        timings={"detect": time.perf_counter() - t0},
        notes=notes,
    )
    report.flag_members()
    return report


def _n_jobs(n_jobs: int) -> int:
    """Threads for the per-class work: ``n_jobs``, or every core this process may run on when
    it is 0 or less."""
    if n_jobs > 0:
        return n_jobs
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # not on Linux
        return max(os.cpu_count() or 1, 1)


def _detect_class(
    c: int,
    idx: np.ndarray,
    f: np.ndarray,
    cfg: DetectConfig,
    rule: tuple[str, ...],
    medians: dict[int, np.ndarray],
    transfer: TransferTest | None,
    capped: list[str] | None = None,
) -> tuple[ClassResult, np.ndarray | None]:
    """One class's verdict, and its samples' membership scores (None when skipped)."""
    if len(idx) < max(cfg.min_class_size, 3):
        return ClassResult(
            c,
            len(idx),
            "skipped",
            reason=f"{len(idx)} samples, fewer than the {cfg.min_class_size} needed",
        ), None
    seed = cfg.seed + c
    cands = _candidates(f, cfg, seed, capped)
    if not cands:  # every sample of the class has the same activations
        return ClassResult(
            c,
            len(idx),
            "skipped",
            reason=f"all {len(idx)} samples have identical activations; nothing to cluster",
        ), None
    # The model is asked about every cluster that the cheaper analyses leave in the running.
    cheap = tuple(a for a in rule if a != "transfer")
    for cand in cands:
        if "distance" in rule:
            cand.distance, cand.nearest = _distance(f, cand.members, medians, c)
        pre = _votes(cand, cfg, cheap)
        if transfer is not None and "transfer" in rule and all(pre.values()):
            found = transfer(idx[cand.members], c, seed)
            cand.transfer, cand.source = found.rate, found.source
            cand.trigger, cand.rates = found.trigger, found.rates
            cand.evidence = getattr(found, "evidence", None)
    passing = [cd for cd in cands if all(_votes(cd, cfg, rule).get(a, False) for a in rule)]
    poisoned = bool(passing)
    if passing:
        # Several clusterings may find the poison: among those the model confirms about
        # equally, the best separated is the purest.
        top = max(cd.transfer or 0.0 for cd in passing)
        near_top = [cd for cd in passing if (cd.transfer or 0.0) >= top - TRANSFER_TIE]
        best = max(near_top, key=lambda cd: cd.separation)
    else:
        # Report the most suspicious cluster: the one the model answered most, else small
        # and apart.
        best = max(
            cands,
            key=lambda cd: (
                cd.transfer if cd.transfer is not None else -1.0,
                cd.relative_size < cfg.size_threshold,
                cd.separation,
            ),
        )
    members, fit = best.members, best.fit
    z = fit.z
    refined = False
    trigger = best.trigger if poisoned else None
    if poisoned and cfg.refine and transfer is not None and best.trigger is not None:
        sharp = transfer.trigger(idx[members], seed)
        trigger = best.trigger if sharp is None else sharp
        carried = _carriers(
            transfer.trigger_scores(idx, trigger),
            members,
            exact=bool(getattr(transfer, "tokens", False)),
            max_share=cfg.max_share,
        )
        if carried is not None:
            members, refined = carried, True
    if best.distance is None:
        best.distance, best.nearest = _distance(f, best.members, medians, c)
    votes = _votes(best, cfg)
    # Membership: how much nearer a sample sits to the candidate centre than to the rest.
    d_c = np.linalg.norm(z - z[members].mean(axis=0), axis=1)
    d_r = np.linalg.norm(z - z[~members].mean(axis=0), axis=1)
    membership = np.where(members, d_r / np.maximum(d_c + d_r, 1e-12), 0.0)
    class_scores = np.where(members, np.maximum(membership, MEMBER_SCORE), membership)
    source = None
    if poisoned:
        source = best.source
        if source is None and votes["distance"]:
            source = best.nearest
    sizes = np.bincount(fit.labels, minlength=fit.k)
    return ClassResult(
        label=c,
        n_samples=len(idx),
        verdict="poisoned" if poisoned else "clean",
        cluster_sizes=[int(s) for s in sizes],
        suspicious_cluster=best.cluster,
        clustering=fit.reduction,
        refined=refined,
        relative_size=float(best.relative_size),
        silhouette=fit.silhouette,
        separation=float(best.separation),
        distance_ratio=float(best.distance or 0.0),
        transfer=best.transfer,
        votes=votes,
        n_flagged=int(members.sum()) if poisoned else 0,
        transfer_sources=sorted(
            k for k, v in (best.rates or {}).items() if v >= cfg.transfer_threshold
        )
        if poisoned
        else [],
        suspected_source=source,
        members=idx[members],
        trigger=trigger,
        transfer_rates={int(k): float(v) for k, v in sorted((best.rates or {}).items())},
        evidence=best.evidence,
        projection=class_projection(z, fit.labels, idx, seed, best.members),
    ), class_scores


def _carriers(
    scores: np.ndarray, members: np.ndarray, *, exact: bool = False, max_share: float = 1.0
) -> np.ndarray | None:
    """The samples that carry a confirmed trigger about as fully as the cluster's samples do.

    Clusters in activation space can be impure; the trigger itself is sharper evidence. A
    sample carries it when its score reaches the cluster's median less four robust standard
    deviations (and at least half the trigger). The result is kept only where it mostly agrees
    with the cluster (Jaccard >= 0.5); otherwise the cluster stands. A token trigger is
    ``exact`` (a sample holds the trigger's tokens or not): there the carriers are kept when
    most of the cluster carries it and they are at most ``max_share`` of the class, so that a
    small, pure cluster (a few of the poisoned sentences) grows to every sentence with the
    trigger rather than standing alone.
    """
    inside = scores[members]
    median = float(np.median(inside))
    mad = float(np.median(np.abs(inside - median))) * 1.4826
    carriers = scores >= max(CARRIER_MIN, median - CARRIER_MADS * mad)
    if not carriers.any() or carriers.all():
        return None
    shared = (carriers & members).sum()
    if exact:
        cover = shared / max(members.sum(), 1)
        return carriers if cover >= CARRIER_JACCARD and carriers.mean() <= max_share else None
    jaccard = shared / max((carriers | members).sum(), 1)
    return None if jaccard < CARRIER_JACCARD else carriers


def _distance(
    f: np.ndarray, members: np.ndarray, medians: dict[int, np.ndarray], label: int
) -> tuple[float, int | None]:
    """Distance of a cluster's median to its class's rest over that to the nearest other class."""
    cand_median = column_medians(f, members)
    d_own = float(np.linalg.norm(cand_median - column_medians(f, ~members)))
    others = {k: float(np.linalg.norm(cand_median - m)) for k, m in medians.items() if k != label}
    if not others:
        return 0.0, None
    nearest = min(others, key=others.__getitem__)
    return (d_own / others[nearest] if others[nearest] > 0 else 0.0), nearest
