"""Exclusionary reclassification (ExRe): ask a classifier that never saw a cluster what it is.

The paper's last check. The suspicious clusters are left out of the training data, a
classifier is fitted on the rest, and each left-out cluster is classified: a legitimate mode
of its class is still recognised as its label; poison (samples of a source class carrying a
trigger) is now called by its source. With ``own`` the share of the cluster predicted as its
own label and ``top`` the largest share predicted as one other class ``C``, the cluster is
poison when ``own / top < threshold``, and ``C`` is its suspected source.

Two ways, both reported with their figures:

- ``full``: a copy of the model is re-initialised and retrained through its adapter
  (``clone``, ``reinitialize``, ``fit``) on the data without the suspicious clusters, as the
  paper does. Retraining from scratch is needed: continuing from the poisoned weights keeps
  the backdoor (measured on poisoned MNIST after one epoch without the poison: 82-98 % of each
  poison cluster still predicted as its poisoned label, attack success 0.90; from scratch:
  0-9 %). Adapters that cannot re-initialise get ``init="continue"`` only when asked.
- ``probe``: a logistic regression fitted on the kept data, no retraining, no framework. By
  default it reads the input sketch that extraction keeps (a seeded random projection of each
  input): it never saw the poison, so a triggered digit looks like its source (measured on
  poisoned MNIST: 10 of 10 poison clusters with their sources). Fitted on the poisoned model's
  activations instead (``probe_space="features"``, the only choice for :func:`detect` on
  arrays), it inherits what that model learned and calls most poison legitimate (3 of 10).
  A linear model of the inputs is a weak classifier: it calls more clean modes poison than
  ``full`` does.

How ExRe combines with the detector (see :func:`combine`): where the transfer test ran it
decides and ExRe is evidence beside it (it never clears nor flags a class by itself);
under a rule without the model (size, separation, ...) ExRe takes the place of the size vote,
so that a poison cluster of about half its class can be confirmed, and a small clean mode that
the size rule would flag is cleared.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from backdoorscan.adapters.base import Adapter, AdapterError, Retrainable
from backdoorscan.scanner.data import Dataset
from backdoorscan.scanner.report import ClassResult, ExreOutcome, ExreResult, Report

__all__ = [
    "EXRE_METHODS",
    "ExreConfig",
    "ExreError",
    "cluster_outcome",
    "combine",
    "exre_full",
    "exre_probe",
    "resolve_method",
    "run_exre",
    "suspicious_clusters",
]

EXRE_METHODS = ("auto", "full", "probe", "both")
INITS = ("scratch", "continue")
PROBE_SPACES = ("auto", "input", "features")
# The retrained model must classify at least this share of what the original model gets right
# on the kept data, or its answers are inconclusive.
UNDERTRAINED = 0.9


class ExreError(ValueError):
    """Exclusionary reclassification cannot run as asked; the message says why."""


@dataclass
class ExreConfig:
    """Settings of exclusionary reclassification.

    ``method``: ``full`` (retrain the model), ``probe`` (classifier on activations), ``both``,
    or ``auto`` (``full`` where the model can be re-initialised and trained, else ``probe``).
    The retraining runs ``epochs`` epochs, more where that gives fewer than ``min_steps``
    optimizer steps (a model trained from scratch for a few steps calls everything one class).
    An unflagged class's candidate holding more than ``max_share`` of its class is not
    examined: without it, the rest of the class is a minority that cannot vouch for it.
    ``probe_space``: ``input`` (the input sketch), ``features`` (the activations), or ``auto``
    (the sketch where the scan kept one).
    """

    method: str = "auto"
    threshold: float = 1.0
    epochs: int = 1
    init: str = "scratch"
    lr: float = 1e-3
    batch_size: int = 128
    include_unflagged: bool = True
    max_share: float = 0.6
    probe_space: str = "auto"
    probe_max_per_class: int = 2000
    min_steps: int = 400
    check_samples: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in EXRE_METHODS:
            raise ExreError(f"ExRe method must be one of {', '.join(EXRE_METHODS)}")
        if self.init not in INITS:
            raise ExreError(f"ExRe init must be one of {', '.join(INITS)}")
        if not self.threshold > 0:
            raise ExreError("the ExRe threshold must be positive")
        if self.epochs < 1:
            raise ExreError("ExRe needs at least one epoch of retraining")
        if self.probe_space not in PROBE_SPACES:
            raise ExreError(f"ExRe probe space must be one of {', '.join(PROBE_SPACES)}")
        if not 0 < self.max_share <= 1:
            raise ExreError("max_share must lie in (0, 1]")


def resolve_method(method: str, adapter: Adapter | None) -> tuple[str, ...]:
    """The ExRe methods to run: ``auto`` takes ``full`` where the model can be retrained."""
    if method == "both":
        return ("full", "probe")
    if method != "auto":
        return (method,)
    if isinstance(adapter, Retrainable) and adapter.can_fit:
        return ("full",)
    return ("probe",)


def suspicious_clusters(
    report: Report,
    labels: np.ndarray,
    *,
    include_unflagged: bool = True,
    max_share: float = 1.0,
) -> dict[int, np.ndarray]:
    """Sample indices of the cluster ExRe examines in each class.

    Poisoned classes: their flagged samples. With ``include_unflagged``, every other analysed
    class: the members of its best candidate (``ClassResult.members``), where they hold at
    most ``max_share`` of the class.
    """
    labels = np.asarray(labels)
    out: dict[int, np.ndarray] = {}
    for c in report.classes:
        if c.verdict == "skipped" or c.suspicious_cluster is None or c.members is None:
            continue
        if c.verdict != "poisoned" and not include_unflagged:
            continue
        members = np.asarray(c.members, dtype=np.int64)
        size = int((labels == c.label).sum())
        if c.verdict != "poisoned" and len(members) > max_share * size:
            continue
        if len(members) and len(members) < size:
            out[c.label] = members
    return out


def cluster_outcome(
    predictions: np.ndarray, label: int, threshold: float, num_classes: int
) -> ExreOutcome:
    """ExRe's figures for one cluster from the predictions of the excluding classifier."""
    n = len(predictions)
    counts = np.bincount(predictions, minlength=max(num_classes, label + 1)).astype(float)
    shares = counts / max(n, 1)
    own = float(shares[label])
    others = shares.copy()
    others[label] = -1.0
    source = int(np.argmax(others))
    top = float(shares[source])
    ratio = own / top if top > 0 else float("inf")
    poison = top > 0 and ratio < threshold
    return ExreOutcome(
        n=int(n),
        own_share=own,
        source=source if top > 0 else None,
        source_share=top,
        ratio=ratio,
        verdict="poison" if poison else "legitimate",
    )


def _predict(adapter: Adapter, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Predicted classes from the adapter's own framework."""
    if len(x) == 0:
        return np.zeros(0, dtype=np.int64)
    logits = np.asarray(adapter.predict_logits(x, batch_size=batch_size))
    return logits.reshape(len(x), -1).argmax(axis=1)


def exre_full(
    adapter: Adapter,
    data: Dataset,
    clusters: dict[int, np.ndarray],
    config: ExreConfig,
    num_classes: int,
) -> tuple[dict[int, ExreOutcome], np.ndarray, dict[str, Any]]:
    """Retrain a copy of the model without every suspicious cluster; classify each cluster.

    Returns per-class outcomes, per-sample predictions (-1 where not asked) and what was done.
    """
    if not adapter.can_fit or not isinstance(adapter, Retrainable):
        raise ExreError(
            f"ExRe 'full' retrains the model, and this {adapter.framework} model cannot be "
            f"trained ({adapter.fit_reason or 'no training support'}); use --exre probe"
        )
    t0 = time.perf_counter()
    twin = adapter.clone()
    if config.init == "scratch":
        try:
            twin.reinitialize(seed=config.seed)
        except AdapterError as exc:
            raise ExreError(f"ExRe 'full' cannot re-initialise the model: {exc}") from None
    n = len(data)
    excluded = np.zeros(n, dtype=bool)
    for idx in clusters.values():
        excluded[idx] = True
    keep = np.flatnonzero(~excluded)
    if len(keep) == 0:
        raise ExreError("ExRe would leave no training data: every sample is suspicious")
    steps_per_epoch = -(-len(keep) // config.batch_size)
    epochs = max(config.epochs, -(-config.min_steps // steps_per_epoch))
    twin.fit(
        data.take(keep),
        data.y[keep],
        epochs=epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
    )
    fit_s = time.perf_counter() - t0
    predictions = np.full(n, -1, dtype=np.int64)
    suspicious = np.flatnonzero(excluded)
    predictions[suspicious] = _predict(twin, data.take(suspicious))
    outcomes = {
        label: cluster_outcome(predictions[idx], label, config.threshold, num_classes)
        for label, idx in clusters.items()
    }
    # A retrained model that has not learned the kept data answers nothing: check it against
    # the original model on a sample of the kept data.
    rng = np.random.default_rng(config.seed)
    check = np.sort(rng.choice(keep, size=min(config.check_samples, len(keep)), replace=False))
    x_check, y_check = data.take(check), data.y[check]
    acc_new = float((_predict(twin, x_check) == y_check).mean())
    acc_old = float((_predict(adapter, x_check) == y_check).mean())
    undertrained = acc_new < UNDERTRAINED * acc_old
    if undertrained:
        for o in outcomes.values():
            o.verdict = "inconclusive"
    info = {
        "init": config.init,
        "epochs": epochs,
        "kept_accuracy": round(acc_new, 4),
        "kept_accuracy_original": round(acc_old, 4),
        "undertrained": undertrained,
        "lr": config.lr,
        "batch_size": config.batch_size,
        "n_trained": len(keep),
        "n_excluded": int(excluded.sum()),
        "time_s": round(time.perf_counter() - t0, 3),
        "fit_s": round(fit_s, 3),
    }
    return outcomes, predictions, info


def exre_probe(
    features: np.ndarray,
    labels: np.ndarray,
    clusters: dict[int, np.ndarray],
    config: ExreConfig,
    num_classes: int,
    *,
    space: str = "features",
) -> tuple[dict[int, ExreOutcome], np.ndarray, dict[str, Any]]:
    """Fit a logistic regression on the kept samples' ``features`` (activations or the input
    sketch, as ``space`` says); classify each cluster.

    At most ``probe_max_per_class`` kept samples per class are used (seeded draw).
    """
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    features = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    labels = np.asarray(labels)
    excluded = np.zeros(len(labels), dtype=bool)
    for idx in clusters.values():
        excluded[idx] = True
    rng = np.random.default_rng(config.seed)
    picks = []
    for c in np.unique(labels[~excluded]):
        members = np.flatnonzero(~excluded & (labels == c))
        if len(members) > config.probe_max_per_class:
            members = rng.choice(members, size=config.probe_max_per_class, replace=False)
        picks.append(members)
    train = np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)
    predictions = np.full(len(labels), -1, dtype=np.int64)
    suspicious = np.flatnonzero(excluded)
    classes = np.unique(labels[train]) if len(train) else np.zeros(0, dtype=np.int64)
    if len(classes) < 2:
        raise ExreError("ExRe probe needs kept samples of at least two classes")
    mean = features[train].mean(axis=0)
    std = features[train].std(axis=0) + 1e-6
    clf = LogisticRegression(max_iter=300, C=1.0, random_state=config.seed)
    clf.fit((features[train] - mean) / std, labels[train])
    predictions[suspicious] = clf.predict((features[suspicious] - mean) / std)
    outcomes = {
        label: cluster_outcome(predictions[idx], label, config.threshold, num_classes)
        for label, idx in clusters.items()
    }
    info = {
        "n_trained": len(train),
        "n_excluded": int(excluded.sum()),
        "space": space,
        "classifier": "logistic regression on the standardised "
        + ("input sketch" if space == "input" else "activations"),
        "time_s": round(time.perf_counter() - t0, 3),
    }
    return outcomes, predictions, info


def run_exre(
    report: Report,
    config: ExreConfig,
    *,
    labels: np.ndarray,
    features: np.ndarray | None = None,
    sketch: np.ndarray | None = None,
    adapter: Adapter | None = None,
    data: Dataset | None = None,
    num_classes: int | None = None,
) -> ExreResult:
    """Run ExRe as configured on the report's suspicious clusters and fold the outcome in.

    ``full`` needs ``adapter`` and ``data`` (converted for the model); ``probe`` needs the
    input ``sketch`` or the ``features``. The report's class verdicts and ``exre`` are updated
    in place; the result (also ``report.exre``) is returned.
    """
    methods = resolve_method(config.method, adapter)
    labels = np.asarray(labels)
    k = int(num_classes or (int(labels.max()) + 1))
    clusters = suspicious_clusters(
        report, labels, include_unflagged=config.include_unflagged, max_share=config.max_share
    )
    result = ExreResult(
        methods=list(methods),
        threshold=config.threshold,
        include_unflagged=config.include_unflagged,
        max_share=config.max_share,
        clusters={int(c): len(idx) for c, idx in clusters.items()},
        not_examined=[
            c.label
            for c in report.classes
            if c.verdict == "clean" and config.include_unflagged and c.label not in clusters
        ],
    )
    if config.method == "auto" and methods == ("probe",):
        report.notes.append(
            "ExRe ran as 'probe': this model cannot be re-initialised and retrained here"
        )
    outcomes: dict[str, dict[int, ExreOutcome]] = {}
    for method in methods:
        if not clusters:
            break
        if method == "full":
            if adapter is None or data is None:
                raise ExreError("ExRe 'full' needs the model and its training data")
            found, preds, info = exre_full(adapter, data, clusters, config, k)
            result.predictions = preds
        else:
            space = config.probe_space
            if space == "auto":
                space = "input" if sketch is not None else "features"
            source = sketch if space == "input" else features
            if source is None:
                raise ExreError(
                    "ExRe 'probe' needs the "
                    + ("input sketch of a scan" if space == "input" else "activations")
                )
            found, preds, info = exre_probe(source, labels, clusters, config, k, space=space)
        outcomes[method] = found
        result.runs[method] = info
        if info.get("undertrained"):
            report.notes.append(
                f"ExRe full is inconclusive: the model retrained without the suspicious clusters "
                f"classifies {info['kept_accuracy']:.0%} of the kept data correctly (the original "
                f"{info['kept_accuracy_original']:.0%}); raise --exre-epochs"
            )
        report.timings[f"exre_{method}"] = float(info["time_s"])
    report.exre = result
    combine(report, outcomes, config, labels)
    return result


def combine(
    report: Report,
    results: dict[str, dict[int, ExreOutcome]],
    config: ExreConfig,
    labels: np.ndarray,
) -> None:
    """Fold ExRe outcomes into the class verdicts (in place); see the module docstring.

    The deciding outcome is ``full`` where it ran, else ``probe``. Where the transfer test ran,
    the verdict stays the detector's and disagreements are noted; under a rule without the
    model, ExRe replaces the size vote.
    """
    rule = tuple(report.settings.get("rule_applied") or report.settings.get("rule") or ())
    for c in report.classes:
        per_method = {m: r[c.label] for m, r in results.items() if c.label in r}
        if not per_method:
            continue
        c.exre = dict(per_method)
        conclusive = [m for m in ("full", "probe") if m in per_method]
        conclusive = [m for m in conclusive if per_method[m].verdict != "inconclusive"]
        if not conclusive:
            c.reason = _join(c.reason, "ExRe inconclusive: the retrained model is undertrained")
            continue
        decider = conclusive[0]
        outcome = per_method[decider]
        poison = outcome.verdict == "poison"
        c.exre_decided_by = decider
        c.votes["exre"] = poison
        detector_source = c.suspected_source
        if "transfer" in rule:
            # The transfer test decides; ExRe is evidence beside it, never a verdict by itself.
            if c.verdict == "poisoned" and poison:
                _set_source(c, outcome, detector_source)
                c.reason = _join(c.reason, f"confirmed by ExRe {decider}")
            elif c.verdict == "poisoned":
                c.reason = _join(
                    c.reason,
                    f"ExRe {decider} disagrees (own share {outcome.own_share:.2f}); "
                    "the transfer test decides",
                )
            elif poison:
                c.reason = _join(
                    c.reason,
                    f"ExRe {decider} calls the candidate poison but the transfer test does not",
                )
            continue
        # Without the model's transfer test, ExRe takes the place of the size vote.
        poisoned = poison and all(c.votes.get(a, False) for a in rule if a != "size")
        if poisoned and c.verdict != "poisoned":
            c.verdict = "poisoned"
            c.n_flagged = len(c.members) if c.members is not None else 0
            c.reason = _join(c.reason, f"flagged by ExRe {decider} in place of the size rule")
        elif not poisoned and c.verdict == "poisoned":
            c.verdict, c.n_flagged, c.suspected_source = "clean", 0, None
            c.reason = _join(c.reason, f"cleared by ExRe {decider}")
        if poisoned:
            _set_source(c, outcome, detector_source)
    report.flag_members()


def _set_source(c: ClassResult, outcome: ExreOutcome, detector_source: int | None) -> None:
    """Keep the transfer test's source where it named one (it stamps each class in turn); a
    retrained model's answer for triggered samples can be pulled by the trigger itself."""
    if detector_source is None or c.transfer is None:
        c.suspected_source = outcome.source
    elif outcome.source is not None and outcome.source != detector_source:
        c.reason = _join(
            c.reason, f"ExRe names source {outcome.source}, the transfer test {detector_source}"
        )


def _join(reason: str, extra: str) -> str:
    return f"{reason}; {extra}" if reason else extra
