"""The sdist and the wheel, built from a copy of the source tree: what each must carry.

The builds write ``build/`` and ``*.egg-info`` into the tree they build, so they run on a copy
in a temporary folder and the checkout stays clean. They use the setuptools installed here
(no build isolation, no network).
"""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from backdoorscan._version import __version__

ROOT = Path(__file__).resolve().parents[1]
# Never copied: caches, build outputs, downloaded benchmark data.
JUNK = shutil.ignore_patterns(
    ".git", "__pycache__", "*.py[cod]", "*.nbi", "*.nbc", "*.egg-info", "build", "dist",
    ".venv", ".pytest_cache", ".ruff_cache", ".hypothesis", ".cache", ".data", ".work",
)  # fmt: skip


def _source_files() -> list[Path]:
    """The files a fresh clone would hold: git's list (tracked and new, not ignored) in a
    checkout, every file but the junk in an unpacked sdist."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        names = [n for n in out.decode().split("\0") if n]
        return [Path(n) for n in names if (ROOT / n).is_file()]
    return []


def _copy_tree(dest: Path) -> Path:
    files = _source_files()
    if not files:
        shutil.copytree(ROOT, dest, ignore=JUNK)
        return dest
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import setuptools

    assert int(setuptools.__version__.split(".")[0]) >= 77, (
        f"setuptools {setuptools.__version__} cannot build an SPDX license; "
        "the test extra asks for >= 77"
    )
    tmp = tmp_path_factory.mktemp("packaging")
    src = _copy_tree(tmp / "src")
    dist = tmp / "dist"
    dist.mkdir()
    build_sdist = "import sys, setuptools.build_meta as b; b.build_sdist(sys.argv[1])"
    sdist = subprocess.run(
        [sys.executable, "-c", build_sdist, str(dist)],
        cwd=src,
        capture_output=True,
        text=True,
    )
    assert sdist.returncode == 0, sdist.stderr[-3000:]
    pip_wheel = ["pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q"]
    wheel = subprocess.run(
        [sys.executable, "-m", *pip_wheel, "-w", str(dist), str(src)],
        capture_output=True,
        text=True,
    )
    assert wheel.returncode == 0, wheel.stderr[-3000:]
    (sdist_path,) = dist.glob("backdoorscan-*.tar.gz")
    (wheel_path,) = dist.glob("backdoorscan-*.whl")
    return {"sdist": sdist_path, "wheel": wheel_path}


def _sdist_names(path: Path) -> set[str]:
    with tarfile.open(path) as tar:
        names = tar.getnames()
    top = f"backdoorscan-{__version__}/"
    assert all(n == top.rstrip("/") or n.startswith(top) for n in names), names[:5]
    return {n[len(top) :] for n in names if n.startswith(top)}


@pytest.mark.slow
def test_sdist_carries_license_tests_and_documents(built: dict[str, Path]) -> None:
    names = _sdist_names(built["sdist"])
    assert "LICENSE" in names
    for doc in ("README.md", "SECURITY.md", "pyproject.toml", "MANIFEST.in"):
        assert doc in names
    # Every test module and helper of this tree, and the benchmark modules two tests import.
    wanted = {p.relative_to(ROOT).as_posix() for p in ROOT.glob("tests/*.py")}
    wanted |= {p.relative_to(ROOT).as_posix() for p in ROOT.glob("benchmarks/*.py")}
    wanted |= {p.relative_to(ROOT).as_posix() for p in ROOT.glob("examples/*.py")}
    wanted |= {p.relative_to(ROOT).as_posix() for p in ROOT.glob("docs/*.md")}
    assert "tests/conftest.py" in wanted and "tests/test_packaging.py" in wanted
    assert sorted(wanted - names) == []
    assert "backdoorscan/data/demo.onnx" in names and "backdoorscan/_version.py" in names
    junk = [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".nbi", ".nbc"))]
    assert junk == []
    with tarfile.open(built["sdist"]) as tar:
        member = tar.extractfile(f"backdoorscan-{__version__}/LICENSE")
        assert member is not None
        assert (ROOT / "LICENSE").read_bytes() == member.read()


@pytest.mark.slow
def test_wheel_carries_license_and_the_one_version(built: dict[str, Path]) -> None:
    info = f"backdoorscan-{__version__}.dist-info"
    with zipfile.ZipFile(built["wheel"]) as whl:
        names = set(whl.namelist())
        meta = email.message_from_bytes(whl.read(f"{info}/METADATA"))
        license_text = whl.read(f"{info}/licenses/LICENSE")
    assert built["wheel"].name.startswith(f"backdoorscan-{__version__}-")
    assert meta["Version"] == __version__
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert license_text == (ROOT / "LICENSE").read_bytes()
    assert "backdoorscan/data/demo.onnx" in names and "backdoorscan/py.typed" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)  # the package only


@pytest.mark.slow
def test_sdist_tests_collect_and_run(built: dict[str, Path], tmp_path: Path) -> None:
    """The sdist's own test suite imports (every helper module is there) and a test passes,
    with the package taken from the sdist, not from this checkout."""
    with tarfile.open(built["sdist"]) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
            tar.extractall(tmp_path, filter="data")
        else:  # pragma: no cover - older patch releases
            tar.extractall(tmp_path)
    src = tmp_path / f"backdoorscan-{__version__}"
    pytest_args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    collect = subprocess.run(
        [*pytest_args, "--collect-only", "tests"], cwd=src, capture_output=True, text=True
    )
    assert collect.returncode == 0, collect.stdout[-3000:] + collect.stderr[-2000:]
    assert "tests collected" in collect.stdout, collect.stdout[-500:]
    probe = "import backdoorscan, sys; print(backdoorscan.__file__)"
    where = subprocess.run(
        [sys.executable, "-c", probe], cwd=src, capture_output=True, text=True, check=True
    )
    assert Path(where.stdout.strip()).is_relative_to(src)
    run = subprocess.run(
        [*pytest_args, "tests/test_knn.py"], cwd=src, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout[-3000:]
