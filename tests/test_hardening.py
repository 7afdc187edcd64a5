"""Issue #12, the deny-list layer and the input hardening: each test feeds a crafted file that
would leave a mark (a marker file) or misbehave (SIGBUS, a verdict on meaningless logits, a
wrong or multi-line message) if the defence failed."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import hostile
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from backdoorscan.scanner.data import DataError, conform, load_data, verify_unchanged

X, Y = hostile.digits()  # 300 samples x 64, 30 per class


def _one_line_error(code: int, out: str, err: str) -> str:
    assert code == 2, (code, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "train.npz"
    np.savez(path, x=X, y=Y)
    return path


# -- 1, 2: torch.export archives ------------------------------------------------------------

PT2_ATTACKS = {
    "case twin": (hostile.pt2_case_twin, "the zip lists an entry twice"),
    "operator argument": (hostile.pt2_operator_argument, "passes the operator"),
}


def _run_program(path: Path) -> None:
    """What an unguarded loader does: torch.export.load, unlift, one forward pass."""
    import torch

    program = torch.export.load(str(path))
    program.module(check_guards=False)(torch.rand(2, hostile.D_IN))


@pytest.mark.parametrize("attack", list(PT2_ATTACKS))
def test_crafted_pt2_is_live(attack: str, tmp_path: Path) -> None:
    """The crafted archives are real attacks: loaded (and run) without the guard, the payload
    writes its marker. This is what the refusals below prevent."""
    build, _ = PT2_ATTACKS[attack]
    marker = tmp_path / "pwned"
    path = build(tmp_path / "model.pt2", marker)
    # The twin's pickle is no tensor: torch fails, but after the payload ran.
    with contextlib.suppress(Exception):
        _run_program(path)
    assert marker.exists()


@pytest.mark.parametrize("trust", [False, True], ids=["worker", "trust-model"])
@pytest.mark.parametrize("command", ["scan", "layers", "export"])
@pytest.mark.parametrize("attack", list(PT2_ATTACKS))
def test_crafted_pt2_is_refused(
    attack: str, command: str, trust: bool, tmp_path: Path, data: Path
) -> None:
    """Each command refuses the archive with one line and the payload never runs, in the
    worker and in the scanner's own process (--trust-model, where the guard is all there is)."""
    build, phrase = PT2_ATTACKS[attack]
    marker = tmp_path / "pwned"
    path = build(tmp_path / "model.pt2", marker)
    before = path.read_bytes()
    args: list[object] = {
        "scan": ["scan", path, "--data", data, "-q"],
        "layers": ["layers", path],
        "export": ["export", path, "-o", tmp_path / "out.onnx"],
    }[command]
    err = _one_line_error(*hostile.run_cli(*args, *(["--trust-model"] if trust else [])))
    assert "refusing model.pt2" in err and phrase in err, err
    assert not marker.exists()
    assert path.read_bytes() == before and not (tmp_path / "out.onnx").exists()


def test_denied_python_operators_as_targets(tmp_path: Path) -> None:
    """operator.call/attrgetter/methodcaller reach anything: refused as operator arguments."""
    from backdoorscan.adapters.base import AdapterError
    from backdoorscan.adapters.torch._guard import validate_pt2

    marker = tmp_path / "pwned"
    for op in ("_operator.call", "_operator.attrgetter", "torch.save", "torch.ops.aten.save"):
        path = hostile.pt2_operator_argument(tmp_path / "m.pt2", marker, op=op)
        with pytest.raises(AdapterError, match="passes the operator"):
            validate_pt2(path.read_bytes(), path.name)
    clean = hostile.clean_pt2(tmp_path / "clean.pt2")
    validate_pt2(clean.read_bytes(), clean.name)  # a plain archive still passes


# -- 3: logits that are not finite floats ---------------------------------------------------


def _logits_model(path: Path, kind: str) -> Path:
    """The MLP with its logits passed through one more node: + NaN, + Inf, or a cast to int64."""
    model = hostile.mlp()
    model.graph.node[2].output[0] = "scores"
    if kind == "int64":
        node = helper.make_node("Cast", ["scores"], ["logits"], to=TensorProto.INT64)
        model.graph.output[0].type.tensor_type.elem_type = TensorProto.INT64
    else:
        value = np.float32(np.nan if kind == "NaN" else np.inf)
        model.graph.initializer.append(numpy_helper.from_array(np.array(value), "poison"))
        node = helper.make_node("Add", ["scores", "poison"], ["logits"])
    model.graph.node.append(node)
    return hostile.save(model, path)


@pytest.mark.parametrize(
    ("kind", "phrase"),
    [
        ("NaN", "the model gave NaN logits for sample 0"),
        ("Inf", "the model gave infinite logits for sample 0"),
        ("int64", "logits output has dtype int64, not floating point"),
    ],
)
def test_logits_that_are_not_finite_floats_are_an_error(
    kind: str, phrase: str, tmp_path: Path, data: Path
) -> None:
    """Before: "No backdoor found", exit 0 (argmax of NaN is class 0 for every sample)."""
    model = _logits_model(tmp_path / "m.onnx", kind)
    err = _one_line_error(
        *hostile.run_cli("scan", model, "--data", data, "--layer", "hidden", "-q")
    )
    assert phrase in err, err


# -- 4: data truncated while it is scanned --------------------------------------------------

_TRUNCATING_SCAN = textwrap.dedent(
    """
    import os, sys
    from backdoorscan.scanner import data as data_mod
    from backdoorscan.cli import main

    path, mode = sys.argv[1], sys.argv[2]
    original = data_mod.Dataset.batch
    calls = []

    def batch(self, start, stop):
        calls.append(start)
        if len(calls) == 2:  # after the first batch: the file loses its second half
            os.truncate(path, os.path.getsize(path) // 2)
            if mode == "mapped":  # what the scanner did before: read through the mapping
                self.x[-1].sum()
        return original(self, start, stop)

    data_mod.Dataset.batch = batch
    main(sys.argv[3:])
    """
)


def _big_pair(folder: Path, n: int = 4096) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    np.save(folder / "x.npy", rng.random((n, hostile.D_IN), dtype=np.float32))
    np.save(folder / "y.npy", np.arange(n) % hostile.CLASSES)
    return folder / "x.npy", folder / "y.npy"


@pytest.mark.parametrize("mode", ["batches", "mapped"])
def test_data_truncated_during_the_scan(mode: str, tmp_path: Path) -> None:
    """The .npy is cut in half after the first batch. The scanner's batches give one line and
    exit 2, not SIGBUS (exit 135, nothing said); "mapped" touches the mapping past the new end
    the way every batch did before, to show that the crash is real."""
    model = hostile.save(hostile.mlp(), tmp_path / "m.onnx")
    x, y = _big_pair(tmp_path)
    cli = ["scan", str(model), "--data", str(x), "--labels", str(y), "--batch-size", "256", "-q"]
    proc = subprocess.run(
        [sys.executable, "-c", _TRUNCATING_SCAN, str(x), mode, *cli],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    if mode == "mapped":
        assert proc.returncode in (-signal.SIGBUS, 128 + signal.SIGBUS), proc
        return
    assert proc.returncode == 2, proc
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "x.npy was truncated during the scan" in proc.stderr


def test_truncated_before_mapping_names_both_sizes(tmp_path: Path) -> None:
    x, y = _big_pair(tmp_path, n=100)
    os.truncate(x, x.stat().st_size - 64)
    with pytest.raises(DataError, match=r"truncated \(its header declares 25600 bytes"):
        load_data(x, y)


# -- 5: input changed during the scan -------------------------------------------------------


def _loaded(tmp_path: Path) -> tuple[Path, object]:
    path = tmp_path / "d.npz"
    np.savez(path, x=X, y=Y)
    ds = load_data(path)
    ds.files = {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return path, ds


def test_verify_unchanged_passes_an_untouched_file(tmp_path: Path) -> None:
    _, ds = _loaded(tmp_path)
    verify_unchanged(ds)


def test_verify_unchanged_sees_a_replaced_file(tmp_path: Path) -> None:
    path, ds = _loaded(tmp_path)
    other = tmp_path / "other.npz"
    np.savez(other, x=X[::-1], y=Y)
    os.replace(other, path)
    with pytest.raises(DataError, match=r"changed during the scan \(replaced\)"):
        verify_unchanged(ds)


def test_verify_unchanged_sees_an_edit_that_hides_its_tracks(tmp_path: Path) -> None:
    """The same size, the modification time put back: only the hash tells."""
    path, ds = _loaded(tmp_path)
    st = path.stat()
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0xFF
    with open(path, "r+b") as fh:  # in place: same inode
        fh.write(blob)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DataError, match="its sha256 differs"):
        verify_unchanged(ds)
    verify_unchanged(ds, rehash=False)  # the cheap check alone cannot see it


def test_verify_unchanged_sees_a_grown_file_and_labels(tmp_path: Path) -> None:
    x, y = _big_pair(tmp_path, n=50)
    ds = load_data(x, y)
    with open(y, "ab") as fh:
        fh.write(b"\0" * 8)
    with pytest.raises(DataError, match=r"labels file .*y\.npy changed during the scan"):
        verify_unchanged(ds)


# -- 6: one line, true to its cause ---------------------------------------------------------


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return hostile.save(hostile.mlp(), tmp_path / "mlp.onnx")


def _scan_err(model: Path, *args: object) -> str:
    return _one_line_error(*hostile.run_cli("scan", model, *args, "-q"))


@pytest.mark.skipif(sys.platform != "linux", reason="FIFOs, /dev and /proc as on Linux")
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "/proc/self/status"])
def test_special_files_are_not_called_empty(kind: str, tmp_path: Path, model: Path) -> None:
    """A FIFO would block the reader, /dev/zero never ends, a /proc file reports size 0."""
    if kind == "fifo":
        path = tmp_path / "d.npz"
        os.mkfifo(path)
    else:
        path = Path(kind)
    err = _scan_err(model, "--data", path)
    assert "is not a regular file" in err and "empty" not in err, err
    err = _scan_err(model, "--data", tmp_path / "nothing.npy", "--labels", path)
    assert "not found" in err or "is not a regular file" in err, err


def test_oversized_npy_header_is_named(tmp_path: Path, model: Path) -> None:
    """numpy refuses headers over 10000 bytes with words about allow_pickle: not a pickle."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (300, 64), }"
    header = header + " " * (19999 - len(header)) + "\n"
    blob = b"\x93NUMPY\x02\x00" + len(header).to_bytes(4, "little") + header.encode()
    (tmp_path / "x.npy").write_bytes(blob + X.tobytes())
    np.save(tmp_path / "y.npy", Y)
    err = _scan_err(model, "--data", tmp_path / "x.npy", "--labels", tmp_path / "y.npy")
    assert "header of 20000 bytes" in err and "pickle" not in err, err


def test_negative_npy_shape_is_damage(tmp_path: Path, model: Path) -> None:
    np.save(tmp_path / "x.npy", X)
    blob = (tmp_path / "x.npy").read_bytes().replace(b"(300, 64)", b"(-30, 64)")
    (tmp_path / "x.npy").write_bytes(blob)
    np.save(tmp_path / "y.npy", Y)
    err = _scan_err(model, "--data", tmp_path / "x.npy", "--labels", tmp_path / "y.npy")
    assert "damaged" in err and "(-30, 64)" in err, err


def test_float32_overflow_is_not_called_nan(tmp_path: Path, model: Path) -> None:
    x = X.astype(np.float64)
    x[5, 3] = 1e300
    np.savez(tmp_path / "d.npz", x=x, y=Y)
    err = _scan_err(model, "--data", tmp_path / "d.npz")
    assert "sample 5 holds the value 1e+300, out of the float32 range" in err, err
    assert "NaN" not in err


def test_scale_overflow_is_named(tmp_path: Path, model: Path) -> None:
    np.savez(tmp_path / "d.npz", x=X + 1, y=Y)
    err = _scan_err(model, "--data", tmp_path / "d.npz", "--scale", "1e39")
    assert "which --scale/--mean/--std take out of the float32 range" in err, err


def test_huge_label_is_not_out_of_memory(tmp_path: Path, model: Path) -> None:
    y = Y.copy()
    y[3] = 10**12
    np.savez(tmp_path / "d.npz", x=X, y=y)
    err = _scan_err(model, "--data", tmp_path / "d.npz")
    assert "labels go up to 1000000000000" in err and "memory" not in err, err
    # A model that does not say how many classes it has: the label is still refused by size.
    ds = load_data(tmp_path / "d.npz")
    with pytest.raises(DataError, match="too large a class index"):
        conform(ds, (hostile.D_IN,), "float32", None)


def _broken_keras(path: Path) -> Path:
    """A .keras archive whose Dense layer asks for -5 units: Keras' error runs 11 lines."""
    import json

    import keras

    inputs = keras.Input((hostile.D_IN,))
    hidden = keras.layers.Dense(hostile.HIDDEN, activation="relu")(inputs)
    keras.Model(inputs, keras.layers.Dense(hostile.CLASSES)(hidden)).save(path)
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    config = json.loads(members["config.json"])
    text = json.dumps(config).replace(f'"units": {hostile.HIDDEN}', '"units": -5', 1)
    members["config.json"] = text.encode()
    with zipfile.ZipFile(path, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    return path


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("trust", [False, True], ids=["worker", "trust-model"])
def test_keras_error_is_one_line(trust: bool, tmp_path: Path) -> None:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    path = _broken_keras(tmp_path / "m.keras")
    err = _one_line_error(*hostile.run_cli("layers", path, *(["--trust-model"] if trust else [])))
    assert "config=" not in err, err
    if trust:  # in the worker, the message is the worker's (one line as well)
        assert "units" in err, err


@pytest.mark.parametrize(
    "exc",
    [
        DataError("first line\nsecond line"),
        KeyError("a crafted key\nwith a newline"),
        RuntimeError("torch says\n  at frame 1\n  at frame 2"),
        ZeroDivisionError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_prints_one_line_for_anything(exc: Exception) -> None:
    import click

    from backdoorscan.cli_options import ScanError, errors

    with pytest.raises(ScanError) as info, errors():
        raise exc
    assert info.value.exit_code == 2
    message = info.value.format_message()
    assert "\n" not in message and message, message
    with pytest.raises(click.ClickException) as info2, errors():
        raise click.ClickException("two\nlines")
    assert info2.value.format_message() == "two"


def test_onnx_model_still_scans(tmp_path: Path, data: Path, model: Path) -> None:
    """The explicit reads give the same scan as before (a sanity check of the reader)."""
    ds = load_data(data)
    assert ds.reader is not None and np.array_equal(ds.batch(10, 20), X[10:20])
    assert np.array_equal(ds.take(np.array([299, 3, 4, 5, 100])), X[[299, 3, 4, 5, 100]])
    onnx.checker.check_model(onnx.load(str(model)))
    code, _, err = hostile.run_cli("scan", model, "--data", data, "-q", "--min-agreement", "0")
    assert code in (0, 1), err
