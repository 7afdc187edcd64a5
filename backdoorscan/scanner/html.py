"""The HTML report: one self-contained file a reviewer opens offline.

Verdict first; then the model, data, settings, provider and timings; one table of every class;
per analysed class a 2-D projection of its activations coloured by cluster; for a flagged
class the samples of the suspicious cluster beside samples of the rest of the class, the
estimated trigger, the transfer evidence and the flagged samples ranked by score.

Figures are PNGs drawn with matplotlib (``pip install "backdoorscan[report]"``) and embedded
as ``data:`` URIs: the file loads nothing, runs no script and fetches nothing.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from backdoorscan.scanner.figures import (
    _as_images,
    _is_tokens,
    _joint_range,
    _mosaic_png,
    _projection_caption,
    _projection_png,
    _transfer_caption,
    _transfer_png,
    _trigger_png,
)
from backdoorscan.scanner.report import ClassResult, Report
from backdoorscan.scanner.report_text import _exre_lines, _fmt, _repair_lines

__all__ = [
    "REPORT_EXTRA",
    "MissingExtraError",
    "load_samples",
    "load_vocab",
    "require_matplotlib",
    "to_html",
]

REPORT_EXTRA = 'pip install "backdoorscan[report]"'
# Tiles per mosaic (the suspicious cluster's, and the rest of the class's), samples ranked.
MOSAIC_TILES = 36
RANKED_ROWS = 15


class MissingExtraError(ImportError):
    """matplotlib is not installed; the message names the extra that brings it."""


def require_matplotlib() -> None:
    """Raise :class:`MissingExtraError` (one line, with the pip command) without matplotlib."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise MissingExtraError(
            f"the HTML report draws its figures with matplotlib, which is not installed: "
            f"{REPORT_EXTRA}"
        ) from None


def load_vocab(path: str | Path) -> dict[int, str]:
    """Token id -> text from a vocabulary file: JSON ``{"token": id}`` (a tokenizer's
    vocab.json), a JSON list, or plain text with one token per line (the line number is the
    id)."""
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix.lower() == ".json":
        doc = json.loads(text)
        if isinstance(doc, dict):
            return {int(v): str(k) for k, v in doc.items()}
        if isinstance(doc, list):
            return {i: str(t) for i, t in enumerate(doc)}
        raise ValueError(f"{path}: expected a JSON object or list of tokens")
    return dict(enumerate(text.splitlines()))


def load_samples(path: str | Path, x_key: str = "x") -> np.ndarray:
    """The samples of a data file as given, for the mosaics: ``x_key`` of an ``.npz`` or an
    ``.npy`` (memory-mapped). Nothing is unpickled."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False)
    with np.load(path, allow_pickle=False) as arrays:
        if x_key not in arrays.files:
            raise ValueError(f"{path} holds no array {x_key!r} (it holds {arrays.files})")
        return arrays[x_key]


def to_html(
    report: Report,
    *,
    samples: Any = None,
    vocab: dict[int, str] | None = None,
    data_hint: str = "pass the training data (backdoorscan report REPORT.json --data "
    "train.npz) to draw them",
) -> str:
    """The report as one HTML document. ``samples`` (default ``report.samples``) are the
    training samples as given, indexed like the scan's; without them the mosaics are left
    out and ``data_hint`` says how to get them. ``vocab`` decodes token ids."""
    require_matplotlib()
    if samples is None:
        samples = report.samples
    if samples is not None and len(samples) != len(report.scores):
        raise ValueError(
            f"the data holds {len(samples)} samples but the report was made from "
            f"{len(report.scores)}: not the data that was scanned"
        )
    ctx = _Context(report, samples, vocab, data_hint)
    body = [
        _verdict(report),
        _facts(report),
        _class_table(report),
        *(_class_section(ctx, c) for c in report.classes if c.verdict != "skipped"),
        _pre_section("Exclusionary reclassification", _exre_lines(report)),
        _pre_section("Repair", _repair_lines(report.repair)),
    ]
    title = f"backdoorscan report: {report.verdict}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(b for b in body if b)
        + f"\n<footer>backdoorscan {_e(report.tool_version)}, report schema "
        f"{report.schema_version}</footer>\n</body>\n</html>\n"
    )


class _Context:
    """What every class section needs besides the class."""

    def __init__(self, report: Report, samples: Any, vocab: dict[int, str] | None, hint: str):
        self.report = report
        self.samples = samples
        self.vocab = vocab
        self.hint = hint
        self.flagged = set(int(i) for i in report.flagged_indices)
        self.tokens = samples is not None and _is_tokens(samples)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;padding:0 1em;color:#222}
h1{margin:.2em 0}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
.verdict{padding:1em 1.2em;border-radius:6px;margin-bottom:1em}
.backdoor{background:#fde2e1;border:2px solid #c0392b}.clean{background:#e3f5e6;
border:2px solid #2e8b57}.nothing{background:#fff4d6;border:2px solid #c9a227}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:right;vertical-align:top}th{background:#f3f3f3}td.l,th.l{text-align:left}
tr.poisoned td{background:#fde2e1;font-weight:600}
.wide{overflow-x:auto}.figs{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}
figure{margin:0}figcaption{font-size:.9em;color:#555;max-width:32em}
img.px{image-rendering:pixelated}code,pre{font-size:.9em}mark{background:#ffd54f}
.tok{font-family:monospace;font-size:.85em;margin:.1em 0}footer{margin-top:3em;color:#777}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _verdict(report: Report) -> str:
    n = len(report.scores)
    if report.verdict == "backdoor":
        head = "Backdoor suspected"
        text = (
            f"Poison found in class(es) {', '.join(map(str, report.poisoned_classes))}: "
            f"{len(report.flagged_indices)} of {n} training samples flagged."
        )
        cls = "backdoor"
    elif report.verdict == "clean":
        head = "No poison found"
        text = (
            f"No poison found in the {n} training samples given "
            f"({len(report.analysed_classes)} classes analysed)."
        )
        cls = "clean"
    else:
        head = "Nothing scanned"
        text = report.not_meaningful or "No class had enough samples to cluster."
        cls = "nothing"
    notes = "".join(f"<li>{_e(note)}</li>" for note in report.notes)
    return (
        f'<section class="verdict {cls}"><h1>{_e(head)}</h1><p>{_e(text)}</p>'
        + (f"<ul>{notes}</ul>" if notes else "")
        + "</section>"
    )


def _facts(report: Report) -> str:
    m, d, s = report.model, report.data, report.settings
    clusters = s.get("n_clusters")
    rows = [
        ("model", m.get("path") or "(in memory)"),
        ("model sha256", m.get("sha256")),
        ("framework, layer", f"{m.get('framework')}, {m.get('layer')} "
         f"({m.get('feature_dim')} values), {m.get('num_classes')} classes"),
        ("isolation", m.get("isolation")),
        ("data", d.get("path") or d.get("source")),
        ("data sha256", d.get("sha256")),
        ("samples", f"{d.get('n_samples', len(report.scores))} in {d.get('n_classes')} classes"
         + (f"; the model predicts {d['model_agreement']:.1%} of their labels"
            if d.get("model_agreement") is not None else "")),
        ("method", f"{s.get('reduce')} to {s.get('n_components')} dims, k-means k={clusters}"),
        ("rule", ", ".join(s.get("rule_applied") or s.get("rule") or [])
         + f" (transfer >= {s.get('transfer_threshold')}, size < {s.get('size_threshold')}, "
         f"separation >= {s.get('separation_threshold')})"),
        ("seed", s.get("seed")),
        ("provider", report.provider),
        ("timings", ", ".join(f"{k} {v:.2f} s" for k, v in report.timings.items())),
        ("report made", (report.created_utc or "").replace("T", " ").replace("Z", " UTC")),
        ("command", report.command),
    ]  # fmt: skip
    body = "".join(
        f'<tr><th class="l">{_e(k)}</th><td class="l">{_e(v)}</td></tr>'
        for k, v in rows
        if v not in (None, "")
    )
    return f"<h2>Scan</h2><table>{body}</table>"


def _class_table(report: Report) -> str:
    head = (
        "<tr><th>class</th><th>samples</th><th class=l>verdict</th><th class=l>clustering</th>"
        "<th class=l>cluster sizes</th><th>suspicious</th><th>share</th><th>separation</th>"
        "<th>silhouette</th><th>distance</th><th>transfer</th><th>source</th><th>flagged</th>"
        "<th class=l>reason</th></tr>"
    )
    rows = []
    for c in report.classes:
        size = c.cluster_sizes[c.suspicious_cluster] if c.suspicious_cluster is not None else None
        label = (
            f'<a href="#class-{c.label}">{c.label}</a>' if c.verdict != "skipped" else c.label
        )
        cells = [
            label,
            c.n_samples,
            _e(c.verdict),
            _e(c.clustering),
            _e(", ".join(map(str, c.cluster_sizes))),
            _fmt(size, "d", 0),
            _fmt(c.relative_size, ".2f", 0),
            _fmt(c.separation, ".1f", 0),
            _fmt(c.silhouette, ".2f", 0),
            _fmt(c.distance_ratio, ".2f", 0),
            _fmt(c.transfer, ".2f", 0),
            _fmt(c.suspected_source, "d", 0),
            c.n_flagged,
            _e(c.reason),
        ]
        tds = "".join(
            f'<td{" class=l" if i in (2, 3, 4, 13) else ""}>{v}</td>' for i, v in enumerate(cells)
        )
        rows.append(f'<tr class="{_e(c.verdict)}" id="row-{c.label}">{tds}</tr>')
    return (
        "<h2>Classes</h2><p>Per class, the cluster reported is the most suspicious of every "
        "clustering tried; share is its part of the class, separation its gap to the rest in "
        "pooled standard deviations, transfer the largest share of another class's samples "
        "that the model sends to this class once they carry the cluster's shared perturbation "
        "(less the share sent there without it).</p>"
        f'<div class="wide"><table>{head}{"".join(rows)}</table></div>'
    )


def _class_section(ctx: _Context, c: ClassResult) -> str:
    parts = [f'<section id="class-{c.label}"><h2>Class {c.label}: {_e(c.verdict)}</h2>']
    sizes = ", ".join(
        f"cluster {j}: {n}" + (" (suspicious)" if j == c.suspicious_cluster else "")
        for j, n in enumerate(c.cluster_sizes)
    )
    parts.append(
        f"<p>{c.n_samples} samples; {_e(c.clustering)}: {_e(sizes)}; separation "
        f"{_fmt(c.separation, '.1f', 0)}, silhouette {_fmt(c.silhouette, '.2f', 0)}, "
        f"transfer {_fmt(c.transfer, '.2f', 0)}"
        + (f"; {c.n_flagged} flagged, suspected source {c.suspected_source}" if c.n_flagged
           else "")
        + "</p>"
    )  # fmt: skip
    figs = []
    if c.projection and c.projection.get("x"):
        figs.append(_figure(_projection_png(ctx.flagged, c), _projection_caption(c), px=False))
    if c.transfer_rates:
        figs.append(_figure(_transfer_png(ctx.report, c), _transfer_caption(c), px=False))
    if figs:
        parts.append(f'<div class="figs">{"".join(figs)}</div>')
    if c.verdict == "poisoned":
        parts.append(_poison_evidence(ctx, c))
    parts.append("</section>")
    return "\n".join(parts)


def _poison_evidence(ctx: _Context, c: ClassResult) -> str:
    """Mosaics, trigger and ranked samples of a flagged class."""
    scores = ctx.report.scores
    members = np.asarray(c.members if c.members is not None else [], dtype=np.int64)
    if len(members) and len(scores):
        members = members[np.argsort(-scores[members], kind="stable")]
    rest = _rest_of_class(ctx, c)
    out = ["<h3>Samples</h3>"]
    trig = c.trigger
    if ctx.samples is None:
        out.append(f"<p>Mosaics of the samples need the training data: {_e(ctx.hint)}.</p>")
    elif ctx.tokens:
        out.append(_token_samples(ctx, c, members, rest))
    else:
        top = members[:MOSAIC_TILES]
        imgs = _as_images(np.asarray(ctx.samples[np.sort(top)])) if len(top) else None
        order = np.argsort(np.argsort(top))  # back from index order to score order
        other = _as_images(np.asarray(ctx.samples[np.sort(rest)])) if len(rest) else None
        lo, hi = _joint_range(imgs, other)
        figs = []
        if imgs is not None:
            figs.append(
                _figure(
                    _mosaic_png(imgs[order], lo, hi),
                    f"The suspicious cluster: {len(top)} of its {len(members)} flagged "
                    "samples, most suspicious first (row by row).",
                    alt=f"mosaic of the suspicious cluster of class {c.label}",
                )
            )
        if other is not None:
            figs.append(
                _figure(
                    _mosaic_png(other, lo, hi),
                    f"The rest of class {c.label}: {len(rest)} samples not flagged, drawn "
                    "at random (same grey scale).",
                    alt=f"mosaic of the rest of class {c.label}",
                )
            )
        out.append(f'<div class="figs">{"".join(figs)}</div>')
    out.append("<h3>Estimated trigger</h3>")
    if trig is None:
        out.append("<p>No trigger estimate is stored for this class.</p>")
    elif getattr(trig, "tokens", False):
        ids = [int(t) for t in np.asarray(trig.values).ravel()]
        out.append(f"<p>Tokens inserted: <mark>{_e(_decode(ids, ctx.vocab))}</mark></p>")
    else:
        out.append(
            _figure(
                _trigger_png(np.asarray(trig.values)),
                "The median difference between the cluster's samples and their nearest "
                "samples outside it, in the model's input space (after any layout change and "
                "normalisation). Grey input: red adds, blue removes; colour input: mid-grey "
                "is no change.",
                alt=f"estimated trigger of class {c.label}",
            )
        )
    out.append(_ranked(ctx, c, members))
    return "\n".join(out)


def _rest_of_class(ctx: _Context, c: ClassResult) -> np.ndarray:
    """Up to MOSAIC_TILES samples of the class that are not flagged (seeded choice among the
    projection's samples, the class's only indices in a report)."""
    if not c.projection:
        return np.zeros(0, dtype=np.int64)
    idx = np.asarray([i for i in c.projection["index"] if i not in ctx.flagged], dtype=np.int64)
    if len(idx) > MOSAIC_TILES:
        rng = np.random.default_rng([int(ctx.report.settings.get("seed") or 0), c.label])
        idx = np.sort(rng.choice(idx, size=MOSAIC_TILES, replace=False))
    return idx


def _ranked(ctx: _Context, c: ClassResult, members: np.ndarray) -> str:
    if not len(members):
        return ""
    show_text = ctx.tokens and ctx.samples is not None
    rows = []
    for rank, i in enumerate(members[:RANKED_ROWS], 1):
        score = ctx.report.scores[i] if len(ctx.report.scores) else float("nan")
        text = ""
        if show_text:
            text = f'<td class="l tok">{_token_line(ctx, np.asarray(ctx.samples[i]), c)}</td>'
        rows.append(f"<tr><td>{rank}</td><td>{int(i)}</td><td>{score:.3f}</td>{text}</tr>")
    head = "<tr><th>rank</th><th>sample</th><th>score</th>" + (
        "<th class=l>tokens</th></tr>" if show_text else "</tr>"
    )
    return (
        f"<h3>Most suspicious samples</h3><p>The flagged samples of class {c.label} with the "
        f"highest membership scores ({min(len(members), RANKED_ROWS)} of {len(members)}; "
        "sample = index in the data set).</p>"
        f'<div class="wide"><table>{head}{"".join(rows)}</table></div>'
    )


def _token_samples(ctx: _Context, c: ClassResult, members: np.ndarray, rest: np.ndarray) -> str:
    def block(title: str, idx: np.ndarray) -> str:
        lines = "".join(
            f'<div class="tok">{int(i)}: {_token_line(ctx, np.asarray(ctx.samples[i]), c)}</div>'
            for i in idx[:12]
        )
        return f"<figure><figcaption>{_e(title)}</figcaption>{lines}</figure>"

    return (
        '<div class="figs">'
        + block("The suspicious cluster, most suspicious first (trigger tokens marked)", members)
        + block(f"The rest of class {c.label}, at random", rest)
        + "</div>"
    )


def _token_line(ctx: _Context, seq: np.ndarray, c: ClassResult) -> str:
    ids = [int(t) for t in np.ravel(seq)]
    while ids and ids[-1] == 0:  # trailing padding
        ids.pop()
    marked = set()
    if c.trigger is not None and getattr(c.trigger, "tokens", False):
        marked = {int(t) for t in np.ravel(c.trigger.values)}
    words = []
    for t in ids:
        word = _e(_decode([t], ctx.vocab))
        words.append(f"<mark>{word}</mark>" if t in marked else word)
    return " ".join(words)


def _decode(ids: Sequence[int], vocab: dict[int, str] | None) -> str:
    if vocab is None:
        return " ".join(map(str, ids))
    return " ".join(vocab.get(t, f"[{t}]") for t in ids)


def _pre_section(title: str, lines: list[str]) -> str:
    lines = [line for line in lines if line.strip()]
    if not lines:
        return ""
    return f"<h2>{_e(title)}</h2><pre>{_e(chr(10).join(line.strip() for line in lines))}</pre>"


def _figure(png: bytes, caption: str, *, alt: str = "", px: bool = True) -> str:
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    cls = ' class="px"' if px else ""
    return (
        f'<figure><img{cls} src="{uri}" alt="{_e(alt or caption)}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )
