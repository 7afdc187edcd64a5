"""The model worker (backdoorscan.sandbox): each defence is checked by an attack that would
leave a mark — a file, a process, a peak of memory, a clock reading — if it failed."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import hostile_sandbox as hs
import numpy as np
import pytest

from backdoorscan.sandbox import (
    Limits,
    ModelError,
    ModelWorker,
    SandboxError,
    WorkerMemoryError,
    WorkerTimeout,
    protocol,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox tests need Linux")
TESTS = Path(__file__).parent
REPO = TESTS.parent


@pytest.fixture(autouse=True)
def _hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let workers import this folder's payloads and honour the test hook."""
    monkeypatch.setenv("BACKDOORSCAN_SANDBOX_TEST_HOOKS", "1")
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(TESTS), path) if p))


def _gone(pid: int) -> bool:
    """The process no longer exists (or is a zombie nobody will reap: its parent is gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, repr(text)
    return text


# -- a normal model ----------------------------------------------------------------------------


def test_export_session_run_match_direct_onnxruntime(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "W1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "W2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"]),
            helper.make_node("Relu", ["h"], ["hidden"]),
            helper.make_node("MatMul", ["hidden", "W2"], ["out"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    x = rng.standard_normal((300, 4)).astype(np.float32)
    limits = Limits(max_memory=256 << 20, timeout=60, allow_read=[tmp_path])
    with ModelWorker(limits) as w:
        export = w.export(tmp_path / "m.onnx")
        rows = w.layers(tmp_path / "m.onnx")
        session = w.session(export, device="auto")
        logits, feats = session.run([export.logits_name, export.features_name], {"x": x})
        providers = session.get_providers()
        status = w.status
    direct = ort.InferenceSession(export.model_bytes, providers=["CPUExecutionProvider"])
    want = direct.run(["logits", "features"], {"x": x})
    np.testing.assert_array_equal(logits, want[0])
    np.testing.assert_array_equal(feats, want[1])
    assert export.input_name == "x" and export.feature_dim == 8
    assert [r.name for r in rows if r.default] == [export.layer]
    assert providers[-1] == "CPUExecutionProvider"
    assert status is not None and status.seccomp.startswith("on")
    assert status.memory.startswith("RLIMIT_AS=")


def test_sessions_of_the_worker_park_their_threads() -> None:
    # runtime.make_session(spin=False) is what the worker calls: no busy-waiting between the
    # scanner's batches. In-process sessions keep ONNX Runtime's default.
    from backdoorscan.runtime import make_session

    export = hs.export_of(hs.endless_loop(3))
    quiet = make_session(export, "cpu", spin=False).get_session_options()  # type: ignore[attr-defined]
    assert quiet.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    default = make_session(export, "cpu").get_session_options()  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="does not have configuration"):
        default.get_session_config_entry("session.intra_op.allow_spinning")


def test_sandbox_imports_runtime_not_the_scanner() -> None:
    # The worker builds sessions with backdoorscan.runtime; it never imports the scanner.
    code = (
        "import sys; from backdoorscan.sandbox import client, worker; "
        "from backdoorscan import runtime; "
        "print(sorted(m for m in sys.modules if m.startswith('backdoorscan.scanner')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_model_outside_allowed_folders_is_refused_before_the_worker(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(hs.endless_loop())
    with (
        ModelWorker(Limits(allow_read=[tmp_path / "elsewhere"])) as w,
        pytest.raises(SandboxError, match="outside the folders"),
    ):
        w.export(tmp_path / "m.onnx")


# -- 1. memory -----------------------------------------------------------------------------------


def test_memory_bomb_fails_under_the_limit_and_peak_stays_below_it() -> None:
    limit = 200 << 20
    w = ModelWorker(Limits(max_memory=limit, timeout=60))
    with w:
        session = w.session(hs.export_of(hs.memory_bomb(1 << 28)))  # 1 GiB at run time
        with pytest.raises(WorkerMemoryError) as err:
            session.run(None, {"x": np.ones((2, 4), np.float32)})
        baseline = w.status.baseline_vm
    assert "--max-memory 200M" in _one_line(err.value)
    # Measured by the kernel: ru_maxrss of the reaped worker. Without the limit it is >1 GiB.
    assert w.peak_rss < baseline + limit, (w.peak_rss >> 20, baseline >> 20)
    print(f"memory bomb: peak RSS {w.peak_rss >> 20} MiB, baseline VM {baseline >> 20} MiB")


PEAK_DRIVER = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
import hostile_sandbox as hs
from backdoorscan.sandbox import Limits, ModelWorker
from backdoorscan.sandbox.limits import proc_status
big = np.ones(96 << 20)  # 768 MiB touched by the scanner, then freed: its high-water mark
del big
with ModelWorker(Limits(max_memory=100 << 20, timeout=60)) as w:
    w.session(hs.export_of(hs.endless_loop(3)))
print(proc_status()["VmHWM"], w.peak_rss)
"""


def test_peak_rss_is_the_workers_not_the_scanners() -> None:
    # Linux starts a child's ru_maxrss at its parent's high-water mark (fork and exec copy
    # it); the worker's peak must not be the scanner's, which is what made the memory-bomb
    # test fail after a suite that had used 1 GiB.
    script = PEAK_DRIVER.format(tests=str(TESTS))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    scanner, worker = map(int, out.stdout.split())
    assert scanner > 700 << 20, scanner >> 20
    assert 0 < worker < 400 << 20, (worker >> 20, scanner >> 20)


def test_python_allocation_past_the_limit_is_a_memory_error() -> None:
    with ModelWorker(Limits(max_memory=100 << 20)) as w, pytest.raises(WorkerMemoryError):
        w._call("hostile_sandbox:allocate", 400 << 20)


def test_worker_killed_like_by_the_oom_killer_is_a_memory_error() -> None:
    with ModelWorker(Limits(max_memory=100 << 20)) as w:
        with pytest.raises(WorkerMemoryError, match="--max-memory"):
            w._call("hostile_sandbox:die_by_sigkill")
        with pytest.raises(SandboxError, match="gone"):
            w._call("hostile_sandbox:start_thread")


# -- 2. time -------------------------------------------------------------------------------------


def test_endless_loop_is_killed_at_the_deadline() -> None:
    w = ModelWorker(Limits(timeout=1.5))
    with w:
        session = w.session(hs.export_of(hs.endless_loop()))
        pid = w.pid
        start = time.monotonic()
        with pytest.raises(WorkerTimeout, match=r"--timeout 1\.5s"):
            session.run(None, {"x": np.ones((1, 4), np.float32)})
        took = time.monotonic() - start
        assert took < 1.5 + 2.0
        assert pid is not None and _gone(pid)


# -- 3. signals ----------------------------------------------------------------------------------

DRIVER = """
import signal, sys, numpy as np
sys.path.insert(0, {tests!r})
import hostile_sandbox as hs
from backdoorscan.sandbox import Limits, ModelWorker
if {handler!r}:
    def on_signal(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    signal.signal(signal.SIGTERM, on_signal)
try:
    with ModelWorker(Limits(timeout=600)) as w:
        session = w.session(hs.export_of(hs.endless_loop()))
        print("worker", w.pid, flush=True)
        session.run(None, {{"x": np.ones((1, 4), np.float32)}})
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(2)
"""


@pytest.mark.parametrize(
    ("sig", "handler", "code"),
    [
        (signal.SIGTERM, True, 2),  # what the command line does
        (signal.SIGINT, True, 2),  # Ctrl-C: Python's own KeyboardInterrupt
        (signal.SIGTERM, False, -signal.SIGTERM),  # no handler: the kernel kills the scanner
    ],
)
def test_signal_during_a_hung_run_ends_everything_within_2s(
    sig: signal.Signals, handler: bool, code: int
) -> None:
    script = DRIVER.format(tests=str(TESTS), handler=handler)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("worker"), line
    worker = int(line.split()[1])
    time.sleep(0.5)  # well inside ONNX Runtime's run
    start = time.monotonic()
    proc.send_signal(sig)
    assert proc.wait(timeout=5) == code
    took = time.monotonic() - start
    deadline = time.monotonic() + 2.0
    while not _gone(worker) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert took < 2.0, took
    assert _gone(worker), f"worker {worker} survived its scanner"


# -- 4. seccomp and Landlock ---------------------------------------------------------------------


@pytest.mark.parametrize("attempt", ["write_file", "append_file", "remove_file"])
def test_worker_cannot_write_or_remove_files(tmp_path: Path, attempt: str) -> None:
    target = tmp_path / "victim.txt"
    if attempt != "write_file":
        target.write_text("precious")
    with ModelWorker(Limits(allow_read=[tmp_path])) as w, pytest.raises(ModelError) as err:
        w._call(f"hostile_sandbox:{attempt}", str(target))
    assert err.value.kind == "PermissionError", _one_line(err.value)
    if attempt == "write_file":
        assert not target.exists()
    else:
        assert target.read_text() == "precious"


def test_worker_cannot_run_programs_fork_or_open_sockets(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with ModelWorker(Limits(allow_read=[tmp_path])) as w:
        assert w._call("hostile_sandbox:system", str(marker)) != 0
        for attempt in ("run_program", "fork", "open_socket"):
            args = (str(marker),) if attempt == "run_program" else ()
            with pytest.raises(ModelError) as err:
                w._call(f"hostile_sandbox:{attempt}", *args)
            assert err.value.kind == "PermissionError", (attempt, _one_line(err.value))
        # threads still work, and the worker still answers
        assert w._call("hostile_sandbox:start_thread") == "thread 499500"
    assert not marker.exists()


def test_worker_reads_only_allowed_folders(tmp_path: Path) -> None:
    allowed, secret = tmp_path / "model", tmp_path / "secret"
    allowed.mkdir()
    secret.mkdir()
    (allowed / "ok.txt").write_text("fine")
    (secret / "key.txt").write_text("do not read")
    with ModelWorker(Limits(allow_read=[allowed])) as w:
        if not w._call("hostile_sandbox:start_thread") or not w.status.landlock.startswith("on"):
            pytest.skip(f"landlock: {w.status.landlock}")
        assert w._call("hostile_sandbox:read_file", str(allowed / "ok.txt")) == "fine"
        with pytest.raises(ModelError, match="Permission"):
            w._call("hostile_sandbox:read_file", str(secret / "key.txt"))


def test_torchscript_from_file_payload_writes_nothing(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    marker_live, marker = tmp_path / "control", tmp_path / "marker"
    # Control: the payload is live, run unsandboxed it creates its file.
    live = hs.torchscript_writer(tmp_path / "live.pt", marker_live)
    code = f"import hostile_sandbox as h; h.run_torchscript_unsandboxed({str(live)!r})"
    subprocess.run([sys.executable, "-c", code], cwd=TESTS, check=True, capture_output=True)
    assert marker_live.exists()
    model = hs.torchscript_writer(tmp_path / "writer.pt", marker)
    with ModelWorker(Limits(allow_read=[tmp_path], timeout=120)) as w:
        with pytest.raises(SandboxError) as err:
            w.export(model, input_shape=(4,))
        assert w.status is not None and "torch" in w.status.frameworks
    _one_line(err.value)
    assert not marker.exists()


def test_seccomp_unavailable_is_refused_unless_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKDOORSCAN_SANDBOX_TEST_NO_SECCOMP", "1")
    with ModelWorker(Limits()) as w, pytest.raises(SandboxError, match="--trust-model") as err:
        w.session(hs.export_of(hs.endless_loop(3)))
    _one_line(err.value)
    with ModelWorker(Limits(trust=True)) as w:
        session = w.session(hs.export_of(hs.endless_loop(3)))
        (logits, _) = session.run(None, {"x": np.ones((1, 4), np.float32)})
        assert w.status.seccomp.startswith("unavailable")
    np.testing.assert_allclose(logits, 4.0 + 3)  # sum of the input, plus one per trip


# -- 5. nothing from the worker is unpickled ------------------------------------------------------


def test_pickle_reply_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    with ModelWorker(Limits(allow_read=[tmp_path])) as w:
        with pytest.raises(SandboxError, match="malformed") as err:
            w._call("hostile_sandbox:send_pickle", str(marker))
        _one_line(err.value)
        with pytest.raises(SandboxError, match="gone"):
            w._call("hostile_sandbox:start_thread")
    time.sleep(0.2)
    assert not marker.exists()


def test_reply_with_a_non_number_dtype_is_refused() -> None:
    with ModelWorker(Limits()) as w, pytest.raises(SandboxError, match="not an allowed number"):
        w._call("hostile_sandbox:send_lying_header")


def _frame(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (_frame(b"\x80\x04\x95garbage."), "malformed message header"),
        (_frame(b"[" * 100000 + b"]" * 100000), "malformed message header"),
        (_frame(b'{"buffers": 3}'), "buffer list"),
        (struct.pack("<Q", 1 << 40), "message header of"),
        (_frame(json.dumps({"buffers": [{"dtype": "float32", "shape": [-1]}]}).encode()), "shape"),
        (_frame(json.dumps({"buffers": [{"dtype": "float64", "shape": [1 << 40]}]}).encode()),
         "exceeds the limit"),
        (_frame(json.dumps({"buffers": [{"dtype": "V8", "shape": [1]}]}).encode()), "dtype"),
        (_frame(json.dumps({"buffers": [{"dtype": "bytes", "shape": [2, 2]}]}).encode()), "shape"),
    ],
)  # fmt: skip
def test_protocol_rejects_malformed_messages(raw: bytes, match: str) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(raw)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(protocol.ProtocolError, match=match):
            protocol.recv(b, 1 << 30)


def test_protocol_round_trip_of_every_allowed_dtype() -> None:
    a, b = socket.socketpair()
    arrays = [np.arange(6).astype(d).reshape(2, 3) for d in sorted(protocol.DTYPES)]
    with a, b:
        protocol.send(a, {"k": 1}, [*arrays, b"raw bytes"])
        header, out = protocol.recv(b, 1 << 20)
    assert header["k"] == 1 and out[-1] == b"raw bytes"
    for want, got in zip(arrays, out[:-1], strict=True):
        assert got.dtype == want.dtype and got.flags.writeable
        np.testing.assert_array_equal(got, want)


# -- 6. every model format, and the export cache, through the worker ------------------------------

ARCH_MODULE = """
import torch

def make(hidden=8):
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(16, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3)
    )
"""


def _proxy_logits(w: ModelWorker, export: object, x: np.ndarray) -> np.ndarray:
    session = w.session(export, device="cpu")
    (logits,) = session.run([export.logits_name], {export.input_name: x})  # type: ignore[attr-defined]
    return logits


def test_state_dict_with_arch_on_sys_path_exports_runs_and_is_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --arch code the scanner imports through sys.path only (not PYTHONPATH): the worker
    # imports it from the same folder, which it may list but whose other files it may not read.
    # The export cache: the first worker's export is stored by the scanner, the second worker
    # is served from it.
    torch = pytest.importorskip("torch")
    from backdoorscan.adapters import _cache
    from backdoorscan.sandbox import export_cached

    code, models, cache = tmp_path / "code", tmp_path / "models", tmp_path / "cache"
    code.mkdir()
    models.mkdir()
    (code / "tiny_arch.py").write_text(ARCH_MODULE)
    (code / "secret.txt").write_text("do not read")
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.setenv("BACKDOORSCAN_CACHE_DIR", str(cache))
    import tiny_arch

    torch.manual_seed(0)
    model = tiny_arch.make().eval()
    torch.save(model.state_dict(), models / "weights.pt")
    x = np.random.default_rng(0).standard_normal((5, 1, 4, 4)).astype(np.float32)
    want = model(torch.from_numpy(x)).detach().numpy()
    options = {"arch": "tiny_arch:make", "input_shape": (1, 4, 4)}
    limits = Limits(allow_read=[models], timeout=180)
    with ModelWorker(limits) as w:
        first = export_cached(w, models / "weights.pt", **options)
        logits = _proxy_logits(w, first, x)
        assert "torch" in w.status.frameworks
        if w.status.landlock.startswith("on"):
            with pytest.raises(ModelError, match="Permission"):
                w._call("hostile_sandbox:read_file", str(code / "secret.txt"))
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)
    assert not any("export cache" in n for n in first.notes), first.notes
    assert first.cache_key is not None and _cache.is_key_for(
        first.cache_key, _cache_sha(models / "weights.pt")
    )
    assert [p.name for p in cache.iterdir()] == [f"{first.cache_key}.onnx"]
    with ModelWorker(limits) as w:
        second = export_cached(w, models / "weights.pt", **options)
    assert any("loaded from the export cache" in n for n in second.notes), second.notes
    assert second.cache_key == first.cache_key
    assert second.model_bytes == first.model_bytes


def _cache_sha(path: Path) -> str:
    from backdoorscan._io import sha256_file

    return sha256_file(path)


class _ForgingWorker:
    """Stands for a worker whose model returns a cache key of its choosing."""

    def __init__(self, key: str) -> None:
        self.key = key

    def export(self, path: object, layer: object = None, **options: object) -> object:
        export = hs.export_of(hs.endless_loop(3))
        export.cache_key = self.key  # type: ignore[attr-defined]
        return export


@pytest.mark.parametrize(
    "forged",
    [
        "../../victim",  # a path
        "0" * 64 + "-" + "1" * 64,  # well formed, but another model file's hash
        "ab",
    ],
)
def test_forged_cache_key_from_the_worker_is_never_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forged: str
) -> None:
    from backdoorscan.sandbox import export_cached

    cache = tmp_path / "cache"
    monkeypatch.setenv("BACKDOORSCAN_CACHE_DIR", str(cache))
    model = tmp_path / "m.pt"
    model.write_bytes(b"not really a model")
    export = export_cached(_ForgingWorker(forged), model)  # type: ignore[arg-type]
    assert export.cache_key is None
    assert not cache.exists() and not (tmp_path / "victim.onnx").exists()


def test_torch_export_archive_exports_and_runs(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import digits_models as dm

    torch.manual_seed(0)
    model = dm.make_cnn().eval()
    x = np.random.default_rng(1).standard_normal((6, 1, 8, 8)).astype(np.float32)
    program = torch.export.export(
        model, (torch.from_numpy(x[:2]),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, str(tmp_path / "model.pt2"))
    want = model(torch.from_numpy(x)).detach().numpy()
    with ModelWorker(Limits(allow_read=[tmp_path], timeout=180)) as w:
        export = w.export(tmp_path / "model.pt2")
        logits = _proxy_logits(w, export, x)
        assert w.status.seccomp.startswith("on")
    assert export.framework == "torch" and export.input_shape == (1, 8, 8)
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy")
def test_keras_archive_exports_and_runs(tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            layers.Conv2D(4, 3, padding="same", activation="relu"),
            layers.Flatten(),
            layers.Dense(16, activation="relu", name="hidden"),
            layers.Dense(3, name="logits"),
        ]
    )
    model.save(tmp_path / "model.keras")
    x = np.random.default_rng(2).standard_normal((5, 8, 8, 1)).astype(np.float32)
    want = np.asarray(model.predict(x, verbose=0))
    with ModelWorker(Limits(allow_read=[tmp_path], timeout=180)) as w:
        export = w.export(tmp_path / "model.keras")
        rows = w.layers(tmp_path / "model.keras")
        logits = _proxy_logits(w, export, x)
        assert "keras" in w.status.frameworks and w.status.seccomp.startswith("on")
    assert export.framework == "keras" and export.feature_dim == 16
    assert any(r.default for r in rows)
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)


def test_error_lines_keep_the_cause_a_colon_announces() -> None:
    from backdoorscan.sandbox.limits import one_line

    torch_text = "m.pt is not a TorchScript archive torch can load: \nUnknown type 'exec':\nexec"
    assert one_line(torch_text) == "m.pt is not a TorchScript archive torch can load: " + (
        "Unknown type 'exec': exec"
    )
    assert one_line("first\nsecond") == "first"
    assert one_line("\n\n") == ""
    assert len(one_line("x" * 1000)) == 400
