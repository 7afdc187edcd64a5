"""What each step of a scan decided, as log lines (standard :mod:`logging`, loggers under
``backdoorscan.``; ``--verbose`` shows them on stderr): the layer and provider, each class's
decision, the transfer test's outcome, ExRe's answer, each repair epoch.

Nothing is logged at INFO unless the application asks for it (``logging.basicConfig`` in a
script, ``--verbose`` on the command line): the library adds no handler of its own.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backdoorscan.scanner.report import ClassResult, Report

__all__ = ["class_decision", "log_epoch", "log_scan", "set_verbose", "show_status", "status"]

PIPELINE = logging.getLogger("backdoorscan.scanner.pipeline")
DETECT = logging.getLogger("backdoorscan.scanner.detect")
TRANSFER = logging.getLogger("backdoorscan.scanner.transfer")
EXRE = logging.getLogger("backdoorscan.scanner.exre")
REPAIR = logging.getLogger("backdoorscan.scanner.repair")
# A step that may take a while has begun: one line each (the command line shows them on a
# terminal unless --quiet; see show_status).
PROGRESS = logging.getLogger("backdoorscan.progress")


def status(text: str) -> None:
    """Say that a step which may take a while has begun (``text``, ending in "...")."""
    PROGRESS.info("%s", text)


def log_scan(report: Report) -> None:
    """Log what a finished scan decided: where it looked, then one line per class."""
    if not logging.getLogger("backdoorscan").isEnabledFor(logging.INFO):
        return
    m, d = report.model, report.data
    PIPELINE.info(
        "model %s (%s, %s): clustering layer %r, %s values, %s classes",
        m.get("path") or "in memory", m.get("framework"), m.get("isolation") or "in process",
        m.get("layer"), m.get("feature_dim"), m.get("num_classes"),
    )  # fmt: skip
    agree = d.get("model_agreement")
    PIPELINE.info(
        "extracted %s samples on %s in %.2f s; the model predicts %s of their labels",
        d.get("n_samples", len(report.scores)), report.provider,
        report.timings.get("extract", float("nan")),
        f"{agree:.1%}" if agree is not None else "?",
    )  # fmt: skip
    for c in report.classes:
        DETECT.info("%s", class_decision(c, report.settings))
        if c.transfer_rates:
            TRANSFER.info("%s", _transfer_line(c, report.settings))
        for method, o in (c.exre or {}).items():
            EXRE.info(
                "class %d: ExRe %s calls the cluster %s (%d samples, own %.2f, class %s %.2f)%s",
                c.label, method, o.verdict, o.n, o.own_share, o.source, o.source_share,
                " (decides)" if c.exre_decided_by == method else "",
            )  # fmt: skip
    if report.not_meaningful:
        PIPELINE.info("nothing meaningful scanned: %s", report.not_meaningful)
    PIPELINE.info("verdict: %s (%d samples flagged)", report.verdict, len(report.flagged_indices))


def class_decision(c: ClassResult, settings: dict[str, Any]) -> str:
    """One line: a class's verdict and the figures the rule weighed."""
    if c.verdict == "skipped":
        return f"class {c.label}: skipped ({c.reason or 'not analysed'})"
    head = f"class {c.label}: {c.verdict}, {c.n_samples} samples, {c.clustering}"
    if c.suspicious_cluster is None:
        return head + (f" ({c.reason})" if c.reason else "")
    size = c.cluster_sizes[c.suspicious_cluster]
    parts = [
        f"suspicious cluster {size} ({_f(c.relative_size, '.2f')} of the class, size rule "
        f"< {settings.get('size_threshold')})",
        f"separation {_f(c.separation, '.1f')} (>= {settings.get('separation_threshold')})",
        f"silhouette {_f(c.silhouette, '.2f')}",
    ]
    if c.transfer is not None:
        parts.append(f"transfer {_f(c.transfer, '.2f')} (>= {settings.get('transfer_threshold')})")
    votes = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in c.votes.items())
    if votes:
        parts.append(f"votes: {votes}")
    if c.n_flagged:
        parts.append(f"{c.n_flagged} flagged")
    return head + "; " + "; ".join(parts) + (f" ({c.reason})" if c.reason else "")


def _transfer_line(c: ClassResult, settings: dict[str, Any]) -> str:
    rates = sorted(c.transfer_rates.items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{k}: {v:+.2f}" for k, v in rates[:5])
    thr = settings.get("transfer_threshold")
    top = rates[0] if rates else None
    moved = (
        f"class {top[0]} moved most ({top[1]:.0%} above its own null)"
        if top is not None and top[1] > 0
        else "no class moved"
    )
    return (
        f"class {c.label}: transfer test of its suspicious cluster: {moved}; threshold {thr}; "
        f"share sent to {c.label} less the null, by stamped class: {shown}"
    )


def log_epoch(epoch: int, epochs: int, point: dict[str, Any]) -> None:
    """One line per repair epoch: clean accuracy and attack success after it."""
    REPAIR.info(
        "repair epoch %d/%d: clean accuracy %s, attack success %s",
        epoch, epochs, _f(point.get("clean_accuracy"), ".4f"), _f(point.get("asr"), ".4f"),
    )  # fmt: skip


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a line is logged (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.setStream(sys.stderr)
        super().emit(record)


def set_verbose(on: bool) -> None:
    """``--verbose``: INFO lines of the ``backdoorscan`` loggers on stderr (``on``), or none
    of this function's (off: the handler it added goes, the level is reset)."""
    root = logging.getLogger("backdoorscan")
    for logger in (root, PROGRESS):
        for h in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
            logger.removeHandler(h)
    if on:
        handler = _StderrHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        if not PROGRESS.propagate:  # the terminal's status lines: said once, by this handler
            PROGRESS.addHandler(handler)
    else:
        root.setLevel(logging.NOTSET)


class _TerminalStatus(logging.Handler):
    """The ``backdoorscan.progress`` lines on stderr, only when it is a terminal and the
    command is not ``--quiet`` (nor ``--verbose``, whose own handler prints them)."""

    def __init__(self, enabled: Any) -> None:
        super().__init__(logging.INFO)
        self.enabled = enabled

    def emit(self, record: logging.LogRecord) -> None:
        verbose = any(isinstance(h, _StderrHandler) for h in PROGRESS.handlers)
        if not verbose and self.enabled() and sys.stderr.isatty():
            sys.stderr.write(record.getMessage() + "\n")
            sys.stderr.flush()


def show_status(enabled: Any) -> None:
    """Show the ``backdoorscan.progress`` lines on a terminal while ``enabled()`` is true
    (called at each line); once per process, later calls replace the condition."""
    for h in PROGRESS.handlers:
        if isinstance(h, _TerminalStatus):
            h.enabled = enabled
            return
    PROGRESS.addHandler(_TerminalStatus(enabled))
    PROGRESS.setLevel(logging.INFO)
    PROGRESS.propagate = False  # its INFO lines reach no other handler (--verbose adds one)
