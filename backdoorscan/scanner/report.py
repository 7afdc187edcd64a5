"""The scan report: one dataclass, rendered as a short text summary or as JSON, written atomically.

Exit codes follow model scanners: 0 nothing found, 1 backdoor found, 2 error, 3 nothing
scanned, 4 usage error.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
# A trigger with more values than this is not written to JSON (a 64x64 colour image fits).
TRIGGER_MAX_VALUES = 16384
# Points of a class's 2-D projection kept for the HTML report's plot.
PROJECTION_POINTS = 500
EXIT_CLEAN, EXIT_FOUND, EXIT_ERROR, EXIT_NOTHING, EXIT_USAGE = 0, 1, 2, 3, 4


@dataclass
class ClassResult:
    """What the analyses found in one class; ``verdict``: ``poisoned``, ``clean``, ``skipped``."""

    label: int
    n_samples: int
    verdict: str
    reason: str = ""
    cluster_sizes: list[int] = field(default_factory=list)
    suspicious_cluster: int | None = None
    clustering: str = ""
    refined: bool = False
    relative_size: float | None = None
    silhouette: float | None = None
    separation: float | None = None
    distance_ratio: float | None = None
    transfer: float | None = None
    transfer_sources: list[int] = field(default_factory=list)
    votes: dict[str, bool] = field(default_factory=dict)
    n_flagged: int = 0
    suspected_source: int | None = None
    # ExRe's outcome per method ("full", "probe") and the method whose outcome counted.
    exre: dict[str, ExreOutcome] | None = None
    exre_decided_by: str | None = None
    # Sample indices (into the data set) of the suspicious cluster: the flagged samples of a
    # poisoned class, the candidate's members otherwise. ExRe and repair read them here.
    members: np.ndarray | None = field(default=None, repr=False, compare=False)
    # The trigger the transfer test estimated for a poisoned class (repair stamps held-out
    # samples with it to measure the attack). JSON holds the members of a poisoned class
    # only (``flagged_indices``) and the trigger only up to TRIGGER_MAX_VALUES values.
    trigger: Any = field(default=None, repr=False, compare=False)
    # The transfer test's rate per stamped class for the reported cluster (empty when the
    # model was not asked about it).
    transfer_rates: dict[int, float] = field(default_factory=dict)
    # The first two reduced dimensions of the reported clustering, for the HTML report's plot:
    # ``x``, ``y``, the k-means ``cluster`` and the sample ``index`` of at most
    # PROJECTION_POINTS seeded samples of the class.
    projection: dict[str, list[Any]] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures of the class (a clean class's indices left out)."""
        out = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("members", "trigger", "exre", "transfer_rates", "projection")
        }
        out["transfer_rates"] = {str(k): v for k, v in self.transfer_rates.items()}
        if self.exre is not None:
            out["exre"] = {m: asdict(o) for m, o in self.exre.items()}
            if self.exre_decided_by:
                out["exre"]["decided_by"] = self.exre_decided_by
        out.pop("exre_decided_by")
        if self.verdict == "poisoned" and self.members is not None:
            out["flagged_indices"] = [int(i) for i in self.members]
        trig = _trigger_dict(self.trigger)
        if trig is not None:
            out["trigger"] = trig
        if self.projection is not None:
            out["projection"] = self.projection
        return _clean(out)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassResult:
        """A class result from its JSON form (``to_dict``)."""
        names = {f.name for f in fields(cls)} - {"members", "trigger", "exre", "transfer_rates"}
        out = cls(**{k: v for k, v in d.items() if k in names})
        out.transfer_rates = {int(k): v for k, v in (d.get("transfer_rates") or {}).items()}
        if d.get("exre"):
            exre = dict(d["exre"])
            out.exre_decided_by = exre.pop("decided_by", None)
            out.exre = {m: ExreOutcome(**o) for m, o in exre.items()}
        if "flagged_indices" in d:
            out.members = np.asarray(d["flagged_indices"], dtype=np.int64)
        if d.get("trigger"):
            out.trigger = _trigger_from_dict(d["trigger"])
        return out


@dataclass
class ExreOutcome:
    """What the classifier that never saw a cluster called it: ``own_share`` of the cluster
    predicted as its own label, ``source`` the other class predicted most (``source_share``),
    ``ratio`` = own / source share; ``verdict``: ``poison``, ``legitimate`` or
    ``inconclusive``."""

    n: int
    own_share: float
    source: int | None
    source_share: float
    ratio: float
    verdict: str


@dataclass
class ExreResult:
    """Exclusionary reclassification as run on one scan: which methods, on which clusters,
    what each method did (``runs``), and the per-sample predictions of ExRe 'full' (-1 where
    not asked; repair relabels with them; not written to JSON)."""

    methods: list[str]
    threshold: float
    include_unflagged: bool
    max_share: float
    clusters: dict[int, int]
    not_examined: list[int] = field(default_factory=list)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    predictions: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the per-sample predictions left out)."""
        out: dict[str, Any] = {
            "methods": self.methods,
            "threshold": self.threshold,
            "include_unflagged": self.include_unflagged,
            "max_share": self.max_share,
            "clusters": {str(k): v for k, v in self.clusters.items()},
        }
        if self.not_examined:
            out["not_examined"] = self.not_examined
        out.update(self.runs)
        return _clean(out)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExreResult:
        """The summary back from its JSON form (without the per-sample predictions)."""
        known = ("methods", "threshold", "include_unflagged", "max_share", "clusters")
        return cls(
            methods=list(d["methods"]),
            threshold=d["threshold"],
            include_unflagged=d["include_unflagged"],
            max_share=d["max_share"],
            clusters={int(k): v for k, v in d["clusters"].items()},
            not_examined=list(d.get("not_examined") or []),
            runs={k: v for k, v in d.items() if k not in (*known, "not_examined")},
        )


@dataclass
class RepairResult:
    """What repair did: ``mode`` is ``retrained``, ``failed`` (the budget ran out before the
    attack was gone), ``data`` (a model that cannot be trained here: the cleaned data set was
    written), ``clean`` or ``nothing scanned`` (nothing to do)."""

    strategy: str
    mode: str
    summary: str
    before: dict[str, Any] | None = None
    n_relabelled: int = 0
    n_removed: int = 0
    per_class: dict[int, dict[str, Any]] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    curve: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        """True unless the budget ran out with the attack still working."""
        return self.mode != "failed"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description of the repair."""
        return _clean(asdict(self))


@dataclass
class Report:
    """Everything a scan found and how; every output format renders this one object."""

    tool_version: str
    settings: dict[str, Any]
    classes: list[ClassResult]
    flagged_indices: np.ndarray
    scores: np.ndarray
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    provider: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    exre: ExreResult | None = None
    repair: RepairResult | None = None

    @property
    def poisoned_classes(self) -> list[int]:
        """Labels whose verdict is poisoned."""
        return [c.label for c in self.classes if c.verdict == "poisoned"]

    @property
    def analysed_classes(self) -> list[int]:
        """Labels that were clustered (not skipped)."""
        return [c.label for c in self.classes if c.verdict != "skipped"]

    # Set when the scan could not mean anything (e.g. the model does not fit the labels
    # given): the verdict is then "nothing scanned" whatever the clusters say.
    not_meaningful: str | None = None
    # The training samples as given (before any conversion; a memory map for .npy), for the
    # HTML report's mosaics. Never written to JSON.
    samples: Any = field(default=None, repr=False, compare=False)

    @property
    def verdict(self) -> str:
        """``backdoor``, ``clean``, or ``nothing scanned`` when no class could be analysed or
        the scan could not mean anything (``not_meaningful`` says why)."""
        if self.not_meaningful:
            return "nothing scanned"
        if self.poisoned_classes:
            return "backdoor"
        return "clean" if self.analysed_classes else "nothing scanned"

    @property
    def exit_code(self) -> int:
        """0 no poison found in the data given, 1 backdoor found, 3 nothing scanned."""
        return {"backdoor": EXIT_FOUND, "clean": EXIT_CLEAN}.get(self.verdict, EXIT_NOTHING)

    def flag_members(self) -> None:
        """Recompute ``flagged_indices`` from the members of the poisoned classes."""
        picked = [
            c.members for c in self.classes if c.verdict == "poisoned" and c.members is not None
        ]
        self.flagged_indices = (
            np.unique(np.concatenate(picked)).astype(np.int64)
            if picked
            else np.zeros(0, dtype=np.int64)
        )

    def is_flagged(self) -> np.ndarray:
        """Boolean mask over the samples: True where flagged as poison."""
        mask = np.zeros(len(self.scores), dtype=bool)
        mask[self.flagged_indices] = True
        return mask

    def to_dict(self, *, include_scores: bool = True) -> dict[str, Any]:
        """A JSON-ready dictionary (the schema of ``--format json``)."""
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "tool": {"name": "backdoorscan", "version": self.tool_version},
            "verdict": self.verdict,
            "poisoned_classes": self.poisoned_classes,
            "model": self.model,
            "data": self.data,
            "settings": self.settings,
            "provider": self.provider,
            "classes": [c.to_dict() for c in self.classes],
            "n_flagged": len(self.flagged_indices),
            "flagged_indices": [int(i) for i in self.flagged_indices],
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "notes": self.notes,
        }
        if self.not_meaningful:
            out["not_meaningful"] = self.not_meaningful
        if self.exre is not None:
            out["exre"] = self.exre.to_dict()
        if self.repair is not None:
            out["repair"] = self.repair.to_dict()
        if include_scores:
            out["scores"] = [round(float(s), 6) for s in self.scores]
        return out

    def to_json(self, *, include_scores: bool = True) -> str:
        """The report as indented JSON text."""
        return json.dumps(self.to_dict(include_scores=include_scores), indent=2) + "\n"

    def to_text(self) -> str:
        """A short human summary: verdict first, then one line per class that matters."""
        lines = []
        n = len(self.scores)
        if self.verdict == "backdoor":
            lines.append(
                f"BACKDOOR SUSPECTED in class(es) {', '.join(map(str, self.poisoned_classes))}: "
                f"{len(self.flagged_indices)} of {n} samples flagged as poison"
            )
        elif self.verdict == "clean":
            lines.append(
                f"No poison found in the {n} training samples given "
                f"({len(self.analysed_classes)} classes)"
            )
        elif self.not_meaningful:
            lines.append(f"Nothing meaningful scanned: {self.not_meaningful}")
        else:
            lines.append("Nothing scanned: no class had enough samples to cluster")
        lines.extend(f"  {line}" for line in _evidence_lines(self))
        if self.model.get("path"):
            lines.append(f"  model  {self.model['path']}  (layer {self.model.get('layer')})")
        if self.data.get("path"):
            lines.append(f"  data   {self.data['path']}  ({n} samples)")
        lines.append(
            f"  method {self.settings.get('reduce')}->{self.settings.get('n_components')} dims, "
            f"k-means k={self.settings.get('n_clusters')}, seed {self.settings.get('seed')}"
            + (f", on {self.provider}" if self.provider else "")
        )
        lines.append("")
        lines.append(
            "  class      n  verdict    cluster share  sep.  silh.  dist.  transfer  source"
        )
        for c in self.classes:
            size = (
                c.cluster_sizes[c.suspicious_cluster] if c.suspicious_cluster is not None else None
            )
            lines.append(
                f"  {c.label:>5} {c.n_samples:>6}  {c.verdict:<9} "
                f"{_fmt(size, 'd', 7)} {_fmt(c.relative_size, '.2f', 5)} "
                f"{_fmt(c.separation, '.1f', 5)} {_fmt(c.silhouette, '.2f', 6)} "
                f"{_fmt(c.distance_ratio, '.2f', 6)} {_fmt(c.transfer, '.2f', 9)} "
                f"{_fmt(c.suspected_source, 'd', 7)}" + (f"  ({c.reason})" if c.reason else "")
            )
        lines.extend(_exre_lines(self))
        lines.extend(_repair_lines(self.repair))
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.timings:
            shown = ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items())
            lines.append(f"  time: {shown}")
        return "\n".join(lines) + "\n"

    def render(self, fmt: str, **options: Any) -> str:
        """Render as ``text``, ``json``, ``sarif`` or ``html`` (``options`` go to the HTML
        renderer: ``samples``, ``vocab``; see :mod:`backdoorscan.scanner.html`)."""
        if fmt == "json":
            return self.to_json()
        if fmt == "text":
            return self.to_text()
        if fmt == "sarif":
            from backdoorscan.scanner.sarif import to_sarif

            return json.dumps(to_sarif(self), indent=2) + "\n"
        if fmt == "html":
            from backdoorscan.scanner.html import to_html

            return to_html(self, **options)
        raise ValueError(f"unknown format {fmt!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        """A report loaded from its JSON form (``to_dict``), e.g. to render it again.

        Derived figures (verdict, poisoned classes) are recomputed; the samples are not in
        JSON (``samples`` is None), nor ExRe's per-sample predictions."""
        n = len(d.get("scores") or [])
        report = cls(
            tool_version=str((d.get("tool") or {}).get("version", "")),
            settings=dict(d.get("settings") or {}),
            classes=[ClassResult.from_dict(c) for c in d.get("classes") or []],
            flagged_indices=np.asarray(d.get("flagged_indices") or [], dtype=np.int64),
            scores=np.asarray(d.get("scores") or np.zeros(n), dtype=np.float64),
            model=dict(d.get("model") or {}),
            data=dict(d.get("data") or {}),
            provider=d.get("provider"),
            timings=dict(d.get("timings_s") or {}),
            notes=list(d.get("notes") or []),
            schema_version=int(d.get("schema_version", SCHEMA_VERSION)),
        )
        report.not_meaningful = d.get("not_meaningful")
        if d.get("exre"):
            report.exre = ExreResult.from_dict(d["exre"])
        if d.get("repair"):
            report.repair = RepairResult(**d["repair"])
        return report


def _evidence_lines(report: Report) -> list[str]:
    """One line per class where ExRe's answer differs from the verdict, saying which evidence
    decided, so that the ExRe table never reads as a second verdict."""
    lines = []
    rule = report.settings.get("rule_applied") or report.settings.get("rule") or []
    decider = "the transfer test" if "transfer" in rule else "the " + "+".join(rule) + " rule"
    for c in report.classes:
        if not c.exre or not c.exre_decided_by:
            continue
        outcome = c.exre[c.exre_decided_by]
        exre_poison = outcome.verdict == "poison"
        if exre_poison == (c.verdict == "poisoned") or outcome.verdict == "inconclusive":
            continue
        said = "poison" if exre_poison else "legitimate"
        lines.append(
            f"class {c.label}: ExRe {c.exre_decided_by} calls its cluster {said}, but "
            f"{decider} decides: {c.verdict}"
        )
    return lines


def _exre_lines(report: Report) -> list[str]:
    """The exclusionary-reclassification table: one line per class and method."""
    rows = [c for c in report.classes if c.exre]
    if not rows or report.exre is None:
        return []
    info = report.exre
    how = []
    full = info.runs.get("full")
    if full:
        init = "from scratch" if full.get("init") == "scratch" else "from the current weights"
        how.append(
            f"full: retrained {init}, {full.get('epochs')} epoch(s) on {full.get('n_trained')} "
            f"samples without {full.get('n_excluded')}"
        )
    if info.runs.get("probe"):
        how.append(f"probe: {info.runs['probe'].get('classifier')}")
    if info.not_examined:
        how.append(
            f"not examined: the candidates of class(es) "
            f"{', '.join(map(str, info.not_examined))}, over {info.max_share} of them"
        )
    lines = [
        "",
        f"  exclusionary reclassification, evidence beside the verdict ({'; '.join(how)}; "
        f"poison when own/other < {info.threshold})",
        "  class  method      n   own  source  share   ratio  answer",
    ]
    for c in rows:
        for method in ("full", "probe"):
            o = (c.exre or {}).get(method)
            if not o:
                continue
            lines.append(
                f"  {c.label:>5}  {method:<6} {o.n:>6} {_fmt(o.own_share, '.2f', 5)} "
                f"{_fmt(o.source, 'd', 7)} {_fmt(o.source_share, '.2f', 6)} "
                f"{_fmt(o.ratio, '.2f', 7)}  {o.verdict}"
            )
    return lines


def _repair_lines(repair: RepairResult | None) -> list[str]:
    """The repair section: what changed, the scan before, the measured effect, files written."""
    if repair is None:
        return []
    head = "REPAIR FAILED" if repair.mode == "failed" else "repair"
    lines = ["", f"  {head} ({repair.strategy}): {repair.summary}"]
    before = repair.before or {}
    if before:
        flagged = before.get("poisoned_classes") or []
        lines.append(
            f"    scan before: {before.get('verdict')}"
            + (f" in class(es) {', '.join(map(str, flagged))}" if flagged else "")
            + f", {before.get('n_flagged', 0)} samples flagged"
        )
    metrics = repair.metrics
    b, a = metrics.get("before") or {}, metrics.get("after") or {}
    if b or a:
        for key, name in (("clean_accuracy", "clean accuracy"), ("asr", "attack success rate")):
            if key in b or key in a:
                lines.append(
                    f"    {name}: {_fmt(b.get(key), '.4f', 6).strip()} -> "
                    f"{_fmt(a.get(key), '.4f', 6).strip()}"
                    + (f"  ({metrics[key + '_on']})" if metrics.get(key + "_on") else "")
                )
        per_class = a.get("asr_per_class") or {}
        if per_class:
            shown = ", ".join(
                f"{k}: {_fmt(b.get('asr_per_class', {}).get(k), '.3f', 5).strip()} -> "
                f"{_fmt(v, '.3f', 5).strip()}"
                for k, v in per_class.items()
            )
            lines.append(f"    share of triggered samples sent to each flagged class: {shown}")
    elif metrics.get("note"):
        lines.append(f"    {metrics['note']}")
    if repair.curve:
        shown = "; ".join(
            f"epoch {row['epoch']}: acc {_fmt(row.get('clean_accuracy'), '.3f', 5).strip()}, "
            f"asr {_fmt(row.get('asr'), '.3f', 5).strip()}"
            for row in repair.curve
        )
        lines.append(f"    curve: {shown}")
    for path in repair.written:
        lines.append(f"    wrote {path}")
    return lines


def class_projection(
    z: np.ndarray, clusters: np.ndarray, idx: np.ndarray, seed: int, suspicious: np.ndarray
) -> dict[str, list[Any]]:
    """A 2-D view of a class's reduced activations ``z`` (one row per sample ``idx``, k-means
    label ``clusters``) at a seeded sample of at most PROJECTION_POINTS rows: ``x`` along the
    line joining the ``suspicious`` cluster's mean to the rest's (the axis the separation is
    measured on), ``y`` the main direction of what is left; 4 decimals. The first two reduced
    dimensions themselves (ICA's are in no order) often hide a cluster that is far apart."""
    z = np.asarray(z, dtype=np.float64)
    z = z - z.mean(axis=0)
    axes = np.zeros((z.shape[1], 2))
    if suspicious.any() and (~suspicious).any():
        gap = z[suspicious].mean(axis=0) - z[~suspicious].mean(axis=0)
        norm = float(np.linalg.norm(gap))
        axes[:, 0] = gap / norm if norm > 0 else np.eye(z.shape[1])[0]
    else:
        axes[:, 0] = np.eye(z.shape[1])[0]
    rest = z - np.outer(z @ axes[:, 0], axes[:, 0])
    if z.shape[1] > 1:
        _, _, vt = np.linalg.svd(rest, full_matrices=False)
        axes[:, 1] = vt[0] * (1.0 if vt[0][np.argmax(np.abs(vt[0]))] >= 0 else -1.0)
    rows = np.arange(len(z))
    if len(z) > PROJECTION_POINTS:
        rng = np.random.default_rng([seed, len(z), 2])
        rows = np.sort(rng.choice(len(z), size=PROJECTION_POINTS, replace=False))
    xy = z[rows] @ axes
    return {
        "x": [round(float(v), 4) for v in xy[:, 0]],
        "y": [round(float(v), 4) for v in xy[:, 1]],
        "cluster": [int(v) for v in clusters[rows]],
        "index": [int(v) for v in idx[rows]],
    }


def _trigger_dict(trigger: Any) -> dict[str, Any] | None:
    """A trigger's JSON form: its values (flattened), shape and clip range; None when there
    is none or it is larger than TRIGGER_MAX_VALUES."""
    if trigger is None or getattr(trigger, "values", None) is None:
        return None
    values = np.asarray(trigger.values)
    if values.size > TRIGGER_MAX_VALUES:
        return None
    lo, hi = float(getattr(trigger, "lo", -np.inf)), float(getattr(trigger, "hi", np.inf))
    return {
        "tokens": bool(getattr(trigger, "tokens", False)),
        "shape": list(values.shape),
        "values": values.ravel().tolist(),
        "lo": lo if np.isfinite(lo) else None,
        "hi": hi if np.isfinite(hi) else None,
    }


def _trigger_from_dict(d: dict[str, Any]) -> Any:
    """The Trigger back from ``_trigger_dict``'s form."""
    from backdoorscan.scanner.transfer import Trigger

    dtype = np.int64 if d.get("tokens") else np.float32
    values = np.asarray(d["values"], dtype=dtype).reshape(d["shape"])
    lo = -np.inf if d.get("lo") is None else d["lo"]
    hi = np.inf if d.get("hi") is None else d["hi"]
    return Trigger(values, tokens=bool(d.get("tokens")), lo=lo, hi=hi)


def _fmt(value: float | int | None, spec: str, width: int) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-".rjust(width)
    return format(value, spec).rjust(width)


def _clean(value: Any) -> Any:
    """Numpy scalars and non-finite floats made JSON-safe."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return round(value, 6) if np.isfinite(value) else None
    return value
