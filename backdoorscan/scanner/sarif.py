"""The report as SARIF 2.1.0, the format CI code-scanning tools read.

One run; one result per poisoned class (rule ``backdoorscan/poisoned-class``, level
``error``) located at the data file, with the model as a related location; a scan that could
not mean anything gives one ``backdoorscan/nothing-scanned`` warning; a clean scan gives no
result. The data and model files are listed as artifacts with their sha256; the figures and
flagged indices of each class go in the result's ``properties``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from backdoorscan.scanner.report import ClassResult, Report

__all__ = ["RULES", "SARIF_SCHEMA", "SARIF_VERSION", "to_sarif"]

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
POISONED, NOTHING = "backdoorscan/poisoned-class", "backdoorscan/nothing-scanned"

RULES: list[dict[str, Any]] = [
    {
        "id": POISONED,
        "name": "PoisonedClass",
        "shortDescription": {"text": "Training data of a class holds backdoor poison"},
        "fullDescription": {
            "text": "Activation Clustering found a cluster of this class's training samples "
            "whose shared perturbation, stamped on samples of other classes, makes the model "
            "predict this class: the signature of a backdoor trigger planted by data "
            "poisoning."
        },
        "help": {
            "text": "Inspect the flagged samples (their indices are in the result's "
            "properties; `backdoorscan scan --format html` draws them), remove or relabel "
            "them and retrain (`backdoorscan repair`)."
        },
        "defaultConfiguration": {"level": "error"},
        "properties": {
            "tags": ["security", "backdoor", "data-poisoning"],
            "security-severity": "8.0",
        },
    },
    {
        "id": NOTHING,
        "name": "NothingScanned",
        "shortDescription": {"text": "The scan could not examine the data"},
        "fullDescription": {
            "text": "No class had enough samples to cluster, or the model does not fit the "
            "labels given: the scan says nothing about poison either way."
        },
        "help": {"text": "Check that the data is the model's training data, with its labels."},
        "defaultConfiguration": {"level": "warning"},
    },
]


def to_sarif(report: Report) -> dict[str, Any]:
    """The SARIF 2.1.0 log of one scan, as a JSON-ready dictionary."""
    artifacts, data_loc, model_loc = _artifacts(report)
    results = [_poisoned(report, c, data_loc, model_loc) for c in report.classes
               if c.verdict == "poisoned"]  # fmt: skip
    if report.verdict == "nothing scanned":
        text = report.not_meaningful or "no class had enough samples to cluster"
        results.append(
            {
                "ruleId": NOTHING,
                "ruleIndex": 1,
                "level": "warning",
                "message": {"text": f"Nothing scanned: {text}."},
                "locations": [data_loc],
            }
        )
    run: dict[str, Any] = {
        "tool": {
            "driver": {
                "name": "backdoorscan",
                "version": report.tool_version,
                "semanticVersion": report.tool_version,
                "rules": RULES,
            }
        },
        "artifacts": artifacts,
        "invocations": [_invocation(report)],
        "results": results,
        "properties": {
            "verdict": report.verdict,
            "poisoned_classes": report.poisoned_classes,
            "n_samples": len(report.scores),
            "n_flagged": len(report.flagged_indices),
            "provider": report.provider,
            "settings": report.settings,
        },
    }
    if report.notes:
        run["invocations"][0]["toolExecutionNotifications"] = [
            {"level": "note", "message": {"text": note}} for note in report.notes
        ]
    return {"$schema": SARIF_SCHEMA, "version": SARIF_VERSION, "runs": [run]}


def _invocation(report: Report) -> dict[str, Any]:
    """The run's invocation: success, when the report was made and the command line."""
    out: dict[str, Any] = {"executionSuccessful": True}
    if report.created_utc:
        out["endTimeUtc"] = report.created_utc
    if report.command:
        out["commandLine"] = report.command
    return out


def _poisoned(
    report: Report, c: ClassResult, data_loc: dict[str, Any], model_loc: dict[str, Any] | None
) -> dict[str, Any]:
    source = f"class {c.suspected_source}" if c.suspected_source is not None else "unknown"
    transfer = f"{c.transfer:.0%}" if c.transfer is not None else "not measured"
    text = (
        f"Class {c.label} holds backdoor poison: {c.n_flagged} of its {c.n_samples} training "
        f"samples flagged; stamped with their shared perturbation, up to {transfer} of another "
        f"class's samples are classified as {c.label}; suspected source: {source}."
    )
    members = [int(i) for i in c.members] if c.members is not None else []
    result: dict[str, Any] = {
        "ruleId": POISONED,
        "ruleIndex": 0,
        "level": "error",
        "message": {"text": text},
        "locations": [data_loc],
        "partialFingerprints": {
            "backdoorscan/class/v1": f"{report.data.get('sha256', '')}:{c.label}"
        },
        "properties": {
            "class": c.label,
            "n_samples": c.n_samples,
            "n_flagged": c.n_flagged,
            "flagged_indices": members,
            "suspected_source": c.suspected_source,
            "transfer": c.transfer,
            "transfer_rates": {str(k): v for k, v in c.transfer_rates.items()},
            "clustering": c.clustering,
            "relative_size": c.relative_size,
            "separation": c.separation,
            "silhouette": c.silhouette,
        },
    }
    if model_loc is not None:
        related = {"id": 1, **model_loc, "message": {"text": "the model trained on this data"}}
        result["relatedLocations"] = [related]
    return result


def _artifacts(
    report: Report,
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any] | None]:
    """The artifacts (data first, then the model when it came from a file) and a location for
    each."""
    artifacts: list[dict[str, Any]] = []
    locs: list[dict[str, Any] | None] = []
    for info, fallback, role in (
        (report.data, report.data.get("source") or "<arrays>", "analysisTarget"),
        (report.model, None, "analysisTarget"),
    ):
        path = info.get("path") or fallback
        if path is None:
            locs.append(None)
            continue
        art: dict[str, Any] = {"location": {"uri": file_uri(str(path))}, "roles": [role]}
        if info.get("sha256"):
            art["hashes"] = {"sha-256": info["sha256"]}
        artifacts.append(art)
        where = {"uri": art["location"]["uri"], "index": len(artifacts) - 1}
        locs.append({"physicalLocation": {"artifactLocation": where}})
    data_loc, model_loc = locs
    assert data_loc is not None
    return artifacts, data_loc, model_loc


def file_uri(path: str) -> str:
    """A URI reference for a path: ``file://`` for an absolute path, a percent-encoded
    relative reference otherwise (SARIF consumers resolve it against the checkout)."""
    p = Path(path)
    if p.is_absolute():
        return p.as_uri()
    return quote(p.as_posix(), safe="/")
