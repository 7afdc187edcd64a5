"""The text format of a report: the verdict first, then a table of the classes, ExRe's
evidence and the repair (also what ``print(report)`` shows)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from backdoorscan.scanner.report import RepairResult, Report


def summary(report: Report) -> str:
    """A short human summary: verdict first, then one line per class that matters."""
    lines = []
    n = len(report.scores)
    if report.verdict == "backdoor":
        lines.append(
            f"BACKDOOR SUSPECTED in class(es) {', '.join(map(str, report.poisoned_classes))}: "
            f"{len(report.flagged_indices)} of {n} samples flagged as poison"
        )
    elif report.verdict == "clean":
        lines.append(
            f"No poison found in the {n} training samples given "
            f"({len(report.analysed_classes)} classes)"
        )
    elif report.not_meaningful:
        lines.append(f"Nothing meaningful scanned: {report.not_meaningful}")
    else:
        lines.append("Nothing scanned: no class had enough samples to cluster")
    lines.extend(f"  {line}" for line in _evidence_lines(report))
    if report.model.get("path"):
        lines.append(f"  model  {report.model['path']}  (layer {report.model.get('layer')})")
    if report.data.get("path"):
        lines.append(f"  data   {report.data['path']}  ({n} samples)")
    lines.append(
        f"  method {report.settings.get('reduce')}->{report.settings.get('n_components')} dims, "
        f"k-means k={report.settings.get('n_clusters')}, seed {report.settings.get('seed')}"
        + (f", on {report.provider}" if report.provider else "")
    )
    lines.append("")
    lines.append("  class      n  verdict    cluster share  sep.  silh.  dist.  transfer  source")
    for c in report.classes:
        size = c.cluster_sizes[c.suspicious_cluster] if c.suspicious_cluster is not None else None
        lines.append(
            f"  {c.label:>5} {c.n_samples:>6}  {c.verdict:<9} "
            f"{_fmt(size, 'd', 7)} {_fmt(c.relative_size, '.2f', 5)} "
            f"{_fmt(c.separation, '.1f', 5)} {_fmt(c.silhouette, '.2f', 6)} "
            f"{_fmt(c.distance_ratio, '.2f', 6)} {_fmt(c.transfer, '.2f', 9)} "
            f"{_fmt(c.suspected_source, 'd', 7)}" + (f"  ({c.reason})" if c.reason else "")
        )
    lines.extend(_exre_lines(report))
    lines.extend(_repair_lines(report.repair))
    for note in report.notes:
        lines.append(f"  note: {note}")
    if report.timings:
        shown = ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items())
        lines.append(f"  time: {shown}")
    return "\n".join(lines) + "\n"


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


def _fmt(value: float | int | None, spec: str, width: int) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-".rjust(width)
    return format(value, spec).rjust(width)
