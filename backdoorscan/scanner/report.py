"""The scan report: one dataclass, rendered as a short text summary or as JSON, written atomically.

Exit codes follow model scanners: 0 nothing found, 1 backdoor found, 2 error, 3 nothing
scanned, 4 usage error.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

SCHEMA_VERSION = 2
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
    # The calibrated transfer test's evidence for the reported cluster (``transfer_null``):
    # its rate on the source class against norm-matched non-triggers, effect, p, passed.
    evidence: dict[str, Any] | None = None
    # The first two reduced dimensions of the reported clustering, for the HTML report's plot:
    # ``x``, ``y``, the k-means ``cluster`` and the sample ``index`` of at most
    # PROJECTION_POINTS seeded samples of the class.
    projection: dict[str, list[Any]] | None = field(default=None, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        # Figures are plain Python numbers: numpy scalars are converted as they are set.
        if name not in ("members", "trigger", "exre", "projection"):
            value = _plain(value)
        object.__setattr__(self, name, value)

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
    # When the report was made (UTC, ISO 8601) and the command line that made it (the CLI
    # sets it; None from the Python API).
    created_utc: str | None = field(default_factory=lambda: utc_now())
    command: str | None = None

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
            "invocation": {"created_utc": self.created_utc, "command": self.command},
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
        """A short human summary: verdict first, then one line per class that matters (the
        text format; ``str(report)`` and ``print(report)`` give it too)."""
        from backdoorscan.scanner.report_text import summary

        return summary(self)

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        n, flagged = len(self.scores), len(self.flagged_indices)
        return (
            f"<Report {self.verdict}: poisoned classes {self.poisoned_classes}, {flagged} of {n} "
            f"samples flagged, {len(self.classes)} classes>"
        )

    def to_dataframe(self) -> Any:
        """One row per class (index ``class``) with its verdict and figures, as a pandas
        DataFrame; pandas is needed (``pip install pandas``), imported here only."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(
                "Report.to_dataframe needs pandas, which is not installed: pip install pandas"
            ) from None
        rows = []
        for c in self.classes:
            size = (
                c.cluster_sizes[c.suspicious_cluster] if c.suspicious_cluster is not None else None
            )
            rows.append(
                {
                    "class": c.label, "n_samples": c.n_samples, "verdict": c.verdict,
                    "suspicious_size": size, "relative_size": c.relative_size,
                    "separation": c.separation, "silhouette": c.silhouette,
                    "distance_ratio": c.distance_ratio, "transfer": c.transfer,
                    "suspected_source": c.suspected_source, "n_flagged": c.n_flagged,
                    "clustering": c.clustering, "cluster_sizes": list(c.cluster_sizes),
                    "reason": c.reason,
                }
            )  # fmt: skip
        df = pd.DataFrame(rows, columns=list(rows[0]) if rows else ["class"])
        for col in ("suspicious_size", "suspected_source"):
            if col in df:
                df[col] = df[col].astype("Int64")
        for col in ("relative_size", "separation", "silhouette", "distance_ratio", "transfer"):
            if col in df:
                df[col] = df[col].astype("float64")
        return df.set_index("class")

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
            schema_version=SCHEMA_VERSION,  # an older report is read into the current shape
        )
        report.not_meaningful = d.get("not_meaningful")
        invocation = d.get("invocation") or {}
        report.created_utc = invocation.get("created_utc")
        report.command = invocation.get("command")
        if d.get("exre"):
            report.exre = ExreResult.from_dict(d["exre"])
        if d.get("repair"):
            report.repair = RepairResult(**d["repair"])
        return report


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


def _plain(value: Any) -> Any:
    """Numpy scalars, also inside lists and dicts, as plain Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


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


def utc_now() -> str:
    """The time now in UTC, ISO 8601 to the second (``2026-01-31T12:00:00Z``)."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
