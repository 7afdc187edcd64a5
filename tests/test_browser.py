"""The HTML report in a real browser: headless Chromium opens it from a file, with a strict
content security policy (nothing may be fetched), and a probe checks that every image loaded
and that nothing raised an error. Skipped only where no Chromium is installed, unless
BACKDOORSCAN_REQUIRE_BROWSER=1 (set by .ci/run, which installs it)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backdoorscan.cli import DEMO_DIR
from backdoorscan.scanner.report import Report

pytest.importorskip("matplotlib")

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Images may come from data: URIs only, style from the page itself, script only from the probe;
# a fetch of anything else is blocked and reported as a violation.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
# Records every error event (failed image or resource loads included: they do not bubble, so
# the listener captures) and CSP violation, then, once the page has loaded, writes what it
# found into the body's data-probe attribute for --dump-dom.
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  var t = e.target || {};
  window.__errors.push(String(e.message || ("failed to load " + (t.tagName || "?") + " " +
    String(t.src || t.href || "").slice(0, 60))));
}, true);
document.addEventListener("securitypolicyviolation", function (e) {
  window.__errors.push("CSP blocked " + e.blockedURI + " (" + e.violatedDirective + ")");
});
window.addEventListener("load", function () {
  var imgs = Array.prototype.map.call(document.images, function (i) {
    return {alt: i.alt, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight};
  });
  document.body.setAttribute("data-probe", JSON.stringify({images: imgs,
    errors: window.__errors, title: document.title}));
});
</script>"""


def _browser() -> str:
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        if os.environ.get("BACKDOORSCAN_REQUIRE_BROWSER") == "1":
            pytest.fail("BACKDOORSCAN_REQUIRE_BROWSER=1 but no Chromium is installed")
        pytest.skip("no Chromium installed (Debian: apt-get install chromium)")
    return found


def open_in_browser(page: str, tmp_path: Path) -> dict[str, Any]:
    """What the probe saw once Chromium loaded ``page`` from a file, and the console lines."""
    head = f'<head>\n<meta http-equiv="Content-Security-Policy" content="{CSP}">\n{PROBE}'
    assert page.count("<head>") == 1
    path = tmp_path / "page.html"
    path.write_text(page.replace("<head>", head, 1), encoding="utf-8")
    proc = subprocess.run(
        [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=10000", "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r'<body[^>]*\sdata-probe="([^"]*)"', proc.stdout)
    assert found, "the probe did not run: " + proc.stdout[:500]
    seen = json.loads(html.unescape(found.group(1)))
    # Messages of the page's console (the browser's own errors about the page land there).
    seen["console"] = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return seen


@pytest.fixture(scope="module")
def demo_page() -> str:
    from backdoorscan.scanner.pipeline import scan

    _browser()  # skip (or fail) before the scan

    return scan(DEMO_DIR / "demo.onnx", data=DEMO_DIR / "demo.npz").render("html")


def _token_report() -> tuple[Report, np.ndarray]:
    from backdoorscan.scanner.report import ClassResult
    from backdoorscan.scanner.transfer import Trigger

    x = np.random.default_rng(0).integers(3, 50, size=(40, 10)).astype(np.int64)
    x[:8, 2] = 99
    c = ClassResult(
        label=1, n_samples=40, verdict="poisoned", cluster_sizes=[8, 32], suspicious_cluster=0,
        clustering="pca k=2", transfer=0.9, transfer_rates={0: 0.9, 2: 0.1}, n_flagged=8,
        suspected_source=0, members=np.arange(8), trigger=Trigger(np.array([99]), tokens=True),
        projection={"x": list(np.linspace(0, 1, 40)), "y": [0.0] * 40,
                    "cluster": [0] * 8 + [1] * 32, "index": list(range(40))},
    )  # fmt: skip
    report = Report(
        tool_version="0", settings={"seed": 0}, classes=[c], flagged_indices=np.arange(8),
        scores=np.linspace(1, 0, 40),
    )  # fmt: skip
    return report, x


def test_demo_report_renders_in_chromium(demo_page: str, tmp_path: Path) -> None:
    page = demo_page
    seen = open_in_browser(page, tmp_path)
    assert seen["errors"] == [] and seen["console"] == []
    assert seen["title"] == "backdoorscan report: backdoor"
    images = seen["images"]
    assert len(images) == page.count("<img ") >= 10
    bad = [i for i in images if not (i["complete"] and i["w"] > 0 and i["h"] > 0)]
    assert bad == []
    alts = {i["alt"] for i in images}
    assert {"mosaic of the suspicious cluster of class 1", "estimated trigger of class 1"} <= alts


def test_a_broken_page_is_caught(tmp_path: Path) -> None:
    """The check fails where it should: an image that does not decode, and one fetched from
    the network, are both reported."""
    report, x = _token_report()
    page = report.render("html", samples=x).replace(
        "<footer>",
        '<img alt="broken" src="data:image/png;base64,AAAA">'
        '<img alt="remote" src="https://example.invalid/x.png"><footer>',
    )
    seen = open_in_browser(page, tmp_path)
    bad = {i["alt"] for i in seen["images"] if i["w"] == 0}
    assert bad == {"broken", "remote"}
    assert any("CSP blocked https://example.invalid/x.png" in e for e in seen["errors"])
    assert any("failed to load IMG data:image/png;base64,AAAA" in e for e in seen["errors"])


def test_token_report_renders_in_chromium(tmp_path: Path) -> None:
    """A report of token data (no mosaics: text with the trigger marked) renders too."""
    report, x = _token_report()
    seen = open_in_browser(report.render("html", samples=x), tmp_path)
    assert seen["errors"] == [] and seen["console"] == []
    assert len(seen["images"]) == 2 and all(i["w"] > 0 for i in seen["images"])


@pytest.mark.slow
def test_cnn_report_renders_in_chromium(poisoned_digits: dict, tmp_path: Path) -> None:
    """A real scan of a CNN (NCHW images, trained by the test suite on digits with 50
    triggered 7s labelled 1), its report with mosaics drawn from the data file."""
    from backdoorscan.scanner.pipeline import scan

    report = scan(poisoned_digits["model"], data=poisoned_digits["data"])
    assert report.poisoned_classes == [1]
    page = report.render("html")
    seen = open_in_browser(page, tmp_path)
    assert seen["errors"] == [] and seen["console"] == []
    assert len(seen["images"]) == page.count("<img ") >= 10
    assert all(i["complete"] and i["w"] > 0 for i in seen["images"])
    assert "mosaic of the suspicious cluster of class 1" in {i["alt"] for i in seen["images"]}
